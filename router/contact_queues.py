"""The engine's contact queues: waiting contacts per (queue, channel), best first.

Each waiting contact has the time-invariant key ``arrived_at - priority * queue.weight``; a heap
per (queue, channel) holds ``(key, seq, contact_id, token)`` entries. Taking a contact out of
its queue bumps its ``token``, so its entry becomes stale and is dropped when it surfaces
(lazy deletion); nothing is searched for on removal. The waiting counts per queue are exact.
State transitions stay in :mod:`router.engine`; this module only indexes.
"""

from __future__ import annotations

import heapq

from router.agent_index import AgentIndex, Pair
from router.state import AgentRec, ContactRec
from rules.schema import Queue as QueueCfg

Entry = tuple[float, int, str, int]


def entry_of(contact: ContactRec, weight: float) -> Entry:
    """A waiting contact's heap entry in a queue of this ``weight``: the key first."""
    return (contact.arrived_at - contact.priority * weight, contact.seq, contact.id, contact.token)


class ContactQueues:
    """Waiting contacts by (queue, channel); see the module docstring."""

    def __init__(self, contacts: dict[str, ContactRec]) -> None:
        self._contacts = contacts
        self._weight: dict[str, float] = {}
        self._heaps: dict[Pair, list[Entry]] = {}
        #: queue -> how many contacts wait in it.
        self.waiting: dict[str, int] = {}

    def rebuild(self, queues: dict[str, QueueCfg]) -> None:
        """Index the queued contacts afresh (after a restore or a reload).

        One list per heap and one ``heapify`` each, not a push per contact: a restore of a
        million waiting contacts spends most of its index build here. The entries are totally
        ordered (the contact id is in them), so the heaps give what pushes would have given.
        """
        weight = self._weight = {name: q.weight for name, q in queues.items()}
        heaps: dict[Pair, list[Entry]] = {}
        waiting = dict.fromkeys(queues, 0)
        for contact in self._contacts.values():
            if contact.state == "queued":
                qname = contact.queue
                pair = (qname, contact.channel)
                heap = heaps.get(pair)
                if heap is None:
                    heap = heaps[pair] = []
                heap.append(entry_of(contact, weight[qname]))
                waiting[qname] = waiting.get(qname, 0) + 1
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps
        self.waiting = waiting

    def push(self, contact: ContactRec, restoring: bool = False) -> None:
        """Put a contact (already ``queued``) into its queue's heap."""
        if not restoring:
            contact.token += 1
        pair = (contact.queue, contact.channel)
        heap = self._heaps.get(pair)
        if heap is None:
            heap = self._heaps[pair] = []
        heapq.heappush(heap, entry_of(contact, self._weight[contact.queue]))
        self.waiting[contact.queue] = self.waiting.get(contact.queue, 0) + 1

    def leave(self, contact: ContactRec) -> None:
        """Take a queued contact out of its queue (its heap entry becomes stale)."""
        contact.token += 1
        self.waiting[contact.queue] -= 1

    def _valid(self, entry: Entry) -> ContactRec | None:
        contact = self._contacts.get(entry[2])
        if contact is None or contact.state != "queued" or contact.token != entry[3]:
            return None
        return contact

    def best_for(self, agent: AgentRec, index: AgentIndex, now: float) -> ContactRec | None:
        """The waiting contact with the smallest key among those this agent can take."""
        best: ContactRec | None = None
        best_key: tuple[float, int] | None = None
        pairs = index.eligible.get(agent.id, frozenset())
        waiting = self.waiting
        for qname in index.agent_queues.get(agent.id, ()):
            if not waiting[qname]:
                continue
            for channel in index.queue_channels[qname]:
                pair = (qname, channel)
                if pair in pairs and pair in self._heaps and index.can_take(agent, channel):
                    best, best_key = self._better(agent, pair, best, best_key, index, now)
        return best

    def _better(
        self,
        agent: AgentRec,
        pair: Pair,
        best: ContactRec | None,
        best_key: tuple[float, int] | None,
        index: AgentIndex,
        now: float,
    ) -> tuple[ContactRec | None, tuple[float, int] | None]:
        """The better of ``best`` and the best contact in ``pair``'s heap for this agent."""
        heap = self._heaps[pair]
        while heap and self._valid(heap[0]) is None:
            heapq.heappop(heap)
        if not heap or (best_key is not None and (heap[0][0], heap[0][1]) >= best_key):
            return best, best_key
        head = heap[0]
        contact = self._valid(head)
        assert contact is not None
        if not index.suits(agent.id, contact, now):
            # The head needs a skill this agent lacks or excludes it: look deeper.
            candidates = [
                (e[0], e[1], c)
                for e in heap
                if (c := self._valid(e)) is not None and index.suits(agent.id, c, now)
            ]
            if not candidates:
                return best, best_key
            key0, seq0, contact = min(candidates, key=lambda t: (t[0], t[1]))
            head = (key0, seq0, contact.id, contact.token)
        if best_key is None or (head[0], head[1]) < best_key:
            return contact, (head[0], head[1])
        return best, best_key
