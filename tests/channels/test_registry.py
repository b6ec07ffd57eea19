"""The registry: one decoder per source of the model, and every real sample decodes through it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from channels.base import DecodeConfig, Rejected
from channels.contact_event import CHANNELS, ContactEvent
from channels.contact_event import SOURCES as MODEL_SOURCES
from channels.registry import SOURCES, decode, decoder_for
from channels.social import decode_discourse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST: dict[str, list[dict[str, Any]]] = {
    k: v
    for k, v in json.loads((FIXTURES / "samples-by-source.json").read_text()).items()
    if not k.startswith("_")
}
CASES = [(source, entry) for source, entries in MANIFEST.items() for entry in entries]


def _load(entry: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    headers = dict(entry.get("headers", {}))
    if "headers_file" in entry:
        headers.update(json.loads((FIXTURES / entry["headers_file"]).read_text()))
    return (FIXTURES / entry["file"]).read_bytes(), headers


def _decode(source: str, entry: dict[str, Any]) -> list[ContactEvent]:
    body, headers = _load(entry)
    config = DecodeConfig(
        secrets={source: entry["secret"]} if "secret" in entry else {},
        public_urls={source: entry["url"]} if "url" in entry else {},
    )
    return decode(source, body, headers, config)


def test_registry_covers_exactly_the_model_sources() -> None:
    assert list(SOURCES) == list(MODEL_SOURCES)


def test_every_source_has_a_real_sample() -> None:
    assert set(MANIFEST) == set(MODEL_SOURCES)


@pytest.mark.parametrize(("source", "entry"), CASES, ids=[e["file"] for _, e in CASES])
def test_every_sample_decodes_to_events_of_its_source(source: str, entry: dict[str, Any]) -> None:
    events = _decode(source, entry)
    for event in events:
        assert isinstance(event, ContactEvent)
        assert event.source == source
        assert event.channel in CHANNELS
        assert event.contact_id == f"{source}:{event.external_id}"


@pytest.mark.parametrize("source", list(MANIFEST))
def test_every_source_has_a_sample_that_reaches_the_router(source: str) -> None:
    # Some samples are valid deliveries with nothing for the router (an agent's own chat
    # message); each source still needs one that the router sees.
    assert any(_decode(source, entry) for entry in MANIFEST[source])


def test_unknown_source_is_rejected_with_the_known_ones_listed() -> None:
    with pytest.raises(Rejected) as info:
        decode("telex", b"{}", {}, DecodeConfig())
    assert (info.value.source, info.value.reason) == ("telex", "unknown_source")
    assert "discourse" in info.value.detail


def test_decoder_for_returns_the_module_function() -> None:
    assert decoder_for("discourse") is decode_discourse
