"""Helpers every decoder uses: JSON parsing, E.164 numbers, timestamps, bounded text, HMACs.

All of them turn bad input into :class:`~channels.base.Rejected`, never into another exception.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import msgspec

from channels.base import Rejected
from rules.identity import normalize_phone

_JSON = msgspec.json.Decoder()


def load_json_object(body: bytes, source: str) -> dict[str, Any]:
    """Parse ``body`` as a JSON object, or reject it (``not_json`` / ``bad_shape``)."""
    try:
        value = _JSON.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 inside a string,
        # and RecursionError for deeply nested arrays/objects ("[" * 100_000).
        raise Rejected(source, "not_json", str(exc)) from None
    if not isinstance(value, dict):
        raise Rejected(source, "bad_shape", f"expected a JSON object, got {type(value).__name__}")
    return value


def field(obj: Any, *path: str | int, source: str, kind: type | tuple[type, ...] = str) -> Any:
    """``obj[path[0]][path[1]]...`` of type ``kind``, or reject with ``missing_field``.

    Use for the fields an event cannot do without; use :func:`opt` for the others. An empty
    string counts as missing: a required id or text that is empty identifies nothing.
    """
    value = opt(obj, *path)
    if (
        value is None
        or value == ""
        or not isinstance(value, kind)
        or (isinstance(value, bool) and kind is int)
    ):
        dotted = ".".join(str(p) for p in path)
        raise Rejected(source, "missing_field", f"{dotted} is missing or not a {_kind_name(kind)}")
    return value


def opt(obj: Any, *path: str | int) -> Any:
    """``obj[path[0]][path[1]]...`` or None when any step is missing or of the wrong shape."""
    # On every decoder's hot path: one type test per step.
    for step in path:
        if isinstance(step, str):
            if not isinstance(obj, dict):
                return None
            obj = obj.get(step)
        elif not isinstance(obj, list) or not -len(obj) <= step < len(obj):
            return None
        else:
            obj = obj[step]
        if obj is None:
            return None
    return obj


def opt_str(obj: Any, *path: str | int) -> str | None:
    """Like :func:`opt`, but only a non-empty string (numbers are turned into strings)."""
    if len(path) == 1 and isinstance(obj, dict) and isinstance(path[0], str):
        value = obj.get(path[0])  # the common case, without opt()'s loop
    else:
        value = opt(obj, *path)
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return str(value)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def to_e164(raw: str | None, region: str) -> str | None:
    """The number in E.164 where it parses, else the input as given; empty becomes None.

    Real systems send ``pchero``, ``test123``, ``<unknown>`` or nothing as caller ids; those are
    kept verbatim so that nothing the source said is lost. Short extensions stay as given too
    (see :func:`rules.identity.normalize_phone`, which this is, so callers and experts match).
    """
    if raw is None or not raw.strip():
        return None
    return normalize_phone(raw, region)


def parse_timestamp(value: Any, source: str) -> float:
    """UTC epoch seconds from whatever a source sends as a timestamp.

    Accepts ISO 8601 with ``Z``, ``+0000`` or ``-05:00`` offsets (naive means UTC), RFC 2822
    dates, and epoch numbers or numeric strings in seconds, milliseconds or microseconds
    (told apart by magnitude: anything past the year 5000 in seconds is taken as a finer unit).
    """
    if isinstance(value, bool) or value is None:
        raise Rejected(source, "bad_timestamp", f"no usable timestamp: {value!r}")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond float range (msgspec keeps big ints)
            raise Rejected(source, "bad_timestamp", "epoch number out of range") from None
        return _epoch_from_number(number, source)
    if not isinstance(value, str) or not value.strip():
        raise Rejected(source, "bad_timestamp", f"no usable timestamp: {value!r}")
    text = value.strip()
    try:
        return _epoch_from_number(float(text), source)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:
            parsed = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            raise Rejected(source, "bad_timestamp", f"unrecognised timestamp {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


_SECONDS_LIMIT = 95_617_584_000.0  # 5000-01-01 in epoch seconds


def _epoch_from_number(number: float, source: str) -> float:
    if not math.isfinite(number) or number < 0:  # NaN, infinity ("inf", "1e999") or negative
        raise Rejected(source, "bad_timestamp", f"not a usable epoch: {number!r}")
    while number > _SECONDS_LIMIT:
        number /= 1000.0
    return number


def bound_text(text: str | None, limit: int) -> str | None:
    """Normalise to NFC and cut to at most ``limit`` characters (never mid-character).

    NFC keeps umlauts and accents as single characters, so "Müller" from a decomposed source
    still matches ``text ~ "Müller"`` in a rule.
    """
    if text is None:
        return None
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        return None
    return text if len(text) <= limit else text[:limit]


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def check_hmac_sha256_hex(
    body: bytes, secret: str, given: str | None, source: str, prefix: str = "sha256="
) -> None:
    """Verify a hex HMAC-SHA256 of ``body`` (Meta, Discourse style ``sha256=<hex>``)."""
    if not given:
        raise Rejected(source, "bad_signature", "signature header missing")
    expected = prefix + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.strip().encode()):
        raise Rejected(source, "bad_signature", "signature does not match the body")


def check_shared_secret(given: str | None, secret: str, source: str) -> None:
    """Verify a shared-secret header (Rocket.Chat, Chatwoot) in constant time."""
    if not given or not hmac.compare_digest(given.encode(), secret.encode()):
        raise Rejected(source, "bad_signature", "shared secret missing or wrong")


def b64_hmac_sha1(key: str, message: str) -> str:
    """Base64 HMAC-SHA1, as Twilio signs its requests."""
    digest = hmac.new(key.encode(), message.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()
