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
dropped when they surface, or when a heap grows to twice its pool (compaction).

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
_NOTHING: frozenset[str] = frozenset()


class _Pool:
    """Queues with the same eligible agents and the same order, and their agent heap."""

    __slots__ = ("channels", "heap", "ready", "size", "skills", "strategy")

    def __init__(self, strategy: str, skills: dict[str, int], channels: frozenset[str]) -> None:
        self.strategy = strategy
        self.skills = skills
        self.channels = channels
        self.heap: list[tuple[Any, ...]] = []
        #: channel -> agents of this pool that are available with room for that channel.
        self.ready: dict[str, int] = dict.fromkeys(channels, 0)
        self.size = 0


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
        self._agent_pools: dict[str, list[_Pool]] = {}
        self._score: dict[tuple[str, int], float] = {}
        self._basis_len: dict[str, int] = {}
        self._version: dict[str, int] = {}
        self._basis: dict[str, tuple[object, ...] | None] = {}
        self._ready: dict[str, frozenset[str]] = {}

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
                pool = pools[key] = _Pool(queue.strategy, dict(queue.skills), key[2])
            self._queue_pool[name] = pool
        self._pools = list(pools.values())
        pool_ids = {id(p): i for i, p in enumerate(self._pools)}
        self.eligible = {}
        self.agent_queues = {}
        self._agent_pools = {}
        self._score = {}
        self._basis_len = {}
        for agent in cfg.agents:
            pairs: set[Pair] = set()
            served_queues: list[str] = []
            agent_pools: dict[int, _Pool] = {}
            for qname, queue in queues.items():
                if not has_skills(agent.skills, queue.skills):
                    continue
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
            self._agent_pools[agent.id] = list(agent_pools.values())
            # The sort keys of longest_idle and most_skilled depend on (busy, idle_since) only;
            # least_occupied adds the budget in use, round_robin the last offer.
            strategies = {p.strategy for p in agent_pools.values()}
            self._basis_len[agent.id] = (
                4 if "round_robin" in strategies else 3 if "least_occupied" in strategies else 2
            )
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

    def budget(self, agent_id: str) -> int:
        """The agent's capacity budget (0 for an agent not in the routing file)."""
        caps = self._caps.get(agent_id)
        return caps[1] if caps is not None else 0

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
        caps = self._caps.get(agent_id)
        if agent.state == "available" and caps is not None:
            load, used, cost, budget = agent.load, agent.budget_used, self.cost, caps[1]
            ready = frozenset(
                ch
                for ch, limit in caps[0].items()
                if load.get(ch, 0) < limit and used + cost.get(ch, 0) <= budget
            )
        else:
            ready = _NOTHING
        before = self._ready.get(agent_id, _NOTHING)
        if ready != before:
            self._ready[agent_id] = ready
            gained, lost = ready - before, before - ready
            for pool in self._agent_pools.get(agent_id, ()):
                counts = pool.ready
                for ch in gained:
                    if ch in counts:
                        counts[ch] += 1
                for ch in lost:
                    if ch in counts:
                        counts[ch] -= 1
        basis = (
            (agent.budget_used > 0, agent.idle_since, agent.budget_used, agent.last_offer_seq)[
                : self._basis_len[agent_id]
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
        keys: dict[str, tuple[float, ...]] = {}
        for pool in self._agent_pools[agent_id]:
            if pool.strategy == "most_skilled":
                key = self._key(agent, pool)
            else:
                key = keys.get(pool.strategy) or keys.setdefault(
                    pool.strategy, self._key(agent, pool)
                )
            heap = pool.heap
            heapq.heappush(heap, (*key, agent_id, version))
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
