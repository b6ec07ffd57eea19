"""The engine's side of the agent desktop and the wallboard: away reasons, dispositions,
follow-ups of held contacts, the routing reason in offers, an agent's open work, and a
supervisor releasing a stuck contact."""

from __future__ import annotations

from router.engine import Engine
from router.messages import (
    Accept,
    Complete,
    Login,
    RefusedCmd,
    ReleaseContact,
    SetState,
)
from tests.router.enginekit import call, engine, events, offers

DESK = """
skills: [dsl]
defaults: {offer_timeout: 30, wrap_up: 10}
away_reasons: {break: Break, training: Training}
dispositions: {solved: Solved, callback: Call back later}
queues:
  q: {skills: {dsl: 1}}
agents:
  - {id: a1, skills: {dsl: 2}}
  - {id: a2, skills: {dsl: 2}}
experts:
  - {id: x-heinz, name: Heinz, level: 3, phones: ["+4930111222"]}
rules:
  - {name: experts, when: customer.expert, queue: q, priority: 50}
  - {name: default, default: true, queue: q}
"""


def desk() -> Engine:
    return engine(DESK)


def refused(cmds: list) -> list[RefusedCmd]:  # type: ignore[type-arg]
    return [c for c in cmds if isinstance(c, RefusedCmd)]


def test_away_with_an_unknown_reason_is_refused_and_the_agent_stays_available() -> None:
    eng = desk()
    eng.handle(Login(agent_id="a1"), 0.0)
    cmds = eng.handle(SetState(agent_id="a1", state="away", reason="coffee"), 1.0)
    (refusal,) = refused(cmds)
    assert refusal.reason == "unknown_away_reason"
    assert "break" in refusal.detail and "'coffee'" in refusal.detail
    assert eng.state.agents["a1"].state == "available"
    # A login straight into away is checked the same way; a known reason is taken.
    assert refused(eng.handle(Login(agent_id="a2", state="away"), 1.0))
    eng.handle(SetState(agent_id="a1", state="away", reason="break"), 2.0)
    assert (eng.state.agents["a1"].state, eng.state.agents["a1"].reason) == ("away", "break")


def test_without_away_reasons_in_the_file_any_reason_is_taken() -> None:
    eng = engine(DESK.replace("away_reasons: {break: Break, training: Training}", ""))
    eng.handle(Login(agent_id="a1"), 0.0)
    assert not refused(eng.handle(SetState(agent_id="a1", state="away", reason="x"), 1.0))


def test_complete_carries_the_disposition_into_the_event_and_the_history() -> None:
    eng = desk()
    eng.handle(Login(agent_id="a1"), 0.0)
    (offer,) = offers(eng.handle(call("c1", phone="+4930555"), 1.0))
    eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 2.0)
    cmds = eng.handle(Complete(agent_id="a1", contact_id="generic:c1", disposition="solved"), 9.0)
    (done,) = events(cmds, "contact.completed")
    assert done.event.disposition == "solved"
    assert done.event.handled == 7.0
    assert done.event.wrap_up == 10
    # The next contact of this customer shows how the last one ended.
    eng.handle(Login(agent_id="a2"), 9.0)
    (nxt,) = offers(eng.handle(call("c2", phone="+4930555"), 10.0))
    assert [(h["contact_id"], h["outcome"]) for h in nxt.history] == [("generic:c1", "solved")]


def test_an_unknown_disposition_is_refused_and_the_contact_stays_assigned() -> None:
    eng = desk()
    eng.handle(Login(agent_id="a1"), 0.0)
    (offer,) = offers(eng.handle(call("c1"), 1.0))
    eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 2.0)
    for code in ("bogus", "released_by_supervisor"):
        cmds = eng.handle(Complete(agent_id="a1", contact_id="generic:c1", disposition=code), 3.0)
        (refusal,) = refused(cmds)
        assert refusal.reason == "unknown_disposition" and "solved" in refusal.detail
        assert not events(cmds, "contact.completed")
        assert eng.state.contacts["generic:c1"].state == "assigned"
    # Without a disposition it completes as before (an MQTT desktop that knows none).
    cmds = eng.handle(Complete(agent_id="a1", contact_id="generic:c1"), 4.0)
    assert events(cmds, "contact.completed")[0].event.disposition is None


