"""The engine's agent index: capacity accounting, eligibility and the order agents are tried in.

Read-only towards the state records except :meth:`AgentIndex.reserve`, which the engine calls
when it reserves or frees capacity; every state transition stays in :mod:`router.engine`.

**Eligibility** (which (queue, channel) pairs an agent serves) follows from its skills and
capacities and is computed once per routing table.

**Order.** Queues whose agents are chosen the same way (the same strategy, skill needs and
channels) share one *pool*: they have the same eligible agents and the same order, so an agent
is indexed once per pool, not once per queue; in a routing file where many queues ask for the
same skills that is most of the saving. Each pool keeps a heap of its ready agents, entries
``(*strategy key, agent_id, version)``. An agent is pushed again only when its sort key changes
or it becomes ready after it was not: a change of which channels it can take is not a new key,
and the channel is checked when the entry surfaces. Entries of an older version are stale and
dropped when they surface, or when a heap grows to twice its pool (compaction). Ties are
broken by agent id, never by a counter of this process, so an engine restored from a snapshot
(which rebuilds the index from the records) makes exactly the same choices.

**Ready counts.** Per pool and channel, how many agents are available with room for that
channel. A contact whose pool has none is not searched for at all, which is what keeps a
standing backlog cheap (every agent busy, each new contact only queued).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from router.state import AgentRec, ContactRec
from rules.schema import Agent as AgentCfg
from rules.schema import Queue as QueueCfg
from rules.schema import RoutingFile

Pair = tuple[str, str]  # (queue, channel)


class _Pool:
    """Queues with the same eligible agents and the same order, and their agent heap."""

    __slots__ = ("channels", "heap", "ready", "size", "strategy")

    def __init__(self, strategy: str, channels: frozenset[str]) -> None:
        self.strategy = strategy
        self.channels = channels
        self.heap: list[tuple[Any, ...]] = []
        #: channel -> agents of this pool that are available with room for that channel.
        self.ready: dict[str, int] = dict.fromkeys(channels, 0)
        self.size = 0


_Spec = tuple[tuple[tuple[int, str, int, int], ...], int, tuple[_Pool, ...], int, str | None]


def has_skills(have: dict[str, int], need: dict[str, int]) -> bool:
    """Does a skill set meet every required proficiency?"""
    return all(have.get(skill, 0) >= level for skill, level in need.items())


class AgentIndex:
    """Who can take what, and who is next: see the module docstring."""

    def __init__(self, agents: dict[str, AgentRec]) -> None:
        self._agents = agents
        self.agent_cfg: dict[str, AgentCfg] = {}
        self.cost: dict[str, int] = {}
        self.eligible: dict[str, frozenset[Pair]] = {}
        self.agent_queues: dict[str, list[str]] = {}
        self.queue_channels: dict[str, frozenset[str]] = {}
        self._caps: dict[str, tuple[dict[str, int], int]] = {}
        self._pools: list[_Pool] = []
        self._queue_pool: dict[str, _Pool] = {}
        self._score: dict[tuple[str, int], float] = {}
        self._pool_ids: dict[int, int] = {}
        #: agent -> (channel limits as (bit, channel, limit, cost), budget, pools, how much of
        #: the basis its keys depend on, its one strategy or None).
        self._spec: dict[str, _Spec] = {}
        self._version: dict[str, int] = {}
        self._basis: dict[str, tuple[object, ...] | None] = {}
        #: agent -> bit mask of the channels it has room for (0: not available).
        self._ready: dict[str, int] = {}

    # ---- construction -------------------------------------------------------------------------

    def configure(self, cfg: RoutingFile, queues: dict[str, QueueCfg]) -> None:
        """Derive eligibility, capacities and pools from a routing file (then :meth:`rebuild`)."""
        self.cost = {str(k): v for k, v in cfg.capacity.cost.items()}
        self.agent_cfg = {a.id: a for a in cfg.agents}
        self._caps = {
            a.id: (
                {str(k): v for k, v in a.capacity.items()},
                a.budget if a.budget is not None else cfg.capacity.budget,
            )
            for a in cfg.agents
        }
        self.queue_channels = {name: frozenset(q.channels) for name, q in queues.items()}
        pools: dict[tuple[object, ...], _Pool] = {}
        self._queue_pool = {}
        for name, queue in queues.items():
            key = (queue.strategy, tuple(sorted(queue.skills.items())), self.queue_channels[name])
            pool = pools.get(key)
            if pool is None:
                pool = pools[key] = _Pool(queue.strategy, key[2])
            self._queue_pool[name] = pool
        self._pools = list(pools.values())
        pool_ids = {id(p): i for i, p in enumerate(self._pools)}
        self.eligible = {}
        self.agent_queues = {}
        self._score = {}
        self._spec = {}
        bits: dict[str, int] = {}  # channel -> its bit in a ready mask
        # Who serves which queue, found through the agents holding each queue's first skill
        # (not every agent against every queue: that is 40 million checks at 20,000 x 2,000).
        by_skill: dict[str, list[AgentCfg]] = {}
        for agent in cfg.agents:
            for skill in agent.skills:
                by_skill.setdefault(skill, []).append(agent)
        serves: dict[str, list[str]] = {a.id: [] for a in cfg.agents}
        for qname, queue in queues.items():
            # (a need of level 0 or less is met without the skill: no help in finding agents)
            first = next((k for k, level in queue.skills.items() if level > 0), None)
            for agent in cfg.agents if first is None else by_skill.get(first, ()):
                if has_skills(agent.skills, queue.skills):
                    serves[agent.id].append(qname)
        for agent in cfg.agents:
            pairs: set[Pair] = set()
            served_queues: list[str] = []
            agent_pools: dict[int, _Pool] = {}
            for qname in serves[agent.id]:
                queue = queues[qname]
                served = [ch for ch in queue.channels if agent.capacity.get(ch, 0) > 0]
                if not served:
                    continue
                served_queues.append(qname)
                pairs.update((qname, ch) for ch in served)
                pool = self._queue_pool[qname]
                if pool_ids[id(pool)] not in agent_pools:
                    agent_pools[pool_ids[id(pool)]] = pool
                    pool.size += 1
                    self._score[(agent.id, pool_ids[id(pool)])] = -float(
                        sum(agent.skills.get(s, 0) for s in queue.skills)
                    )
            self.eligible[agent.id] = frozenset(pairs)
            self.agent_queues[agent.id] = served_queues
            # The sort keys of longest_idle and most_skilled depend on (busy, idle_since) only;
            # least_occupied adds the budget in use, round_robin the last offer.
            strategies = {p.strategy for p in agent_pools.values()}
            basis_len = (
                4 if "round_robin" in strategies else 3 if "least_occupied" in strategies else 2
            )
            caps, budget = self._caps[agent.id]
            limits = tuple(
                (bits.setdefault(ch, 1 << len(bits)), ch, limit, self.cost.get(ch, 0))
                for ch, limit in caps.items()
            )
            pools_of = tuple(agent_pools.values())
            # Every pool orders this agent by the same key unless most_skilled is among them
            # (its key starts with the agent's skill in that queue) or strategies differ.
            single = (
                next(iter(strategies))
                if len(strategies) == 1 and "most_skilled" not in strategies
                else None
            )
            self._spec[agent.id] = (limits, budget, pools_of, basis_len, single)
        self._pool_ids = pool_ids

    def rebuild(self, agents: Iterable[AgentRec]) -> None:
        """Forget every heap entry and index ``agents`` afresh (after a restore or reload)."""
        for pool in self._pools:
            pool.heap = []
            pool.ready = dict.fromkeys(pool.channels, 0)
        self._version = {}
        self._basis = {}
        self._ready = {}
        for agent in agents:
            self.refresh(agent)

    # ---- capacity -----------------------------------------------------------------------------

    def can_take(self, agent: AgentRec, channel: str) -> bool:
        """Has the agent room for one more contact on ``channel`` (limit and budget)?"""
        caps = self._caps.get(agent.id)
        if caps is None:
            return False
        return (
            agent.load.get(channel, 0) < caps[0].get(channel, 0)
            and agent.budget_used + self.cost.get(channel, 0) <= caps[1]
        )

    def reserve(self, agent: AgentRec, channel: str, delta: int) -> None:
        """Take (``+1``) or free (``-1``) one contact's capacity on ``channel``."""
        agent.load[channel] = agent.load.get(channel, 0) + delta
        agent.budget_used += delta * self.cost.get(channel, 0)

    def suits(self, agent_id: str, contact: ContactRec, now: float) -> bool:
        """Does the agent have the contact's extra skills, and is it not excluded?

        The queue's own skills are not checked again: every caller has already found the agent
        eligible for the contact's (queue, channel) pair, which is computed from them.
        """
        until = contact.excluded.get(agent_id)
        if until is not None and until > now:
            return False
        if not contact.extra_skills:
            return True
        return has_skills(self.agent_cfg[agent_id].skills, contact.extra_skills)

    # ---- order --------------------------------------------------------------------------------

    def _key(self, agent: AgentRec, pool: _Pool) -> tuple[float, ...]:
        strategy = pool.strategy
        busy = 1.0 if agent.budget_used else 0.0
        if strategy == "longest_idle":
            return (busy, agent.idle_since)
        if strategy == "most_skilled":
            score = self._score.get((agent.id, self._pool_ids[id(pool)]), 0.0)
            return (score, busy, agent.idle_since)
        if strategy == "least_occupied":
            budget = self._caps[agent.id][1]
            return (agent.budget_used / budget if budget else 1.0, agent.idle_since)
        return (float(agent.last_offer_seq), agent.idle_since)

    def refresh(self, agent: AgentRec) -> None:
        """Re-index an agent after anything that changes its readiness or its sort keys."""
        agent_id = agent.id
        spec = self._spec.get(agent_id)
        if spec is None:
            return  # not in the routing file: never ready
        limits, budget, pools, basis_len, strategy = spec
        ready = 0
        if agent.state == "available":
            load, room = agent.load, budget - agent.budget_used
            for bit, channel, limit, cost in limits:
                if cost <= room and load.get(channel, 0) < limit:
                    ready |= bit
        before = self._ready.get(agent_id, 0)
        if ready != before:
            self._ready[agent_id] = ready
            changed = ready ^ before
            for bit, channel, _, _ in limits:
                if changed & bit:
                    delta = 1 if ready & bit else -1
                    for pool in pools:
                        counts = pool.ready
                        if channel in counts:
                            counts[channel] += delta
        basis = (
            (agent.budget_used > 0, agent.idle_since, agent.budget_used, agent.last_offer_seq)[
                :basis_len
            ]
            if ready
            else None
        )
        if basis == self._basis.get(agent_id):
            return  # same keys, still in the heaps (or still out of them)
        self._basis[agent_id] = basis
        version = self._version.get(agent_id, 0) + 1
        self._version[agent_id] = version
        if basis is None:
            return
        # One strategy (the usual case): one entry, shared by every pool's heap.
        shared = (*self._key(agent, pools[0]), agent_id, version) if strategy else None
        for pool in pools:
            heap = pool.heap
            heapq.heappush(heap, shared or (*self._key(agent, pool), agent_id, version))
            if len(heap) > 2 * pool.size + 64:
                versions = self._version
                heap[:] = [e for e in heap if e[-1] == versions.get(e[-2])]
                heapq.heapify(heap)

    def best_agent(self, contact: ContactRec, now: float) -> AgentRec | None:
        """The first ready agent, in its queue's order, who can take this contact."""
        channel = contact.channel
        pool = self._queue_pool.get(contact.queue)
        if pool is None or not pool.ready.get(channel):
            return None  # nobody in this queue has room for the channel: no search
        heap = pool.heap
        skipped = []
        chosen: AgentRec | None = None
        agents, versions, can_take, suits = self._agents, self._version, self.can_take, self.suits
        while heap:
            entry = heapq.heappop(heap)
            agent_id: str = entry[-2]
            if entry[-1] != versions.get(agent_id):
                continue  # stale
            agent = agents[agent_id]
            if agent.state != "available":
                # Not re-indexed since it left: out of every heap now, back in when available.
                self.refresh(agent)
                continue
            skipped.append(entry)
            if can_take(agent, channel) and suits(agent_id, contact, now):
                chosen = agent
                break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return chosen

    def serves(self, agent_id: str, pair: Pair) -> bool:
        """Is the agent eligible for this (queue, channel) pair?"""
        return pair in self.eligible.get(agent_id, ())
