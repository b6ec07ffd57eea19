"""The engine's timers: one heap of ``(due, kind, ref)``, and whether an entry is still wanted.

Timers are never removed when their reason goes away (an offer accepted, a contact moved);
:func:`is_live` recognises a stale one from the state instead, so the heap needs no search and a
restored engine re-creates its timers from the records alone. Ties are broken by
``(kind, ref)``, never by a counter of this process, so an engine restored from a snapshot
fires them in exactly the same order. What a timer does when it fires is a state transition and
lives in :mod:`router.engine`.
"""

from __future__ import annotations

import enum
import heapq

from router.state import EngineState
from rules.schema import Queue as QueueCfg


class TimerKind(enum.IntEnum):
    """What a timer is for (its value orders timers due at the same time)."""

    OFFER = 0  #: an offer expires (ref: offer id)
    STEP = 1  #: the next escalation step of a contact
    MAX_WAIT = 2  #: a contact waited its queue's ``max_wait``: overflow
    CROWD = 3  #: a contact's crowd window ends
    WRAP = 4  #: a contact's wrap-up ends
    RETRY = 5  #: an agent's exclusion from a contact ends


Timer = tuple[float, TimerKind, str]


class Timers:
    """A min-heap of timers with lazy deletion."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []

    def add(self, at: float, kind: TimerKind, ref: str) -> None:
        """Fire ``kind`` for ``ref`` at ``at`` (unless it is stale by then)."""
        heapq.heappush(self._heap, (at, kind, ref))

    def load(self, timers: list[Timer]) -> None:
        """Add many timers at once (a restore): one ``heapify`` instead of a push each."""
        self._heap.extend(timers)
        heapq.heapify(self._heap)

    def pop_due(self, now: float) -> Timer | None:
        """The earliest timer due at or before ``now`` (stale or not), or None."""
        heap = self._heap
        if heap and heap[0][0] <= now:
            return heapq.heappop(heap)
        return None

    def next_live(self, state: EngineState, queues: dict[str, QueueCfg]) -> float | None:
        """When the earliest live timer is due (stale ones on top are dropped on the way)."""
        heap = self._heap
        while heap and not is_live(state, queues, *heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None


def is_live(
    state: EngineState, queues: dict[str, QueueCfg], at: float, kind: TimerKind, ref: str
) -> bool:
    """Is this timer still wanted, judged from the state records alone?"""
    if kind == TimerKind.OFFER:
        offer = state.offers.get(ref)
        return offer is not None and offer.expires_at == at
    contact = state.contacts.get(ref)
    if contact is None:
        return False
    if kind == TimerKind.WRAP:
        return contact.state == "wrap_up" and contact.wrap_until == at
    if kind == TimerKind.CROWD:
        return contact.state == "crowd_window" and contact.crowd_until == at
    if kind == TimerKind.STEP:
        return (
            contact.state in ("queued", "offered")
            and contact.next_step < len(contact.escalate)
            and contact.arrived_at + contact.escalate[contact.next_step].after == at
        )
    if kind == TimerKind.MAX_WAIT:
        queue = queues.get(contact.queue)
        return (
            contact.state == "queued"
            and queue is not None
            and queue.overflow is not None
            and queue.max_wait is not None
            and contact.queue_entered_at + queue.max_wait == at
        )
    return at in contact.excluded.values()
