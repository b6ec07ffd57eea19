"""Typed events keep the wire format: the JSON on ``{prefix}/events/{type}`` is byte for byte
what the daemon published when events were dicts.

``tests/fixtures/event-wire-shapes.jsonl`` holds one body per event type and shape (which
fields, which of them null), recorded from the engine before events were typed, while the
engine tests and a simulated day ran: every event type, ``contact.queued`` with and without
``requeued``, ``contact.completed`` with and without ``released_by``.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from router.daemon.mqtt import command_messages, wire_body
from router.events import EVENT_DECODER
from router.messages import Command, EventCmd
from router.sim.simulation import parse_scenario, simulate
from rules.load import load_routing

ROOT = Path(__file__).resolve().parents[2]
RECORDED = [
    line.encode()
    for line in (ROOT / "tests/fixtures/event-wire-shapes.jsonl").read_text().splitlines()
]


def _shape(body: bytes) -> tuple[str, tuple[str, ...], frozenset[str]]:
    data = json.loads(body)
    return data["type"], tuple(data), frozenset(k for k, v in data.items() if v is None)


SHAPES = {_shape(body) for body in RECORDED}


def test_the_recording_covers_every_event_type_the_engine_had() -> None:
    assert {kind for kind, _, _ in SHAPES} == {
        "agent.state",
        "contact.abandoned",
        "contact.answered_by_crowd",
        "contact.assigned",
        "contact.completed",
        "contact.crowd_window",
        "contact.crowd_window_ended",
        "contact.escalated",
        "contact.offer_expired",
        "contact.offer_rejected",
        "contact.offered",
        "contact.overflowed",
        "contact.queued",
        "contact.rejected",
        "contact.updated",
        "contact.wrap_up_done",
        "customer.linked",
        "expert.answered",
        "expert.removed",
        "expert.updated",
    }


@pytest.mark.parametrize("body", RECORDED, ids=lambda b: json.loads(b)["type"])
def test_a_recorded_event_goes_out_unchanged(body: bytes) -> None:
    # Decoding ignores unknown fields and fails on missing ones, so a field the typed event
    # drops, adds, renames or leaves out when null shows up as a different body.
    event = EVENT_DECODER.decode(body)
    ((topic, sent),) = command_messages(EventCmd(event=event), "p")
    assert topic == f"p/events/{json.loads(body)['type']}"
    assert sent == body
    # The desk's WebSocket sends the same body.
    assert msgspec.json.encode(wire_body(EventCmd(event=event))) == body


def test_a_simulated_day_publishes_only_recorded_shapes() -> None:
    table = load_routing(ROOT / "config/routing.yaml")
    path = ROOT / "config/scenario.yaml"
    sent: list[bytes] = []

    def observe(now: float, cmd: Command) -> None:
        if isinstance(cmd, EventCmd):
            sent.extend(body for _, body in command_messages(cmd, "p"))

    simulate(table, parse_scenario(path.read_bytes(), str(path)), observe=observe)
    assert len(sent) > 1000
    assert {_shape(body) for body in sent} <= SHAPES
