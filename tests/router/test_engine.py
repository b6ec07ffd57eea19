"""Routing semantics of the engine, one behaviour per test (see router/engine.py)."""

from __future__ import annotations

import msgspec
import pytest

from router.customers import FORGET_EVERY
from router.engine import Engine
from router.lifecycle import IllegalTransition, agent_transition, contact_transition
from router.messages import Accept, Complete, Login, Logout, RefusedCmd, Reject, SetState, Tick
from tests.router.enginekit import (
    accept_and_complete,
    call,
    engine,
    events,
    login_all,
    offered_to,
    offers,
)

ONE_QUEUE = """
skills: [dsl, tv]
defaults: {offer_timeout: 20, max_missed_offers: 2, reject_cooldown: 300}
queues:
  q: {skills: {dsl: 1}, strategy: %s}
agents:
  - {id: a1, skills: {dsl: 2}}
  - {id: a2, skills: {dsl: 5}}
  - {id: a3, skills: {dsl: 3}}
rules:
  - {name: vip, when: '"vip" in tags', queue: q, priority: 100}
  - {name: tv, when: 'text ~ "tv"', queue: q, skills: {tv: 1}}
  - {name: default, default: true, queue: q}
"""


def one_queue(strategy: str = "longest_idle") -> Engine:
    return engine(ONE_QUEUE % strategy)


def test_a_call_is_offered_to_a_logged_in_agent_with_the_skill() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])
    cmds = eng.handle(call("c1"), 10.0)
    assert offered_to(cmds) == [("generic:c1", "a1")]
    (offer,) = offers(cmds)
    assert offer.expires_at == 30.0
    assert [e.type for e in events(cmds)] == ["contact.queued", "contact.offered"]


def test_priority_wins_over_a_short_wait_but_aging_prevents_starvation() -> None:
    eng = one_queue()
    eng.handle(call("old"), 0.0)
    eng.handle(call("vip", tags=("vip",)), 50.0)  # priority 100 x weight 1: worth 100 s
    eng.handle(call("older"), -60.0 + 0.0)  # arrived 60 s before "old" (time is ours to choose)
    cmds = login_all(eng, ["a1"], now=60.0)
    # keys: old 0, vip 50-100=-50, older -60: the one who waited 120 s beats the VIP.
    assert offered_to(cmds) == [("generic:older", "a1")]


def test_vip_overtakes_contacts_that_waited_less_than_its_priority() -> None:
    eng = one_queue()
    eng.handle(call("plain"), 0.0)
    eng.handle(call("vip", tags=("vip",)), 30.0)
    assert offered_to(login_all(eng, ["a1"], now=40.0)) == [("generic:vip", "a1")]


def test_extra_skill_from_a_rule_is_required() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])  # dsl only
    cmds = eng.handle(call("t", text="my tv is broken"), 1.0)
    assert offers(cmds) == []
    assert eng.contact_info("generic:t")["state"] == "queued"  # type: ignore[index]


def test_proficiency_below_the_queue_minimum_is_not_eligible() -> None:
    eng = engine(
        """
        skills: [dsl]
        queues: {q: {skills: {dsl: 4}}}
        agents: [{id: junior, skills: {dsl: 3}}, {id: senior, skills: {dsl: 4}}]
        rules: [{name: d, default: true, queue: q}]
        """
    )
    login_all(eng, ["junior"])
    assert offers(eng.handle(call("c"), 1.0)) == []
    assert offered_to(login_all(eng, ["senior"], now=2.0)) == [("generic:c", "senior")]


def test_longest_idle_agent_gets_the_call() -> None:
    eng = one_queue("longest_idle")
    eng.handle(Login(agent_id="a1"), 5.0)
    eng.handle(Login(agent_id="a2"), 1.0)
    eng.handle(Login(agent_id="a3"), 3.0)
    assert offered_to(eng.handle(call("c"), 10.0)) == [("generic:c", "a2")]


