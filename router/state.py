"""The engine's mutable state records, and the snapshot that holds them.

These are deliberately *not* frozen: the engine updates contacts and agents in place on the hot
path, and a copy per change would cost more than the whole routing decision. They are msgspec
Structs, so :meth:`~router.engine.Engine.snapshot` is one ``msgspec.json.encode`` of
:class:`EngineState` and :mod:`router.snapshot` writes the same records in bounded chunks. The
indexes the engine builds for speed (heaps, eligibility lists, timers) are derived from these
records and rebuilt on restore, so they are not part of the snapshot.

A contact's record holds what routing needs, not what the customer wrote: the body, the
attachments' metadata and the rest of the event stay at the edge (the daemon keeps them in
Redis, see ``router/daemon/payloads.py``) and go back into an offer when it is published
(:func:`contact_stub` is what the engine itself puts there). A million waiting mails then fit
in about a gigabyte. The records are ``gc=False``: they never reference each other, so
they cannot form cycles, and the collector need not walk millions of them.
"""

from __future__ import annotations

import msgspec

from channels.contact_event import ContactEvent
from router.lifecycle import AgentState, ContactState
from rules.schema import Escalation


class HistoryItem(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):
    """One contact in a customer's history, updated as the contact moves on."""

    contact_id: str
    channel: str
    source: str
    at: float
    subject: str | None = None
    queue: str | None = None
    agent_id: str | None = None
    outcome: str = "open"


class CustomerRec(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):
    """A customer: identity keys resolved to one id, recent contacts, preferred agent."""

    id: str
    keys: list[str] = msgspec.field(default_factory=list)
    history: list[HistoryItem] = msgspec.field(default_factory=list)
    last_agent: str | None = None
    last_agent_at: float = 0.0
    vip: bool = False
    last_seen: float = 0.0
    #: contacts of this customer the engine is still handling.
    open: int = 0


#: the exclusions of a contact that has none, one dict shared by (nearly) all of them: a
#: million empty dicts would be 64 MB. Never change it: give the contact a new dict instead.
NO_EXCLUSIONS: dict[str, float] = {}


class ContactRec(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):
    """A contact the engine is handling (not yet finished).

    Of the event that started it only what routing needs is kept (``channel``, ``source``);
    the rules read the whole event once, when it arrives.
    """

    id: str
    channel: str
    source: str
    customer_id: str
    expert: bool
    state: ContactState
    rule: str
    queue: str
    priority: int
    arrived_at: float
    #: extra skill requirements from the rule or an escalation step (on top of the queue's);
    #: shared with the rule (and among restored records), so replaced, never changed in place.
    extra_skills: dict[str, int] = msgspec.field(default_factory=dict)
    escalate: tuple[Escalation, ...] = ()
    next_step: int = 0
    queue_entered_at: float = 0.0
    #: heap tie-break and lazy-deletion token: entries with another token are stale.
    seq: int = 0
    token: int = 0
    offer_id: str | None = None
    agent_id: str | None = None
    #: the offer the agent accepted (a repeated accept of it is not an error).
    accepted_offer: str | None = None
    #: agent id -> time until which this contact is not offered to that agent again;
    #: replaced, never changed in place (most contacts share :data:`NO_EXCLUSIONS`).
    excluded: dict[str, float] = msgspec.field(default_factory=dict)
    #: the crowd expert this contact comes from, if any.
    expert_id: str | None = None
    crowd: bool = False
    crowd_until: float = 0.0
    assigned_at: float = 0.0
    wrap_until: float = 0.0


class OfferRec(msgspec.Struct, kw_only=True, gc=False):
    """A reservation of one contact for one agent, with its expiry."""

    id: str
    contact_id: str
    agent_id: str
    expires_at: float


class AgentRec(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):
    """An agent's live state. Busy is derived from ``load``; capacity is reserved at offer."""

    id: str
    state: AgentState = "offline"
    reason: str | None = None
    load: dict[str, int] = msgspec.field(default_factory=dict)
    budget_used: int = 0
    idle_since: float = 0.0
    missed: int = 0
    last_offer_seq: int = 0
    offers: list[str] = msgspec.field(default_factory=list)
    contacts: list[str] = msgspec.field(default_factory=list)


