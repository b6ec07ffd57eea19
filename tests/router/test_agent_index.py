"""The agent index picks the agent a plain search of the routing file would pick.

Random changes to agents (state, load, idle time, last offer) are applied to the records and
the index is told (``refresh``); after each, for every queue and channel, ``best_agent`` must be
the agent an independent search finds: eligible by the file's skills and capacities,
available, with room on the channel and in the budget, first by the queue's strategy, then id.
The changes include idle times going backwards, offers withdrawn (an agent free again with an
idle time older than other free agents'), equal idle times and a rebuild from the records, so
every way an agent is filed into a longest_idle pool's free order is exercised.
"""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from router.agent_index import AgentIndex
from router.state import AgentRec, ContactRec
from rules.load import parse_routing
from rules.schema import RoutingFile

CHANNELS = ["phone", "email", "chat"]
SKILLS = ["de", "en", "billing"]
STRATEGIES = ["longest_idle", "most_skilled", "least_occupied", "round_robin"]

agents_st = st.lists(
    st.fixed_dictionaries(
        {
            "skills": st.dictionaries(st.sampled_from(SKILLS), st.integers(1, 5), max_size=3),
            "capacity": st.fixed_dictionaries({ch: st.integers(0, 3) for ch in CHANNELS}),
        }
    ),
    min_size=1,
    max_size=6,
)
queues_st = st.lists(
    st.fixed_dictionaries(
        {
            "skills": st.dictionaries(st.sampled_from(SKILLS), st.integers(1, 3), max_size=2),
            "strategy": st.sampled_from(STRATEGIES),
            "channels": st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3, unique=True),
        }
    ),
    min_size=1,
    max_size=5,
)
op_st = st.tuples(
    st.sampled_from(
        ["state", "take", "free", "idle", "rewind", "offered", "bounce", "tie", "back", "rebuild"]
    ),
    st.integers(0, 5),
    st.sampled_from(CHANNELS),
    st.sampled_from(["available", "away", "offline"]),
)


def routing(agents: list[dict[str, Any]], queues: list[dict[str, Any]]) -> RoutingFile:
    doc = {
        "skills": SKILLS,
        "queues": {f"q{i}": q for i, q in enumerate(queues)},
        # The same queues twice: queues with equal needs share one order in the index.
        "agents": [{"id": f"a{i}", **a} for i, a in enumerate(agents)],
        "rules": [{"name": "default", "default": True, "queue": "q0"}],
    }
    doc["queues"].update({f"copy{i}": q for i, q in enumerate(queues)})
    return parse_routing(yaml.safe_dump(doc), "<test>").file


def contact(queue: str, channel: str) -> ContactRec:
    return ContactRec(
        id="generic:1",
        channel=channel,
        source="generic",
        customer_id="c1",
        expert=False,
        state="queued",
        rule="default",
        queue=queue,
        priority=0,
        arrived_at=0.0,
    )


def expected(cfg: RoutingFile, agents: dict[str, AgentRec], queue: str, channel: str) -> str | None:
    """The plain search: every agent of the file, judged and ordered from the file alone."""
    q = cfg.queues[queue]
    if channel not in q.channels:
        return None
    cost = {str(k): v for k, v in cfg.capacity.cost.items()}
    found = []
    for a in cfg.agents:
        rec = agents[a.id]
        budget = a.budget if a.budget is not None else cfg.capacity.budget
        if (
            rec.state == "available"
            and all(a.skills.get(s, 0) >= level for s, level in q.skills.items())
            and rec.load.get(channel, 0) < a.capacity.get(channel, 0)  # type: ignore[call-overload]
            and rec.budget_used + cost.get(channel, 0) <= budget
        ):
            busy = 1.0 if rec.budget_used else 0.0
            if q.strategy == "longest_idle":
                key: tuple[float, ...] = (busy, rec.idle_since)
            elif q.strategy == "most_skilled":
                key = (-float(sum(a.skills.get(s, 0) for s in q.skills)), busy, rec.idle_since)
            elif q.strategy == "least_occupied":
                key = (rec.budget_used / budget, rec.idle_since)
            else:
                key = (float(rec.last_offer_seq), rec.idle_since)
            found.append((key, a.id))
    return min(found)[1] if found else None


