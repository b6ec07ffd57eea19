"""Identity keys: how a phone number, an address or a handle is written so that it matches.

A key is ``"phone:+4930123456"``, ``"email:anna@example.org"`` or ``"handle:discourse:alice"``.
Experts' keys from the routing file and the keys of an incoming contact's sender go through the
same functions, so a number written ``030 123456`` in the experts file finds a caller whose
number arrives as ``+4930123456``.
"""

from __future__ import annotations

import functools
import re

import phonenumbers

from channels.contact_event import Sender

DEFAULT_REGION = "DE"
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def normalize_phone(raw: str, region: str = DEFAULT_REGION) -> str:
    """E.164 where the number parses as a possible number, else the input (stripped) as given.

    Short numbers with neither a country code nor the region's trunk prefix (``1001``,
    ``3400001``) are internal extensions, not national numbers, and are kept as given: turning
    them into ``+491001`` would make an extension look like a customer's (or an expert's)
    number. Adapters and the experts file go through this one function, so they always agree.
    """
    text = raw.strip()
    if _E164.fullmatch(text):
        # Already normalised (adapters emit E.164): skip the comparatively slow parser.
        return text
    return _parse_phone(text, region)


_MIN_BARE_DIGITS = 8


@functools.lru_cache(maxsize=64)
def _trunk_prefix(region: str) -> str:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    prefix = metadata.national_prefix if metadata is not None else None
    return prefix or "\x00"  # no trunk prefix: nothing starts with this


# Parsing is most of a call event's decode time, and every event of a call (create, answer,
# DTMF, hangup) repeats the caller's number; the mapping is pure, so a bounded cache is safe.
@functools.lru_cache(maxsize=8192)
def _parse_phone(text: str, region: str) -> str:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return text
    if not phonenumbers.is_possible_number(number):
        return text
    digits = "".join(ch for ch in text if ch.isdigit())
    if (
        not text.startswith("+")
        and not digits.startswith("00")
        and len(digits) < _MIN_BARE_DIGITS
        and not digits.startswith(_trunk_prefix(region))
    ):
        return text
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_email(raw: str) -> str:
    """The address in lower case (the local part is case-insensitive in practice)."""
    return raw.strip().lower()


def normalize_handle(raw: str) -> str | None:
    """``"{source}:{user}"`` in lower case with a leading ``@`` dropped; None without a source.

    Community and social platforms treat user names case-insensitively, and people write
    ``@alice`` as often as ``alice``.
    """
    source, sep, user = raw.strip().partition(":")
    user = user.strip().removeprefix("@")
    if not sep or not source.strip() or not user:
        return None
    return f"{source.strip().lower()}:{user.lower()}"


def phone_key(raw: str) -> str:
    """The identity key of a phone number."""
    return "phone:" + normalize_phone(raw)


def email_key(raw: str) -> str:
    """The identity key of an e-mail address."""
    return "email:" + normalize_email(raw)


def handle_key(raw: str) -> str | None:
    """The identity key of a handle, or None when it has no ``source:`` part."""
    handle = normalize_handle(raw)
    return None if handle is None else "handle:" + handle


def sender_keys(sender: Sender) -> tuple[str, ...]:
    """Every identity key of a contact's sender, phone first, then e-mail, then handle."""
    keys: list[str] = []
    if sender.phone:
        keys.append(phone_key(sender.phone))
    if sender.email:
        keys.append(email_key(sender.email))
    if sender.handle:
        key = handle_key(sender.handle)
        if key is not None:
            keys.append(key)
    return tuple(keys)