def test_most_skilled_agent_gets_the_call() -> None:
    eng = one_queue("most_skilled")
    login_all(eng, ["a1", "a2", "a3"])
    assert offered_to(eng.handle(call("c"), 10.0)) == [("generic:c", "a2")]


def test_round_robin_rotates_through_agents() -> None:
    eng = one_queue("round_robin")
    login_all(eng, ["a1", "a2", "a3"])
    chosen = []
    for i in range(6):
        (offer,) = offers(eng.handle(call(f"c{i}"), 10.0 + i))
        chosen.append(offer.agent_id)
        accept_and_complete(eng, offer, 10.0 + i, 0.0)
    assert sorted(chosen[:3]) == ["a1", "a2", "a3"]
    assert chosen[3:] == chosen[:3]


def test_least_occupied_prefers_the_agent_with_fewer_chats() -> None:
    eng = engine(
        """
        skills: [s]
        queues: {q: {skills: {s: 1}, strategy: least_occupied, channels: [chat]}}
        agents:
          - {id: a, skills: {s: 1}, capacity: {chat: 3}}
          - {id: b, skills: {s: 1}, capacity: {chat: 3}}
        rules: [{name: d, default: true, queue: q}]
        """
    )
    login_all(eng, ["a", "b"])
    seen = [
        offers(eng.handle(call(f"c{i}", channel="chat"), 1.0 + i))[0].agent_id for i in range(4)
    ]
    assert sorted(seen) == ["a", "a", "b", "b"]


def test_shared_budget_a_call_blocks_chats_and_chats_block_a_call() -> None:
    eng = engine(
        """
        skills: [s]
        capacity: {budget: 60, cost: {phone: 60, chat: 20, email: 12, social: 12}}
        queues: {q: {skills: {s: 1}}}
        agents: [{id: a, skills: {s: 1}, capacity: {phone: 1, chat: 3, email: 5}}]
        rules: [{name: d, default: true, queue: q}]
        """
    )
    login_all(eng, ["a"])
    first = offers(eng.handle(call("chat1", channel="chat"), 1.0))
    assert len(first) == 1
    assert offers(eng.handle(call("call1"), 2.0)) == []  # 20 + 60 > 60
    assert len(offers(eng.handle(call("chat2", channel="chat"), 3.0))) == 1
    assert len(offers(eng.handle(call("chat3", channel="chat"), 4.0))) == 1
    assert offers(eng.handle(call("chat4", channel="chat"), 5.0)) == []  # per-channel limit 3
    (agent,) = eng.agent_list()
    assert agent["budget_used"] == 60
    assert agent["load"] == {"chat": 3}


def test_email_budget_five_at_once() -> None:
    eng = engine(
        """
        skills: [s]
        queues: {q: {skills: {s: 1}}}
        agents: [{id: a, skills: {s: 1}, capacity: {email: 10}}]
        rules: [{name: d, default: true, queue: q}]
        """
    )
    login_all(eng, ["a"])
    got = [len(offers(eng.handle(call(f"m{i}", channel="email"), i))) for i in range(7)]
    assert got == [1, 1, 1, 1, 1, 0, 0]  # 5 x 12 = 60 = budget


def test_offer_expires_and_goes_to_the_next_agent_keeping_its_wait() -> None:
    eng = one_queue()
    eng.handle(Login(agent_id="a1"), 0.0)
    eng.handle(Login(agent_id="a2"), 1.0)
    (first,) = offers(eng.handle(call("c"), 5.0))
    assert first.agent_id == "a1"
    cmds = eng.handle(Tick(), 25.0)
    assert [c.reason for c in cmds if type(c).__name__ == "CancelOfferCmd"] == ["expired"]
    assert offered_to(cmds) == [("generic:c", "a2")]
    (offered,) = events(cmds, "contact.offered")
    assert offered.event.waited == 20.0  # counted from arrival at 5.0, not from the re-queue


def test_offers_expire_when_the_tick_is_late() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])
    eng.handle(call("c"), 0.0)
    assert eng.next_deadline() == 20.0
    cmds = eng.handle(call("d"), 100.0)  # no tick in between: timers fire first
    assert events(cmds, "contact.offer_expired")