def run_and_check(
    cfg: RoutingFile, recs: dict[str, AgentRec], ops: list[tuple[str, int, str, str]]
) -> None:
    """Apply ``ops`` to the records, tell the index, and compare its choices after each."""
    index = AgentIndex(recs)
    index.configure(cfg, dict(cfg.queues))
    index.rebuild(recs.values())
    clock = 0.0
    for op, which, channel, state in ops:
        rec = recs[f"a{which % len(recs)}"]
        clock += 1.0
        if op == "state":
            rec.state = state  # type: ignore[assignment]
            if state == "available" and not rec.budget_used:
                rec.idle_since = clock
        elif op == "take" and index.can_take(rec, channel):
            index.reserve(rec, channel, +1)
        elif op == "free" and rec.load.get(channel, 0) > 0:
            index.reserve(rec, channel, -1)
            if not rec.budget_used:
                rec.idle_since = clock
        elif op == "idle":
            rec.idle_since = clock
        elif op == "rewind":
            # A key that shrinks (an earlier time than any so far) is re-indexed at once too.
            rec.idle_since = -clock
        elif op == "offered":
            rec.last_offer_seq += 1
        elif op == "bounce" and index.can_take(rec, channel):
            # An offer made and withdrawn: busy for a moment, then free again with the idle
            # time it had, which is older than some other free agents' (filed in between).
            index.reserve(rec, channel, +1)
            index.refresh(rec)
            index.reserve(rec, channel, -1)
        elif op == "tie":
            # The same idle time as another agent: the agent id decides.
            rec.idle_since = recs[f"a{(which + 1) % len(recs)}"].idle_since
        elif op == "back":
            # Any earlier idle time (a replay whose clock went back): between the others'.
            rec.idle_since = float(which % 4)
        elif op == "rebuild":
            # As after a restore: the index built afresh from the records, in any order.
            index.rebuild(reversed(list(recs.values())))
        index.refresh(rec)
        for queue in cfg.queues:
            for ch in CHANNELS:
                chosen = index.best_agent(contact(queue, ch), clock)
                assert (chosen.id if chosen else None) == expected(cfg, recs, queue, ch)


@settings(max_examples=300, deadline=None)
@given(agents=agents_st, queues=queues_st, ops=st.lists(op_st, max_size=40))
def test_best_agent_is_the_plain_search(
    agents: list[dict[str, Any]],
    queues: list[dict[str, Any]],
    ops: list[tuple[str, int, str, str]],
) -> None:
    cfg = routing(agents, queues)
    run_and_check(cfg, {a.id: AgentRec(id=a.id) for a in cfg.agents}, ops)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 8),
    idle=st.lists(st.integers(0, 3), min_size=8, max_size=8),
    strategies=st.lists(
        st.sampled_from(["longest_idle", "longest_idle", "most_skilled", "round_robin"]),
        min_size=1,
        max_size=3,
    ),
    ops=st.lists(op_st, max_size=40),
)
def test_longest_idle_order_when_agents_come_back_out_of_order(
    n: int, idle: list[int], strategies: list[str], ops: list[tuple[str, int, str, str]]
) -> None:
    """Many free agents from the start, and idle times that come back between the others'
    (withdrawn offers, equal times, a clock gone back): the free order the index keeps for a
    longest_idle pool must stay the plain search's."""
    agents = [{"skills": {"de": 1}, "capacity": dict.fromkeys(CHANNELS, 2)} for _ in range(n)]
    queues = [{"skills": {"de": 1}, "strategy": s, "channels": CHANNELS} for s in strategies]
    cfg = routing(agents, queues)
    recs = {
        a.id: AgentRec(id=a.id, state="available", idle_since=float(idle[i]))
        for i, a in enumerate(cfg.agents)
    }
    run_and_check(cfg, recs, ops)
