"""The generic source: a small documented JSON shape for systems Stellwerk has no adapter for.

A delivery is one JSON object, or a JSON list of them (a batch; ``[]`` is valid and empty)::

    {"kind": "new", "channel": "phone", "id": "call-42",
     "from": "+4930123456", "to": "+4930999", "name": "Erika Muster",
     "email": "erika@example.org", "handle": "shop:erika", "subject": "...", "text": "...",
     "language": "de", "tags": ["billing"], "attributes": {"order": "A-17"},
     "attachments": [{"filename": "bill.pdf", "content_type": "application/pdf", "size": 1234}],
     "thread_id": "...", "timestamp": "2026-11-22T18:00:00Z", "end_reason": "hangup"}

Required: ``kind`` (new/update/end), ``channel`` (phone/email/chat/social) and ``id`` (the
contact's id in the sending system; the event's ``contact_id`` is ``generic:{id}``). Everything
else is optional. ``from`` is the sender's phone number (E.164 where it parses with the
configured region, else kept as given); ``email`` is lower-cased; ``handle`` is used as given
when it already names a source (``discourse:erika``) and becomes ``generic:{handle}`` otherwise,
so identities from other adapters still match. ``thread_id`` defaults to ``id``; ``timestamp`` is
ISO 8601, RFC 2822 or epoch seconds/milliseconds (absent: 0, the router's receive time is
used). ``end_reason`` is required with ``kind: end`` and refused with any other kind.

Unknown fields are refused, so a typo does not silently lose data: every shape error is a
``bad_shape`` rejection whose detail is msgspec's message naming the field, e.g.
``Object contains unknown field `fromm``` or ``Expected `str`, got `int` - at `$.id```.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from channels.base import DecodeConfig, Headers, Rejected
from channels.common import bound_text, parse_timestamp, to_e164
from channels.contact_event import Attachment, Channel, ContactEvent, Kind, Sender

GENERIC = "generic"

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class GenericAttachment(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Attachment metadata in a generic delivery."""

    filename: str
    content_type: str = "application/octet-stream"
    size: Annotated[int, msgspec.Meta(ge=0)] = 0


class GenericEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One generic event as it arrives on the wire (see the module docstring)."""

    kind: Kind
    channel: Channel
    id: NonEmpty
    thread_id: NonEmpty | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    name: str | None = None
    email: str | None = None
    handle: str | None = None
    subject: str | None = None
    text: str | None = None
    language: str | None = None
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    attachments: tuple[GenericAttachment, ...] = ()
    timestamp: float | str | None = None
    end_reason: NonEmpty | None = None


_DECODER = msgspec.json.Decoder(GenericEvent | list[GenericEvent])


def decode_generic(body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode a generic JSON delivery (one object or a list of them)."""
    try:
        decoded = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise Rejected(GENERIC, "bad_shape", str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Invalid UTF-8 inside a JSON string surfaces as UnicodeDecodeError.
        raise Rejected(GENERIC, "not_json", str(exc)) from None
    if isinstance(decoded, list):
        return [_event(item, f"$[{index}]", config) for index, item in enumerate(decoded)]
    return [_event(decoded, "$", config)]


def _event(item: GenericEvent, where: str, config: DecodeConfig) -> ContactEvent:
    # Cross-field rules msgspec cannot express; the detail names the place like msgspec does.
    if item.kind == "end" and item.end_reason is None:
        raise Rejected(
            GENERIC, "missing_field", f"end_reason is required when kind is end - at `{where}`"
        )
    if item.kind != "end" and item.end_reason is not None:
        raise Rejected(
            GENERIC, "bad_shape", f"end_reason is only allowed when kind is end - at `{where}`"
        )
    handle = item.handle.strip() if item.handle else None
    if handle and ":" not in handle:
        handle = f"{GENERIC}:{handle}"
    email = item.email.strip().lower() if item.email else None
    return ContactEvent(
        kind=item.kind,
        contact_id=f"{GENERIC}:{item.id}",
        channel=item.channel,
        source=GENERIC,
        external_id=item.id,
        thread_id=item.thread_id or item.id,
        sender=Sender(
            phone=to_e164(item.from_, config.default_region),
            email=email or None,
            handle=handle or None,
            name=(item.name.strip() or None) if item.name else None,
        ),
        to=item.to or None,
        subject=bound_text(item.subject, config.max_text),
        text=bound_text(item.text, config.max_text),
        language=item.language or None,
        tags=item.tags,
        attributes=item.attributes,
        attachments=tuple(
            Attachment(filename=a.filename, content_type=a.content_type, size=a.size)
            for a in item.attachments
        ),
        occurred_at=0.0 if item.timestamp is None else parse_timestamp(item.timestamp, GENERIC),
        end_reason=item.end_reason,
    )
