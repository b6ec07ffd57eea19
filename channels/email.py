"""Email: one RFC 5322 message (bytes, as an SMTP server or an MDA delivers it) → ContactEvent.

Decisions taken:

- Thread identity: the contact is the thread. Its root is the first Message-ID in
  References, else the first in In-Reply-To, else the message's own Message-ID (angle brackets
  stripped). A message with none of these gets ``generated-<sha256 of From, Date, Subject>``,
  so a redelivery of the same message lands on the same contact.
- Stellwerk's own replies carry a Message-ID that names their thread's root
  (:func:`reply_message_id`: ``stw.<base32 of the root>.<hash>@domain``). A customer's answer
  whose References/In-Reply-To start with such an id joins that root's contact, also when the
  customer's mail client keeps only the reply's id in In-Reply-To and drops References.
- ``kind`` is ``new`` for a message that answers nothing (no In-Reply-To, no References),
  ``update`` for a reply; the router treats a reply to a thread it does not know as new.
- Body: the first text/plain part (``EmailMessage.get_body``), else the first text/html part
  turned into text. Other text parts (a second plain part after an attachment, alternatives)
  are not appended. Quoted history and signatures are trimmed (:mod:`channels.email_text`).
- Attachments: every leaf part with ``Content-Disposition: attachment`` or a filename
  (inline images included), with the size of the *decoded* content.
- Tags: ``bounce`` for delivery reports (multipart/report, message/delivery-status,
  MAILER-DAEMON senders); otherwise ``auto_reply`` for Auto-Submitted (other than "no"),
  X-Autoreply, X-Autorespond and Precedence: auto_reply. ``Precedence: bulk|list|junk`` is a
  mailing list or newsletter, not an auto-reply: it is tagged ``bulk`` (List-Id, when present,
  goes to ``attributes["list_id"]``). Whether any of these is routed, parked or dropped is a
  routing rule's decision, not the decoder's.
- A text part without a ``charset`` parameter (what swaks and many scripts send with a raw
  8-bit body), or one declared ``us-ascii`` that is not, or with an unknown charset, is read as
  UTF-8 when it is valid UTF-8, else as Windows-1252, the bytes Windows-1252 leaves undefined as
  Latin-1: every byte stays a character, nothing is replaced or dropped.
- A Date that is missing or does not parse gives ``occurred_at`` 0.0; a mail is not refused
  for a broken date.
- Input that has none of From, To, Subject, Date, Message-ID is not an email: ``not_email``.

The standard library's parser is lenient, but reading some malformed headers through
``policy.default`` raises assorted exceptions deep in its header parser; every header read here
falls back to the raw value so that bad mail still decodes or is rejected, never crashes.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import re
from collections.abc import Mapping
from datetime import UTC
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import EmailPolicy
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from channels.base import DecodeConfig, Rejected
from channels.common import bound_text
from channels.contact_event import Attachment, ContactEvent, Sender
from channels.email_text import html_to_text, trim_reply

SOURCE = "email"
# The standard library's header parser takes time quadratic in some header values (20 000
# encoded words in a Subject: 18 s; a 100 kB Content-Type parameter list: 20 s). Every header
# is read from its first MAX_HEADER characters only: a first address, a first Message-ID, a
# subject or a boundary all come well before that, and a hostile mail then costs milliseconds.
MAX_HEADER = 8192


class _BoundedPolicy(EmailPolicy):
    def header_fetch_parse(self, name: str, value: str) -> Any:
        return super().header_fetch_parse(name, value[:MAX_HEADER])


_PARSER = BytesParser(policy=_BoundedPolicy())
_MSG_ID = re.compile(r"<([^<>\s]+)>")
_OWN_ID = re.compile(r"stw\.([a-z2-7]+)\.[0-9a-f]{12}@", re.IGNORECASE)


def reply_message_id(root: str, key: str, domain: str) -> str:
    """The Message-ID (without brackets) of a reply in thread ``root``; stable for ``key``."""
    encoded = base64.b32encode(root.encode("utf-8")).decode().rstrip("=").lower()
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return f"stw.{encoded}.{digest}@{domain}"


def thread_of(message_id: str) -> str | None:
    """The thread root a Message-ID made by :func:`reply_message_id` names, else None."""
    match = _OWN_ID.match(message_id)
    if match is None:
        return None
    encoded = match.group(1).upper()
    try:
        return base64.b32decode(encoded + "=" * (-len(encoded) % 8)).decode("utf-8") or None
    except (binascii.Error, ValueError):
        return None


# Without at least one of these a parse result is just text with a colon in its first line.
_CORE_HEADERS = ("from", "to", "subject", "date", "message-id")
_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})
_BOUNCE_SENDERS = frozenset({"mailer-daemon", "postmaster"})


def decode_email(
    body: bytes, headers: Mapping[str, str], config: DecodeConfig
) -> list[ContactEvent]:
    """Decode one RFC 5322 message into one ContactEvent, or reject it as ``not_email``."""
    if not isinstance(body, bytes | bytearray) or not body.strip():
        raise Rejected(SOURCE, "not_email", "empty input")
    try:
        message = _PARSER.parsebytes(bytes(body))
    except Exception as exc:  # the parser is meant never to raise; be sure of it
        raise Rejected(SOURCE, "not_email", f"unparseable: {exc}") from None
    names = {name.lower() for name in message}
    if not names.intersection(_CORE_HEADERS):
        raise Rejected(SOURCE, "not_email", "no From, To, Subject, Date or Message-ID header")

    from_name, from_addr = _first_address(message, "From")
    _, to_addr = _first_address(message, "To")
    subject = _header_text(message, "Subject")
    date_raw = _header_text(message, "Date")

    own_id = _first_msg_id(_header_text(message, "Message-ID"))
    references = _msg_ids(_header_text(message, "References"))
    in_reply_to = _msg_ids(_header_text(message, "In-Reply-To"))
    if own_id is None:
        seed = "\n".join((from_addr or "", date_raw or "", subject or ""))
        own_id = "generated-" + hashlib.sha256(seed.encode("utf-8", "replace")).hexdigest()[:32]
    root = references[0] if references else in_reply_to[0] if in_reply_to else own_id
    root = thread_of(root) or root

    attributes = {"message_id": own_id}
    if in_reply_to:
        attributes["in_reply_to"] = in_reply_to[0]
    list_id = _first_msg_id(_header_text(message, "List-Id"))
    if list_id:
        attributes["list_id"] = list_id

    text = _body_text(message)
    return [
        ContactEvent(
            kind="update" if references or in_reply_to else "new",
            contact_id=f"{SOURCE}:{root}",
            channel="email",
            source=SOURCE,
            external_id=root,
            thread_id=root,
            sender=Sender(email=from_addr, name=bound_text(from_name, 200)),
            to=to_addr,
            subject=bound_text(subject, config.max_text),
            text=bound_text(trim_reply(text) if text else None, config.max_text),
            language=_language(_header_text(message, "Content-Language")),
            tags=_tags(message, from_addr),
            attributes=attributes,
            attachments=tuple(_attachments(message)),
            occurred_at=_epoch(date_raw),
        )
    ]


def _header_text(message: Message, name: str) -> str | None:
    """The decoded value of the first ``name`` header, or None (never raises)."""
    try:
        value = message.get(name)
        text = None if value is None else str(value)
    except Exception:
        # policy.default parses lazily and some malformed values make it raise; the raw value,
        # decoded as far as possible, is better than nothing.
        text = _raw_header(message, name)
    if text is None:
        return None
    text = " ".join(_unescape(text).split())
    return text or None


def _unescape(text: str) -> str:
    """Undo the parser's surrogate escapes of raw 8-bit header bytes (SMTPUTF8 mail, careless
    scripts): the bytes are read as undeclared text is, so they neither vanish nor leave lone
    surrogates that no encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return decode_undeclared(text.encode("utf-8", "surrogateescape"))
    return text


