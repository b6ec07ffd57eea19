"""Chat webhooks → ContactEvents: Rocket.Chat omnichannel, Chatwoot, WhatsApp Cloud API, Messenger.

Decisions taken:

- Only what the customer says is input. Messages written by the company's side (Rocket.Chat
  messages carrying an ``agentId``, Chatwoot ``outgoing``/``activity``/``template`` and private
  notes, Messenger echoes) yield no event: the agent who wrote them is already handling the
  contact, and routing them would offer the company's own words back to an agent.
- A chat message is ``update`` for its conversation: a stateless decoder cannot know whether it
  is the first one, and the router treats an update for an unknown contact as new. Where the
  platform says a conversation started (Rocket.Chat ``LivechatSessionStart``, Chatwoot
  ``conversation_created``) the event is ``new``; where it says it ended (Rocket.Chat
  ``LivechatSession``, Chatwoot status ``resolved``/``closed``) it is ``end`` with
  ``end_reason="closed"``.
- Rocket.Chat sends one webhook per message (``Message`` carries a one-element ``messages``
  list); if several visitor messages arrive in one delivery, each becomes an event. Its own
  routing events (queued, taken, forwarded, edit, lead capture) are not ours to act on: [].
  An offline-form message has no room; its contact id is ``offline-`` plus a hash of the form's
  content, so a retried delivery maps to the same contact.
- WhatsApp conversations are per customer number (``whatsapp:{wa_id}``), Messenger ones per
  page-scoped user id (``messenger:{psid}``). Non-text messages keep their type in
  ``attributes["message_type"]`` and carry their caption, or ``[type]`` as text.
- Signatures, checked only when ``config.secrets`` has the source:
  Rocket.Chat ``X-RocketChat-Livechat-Token`` (the configured secret token, verbatim);
  Chatwoot ``X-Chatwoot-Signature: sha256=<hex HMAC-SHA256 of "{X-Chatwoot-Timestamp}.{body}">``
  (Chatwoot's per-webhook secret; the freshness of the timestamp is the transport's business,
  decoders do not read the clock); WhatsApp and Messenger ``X-Hub-Signature-256:
  sha256=<hex HMAC-SHA256 of the body>`` with the Meta app secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Mapping
from typing import Any

from channels.base import DecodeConfig, Rejected
from channels.common import (
    bound_text,
    check_hmac_sha256_hex,
    check_shared_secret,
    field,
    header,
    load_json_object,
    opt,
    opt_str,
    parse_timestamp,
    to_e164,
)
from channels.contact_event import Attachment, ContactEvent, Sender

Headers = Mapping[str, str]


def _lower(value: str | None) -> str | None:
    if not value:
        return None
    return value.strip().lower() or None


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    """The dict items of a JSON list (anything else yields nothing)."""
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield item


def _timestamp_or_zero(value: Any, source: str) -> float:
    if value is None:
        return 0.0
    return parse_timestamp(value, source)


# --------------------------------------------------------------------------- Rocket.Chat

ROCKETCHAT = "rocketchat"
# Rocket.Chat's own routing bookkeeping: Stellwerk is the router, so these carry nothing for it.
_ROCKETCHAT_IGNORED = frozenset(
    {"LivechatSessionQueued", "LivechatSessionTaken", "LivechatSessionForwarded",
     "LivechatEdit", "LeadCapture"}
)  # fmt: skip


def decode_rocketchat(body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode a Rocket.Chat omnichannel webhook (Message, LivechatOfflineMessage, sessions)."""
    secret = config.secrets.get(ROCKETCHAT)
    if secret is not None:
        check_shared_secret(header(headers, "X-RocketChat-Livechat-Token"), secret, ROCKETCHAT)
    payload = load_json_object(body, ROCKETCHAT)
    kind = field(payload, "type", source=ROCKETCHAT)
    if kind == "LivechatOfflineMessage":
        return [_rocketchat_offline(payload, config)]
    if kind in _ROCKETCHAT_IGNORED:
        return []
    if kind == "Message":
        return _rocketchat_messages(payload, config)
    if kind == "LivechatSessionStart":
        return [_rocketchat_room_event(payload, config, "new")]
    if kind == "LivechatSession":
        return [_rocketchat_room_event(payload, config, "end")]
    raise Rejected(ROCKETCHAT, "unsupported_event", f"type {kind!r}")


