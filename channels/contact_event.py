"""The normalised contact event: the one shape every channel adapter emits.

Field names and meanings are in docs/architecture.md; this module is the contract between
``channels/`` (which produce events) and ``router/`` (which consumes them). It holds data only.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Kind = Literal["new", "update", "end"]
Channel = Literal["phone", "email", "chat", "social"]
CHANNELS: tuple[Channel, ...] = ("phone", "email", "chat", "social")
SOURCES: tuple[str, ...] = (
    "asterisk-ari",
    "freeswitch",
    "twilio-voice",
    "email",
    "rocketchat",
    "chatwoot",
    "whatsapp",
    "messenger",
    "discourse",
    "x",
    "generic",
)


class Sender(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Who wrote or called. Every field is optional; identity resolution uses whichever is set.

    ``phone`` is E.164 where the number parses, otherwise exactly as the source gave it;
    ``email`` is the lower-case address; ``handle`` is ``"{source}:{user}"``.
    """

    phone: str | None = None
    email: str | None = None
    handle: str | None = None
    name: str | None = None


class Attachment(msgspec.Struct, frozen=True, kw_only=True):
    """An attachment's metadata; the content itself is never carried in an event."""

    filename: str
    content_type: str
    size: int


class ContactEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One normalised event about a contact (a call, an email thread, a chat, a post thread).

    ``kind`` is ``new`` when a contact starts, ``update`` for anything said or done in it later
    (a DTMF digit, a reply in the thread), ``end`` when it ends upstream (``end_reason``).
    An ``update`` for a contact the router does not know is treated as ``new``: a reply can be
    the first thing Stellwerk sees of a thread.
    """

    kind: Kind
    contact_id: str
    channel: Channel
    source: str
    external_id: str
    thread_id: str | None = None
    sender: Sender = msgspec.field(default_factory=Sender)
    to: str | None = None
    subject: str | None = None
    text: str | None = None
    language: str | None = None
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()
    occurred_at: float = 0.0
    end_reason: str | None = None


CONTACT_EVENT_DECODER = msgspec.json.Decoder(ContactEvent)
CONTACT_EVENTS_DECODER = msgspec.json.Decoder(list[ContactEvent])
JSON_ENCODER = msgspec.json.Encoder()
