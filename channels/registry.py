"""Every decoder by source name, and one entry point that picks the right one.

Transports (MQTT ingress, HTTP webhooks, SMTP, the ``normalize`` CLI) look a source up here; the
keys are exactly ``channels.contact_event.SOURCES``, checked by a test.
"""

from __future__ import annotations

from channels.base import DecodeConfig, Decoder, Headers, Rejected
from channels.chat import decode_chatwoot, decode_messenger, decode_rocketchat, decode_whatsapp
from channels.contact_event import ContactEvent
from channels.email import decode_email
from channels.generic import decode_generic
from channels.phone import decode_asterisk_ari, decode_freeswitch, decode_twilio_voice
from channels.social import decode_discourse, decode_x

SOURCES: dict[str, Decoder] = {
    "asterisk-ari": decode_asterisk_ari,
    "freeswitch": decode_freeswitch,
    "twilio-voice": decode_twilio_voice,
    "email": decode_email,
    "rocketchat": decode_rocketchat,
    "chatwoot": decode_chatwoot,
    "whatsapp": decode_whatsapp,
    "messenger": decode_messenger,
    "discourse": decode_discourse,
    "x": decode_x,
    "generic": decode_generic,
}


def decoder_for(source: str) -> Decoder:
    """The decoder of ``source``, or :class:`Rejected` with reason ``unknown_source``."""
    decoder = SOURCES.get(source)
    if decoder is None:
        known = ", ".join(SOURCES)
        raise Rejected(source, "unknown_source", f"no decoder for {source!r}; known: {known}")
    return decoder


def decode(source: str, body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode ``body`` with the decoder of ``source``; an unknown source is ``unknown_source``."""
    return decoder_for(source)(body, headers, config)