def _rocketchat_sender(payload: dict[str, Any], config: DecodeConfig) -> Sender:
    visitor = opt(payload, "visitor")
    if not isinstance(visitor, dict):
        return Sender()
    email = visitor.get("email")
    if isinstance(email, list):  # registered visitors: [{"address": ...}, ...]
        email = opt_str(email, 0, "address")
    phone = visitor.get("phone")
    if isinstance(phone, list):  # [{"phoneNumber": ...}, ...]
        phone = opt_str(phone, 0, "phoneNumber")
    user = opt_str(visitor, "username") or opt_str(visitor, "_id")
    return Sender(
        email=_lower(email if isinstance(email, str) else None),
        phone=to_e164(phone if isinstance(phone, str) else None, config.default_region),
        handle=f"{ROCKETCHAT}:{user}" if user else None,
        name=bound_text(opt_str(visitor, "name"), 200),
    )


def _rocketchat_is_visitor_message(message: dict[str, Any], visitor_user: str | None) -> bool:
    if message.get("agentId") or message.get("closingMessage") or message.get("t"):
        return False  # agent text, the closing comment or a system message
    author = opt_str(message, "u", "username") or opt_str(message, "username")
    return visitor_user is None or author is None or author == visitor_user


def _rocketchat_messages(payload: dict[str, Any], config: DecodeConfig) -> list[ContactEvent]:
    room_id = field(payload, "_id", source=ROCKETCHAT)
    sender = _rocketchat_sender(payload, config)
    visitor_user = opt_str(payload, "visitor", "username")
    events = []
    for message in _dicts(payload.get("messages")):
        if not _rocketchat_is_visitor_message(message, visitor_user):
            continue
        attributes = {"room_id": room_id}
        if message_id := opt_str(message, "_id"):
            attributes["message_id"] = message_id
        events.append(
            ContactEvent(
                kind="update",
                contact_id=f"{ROCKETCHAT}:{room_id}",
                channel="chat",
                source=ROCKETCHAT,
                external_id=room_id,
                thread_id=room_id,
                sender=sender,
                subject=bound_text(opt_str(payload, "topic"), config.max_text),
                text=bound_text(opt_str(message, "msg"), config.max_text),
                tags=_rocketchat_tags(payload),
                attributes=attributes,
                attachments=_rocketchat_file(message),
                occurred_at=_timestamp_or_zero(message.get("ts"), ROCKETCHAT),
            )
        )
    return events


def _rocketchat_file(message: dict[str, Any]) -> tuple[Attachment, ...]:
    file = message.get("file")
    if not isinstance(file, dict) or not opt_str(file, "name"):
        return ()
    size = file.get("size")
    return (
        Attachment(
            filename=bound_text(opt_str(file, "name"), 255) or "unnamed",
            content_type=opt_str(file, "type") or "application/octet-stream",
            size=size if isinstance(size, int) and not isinstance(size, bool) else 0,
        ),
    )


def _rocketchat_tags(payload: dict[str, Any]) -> tuple[str, ...]:
    tags = payload.get("tags")
    if not isinstance(tags, list):
        return ()
    return tuple(tag for tag in tags if isinstance(tag, str) and tag)


