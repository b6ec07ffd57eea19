"""The daemon's supervision with real processes: the leader-mode ingress follows the lease, a
second Ctrl-C forces the exit, a second Redis outage is retried with a fresh back-off, and an
exit held up after the stop is bounded.

The daemons are ``stellwerk run`` subprocesses; the test plays the PBX and the agents over MQTT
(the shared broker) and reads what the daemons logged. The Redis-outage and forced-exit tests
use a private Redis (``private_servers``), since the shared one must never be stopped.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from router.daemon.journal import Journal, TickEntry
from tests.daemon.conftest import DaemonProcess, MqttProbe, ari, wait_until, write_routing
from tests.daemon.private_servers import PrivateRedis, free_port

pytestmark = pytest.mark.integration

CALL = "in/phone/asterisk-ari"
# A daemon subprocess starting on a busy machine (imports, connections) can take a while.
STARTUP = 30.0


def events(daemon: DaemonProcess, event: str, **match: Any) -> list[dict[str, Any]]:
    """The daemon's JSON log lines with this ``event`` (and these fields)."""
    return [
        line
        for line in daemon.log_lines()
        if line.get("event") == event and all(line.get(k) == v for k, v in match.items())
    ]


async def wait_log(
    daemon: DaemonProcess, event: str, count: int = 1, timeout: float = 10.0, **match: Any
) -> list[dict[str, Any]]:
    """Wait until the daemon logged ``event`` ``count`` times; those lines."""

    def find() -> list[dict[str, Any]] | None:
        found = events(daemon, event, **match)
        if len(found) >= count:
            return found
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}):\n{daemon.log()}")
        return None

    return list(await wait_until(find, timeout, f"{count}x log event {event} {match}"))


async def test_the_leader_ingress_stops_with_the_lease_and_resumes_with_it(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    redis_client: aioredis.Redis,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60, wrap_up=0)
    a = daemons(daemon_env(routing, "a"), "a")
    await wait_log(a, "router.routing", timeout=STARTUP)
    await wait_log(a, "mqtt.ingress.connected", timeout=STARTUP)
    b = daemons(daemon_env(routing, "b"), "b")
    await wait_log(b, "daemon.started", timeout=STARTUP)
    await mqtt_probe.agent("anna", op="login")
    await mqtt_probe.wait_for("events/agent.state", state="available")
    await mqtt_probe.publish(CALL, ari("StasisStart", "c-1"))
    await mqtt_probe.wait_for("events/contact.queued", contact_id="asterisk-ari:c-1")

    # Someone else holds the lease for 3 s (a partition, say): a must stop consuming at once.
    lease_key = f"{a.env['STELLWERK_KEY_PREFIX']}lease"
    await redis_client.set(lease_key, "intruder", px=3000)
    # (Found by the next renewal or by the next fenced write, whichever comes first.)
    await wait_log(a, "lease.released")
    await wait_log(a, "mqtt.ingress.following", held=False)
    # The standby never consumed: it never held the lease.
    assert not events(b, "mqtt.ingress.connected")
    lost_at = time.monotonic()
    await mqtt_probe.publish(CALL, ari("StasisStart", "c-2"))
    await asyncio.sleep(0.5)
    if await redis_client.get(lease_key) == b"intruder":  # still nobody's: nothing consumed
        assert not mqtt_probe.seen("events/contact.queued", contact_id="asterisk-ari:c-2")

    # The intruder's lease expires; whoever takes it resumes the session and routes c-2.
    await mqtt_probe.wait_for("events/contact.queued", contact_id="asterisk-ari:c-2", timeout=10)
    assert time.monotonic() - lost_at > 1.0  # not before the lease was free again
    # The replay of a restore publishes before the router logs that it routes: wait for the log.

    def routing_again() -> list[DaemonProcess] | None:
        now = [d for d in (a, b) if len(events(d, "router.routing")) == (2 if d is a else 1)]
        return now or None

    resumed = await wait_until(routing_again, 10, "a daemon routing again")
    assert len(resumed) == 1, (a.log(), b.log())
    holder = resumed[0]
    await wait_log(holder, "mqtt.ingress.following", count=2 if holder is a else 1, held=True)
    # Exactly one daemon consumes: the other is not following the lease.
    other = b if holder is a else a
    assert len(events(other, "mqtt.ingress.following", held=True)) == len(
        events(other, "mqtt.ingress.following", held=False)
    )
    assert a.stop() == 0 and b.stop() == 0