class ExpertRec(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):
    """A crowd expert: who they are (from the routing file or the admin API) and how active.

    ``answers`` counts their posts in community threads that are not their own; the
    ``contacts``/``answered``/``abandoned``/``wait_*`` fields are about their own contacts to
    the company (which the rules send to the expert desk).
    """

    id: str
    name: str = ""
    level: int = 1
    skills: list[str] = msgspec.field(default_factory=list)
    keys: list[str] = msgspec.field(default_factory=list)
    #: "file" (the routing or experts file) or "api" (edited at runtime, wins over the file).
    origin: str = "file"
    removed: bool = False
    last_seen: float | None = None
    answers: int = 0
    last_answer: float | None = None
    contacts: int = 0
    answered: int = 0
    abandoned: int = 0
    wait_total: float = 0.0
    wait_max: float = 0.0


class QueueCounters(msgspec.Struct, kw_only=True, gc=False):
    """Running totals per queue since start (for statistics and metrics)."""

    entered: int = 0
    answered: int = 0
    answered_in_sla: int = 0
    abandoned: int = 0
    overflowed: int = 0


class EngineState(msgspec.Struct, kw_only=True):
    """Everything a snapshot holds."""

    seq: int = 0
    #: the latest ``now`` the engine was given.
    clock: float = 0.0
    contacts: dict[str, ContactRec] = msgspec.field(default_factory=dict)
    offers: dict[str, OfferRec] = msgspec.field(default_factory=dict)
    agents: dict[str, AgentRec] = msgspec.field(default_factory=dict)
    customers: dict[str, CustomerRec] = msgspec.field(default_factory=dict)
    keys: dict[str, str] = msgspec.field(default_factory=dict)
    counters: dict[str, QueueCounters] = msgspec.field(default_factory=dict)
    experts: dict[str, ExpertRec] = msgspec.field(default_factory=dict)
    #: a bounded record of finished contacts: id -> [state, queue, agent, customer id].
    finished: dict[str, list[str | None]] = msgspec.field(default_factory=dict)


def contact_stub(contact: ContactRec) -> ContactEvent:
    """The event as far as the engine knows it: what an offer carries until the edge puts the
    journaled event back in (the daemon always does before it publishes)."""
    return ContactEvent(
        kind="new",
        contact_id=contact.id,
        channel=contact.channel,  # type: ignore[arg-type]  # from a ContactEvent's channel
        source=contact.source,
        external_id="",
    )


STATE_ENCODER = msgspec.json.Encoder()
STATE_DECODER = msgspec.json.Decoder(EngineState)


class Changes:
    """The records changed since the last cut, for an incremental snapshot.

    Per big table, record id -> whether it *moved*: was added, removed or put at the end of
    its table's order (a customer seen again, a contact that finished again); False: changed
    in place. The dicts keep the order of the last move, which is the order a snapshot's
    delta re-applies them in, so a restored table has the engine's order. The small tables
    (agents, offers, experts, counters) are written whole in every delta and not tracked;
    identity keys are tracked by key (their order does not matter, see
    :mod:`router.snapshot`).

    Marking is on the routing hot path: a ``setdefault`` or :func:`moved` per change.
    """

    __slots__ = ("contacts", "customers", "finished", "keys")

    def __init__(self) -> None:
        self.contacts: dict[str, bool] = {}
        self.customers: dict[str, bool] = {}
        self.finished: dict[str, bool] = {}
        self.keys: dict[str, bool] = {}

    def take(self) -> Changes:
        """The changes so far, as a new object; this one starts empty."""
        taken = Changes()
        taken.contacts, self.contacts = self.contacts, {}
        taken.customers, self.customers = self.customers, {}
        taken.finished, self.finished = self.finished, {}
        taken.keys, self.keys = self.keys, {}
        return taken

    def put_back(self, older: Changes) -> None:
        """Merge ``older`` (changes taken for a delta that was not written) in front of these,
        as if it had never been taken: the next delta carries both, in the order of the last
        move of each record."""
        for name in self.__slots__:
            newer: dict[str, bool] = getattr(self, name)
            merged = dict(getattr(older, name))
            for key, was_moved in newer.items():
                if was_moved:
                    moved(merged, key)
                else:
                    merged.setdefault(key, False)
            setattr(self, name, merged)

    def clear(self) -> None:
        """Forget the changes (nobody cuts deltas of this engine)."""
        self.contacts.clear()
        self.customers.clear()
        self.finished.clear()
        self.keys.clear()

    def __len__(self) -> int:
        return len(self.contacts) + len(self.customers) + len(self.finished) + len(self.keys)


def moved(changes: dict[str, bool], key: str) -> None:
    """Mark ``key`` as added, removed or moved to the end of its table."""
    changes.pop(key, None)
    changes[key] = True
