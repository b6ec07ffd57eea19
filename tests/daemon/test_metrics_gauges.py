"""The queue and agent gauges after any sequence of contacts and agent actions equal a count of
the engine's records made here, independently of the lean views the metrics read."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from channels.contact_event import ContactEvent
from router.daemon.metrics import AGENT_STATES, Metrics
from router.engine import Engine
from router.messages import (
    Accept,
    Complete,
    Login,
    Logout,
    OfferCmd,
    Reject,
    SetState,
    Tick,
)
from rules.load import parse_routing

# Two queues sharing agents, one of them on two channels, capacities above one: an agent can
# count for a queue through either channel, and be ready while it holds a contact.
ROUTING = """
version: 1
defaults: {offer_timeout: 10, wrap_up: 3, max_missed_offers: 2}
skills: [de, en]
queues:
  support: {skills: {de: 1}, channels: [phone, chat], sla: {seconds: 20, percent: 80}}
  billing: {skills: {en: 1}, channels: [chat], sla: {seconds: 30, percent: 90}}
agents:
  - {id: a1, skills: {de: 3, en: 1}, capacity: {phone: 1, chat: 2}}
  - {id: a2, skills: {de: 2}, capacity: {phone: 1}}
  - {id: a3, skills: {en: 2}, capacity: {chat: 3}}
  - {id: a4, skills: {de: 1, en: 1}, capacity: {chat: 1}}
rules:
  - {name: english, when: "language == 'en'", queue: billing}
  - {name: default, default: true, queue: support}
"""
AGENTS = ("a1", "a2", "a3", "a4")

steps = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.integers(0, 7), st.sampled_from(["phone", "chat"])),
        st.tuples(st.just("english"), st.integers(0, 7)),
        st.tuples(st.just("hangup"), st.integers(0, 7)),
        st.tuples(st.just("login"), st.sampled_from(AGENTS)),
        st.tuples(st.just("away"), st.sampled_from(AGENTS)),
        st.tuples(st.just("available"), st.sampled_from(AGENTS)),
        st.tuples(st.just("logout"), st.sampled_from(AGENTS)),
        st.tuples(st.just("accept"), st.integers(0, 5)),
        st.tuples(st.just("reject"), st.integers(0, 5)),
        st.tuples(st.just("complete"), st.sampled_from(AGENTS)),
        st.tuples(st.just("wait"), st.floats(0.5, 15.0)),
    ),
    max_size=40,
)


def _gauges(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name.startswith(("stellwerk_queue_", "stellwerk_agents", "stellwerk_service_"))
    }


def _counted(engine: Engine, now: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gauges' values counted straight from the records and the routing file."""
    state, cfg = engine.state, engine.table.file
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for st_name in AGENT_STATES:
        n = sum(1 for a in state.agents.values() if a.state == st_name)
        out[("stellwerk_agents", (("state", st_name),))] = n
    out[("stellwerk_agents_busy", ())] = sum(
        1 for a in state.agents.values() if a.contacts or a.offers
    )
    agent_cfg = {a.id: a for a in cfg.agents}
    for name, queue in cfg.queues.items():
        label = (("queue", name),)
        queued = [c for c in state.contacts.values() if c.state == "queued" and c.queue == name]
        out[("stellwerk_queue_waiting", label)] = len(queued)
        oldest = max((now - c.arrived_at for c in queued), default=0.0)
        out[("stellwerk_queue_oldest_wait_seconds", label)] = round(oldest, 3)
        ready = 0
        for agent in state.agents.values():
            a = agent_cfg.get(agent.id)
            if agent.state != "available" or a is None:
                continue
            if any(a.skills.get(s, 0) < level for s, level in queue.skills.items()):
                continue
            budget = a.budget if a.budget is not None else cfg.capacity.budget
            if any(
                agent.load.get(ch, 0) < a.capacity.get(ch, 0)
                and agent.budget_used + cfg.capacity.cost.get(ch, 0) <= budget
                for ch in queue.channels
            ):
                ready += 1
        out[("stellwerk_queue_agents_ready", label)] = ready
        c = state.counters[name]
        if c.answered + c.abandoned:
            out[("stellwerk_service_level_ratio", label)] = c.answered_in_sla / (
                c.answered + c.abandoned
            )
        out[("stellwerk_queue_sla_seconds", label)] = queue.sla.seconds
        out[("stellwerk_queue_sla_target_ratio", label)] = queue.sla.percent / 100.0
    return out


def _event(n: int, channel: str, kind: str = "new", language: str | None = None) -> Any:
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id=f"generic:{n}",
        channel=channel,  # type: ignore[arg-type]
        source="generic",
        external_id=str(n),
        language=language,
    )


@settings(max_examples=150, deadline=None)
@given(steps)
def test_gauges_equal_a_count_of_the_records_after_any_sequence(
    actions: list[tuple[Any, ...]],
) -> None:
    engine = Engine(parse_routing(ROUTING))
    metrics = Metrics()
    now = 1000.0
    offers: list[OfferCmd] = []
    channels: dict[int, str] = {}

    def feed(message: Any) -> None:
        cmds = engine.handle(message, now)
        metrics.observe_commands(cmds)
        offers.extend(c for c in cmds if isinstance(c, OfferCmd))

    for action in actions:
        kind = action[0]
        now += 0.25  # so that no two contacts arrive at the same time
        if kind == "call":
            channels.setdefault(action[1], action[2])
            feed(_event(action[1], channels[action[1]]))
        elif kind == "english":
            channels.setdefault(action[1], "chat")
            feed(_event(action[1], channels[action[1]], language="en"))
        elif kind == "hangup" and action[1] in channels:
            feed(_event(action[1], channels[action[1]], kind="end"))
        elif kind == "login":
            feed(Login(agent_id=action[1]))
        elif kind in ("away", "available"):
            feed(SetState(agent_id=action[1], state=kind))
        elif kind == "logout":
            feed(Logout(agent_id=action[1]))
        elif kind in ("accept", "reject") and offers:
            offer = offers[action[1] % len(offers)]
            cls = Accept if kind == "accept" else Reject
            feed(cls(agent_id=offer.agent_id, offer_id=offer.offer_id))
        elif kind == "complete":
            agent = engine.state.agents[action[1]]
            if agent.contacts:
                feed(Complete(agent_id=agent.id, contact_id=agent.contacts[0]))
        elif kind == "wait":
            now += action[1]
            feed(Tick())
        metrics.refresh(engine, now + 0.5)
        assert _gauges(metrics) == _counted(engine, now + 0.5)