def test_not_responding_after_missed_offers_in_a_row() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])
    eng.handle(call("c1"), 0.0)
    eng.handle(Tick(), 20.0)  # missed 1, re-offered later to nobody else (a1 excluded)
    eng.handle(Tick(), 40.0)  # exclusion over -> offered again, then
    cmds = eng.handle(Tick(), 60.0)  # missed 2
    states = [e.event.state for e in events(cmds, "agent.state")]
    assert states == ["not_responding"]
    assert offers(eng.handle(call("c2"), 61.0)) == []
    # c1 is kept from a1 for one more offer timeout after its last miss (until 80)
    back = eng.handle(SetState(agent_id="a1", state="available"), 70.0)
    assert offered_to(back) == [("generic:c2", "a1")]
    eng.handle(Logout(agent_id="a1"), 71.0)
    back = eng.handle(Login(agent_id="a1"), 85.0)
    assert offered_to(back) == [("generic:c1", "a1")]


def test_reject_reroutes_at_once_and_not_back_to_the_same_agent() -> None:
    eng = one_queue()
    eng.handle(Login(agent_id="a1"), 0.0)
    eng.handle(Login(agent_id="a2"), 1.0)
    (offer,) = offers(eng.handle(call("c"), 2.0))
    cmds = eng.handle(Reject(agent_id=offer.agent_id, offer_id=offer.offer_id), 3.0)
    assert offered_to(cmds) == [("generic:c", "a2")]
    (second,) = offers(cmds)
    cmds = eng.handle(Reject(agent_id="a2", offer_id=second.offer_id), 4.0)
    assert offers(cmds) == []  # both rejected it: it waits for the cooldown
    assert offered_to(eng.handle(Tick(), 2.0 + 1 + 300.0)) == [("generic:c", "a1")]


def test_an_agent_cannot_accept_another_agents_offer() -> None:
    eng = one_queue()
    login_all(eng, ["a1", "a2"])
    (offer,) = offers(eng.handle(call("c"), 1.0))
    thief = "a2" if offer.agent_id == "a1" else "a1"
    cmds = eng.handle(Accept(agent_id=thief, offer_id=offer.offer_id), 2.0)
    assert cmds == [RefusedCmd(agent_id=thief, reason="not_your_offer", detail=offer.offer_id)]
    assert eng.contact_info("generic:c")["state"] == "offered"  # type: ignore[index]
    unknown = eng.handle(Accept(agent_id="ghost", offer_id=offer.offer_id), 2.0)
    assert [c.reason for c in unknown if isinstance(c, RefusedCmd)] == ["unknown_agent"]


def on_c1_with_c2_waiting() -> Engine:
    """Agent ``a`` has accepted ``c1`` (at 1.0) and ``c2`` waits (since 2.0); the queue has
    30 s of wrap-up."""
    eng = engine(
        """
        skills: [s]
        queues: {q: {skills: {s: 1}, wrap_up: 30}}
        agents: [{id: a, skills: {s: 1}}]
        rules: [{name: d, default: true, queue: q}]
        """
    )
    login_all(eng, ["a"])
    (offer,) = offers(eng.handle(call("c1"), 0.0))
    eng.handle(Accept(agent_id="a", offer_id=offer.offer_id), 1.0)
    eng.handle(call("c2"), 2.0)
    return eng


def test_wrap_up_holds_the_agent_then_drains_the_backlog() -> None:
    eng = on_c1_with_c2_waiting()
    cmds = eng.handle(Complete(agent_id="a", contact_id="generic:c1"), 100.0)
    assert [e.event.state for e in events(cmds, "agent.state")] == ["wrap_up"]
    assert offers(cmds) == []
    assert offers(eng.handle(Tick(), 129.0)) == []
    cmds = eng.handle(Tick(), 130.0)
    assert [e.event.state for e in events(cmds, "agent.state")] == ["available"]
    assert offered_to(cmds) == [("generic:c2", "a")]