def test_a_follow_up_of_a_queued_offered_or_assigned_contact_is_announced() -> None:
    eng = desk()
    eng.handle(call("m1", channel="email", email="kunde@example.de"), 0.0)
    follow = call("m1", channel="email", email="kunde@example.de", kind="update", text="PS")
    (queued,) = events(eng.handle(follow, 1.0), "contact.updated")
    assert queued.event.state == "queued" and queued.event.agent_id is None
    (offer,) = offers(eng.handle(Login(agent_id="a1"), 2.0))
    (offered,) = events(eng.handle(follow, 3.0), "contact.updated")
    assert offered.event.state == "offered"
    assert (offered.event.agent_id, offered.event.offer_id) == ("a1", offer.offer_id)
    eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 4.0)
    (held,) = events(eng.handle(follow, 5.0), "contact.updated")
    assert (held.event.state, held.event.agent_id) == ("assigned", "a1")
    # No body is kept in the engine, not even the first message's (the edge keeps them).
    assert "PS" not in eng.snapshot().decode()


def test_offers_carry_the_routing_reason_and_the_expert_level() -> None:
    eng = desk()
    eng.handle(Login(agent_id="a1"), 0.0)
    (offer,) = offers(eng.handle(call("x", phone="+4930111222"), 1.0))
    assert (offer.rule, offer.priority, offer.queue) == ("experts", 50, "q")
    assert (offer.expert_id, offer.expert_level) == ("x-heinz", 3)


def test_agent_work_lists_offers_and_held_contacts_of_that_agent_only() -> None:
    eng = desk()
    eng.handle(Login(agent_id="a1"), 0.0)
    eng.handle(Login(agent_id="a2"), 0.0)
    first = offers(eng.handle(call("c1", channel="chat"), 1.0))[0]
    second = offers(eng.handle(call("c2", channel="chat"), 2.0))[0]
    eng.handle(Accept(agent_id=first.agent_id, offer_id=first.offer_id), 3.0)
    work = eng.agent_work(first.agent_id)
    assert work is not None
    assert [c["contact_id"] for c in work["contacts"]] == ["generic:c1"]
    assert work["contacts"][0]["state"] == "assigned" and work["contacts"][0]["assigned_at"] == 3
    other = eng.agent_work(second.agent_id)
    assert other is not None
    assert [o.offer_id for o in other["offers"]] == [second.offer_id]
    assert not other["contacts"]
    assert eng.agent_work("nobody") is None


def test_a_supervisor_releases_a_stuck_contact_without_wrap_up() -> None:
    eng = desk()
    eng.handle(Login(agent_id="a1"), 0.0)
    (offer,) = offers(eng.handle(call("dead"), 1.0))
    eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 2.0)
    assert eng.floor_view()["held"][0]["contact_id"] == "generic:dead"
    cmds = eng.handle(ReleaseContact(contact_id="generic:dead", by="wall-1"), 5000.0)
    (done,) = events(cmds, "contact.completed")
    assert done.event.disposition == "released_by_supervisor"
    assert done.event.released_by == "wall-1" and done.event.wrap_up == 0
    assert "generic:dead" not in eng.state.contacts
    assert eng.state.agents["a1"].contacts == [] and eng.state.agents["a1"].budget_used == 0
    # The freed agent takes the next contact at once.
    assert offers(eng.handle(call("next"), 5001.0))[0].agent_id == "a1"
    # Releasing what nobody holds is refused (as an admin refusal: no agent to tell).
    (refusal,) = refused(eng.handle(ReleaseContact(contact_id="generic:dead"), 5002.0))
    assert (refusal.agent_id, refusal.reason) == (None, "not_assigned")


def test_floor_view_counts_agents_per_queue_by_state() -> None:
    eng = desk()
    eng.handle(Login(agent_id="a1"), 0.0)
    eng.handle(Login(agent_id="a2", state="away", reason="training"), 0.0)
    eng.handle(call("c1"), 1.0)
    view = eng.floor_view()
    assert view["agents"]["q"] == {
        "busy": 1,
        "away": 1,
        "not_responding": 0,
        "wrap_up": 0,
        "logged_in": 2,
    }