def _raw_header(message: Message, name: str) -> str | None:
    wanted = name.lower()
    for key, value in message.raw_items():
        if key.lower() == wanted:
            return str(value)[:MAX_HEADER]
    return None


def _first_address(message: Message, name: str) -> tuple[str | None, str | None]:
    """(display name, lower-case address) of the first address in header ``name``."""
    try:
        header = message.get(name)
        addresses = getattr(header, "addresses", None) if header is not None else None
        if addresses:
            first = addresses[0]
            name, addr = _unescape(first.display_name), _unescape(first.addr_spec)
            return name or None, addr.lower() or None
    except Exception:
        pass  # fall back to the lenient parse of the raw text below
    text = _header_text(message, name)
    if not text:
        return None, None
    try:
        pairs = [(n, a) for n, a in getaddresses([text]) if a or n]
    except Exception:  # the legacy parser recurses per "(": RecursionError on hostile input
        return None, None
    if not pairs:
        return None, None
    display, addr = pairs[0]
    return display or None, addr.lower() or None


def _msg_ids(text: str | None) -> list[str]:
    """Message-IDs in a References / In-Reply-To value, in order, brackets stripped."""
    if not text:
        return []
    found = _MSG_ID.findall(text)
    if found:
        return found
    # Some mailers omit the brackets; a lone token with an "@" is still an id.
    return [token for token in text.split() if "@" in token][:1]


def _first_msg_id(text: str | None) -> str | None:
    ids = _msg_ids(text)
    if ids:
        return ids[0]
    if not text:
        return None
    return text.strip("<> ") or None


