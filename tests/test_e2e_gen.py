"""The end-to-end benchmark's generator process: its own small MQTT client against the real
broker, and the ARI payloads it sends."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from router.cli.loadgen import ari_event
from tests.servers import MQTT_HOST, MQTT_PORT, MQTT_USER, TOPIC_ROOT


def _generator() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_gen.py"
    spec = importlib.util.spec_from_file_location("e2e_gen", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e_gen"] = module
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.mark.parametrize("kind", ["StasisStart", "StasisEnd"])
@pytest.mark.parametrize("ts", [0.0, 1_700_000_000.9996, 1_764_633_600.25])
def test_its_ari_events_are_the_loadgens_bytes(kind: str, ts: float) -> None:
    channel = "gab12cd34.0.1.2500.1764633600123456"
    assert gen.ari_event(kind, channel, "+4915112345678", "0800123456", ts) == ari_event(
        kind, channel, "+4915112345678", "0800123456", ts
    )


@pytest.mark.skipif(MQTT_USER is not None, reason="the generator's client has no login")
def test_its_client_publishes_subscribes_and_is_acknowledged_by_the_broker() -> None:
    topic = f"{TOPIC_ROOT}/e2e-gen/loop"
    wire = gen.Wire(MQTT_HOST, MQTT_PORT, f"stwtest-e2e-gen-{time.monotonic_ns()}")
    got: list[tuple[bytes, bytes]] = []
    wire.on_publish = lambda t, p: got.append((t, p))

    def turn_until(done: object, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:  # type: ignore[operator]
            wire.flush()
            assert wire.receive()
            time.sleep(0.001)
        assert done()  # type: ignore[operator]

    turn_until(lambda: wire.connected)
    wire.subscribe([topic])
    turn_until(lambda: not wire.pending)  # SUBACK
    # Small ones, and one of several hundred kB: a four-byte length, read in several recvs.
    payloads = [b"a", b"x" * 200, bytes(range(256)) * 1500]
    for n, payload in enumerate(payloads):
        wire.publish(gen._string(topic), payload, call=n)
    assert wire.calls_pending == 3
    turn_until(lambda: len(got) == 3 and not wire.pending)
    assert got == [(topic.encode(), p) for p in payloads]
    assert wire.calls_pending == 0
    wire.disconnect()
    wire.flush()
    wire.sock.close()
