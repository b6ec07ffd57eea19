"""Transcripts: every message of a contact, kept at the edge in Redis, never in the engine.

The engine keeps what routing needs (the contact's first event); what the customer wrote after
that (a follow-up mail, the next chat lines, replies in a community thread) is stored here, one
Redis list per contact under the daemon's key prefix (``{key_prefix}transcript:{contact_id}``),
so the agent desktop can show the whole conversation. Intake records each delivery's events
as it journals them (the transcript write is sent first), so when the router announces a
follow-up (``contact.updated``) its body is already here; a delivery that is retried after a
journal failure records the same message twice, which :func:`dedupe` removes on reading (each
message has a content id). An agent's reply from the desk (or from forward mode's mail) is
added by the desk once the outbox took it (:func:`reply_message`), as the agent's message.

Bounded: at most ``transcript_messages`` per contact (the oldest dropped), each text cut at
``transcript_chars``, the list expiring ``open_ttl`` after its last message and
``transcript_ttl`` after its contact finished (:meth:`TranscriptStore.finished`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from channels.contact_event import Attachment, ContactEvent, Sender
from router.daemon.config import DeskSettings

log = structlog.get_logger("stellwerk.transcripts")


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One message of a conversation as the desk shows it."""

    mid: str
    kind: str
    at: float
    channel: str
    source: str
    sender: Sender = msgspec.field(default_factory=Sender)
    to: str | None = None
    subject: str | None = None
    text: str | None = None
    attachments: tuple[Attachment, ...] = ()
    staff: bool = False
    truncated: bool = False
    #: an agent's reply from the desk: its outbox key (the desk shows the reply's state by it).
    reply_key: str | None = None


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Message)


def message_of(event: ContactEvent, max_chars: int, received_at: float) -> Message | None:
    """The transcript message for one event, or None when it says nothing to show (an end, a
    call's state change: calls show the caller and IVR arguments instead)."""
    if event.kind == "end" or event.channel == "phone":
        return None
    if not (event.text or event.subject or event.attachments):
        return None
    text = event.text
    truncated = text is not None and len(text) > max_chars
    if text is not None and truncated:
        text = text[:max_chars]
    basis = _ENCODER.encode(
        [event.kind, event.external_id, event.occurred_at, event.sender, event.subject, text]
    )
    return Message(
        mid=hashlib.sha256(basis).hexdigest()[:16],
        kind=event.kind,
        at=event.occurred_at or received_at,
        channel=event.channel,
        source=event.source,
        sender=event.sender,
        to=event.to,
        subject=event.subject,
        text=text,
        attachments=event.attachments,
        staff=event.attributes.get("staff") == "true",
        truncated=truncated,
    )


def reply_message(
    key: str, text: str, at: float, channel: str, source: str, agent: str, max_chars: int
) -> Message:
    """The transcript message of an agent's reply (``key``: its outbox key), shown as staff."""
    return Message(
        mid=hashlib.sha256(key.encode()).hexdigest()[:16],
        kind="reply",
        at=at,
        channel=channel,
        source=source,
        sender=Sender(name=agent),
        text=text[:max_chars],
        staff=True,
        truncated=len(text) > max_chars,
        reply_key=key,
    )


def dedupe(messages: Iterable[Message]) -> list[Message]:
    """The messages without repeats (a redelivered message is recorded twice), in order."""
    seen: set[str] = set()
    out = []
    for m in messages:
        if m.mid not in seen:
            seen.add(m.mid)
            out.append(m)
    return out


class TranscriptStore:
    """The Redis lists of transcripts (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, key_prefix: str, settings: DeskSettings) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}transcript:"
        self.settings = settings

    def key(self, contact_id: str) -> str:
        """The Redis key of one contact's transcript."""
        return self.prefix + contact_id

    async def record(self, events: Sequence[ContactEvent]) -> None:
        """Append the events' messages (an :data:`~router.daemon.intake.EventObserver`).

        Never raises: a transcript that misses a message is a lesser harm than a contact that
        is not journaled (the journal still has the event).
        """
        s = self.settings
        received_at = time.time()
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for event in events:
            message = message_of(event, s.transcript_chars, received_at)
            if message is None:
                continue
            key = self.key(event.contact_id)
            pipe.rpush(key, _ENCODER.encode(message))
            pipe.ltrim(key, -s.transcript_messages, -1)
            pipe.expire(key, int(s.open_ttl))
            n += 1
        if not n:
            return
        try:
            await pipe.execute()
        except RedisError as exc:
            log.warning("transcript.not_recorded", messages=n, error=str(exc))

    async def add(self, contact_id: str, message: Message) -> None:
        """Append one message that did not come through intake (an agent's reply); never
        raises, like :meth:`record`."""
        s = self.settings
        key = self.key(contact_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, _ENCODER.encode(message))
        pipe.ltrim(key, -s.transcript_messages, -1)
        pipe.expire(key, int(s.open_ttl))
        try:
            await pipe.execute()
        except RedisError as exc:
            log.warning("transcript.not_recorded", messages=1, error=str(exc))

    async def read(self, contact_id: str) -> list[Message]:
        """One contact's messages, oldest first, without repeats; [] when none are kept."""
        try:
            raw = await self.redis.lrange(self.key(contact_id), 0, -1)  # type: ignore[misc]
        except RedisError as exc:
            log.warning("transcript.unreadable", contact_id=contact_id, error=str(exc))
            return []
        messages = []
        for item in raw:
            try:
                messages.append(_DECODER.decode(item))
            except msgspec.DecodeError:
                continue  # written by a newer version with other fields: skip, do not fail
        return dedupe(messages)

    async def finished(self, contact_ids: Iterable[str]) -> None:
        """The contacts finished: their transcripts expire after ``transcript_ttl``."""
        ids = list(contact_ids)
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for contact_id in ids:
            pipe.expire(self.key(contact_id), int(self.settings.transcript_ttl))
        try:
            await pipe.execute()
        except RedisError as exc:
            log.warning("transcript.ttl_not_set", contacts=len(ids), error=str(exc))


def to_builtins(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as JSON-ready dicts."""
    result: list[dict[str, Any]] = msgspec.to_builtins(list(messages))
    return result
