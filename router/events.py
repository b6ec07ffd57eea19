"""The engine's lifecycle events: one frozen msgspec Struct per event type.

Each event is tagged (``tag_field="type"``, the tag is the event's name such as
``contact.queued``), so ``msgspec.json.encode(event)`` is the body published on
``{prefix}/events/{type}``: ``{"type": ..., "at": ..., ...}``. Fields without a default are always
on the wire, also when they are ``None``; the few fields with a default (``requeued``,
``released_by``) are on the wire only when set, as they were when events were dicts. Consumers
read events by attribute and tell them apart with ``isinstance`` (:class:`ContactEventBase`
holds the fields every ``contact.*`` event carries).
"""

from __future__ import annotations

from typing import TypedDict

import msgspec

from router.lifecycle import AgentState, ContactState


class EngineEventBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Fields every engine event carries."""

    #: engine time of the event (seconds since the epoch).
    at: float

    @property
    def type(self) -> str:
        """The event's name (its tag on the wire), e.g. ``contact.queued``."""
        return str(self.__struct_config__.tag)


class ContactEventBase(EngineEventBase, frozen=True, kw_only=True):
    """The contact's fields every ``contact.*`` event carries (a snapshot at ``at``)."""

    contact_id: str
    channel: str
    source: str
    #: ``None`` while the contact has no queue yet (rejected before routing, crowd window).
    queue: str | None
    priority: int
    expert: bool
    expert_id: str | None
    crowd: bool
    customer_id: str


class ContactFields(TypedDict):
    """:class:`ContactEventBase`'s fields, to build any ``contact.*`` event from (type-checked:
    ``ContactQueued(**fields, rule=..., first=...)``)."""

    at: float
    contact_id: str
    channel: str
    source: str
    queue: str | None
    priority: int
    expert: bool
    expert_id: str | None
    crowd: bool
    customer_id: str


class ContactRejected(ContactEventBase, frozen=True, kw_only=True, tag="contact.rejected"):
    """The contact was not taken: no queue matched, the rule rejects it, or the queue is full."""

    reason: str


class ContactCrowdWindow(ContactEventBase, frozen=True, kw_only=True, tag="contact.crowd_window"):
    """The contact waits for the crowd of experts until ``until`` before it is queued."""

    until: float


class ContactCrowdWindowEnded(
    ContactEventBase, frozen=True, kw_only=True, tag="contact.crowd_window_ended"
):
    """No expert answered in the crowd window; the contact is queued now."""


class ContactUpdated(ContactEventBase, frozen=True, kw_only=True, tag="contact.updated"):
    """A further message of a contact the engine already handles."""

    state: ContactState
    agent_id: str | None
    offer_id: str | None


class ContactAnsweredByCrowd(
    ContactEventBase, frozen=True, kw_only=True, tag="contact.answered_by_crowd"
):
    """Someone other than the customer answered in the thread; the contact is finished."""

    #: the answerer's handle, e-mail address or phone number.
    by: str | None
    #: the answerer's expert id, if the answerer is a known expert.
    by_expert: str | None
    waited: float


class ContactAbandoned(ContactEventBase, frozen=True, kw_only=True, tag="contact.abandoned"):
    """The contact ended (the customer hung up, left ...) before an agent took it."""

    reason: str
    waited: float
    from_state: ContactState


class ContactOverflowed(ContactEventBase, frozen=True, kw_only=True, tag="contact.overflowed"):
    """The contact moves to the overflow queue ``to`` (``max_length`` or ``max_wait``)."""

    reason: str
    to: str


# omit_defaults: ``requeued`` is on the wire only when true, as before; every other field of the
# event has no default and so is always there.
class ContactQueued(
    ContactEventBase, frozen=True, kw_only=True, omit_defaults=True, tag="contact.queued"
):
    """The contact waits in ``queue`` (first time, after an overflow, or re-queued)."""

    rule: str
    first: bool
    #: true when an offer of the contact came back (rejected, expired, withdrawn).
    requeued: bool = False


class ContactOffered(ContactEventBase, frozen=True, kw_only=True, tag="contact.offered"):
    """An offer of the contact went out to ``agent_id``."""

    agent_id: str
    offer_id: str
    waited: float