def _rocketchat_room_event(
    payload: dict[str, Any], config: DecodeConfig, kind: str
) -> ContactEvent:
    room_id = field(payload, "_id", source=ROCKETCHAT)
    visitor_user = opt_str(payload, "visitor", "username")
    first_words = next(
        (
            opt_str(m, "msg")
            for m in _dicts(payload.get("messages"))
            if _rocketchat_is_visitor_message(m, visitor_user)
        ),
        None,
    )
    when = payload.get("closedAt") if kind == "end" else payload.get("createdAt")
    attributes = {"room_id": room_id}
    if department := opt_str(payload, "departmentId"):
        attributes["department_id"] = department
    return ContactEvent(
        kind="end" if kind == "end" else "new",
        contact_id=f"{ROCKETCHAT}:{room_id}",
        channel="chat",
        source=ROCKETCHAT,
        external_id=room_id,
        thread_id=room_id,
        sender=_rocketchat_sender(payload, config),
        subject=bound_text(opt_str(payload, "topic"), config.max_text),
        text=None if kind == "end" else bound_text(first_words, config.max_text),
        tags=_rocketchat_tags(payload),
        attributes=attributes,
        occurred_at=_timestamp_or_zero(when, ROCKETCHAT),
        end_reason="closed" if kind == "end" else None,
    )


def _rocketchat_offline(payload: dict[str, Any], config: DecodeConfig) -> ContactEvent:
    text = field(payload, "message", source=ROCKETCHAT)
    name = opt_str(payload, "visitor", "name")
    email = _lower(opt_str(payload, "visitor", "email"))
    sent_at = opt_str(payload, "sentAt")
    seed = "\n".join((email or "", name or "", sent_at or "", text))
    external_id = "offline-" + hashlib.sha256(seed.encode()).hexdigest()[:24]
    attributes = {"form": "offline_message"}
    if department := opt_str(payload, "department"):
        attributes["department"] = department
    return ContactEvent(
        kind="new",
        contact_id=f"{ROCKETCHAT}:{external_id}",
        channel="chat",
        source=ROCKETCHAT,
        external_id=external_id,
        thread_id=external_id,
        sender=Sender(email=email, name=bound_text(name, 200)),
        text=bound_text(text, config.max_text),
        tags=("offline_message",),
        attributes=attributes,
        occurred_at=_timestamp_or_zero(payload.get("sentAt"), ROCKETCHAT),
    )


# --------------------------------------------------------------------------- Chatwoot

CHATWOOT = "chatwoot"
# Ignored without complaint: deliveries a webhook may be subscribed to that change no routing.
_CHATWOOT_IGNORED = frozenset(
    {"message_updated", "conversation_updated", "conversation_opened", "contact_created",
     "contact_updated", "webwidget_triggered", "conversation_typing_on",
     "conversation_typing_off", "inbox_created", "inbox_updated"}
)  # fmt: skip
_CHATWOOT_CLOSED = frozenset({"resolved", "closed"})