async def test_a_second_sigint_exits_at_once_with_130(
    tmp_path: Path,
    redis_server: PrivateRedis,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    d = daemons(daemon_env(routing, "a", redis_url=redis_server.url), "a")
    await wait_log(d, "router.routing", timeout=STARTUP)
    # A hung Redis makes the graceful shutdown wait (socket timeouts, the 10 s bound).
    redis_server.pause()
    try:
        assert d.proc is not None
        d.proc.send_signal(signal.SIGINT)
        await wait_log(d, "daemon.stopping")
        await asyncio.sleep(0.3)
        assert d.proc.poll() is None  # the first Ctrl-C waits for the hand-over
        second = time.monotonic()
        d.proc.send_signal(signal.SIGINT)
        rc = await asyncio.to_thread(d.proc.wait, 5)
        assert rc == 130
        assert time.monotonic() - second < 2.0
        assert events(d, "daemon.forced_exit", signal="SIGINT")
        assert not events(d, "daemon.stopped")  # no graceful end was waited for
    finally:
        redis_server.resume()


async def test_a_single_sigint_still_stops_gracefully(
    tmp_path: Path,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    d = daemons(daemon_env(routing, "a"), "a")
    await wait_log(d, "router.routing", timeout=STARTUP)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(d.proc.wait, 15) == 0
    assert events(d, "router.handed_over") and events(d, "lease.released")
    assert events(d, "daemon.stopped")


async def test_a_redis_outage_after_an_earlier_one_starts_from_a_fresh_back_off(
    tmp_path: Path,
    redis_server: PrivateRedis,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    d = daemons(daemon_env(routing, "a", redis_url=redis_server.url), "a")
    await wait_log(d, "router.routing", timeout=STARTUP)

    # First outage: the router gives the lease up and waits a jittered back-off.
    redis_server.stop()
    first = await wait_log(d, "router.redis_down", timeout=20)
    assert first[0]["attempt"] == 1
    redis_server.start()
    await wait_log(d, "router.routing", count=2, timeout=25)

    # Second outage: the count starts over, since the router routed in between (it used to
    # go on counting across outages, so after a few every retry waited near the 10 s cap).
    seen = len(events(d, "router.redis_down"))
    redis_server.stop()
    again = await wait_log(d, "router.redis_down", count=seen + 1, timeout=20)
    assert again[seen]["attempt"] == 1
    assert again[seen]["retry_in"] <= 0.2  # full jitter over base 0.1 * 2**1
    redis_server.start()
    await wait_log(d, "router.routing", count=3, timeout=25)
    assert d.stop() == 0


async def test_readyz_and_metrics_report_the_journal_lag(
    tmp_path: Path,
    start_daemon: Callable[..., Any],
    journal: Journal,
) -> None:
    """The backlog is in the /readyz detail and on /metrics; it falls to 0 once applied."""
    port = free_port()
    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    daemon = await start_daemon(routing, http_addr=f"127.0.0.1:{port}")
    # A burst straight into the journal (as ingress would write it): 3,000 time ticks.
    await journal.append_many([TickEntry(at=time.time()) for _ in range(3000)])
    async with aiohttp.ClientSession() as http:
        seen: list[dict[str, Any]] = []

        async def caught_up() -> bool:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                body = await resp.json()
            seen.append(body["journal_lag"])
            return body["journal_lag"] == {"entries": 0, "seconds": 0.0}

        await wait_until(caught_up, 15, "the router to catch up")
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    assert "stellwerk_journal_lag_entries 0.0" in text
    # Every reading while routing carries both figures.
    assert all(set(lag) == {"entries", "seconds"} for lag in seen if lag is not None)
    assert daemon.state.journal_lag == (0, 0.0)


async def test_the_ingress_client_holds_a_bounded_number_of_received_messages() -> None:
    """aiomqtt's incoming queue is unbounded by default; the ingress's is bounded above the
    MQTT 5 Receive Maximum, so no QoS 1 message is ever dropped for want of room."""
    from router.daemon.config import load_settings
    from router.daemon.mqtt import AiomqttInternals, incoming_bound, make_client

    mqtt = load_settings(None, env={"STELLWERK_MQTT_MAX_INFLIGHT": "700"}).settings.mqtt
    ingress = make_client(mqtt, "bound-test", persistent=True, manual_ack=True)
    publisher = make_client(mqtt, "bound-test-pub", persistent=False)
    assert AiomqttInternals(ingress)._queue.maxsize == incoming_bound(mqtt) > 700
    assert AiomqttInternals(publisher)._queue.maxsize == 0  # subscribes to nothing


# Loaded by the daemon's interpreter at start (``sitecustomize`` on its PYTHONPATH): a worker
# thread that never ends, as a library's stuck thread would be. (It imports nothing of ours:
# at that point the checkout is not yet on sys.path, and the installed copy would be found.)
STUCK_THREAD = """
import threading, time

def stuck_worker():
    while True:
        time.sleep(0.05)

threading.Thread(target=stuck_worker, name="stuck-worker").start()
"""


async def test_a_process_whose_exit_hangs_after_the_stop_still_exits_with_the_stacks(
    tmp_path: Path,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
) -> None:
    from router.daemon.main import EXIT_GRACE_S

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(STUCK_THREAD)
    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    env = daemon_env(routing, "a")
    env["PYTHONPATH"] = f"{hooks}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(hooks)
    d = daemons(env, "a")
    await wait_log(d, "router.routing", timeout=STARTUP)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    await wait_log(d, "daemon.stopped", timeout=15)
    stopped = time.monotonic()
    # The interpreter's exit waits for the stuck thread: bounded by the grace, not for ever.
    rc = await asyncio.to_thread(d.proc.wait, EXIT_GRACE_S + 10)
    assert rc == 1
    assert time.monotonic() - stopped >= EXIT_GRACE_S - 1.0
    # Every thread's stack is on stderr: the operator sees what held the exit.
    assert "in stuck_worker" in d.log()
