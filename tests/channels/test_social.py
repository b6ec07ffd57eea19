"""Discourse and X decoders against the real samples and hand-signed variants."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.base import DecodeConfig, Rejected
from channels.social import decode_discourse, decode_x

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "samples" / "social"
DISCOURSE_BODY = (SAMPLES / "discourse-post-created.json").read_bytes()
DISCOURSE_HEADERS: dict[str, str] = json.loads(
    (SAMPLES / "discourse-post-created.headers.json").read_text()
)
X_BODY = (SAMPLES / "x-v2-tweet.json").read_bytes()
CONFIG = DecodeConfig()


def _post(**changes: Any) -> bytes:
    payload = json.loads(DISCOURSE_BODY)
    payload["post"].update(changes)
    return json.dumps(payload).encode()


def _sign_discourse(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _sign_x(body: bytes, secret: str) -> str:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return "sha256=" + base64.b64encode(digest).decode()


# --- Discourse -------------------------------------------------------------------------------


def test_discourse_real_reply_post_is_an_update_of_the_topic() -> None:
    [event] = decode_discourse(DISCOURSE_BODY, DISCOURSE_HEADERS, CONFIG)
    assert event.kind == "update"
    assert event.contact_id == "discourse:46582"
    assert event.external_id == "46582"
    assert event.thread_id == "46582"
    assert event.channel == "social"
    assert event.source == "discourse"
    assert event.sender.handle == "discourse:darknao"
    assert event.sender.name == "Francois Andrieu"
    assert event.to == "project"
    assert event.subject == "Docs meeting agenda: 2023-02-08"
    # The sample carries neither raw nor cooked: no text, but not a rejection.
    assert event.text is None
    assert event.occurred_at == pytest.approx(1675937986.324)
    assert event.attributes == {
        "post_id": "79563",
        "post_number": "3",
        "user_id": "2401",
        "trust_level": "2",
        "staff": "false",
        "moderator": "false",
        "admin": "false",
        "archetype": "regular",
    }


def test_discourse_header_names_are_case_insensitive() -> None:
    headers = {k.lower(): v for k, v in DISCOURSE_HEADERS.items()}
    assert decode_discourse(DISCOURSE_BODY, headers, CONFIG)[0].contact_id == "discourse:46582"


def test_discourse_first_post_starts_the_contact() -> None:
    body = _post(post_number=1, raw="Meine Rechnung ist falsch, bitte helfen Sie mir.")
    [event] = decode_discourse(body, DISCOURSE_HEADERS, CONFIG)
    assert event.kind == "new"
    assert event.contact_id == "discourse:46582"
    assert event.text == "Meine Rechnung ist falsch, bitte helfen Sie mir."


def test_discourse_reply_keeps_reply_to_and_staff_flags() -> None:
    body = _post(reply_to_post_number=2, staff=True, moderator=True)
    [event] = decode_discourse(body, DISCOURSE_HEADERS, CONFIG)
    assert event.attributes["reply_to_post_number"] == "2"
    assert event.attributes["staff"] == "true"
    assert event.attributes["moderator"] == "true"


def test_discourse_cooked_html_becomes_plain_text() -> None:
    cooked = (
        "<p>Hallo <strong>zusammen</strong>,</p>\n<ul><li>Router &amp; Modem</li>"
        "<li>Größe: 5&nbsp;GB</li></ul><script>alert(1)</script>"
    )
    [event] = decode_discourse(_post(cooked=cooked), DISCOURSE_HEADERS, CONFIG)
    assert event.text == "Hallo zusammen,\nRouter & Modem\nGröße: 5 GB"


def test_discourse_raw_wins_over_cooked_and_text_is_bounded_nfc() -> None:
    raw = "Mu\u0308ller " + "x" * 100  # decomposed umlaut
    body = _post(raw=raw, cooked="<p>ignored</p>")
    [event] = decode_discourse(body, DISCOURSE_HEADERS, DecodeConfig(max_text=10))
    assert event.text == "Müller xxx"


@pytest.mark.parametrize("post_type", [3, 4])
def test_discourse_small_actions_and_whispers_are_not_customer_input(post_type: int) -> None:
    assert decode_discourse(_post(post_type=post_type), DISCOURSE_HEADERS, CONFIG) == []


def test_discourse_topic_created_starts_the_contact() -> None:
    body = json.dumps(
        {
            "topic": {
                "id": 777,
                "title": "IBAN ändern?",
                "category_id": 12,
                "archetype": "regular",
                "created_at": "2026-11-22T10:00:00.000Z",
                "tags": ["billing", {"id": 3, "name": "vertrag"}],
                "created_by": {"id": 5, "username": "erika", "name": "Erika Muster"},
            }
        }
    ).encode()
    headers = {"X-Discourse-Event": "topic_created", "X-Discourse-Event-Type": "topic"}
    [event] = decode_discourse(body, headers, CONFIG)
    assert event.kind == "new"
    assert event.contact_id == "discourse:777"
    assert event.thread_id == "777"
    assert event.subject == "IBAN ändern?"
    assert event.to == "12"
    assert event.tags == ("billing", "vertrag")
    assert event.sender.handle == "discourse:erika"
    assert event.sender.name == "Erika Muster"
    assert event.attributes == {"user_id": "5", "archetype": "regular"}
    assert event.occurred_at == 1795341600.0


@pytest.mark.parametrize("event_name", ["ping", "post_edited", "user_created", "topic_destroyed"])
def test_discourse_other_events_carry_nothing(event_name: str) -> None:
    headers = {**DISCOURSE_HEADERS, "X-Discourse-Event": event_name}
    assert decode_discourse(DISCOURSE_BODY, headers, CONFIG) == []


def test_discourse_without_event_header_is_rejected() -> None:
    with pytest.raises(Rejected) as info:
        decode_discourse(DISCOURSE_BODY, {}, CONFIG)
    assert info.value.reason == "missing_field"
    assert "X-Discourse-Event" in info.value.detail


def test_discourse_post_without_topic_id_is_rejected() -> None:
    payload = json.loads(DISCOURSE_BODY)
    del payload["post"]["topic_id"]
    with pytest.raises(Rejected) as info:
        decode_discourse(json.dumps(payload).encode(), DISCOURSE_HEADERS, CONFIG)
    assert (info.value.source, info.value.reason) == ("discourse", "missing_field")
    assert "topic_id" in info.value.detail


def test_discourse_not_json_is_rejected() -> None:
    with pytest.raises(Rejected) as info:
        decode_discourse(b"<html>", DISCOURSE_HEADERS, CONFIG)
    assert info.value.reason == "not_json"


def test_discourse_signature_checked_when_a_secret_is_configured() -> None:
    config = DecodeConfig(secrets={"discourse": "s3cret"})
    body = _post(raw="signed")
    headers = {**DISCOURSE_HEADERS, "X-Discourse-Event-Signature": _sign_discourse(body, "s3cret")}
    assert decode_discourse(body, headers, config)[0].text == "signed"

    tampered = body.replace(b"signed", b"forged")
    with pytest.raises(Rejected) as info:
        decode_discourse(tampered, headers, config)
    assert info.value.reason == "bad_signature"

    unsigned = {k: v for k, v in headers.items() if k != "X-Discourse-Event-Signature"}
    with pytest.raises(Rejected) as info:
        decode_discourse(body, unsigned, config)
    assert info.value.reason == "bad_signature"


def test_discourse_real_signature_does_not_verify_against_the_reformatted_sample() -> None:
    # The recorded signature covers the original bytes, which were not kept (SOURCES.md).
    with pytest.raises(Rejected) as info:
        decode_discourse(
            DISCOURSE_BODY, DISCOURSE_HEADERS, DecodeConfig(secrets={"discourse": "x"})
        )
    assert info.value.reason == "bad_signature"


# --- X ---------------------------------------------------------------------------------------


def test_x_real_reply_is_an_update_of_the_conversation() -> None:
    [event] = decode_x(X_BODY, {}, CONFIG)
    assert event.kind == "update"
    assert event.contact_id == "x:1304102743196356610"
    assert event.external_id == "1304102743196356610"
    assert event.thread_id == "1304102743196356610"
    assert event.channel == "social"
    assert event.source == "x"
    assert event.sender.handle == "x:2244994945"
    assert event.language == "en"
    assert event.text == (
        "Here’s an article that highlights the updates in the new Tweet payload v2 "
        "https://t.co/oeF3ZHeKQQ"
    )
    assert event.occurred_at == 1600454175.0
    assert event.attributes == {
        "post_id": "1307025659294674945",
        "in_reply_to_user_id": "2244994945",
        "replied_to_post_id": "1304102743196356610",
    }


def _x_root(**changes: Any) -> dict[str, Any]:
    post = {
        "id": "42",
        "conversation_id": "42",
        "author_id": "7",
        "text": "Kündigung &amp; Vertrag &lt;dringend&gt;",
        "lang": "de",
        "created_at": "2026-11-22T10:00:00.000Z",
    }
    post.update(changes)
    return post


def test_x_root_post_as_single_object_starts_the_contact_and_uses_includes() -> None:
    body = json.dumps(
        {
            "data": _x_root(),
            "includes": {"users": [{"id": "7", "username": "erika", "name": "Erika M."}]},
        }
    ).encode()
    [event] = decode_x(body, {}, CONFIG)
    assert event.kind == "new"
    assert event.contact_id == "x:42"
    assert event.sender.handle == "x:7"  # the stable id, not the changeable user name
    assert event.sender.name == "Erika M."
    assert event.attributes == {"post_id": "42", "username": "erika"}
    assert event.text == "Kündigung & Vertrag <dringend>"
    assert event.language == "de"


def test_x_batch_gives_one_event_per_post_in_order() -> None:
    posts = [_x_root(), _x_root(id="43", lang="und", created_at=None)]
    [first, second] = decode_x(json.dumps({"data": posts}).encode(), {}, CONFIG)
    assert (first.kind, second.kind) == ("new", "update")
    assert second.contact_id == "x:42"
    assert second.attributes["post_id"] == "43"
    assert second.language is None
    assert second.occurred_at == 0.0


def test_x_empty_batch_is_valid_and_empty() -> None:
    assert decode_x(b'{"data": []}', {}, CONFIG) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"errors": [{"title": "Not Found Error"}]}', "missing_field"),
        (b'{"data": [{"text": "no id"}]}', "missing_field"),
        (b'{"data": ["nope"]}', "bad_shape"),
        (b"[1, 2]", "bad_shape"),
        (b"\xff\xfe", "not_json"),
        (b'{"data": {"id": "1", "text": "\x80"}}', "not_json"),  # invalid UTF-8 in a string
        (b'{"data": {"id": "1", "created_at": "yesterday"}}', "bad_timestamp"),
    ],
)
def test_x_bad_payloads_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        decode_x(body, {}, CONFIG)
    assert (info.value.source, info.value.reason) == ("x", reason)


def test_x_signature_checked_when_a_secret_is_configured() -> None:
    config = DecodeConfig(secrets={"x": "consumer-secret"})
    good = {"X-Twitter-Webhooks-Signature": _sign_x(X_BODY, "consumer-secret")}
    assert len(decode_x(X_BODY, good, config)) == 1
    for headers in ({}, {"X-Twitter-Webhooks-Signature": _sign_x(X_BODY, "other")}):
        with pytest.raises(Rejected) as info:
            decode_x(X_BODY, headers, config)
        assert info.value.reason == "bad_signature"


@given(st.text(max_size=300), st.integers(min_value=1, max_value=50))
def test_x_text_is_always_bounded(text: str, limit: int) -> None:
    body = json.dumps({"data": _x_root(text=text)}).encode()
    [event] = decode_x(body, {}, DecodeConfig(max_text=limit))
    assert event.text is None or 0 < len(event.text) <= limit


def test_x_malformed_references_are_ignored_not_a_crash() -> None:
    body = json.dumps({"data": _x_root(id="43", referenced_tweets=1)}).encode()
    [event] = decode_x(body, {}, CONFIG)
    assert event.kind == "update"
    assert "replied_to_post_id" not in event.attributes
