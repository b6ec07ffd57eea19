"""Phone channel decoders: Asterisk ARI events, FreeSWITCH events, Twilio Voice webhooks.

Every decoder turns one delivery into at most one :class:`~channels.contact_event.ContactEvent`
about one call. The call is identified by the switch's own id for the channel (ARI ``channel.id``,
FreeSWITCH ``Unique-ID``, Twilio ``CallSid``), so every event of a call lands on the same
``contact_id``. What starts, updates and ends a call:

- asterisk-ari: StasisStart and ChannelCreated start a call (``new``); ChannelStateChange and
  ChannelDtmfReceived update it; StasisEnd, ChannelHangupRequest and ChannelDestroyed end it
  (``end_reason`` ``hangup``).
- freeswitch: CHANNEL_CREATE, CHANNEL_PARK and CHANNEL_DATA (what ``uuid_dump`` reports about a
  live channel) start; CHANNEL_ANSWER updates; CHANNEL_HANGUP and CHANNEL_HANGUP_COMPLETE end
  (``hangup``).
- twilio-voice: ``CallStatus`` ringing or queued starts; in-progress updates; completed ends
  with ``hangup``, busy, failed, no-answer and canceled end with the status as the reason.

A switch reports one call several times (ChannelCreated then StasisStart; StasisEnd, then the
hangup request, then ChannelDestroyed); the router keys on ``contact_id`` and treats repeats as
such. Other ARI and FreeSWITCH event types are valid deliveries with nothing for the router and
decode to ``[]``. A Twilio ``CallStatus`` outside the documented set is rejected
(``unsupported_event``) rather than dropped, so that a new status shows up in the dead letters.

The caller is always the A party as the switch reports it (``caller.number``,
``Caller-Caller-ID-Number``, ``From``), whatever the call's direction; the direction is kept
in ``attributes["direction"]`` (FreeSWITCH, Twilio) so that rules can tell outbound legs apart.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from channels.base import DecodeConfig, Rejected
from channels.common import (
    b64_hmac_sha1,
    bound_text,
    field,
    header,
    load_json_object,
    opt,
    opt_str,
    parse_timestamp,
    to_e164,
)
from channels.contact_event import ContactEvent, Kind, Sender

ARI = "asterisk-ari"
FREESWITCH = "freeswitch"
TWILIO_VOICE = "twilio-voice"

__all__ = ["decode_asterisk_ari", "decode_freeswitch", "decode_twilio_voice"]


def _required_id(value: str | None, source: str, name: str) -> str:
    """An identifier that must be a non-empty string; an empty one cannot key a contact."""
    if value is None or not value.strip():
        raise Rejected(source, "missing_field", f"{name} is missing or empty")
    return value


def _put(attributes: dict[str, str], key: str, value: str | None) -> None:
    if value is not None:
        attributes[key] = value


# --------------------------------------------------------------------------- Asterisk ARI

_ARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

_ARI_KINDS: dict[str, Kind] = {
    "StasisStart": "new",
    "ChannelCreated": "new",
    "ChannelStateChange": "update",
    "ChannelDtmfReceived": "update",
    "StasisEnd": "end",
    "ChannelHangupRequest": "end",
    "ChannelDestroyed": "end",
}


def decode_asterisk_ari(
    body: bytes, headers: Mapping[str, str], config: DecodeConfig
) -> list[ContactEvent]:
    """Decode one ARI websocket event (JSON) about a channel.

    Works with the field sets of every Asterisk since 12 (the early ones have no
    ``asterisk_id`` and no ``channel.language``). ``attributes`` carries ``event`` (the ARI
    type), ``state`` (channel state), ``dtmf`` and ``duration_ms`` for a digit, ``cause`` (the
    Q.850 code) and ``cause_text`` where the event has them, plus ``channel_name``,
    ``context``, ``application``, ``asterisk_id`` and ``args`` (StasisStart arguments, comma
    separated) when present; every StasisStart argument of the form ``key=value`` (as in
    ``Stasis(stellwerk,queue=billing,lang=de)``) is also an attribute of its own, unless the
    key is one of the decoder's. ARI needs no signature: the websocket is authenticated.
    """
    event = load_json_object(body, ARI)
    event_type = field(event, "type", source=ARI)
    kind = _ARI_KINDS.get(event_type)
    if kind is None:
        return []
    channel = field(event, "channel", source=ARI, kind=dict)
    channel_id = _required_id(opt_str(channel, "id"), ARI, "channel.id")

    attributes: dict[str, str] = {"event": event_type}
    _put(attributes, "state", opt_str(channel, "state"))
    _put(attributes, "channel_name", opt_str(channel, "name"))
    _put(attributes, "context", opt_str(channel, "dialplan", "context"))
    _put(attributes, "application", opt_str(event, "application"))
    _put(attributes, "asterisk_id", opt_str(event, "asterisk_id"))
    if event_type == "ChannelDtmfReceived":
        attributes["dtmf"] = field(event, "digit", source=ARI)
        _put(attributes, "duration_ms", opt_str(event, "duration_ms"))
    _put(attributes, "cause", opt_str(event, "cause"))
    _put(attributes, "cause_text", opt_str(event, "cause_txt"))
    args = opt(event, "args")
    if isinstance(args, list) and args:
        attributes["args"] = ",".join(str(arg) for arg in args)
        # Stasis(stellwerk,queue=billing,lang=de): each key=value argument is an attribute
        # the rules can test (attributes.queue == "billing"); the decoder's own keys win.
        for arg in args:
            key, sep, value = str(arg).partition("=")
            key = key.strip()
            if sep and _ARG_KEY.fullmatch(key) and key not in attributes:
                attributes[key] = value.strip()

    timestamp = opt(event, "timestamp")
    return [
        ContactEvent(
            kind=kind,
            contact_id=f"{ARI}:{channel_id}",
            channel="phone",
            source=ARI,
            external_id=channel_id,
            thread_id=channel_id,
            sender=Sender(
                phone=to_e164(opt_str(channel, "caller", "number"), config.default_region),
                name=bound_text(opt_str(channel, "caller", "name"), config.max_text),
            ),
            to=opt_str(channel, "dialplan", "exten"),
            language=opt_str(channel, "language"),
            attributes=attributes,
            occurred_at=0.0 if timestamp is None else parse_timestamp(timestamp, ARI),
            end_reason="hangup" if kind == "end" else None,
        )
    ]


# --------------------------------------------------------------------------- FreeSWITCH

_FREESWITCH_KINDS: dict[str, Kind] = {
    "CHANNEL_CREATE": "new",
    "CHANNEL_PARK": "new",
    "CHANNEL_DATA": "new",
    "CHANNEL_ANSWER": "update",
    "CHANNEL_HANGUP": "end",
    "CHANNEL_HANGUP_COMPLETE": "end",
}

# Channel variables the dialplan sets for Stellwerk: ``stellwerk_<name>`` becomes attribute
# ``<name>`` (an IVR's choice, the language). ``stellwerk`` itself only marks the call as
# Stellwerk's, and ``stellwerk_offer_id`` is what Stellwerk puts on the agent legs it rings.
_FS_VARIABLE_PREFIX = "variable_stellwerk_"
_FS_RESERVED = frozenset({"offer_id"})
_FS_MAX_VARIABLES = 32
_FS_MAX_VALUE = 256

# ESL framing headers: a capture of the raw socket has them in front of the event itself.
_ESL_EVENT_TYPES = ("text/event-plain", "text/event-json")


def decode_freeswitch(
    body: bytes, headers: Mapping[str, str], config: DecodeConfig
) -> list[ContactEvent]:
    """Decode one FreeSWITCH event, in ``event-json`` or ``event-plain`` form.

    The form is told from the bytes: a JSON object is event-json; anything else is
    event-plain (``Key: value`` lines with URL-encoded values, optionally followed by a blank
    line and a body, which is ignored). Either may still carry the ESL framing
    (``Content-Length``/``Content-Type: text/event-...`` and a blank line) in front. Header
    names are matched case-insensitively, since some ESL client libraries canonicalise them
    (``Unique-Id``); the first of repeated headers wins.

    ``attributes`` carries ``event`` (Event-Name), ``direction`` (Call-Direction), ``cause``
    (Hangup-Cause), ``cause_q850`` (variable_hangup_cause_q850), ``answer_state``,
    ``call_state``, ``channel_name``, ``call_uuid`` (Channel-Call-UUID, shared by the legs
    of one bridged call), ``context`` and ``hostname`` where present, plus one attribute per
    channel variable ``stellwerk_<name>`` set in the dialplan (``<name>`` lower-cased, at most
    32 of them, values cut to 256 characters; ``stellwerk_offer_id`` is Stellwerk's own).
    """
    fields = _freeswitch_fields(body)
    event_name = fields.get("event-name")
    if not event_name:
        raise Rejected(FREESWITCH, "missing_field", "Event-Name is missing")
    kind = _FREESWITCH_KINDS.get(event_name)
    if kind is None:
        return []
    unique_id = _required_id(fields.get("unique-id"), FREESWITCH, "Unique-ID")

    attributes: dict[str, str] = {"event": event_name}
    for key, name in (
        ("direction", "call-direction"),
        ("cause", "hangup-cause"),
        ("cause_q850", "variable_hangup_cause_q850"),
        ("answer_state", "answer-state"),
        ("call_state", "channel-call-state"),
        ("channel_name", "channel-name"),
        ("call_uuid", "channel-call-uuid"),
        ("context", "caller-context"),
        ("hostname", "freeswitch-hostname"),
    ):
        _put(attributes, key, fields.get(name) or None)
    extra = 0
    for name, value in fields.items():
        if not name.startswith(_FS_VARIABLE_PREFIX) or extra >= _FS_MAX_VARIABLES:
            continue
        key = name[len(_FS_VARIABLE_PREFIX) :]
        if key and key not in _FS_RESERVED and key not in attributes:
            attributes[key] = value[:_FS_MAX_VALUE]
            extra += 1

    caller = (
        fields.get("caller-caller-id-number")
        or fields.get("caller-ani")
        or fields.get("caller-username")
    )
    return [
        ContactEvent(
            kind=kind,
            contact_id=f"{FREESWITCH}:{unique_id}",
            channel="phone",
            source=FREESWITCH,
            external_id=unique_id,
            thread_id=unique_id,
            sender=Sender(
                phone=to_e164(caller, config.default_region),
                name=bound_text(fields.get("caller-caller-id-name"), config.max_text),
            ),
            to=fields.get("caller-destination-number") or None,
            language=fields.get("variable_default_language") or None,
            attributes=attributes,
            occurred_at=_freeswitch_time(fields),
            end_reason="hangup" if kind == "end" else None,
        )
    ]


def _freeswitch_time(fields: Mapping[str, str]) -> float:
    # Event-Date-Timestamp is microseconds since the epoch; parse_timestamp tells the unit
    # from the magnitude. Event-Date-GMT (RFC 2822) is the coarser fallback.
    for name in ("event-date-timestamp", "event-date-gmt"):
        value = fields.get(name)
        if value:
            return parse_timestamp(value, FREESWITCH)
    return 0.0


def _freeswitch_fields(body: bytes) -> dict[str, str]:
    """The event's headers, keyed by lower-cased name, values decoded."""
    stripped = body.lstrip()
    if not stripped:
        raise Rejected(FREESWITCH, "bad_shape", "empty body")
    if stripped.startswith(b"{"):
        return _json_fields(stripped)
    fields, rest = _plain_fields(stripped)
    if "event-name" not in fields and fields.get("content-type") in _ESL_EVENT_TYPES:
        inner = rest.lstrip()
        if not inner:
            raise Rejected(FREESWITCH, "bad_shape", "ESL frame without an event")
        if fields["content-type"] == "text/event-json":
            return _json_fields(inner)
        fields, _ = _plain_fields(inner)
    return fields


def _json_fields(body: bytes) -> dict[str, str]:
    event = load_json_object(body, FREESWITCH)
    fields: dict[str, str] = {}
    # One pass with inline type tests (an event has ~40 keys; this loop is the decoder's hot
    # spot). Same rules as opt_str: non-empty strings, numbers as text, nothing else.
    for key, value in event.items():
        if isinstance(value, str):
            if not value:
                continue
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        else:
            continue
        fields.setdefault(key.lower(), value)
    return fields


def _plain_fields(body: bytes) -> tuple[dict[str, str], bytes]:
    """Parse ``Key: value`` lines up to the first blank line; return them and what follows.

    Hand-written on purpose: ESL headers are not RFC 5322 (no folding, URL-encoded values),
    so the ``email`` parser would accept garbage silently and decode nothing.
    """
    normalised = body.replace(b"\r\n", b"\n")
    head, _, rest = normalised.partition(b"\n\n")
    try:
        text = head.rstrip().decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(FREESWITCH, "bad_shape", "event-plain headers are not UTF-8") from None
    fields: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise Rejected(FREESWITCH, "bad_shape", f"line {number} is not 'Key: value'")
        fields.setdefault(name.strip().lower(), unquote(value.strip()))
    return fields, rest


# --------------------------------------------------------------------------- Twilio Voice

_TWILIO_STATUS: dict[str, tuple[Kind, str | None]] = {
    "queued": ("new", None),
    "ringing": ("new", None),
    "in-progress": ("update", None),
    "completed": ("end", "hangup"),
    "busy": ("end", "busy"),
    "failed": ("end", "failed"),
    "no-answer": ("end", "no-answer"),
    "canceled": ("end", "canceled"),
}

# Far above the ~40 parameters Twilio sends; bounds the work a hostile body can cause.
_TWILIO_MAX_FIELDS = 1000


def decode_twilio_voice(
    body: bytes, headers: Mapping[str, str], config: DecodeConfig
) -> list[ContactEvent]:
    """Decode a Twilio Voice webhook (voice URL or status callback, form-encoded).

    Where ``config.secrets["twilio-voice"]`` (the auth token) is set, ``X-Twilio-Signature``
    is verified as Twilio's own ``RequestValidator`` does it, against
    ``config.public_urls["twilio-voice"]`` (the URL configured at Twilio, query included).
    Twilio's voice webhook has no timestamp: ``occurred_at`` is 0.0 (the daemon stamps the
    receive time) unless the status callback's ``Timestamp`` is present.

    ``attributes`` carries ``call_status``, ``direction``, ``account_sid`` and, where
    present, ``dtmf`` (Digits from a Gather), ``duration`` (CallDuration), ``answered_by``,
    ``forwarded_from``, ``parent_call_sid`` and ``from_country``.
    """
    pairs = _twilio_params(body)
    secret = config.secrets.get(TWILIO_VOICE)
    if secret:
        _check_twilio_signature(
            config.public_urls.get(TWILIO_VOICE),
            pairs,
            secret,
            header(headers, "X-Twilio-Signature"),
        )
    params: dict[str, str] = {}
    for name, value in pairs:
        params.setdefault(name, value)

    call_sid = _required_id(params.get("CallSid"), TWILIO_VOICE, "CallSid")
    status = _required_id(params.get("CallStatus"), TWILIO_VOICE, "CallStatus").lower()
    if status not in _TWILIO_STATUS:
        raise Rejected(TWILIO_VOICE, "unsupported_event", f"unknown CallStatus {status!r}")
    kind, end_reason = _TWILIO_STATUS[status]

    attributes: dict[str, str] = {"call_status": status}
    for key, name in (
        ("direction", "Direction"),
        ("account_sid", "AccountSid"),
        ("dtmf", "Digits"),
        ("duration", "CallDuration"),
        ("answered_by", "AnsweredBy"),
        ("forwarded_from", "ForwardedFrom"),
        ("parent_call_sid", "ParentCallSid"),
        ("from_country", "FromCountry"),
    ):
        _put(attributes, key, params.get(name) or None)

    timestamp = params.get("Timestamp")
    return [
        ContactEvent(
            kind=kind,
            contact_id=f"{TWILIO_VOICE}:{call_sid}",
            channel="phone",
            source=TWILIO_VOICE,
            external_id=call_sid,
            thread_id=call_sid,
            sender=Sender(
                phone=to_e164(params.get("From"), config.default_region),
                name=bound_text(params.get("CallerName"), config.max_text),
            ),
            to=params.get("To") or None,
            attributes=attributes,
            occurred_at=parse_timestamp(timestamp, TWILIO_VOICE) if timestamp else 0.0,
            end_reason=end_reason,
        )
    ]


def _twilio_params(body: bytes) -> list[tuple[str, str]]:
    # Raw whitespace never occurs inside form data (spaces are '+', newlines '%0A'), so a
    # trailing newline added by a file or a proxy is framing and may go.
    try:
        text = body.strip().decode("utf-8")
        return parse_qsl(
            text, keep_blank_values=True, errors="strict", max_num_fields=_TWILIO_MAX_FIELDS
        )
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise Rejected(TWILIO_VOICE, "bad_shape", f"not a form body: {exc}") from None


def twilio_signature(url: str, pairs: list[tuple[str, str]], auth_token: str) -> str:
    """The X-Twilio-Signature Twilio computes for a form POST to ``url``.

    The URL followed by every parameter name and value, names sorted and, for a repeated
    name, its values sorted, all concatenated without separators; HMAC-SHA1 with the auth
    token; base64.
    """
    grouped: dict[str, list[str]] = {}
    for name, value in pairs:
        grouped.setdefault(name, []).append(value)
    signed = url + "".join(
        name + value for name in sorted(grouped) for value in sorted(grouped[name])
    )
    return b64_hmac_sha1(auth_token, signed)


def _url_variants(url: str) -> list[str]:
    """The URL as configured, without and with its default port.

    Twilio's validator accepts either, because Twilio signs sometimes one, sometimes the other.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return [url]
    host = parts.netloc.rsplit(":", 1)[0] if port else parts.netloc
    default = 443 if parts.scheme == "https" else 80
    without_port = parts._replace(netloc=host).geturl()
    with_port = parts._replace(netloc=f"{host}:{port or default}").geturl()
    return [url, without_port, with_port]


def _check_twilio_signature(
    url: str | None, pairs: list[tuple[str, str]], auth_token: str, given: str | None
) -> None:
    if not url:
        raise Rejected(
            TWILIO_VOICE, "bad_signature", "no public URL configured for twilio-voice to verify"
        )
    if not given:
        raise Rejected(TWILIO_VOICE, "bad_signature", "X-Twilio-Signature header missing")
    wanted = given.strip().encode()
    # Compare every variant (no short-circuit) so the timing says nothing about which failed.
    matches = [
        hmac.compare_digest(twilio_signature(variant, pairs, auth_token).encode(), wanted)
        for variant in _url_variants(url)
    ]
    if not any(matches):
        raise Rejected(TWILIO_VOICE, "bad_signature", "X-Twilio-Signature does not match")
