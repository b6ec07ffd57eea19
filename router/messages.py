"""The engine's inputs (besides ContactEvent) and its outputs (commands).

The engine is sans-I/O: ``Engine.handle(message, now)`` takes one of the inputs below or a
:class:`~channels.contact_event.ContactEvent` and returns a list of commands for the caller to
carry out (publish an offer, cancel one, publish an event). Agent commands arrive on
``{prefix}/agents/{agent_id}/cmd`` as JSON with an ``op`` field; :data:`AGENT_COMMAND_DECODER`
decodes them (the daemon fills ``agent_id`` from the topic, never from the payload, so an agent
cannot speak for another).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from channels.contact_event import ContactEvent
from router.events import EngineEvent
from rules.schema import Expert


class Login(msgspec.Struct, frozen=True, kw_only=True, tag="login", tag_field="op"):
    """An agent logs in and becomes available (unless ``state`` says otherwise)."""

    agent_id: str = ""
    state: Literal["available", "away"] = "available"
    reason: str | None = None


class SetState(msgspec.Struct, frozen=True, kw_only=True, tag="state", tag_field="op"):
    """An agent changes state: ``available`` or ``away`` (with a reason, e.g. ``break``)."""

    agent_id: str = ""
    state: Literal["available", "away"]
    reason: str | None = None


class Accept(msgspec.Struct, frozen=True, kw_only=True, tag="accept", tag_field="op"):
    """An agent accepts one of its offers; the contact becomes assigned to it."""

    agent_id: str = ""
    offer_id: str


class Reject(msgspec.Struct, frozen=True, kw_only=True, tag="reject", tag_field="op"):
    """An agent rejects one of its offers; the contact is re-routed at once."""

    agent_id: str = ""
    offer_id: str
    reason: str | None = None


class Complete(msgspec.Struct, frozen=True, kw_only=True, tag="complete", tag_field="op"):
    """An agent finishes an assigned contact; wrap-up starts (if the queue has one)."""

    agent_id: str = ""
    contact_id: str
    outcome: str | None = None
    #: one of the routing file's ``dispositions`` codes (validated by the engine).
    disposition: str | None = None


class Logout(msgspec.Struct, frozen=True, kw_only=True, tag="logout", tag_field="op"):
    """An agent logs out. Pending offers are withdrawn and their contacts re-routed."""

    agent_id: str = ""


AgentCommand = Login | SetState | Accept | Reject | Complete | Logout
AGENT_COMMAND_DECODER: msgspec.json.Decoder[AgentCommand] = msgspec.json.Decoder(AgentCommand)


class LinkKeys(msgspec.Struct, frozen=True, kw_only=True, tag="link_keys", tag_field="op"):
    """Admin: these identity keys (``phone:+49...``, ``email:...``, ``handle:source:user``) are
    one customer; customers found under them are merged."""

    keys: tuple[str, ...]


class UpsertExpert(msgspec.Struct, frozen=True, kw_only=True, tag="upsert_expert", tag_field="op"):
    """Admin: add or change a crowd expert at runtime (wins over the routing file's entry)."""

    expert: Expert


class RemoveExpert(msgspec.Struct, frozen=True, kw_only=True, tag="remove_expert", tag_field="op"):
    """Admin: a crowd expert is no longer one (also one from the routing file)."""

    expert_id: str


class ReleaseContact(
    msgspec.Struct, frozen=True, kw_only=True, tag="release_contact", tag_field="op"
):
    """Supervisor: complete an assigned contact an agent holds (a stuck one, e.g. a call whose
    hang-up was lost) with disposition ``released_by_supervisor``; the agent's capacity is
    freed at once, without wrap-up. ``by`` names the supervisor, for the audit trail."""

    contact_id: str
    by: str = ""


AdminCommand = LinkKeys | UpsertExpert | RemoveExpert | ReleaseContact
ADMIN_COMMAND_DECODER: msgspec.json.Decoder[AdminCommand] = msgspec.json.Decoder(AdminCommand)


class Tick(msgspec.Struct, frozen=True, kw_only=True, tag="tick", tag_field="op"):
    """Time has passed: fire every timer due at ``now`` (offer expiry, escalation, wrap-up...)."""


EngineInput = (
    ContactEvent
    | Login
    | SetState
    | Accept
    | Reject
    | Complete
    | Logout
    | Tick
    | LinkKeys
    | UpsertExpert
    | RemoveExpert
    | ReleaseContact
)


# ---- outputs -------------------------------------------------------------------------------


class OfferCmd(msgspec.Struct, frozen=True, kw_only=True, tag="offer", tag_field="cmd"):
    """Offer a contact to an agent; publish on ``{prefix}/agents/{agent_id}/offers``."""

    offer_id: str
    agent_id: str
    contact_id: str
    queue: str
    expires_at: float
    contact: ContactEvent
    customer_id: str
    history: tuple[dict[str, Any], ...] = ()
    #: why it was routed here: the rule that decided and the contact's priority.
    rule: str = ""
    priority: int = 0
    #: the crowd expert the contact comes from (None: not an expert) and their level.
    expert_id: str | None = None
    expert_level: int = 0


class CancelOfferCmd(msgspec.Struct, frozen=True, kw_only=True, tag="cancel", tag_field="cmd"):
    """Withdraw an offer (expired, contact ended, agent logged out); tell the agent."""

    offer_id: str
    agent_id: str
    contact_id: str
    reason: str


class EventCmd(msgspec.Struct, frozen=True, kw_only=True, tag="event", tag_field="cmd"):
    """Publish a lifecycle event on ``{prefix}/events/{type}`` (``contact.queued`` ...)."""

    event: EngineEvent

    @property
    def type(self) -> str:
        """The event's name, e.g. ``contact.queued`` (the last part of the topic)."""
        return self.event.type


class RefusedCmd(msgspec.Struct, frozen=True, kw_only=True, tag="refused", tag_field="cmd"):
    """An input the engine refused (agent acting on another's offer, unknown agent...)."""

    agent_id: str | None
    reason: str
    detail: str = ""


Command = OfferCmd | CancelOfferCmd | EventCmd | RefusedCmd
