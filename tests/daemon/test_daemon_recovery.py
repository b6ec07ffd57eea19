"""Crash recovery and fail-over with real daemon processes (SIGKILL, restart, standby).

The daemon runs as a child process configured through STELLWERK_* variables; the test plays
the PBX and the agents over MQTT and reads the routing state back from the snapshot in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.daemon.journal import Journal, SnapshotGone
from router.engine import Engine
from router.state import EngineState
from rules.load import load_routing
from tests.daemon.conftest import DaemonProcess, MqttProbe, ari, wait_until, write_routing

pytestmark = pytest.mark.integration

CALL = "in/phone/asterisk-ari"


async def wait_log(daemon: DaemonProcess, event: str, timeout: float = 30.0) -> dict[str, Any]:
    """The first JSON log line of ``daemon`` with this ``event`` (waits for it)."""

    def find() -> dict[str, Any] | None:
        for line in daemon.log_lines():
            if line.get("event") == event:
                return line
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}):\n{daemon.log()}")
        return None

    return await wait_until(find, timeout, f"log event {event}")


async def routed_state(journal: Journal, routing: Path, after: float) -> EngineState:
    """The engine state of the first snapshot written after ``after`` (wall clock)."""

    async def newer() -> Any:
        snap = await journal.load_snapshot()
        if snap is None or snap.at <= after:
            return None
        try:
            return await journal.snapshot_state(snap)
        except SnapshotGone:
            return None  # replaced while it was read: read the newer one

    state = await wait_until(newer, 30, "a fresh snapshot")
    return Engine(load_routing(routing), state).state


async def test_sigkill_and_restart_keep_every_queued_contact_offer_and_assignment(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    journal: Journal,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna", "bert"), offer_timeout=60, wrap_up=0)
    env = daemon_env(routing, "a")
    first = daemons(env, "first")
    await wait_log(first, "router.routing")
    await wait_log(first, "mqtt.ingress.connected")
    for agent in ("anna", "bert"):
        await mqtt_probe.agent(agent, op="login")
    await mqtt_probe.wait_for("events/agent.state", state="available", count=2)

    await mqtt_probe.publish(CALL, ari("StasisStart", "c-1"))
    (offer1,) = await mqtt_probe.wait_for("events/contact.offered", contact_id="asterisk-ari:c-1")
    x = offer1["agent_id"]
    y = "bert" if x == "anna" else "anna"
    await mqtt_probe.agent(x, op="accept", offer_id=offer1["offer_id"])
    await mqtt_probe.wait_for("events/contact.assigned", contact_id="asterisk-ari:c-1")
    await mqtt_probe.publish(CALL, ari("StasisStart", "c-2"))
    (offer2,) = await mqtt_probe.wait_for("events/contact.offered", contact_id="asterisk-ari:c-2")
    assert offer2["agent_id"] == y
    for n in range(3, 8):
        await mqtt_probe.publish(CALL, ari("StasisStart", f"c-{n}"))
    await mqtt_probe.wait_for("events/contact.queued", count=7)

    # A burst, and SIGKILL straight after the broker took it: some of it is journaled, some
    # only in the broker's session (not acknowledged by the daemon), maybe some half-way.
    for n in range(8, 28):
        await mqtt_probe.publish(CALL, ari("StasisStart", f"c-{n}"))
    first.kill()
    killed_at = time.time()

    second = daemons(env, "second")
    restored = await wait_log(second, "router.restored")
    assert restored["offers_republished"] == 1

    # The outstanding offer is sent again, same offer id, to the same agent.
    again = await mqtt_probe.wait_for(f"agents/{y}/offers", type="offer", count=2)
    assert {o["offer_id"] for o in again} == {offer2["offer_id"]}

    # Every contact is there exactly once, in the state it had: nothing lost, nothing doubled.
    async def all_there() -> EngineState | None:
        state = await routed_state(journal, routing, killed_at)
        return state if len(state.contacts) == 27 else None

    state = await wait_until(all_there, 30, "all 27 contacts in the restored engine")
    contacts = state.contacts
    assert contacts["asterisk-ari:c-1"].state == "assigned"
    assert contacts["asterisk-ari:c-1"].agent_id == x
    assert contacts["asterisk-ari:c-2"].state == "offered"
    assert contacts["asterisk-ari:c-2"].offer_id == offer2["offer_id"]
    assert sorted(c.id for c in contacts.values() if c.state == "queued") == sorted(
        f"asterisk-ari:c-{n}" for n in range(3, 28)
    )
    assert list(state.offers) == [offer2["offer_id"]]

    # Routing goes on where it stopped: x finishes c-1 and gets the longest-waiting call.
    await mqtt_probe.agent(x, op="complete", contact_id="asterisk-ari:c-1")
    (next_offer,) = await mqtt_probe.wait_for(
        f"agents/{x}/offers", type="offer", contact_id="asterisk-ari:c-3"
    )
    assert next_offer["offer_id"] not in (offer1["offer_id"], offer2["offer_id"])
    # c-1 was assigned once, never offered again.
    assert len(mqtt_probe.seen("events/contact.assigned", contact_id="asterisk-ari:c-1")) == 1
    assert len(mqtt_probe.seen("events/contact.offered", contact_id="asterisk-ari:c-1")) == 1
    assert second.stop() == 0


async def test_a_standby_takes_over_when_the_router_dies(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    redis_client: aioredis.Redis,
    journal: Journal,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    active = daemons(daemon_env(routing, "a"), "a")
    await wait_log(active, "router.routing")
    await wait_log(active, "mqtt.ingress.connected")
    standby = daemons(daemon_env(routing, "b"), "b")
    # The standby is up (Redis and broker connected, polling for the lease) and does not route.
    await wait_log(standby, "redis.status")
    await wait_log(standby, "mqtt.publisher.connected")
    holder = await redis_client.get(journal.keys.lease)
    assert holder is not None and holder.decode().startswith("a:")
    assert not any(line.get("event") == "router.routing" for line in standby.log_lines())

    await mqtt_probe.agent("anna", op="login")
    await mqtt_probe.publish(CALL, ari("StasisStart", "s-1"))
    (offer,) = await mqtt_probe.wait_for("agents/anna/offers", type="offer")

    active.kill()
    died = time.monotonic()
    # About one lease ttl (3 s) on an idle machine; the bound is only a last guard under load.
    await wait_log(standby, "router.routing", timeout=30)
    took = time.monotonic() - died
    assert took < 20.0, f"standby took {took:.1f}s to take over (lease ttl 3 s)"
    holder = await redis_client.get(journal.keys.lease)
    assert holder is not None and holder.decode().startswith("b:")

    # The standby knows the offer (re-sent, same id), and serves agents and calls from now on.
    await mqtt_probe.wait_for("agents/anna/offers", type="offer", count=2)
    await mqtt_probe.agent("anna", op="accept", offer_id=offer["offer_id"])
    (assigned,) = await mqtt_probe.wait_for("events/contact.assigned")
    assert assigned["contact_id"] == "asterisk-ari:s-1"
    await mqtt_probe.publish(CALL, ari("StasisStart", "s-2"))
    await mqtt_probe.wait_for("events/contact.queued", contact_id="asterisk-ari:s-2")
    assert standby.stop() == 0
    # A graceful stop hands the lease back at once.
    assert await redis_client.get(journal.keys.lease) is None