def _epoch(date_raw: str | None) -> float:
    if not date_raw:
        return 0.0
    try:
        parsed = parsedate_to_datetime(date_raw)
        if parsed.tzinfo is None:  # "-0000" means "zone unknown": take it as UTC
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0


def _language(text: str | None) -> str | None:
    if not text:
        return None
    first = text.split(",")[0].strip()
    return first or None


def _body_text(message: Message) -> str | None:
    """The customer's text: first text/plain part, else the first text/html part as text."""
    if not isinstance(message, EmailMessage):
        return None
    try:
        part = message.get_body(preferencelist=("plain", "html"))
    except Exception:
        return None
    if part is None:
        return None
    content = _part_text(part)
    if content is None:
        return None
    if part.get_content_subtype() == "html":
        try:
            return html_to_text(content)
        except Exception:
            return None
    return content


def _latin1_fallback(exc: UnicodeError) -> tuple[str, int]:
    # Windows-1252 leaves five bytes undefined; Latin-1 maps them to the C1 controls.
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return exc.object[exc.start : exc.end].decode("latin-1"), exc.end


codecs.register_error("stellwerk-latin1", _latin1_fallback)
_ASCII = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968"})


def decode_undeclared(raw: bytes) -> str:
    """Text of unknown encoding: UTF-8 when it is valid UTF-8, else Windows-1252 (Latin-1 for
    the bytes it leaves undefined). One character per byte in the fallback, never a loss."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="stellwerk-latin1")


def _declared_charset(part: Message) -> str | None:
    """The part's charset parameter when it names a codec Python knows, else None."""
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    if not charset:
        return None
    try:
        codecs.lookup(charset)
    except (LookupError, ValueError):
        return None
    return charset


def _part_text(part: Message) -> str | None:
    charset = _declared_charset(part)
    if charset is not None and charset not in _ASCII:
        try:
            content = part.get_content()  # type: ignore[attr-defined]
            if isinstance(content, str):
                return content
        except Exception:
            pass  # a broken transfer encoding: decode by hand below
    try:
        raw = part.get_payload(decode=True)
    except Exception:
        return None
    if not isinstance(raw, bytes):
        return None
    if charset is not None and charset not in _ASCII:
        # Declared, but the content did not decode: keep what is there rather than nothing.
        return raw.decode(charset, errors="replace")
    # No charset (or "us-ascii" on 8-bit bytes, or an unknown one): the mail does not say.
    return decode_undeclared(raw)


def _is_attachment(part: Message) -> bool:
    try:
        if part.get_content_disposition() == "attachment":
            return True
        return bool(part.get_filename())
    except Exception:
        return False


def _attachments(message: Message) -> list[Attachment]:
    found: list[Attachment] = []
    _collect_attachments(message, found, depth=0)
    return found


def _collect_attachments(part: Message, found: list[Attachment], depth: int) -> None:
    if depth > 20:  # nesting this deep is an attack, not a mail
        return
    if depth > 0 and _is_attachment(part):
        found.append(
            Attachment(
                filename=_safe_filename(part),
                content_type=part.get_content_type(),
                size=_decoded_size(part),
            )
        )
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for child in payload:
                if isinstance(child, Message):
                    _collect_attachments(child, found, depth + 1)


def _safe_filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    return bound_text(_unescape(name) if name else None, 255) or "unnamed"


def _decoded_size(part: Message) -> int:
    try:
        if part.is_multipart():
            # An attached message (message/rfc822): its size is that of the message itself.
            return len(part.as_bytes())
        raw = part.get_payload(decode=True)
    except Exception:
        return 0
    return len(raw) if isinstance(raw, bytes) else 0


def _tags(message: Message, from_addr: str | None) -> tuple[str, ...]:
    if _is_bounce(message, from_addr):
        return ("bounce",)
    tags: list[str] = []
    auto_submitted = (_header_text(message, "Auto-Submitted") or "").split(";")[0].strip().lower()
    precedence = (_header_text(message, "Precedence") or "").strip().lower()
    if (
        (auto_submitted and auto_submitted != "no")
        or _header_text(message, "X-Autoreply") is not None
        or _header_text(message, "X-Autorespond") is not None
        or precedence == "auto_reply"
    ):
        tags.append("auto_reply")
    if precedence in _BULK_PRECEDENCE:
        tags.append("bulk")
    return tuple(tags)


def _is_bounce(message: Message, from_addr: str | None) -> bool:
    if from_addr and from_addr.split("@")[0] in _BOUNCE_SENDERS:
        return True
    try:
        for depth, part in enumerate(message.walk()):
            if depth > 200:
                break
            if part.get_content_type() in ("multipart/report", "message/delivery-status"):
                return True
    except Exception:
        return False
    return False
