"""Chat decoders against the real samples and constructed fixtures (tests/fixtures/chat)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.base import DecodeConfig, Rejected
from channels.chat import decode_chatwoot, decode_messenger, decode_rocketchat, decode_whatsapp
from channels.contact_event import Attachment, ContactEvent

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLES = FIXTURES / "samples" / "chat"
CONSTRUCTED = FIXTURES / "chat"
CONFIG = DecodeConfig()
Decode = Callable[[bytes, dict[str, str], DecodeConfig], list[ContactEvent]]


def iso(text: str) -> float:
    return datetime.fromisoformat(text).astimezone(UTC).timestamp()


def meta_signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------ Rocket.Chat


def test_rocketchat_agent_message_sample_is_not_customer_input() -> None:
    # the real sample is the agent's "How can I help you today?" (it carries agentId)
    assert decode_rocketchat((SAMPLES / "rocketchat-message.json").read_bytes(), {}, CONFIG) == []


def test_rocketchat_offline_form_is_a_new_chat_contact() -> None:
    body = (SAMPLES / "rocketchat-offline-message.json").read_bytes()
    [event] = decode_rocketchat(body, {}, CONFIG)
    assert event.kind == "new"
    assert event.channel == "chat" and event.source == "rocketchat"
    assert event.sender.email == "email@fromtheform.com"
    assert event.sender.name == "name from the form"
    assert event.text == "message from the form"
    assert event.occurred_at == iso("2016-06-01T19:55:53.867+00:00")
    assert event.contact_id == f"rocketchat:{event.external_id}"
    assert event.external_id.startswith("offline-")
    assert "offline_message" in event.tags
    # a retried delivery is the same contact
    assert decode_rocketchat(body, {}, CONFIG)[0].contact_id == event.contact_id


def test_rocketchat_visitor_message_is_an_update_of_the_room() -> None:
    body = (CONSTRUCTED / "rocketchat-visitor-message.json").read_bytes()
    [event] = decode_rocketchat(body, {}, CONFIG)
    assert event.kind == "update"
    assert event.contact_id == "rocketchat:Tc5SyBZHovD4k8BXv"
    assert event.thread_id == "Tc5SyBZHovD4k8BXv"
    assert event.text == "Mein Anschluss ist seit gestern tot, bitte um Rückruf."
    assert event.sender.handle == "rocketchat:guest-3"
    assert event.sender.email == "joerg.kuehn@example.com"
    assert event.sender.phone == "+491712345678"
    assert event.sender.name == "Jörg Kühn"
    assert event.attributes["message_id"] == "Xy7Qm2kLpR4sT9uVw"
    assert event.tags == ("vip",)
    assert event.occurred_at == iso("2023-02-02T10:22:09.615+00:00")


def test_rocketchat_session_start_is_new_with_the_first_visitor_words() -> None:
    body = (CONSTRUCTED / "rocketchat-session-start.json").read_bytes()
    [event] = decode_rocketchat(body, {}, CONFIG)
    assert event.kind == "new"
    assert event.contact_id == "rocketchat:Rm2StartRoom01"
    assert event.text == "Frage zur Rechnung"
    assert event.attributes["department_id"] == "billing"
    assert event.sender.email is None and event.sender.phone is None


def test_rocketchat_session_close_ends_the_contact() -> None:
    body = (CONSTRUCTED / "rocketchat-session-close.json").read_bytes()
    [event] = decode_rocketchat(body, {}, CONFIG)
    assert event.kind == "end"
    assert event.end_reason == "closed"
    assert event.contact_id == "rocketchat:Tc5SyBZHovD4k8BXv"
    assert event.occurred_at == iso("2023-02-02T10:31:00+00:00")


@pytest.mark.parametrize("kind", ["LivechatSessionTaken", "LivechatSessionQueued", "LeadCapture"])
def test_rocketchat_routing_bookkeeping_is_ignored(kind: str) -> None:
    body = json.dumps({"_id": "r1", "type": kind, "messages": []}).encode()
    assert decode_rocketchat(body, {}, CONFIG) == []


def test_rocketchat_unknown_type_is_unsupported() -> None:
    with pytest.raises(Rejected) as caught:
        decode_rocketchat(b'{"type": "Surprise"}', {}, CONFIG)
    assert caught.value.reason == "unsupported_event"


def test_rocketchat_token_checked_when_configured() -> None:
    body = (SAMPLES / "rocketchat-offline-message.json").read_bytes()
    config = DecodeConfig(secrets={"rocketchat": "s3cret"})
    ok = decode_rocketchat(body, {"x-rocketchat-livechat-token": "s3cret"}, config)
    assert ok[0].text == "message from the form"
    for headers in ({}, {"X-RocketChat-Livechat-Token": "wrong"}):
        with pytest.raises(Rejected) as caught:
            decode_rocketchat(body, headers, config)
        assert caught.value.reason == "bad_signature"


# ------------------------------------------------------------------ Chatwoot


def test_chatwoot_incoming_message_sample() -> None:
    body = (SAMPLES / "chatwoot-message-created.json").read_bytes()
    [event] = decode_chatwoot(body, {}, CONFIG)
    assert event.kind == "update"
    assert event.contact_id == "chatwoot:10"
    assert event.thread_id == "10"
    assert event.channel == "chat" and event.source == "chatwoot"
    assert event.text == "hi"
    assert event.sender.handle == "chatwoot:14"
    assert event.sender.name == "little-haze-776"
    assert event.sender.email is None and event.sender.phone is None
    assert event.to == "Acme Support"
    assert event.attributes["message_id"] == "118"
    assert event.attributes["inbox_id"] == "1"
    assert event.occurred_at == iso("2021-07-23T18:02:48+00:00")


def test_chatwoot_identified_contact_gives_email_phone_labels_and_attachment() -> None:
    body = (CONSTRUCTED / "chatwoot-message-incoming-identified.json").read_bytes()
    [event] = decode_chatwoot(body, {}, CONFIG)
    assert event.sender.email == "zoe@example.org"
    assert event.sender.phone == "+4917112345678"
    assert event.sender.name == "Zoë"
    assert event.text == "Ich heiße Zoë und möchte kündigen."
    assert event.tags == ("billing",)
    assert event.attachments == (
        Attachment(filename="vertrag.png", content_type="image", size=20480),
    )


@pytest.mark.parametrize("name", ["chatwoot-message-outgoing.json", "chatwoot-private-note.json"])
def test_chatwoot_agent_messages_and_notes_are_not_input(name: str) -> None:
    assert decode_chatwoot((CONSTRUCTED / name).read_bytes(), {}, CONFIG) == []


def test_chatwoot_conversation_created_is_new() -> None:
    body = (CONSTRUCTED / "chatwoot-conversation-created.json").read_bytes()
    [event] = decode_chatwoot(body, {}, CONFIG)
    assert event.kind == "new"
    assert event.contact_id == "chatwoot:10"
    assert event.sender.handle == "chatwoot:14"
    assert event.occurred_at == 1627063308.0


def test_chatwoot_resolved_ends_the_conversation() -> None:
    body = (CONSTRUCTED / "chatwoot-conversation-resolved.json").read_bytes()
    [event] = decode_chatwoot(body, {}, CONFIG)
    assert event.kind == "end"
    assert event.end_reason == "closed"
    assert event.contact_id == "chatwoot:10"
    assert event.sender.email == "jane@acme.inc"


def test_chatwoot_reopened_conversation_is_nothing_to_route() -> None:
    payload = json.loads((CONSTRUCTED / "chatwoot-conversation-resolved.json").read_bytes())
    payload["status"] = "open"
    assert decode_chatwoot(json.dumps(payload).encode(), {}, CONFIG) == []


def test_chatwoot_signature_over_timestamp_and_body() -> None:
    body = (SAMPLES / "chatwoot-message-created.json").read_bytes()
    config = DecodeConfig(secrets={"chatwoot": "cw-secret"})
    timestamp = "1700000000"
    digest = hmac.new(b"cw-secret", timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    good = {"X-Chatwoot-Signature": f"sha256={digest}", "X-Chatwoot-Timestamp": timestamp}
    assert decode_chatwoot(body, good, config)[0].text == "hi"
    bad_cases = [
        {},
        {"X-Chatwoot-Signature": f"sha256={digest}"},  # timestamp missing
        {**good, "X-Chatwoot-Timestamp": "1700000001"},  # a replay with a new timestamp
        {**good, "X-Chatwoot-Signature": "sha256=" + "0" * 64},
    ]
    for headers in bad_cases:
        with pytest.raises(Rejected) as caught:
            decode_chatwoot(body, headers, config)
        assert caught.value.reason == "bad_signature"
    with pytest.raises(Rejected):
        decode_chatwoot(body.replace(b'"hi"', b'"ho"'), good, config)


def test_chatwoot_display_id_names_the_conversation_when_id_is_absent() -> None:
    payload = json.loads((SAMPLES / "chatwoot-message-created.json").read_bytes())
    del payload["conversation"]["id"]
    payload["conversation"]["display_id"] = 42
    assert decode_chatwoot(json.dumps(payload).encode(), {}, CONFIG)[0].contact_id == "chatwoot:42"
    del payload["conversation"]["display_id"]
    with pytest.raises(Rejected) as caught:
        decode_chatwoot(json.dumps(payload).encode(), {}, CONFIG)
    assert caught.value.reason == "missing_field"


def test_chatwoot_without_event_is_missing_field() -> None:
    with pytest.raises(Rejected) as caught:
        decode_chatwoot(b'{"id": 1}', {}, CONFIG)
    assert caught.value.reason == "missing_field"


# ------------------------------------------------------------------ WhatsApp


def test_whatsapp_text_sample() -> None:
    body = (SAMPLES / "whatsapp-text.json").read_bytes()
    [event] = decode_whatsapp(body, {}, CONFIG)
    assert event.kind == "update"
    assert event.contact_id == "whatsapp:16505551234"
    assert event.channel == "chat" and event.source == "whatsapp"
    assert event.sender.phone == "+16505551234"
    assert event.sender.handle == "whatsapp:16505551234"
    assert event.sender.name == "Sheena Nelson"
    assert event.to == "+15550783881"
    assert event.text == "Does it come in another color?"
    assert event.occurred_at == 1749416383.0
    assert event.attributes["message_id"].startswith("wamid.HBgLMTY1")
    assert event.attributes["phone_number_id"] == "106540352242922"


def test_whatsapp_batch_gives_one_event_per_message() -> None:
    body = (CONSTRUCTED / "whatsapp-batch.json").read_bytes()
    events = decode_whatsapp(body, {}, CONFIG)
    assert [e.attributes["message_id"] for e in events] == [
        "wamid.A1",
        "wamid.B1",
        "wamid.B2",
        "wamid.C1",
    ]
    text, image, button, audio = events
    assert text.sender.name == "Sheena Nelson"
    assert image.contact_id == "whatsapp:4915112345678"
    assert image.sender.phone == "+4915112345678"
    assert image.sender.name == "Björn Groß"
    assert image.attributes["message_type"] == "image"
    assert image.attributes["mime_type"] == "image/jpeg"
    assert image.text == "Foto vom Router"
    assert button.text == "Ja, bitte"
    assert button.attributes["reply_id"] == "yes-callback"
    assert button.attributes["reply_to"] == "wamid.OUT1"
    assert audio.text == "[audio]"
    assert audio.to == "+15550783882"
    assert audio.sender.name == "Kerry Fisher"


def test_whatsapp_statuses_only_is_empty() -> None:
    assert decode_whatsapp((CONSTRUCTED / "whatsapp-statuses.json").read_bytes(), {}, CONFIG) == []


def test_whatsapp_signature() -> None:
    body = (SAMPLES / "whatsapp-text.json").read_bytes()
    config = DecodeConfig(secrets={"whatsapp": "app-secret"})
    good = {"X-Hub-Signature-256": meta_signature(body, "app-secret")}
    assert len(decode_whatsapp(body, good, config)) == 1
    for headers in ({}, {"X-Hub-Signature-256": meta_signature(body, "other")}):
        with pytest.raises(Rejected) as caught:
            decode_whatsapp(body, headers, config)
        assert caught.value.reason == "bad_signature"


def test_whatsapp_other_object_is_bad_shape() -> None:
    with pytest.raises(Rejected) as caught:
        decode_whatsapp(b'{"object": "page", "entry": []}', {}, CONFIG)
    assert caught.value.reason == "bad_shape"


# ------------------------------------------------------------------ Messenger


def test_messenger_quick_reply_sample() -> None:
    body = (SAMPLES / "messenger-quick-reply.json").read_bytes()
    [event] = decode_messenger(body, {}, CONFIG)
    assert event.kind == "update"
    assert event.contact_id == "messenger:<PSID>"
    assert event.sender.handle == "messenger:<PSID>"
    assert event.channel == "chat" and event.source == "messenger"
    assert event.text == "hello, world!"
    assert event.attributes["quick_reply"] == "<DEVELOPER_DEFINED_PAYLOAD>"
    assert event.attributes["message_id"] == "mid.1457764197618:41d102a3e1ae206a38"
    assert event.occurred_at == 1458692752.478  # milliseconds in the payload
    assert event.to == "<PAGE_ID>"


def test_messenger_echo_delivery_and_read_are_empty() -> None:
    body = (CONSTRUCTED / "messenger-receipts-echo.json").read_bytes()
    assert decode_messenger(body, {}, CONFIG) == []


def test_messenger_batch_messages_and_postback() -> None:
    events = decode_messenger((CONSTRUCTED / "messenger-batch.json").read_bytes(), {}, CONFIG)
    assert [e.contact_id for e in events] == [
        "messenger:1254459154682919",
        "messenger:1254459154682919",
        "messenger:9876543210",
    ]
    text, image, postback = events
    assert text.text == "Meine Rechnung ist falsch"
    assert image.text == "[image]" and image.attributes["message_type"] == "image"
    assert postback.text == "Mit einem Menschen sprechen"
    assert postback.attributes["postback"] == "HUMAN_AGENT"


def test_messenger_signature() -> None:
    body = (SAMPLES / "messenger-quick-reply.json").read_bytes()
    config = DecodeConfig(secrets={"messenger": "page-secret"})
    good = {"x-hub-signature-256": meta_signature(body, "page-secret")}
    assert len(decode_messenger(body, good, config)) == 1
    with pytest.raises(Rejected) as caught:
        decode_messenger(body + b" ", good, config)
    assert caught.value.reason == "bad_signature"


# ------------------------------------------------------------------ robustness

DECODERS: list[tuple[Decode, Path]] = [
    (decode_rocketchat, SAMPLES / "rocketchat-message.json"),
    (decode_rocketchat, SAMPLES / "rocketchat-offline-message.json"),
    (decode_rocketchat, CONSTRUCTED / "rocketchat-session-close.json"),
    (decode_chatwoot, SAMPLES / "chatwoot-message-created.json"),
    (decode_chatwoot, CONSTRUCTED / "chatwoot-conversation-resolved.json"),
    (decode_whatsapp, SAMPLES / "whatsapp-text.json"),
    (decode_whatsapp, CONSTRUCTED / "whatsapp-batch.json"),
    (decode_messenger, SAMPLES / "messenger-quick-reply.json"),
    (decode_messenger, CONSTRUCTED / "messenger-batch.json"),
]
ALL_DECODERS = [decode_rocketchat, decode_chatwoot, decode_whatsapp, decode_messenger]


@pytest.mark.parametrize("decode", ALL_DECODERS)
def test_deeply_nested_json_is_rejected_not_a_recursion_error(decode: Decode) -> None:
    with pytest.raises(Rejected) as caught:
        decode(b"[" * 100_000, {}, CONFIG)
    assert caught.value.reason == "not_json"


def _decodes_or_rejects(decode: Decode, body: bytes) -> None:
    try:
        events = decode(body, {}, CONFIG)
    except Rejected:
        return
    for event in events:
        assert event.channel == "chat"
        assert event.contact_id == f"{event.source}:{event.external_id}"
        assert event.external_id


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ALL_DECODERS), st.binary(max_size=500))
def test_random_bytes_decode_or_reject(decode: Decode, body: bytes) -> None:
    _decodes_or_rejects(decode, body)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(DECODERS),
    st.integers(min_value=1, max_value=3000),
    st.lists(st.tuples(st.integers(0, 3000), st.binary(min_size=1, max_size=6)), max_size=4),
)
def test_truncated_and_mutated_samples_decode_or_reject(
    pair: tuple[Decode, Path], cut: int, edits: list[tuple[int, bytes]]
) -> None:
    decode, path = pair
    body = bytearray(path.read_bytes()[:cut])
    for position, junk in edits:
        at = position % (len(body) + 1)
        body[at : at + len(junk)] = junk
    _decodes_or_rejects(decode, bytes(body))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def _replace_somewhere(value: object, path: list[int], new: object) -> object:
    """``value`` with one nested item (chosen by ``path``) replaced by ``new``."""
    if not path or not isinstance(value, dict | list) or not value:
        return new
    if isinstance(value, dict):
        key = list(value)[path[0] % len(value)]
        return {**value, key: _replace_somewhere(value[key], path[1:], new)}
    index = path[0] % len(value)
    return [*value[:index], _replace_somewhere(value[index], path[1:], new), *value[index + 1 :]]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(DECODERS),
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=8),
    JSON_VALUES,
)
def test_wrong_types_anywhere_in_real_samples_decode_or_reject(
    pair: tuple[Decode, Path], path: list[int], new: object
) -> None:
    decode, sample = pair
    payload = json.loads(sample.read_bytes())
    mutated = _replace_somewhere(payload, path, new)
    _decodes_or_rejects(decode, json.dumps(mutated, allow_nan=True).encode())