def test_agent_can_end_wrap_up_early() -> None:
    eng = on_c1_with_c2_waiting()
    eng.handle(Complete(agent_id="a", contact_id="generic:c1"), 10.0)
    cmds = eng.handle(SetState(agent_id="a", state="available"), 12.0)
    assert offered_to(cmds) == [("generic:c2", "a")]


def test_hangup_while_queued_abandons_and_while_offered_cancels_the_offer() -> None:
    eng = one_queue()
    cmds = eng.handle(call("c1"), 0.0)
    cmds = eng.handle(call("c1", kind="end", end_reason="hangup"), 45.0)
    (abandoned,) = events(cmds, "contact.abandoned")
    assert abandoned.event.waited == 45.0 and abandoned.event.reason == "hangup"
    login_all(eng, ["a1"], now=50.0)
    assert len(offers(eng.handle(call("c2"), 51.0))) == 1
    cmds = eng.handle(call("c2", kind="end", end_reason="hangup"), 52.0)
    assert [type(c).__name__ for c in cmds if type(c).__name__ == "CancelOfferCmd"] == [
        "CancelOfferCmd"
    ]
    assert events(cmds, "contact.abandoned")
    assert eng.contact_info("generic:c2")["state"] == "abandoned"  # type: ignore[index]
    # the agent's capacity is free again
    assert len(offers(eng.handle(call("c3"), 53.0))) == 1
    stats = {q["name"]: q for q in eng.queue_stats(60.0)}
    assert stats["q"]["abandoned"] == 2


def test_hangup_while_assigned_completes_so_the_agent_is_not_stuck() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])
    (offer,) = offers(eng.handle(call("c"), 0.0))
    eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 1.0)
    cmds = eng.handle(call("c", kind="end", end_reason="hangup"), 90.0)
    (done,) = events(cmds, "contact.completed")
    assert done.event.handled == 89.0
    assert len(offers(eng.handle(call("d"), 91.0))) == 1


ESCALATION = """
skills: [dsl, senior, general]
queues:
  l2: {skills: {dsl: 1}}
  general: {skills: {general: 1}}
agents:
  - {id: junior, skills: {dsl: 1}}
  - {id: senior, skills: {dsl: 1, senior: 1}}
  - {id: anyone, skills: {general: 1}}
rules:
  - name: hard
    when: 'text ~ "hard"'
    queue: l2
    skills: {senior: 1}
    escalate:
      - {after: 60, skills: {}}
      - {after: 300, queue: general, priority: 5}
  - {name: d, default: true, queue: l2}
"""


def test_escalation_widens_skills_then_moves_queue() -> None:
    eng = engine(ESCALATION)
    login_all(eng, ["junior"])
    assert offers(eng.handle(call("c", text="hard one"), 0.0)) == []
    cmds = eng.handle(Tick(), 60.0)
    assert offered_to(cmds) == [("generic:c", "junior")]  # senior no longer required


def test_a_step_that_came_due_while_assigned_applies_as_soon_as_the_contact_is_back() -> None:
    eng = engine(ESCALATION)
    login_all(eng, ["senior", "junior"])
    (offer,) = offers(eng.handle(call("c", text="hard one"), 0.0))
    assert offer.agent_id == "senior"
    eng.handle(Accept(agent_id="senior", offer_id=offer.offer_id), 1.0)
    # The senior leaves after the first step's 60 s: the contact is queued again, the step is
    # overdue and widens the skills at once, so the junior gets it in the same commands.
    cmds = eng.handle(Logout(agent_id="senior"), 100.0)
    assert [e.event.step for e in events(cmds, "contact.escalated")] == [1]
    assert offered_to(cmds) == [("generic:c", "junior")]