def decode_chatwoot(body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode a Chatwoot webhook (message_created, conversation_created / status changes)."""
    secret = config.secrets.get(CHATWOOT)
    if secret is not None:
        _check_chatwoot_signature(body, headers, secret)
    payload = load_json_object(body, CHATWOOT)
    event = field(payload, "event", source=CHATWOOT)
    if event == "message_created":
        return _chatwoot_message(payload, config)
    if event == "conversation_created":
        return [_chatwoot_conversation(payload, config, "new")]
    if event in ("conversation_status_changed", "conversation_resolved"):
        status = opt_str(payload, "status")
        if event == "conversation_resolved" or status in _CHATWOOT_CLOSED:
            return [_chatwoot_conversation(payload, config, "end")]
        return []  # reopened, pending, snoozed: the conversation goes on
    if event in _CHATWOOT_IGNORED:
        return []
    raise Rejected(CHATWOOT, "unsupported_event", f"event {event!r}")


def _check_chatwoot_signature(body: bytes, headers: Headers, secret: str) -> None:
    given = header(headers, "X-Chatwoot-Signature")
    timestamp = header(headers, "X-Chatwoot-Timestamp")
    if not given or not timestamp:
        raise Rejected(CHATWOOT, "bad_signature", "X-Chatwoot-Signature or -Timestamp missing")
    signed = timestamp.strip().encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.strip().encode()):
        raise Rejected(CHATWOOT, "bad_signature", "signature does not match the body")


def _chatwoot_id(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise Rejected(CHATWOOT, "missing_field", f"{name} is missing or not a string or int")
    return str(value)


def _chatwoot_sender(contact: Any, fallback: Any, config: DecodeConfig) -> Sender:
    """The customer, from conversation.meta.sender (has email/phone) or the message sender."""
    person = contact if isinstance(contact, dict) else fallback
    if not isinstance(person, dict):
        return Sender()
    contact_id = opt_str(person, "id")
    phone = opt_str(person, "phone_number")
    return Sender(
        email=_lower(opt_str(person, "email")),
        phone=to_e164(phone, config.default_region),
        handle=f"{CHATWOOT}:{contact_id}" if contact_id else None,
        name=bound_text(opt_str(person, "name"), 200),
    )


def _chatwoot_message(payload: dict[str, Any], config: DecodeConfig) -> list[ContactEvent]:
    if payload.get("message_type") not in ("incoming", 0) or payload.get("private") is True:
        return []  # outgoing (agent or bot), activity, template, private note
    sender_type = opt_str(payload, "sender", "type")
    if sender_type is not None and sender_type.lower() != "contact":
        return []
    # Chatwoot's webhook data puts the per-account display id in "id"; older docs show only
    # "display_id". Both name the number agents see in the dashboard.
    conversation_id = opt(payload, "conversation", "id")
    if conversation_id is None:
        conversation_id = opt(payload, "conversation", "display_id")
    external_id = _chatwoot_id(conversation_id, "conversation.id")
    attributes = {}
    for key, path in (
        ("message_id", ("id",)),
        ("inbox_id", ("inbox", "id")),
        ("account_id", ("account", "id")),
        ("chatwoot_channel", ("conversation", "channel")),
        ("content_type", ("content_type",)),
    ):
        if value := opt_str(payload, *path):
            attributes[key] = value
    return [
        ContactEvent(
            kind="update",
            contact_id=f"{CHATWOOT}:{external_id}",
            channel="chat",
            source=CHATWOOT,
            external_id=external_id,
            thread_id=external_id,
            sender=_chatwoot_sender(
                opt(payload, "conversation", "meta", "sender"), payload.get("sender"), config
            ),
            to=opt_str(payload, "inbox", "name"),
            text=bound_text(opt_str(payload, "content"), config.max_text),
            tags=_chatwoot_labels(opt(payload, "conversation", "labels")),
            attributes=attributes,
            attachments=_chatwoot_attachments(payload.get("attachments")),
            occurred_at=_timestamp_or_zero(payload.get("created_at"), CHATWOOT),
        )
    ]


def _chatwoot_labels(labels: Any) -> tuple[str, ...]:
    if not isinstance(labels, list):
        return ()
    return tuple(label for label in labels if isinstance(label, str) and label)


def _chatwoot_attachments(items: Any) -> tuple[Attachment, ...]:
    found = []
    for item in _dicts(items):
        url = opt_str(item, "data_url") or ""
        name = url.rsplit("/", 1)[-1].split("?")[0] or "unnamed"
        size = item.get("file_size")
        found.append(
            Attachment(
                filename=bound_text(name, 255) or "unnamed",
                content_type=opt_str(item, "file_type") or "file",
                size=size if isinstance(size, int) and not isinstance(size, bool) else 0,
            )
        )
    return tuple(found)


def _chatwoot_conversation(
    payload: dict[str, Any], config: DecodeConfig, kind: str
) -> ContactEvent:
    conversation_id = payload.get("id")
    if conversation_id is None:
        conversation_id = payload.get("display_id")
    external_id = _chatwoot_id(conversation_id, "id")
    first_words = next(
        (
            opt_str(m, "content")
            for m in _dicts(payload.get("messages"))
            if m.get("message_type") in (0, "incoming") and not m.get("private")
        ),
        None,
    )
    attributes = {}
    for key, path in (("inbox_id", ("inbox_id",)), ("chatwoot_channel", ("channel",))):
        if value := opt_str(payload, *path):
            attributes[key] = value
    if status := opt_str(payload, "status"):
        attributes["status"] = status
    return ContactEvent(
        kind="end" if kind == "end" else "new",
        contact_id=f"{CHATWOOT}:{external_id}",
        channel="chat",
        source=CHATWOOT,
        external_id=external_id,
        thread_id=external_id,
        sender=_chatwoot_sender(opt(payload, "meta", "sender"), None, config),
        text=None if kind == "end" else bound_text(first_words, config.max_text),
        tags=_chatwoot_labels(payload.get("labels")),
        attributes=attributes,
        occurred_at=_timestamp_or_zero(payload.get("timestamp"), CHATWOOT),
        end_reason="closed" if kind == "end" else None,
    )


# --------------------------------------------------------------------------- Meta (shared)


def _check_meta_signature(body: bytes, headers: Headers, config: DecodeConfig, source: str) -> None:
    secret = config.secrets.get(source)
    if secret is not None:
        check_hmac_sha256_hex(body, secret, header(headers, "X-Hub-Signature-256"), source)


def _meta_entries(
    body: bytes, headers: Headers, config: DecodeConfig, source: str, kind: str
) -> Iterator[dict[str, Any]]:
    """The ``entry`` objects of a Meta webhook (WhatsApp, Messenger) after its checks."""
    _check_meta_signature(body, headers, config, source)
    payload = load_json_object(body, source)
    if payload.get("object") != kind:
        raise Rejected(source, "bad_shape", f"object is not {kind}")
    entries = payload.get("entry")
    if not isinstance(entries, list):
        raise Rejected(source, "missing_field", "entry is missing or not a list")
    return _dicts(entries)


def _placeholder(kind: str, caption: str | None) -> str:
    return caption if caption else f"[{kind}]"


# --------------------------------------------------------------------------- WhatsApp

WHATSAPP = "whatsapp"


def decode_whatsapp(body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode a WhatsApp Cloud API webhook: one event per customer message, statuses ignored."""
    events = []
    for entry in _meta_entries(body, headers, config, WHATSAPP, "whatsapp_business_account"):
        for change in _dicts(entry.get("changes")):
            value = change.get("value")
            if isinstance(value, dict):
                events.extend(_whatsapp_value(value, config))
    return events


def _whatsapp_value(value: dict[str, Any], config: DecodeConfig) -> list[ContactEvent]:
    names = {
        opt_str(contact, "wa_id"): opt_str(contact, "profile", "name")
        for contact in _dicts(value.get("contacts"))
    }
    display = opt_str(value, "metadata", "display_phone_number")
    to = _international(display, config) if display else None
    events = []
    for message in _dicts(value.get("messages")):
        wa_id = opt_str(message, "from")
        if wa_id is None:
            raise Rejected(WHATSAPP, "missing_field", "messages[].from is missing")
        kind = opt_str(message, "type") or "unknown"
        attributes = {"message_type": kind}
        if message_id := opt_str(message, "id"):
            attributes["message_id"] = message_id
        if phone_number_id := opt_str(value, "metadata", "phone_number_id"):
            attributes["phone_number_id"] = phone_number_id
        if reply_to := opt_str(message, "context", "id"):
            attributes["reply_to"] = reply_to
        events.append(
            ContactEvent(
                kind="update",
                contact_id=f"{WHATSAPP}:{wa_id}",
                channel="chat",
                source=WHATSAPP,
                external_id=wa_id,
                thread_id=wa_id,
                sender=Sender(
                    phone=_international(wa_id, config),
                    handle=f"{WHATSAPP}:{wa_id}",
                    name=bound_text(names.get(wa_id), 200),
                ),
                to=to,
                text=bound_text(_whatsapp_text(message, kind, attributes), config.max_text),
                attributes=attributes,
                occurred_at=_timestamp_or_zero(message.get("timestamp"), WHATSAPP),
            )
        )
    return events


def _international(number: str, config: DecodeConfig) -> str | None:
    """WhatsApp numbers are international without the "+": add it before parsing."""
    digits = number.strip()
    if digits and not digits.startswith("+"):
        digits = "+" + digits
    return to_e164(digits, config.default_region)


def _whatsapp_text(message: dict[str, Any], kind: str, attributes: dict[str, str]) -> str:
    if kind == "text":
        return opt_str(message, "text", "body") or ""
    if kind == "button":
        return opt_str(message, "button", "text") or _placeholder(kind, None)
    if kind == "interactive":
        reply = opt(message, "interactive", "button_reply") or opt(
            message, "interactive", "list_reply"
        )
        if isinstance(reply, dict):
            if reply_id := opt_str(reply, "id"):
                attributes["reply_id"] = reply_id
            return opt_str(reply, "title") or _placeholder(kind, None)
        return _placeholder(kind, None)
    if kind == "reaction":
        return opt_str(message, "reaction", "emoji") or _placeholder(kind, None)
    if kind == "location":
        place = message.get("location")
        if isinstance(place, dict):
            label = opt_str(place, "name") or opt_str(place, "address")
            where = f"{opt_str(place, 'latitude')},{opt_str(place, 'longitude')}"
            return f"[location] {label or where}"
        return _placeholder(kind, None)
    media = message.get(kind)
    if isinstance(media, dict):
        if media_id := opt_str(media, "id"):
            attributes["media_id"] = media_id
        if mime := opt_str(media, "mime_type"):
            attributes["mime_type"] = mime
        if filename := opt_str(media, "filename"):
            attributes["filename"] = filename
        return _placeholder(kind, opt_str(media, "caption"))
    return _placeholder(kind, None)


# --------------------------------------------------------------------------- Messenger

MESSENGER = "messenger"


def decode_messenger(body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode a Messenger Platform webhook: one event per user message or postback."""
    events = []
    for entry in _meta_entries(body, headers, config, MESSENGER, "page"):
        for item in _dicts(entry.get("messaging")):
            event = _messenger_item(item, config)
            if event is not None:
                events.append(event)
    return events


def _messenger_item(item: dict[str, Any], config: DecodeConfig) -> ContactEvent | None:
    message = item.get("message")
    postback = item.get("postback")
    attributes: dict[str, str] = {}
    if isinstance(message, dict):
        if message.get("is_echo"):
            return None  # the page's own message, echoed back
        if mid := opt_str(message, "mid"):
            attributes["message_id"] = mid
        if quick_reply := opt_str(message, "quick_reply", "payload"):
            attributes["quick_reply"] = quick_reply
        text = opt_str(message, "text")
        if text is None:
            kinds = [opt_str(a, "type") or "attachment" for a in _dicts(message.get("attachments"))]
            attributes["message_type"] = kinds[0] if kinds else "unknown"
            text = _placeholder(attributes["message_type"], None)
        else:
            attributes["message_type"] = "text"
    elif isinstance(postback, dict):
        attributes["message_type"] = "postback"
        if payload := opt_str(postback, "payload"):
            attributes["postback"] = payload
        if mid := opt_str(postback, "mid"):
            attributes["message_id"] = mid
        text = opt_str(postback, "title") or _placeholder("postback", None)
    else:
        return None  # delivery, read, reaction receipts, optins, handover: nothing to route
    psid = field(item, "sender", "id", source=MESSENGER, kind=(str, int))
    user = str(psid)
    return ContactEvent(
        kind="update",
        contact_id=f"{MESSENGER}:{user}",
        channel="chat",
        source=MESSENGER,
        external_id=user,
        thread_id=user,
        sender=Sender(handle=f"{MESSENGER}:{user}"),
        to=opt_str(item, "recipient", "id"),
        text=bound_text(text, config.max_text),
        attributes=attributes,
        occurred_at=_timestamp_or_zero(item.get("timestamp"), MESSENGER),
    )
