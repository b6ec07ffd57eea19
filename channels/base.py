"""What every channel adapter shares: the decode signature, its settings and its one error.

A decoder is a pure function ``decode(body, headers, config) -> list[ContactEvent]``: the raw
bytes a source delivered, the transport metadata (HTTP headers, or for MQTT/SMTP whatever the
transport knows, lower-cased names), and the settings. It performs no I/O, reads no clock and
raises nothing but :class:`Rejected` on bad input. One delivery can hold several events
(WhatsApp and Messenger batch them), hence the list; an empty list means "valid, but nothing for
the router" (for example a delivery receipt or an agent's own message).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from channels.contact_event import ContactEvent


class Rejected(Exception):
    """A payload that cannot become a ContactEvent: bad bytes, wrong shape, bad signature.

    ``reason`` is a short machine-friendly slug used as a metric label (``not_json``,
    ``bad_shape``, ``missing_field``, ``bad_signature``, ``unsupported_event``, ...);
    ``detail`` is the human sentence.
    """

    def __init__(self, source: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.reason = reason
        self.detail = detail
        super().__init__(f"{source}: {reason}" + (f": {detail}" if detail else ""))


class DecodeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings for decoders.

    ``secrets`` maps a source name to its signing secret (Twilio auth token, Discourse webhook
    secret, Meta app secret, Rocket.Chat/Chatwoot shared token). Where a source has a secret the
    signature is checked and a missing or wrong one is rejected; where it has none, no check is
    made (useful for replays and the CLI). ``public_urls`` maps a source to the URL the sender
    signed (Twilio signs the full URL it called).
    """

    default_region: str = "DE"
    max_text: int = 4000
    secrets: dict[str, str] = msgspec.field(default_factory=dict)
    public_urls: dict[str, str] = msgspec.field(default_factory=dict)


Headers = Mapping[str, str]
Decoder = Callable[[bytes, Headers, DecodeConfig], list[ContactEvent]]