def test_a_contact_back_from_an_agent_that_overflows_at_once_keeps_its_escalation_steps() -> None:
    # Its max wait ran out while it was with an agent, so it overflows as it comes back; the
    # step at 300 s (counted from its arrival) must still fire in the queue it overflowed to.
    eng = engine(
        ESCALATION.replace(
            "l2: {skills: {dsl: 1}}", "l2: {skills: {dsl: 1}, max_wait: 120, overflow: general}"
        )
    )
    login_all(eng, ["senior"])
    (offer,) = offers(eng.handle(call("c", text="hard one"), 0.0))
    eng.handle(Accept(agent_id="senior", offer_id=offer.offer_id), 1.0)
    cmds = eng.handle(Logout(agent_id="senior"), 200.0)
    assert [e.event.to for e in events(cmds, "contact.overflowed")] == ["general"]
    assert eng.next_deadline() == 300.0
    cmds = eng.handle(Tick(), 300.0)
    assert [(e.event.step, e.event.to) for e in events(cmds, "contact.escalated")] == [
        (2, "general")
    ]


def test_escalation_moves_to_another_queue_keeping_the_wait() -> None:
    eng = engine(ESCALATION)
    login_all(eng, ["anyone"])
    eng.handle(call("c", text="hard one"), 0.0)
    cmds = eng.handle(Tick(), 300.0)
    # both steps are due by now: first the skills widen, then it moves
    assert [e.event.to for e in events(cmds, "contact.escalated")] == ["l2", "general"]
    assert offered_to(cmds) == [("generic:c", "anyone")]
    (offered,) = events(cmds, "contact.offered")
    assert offered.event.waited == 300.0 and offered.event.queue == "general"


OVERFLOW = """
skills: [a, b]
queues:
  main: {skills: {a: 1}, max_wait: 120, max_length: 2, overflow: backup}
  backup: {skills: {b: 1}, max_length: 1}
agents:
  - {id: x, skills: {a: 1}}
  - {id: y, skills: {b: 1}}
rules: [{name: d, default: true, queue: main}]
"""


def test_overflow_on_max_wait() -> None:
    eng = engine(OVERFLOW)
    login_all(eng, ["y"])
    eng.handle(call("c"), 0.0)
    cmds = eng.handle(Tick(), 120.0)
    assert [e.event.reason for e in events(cmds, "contact.overflowed")] == ["max_wait"]
    assert offered_to(cmds) == [("generic:c", "y")]


def test_overflow_on_max_length_then_reject_when_everything_is_full() -> None:
    eng = engine(OVERFLOW)
    for i in range(3):
        eng.handle(call(f"c{i}"), float(i))
    cmds = eng.handle(call("c3"), 4.0)
    assert events(cmds, "contact.rejected")[0].event.reason == "queue_full"
    stats = {q["name"]: q["waiting"] for q in eng.queue_stats(5.0)}
    assert stats == {"main": 2, "backup": 1}


def test_preferred_agent_is_the_last_who_served_the_customer() -> None:
    eng = one_queue()
    eng.handle(Login(agent_id="a1"), 0.0)
    eng.handle(Login(agent_id="a3"), 1.0)
    (offer,) = offers(eng.handle(call("first", phone="+4930111"), 10.0))
    served_by = offer.agent_id
    accept_and_complete(eng, offer, 10.0, 60.0)
    # the other agent has been idle longer now, yet the customer's agent is preferred
    (again,) = offers(eng.handle(call("second", phone="+4930111"), 200.0))
    assert again.agent_id == served_by
    assert [h["contact_id"] for h in again.history] == ["generic:first"]
    # a stranger goes to the longest idle agent
    (other,) = offers(eng.handle(call("third", phone="+4930222"), 201.0))
    assert other.agent_id != served_by


def test_preferred_agent_window_expires() -> None:
    eng = one_queue()
    eng.handle(Login(agent_id="a1"), 0.0)
    eng.handle(Login(agent_id="a3"), 1.0)
    (offer,) = offers(eng.handle(call("first", phone="+4930111"), 10.0))
    accept_and_complete(eng, offer, 10.0, 60.0)
    (again,) = offers(eng.handle(call("second", phone="+4930111"), 10.0 + 60 + 3601))
    assert again.agent_id != offer.agent_id  # longest idle again