class ContactAssigned(ContactEventBase, frozen=True, kw_only=True, tag="contact.assigned"):
    """``agent_id`` accepted the offer; the contact is theirs."""

    agent_id: str
    waited: float


class ContactOfferRejected(
    ContactEventBase, frozen=True, kw_only=True, tag="contact.offer_rejected"
):
    """``agent_id`` rejected the offer; the contact is routed again."""

    agent_id: str
    reason: str | None


class ContactOfferExpired(ContactEventBase, frozen=True, kw_only=True, tag="contact.offer_expired"):
    """``agent_id`` did not answer the offer in time (``missed`` in a row now)."""

    agent_id: str
    missed: int


# omit_defaults: ``released_by`` is on the wire only for a supervisor's release, as before.
class ContactCompleted(
    ContactEventBase, frozen=True, kw_only=True, omit_defaults=True, tag="contact.completed"
):
    """The agent finished the contact (or it ended while assigned); wrap-up follows."""

    agent_id: str
    handled: float
    outcome: str
    disposition: str | None
    #: the wrap-up time that follows, in seconds (0 when there is none).
    wrap_up: float
    #: the supervisor who released the contact from the agent.
    released_by: str | None = None


class ContactWrapUpDone(ContactEventBase, frozen=True, kw_only=True, tag="contact.wrap_up_done"):
    """The agent's wrap-up of the contact is over."""

    agent_id: str


class ContactEscalated(ContactEventBase, frozen=True, kw_only=True, tag="contact.escalated"):
    """An escalation step of the rule applied (``step`` counted from 1; ``to`` the queue)."""

    step: int
    to: str


class AgentStateChanged(EngineEventBase, frozen=True, kw_only=True, tag="agent.state"):
    """An agent's state changed."""

    agent_id: str
    state: AgentState
    previous: AgentState
    reason: str | None


class ExpertAnswered(EngineEventBase, frozen=True, kw_only=True, tag="expert.answered"):
    """A known expert answered in a social thread."""

    expert_id: str
    contact_id: str


class ExpertUpdated(EngineEventBase, frozen=True, kw_only=True, tag="expert.updated"):
    """A crowd expert was added or changed at runtime."""

    expert_id: str
    keys: tuple[str, ...]


class ExpertRemoved(EngineEventBase, frozen=True, kw_only=True, tag="expert.removed"):
    """A crowd expert is no longer recognised."""

    expert_id: str


class CustomerLinked(EngineEventBase, frozen=True, kw_only=True, tag="customer.linked"):
    """Identity keys were linked to one customer; ``merged`` are the customers merged into it."""

    customer_id: str
    keys: tuple[str, ...]
    merged: tuple[str, ...]


ContactLifecycleEvent = (
    ContactRejected
    | ContactCrowdWindow
    | ContactCrowdWindowEnded
    | ContactUpdated
    | ContactAnsweredByCrowd
    | ContactAbandoned
    | ContactOverflowed
    | ContactQueued
    | ContactOffered
    | ContactAssigned
    | ContactOfferRejected
    | ContactOfferExpired
    | ContactCompleted
    | ContactWrapUpDone
    | ContactEscalated
)
#: every event the engine emits.
EngineEvent = (
    ContactLifecycleEvent
    | AgentStateChanged
    | ExpertAnswered
    | ExpertUpdated
    | ExpertRemoved
    | CustomerLinked
)

#: decodes an event body as published (for readers and tests).
EVENT_DECODER: msgspec.json.Decoder[EngineEvent] = msgspec.json.Decoder(EngineEvent)

#: the events that name an agent (``agent_id``).
_WITH_AGENT = (
    ContactUpdated,
    ContactOffered,
    ContactAssigned,
    ContactOfferRejected,
    ContactOfferExpired,
    ContactCompleted,
    ContactWrapUpDone,
    AgentStateChanged,
)


def agent_of(event: EngineEvent) -> str | None:
    """The agent an event concerns (its ``agent_id``), or ``None`` if it names none."""
    return event.agent_id if isinstance(event, _WITH_AGENT) else None
