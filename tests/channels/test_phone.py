"""Phone decoders against real payloads: Asterisk ARI, FreeSWITCH (plain and JSON), Twilio Voice.

Fixtures: ``tests/fixtures/samples/phone`` (the shared real samples) and ``tests/fixtures/phone``
(more real captures, plus two payloads constructed from the vendor documentation where no real
sample exists: ``freeswitch-channel-answer.json`` and ``twilio-voice-completed.form``; see the
README there).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.base import DecodeConfig, Decoder, Rejected
from channels.contact_event import CONTACT_EVENT_DECODER, JSON_ENCODER, ContactEvent, Sender
from channels.phone import (
    decode_asterisk_ari,
    decode_freeswitch,
    decode_twilio_voice,
    twilio_signature,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLES = FIXTURES / "samples" / "phone"
EXTRA = FIXTURES / "phone"
CONFIG = DecodeConfig()


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def extra(name: str) -> bytes:
    return (EXTRA / name).read_bytes()


def epoch(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> float:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC).timestamp()


def only(events: list[ContactEvent]) -> ContactEvent:
    assert len(events) == 1
    return events[0]


def assert_event(actual: ContactEvent, expected: ContactEvent) -> None:
    """Field-by-field equality; ``occurred_at`` to the microsecond (it passes through floats)."""
    assert actual.occurred_at == pytest.approx(expected.occurred_at, abs=1e-6)
    assert msgspec.structs.replace(actual, occurred_at=0.0) == msgspec.structs.replace(
        expected, occurred_at=0.0
    )


def rejected(decoder: Decoder, body: bytes, config: DecodeConfig = CONFIG, **headers: str) -> str:
    with pytest.raises(Rejected) as info:
        decoder(body, headers, config)
    return info.value.reason


# --------------------------------------------------------------------------- Asterisk ARI


def test_ari_stasis_start_asterisk_12_opens_the_call() -> None:
    # Asterisk 12 era: no asterisk_id, no channel.language, empty caller id, -0500 offset.
    assert_event(
        only(decode_asterisk_ari(sample("asterisk-ari-stasis-start.json"), {}, CONFIG)),
        ContactEvent(
            kind="new",
            contact_id="asterisk-ari:1400609726.3",
            channel="phone",
            source="asterisk-ari",
            external_id="1400609726.3",
            thread_id="1400609726.3",
            sender=Sender(),
            to="1000",
            language=None,
            attributes={
                "event": "StasisStart",
                "state": "Up",
                "channel_name": "PJSIP/1000-00000001",
                "context": "default",
                "application": "hello-world",
            },
            occurred_at=epoch(2014, 5, 20, 18, 15, 27, 131000),
        ),
    )


def test_ari_stasis_end_ends_the_same_call_with_hangup() -> None:
    event = only(decode_asterisk_ari(sample("asterisk-ari-stasis-end.json"), {}, CONFIG))
    assert_event(
        event,
        ContactEvent(
            kind="end",
            contact_id="asterisk-ari:1400609726.3",
            channel="phone",
            source="asterisk-ari",
            external_id="1400609726.3",
            thread_id="1400609726.3",
            to="1000",
            attributes={
                "event": "StasisEnd",
                "state": "Up",
                "channel_name": "PJSIP/1000-00000001",
                "context": "default",
                "application": "hello-world",
            },
            occurred_at=epoch(2014, 5, 20, 18, 30, 1, 852000),
            end_reason="hangup",
        ),
    )


def test_ari_dtmf_updates_the_call_with_the_digit() -> None:
    assert_event(
        only(decode_asterisk_ari(sample("asterisk-ari-dtmf.json"), {}, CONFIG)),
        ContactEvent(
            kind="update",
            contact_id="asterisk-ari:1589956827.6285",
            channel="phone",
            source="asterisk-ari",
            external_id="1589956827.6285",
            thread_id="1589956827.6285",
            # "pchero" is a SIP user name, not a number: kept exactly as given.
            sender=Sender(phone="pchero", name="tttt"),
            to="9912321321",
            language="en",
            attributes={
                "event": "ChannelDtmfReceived",
                "state": "Up",
                "channel_name": "PJSIP/call-in-00000633",
                "context": "call-in",
                "application": "voipbin",
                "asterisk_id": "42:01:0a:a4:00:05",
                "dtmf": "9",
                "duration_ms": "100",
            },
            occurred_at=epoch(2020, 5, 20, 6, 40, 45, 663000),
        ),
    )


def test_ari_hangup_request_ends_the_call_and_keeps_the_q850_cause() -> None:
    assert_event(
        only(decode_asterisk_ari(sample("asterisk-ari-hangup-request.json"), {}, CONFIG)),
        ContactEvent(
            kind="end",
            contact_id="asterisk-ari:1586480923.6171",
            channel="phone",
            source="asterisk-ari",
            external_id="1586480923.6171",
            thread_id="1586480923.6171",
            sender=Sender(phone="3400001"),
            to="011441332323027",
            language="en",
            attributes={
                "event": "ChannelHangupRequest",
                "state": "Up",
                "channel_name": "PJSIP/in-voipbin-00000c0f",
                "context": "in-voipbin",
                "application": "voipbin",
                "asterisk_id": "42:01:0a:a4:00:03",
                "cause": "18",
            },
            occurred_at=epoch(2020, 4, 10, 1, 9, 47, 437000),
            end_reason="hangup",
        ),
    )


def test_ari_channel_destroyed_keeps_cause_and_its_text() -> None:
    event = only(decode_asterisk_ari(extra("asterisk-ari-channel-destroyed.json"), {}, CONFIG))
    assert (event.kind, event.end_reason) == ("end", "hangup")
    assert event.contact_id == "asterisk-ari:1586480922.6170"
    assert event.attributes["cause"] == "18"
    assert event.attributes["cause_text"] == "No user responding"
    assert event.occurred_at == epoch(2020, 4, 10, 1, 9, 46, 681000)


def test_ari_channel_created_opens_the_call() -> None:
    event = only(decode_asterisk_ari(extra("asterisk-ari-channel-created.json"), {}, CONFIG))
    assert (event.kind, event.contact_id) == ("new", "asterisk-ari:1587708468.7504")
    assert event.attributes["state"] == "Ring"
    assert event.to == "701146842002329"
    # A one-digit caller id is no phone number: kept as given.
    assert event.sender.phone == "5"


def test_ari_state_change_updates_the_call_with_its_new_state() -> None:
    event = only(decode_asterisk_ari(extra("asterisk-ari-channel-state-change.json"), {}, CONFIG))
    assert (event.kind, event.contact_id) == ("update", "asterisk-ari:1473681228.6")
    assert event.attributes["state"] == "Up"
    assert event.sender == Sender(phone="1001", name="1001")
    assert event.occurred_at == epoch(2016, 9, 12, 11, 53, 52, 110000)  # +0200 offset


def test_ari_stasis_start_keeps_application_args() -> None:
    event = only(decode_asterisk_ari(extra("asterisk-ari-stasis-start-args.json"), {}, CONFIG))
    assert event.kind == "new"
    assert event.attributes["args"] == (
        "cgr_reqtype=*prepaid,cgr_destination=1003,extra1=val1,extra2=val2"
    )
    # key=value arguments are attributes the rules can test
    assert event.attributes["cgr_reqtype"] == "*prepaid"
    assert event.attributes["extra2"] == "val2"


def test_ari_stasis_args_never_override_the_decoders_own_attributes() -> None:
    event = json.loads(extra("asterisk-ari-stasis-start-args.json"))
    event["args"] = ["queue=billing", "lang = de", "event=forged", "state=Up", "plain", "=x"]
    decoded = only(decode_asterisk_ari(json.dumps(event).encode(), {}, CONFIG))
    assert decoded.attributes["queue"] == "billing"
    assert decoded.attributes["lang"] == "de"
    assert decoded.attributes["event"] == "StasisStart"
    assert decoded.attributes["state"] == "Ring"
    assert "plain" not in decoded.attributes and "" not in decoded.attributes


def test_one_call_keeps_one_contact_id_from_start_to_end() -> None:
    ids = {
        only(decode_asterisk_ari(extra(name), {}, CONFIG)).contact_id
        for name in (
            "asterisk-ari-stasis-start-args.json",
            "asterisk-ari-channel-state-change.json",
        )
    }
    ids |= {
        only(decode_asterisk_ari(sample(name), {}, CONFIG)).contact_id
        for name in ("asterisk-ari-stasis-start.json", "asterisk-ari-stasis-end.json")
    }
    assert ids == {"asterisk-ari:1473681228.6", "asterisk-ari:1400609726.3"}


def _ari_with(**changes: Any) -> bytes:
    event = json.loads(sample("asterisk-ari-dtmf.json"))
    for key, value in changes.items():
        if key.startswith("caller_"):
            event["channel"]["caller"][key.removeprefix("caller_")] = value
        elif value is None:
            del event[key]
        else:
            event[key] = value
    return json.dumps(event).encode()


@pytest.mark.parametrize(
    "event_type",
    ["ChannelVarset", "BridgeCreated", "ChannelEnteredBridge", "PlaybackFinished", "Dial"],
)
def test_ari_events_that_say_nothing_about_the_call_are_ignored_not_rejected(
    event_type: str,
) -> None:
    assert decode_asterisk_ari(_ari_with(type=event_type), {}, CONFIG) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not_json"),
        (b"StasisStart", "not_json"),
        (b"[1, 2]", "bad_shape"),
        (b'{"channel": {"id": "1"}}', "missing_field"),
        (b'{"type": "StasisStart", "timestamp": "2020-05-20T06:40:45.663+0000"}', "missing_field"),
        (b'{"type": "StasisStart", "channel": {"id": ""}}', "missing_field"),
        (b'{"type": "ChannelDtmfReceived", "channel": {"id": "1.2"}}', "missing_field"),
    ],
)
def test_ari_bad_payloads_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    assert rejected(decode_asterisk_ari, body) == reason


def test_ari_unparseable_timestamp_is_rejected() -> None:
    assert rejected(decode_asterisk_ari, _ari_with(timestamp="yesterday")) == "bad_timestamp"


def test_ari_event_without_timestamp_leaves_stamping_to_the_daemon() -> None:
    assert only(decode_asterisk_ari(_ari_with(timestamp=None), {}, CONFIG)).occurred_at == 0.0


@pytest.mark.parametrize(
    ("number", "region", "phone"),
    [
        ("02473001403", "DE", "+492473001403"),  # national German number
        ("044 668 18 00", "CH", "+41446681800"),  # a Zürich number, region CH
        ("+1 530 666 6666", "DE", "+15306666666"),
        ("0049 2473 001403", "DE", "+492473001403"),
        ("pchero", "DE", "pchero"),
        ("<unknown>", "DE", "<unknown>"),
        ("1001", "DE", "1001"),  # an internal extension, not +491001
        ("3400001", "DE", "3400001"),  # no trunk prefix, too short to be a national number
        ("030 1234567", "DE", "+49301234567"),
        ("", "DE", None),
        ("   ", "DE", None),
    ],
)
def test_caller_numbers_become_e164_where_they_parse(
    number: str, region: str, phone: str | None
) -> None:
    config = DecodeConfig(default_region=region)
    event = only(decode_asterisk_ari(_ari_with(caller_number=number), {}, config))
    assert event.sender.phone == phone


def test_caller_names_are_nfc_and_bounded() -> None:
    decomposed = unicodedata.normalize("NFD", "Jürgen Müller-Lüdenscheidt")
    config = DecodeConfig(max_text=13)
    event = only(decode_asterisk_ari(_ari_with(caller_name=decomposed), {}, config))
    assert event.sender.name == "Jürgen Müller"


# --------------------------------------------------------------------------- FreeSWITCH


def test_freeswitch_event_json_channel_create_opens_the_call() -> None:
    assert_event(
        only(decode_freeswitch(sample("freeswitch-channel-create.json"), {}, CONFIG)),
        ContactEvent(
            kind="new",
            contact_id="freeswitch:c37517e6-7fe3-42f7-8560-03df6cca0306",
            channel="phone",
            source="freeswitch",
            external_id="c37517e6-7fe3-42f7-8560-03df6cca0306",
            thread_id="c37517e6-7fe3-42f7-8560-03df6cca0306",
            sender=Sender(phone="+492473001403", name="02473001403"),
            to="1002",
            attributes={
                "event": "CHANNEL_CREATE",
                "direction": "outbound",
                "answer_state": "ringing",
                "call_state": "DOWN",
                "channel_name": "sofia/kamailio/1002",
                "call_uuid": "77645a4f-e691-4126-9842-54e7934d0180",
                "context": "MyKamailio-Inbound",
                "hostname": "datct",
            },
            occurred_at=1735558457.366461,  # Event-Date-Timestamp is in microseconds
        ),
    )


def test_freeswitch_event_plain_channel_create_is_url_decoded() -> None:
    assert_event(
        only(decode_freeswitch(sample("freeswitch-channel-create.txt"), {}, CONFIG)),
        ContactEvent(
            kind="new",
            contact_id="freeswitch:89aaa4da-8a14-11de-9ab6-91a5c9f91e77",
            channel="phone",
            source="freeswitch",
            external_id="89aaa4da-8a14-11de-9ab6-91a5c9f91e77",
            thread_id="89aaa4da-8a14-11de-9ab6-91a5c9f91e77",
            sender=Sender(),  # the documented example carries no caller profile
            attributes={
                "event": "CHANNEL_CREATE",
                "direction": "inbound",
                "answer_state": "ringing",
                "channel_name": "sofia/internal/1000@192.168.1.100",  # %40 decoded
                "hostname": "jmesquita-dell",
            },
            occurred_at=epoch(2009, 8, 16, 3, 26, 8, 131798),
        ),
    )


def test_freeswitch_hangup_complete_ends_the_call_with_its_cause() -> None:
    assert_event(
        only(decode_freeswitch(extra("freeswitch-channel-hangup-complete.txt"), {}, CONFIG)),
        ContactEvent(
            kind="end",
            contact_id="freeswitch:e3133bf7-dcde-4daf-9663-9a79ffcef5ad",
            channel="phone",
            source="freeswitch",
            external_id="e3133bf7-dcde-4daf-9663-9a79ffcef5ad",
            thread_id="e3133bf7-dcde-4daf-9663-9a79ffcef5ad",
            sender=Sender(phone="1001", name="1001"),
            to="1003",
            attributes={
                "event": "CHANNEL_HANGUP_COMPLETE",
                "direction": "inbound",
                "cause": "NORMAL_CLEARING",
                "cause_q850": "16",
                "answer_state": "hangup",
                "call_state": "HANGUP",
                "channel_name": "sofia/cgrtest/1001@127.0.0.1",
                "call_uuid": "e3133bf7-dcde-4daf-9663-9a79ffcef5ad",
                "context": "default",
                "hostname": "CgrDev1",
            },
            occurred_at=1436280794.030635,
            end_reason="hangup",
        ),
    )


def test_freeswitch_answer_updates_the_call_created_before() -> None:
    created = only(decode_freeswitch(sample("freeswitch-channel-create.json"), {}, CONFIG))
    answered = only(decode_freeswitch(extra("freeswitch-channel-answer.json"), {}, CONFIG))
    assert answered.kind == "update"
    assert answered.contact_id == created.contact_id
    assert answered.attributes["answer_state"] == "answered"
    assert answered.language == "de"
    assert answered.occurred_at > created.occurred_at


@pytest.mark.parametrize(
    ("event_name", "kind"),
    [
        ("CHANNEL_CREATE", "new"),
        ("CHANNEL_PARK", "new"),
        ("CHANNEL_DATA", "new"),
        ("CHANNEL_ANSWER", "update"),
        ("CHANNEL_HANGUP", "end"),
        ("CHANNEL_HANGUP_COMPLETE", "end"),
    ],
)
def test_freeswitch_event_names_map_to_kinds(event_name: str, kind: str) -> None:
    event = json.loads(sample("freeswitch-channel-create.json"))
    event["Event-Name"] = event_name
    decoded = only(decode_freeswitch(json.dumps(event).encode(), {}, CONFIG))
    assert decoded.kind == kind
    assert decoded.end_reason == ("hangup" if kind == "end" else None)


@pytest.mark.parametrize(
    "event_name", ["HEARTBEAT", "RE_SCHEDULE", "CHANNEL_EXECUTE", "DTMF", "CUSTOM"]
)
def test_freeswitch_other_events_are_ignored_not_rejected(event_name: str) -> None:
    body = sample("freeswitch-channel-create.txt").replace(b"CHANNEL_CREATE", event_name.encode())
    assert decode_freeswitch(body, {}, CONFIG) == []


def test_freeswitch_dialplan_variables_for_stellwerk_become_attributes() -> None:
    event = json.loads(sample("freeswitch-channel-create.json"))
    event["variable_stellwerk"] = "true"
    event["variable_stellwerk_queue"] = "billing"
    event["variable_stellwerk_lang"] = "de"
    event["variable_stellwerk_offer_id"] = "o-1"
    event["variable_stellwerk_event"] = "spoofed"  # cannot override the decoder's own keys
    event["variable_stellwerk_note"] = "x" * 1000
    attributes = only(decode_freeswitch(json.dumps(event).encode(), {}, CONFIG)).attributes
    assert attributes["queue"] == "billing" and attributes["lang"] == "de"
    assert attributes["event"] == "CHANNEL_CREATE"
    assert len(attributes["note"]) == 256
    assert "offer_id" not in attributes and "stellwerk" not in attributes
    many = {f"variable_stellwerk_v{i}": str(i) for i in range(100)}
    decoded = only(decode_freeswitch(json.dumps({**event, **many}).encode(), {}, CONFIG))
    assert sum(k.startswith("v") for k in decoded.attributes) <= 32


def test_freeswitch_caller_falls_back_to_ani_then_username() -> None:
    event = json.loads(sample("freeswitch-channel-create.json"))
    event["Caller-Caller-ID-Number"] = ""
    event["Caller-ANI"] = "+49 30 1234567"
    assert only(decode_freeswitch(json.dumps(event).encode(), {}, CONFIG)).sender.phone == (
        "+49301234567"
    )
    del event["Caller-ANI"]
    event["Caller-Username"] = "alice"
    assert only(decode_freeswitch(json.dumps(event).encode(), {}, CONFIG)).sender.phone == "alice"


def test_freeswitch_event_plain_with_esl_framing_crlf_and_a_body() -> None:
    event = extra("freeswitch-channel-hangup-complete.txt") + b"\n\nsome body text"
    framed = (
        b"Content-Length: " + str(len(event)).encode() + b"\n"
        b"Content-Type: text/event-plain\n\n" + event
    ).replace(b"\n", b"\r\n")
    expected = only(decode_freeswitch(extra("freeswitch-channel-hangup-complete.txt"), {}, CONFIG))
    assert only(decode_freeswitch(framed, {}, CONFIG)) == expected


def test_freeswitch_event_json_with_esl_framing() -> None:
    event = sample("freeswitch-channel-create.json")
    framed = b"Content-Length: %d\nContent-Type: text/event-json\n\n%s" % (len(event), event)
    expected = only(decode_freeswitch(event, {}, CONFIG))
    assert only(decode_freeswitch(framed, {}, CONFIG)) == expected


def test_freeswitch_header_names_are_case_insensitive() -> None:
    # Go ESL clients canonicalise MIME headers: "Unique-Id", "Caller-Caller-Id-Number".
    body = (
        b"Event-Name: CHANNEL_HANGUP\nUnique-Id: abc-123\n"
        b"Caller-Caller-Id-Number: 0221%20123456\nHangup-Cause: USER_BUSY\n"
    )
    event = only(decode_freeswitch(body, {}, CONFIG))
    assert event.contact_id == "freeswitch:abc-123"
    assert event.sender.phone == "+49221123456"
    assert event.attributes["cause"] == "USER_BUSY"
    assert event.occurred_at == 0.0  # no Event-Date-* at all: the daemon stamps it


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "bad_shape"),
        (b"  \n ", "bad_shape"),
        (b"{not json", "not_json"),
        (b'{"Unique-ID": "x"}', "missing_field"),
        (b'{"Event-Name": "CHANNEL_CREATE"}', "missing_field"),
        (b"Event-Name: CHANNEL_CREATE\nUnique-ID: \n", "missing_field"),
        (b"Event-Name: CHANNEL_CREATE\nthis line has no colon\n", "bad_shape"),
        (b"Event-Name: CHANNEL_CREATE\nUnique-ID: \xff\xfe\n", "bad_shape"),
        (b"Content-Type: text/event-plain\nContent-Length: 0\n\n", "bad_shape"),
        (
            b"Event-Name: CHANNEL_CREATE\nUnique-ID: u1\nEvent-Date-Timestamp: soon\n",
            "bad_timestamp",
        ),
    ],
)
def test_freeswitch_bad_payloads_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    assert rejected(decode_freeswitch, body) == reason


# --------------------------------------------------------------------------- Twilio Voice

SIGNATURE = json.loads(sample("twilio-voice-incoming.signature.json"))
SIGNED = DecodeConfig(
    secrets={"twilio-voice": SIGNATURE["auth_token"]},
    public_urls={"twilio-voice": SIGNATURE["url"]},
)


def test_twilio_incoming_call_opens_the_call() -> None:
    assert_event(
        only(decode_twilio_voice(sample("twilio-voice-incoming.form"), {}, CONFIG)),
        ContactEvent(
            kind="new",
            contact_id="twilio-voice:CAd800bb12c0426a7ea4230e492fef2a4f",
            channel="phone",
            source="twilio-voice",
            external_id="CAd800bb12c0426a7ea4230e492fef2a4f",
            thread_id="CAd800bb12c0426a7ea4230e492fef2a4f",
            sender=Sender(phone="+15306666666", name="CA Wireless Call"),
            to="+15306384866",
            attributes={
                "call_status": "ringing",
                "direction": "inbound",
                "account_sid": "AC9a9f9392lad99kla0sklakjs90j092j3",
                "from_country": "US",
            },
            occurred_at=0.0,  # the voice webhook has no timestamp
        ),
    )


def test_twilio_signature_from_twilios_own_test_validates() -> None:
    headers = {"X-Twilio-Signature": SIGNATURE["x_twilio_signature"]}
    event = only(decode_twilio_voice(sample("twilio-voice-incoming.form"), headers, SIGNED))
    assert event.contact_id == "twilio-voice:CAd800bb12c0426a7ea4230e492fef2a4f"


def test_twilio_signature_header_name_is_case_insensitive() -> None:
    headers = {"x-twilio-signature": SIGNATURE["x_twilio_signature"]}
    assert decode_twilio_voice(sample("twilio-voice-incoming.form"), headers, SIGNED)


def test_twilio_signature_validates_with_the_default_port_in_the_configured_url() -> None:
    # Twilio's RequestValidator accepts the URL with and without its port; so do we.
    config = msgspec.structs.replace(
        SIGNED, public_urls={"twilio-voice": "http://www.postbin.org:80/1ed898x"}
    )
    headers = {"X-Twilio-Signature": SIGNATURE["x_twilio_signature"]}
    assert decode_twilio_voice(sample("twilio-voice-incoming.form"), headers, config)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize("index", [0, 7, 27])
def test_twilio_flipped_signature_byte_is_rejected(index: int) -> None:
    flipped = _flip(SIGNATURE["x_twilio_signature"].encode(), index).decode()
    headers = {"X-Twilio-Signature": flipped}
    body = sample("twilio-voice-incoming.form")
    assert rejected(decode_twilio_voice, body, SIGNED, **headers) == "bad_signature"


def test_twilio_tampered_body_is_rejected() -> None:
    body = sample("twilio-voice-incoming.form").replace(b"From=%2B1530", b"From=%2B1531")
    headers = {"X-Twilio-Signature": SIGNATURE["x_twilio_signature"]}
    assert rejected(decode_twilio_voice, body, SIGNED, **headers) == "bad_signature"


def test_twilio_signature_for_another_url_is_rejected() -> None:
    config = msgspec.structs.replace(
        SIGNED, public_urls={"twilio-voice": "https://www.postbin.org/1ed898x"}
    )
    headers = {"X-Twilio-Signature": SIGNATURE["x_twilio_signature"]}
    body = sample("twilio-voice-incoming.form")
    assert rejected(decode_twilio_voice, body, config, **headers) == "bad_signature"


def test_twilio_missing_signature_or_url_is_rejected_when_a_token_is_configured() -> None:
    body = sample("twilio-voice-incoming.form")
    assert rejected(decode_twilio_voice, body, SIGNED) == "bad_signature"
    no_url = DecodeConfig(secrets=SIGNED.secrets)
    headers = {"X-Twilio-Signature": SIGNATURE["x_twilio_signature"]}
    assert rejected(decode_twilio_voice, body, no_url, **headers) == "bad_signature"


def test_twilio_without_a_token_no_signature_is_checked() -> None:
    body = sample("twilio-voice-incoming.form").replace(b"From=%2B1530", b"From=%2B1531")
    assert only(decode_twilio_voice(body, {}, CONFIG)).sender.phone == "+15316666666"


def test_twilio_repeated_parameters_are_signed_with_sorted_values() -> None:
    # RequestValidator.compute_signature: names sorted, then each name's values sorted.
    url = "https://example.com/voice?x=1"
    expected = base64.b64encode(
        hmac.new(b"token", (url + "Digits1Digits2From+49").encode(), hashlib.sha1).digest()
    ).decode()
    pairs = [("From", "+49"), ("Digits", "2"), ("Digits", "1")]
    assert twilio_signature(url, pairs, "token") == expected


def _twilio_form(**params: str) -> bytes:
    return urlencode({"CallSid": "CA1", "From": "+1 530 666 6666", **params}).encode()


@pytest.mark.parametrize(
    ("status", "kind", "end_reason"),
    [
        ("queued", "new", None),
        ("ringing", "new", None),
        ("in-progress", "update", None),
        ("completed", "end", "hangup"),
        ("busy", "end", "busy"),
        ("failed", "end", "failed"),
        ("no-answer", "end", "no-answer"),
        ("canceled", "end", "canceled"),
    ],
)
def test_twilio_call_status_maps_to_kind_and_end_reason(
    status: str, kind: str, end_reason: str | None
) -> None:
    event = only(decode_twilio_voice(_twilio_form(CallStatus=status), {}, CONFIG))
    assert (event.kind, event.end_reason) == (kind, end_reason)
    assert event.sender.phone == "+15306666666"  # "+1 530 666 6666" normalised


def test_twilio_status_callback_completed_has_timestamp_and_duration() -> None:
    event = only(decode_twilio_voice(extra("twilio-voice-completed.form"), {}, CONFIG))
    assert (event.kind, event.end_reason) == ("end", "hangup")
    assert event.contact_id == "twilio-voice:CAd800bb12c0426a7ea4230e492fef2a4f"
    assert event.occurred_at == epoch(2021, 6, 8, 22, 46, 59)
    assert event.attributes["duration"] == "42"
    assert event.sender.name is None  # no CallerName in a status callback


def test_twilio_gather_digits_become_dtmf() -> None:
    event = only(
        decode_twilio_voice(_twilio_form(CallStatus="in-progress", Digits="42#"), {}, CONFIG)
    )
    assert event.attributes["dtmf"] == "42#"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "missing_field"),
        (b"CallStatus=ringing", "missing_field"),
        (b"CallSid=CA1", "missing_field"),
        (b"CallSid=&CallStatus=ringing", "missing_field"),
        (b"CallSid=CA1&CallStatus=teleported", "unsupported_event"),
        (b"CallSid=CA1&CallStatus=ringing&From=%FF", "bad_shape"),
        (b"CallSid=CA1&CallStatus=ringing\xff", "bad_shape"),
        (b"CallSid=CA1&CallStatus=ringing&Timestamp=later", "bad_timestamp"),
        # Found by fuzzing: an RFC 2822 date whose seconds overflow used to escape as
        # OverflowError, and an infinite epoch used to loop forever.
        (
            b"CallSid=CA1&CallStatus=ringing&Timestamp=Tue%2C+08+Jun+2021+22%3A46%3A515306384866",
            "bad_timestamp",
        ),
        (b"CallSid=CA1&CallStatus=ringing&Timestamp=1e999", "bad_timestamp"),
    ],
)
def test_twilio_bad_payloads_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    assert rejected(decode_twilio_voice, body) == reason


# --------------------------------------------------------------------------- properties

DECODERS: dict[str, tuple[Decoder, list[bytes]]] = {
    "asterisk-ari": (
        decode_asterisk_ari,
        [sample(p.name) for p in sorted(SAMPLES.glob("asterisk-ari-*.json"))]
        + [extra(p.name) for p in sorted(EXTRA.glob("asterisk-ari-*.json"))],
    ),
    "freeswitch": (
        decode_freeswitch,
        [sample(p.name) for p in sorted(SAMPLES.glob("freeswitch-*"))]
        + [extra(p.name) for p in sorted(EXTRA.glob("freeswitch-*"))],
    ),
    "twilio-voice": (
        decode_twilio_voice,
        [sample("twilio-voice-incoming.form"), extra("twilio-voice-completed.form")],
    ),
}
REASONS = {"not_json", "bad_shape", "missing_field", "bad_signature", "bad_timestamp",
           "unsupported_event"}  # fmt: skip


def test_every_real_sample_decodes() -> None:
    for source, (decoder, bodies) in DECODERS.items():
        assert len(bodies) >= 2, source
        for body in bodies:
            assert only(decoder(body, {}, CONFIG)).source == source


def check_outcome(source: str, body: bytes, config: DecodeConfig = CONFIG) -> None:
    """Either a list of well-formed phone events of this source, or Rejected: nothing else."""
    decoder = DECODERS[source][0]
    try:
        events = decoder(body, {"X-Twilio-Signature": "AAAA"}, config)
    except Rejected as exc:
        assert exc.source == source
        assert exc.reason in REASONS
        return
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, ContactEvent)
        assert (event.source, event.channel) == (source, "phone")
        assert event.contact_id == f"{source}:{event.external_id}"
        assert event.external_id.strip()
        assert (event.kind == "end") == (event.end_reason is not None)
        # The event survives the journal: it encodes and decodes with type validation.
        assert CONTACT_EVENT_DECODER.decode(JSON_ENCODER.encode(event)) == event


def mutations(source: str) -> st.SearchStrategy[bytes]:
    bodies = DECODERS[source][1]

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        body = draw(st.sampled_from(bodies))
        how = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        at = draw(st.integers(0, len(body)))
        if how == "truncate":
            return body[:at]
        if how == "flip" and at < len(body):
            return body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
        if how == "insert":
            return body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
        return body[:at] + body[at + draw(st.integers(1, 16)) :]

    return mutated()


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("source", sorted(DECODERS))
@PROPERTY
@given(body=st.binary(max_size=512))
def test_random_bytes_give_events_or_rejected(source: str, body: bytes) -> None:
    check_outcome(source, body)


@pytest.mark.parametrize("source", sorted(DECODERS))
@PROPERTY
@given(data=st.data())
def test_mutated_real_samples_give_events_or_rejected(source: str, data: st.DataObject) -> None:
    check_outcome(source, data.draw(mutations(source)))


@PROPERTY
@given(data=st.data())
def test_mutated_twilio_bodies_with_a_token_are_rejected_or_decoded(data: st.DataObject) -> None:
    check_outcome("twilio-voice", data.draw(mutations("twilio-voice")), SIGNED)


@PROPERTY
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200))
def test_arbitrary_text_event_plain_gives_events_or_rejected(text: str) -> None:
    check_outcome("freeswitch", ("Event-Name: CHANNEL_CREATE\nUnique-ID: u\n" + text).encode())