def test_backlog_drains_on_login_and_on_completion() -> None:
    eng = one_queue()
    for i in range(3):
        eng.handle(call(f"c{i}"), float(i))
    cmds = login_all(eng, ["a1"], now=10.0)
    assert offered_to(cmds) == [("generic:c0", "a1")]
    cmds = accept_and_complete(eng, offers(cmds)[0], 10.0, 5.0)
    assert offered_to(cmds) == [("generic:c1", "a1")]


def test_logout_requeues_offers_and_open_work_keeping_the_wait() -> None:
    eng = one_queue()
    eng.handle(Login(agent_id="a1"), 0.0)
    (offer,) = offers(eng.handle(call("c"), 1.0))
    eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 2.0)
    eng.handle(Login(agent_id="a2"), 3.0)
    cmds = eng.handle(Logout(agent_id="a1"), 50.0)
    assert offered_to(cmds) == [("generic:c", "a2")]
    assert events(cmds, "contact.offered")[0].event.waited == 49.0


def test_away_withdraws_pending_offers() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])
    eng.handle(call("c"), 1.0)
    cmds = eng.handle(SetState(agent_id="a1", state="away", reason="break"), 2.0)
    assert [e.event.reason for e in events(cmds, "agent.state")] == ["break"]
    assert eng.contact_info("generic:c")["state"] == "queued"  # type: ignore[index]
    assert offered_to(eng.handle(SetState(agent_id="a1", state="available"), 3.0)) == [
        ("generic:c", "a1")
    ]


def test_spam_is_rejected_with_a_reason() -> None:
    eng = engine(
        """
        skills: [s]
        queues: {q: {skills: {s: 1}}}
        agents: [{id: a, skills: {s: 1}}]
        rules:
          - {name: spam, when: 'text ~ "(?i)viagra"', reject: spam}
          - {name: d, default: true, queue: q}
        """
    )
    cmds = eng.handle(call("c", text="Cheap VIAGRA"), 0.0)
    (rejected,) = events(cmds, "contact.rejected")
    assert rejected.event.reason == "spam"
    assert eng.contact_info("generic:c")["state"] == "rejected"  # type: ignore[index]


CROWD = """
skills: [community]
queues: {desk: {skills: {community: 1}, channels: [social]}}
agents: [{id: a, skills: {community: 1}, capacity: {social: 5}}]
rules:
  - {name: community, when: 'channel == "social"', queue: desk, crowd_first: 600}
  - {name: d, default: true, queue: desk}
"""


def post(ident: str, user: str, kind: str = "new") -> object:
    return call(ident, channel="social", source="discourse", handle=f"discourse:{user}", kind=kind)


def test_crowd_first_answered_by_the_crowd_never_reaches_an_agent() -> None:
    eng = engine(CROWD)
    login_all(eng, ["a"])
    cmds = eng.handle(post("t1", "asker"), 0.0)  # type: ignore[arg-type]
    assert offers(cmds) == []
    assert offers(eng.handle(post("t1", "asker", "update"), 100.0)) == []  # asker again
    cmds = eng.handle(post("t1", "champion", "update"), 200.0)  # type: ignore[arg-type]
    (answered,) = events(cmds, "contact.answered_by_crowd")
    assert answered.event.by == "discourse:champion"
    assert offers(eng.handle(Tick(), 700.0)) == []


def test_crowd_first_unanswered_goes_to_the_desk_with_its_full_wait() -> None:
    eng = engine(CROWD)
    login_all(eng, ["a"])
    eng.handle(post("t1", "asker"), 0.0)  # type: ignore[arg-type]
    cmds = eng.handle(Tick(), 600.0)
    assert offered_to(cmds) == [("discourse:t1", "a")]
    assert events(cmds, "contact.offered")[0].event.waited == 600.0


