"""The engine's agent index: capacity accounting, eligibility and the order agents are tried in.

Read-only towards the state records except :meth:`AgentIndex.reserve`, which the engine calls
when it reserves or frees capacity; every state transition stays in :mod:`router.engine`.

**Eligibility** (which (queue, channel) pairs an agent serves) follows from its skills and
capacities and is computed once per routing table.

**Order.** Queues whose agents are chosen the same way (the same strategy, skill needs and
channels) share one *pool*: they have the same eligible agents and the same order, so an agent
is indexed once per pool, not once per queue; in a routing file where many queues ask for the
same skills that is most of the saving. Each pool keeps a heap of its ready agents, entries
``(*strategy key, agent_id, version)``; a change of which channels an agent can take is not a
new key, and the channel is checked when the entry surfaces. Ties are broken by agent id, never
by a counter of this process, so an engine restored from a snapshot (which rebuilds the index
from the records) makes exactly the same choices.

An agent's key usually *grows* (an offer makes a free agent busy, a round-robin agent gets the
latest offer): then nothing is pushed. Its entries stay where they are as lower bounds, and an
entry that surfaces with an older version is re-keyed in place (``heapreplace``) in that pool
only, which is correct because every entry's key is at most the agent's current key. Only a key
that shrinks (an agent becoming free again) or an agent becoming ready pushes new entries;
entries older than that push are stale and dropped when they surface, or when a heap grows to
twice its pool (compaction). The best agent is read off the top of the heap without popping it.

**Free agents of a longest_idle pool** are not in a heap but in an ordered dict, in
``(idle_since, agent_id)`` order, and an agent is filed into it and taken out of it at once as
its key changes (:meth:`AgentIndex._file_free`). An agent who becomes free has the newest idle
time, so it goes to the end; one whose offer was withdrawn keeps its old idle time and mostly
goes to the front; the few that belong in between (a withdrawn offer, equal idle times, a clock
gone back on a replay) go to a small sorted list merged in as the order is read. A lazy heap
here made the slow decisions: every offer left a lower bound in each of the agent's ~6 pools,
and a pool searched rarely found a run of them on top (the slowest 1 % of decisions popped
35 entries where the median popped 3). Now a search only reads agents, and an offer takes the
agent out of its pools in O(1) each.

**Ready counts.** Per pool and channel, how many agents are available with room for that
channel. A contact whose pool has none is not searched for at all, which is what keeps a
standing backlog cheap (every agent busy, each new contact only queued).
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from router.state import AgentRec, ContactRec
from rules.schema import Agent as AgentCfg
from rules.schema import Queue as QueueCfg
from rules.schema import RoutingFile

Pair = tuple[str, str]  # (queue, channel)
Entry = tuple[Any, ...]
Key = tuple[float, float]


class _Pool:
    """Queues with the same eligible agents and the same order, and their agent heaps.

    A longest_idle pool keeps its free agents in order in ``free`` (and ``late``) and its
    partly busy ones (who come after every free agent) in the heap ``busy``, entries
    ``(idle_since, agent_id, version)``; agents who became busy wait in ``pending`` (by agent
    id, taken out again as they become free) until a search first needs the busy ones. Other
    pools keep every ready agent in ``heap``, entries ``(*strategy key, agent_id, version)``.
    """

    __slots__ = (
        "busy",
        "channels",
        "free",
        "heap",
        "index",
        "late",
        "pending",
        "ready",
        "size",
        "strategy",
    )

    def __init__(self, strategy: str, channels: frozenset[str], index: int) -> None:
        self.strategy = strategy
        #: its position in the index's list of pools (part of the most_skilled score's key).
        self.index = index
        self.channels = channels
        self.heap: list[Entry] = []
        self.busy: list[Entry] = []
        self.pending: dict[str, Entry] = {}
        #: a longest_idle pool's free agents, agent id -> idle_since, in (idle_since, id)
        #: order: an agent who becomes free is nearly always the most recently idle one, so it
        #: goes to the end (or, an offer withdrawn, often to the front) in O(1) ...
        self.free: OrderedDict[str, float] = OrderedDict()
        #: ... and one that belongs in between goes here, sorted, entries
        #: ``(idle_since, agent_id, token)``, valid while the token is its slot's.
        self.late: list[tuple[float, str, int]] = []
        #: channel -> agents of this pool that are available with room for that channel.
        self.ready: dict[str, int] = dict.fromkeys(channels, 0)
        self.size = 0


class _Slot:
    """One agent's place in the index: what the routing file says, and where it stands now.

    One object per agent rather than a dict per attribute: the hot path reads all of it for
    the same agent, and one look-up keeps that in few cache lines.
    """

    __slots__ = (
        "budget",
        "entry",
        "floor",
        "free_at",
        "free_token",
        "keys",
        "li_pools",
        "limits",
        "pools",
        "ready",
        "room",
        "shared",
        "strategies",
        "version",
    )

    def __init__(
        self,
        limits: tuple[tuple[int, str, int, int], ...],
        room: dict[str, tuple[int, int]],
        budget: int,
        pools: tuple[_Pool, ...],
        strategies: tuple[str, ...],
    ) -> None:
        #: the channel limits as (bit, channel, limit, cost), and the shared budget.
        self.limits = limits
        self.budget = budget
        #: channel -> (limit, cost), for the channels it may take at all.
        self.room = room
        self.pools = pools
        #: its longest_idle pools (whose free agents are kept in order, not in a heap).
        self.li_pools = tuple(p for p in pools if p.strategy == "longest_idle")
        #: the distinct strategies of its pools (its keys are per strategy).
        self.strategies = strategies
        #: one entry serves every pool: one strategy, and not most_skilled (whose key starts
        #: with the agent's skill in that pool's queues).
        self.shared = len(strategies) == 1 and strategies[0] != "most_skilled"
        self.reset()

    def reset(self) -> None:
        """Out of every heap, as before the first :meth:`AgentIndex.refresh`."""
        #: bit mask of the channels it has room for (0: not ready).
        self.ready = 0
        #: its current key per strategy (None: not ready, in no heap).
        self.keys: tuple[Key, ...] | None = None
        #: the version of its current keys (bumped whenever they change) ...
        self.version = 0
        #: ... and of its last push: entries older than that are stale.
        self.floor = 0
        #: its current (busy, entry), when ``shared``.
        self.entry: tuple[float, Entry] = (0.0, ())
        #: the idle_since it is filed under among its longest_idle pools' free agents (None:
        #: not free), and the token of that filing (for its entries in ``_Pool.late``).
        self.free_at: float | None = None
        self.free_token = 0


def order_key(strategy: str, agent: AgentRec, budget: int) -> Key:
    """The agent's sort key under ``strategy`` (most_skilled: after the agent's score)."""
    if strategy == "least_occupied":
        return (agent.budget_used / budget if budget else 1.0, agent.idle_since)
    if strategy == "round_robin":
        return (float(agent.last_offer_seq), agent.idle_since)
    # longest_idle, and most_skilled after the score: free agents first, then longest idle.
    return (1.0 if agent.budget_used else 0.0, agent.idle_since)


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
        self._slots: dict[str, _Slot] = {}

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
                pool = pools[key] = _Pool(queue.strategy, key[2], len(pools))
            self._queue_pool[name] = pool
        self._pools = list(pools.values())
        self.eligible = {}
        self.agent_queues = {}
        self._score = {}
        self._slots = {}
        # Agents with the same capacities share one limits tuple (and strategies): touched on
        # every refresh, a few shared objects stay in the cache where 5,000 copies would not.
        shared_limits: dict[object, tuple[Any, dict[str, tuple[int, int]]]] = {}
        shared_strategies: dict[tuple[str, ...], tuple[str, ...]] = {}
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
            agent_pools: dict[int, _Pool] = {}  # by pool index
            for qname in serves[agent.id]:
                queue = queues[qname]
                served = [ch for ch in queue.channels if agent.capacity.get(ch, 0) > 0]
                if not served:
                    continue
                served_queues.append(qname)
                pairs.update((qname, ch) for ch in served)
                pool = self._queue_pool[qname]
                if pool.index not in agent_pools:
                    agent_pools[pool.index] = pool
                    pool.size += 1
                    self._score[(agent.id, pool.index)] = -float(
                        sum(agent.skills.get(s, 0) for s in queue.skills)
                    )
            self.eligible[agent.id] = frozenset(pairs)
            self.agent_queues[agent.id] = served_queues
            strategies = tuple(sorted({p.strategy for p in agent_pools.values()}))
            strategies = shared_strategies.setdefault(strategies, strategies)
            caps, budget = self._caps[agent.id]
            limits = tuple(
                (bits.setdefault(ch, 1 << len(bits)), ch, limit, self.cost.get(ch, 0))
                for ch, limit in caps.items()
            )
            limits, room = shared_limits.setdefault(
                limits, (limits, {ch: (limit, cost) for _, ch, limit, cost in limits})
            )
            pools_of = tuple(agent_pools.values())
            self._slots[agent.id] = _Slot(limits, room, budget, pools_of, strategies)

    def rebuild(self, agents: Iterable[AgentRec]) -> None:
        """Forget every heap entry and index ``agents`` afresh (after a restore or reload)."""
        for pool in self._pools:
            pool.heap, pool.busy, pool.pending, pool.late = [], [], {}, []
            pool.free = OrderedDict()
            pool.ready = dict.fromkeys(pool.channels, 0)
        for slot in self._slots.values():
            slot.reset()
        # In idle order, so that every free agent is filed at the end of its pools' free order.
        for agent in sorted(agents, key=lambda a: (a.idle_since, a.id)):
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

    def _entry_for(self, agent_id: str, slot: _Slot, pool: _Pool) -> tuple[float, Entry]:
        """The agent's current heap entry in ``pool`` (it is ready), and whether it belongs
        among a longest_idle pool's busy agents (1.0) or not (0.0)."""
        if slot.shared:
            return slot.entry
        keys = slot.keys
        assert keys is not None
        strategy = pool.strategy
        key = keys[slot.strategies.index(strategy)]
        version = slot.version
        if strategy == "longest_idle":
            return key[0], (key[1], agent_id, version)
        if strategy == "most_skilled":
            return 0.0, (self._score.get((agent_id, pool.index), 0.0), *key, agent_id, version)
        return 0.0, (*key, agent_id, version)

    def refresh(self, agent: AgentRec) -> None:
        """Re-index an agent after anything that changes its readiness or its sort keys."""
        agent_id = agent.id
        slot = self._slots.get(agent_id)
        if slot is None:
            return  # not in the routing file: never ready
        ready = 0
        if agent.state == "available":
            load, room = agent.load, slot.budget - agent.budget_used
            for bit, channel, limit, cost in slot.limits:
                if cost <= room and load.get(channel, 0) < limit:
                    ready |= bit
        before = slot.ready
        if ready != before:
            slot.ready = ready
            changed = ready ^ before
            for bit, channel, _, _ in slot.limits:
                if changed & bit:
                    delta = 1 if ready & bit else -1
                    for pool in slot.pools:
                        counts = pool.ready
                        if channel in counts:
                            counts[channel] += delta
        old = slot.keys
        if not ready:
            if slot.free_at is not None:
                self._file_free(agent_id, slot, None)
            for pool in slot.li_pools:
                pool.pending.pop(agent_id, None)  # out of every order, and its entries stale
            if old is not None:
                # Out of every heap: all its entries are stale from now on.
                slot.keys = None
                slot.version = slot.floor = slot.version + 1
            return
        strategies = slot.strategies
        if slot.shared and strategies[0] == "longest_idle":
            keys: tuple[Key, ...] = ((1.0 if agent.budget_used else 0.0, agent.idle_since),)
        else:
            keys = tuple(order_key(strategy, agent, slot.budget) for strategy in strategies)
        if keys == old:
            return  # same keys, its entries are current
        version = slot.version = slot.version + 1
        slot.keys = keys
        if slot.shared:
            key = keys[0]
            if strategies[0] == "longest_idle":
                slot.entry = key[0], (key[1], agent_id, version)
            else:
                slot.entry = 0.0, (*key, agent_id, version)
        li_pools = slot.li_pools
        if li_pools:
            free_at = None if agent.budget_used else agent.idle_since
            if free_at != slot.free_at:
                if free_at is None:
                    # Free -> busy (an offer, mostly): out of its pools' free orders, and among
                    # the busy agents a search of the busy ones will want.
                    slot.free_at = None
                    slot.free_token += 1
                    if slot.shared:
                        entry = slot.entry[1]
                        for pool in li_pools:
                            pool.free.pop(agent_id, None)
                            pool.pending[agent_id] = entry
                    else:
                        for pool in li_pools:
                            pool.free.pop(agent_id, None)
                            pool.pending[agent_id] = self._entry_for(agent_id, slot, pool)[1]
                else:
                    self._file_free(agent_id, slot, free_at)
        if old is not None and (
            keys[0] >= old[0]
            if len(keys) == 1
            else all(new >= was for new, was in zip(keys, old, strict=True))
        ):
            return  # a key that grew: the old entries are lower bounds, re-keyed as they surface
        slot.floor = version
        for pool in slot.pools:
            busy, entry = slot.entry if slot.shared else self._entry_for(agent_id, slot, pool)
            if busy:
                pool.pending[agent_id] = entry
            elif pool.strategy != "longest_idle":  # (free ones are filed by _file_free)
                heapq.heappush(pool.heap, entry)
            if len(pool.heap) + len(pool.busy) + len(pool.pending) > 2 * pool.size + 64:
                self._compact(pool)

    def _file_free(self, agent_id: str, slot: _Slot, free_at: float | None) -> None:
        """File the agent among its longest_idle pools' free agents under ``free_at`` (None:
        take it out of them)."""
        pools = slot.li_pools
        if slot.free_at is not None:
            for pool in pools:
                pool.free.pop(agent_id, None)  # (an entry in ``late`` goes with the token)
        slot.free_at = free_at
        token = slot.free_token = slot.free_token + 1
        if free_at is None:
            return
        for pool in pools:
            pool.pending.pop(agent_id, None)  # free now: its busy entry is stale
        key = (free_at, agent_id)
        for pool in pools:
            free = pool.free
            if free:
                last = next(reversed(free))
                if key < (free[last], last):
                    first = next(iter(free))
                    if key < (free[first], first):
                        free[agent_id] = free_at
                        free.move_to_end(agent_id, last=False)
                    else:
                        bisect.insort(pool.late, (free_at, agent_id, token))
                        if len(pool.late) > pool.size + 64:
                            self._compact(pool)
                    continue
            free[agent_id] = free_at

    def _compact(self, pool: _Pool) -> None:
        """Drop a pool's stale entries (those older than their agent's last push or filing)."""
        slots = self._slots
        for heap in (pool.heap, pool.busy):
            heap[:] = [e for e in heap if e[-1] >= slots[e[-2]].floor]
            heapq.heapify(heap)
        pool.pending = {a: e for a, e in pool.pending.items() if e[-1] >= slots[a].floor}
        pool.late[:] = [e for e in pool.late if e[2] == slots[e[1]].free_token]

    def best_agent(self, contact: ContactRec, now: float) -> AgentRec | None:
        """The first ready agent, in its queue's order, who can take this contact."""
        pool = self._queue_pool.get(contact.queue)
        if pool is None or not pool.ready.get(contact.channel):
            return None  # nobody in this queue has room for the channel: no search
        if pool.strategy != "longest_idle":
            return self._search(pool, pool.heap, contact, now)
        chosen = self._search_free(pool, contact, now)
        if chosen is None and (pool.busy or pool.pending):
            pending = pool.pending
            if pending:
                slots = self._slots
                for entry in pending.values():
                    if entry[-1] >= slots[entry[-2]].floor:
                        heapq.heappush(pool.busy, entry)
                pending.clear()
            chosen = self._search(pool, pool.busy, contact, now)
        return chosen

    def _free_order(self, pool: _Pool) -> Iterator[str]:
        """A longest_idle pool's free agents in order: its ordered ones merged with ``late``."""
        free, late = pool.free, pool.late
        slots = self._slots
        items = iter(free.items())
        cur = next(items, None)
        i = 0
        while True:
            while i < len(late) and late[i][2] != slots[late[i][1]].free_token:
                del late[i]  # filed again or no longer free since
            if i < len(late) and (cur is None or (late[i][0], late[i][1]) < (cur[1], cur[0])):
                yield late[i][1]
                i += 1
            elif cur is not None:
                yield cur[0]
                cur = next(items, None)
            else:
                return

    def _search_free(self, pool: _Pool, contact: ContactRec, now: float) -> AgentRec | None:
        """The first of a longest_idle pool's free agents who can take this contact.

        Every agent in the free order is free and current (it is filed and taken out as its key
        changes), so nothing is popped or pushed: the search reads agents in order.
        """
        channel = contact.channel
        excluded = contact.excluded
        extra = contact.extra_skills
        agents, slots = self._agents, self._slots
        chosen: AgentRec | None = None
        left: list[AgentRec] = []
        # (the ordered dict itself, mostly: nothing filed in between, no merge to do)
        for agent_id in self._free_order(pool) if pool.late else pool.free:
            agent = agents[agent_id]
            if agent.state != "available":
                left.append(agent)  # not re-indexed since it left: out of the order below
                continue
            slot = slots[agent_id]
            # can_take and suits, spelled out as in _search (a call per agent looked at costs
            # more than the check).
            room = slot.room.get(channel)
            if (
                room is not None
                and agent.load.get(channel, 0) < room[0]
                and agent.budget_used + room[1] <= slot.budget
                and (not excluded or excluded.get(agent_id, now) <= now)
                and (not extra or has_skills(self.agent_cfg[agent_id].skills, extra))
            ):
                chosen = agent
                break
        for agent in left:
            self.refresh(agent)
        return chosen

    def _search(
        self,
        pool: _Pool,
        heap: list[Entry],
        contact: ContactRec,
        now: float,
    ) -> AgentRec | None:
        """The first agent in one of the pool's heaps who can take this contact."""
        channel = contact.channel
        excluded = contact.excluded
        extra = contact.extra_skills
        skipped = []
        chosen: AgentRec | None = None
        agents, slots = self._agents, self._slots
        while heap:
            entry = heap[0]
            agent_id: str = entry[-2]
            slot = slots[agent_id]
            if entry[-1] != slot.version:
                if entry[-1] < slot.floor:
                    heapq.heappop(heap)  # stale
                else:
                    # A lower bound of an agent whose key grew: its current key, in place.
                    current = (
                        slot.entry[1] if slot.shared else self._entry_for(agent_id, slot, pool)[1]
                    )
                    heapq.heapreplace(heap, current)
                continue
            agent = agents[agent_id]
            if agent.state != "available":
                # Not re-indexed since it left: out of every heap now, back in when available.
                self.refresh(agent)
                continue
            # can_take and suits, spelled out: this runs for every agent looked at.
            room = slot.room.get(channel)
            if (
                room is not None
                and agent.load.get(channel, 0) < room[0]
                and agent.budget_used + room[1] <= slot.budget
                and (not excluded or excluded.get(agent_id, now) <= now)
                and (not extra or has_skills(self.agent_cfg[agent_id].skills, extra))
            ):
                chosen = agent  # stays on top: the caller re-indexes it after the offer
                break
            skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return chosen

    def serves(self, agent_id: str, pair: Pair) -> bool:
        """Is the agent eligible for this (queue, channel) pair?"""
        return pair in self.eligible.get(agent_id, ())
