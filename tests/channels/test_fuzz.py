"""Every registered decoder, fed garbage: it returns events or raises Rejected, nothing else.

Inputs: random bytes, random headers, and the real samples truncated or with bytes flipped
(which keeps most of their structure, so the decoders' deeper paths are reached too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.base import DecodeConfig, Rejected
from channels.contact_event import ContactEvent
from channels.registry import SOURCES, decode

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST: dict[str, list[dict[str, Any]]] = {
    k: v
    for k, v in json.loads((FIXTURES / "samples-by-source.json").read_text()).items()
    if not k.startswith("_")
}


def _sample(entry: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    headers = dict(entry.get("headers", {}))
    if "headers_file" in entry:
        headers.update(json.loads((FIXTURES / entry["headers_file"]).read_text()))
    return (FIXTURES / entry["file"]).read_bytes(), headers


SAMPLES = {source: [_sample(e) for e in entries] for source, entries in MANIFEST.items()}
SIGNED = {
    source: DecodeConfig(
        secrets={source: e["secret"]}, public_urls={source: e.get("url", "http://x/")}
    )
    for source, entries in MANIFEST.items()
    for e in entries
    if "secret" in e
}
CONFIGS = [DecodeConfig(), DecodeConfig(max_text=3, default_region="US")]
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# Structure-aware inputs find more, and cost little: more examples for them.
FUZZ_FIELDS = settings(FUZZ, max_examples=150)

header_names = st.sampled_from(
    [
        "content-type",
        "x-discourse-event",
        "X-Discourse-Event-Signature",
        "x-twilio-signature",
        "x-hub-signature-256",
        "x-rocketchat-livechat-token",
        "x-chatwoot-signature",
        "x-twitter-webhooks-signature",
    ]
) | st.text(max_size=12)
header_values = st.sampled_from(["post_created", "topic_created", "sha256=00", ""]) | st.text(
    max_size=40
)
headers_strategy = st.dictionaries(header_names, header_values, max_size=4)


def _check(source: str, body: bytes, headers: dict[str, str], config: DecodeConfig) -> None:
    try:
        events = decode(source, body, headers, config)
    except Rejected as exc:
        assert exc.source == source
        assert isinstance(exc.reason, str) and exc.reason
        return
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, ContactEvent)
        assert event.source == source
        assert event.text is None or len(event.text) <= config.max_text


@pytest.mark.parametrize("source", list(SOURCES))
@FUZZ
@given(body=st.binary(max_size=300), headers=headers_strategy, config=st.sampled_from(CONFIGS))
def test_random_bytes(
    source: str, body: bytes, headers: dict[str, str], config: DecodeConfig
) -> None:
    _check(source, body, headers, config)


@pytest.mark.parametrize("source", list(SOURCES))
@FUZZ
@given(data=st.data(), config=st.sampled_from(CONFIGS))
def test_truncated_and_mutated_samples(source: str, data: st.DataObject, config: Any) -> None:
    body, headers = data.draw(st.sampled_from(SAMPLES[source]))
    if data.draw(st.booleans()):
        body = body[: data.draw(st.integers(0, len(body)))]
    for _ in range(data.draw(st.integers(0, 4))):
        if not body:
            break
        at = data.draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([data.draw(st.integers(0, 255))]) + body[at + 1 :]
    if data.draw(st.booleans()):
        headers = {**headers, **data.draw(headers_strategy)}
    if source in SIGNED and data.draw(st.booleans()):
        config = SIGNED[source]
    _check(source, body, headers, config)


@pytest.mark.parametrize("source", list(SOURCES))
@FUZZ
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_random_json_values(source: str, value: Any) -> None:
    body = json.dumps(value).encode()
    _check(source, body, {"X-Discourse-Event": "post_created"}, DecodeConfig())


@pytest.mark.parametrize("source", list(SOURCES))
@FUZZ_FIELDS
@given(data=st.data())
def test_samples_with_fields_replaced(source: str, data: st.DataObject) -> None:
    """Keep a JSON sample's shape but put a wrong type into one of its fields."""
    body, headers = data.draw(st.sampled_from(SAMPLES[source]))
    try:
        payload = json.loads(body)
    except ValueError:
        return  # e-mail, form and plain-text samples are covered by the byte mutations
    node = payload
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    if isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(list(node)))
        node[key] = data.draw(
            st.none()
            | st.booleans()
            | st.integers()
            | st.text(max_size=5)
            | st.just([])
            | st.just({})
        )
    _check(source, json.dumps(payload).encode(), headers, DecodeConfig())