def test_snapshot_restore_keeps_queues_offers_and_assignments() -> None:
    eng = one_queue()
    login_all(eng, ["a1", "a2"])
    (o1,) = offers(eng.handle(call("c1"), 1.0))
    eng.handle(Accept(agent_id=o1.agent_id, offer_id=o1.offer_id), 2.0)
    (o2,) = offers(eng.handle(call("c2"), 3.0))
    eng.handle(call("c3"), 4.0)
    restored = Engine.restore(eng.table, eng.snapshot())
    assert restored.snapshot() == eng.snapshot()
    # the restored engine behaves the same: the pending offer still expires, c3 still waits
    assert restored.next_deadline() == eng.next_deadline()
    a = eng.handle(Tick(), 30.0)
    b = restored.handle(Tick(), 30.0)
    assert a == b
    assert restored.contact_info("generic:c1")["agent_id"] == o1.agent_id  # type: ignore[index]
    assert o2.offer_id not in restored.state.offers


def test_a_snapshot_with_a_state_outside_the_lifecycle_is_refused_on_restore() -> None:
    # The records' states are the lifecycle's literals, so a damaged snapshot fails loudly at
    # restore instead of leaving a contact or an agent in a state no transition leads out of.
    eng = one_queue()
    login_all(eng, ["a1"])
    eng.handle(call("c1"), 1.0)
    good = eng.snapshot()
    assert b'"state":"offered"' in good and b'"state":"available"' in good
    with pytest.raises(msgspec.ValidationError, match="contacts"):
        Engine.restore(eng.table, good.replace(b'"state":"offered"', b'"state":"parked"'))
    with pytest.raises(msgspec.ValidationError, match="agents"):
        Engine.restore(eng.table, good.replace(b'"state":"available"', b'"state":"lunch"'))


def test_illegal_transitions_raise() -> None:
    with pytest.raises(IllegalTransition):
        contact_transition("c", "done", "queued")
    with pytest.raises(IllegalTransition):
        contact_transition("c", "received", "assigned")
    with pytest.raises(IllegalTransition):
        agent_transition("a", "offline", "wrap_up")
    assert agent_transition("a", "offline", "available") == "available"


def test_complete_of_someone_elses_contact_is_refused() -> None:
    eng = one_queue()
    login_all(eng, ["a1", "a2"])
    (offer,) = offers(eng.handle(call("c"), 1.0))
    eng.handle(Accept(agent_id=offer.agent_id, offer_id=offer.offer_id), 2.0)
    other = "a2" if offer.agent_id == "a1" else "a1"
    cmds = eng.handle(Complete(agent_id=other, contact_id="generic:c"), 3.0)
    assert [c.reason for c in cmds if isinstance(c, RefusedCmd)] == ["not_your_contact"]


def test_a_chat_customer_writing_again_after_completion_is_new_work() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])
    chat = dict(channel="chat", source="whatsapp", phone="+4915112345678")
    (offer,) = offers(eng.handle(call("4915112345678", **chat), 0.0))  # type: ignore[arg-type]
    accept_and_complete(eng, offer, 1.0, 60.0)
    cmds = eng.handle(call("4915112345678", kind="update", **chat), 500.0)  # type: ignore[arg-type]
    (again,) = offers(cmds)
    assert again.contact_id == "whatsapp:4915112345678"
    assert [h["outcome"] for h in again.history] == ["completed"]


def test_late_events_of_a_finished_call_or_crowd_replies_do_not_reopen() -> None:
    eng = one_queue()
    login_all(eng, ["a1"])
    (offer,) = offers(eng.handle(call("c", phone="+4930123"), 0.0))
    accept_and_complete(eng, offer, 1.0, 60.0)
    assert eng.handle(call("c", phone="+4930123", kind="update"), 100.0) == []
    crowd = engine(CROWD)
    crowd.handle(post("t1", "asker"), 0.0)  # type: ignore[arg-type]
    crowd.handle(post("t1", "champion", "update"), 10.0)  # type: ignore[arg-type]
    assert crowd.handle(post("t1", "another", "update"), 20.0) == []  # type: ignore[arg-type]
    reopened = crowd.handle(post("t1", "asker", "update"), 30.0)  # type: ignore[arg-type]
    assert events(reopened, "contact.crowd_window")


