"""The generic JSON source: the documented shape, its validation and its error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.base import DecodeConfig, Rejected
from channels.contact_event import Attachment, ContactEvent
from channels.generic import decode_generic

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generic"
CONFIG = DecodeConfig()


def _decode(payload: Any, config: DecodeConfig = CONFIG) -> list[ContactEvent]:
    return decode_generic(json.dumps(payload).encode(), {}, config)


def _rejected(payload: Any) -> Rejected:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(Rejected) as info:
        decode_generic(body, {}, CONFIG)
    assert info.value.source == "generic"
    return info.value


def test_documented_phone_example_maps_every_field() -> None:
    [event] = decode_generic((FIXTURES / "phone-call.json").read_bytes(), {}, CONFIG)
    assert event.kind == "new"
    assert event.contact_id == "generic:call-42"
    assert event.external_id == "call-42"
    assert event.thread_id == "call-42"
    assert event.channel == "phone"
    assert event.source == "generic"
    assert event.sender.phone == "+49301234567"  # national number, default region DE
    assert event.sender.email == "erika.muster@example.org"
    assert event.sender.handle == "shop:erika"  # already namespaced: kept
    assert event.sender.name == "Erika Mustermann"
    assert event.to == "+4930999"
    assert event.subject == "Rückruf"
    assert event.text == "Die Rechnung für Oktober ist zu hoch."
    assert event.language == "de"
    assert event.tags == ("billing",)
    assert event.attributes == {"ivr_choice": "2", "customer_no": "K-1001"}
    assert event.occurred_at == 1795366800.0  # 18:00 at +01:00 is 17:00 UTC


def test_documented_chat_batch_gives_new_then_end() -> None:
    new, end = decode_generic((FIXTURES / "chat-batch.json").read_bytes(), {}, CONFIG)
    assert new.kind == "new"
    assert new.sender.handle == "generic:webchat-user-99"
    assert new.attachments == (
        Attachment(filename="speedtest.png", content_type="image/png", size=48213),
    )
    assert new.occurred_at == 1795341600.0  # milliseconds recognised
    assert end.kind == "end"
    assert end.end_reason == "closed"
    assert end.contact_id == new.contact_id == "generic:conv-7"


def test_minimal_event_and_empty_batch() -> None:
    [event] = _decode({"kind": "update", "channel": "social", "id": "t-1"})
    assert event.contact_id == "generic:t-1"
    assert event.occurred_at == 0.0
    assert event.sender.phone is None
    assert _decode([]) == []


def test_unparseable_number_is_kept_as_given() -> None:
    [event] = _decode({"kind": "new", "channel": "phone", "id": "c", "from": "anonymous"})
    assert event.sender.phone == "anonymous"


def test_text_is_bounded_with_nfc() -> None:
    payload = {"kind": "new", "channel": "chat", "id": "c", "text": "Gru\u0308ße " * 10}
    [event] = _decode(payload, DecodeConfig(max_text=5))
    assert event.text == "Grüße"


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        ({"kind": "new", "channel": "phone"}, "bad_shape", "missing required field `id`"),
        ({"kind": "new", "channel": "phone", "id": ""}, "bad_shape", "`$.id`"),
        ({"kind": "open", "channel": "phone", "id": "a"}, "bad_shape", "`$.kind`"),
        ({"kind": "new", "channel": "fax", "id": "a"}, "bad_shape", "`$.channel`"),
        ({"kind": "new", "channel": "chat", "id": "a", "fromm": "x"}, "bad_shape", "`fromm`"),
        (
            {"kind": "new", "channel": "chat", "id": "a", "attributes": {"n": 1}},
            "bad_shape",
            "`$.attributes[...]`",
        ),
        ({"kind": "new", "channel": "chat", "id": "a", "tags": "x"}, "bad_shape", "`$.tags`"),
        ({"kind": "end", "channel": "phone", "id": "a"}, "missing_field", "end_reason"),
        (
            {"kind": "new", "channel": "phone", "id": "a", "end_reason": "hangup"},
            "bad_shape",
            "end_reason",
        ),
        (
            [{"kind": "new", "channel": "chat", "id": "a"}, {"kind": "new"}],
            "bad_shape",
            "`$[1]`",
        ),
        ({"kind": "new", "channel": "chat", "id": "a", "timestamp": "soon"}, "bad_timestamp", ""),
        ("just a string", "bad_shape", "Expected `object | array`"),
    ],
)
def test_shape_errors_name_the_field(payload: Any, reason: str, detail: str) -> None:
    error = _rejected(payload)
    assert error.reason == reason
    assert detail in error.detail


@pytest.mark.parametrize("body", [b"", b"{", b"\xff", b"kind=new"])
def test_not_json_is_rejected(body: bytes) -> None:
    assert _rejected(body).reason == "not_json"


@given(
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["new", "update"]),
            "channel": st.sampled_from(["phone", "email", "chat", "social"]),
            "id": st.text(min_size=1, max_size=20),
        },
        optional={
            "text": st.text(max_size=50),
            "tags": st.lists(st.text(max_size=5), max_size=3),
            "attributes": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
            "email": st.emails(),
        },
    )
)
def test_any_valid_event_round_trips_through_the_contact_event_wire_form(
    payload: dict[str, Any],
) -> None:
    [event] = _decode(payload)
    assert event.contact_id == f"generic:{payload['id']}"
    assert event.kind == payload["kind"] and event.channel == payload["channel"]
    assert event.tags == tuple(payload.get("tags", ()))
    assert event.attributes == payload.get("attributes", {})
    if "email" in payload:
        assert event.sender.email == payload["email"].strip().lower()
    wire = msgspec.json.encode(event)
    assert msgspec.json.decode(wire, type=ContactEvent) == event
