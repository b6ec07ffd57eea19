"""A hypothesis state machine drives the engine with random contacts, agent actions and time,
and checks the ACD's promises after every step:

* no contact is offered or assigned to two agents at once;
* no agent is ever over a per-channel limit or its capacity budget;
* only available agents hold offers, and an offline agent holds no work;
* every contact ends exactly once;
* never an available, capable agent idle while a matching contact waits;
* an offer always goes to the waiting contact with the best priority-plus-aging key among
  those the agent could take;
* a snapshot restores to an engine that behaves identically.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import hypothesis.strategies as st
import msgspec
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from channels.contact_event import ContactEvent, Sender
from router.engine import Engine
from router.messages import (
    Accept,
    Command,
    Complete,
    EventCmd,
    LinkKeys,
    Login,
    Logout,
    OfferCmd,
    RefusedCmd,
    Reject,
    RemoveExpert,
    SetState,
    Tick,
    UpsertExpert,
)
from rules.schema import Expert
from tests.router.enginekit import call, table

ROUTING = table(
    """
    skills: [dsl, tv, billing]
    defaults:
      offer_timeout: 30
      max_missed_offers: 2
      reject_cooldown: 15
      preferred_agent_seconds: 0
    capacity: {budget: 60, cost: {phone: 60, chat: 20, email: 12, social: 12}}
    queues:
      dsl: {skills: {dsl: 1}, wrap_up: 5, max_length: 3, overflow: general}
      general: {skills: {}, weight: 2, strategy: most_skilled, max_wait: 40, overflow: billing}
      billing: {skills: {billing: 2}, strategy: least_occupied}
    agents:
      - {id: a1, skills: {dsl: 3, tv: 2}, capacity: {phone: 1, chat: 3, email: 5, social: 2}}
      - {id: a2, skills: {dsl: 1}, capacity: {phone: 1, chat: 2}}
      - {id: a3, skills: {billing: 4, tv: 1}, capacity: {phone: 1, email: 5}}
      - {id: a4, skills: {dsl: 2, billing: 2}, capacity: {chat: 3, email: 2, social: 3}}
    experts:
      - {id: heinz, handles: ["discourse:heinz"]}
    rules:
      - {name: expert, when: customer.expert, queue: general, priority: 50}
      - {name: community, when: 'channel == "social"', queue: general, crowd_first: 30}
      - {name: vip, when: '"vip" in tags', queue: dsl, priority: 30}
      - name: tv
        when: '"tv" in tags'
        queue: dsl
        skills: {tv: 2}
        escalate: [{after: 20, skills: {}}, {after: 50, queue: general}]
      - {name: bill, when: '"bill" in tags', queue: billing}
      - {name: general, when: 'channel == "email"', queue: general}
      - {name: default, default: true, queue: dsl}
    """
)
AGENTS = ["a1", "a2", "a3", "a4"]
TERMINAL = {
    "contact.rejected",
    "contact.abandoned",
    "contact.answered_by_crowd",
    "contact.completed",
}


def post(topic: str, user: str, kind: str = "new", staff: bool = False) -> ContactEvent:
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id=f"discourse:{topic}",
        channel="social",
        source="discourse",
        external_id=topic,
        thread_id=topic,
        sender=Sender(handle=f"discourse:{user}"),
        attributes={"staff": "true"} if staff else {},
    )


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = Engine(ROUTING)
        self.now = 0.0
        self.created: set[str] = set()
        self.ended: Counter[str] = Counter()
        self.n = 0
        self.last_offers: list[OfferCmd] = []
        self.refused: list[RefusedCmd] = []
        self.waiting_before: dict[str, int] = {}
        self.excluded_before: dict[str, dict[str, float]] = {}
        self.askers: dict[str, str] = {}

    # ---- driving ----------------------------------------------------------------------

    def apply(self, message: object, dt: float) -> list[Command]:
        self.now += dt
        # contacts waiting before this step, with the token that changes whenever they move
        self.waiting_before = {
            c.id: c.token for c in self.engine.state.contacts.values() if c.state == "queued"
        }
        # An exclusion can end within the step (its retry timer drops it), after an offer that
        # it rightly kept from the agent: judge each offer by the exclusions as they were.
        self.excluded_before = {
            c.id: dict(c.excluded) for c in self.engine.state.contacts.values() if c.excluded
        }
        cmds = self.engine.handle(message, self.now)  # type: ignore[arg-type]
        self.last_offers = [c for c in cmds if isinstance(c, OfferCmd)]
        self.refused = [c for c in cmds if isinstance(c, RefusedCmd)]
        for c in cmds:
            if isinstance(c, EventCmd) and c.type in TERMINAL:
                self.ended[c.event.contact_id] += 1
        return cmds

    @rule(
        channel=st.sampled_from(["phone", "chat", "email"]),
        tags=st.lists(st.sampled_from(["vip", "tv", "bill"]), max_size=2, unique=True),
        dt=st.floats(0, 8),
    )
    def new_contact(self, channel: str, tags: list[str], dt: float) -> None:
        self.n += 1
        ident = f"c{self.n}"
        self.created.add(f"generic:{ident}")
        self.apply(call(ident, channel=channel, tags=tuple(tags), phone=f"+4930{self.n:06d}"), dt)

    @rule(user=st.sampled_from(["u0", "u1", "u2", "heinz"]), dt=st.floats(0, 8))
    def community_question(self, user: str, dt: float) -> None:
        self.n += 1
        topic = f"t{self.n}"
        self.created.add(f"discourse:{topic}")
        self.askers[topic] = user
        self.apply(post(topic, user), dt)

    @precondition(lambda self: self.askers)
    @rule(
        data=st.data(),
        user=st.sampled_from(["u0", "u1", "u2", "heinz"]),
        staff=st.booleans(),
        dt=st.floats(0, 8),
    )
    def community_reply(self, data: st.DataObject, user: str, staff: bool, dt: float) -> None:
        topic = data.draw(st.sampled_from(sorted(self.askers)))
        if user == self.askers[topic] and f"discourse:{topic}" not in self.engine.state.contacts:
            return  # the asker writing in a finished thread reopens it: not modelled here
        self.apply(post(topic, user, "update", staff=staff), dt)

    @rule(
        user=st.sampled_from(["u0", "u1", "u2"]),
        make=st.booleans(),
        dt=st.floats(0, 8),
    )
    def admin_changes_the_crowd(self, user: str, make: bool, dt: float) -> None:
        if make:
            self.apply(UpsertExpert(expert=Expert(id=user, handles=(f"discourse:{user}",))), dt)
        else:
            self.apply(RemoveExpert(expert_id=user), dt)

    @precondition(lambda self: self.n >= 2)
    @rule(data=st.data(), dt=st.floats(0, 8))
    def admin_links_two_callers(self, data: st.DataObject, dt: float) -> None:
        a, b = data.draw(st.lists(st.integers(1, self.n), min_size=2, max_size=2, unique=True))
        self.apply(LinkKeys(keys=(f"phone:+4930{a:06d}", f"phone:+4930{b:06d}")), dt)

    @precondition(lambda self: self.created)
    @rule(data=st.data(), dt=st.floats(0, 8))
    def contact_ends(self, data: st.DataObject, dt: float) -> None:
        ident = data.draw(st.sampled_from(sorted(self.created)))
        source, ext = ident.split(":", 1)
        if source == "discourse":
            end = msgspec.structs.replace(post(ext, self.askers[ext], "end"), end_reason="closed")
            self.apply(end, dt)
        else:
            self.apply(call(ext, kind="end", end_reason="hangup"), dt)

    @rule(agent=st.sampled_from(AGENTS), dt=st.floats(0, 8))
    def login(self, agent: str, dt: float) -> None:
        self.apply(Login(agent_id=agent), dt)

    @rule(agent=st.sampled_from(AGENTS), dt=st.floats(0, 8))
    def logout(self, agent: str, dt: float) -> None:
        self.apply(Logout(agent_id=agent), dt)

    @rule(
        agent=st.sampled_from(AGENTS),
        state=st.sampled_from(["available", "away"]),
        dt=st.floats(0, 8),
    )
    def set_state(self, agent: str, state: str, dt: float) -> None:
        self.apply(SetState(agent_id=agent, state=state, reason="break"), dt)  # type: ignore[arg-type]

    @precondition(lambda self: self.engine.state.offers)
    @rule(data=st.data(), dt=st.floats(0, 3))
    def accept_offer(self, data: st.DataObject, dt: float) -> None:
        # Accepting is what agents mostly do: a rule of its own, so assignments, completions
        # and wrap-ups are explored as much as the rarer paths.
        offer = data.draw(
            st.sampled_from(sorted(self.engine.state.offers.values(), key=lambda o: o.id))
        )
        self.apply(Accept(agent_id=offer.agent_id, offer_id=offer.id), dt)

    @precondition(lambda self: self.engine.state.offers)
    @rule(data=st.data(), how=st.sampled_from(["accept", "reject", "steal"]), dt=st.floats(0, 3))
    def answer_offer(self, data: st.DataObject, how: str, dt: float) -> None:
        offer = data.draw(
            st.sampled_from(sorted(self.engine.state.offers.values(), key=lambda o: o.id))
        )
        if how == "accept":
            self.apply(Accept(agent_id=offer.agent_id, offer_id=offer.id), dt)
        elif how == "reject":
            self.apply(Reject(agent_id=offer.agent_id, offer_id=offer.id), dt)
        else:
            thief = next(a for a in AGENTS if a != offer.agent_id)
            before = self.engine.snapshot()
            self.apply(Accept(agent_id=thief, offer_id=offer.id), 0.0)
            # an agent can never take another's offer: refused, and nothing else changes
            assert [r.reason for r in self.refused] == ["not_your_offer"]
            assert self.engine.snapshot() == before

    @precondition(
        lambda self: any(c.state == "assigned" for c in self.engine.state.contacts.values())
    )
    @rule(data=st.data(), dt=st.floats(0, 20))
    def complete(self, data: st.DataObject, dt: float) -> None:
        assigned = sorted(
            c.id for c in self.engine.state.contacts.values() if c.state == "assigned"
        )
        contact = self.engine.state.contacts[data.draw(st.sampled_from(assigned))]
        self.apply(Complete(agent_id=contact.agent_id or "", contact_id=contact.id), dt)

    @rule(dt=st.floats(0, 30))
    def time_passes(self, dt: float) -> None:
        self.apply(Tick(), dt)

    @rule(dt=st.floats(0, 30))
    def restart_from_snapshot(self, dt: float) -> None:
        """A restored engine is the same engine: same state, same reaction to the next input."""
        twin = Engine.restore(ROUTING, self.engine.snapshot())
        assert json.loads(twin.snapshot()) == json.loads(self.engine.snapshot())
        assert twin.next_deadline() == self.engine.next_deadline()
        assert twin.handle(Tick(), self.now + dt) == self.apply(Tick(), dt)
        assert json.loads(twin.snapshot()) == json.loads(self.engine.snapshot())
        self.engine = twin

    # ---- invariants -------------------------------------------------------------------

    @invariant()
    def one_agent_per_contact(self) -> None:
        state = self.engine.state
        holders: Counter[str] = Counter()
        for agent in state.agents.values():
            for offer_id in agent.offers:
                offer = state.offers[offer_id]
                assert offer.agent_id == agent.id
                holders[offer.contact_id] += 1
            for contact_id in agent.contacts:
                holders[contact_id] += 1
        assert all(n == 1 for n in holders.values()), holders
        assert len(state.offers) == sum(len(a.offers) for a in state.agents.values())
        for contact in state.contacts.values():
            held = contact.state in ("offered", "assigned", "wrap_up")
            assert holders[contact.id] == (1 if held else 0), (contact.id, contact.state)

    @invariant()
    def only_available_agents_hold_offers(self) -> None:
        for agent in self.engine.state.agents.values():
            if agent.state != "available":
                assert agent.offers == [], (agent.id, agent.state)
            if agent.state == "offline":
                assert agent.contacts == [], agent.id

    @invariant()
    def capacity_never_exceeded(self) -> None:
        state = self.engine.state
        cfg = {a.id: a for a in ROUTING.file.agents}
        cost = ROUTING.file.capacity.cost
        for agent in state.agents.values():
            used: Counter[str] = Counter()
            for offer_id in agent.offers:
                used[state.contacts[state.offers[offer_id].contact_id].channel] += 1
            for contact_id in agent.contacts:
                used[state.contacts[contact_id].channel] += 1
            assert {k: v for k, v in agent.load.items() if v} == dict(used)
            for channel, n in used.items():
                assert n <= cfg[agent.id].capacity.get(channel, 0)  # type: ignore[call-overload]
            budget = sum(cost[ch] * n for ch, n in used.items())  # type: ignore[index]
            assert budget == agent.budget_used <= ROUTING.file.capacity.budget

    @invariant()
    def every_contact_ends_exactly_once(self) -> None:
        live = self.engine.state.contacts
        for contact_id in self.created:
            n = self.ended[contact_id]
            if contact_id in live:
                expected = 1 if live[contact_id].state == "wrap_up" else 0
                assert n == expected, (contact_id, live[contact_id].state, n)
            else:
                assert n == 1, (contact_id, n)

    def _could_take(self, agent_id: str, contact_id: str) -> bool:
        """Recomputed from the routing file: available, skilled, not excluded, with room."""
        state = self.engine.state
        contact = state.contacts[contact_id]
        agent = state.agents[agent_id]
        if agent.state != "available" or not self._file_suits(agent_id, contact_id, self.now):
            return False
        cfg = next(a for a in ROUTING.file.agents if a.id == agent_id)
        cost = ROUTING.file.capacity.cost
        held = [state.contacts[state.offers[o].contact_id].channel for o in agent.offers]
        held += [state.contacts[c].channel for c in agent.contacts]
        budget = cfg.budget if cfg.budget is not None else ROUTING.file.capacity.budget
        used = sum(cost[ch] for ch in held)  # type: ignore[index]
        return (
            held.count(contact.channel) < cfg.capacity.get(contact.channel, 0)  # type: ignore[call-overload]
            and used + cost[contact.channel] <= budget  # type: ignore[index]
        )

    @invariant()
    def no_idle_capable_agent_while_a_contact_waits(self) -> None:
        for contact in self.engine.state.contacts.values():
            if contact.state != "queued":
                continue
            for agent_id in AGENTS:
                assert not self._could_take(agent_id, contact.id), (agent_id, contact.id)

    @invariant()
    def offers_follow_priority_plus_aging(self) -> None:
        # Judged from the routing file, not with the engine's own eligibility helpers.
        eng = self.engine
        queues = ROUTING.file.queues
        for offer in self.last_offers:
            if offer.offer_id not in eng.state.offers:
                continue  # already gone again within the same step
            given = eng.state.contacts[offer.contact_id]
            given_key = given.arrived_at - given.priority * queues[given.queue].weight
            timeout = queues[offer.queue].offer_timeout or ROUTING.file.defaults.offer_timeout
            offered_at = offer.expires_at - timeout
            for other in eng.state.contacts.values():
                # Only contacts that waited untouched through the whole step count: a step can
                # fire several timers, and a contact re-queued by a later one was not waiting
                # when an earlier one made this offer.
                if (
                    other.state != "queued"
                    or other.channel != given.channel
                    or self.waiting_before.get(other.id) != other.token
                ):
                    continue
                key = other.arrived_at - other.priority * queues[other.queue].weight
                if key < given_key:
                    assert not self._file_suits(offer.agent_id, other.id, offered_at), (
                        offer,
                        other.id,
                    )

    def _file_suits(self, agent_id: str, contact_id: str, at: float) -> bool:
        """Could the routing file's agent serve this waiting contact at time ``at``?"""
        contact = self.engine.state.contacts[contact_id]
        agent = next(a for a in ROUTING.file.agents if a.id == agent_id)
        queue = ROUTING.file.queues[contact.queue]
        until = self.excluded_before.get(contact_id, {}).get(
            agent_id, contact.excluded.get(agent_id)
        )
        return (
            contact.channel in queue.channels
            and agent.capacity.get(contact.channel, 0) > 0  # type: ignore[call-overload]
            and all(agent.skills.get(s, 0) >= n for s, n in queue.skills.items())
            and all(agent.skills.get(s, 0) >= n for s, n in contact.extra_skills.items())
            # At the very instant an exclusion ends the engine may still honour it: timers due
            # at the same time fire in kind order (offer expiries before exclusion retries), so
            # a contact freed by an expiry can take the agent first. Same-instant events are
            # concurrent; either order is right.
            and not (until is not None and until >= at - 1e-9)
        )

    @invariant()
    def waiting_counts_match(self) -> None:
        waiting = Counter(
            c.queue for c in self.engine.state.contacts.values() if c.state == "queued"
        )
        assert {q["name"]: q["waiting"] for q in self.engine.queue_stats(self.now)} == {
            name: waiting.get(name, 0) for name in ROUTING.file.queues
        }


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(
    max_examples=int(os.environ.get("STATEFUL_EXAMPLES", "200")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