RETAINING_1000_S = """
skills: [s]
defaults: {customer_retention: 1000}
queues: {q: {skills: {s: 1}}}
agents: [{id: a, skills: {s: 1}}]
rules: [{name: d, default: true, queue: q}]
"""


def test_customers_with_nothing_open_are_forgotten_after_the_retention() -> None:
    eng = engine(RETAINING_1000_S)
    login_all(eng, ["a"])
    (offer,) = offers(eng.handle(call("first", phone="+4930111"), 0.0))
    accept_and_complete(eng, offer, 0.0, 10.0)
    eng.handle(call("open", phone="+4930222"), 20.0)  # still queued behind nobody: stays open
    eng.handle(call("x", kind="end", end_reason="hangup"), 20.0)
    # Forgetting comes in bursts, one every FORGET_EVERY look-ups (router/customers.py).
    for n in range(FORGET_EVERY):
        eng.handle(call(f"later{n}", phone=f"+4930333{n:03d}"), 5000.0)
    remembered = {k for c in eng.state.customers.values() for k in c.keys}
    assert "phone:+4930111" not in remembered  # nothing open, last seen long ago
    assert "phone:+4930222" in remembered  # its contact is still being handled
    assert "phone:+4930333000" in remembered


def test_a_backlog_of_old_customers_goes_twice_as_fast_as_new_ones_come() -> None:
    eng = engine(RETAINING_1000_S)
    # 300 callers who hung up while queued: nothing open, last seen at 0. Their 300 look-ups
    # count towards the bursts, which found nobody past the retention then.
    for n in range(300):
        eng.handle(call(f"old{n}", phone=f"+4930100{n:03d}"), 0.0)
        eng.handle(call(f"old{n}", kind="end", end_reason="hangup"), 0.0)
    assert len(eng.state.customers) == 300
    calls = FORGET_EVERY * (300 // (2 * FORGET_EVERY) + 2)  # enough bursts for all 300
    for n in range(calls):
        eng.handle(call(f"new{n}", phone=f"+4930200{n:03d}"), 5000.0)
        eng.handle(call(f"new{n}", kind="end", end_reason="hangup"), 5000.0)
        old = sum(1 for c in eng.state.customers.values() if c.last_seen == 0.0)
        # a burst at every FORGET_EVERY-th look-up since the start, of the oldest first
        bursts = (300 + n + 1) // FORGET_EVERY - 300 // FORGET_EVERY
        assert old == max(0, 300 - 2 * FORGET_EVERY * bursts)
    assert len(eng.state.customers) == calls  # every old one gone, the new ones stay
    # and every key of the forgotten ones is gone with them
    assert not any(k.startswith("phone:+4930100") for k in eng.state.keys)


def test_outstanding_offers_repeat_the_offers_made() -> None:
    eng = one_queue()
    login_all(eng, ["a1", "a2"])
    made = offers(eng.handle(call("c1", phone="+4930111"), 1.0))
    made += offers(eng.handle(call("c2", phone="+4930222"), 2.0))
    restored = Engine.restore(eng.table, eng.snapshot())
    assert sorted(restored.outstanding_offers(), key=lambda o: o.offer_id) == sorted(
        made, key=lambda o: o.offer_id
    )


def test_repeated_accept_and_complete_are_harmless_not_refused() -> None:
    # MQTT QoS 1 delivers at least once, and a desktop completes a call the caller ended.
    eng = one_queue()
    login_all(eng, ["a1"])
    (offer,) = offers(eng.handle(call("c"), 0.0))
    eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 1.0)
    assert eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), 1.5) == []
    eng.handle(call("c", kind="end", end_reason="hangup"), 30.0)
    assert eng.handle(Complete(agent_id="a1", contact_id="generic:c"), 31.0) == []
    # but another agent's complete of it is still refused
    eng.handle(Login(agent_id="a2"), 32.0)
    refused = eng.handle(Complete(agent_id="a2", contact_id="generic:c"), 33.0)
    assert [c.reason for c in refused if isinstance(c, RefusedCmd)] == ["not_your_contact"]
