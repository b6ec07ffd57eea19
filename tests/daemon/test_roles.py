"""``stellwerk run --role ingest|router``: two processes that meet only in the Redis journal.

Real daemon subprocesses on the shared Redis and broker: the ingest one takes contacts and
agents' commands into the journal and never routes, the router one routes and offers and never
consumes MQTT ingress; leader-mode ingest nodes hand the sessions over through their own lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from router.daemon.config import RouterSettings, Settings
from router.daemon.journal import Journal
from router.daemon.mqtt import Publisher
from tests.daemon.conftest import DaemonProcess, MqttProbe, Names, ari, wait_until, write_routing
from tests.daemon.private_servers import free_port
from tests.daemon.test_ingress_sessions import journal_kinds

pytestmark = pytest.mark.integration

CALL = "in/phone/asterisk-ari"
STARTUP = 30.0  # a daemon subprocess starting on a busy machine


def events(daemon: DaemonProcess, event: str, **match: Any) -> list[dict[str, Any]]:
    """The daemon's JSON log lines with this ``event`` (and these fields)."""
    return [
        line
        for line in daemon.log_lines()
        if line.get("event") == event and all(line.get(k) == v for k, v in match.items())
    ]


async def get(port: int, path: str) -> tuple[int, Any]:
    """(status, JSON body or text) of ``GET path`` on a daemon; (0, None) while it is down."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body
    except aiohttp.ClientConnectionError:
        return 0, None


async def ready(port: int) -> dict[str, Any] | None:
    status, body = await get(port, "/readyz")
    return body if status == 200 else None


class Node(NamedTuple):
    process: DaemonProcess
    port: int  # its HTTP API's


async def ingest_nodes(
    daemons: Callable[..., DaemonProcess],
    daemon_env: Callable[..., dict[str, str]],
    routing: Path,
    nodes: dict[str, dict[str, str]],
) -> dict[str, Node]:
    """An ingest daemon per node of ``nodes`` (with its settings there), each serving HTTP
    on a port of its own; all started at once, returned once each is ready."""
    started = {}
    for node, settings in nodes.items():
        port = free_port()
        env = daemon_env(routing, node, role="ingest", http_addr=f"127.0.0.1:{port}", **settings)
        started[node] = Node(daemons(env, node), port)
    for _, port in started.values():
        await wait_until(lambda p=port: ready(p), STARTUP, "the ingest daemons ready")
    return started


def mqtt_accepted(metrics_page: str) -> float:
    """MQTT deliveries a daemon journaled (``stellwerk_ingress_deliveries_total``)."""
    total = 0.0
    for line in metrics_page.splitlines():
        if line.startswith("stellwerk_ingress_deliveries_total{") and all(
            label in line for label in ('transport="mqtt"', 'outcome="accepted"')
        ):
            total += float(line.split()[-1])
    return total


async def test_an_ingest_and_a_router_process_route_a_call_end_to_end(
    tmp_path: Path,
    names: Names,
    journal: Journal,
    redis_client: aioredis.Redis,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[..., DaemonProcess],
) -> None:
    # Long enough an offer for the accept to travel through both processes on a busy machine.
    routing = write_routing(tmp_path / "routing.yaml", agents=("anna",), offer_timeout=30)
    # The role by setting for one, by flags for the other (the flags win over the env).
    ingest, ingest_port = (await ingest_nodes(daemons, daemon_env, routing, {"ing": {}}))["ing"]
    router_port = free_port()
    assert await ready(ingest_port) == {
        "ready": True,
        "role": "ingest",
        "redis": True,
        "mqtt": True,
        "ingest_lease": True,
    }
    # It has no rules to reload, and says so (it goes on running).
    assert ingest.proc is not None
    ingest.proc.send_signal(signal.SIGHUP)
    await wait_until(
        lambda: any(e.get("event") == "rules.reload_ignored" for e in ingest.log_lines()),
        20,
        "the ingest daemon to log that it ignores SIGHUP",
    )
    # Alone, the ingest daemon journals what arrives; nobody routes it.
    await mqtt_probe.agent("anna", op="login")
    await mqtt_probe.publish(CALL, ari("StasisStart", "split-1"))

    async def both_journaled() -> bool:
        return sorted(k for k, _ in await journal_kinds(journal)) == ["agent", "contact"]

    await wait_until(both_journaled, 20, "the login and the call journaled")
    assert await redis_client.get(f"{names.key_prefix}lease") is None  # no routing lease taken
    holder = await redis_client.get(f"{names.key_prefix}lease:ingest")
    assert holder is not None and holder.decode().startswith("ing:")
    assert mqtt_probe.seen("agents/anna/offers") == []

    router = daemons(
        daemon_env(routing, "rt", role="all", http_addr=""),
        "rt",
        "--role",
        "router",
        "--http-addr",
        f"127.0.0.1:{router_port}",
    )
    (offer,) = await mqtt_probe.wait_for("agents/anna/offers", timeout=STARTUP, type="offer")
    assert offer["contact_id"] == "asterisk-ari:split-1"
    router_ready = await wait_until(lambda: ready(router_port), STARTUP, "the router ready")
    assert (router_ready["role"], router_ready["lease"]) == ("router", True)

    # Contacts after the start flow through both: accept, a second call offered after wrap-up.
    await mqtt_probe.agent("anna", op="accept", offer_id=offer["offer_id"])
    await mqtt_probe.wait_for("events/contact.assigned", contact_id="asterisk-ari:split-1")

    # Each serves its own HTTP routes (docs/daemon.md, "Roles").
    assert (await get(ingest_port, "/v1/queues"))[0] == 404
    assert (await get(router_port, "/v1/queues"))[0] == 401  # there, behind a token
    async with aiohttp.ClientSession() as http:
        hook = "/v1/webhooks/asterisk-ari"
        async with http.post(f"http://127.0.0.1:{router_port}{hook}", data=b"{}") as resp:
            assert resp.status == 404
        async with http.post(f"http://127.0.0.1:{ingest_port}{hook}", data=b"{}") as resp:
            assert resp.status in (400, 401)  # taken, and judged by the intake

    # Who did what: the ingest one consumed the sessions, never routed or offered.
    _, ingest_metrics = await get(ingest_port, "/metrics")
    _, router_metrics = await get(router_port, "/metrics")
    assert mqtt_accepted(ingest_metrics) >= 3  # login, call, accept
    assert mqtt_accepted(router_metrics) == 0
    assert {e["kind"] for e in events(ingest, "mqtt.ingress.connected")} == {"agents", "contacts"}
    assert events(router, "mqtt.ingress.connected") == []
    assert events(ingest, "lease.acquired", lease="routing") == []
    assert events(ingest, "contact.offered") == []
    assert events(router, "contact.offered", contact_id="asterisk-ari:split-1")
    (started,) = events(ingest, "daemon.started")
    assert started["role"] == "ingest"
    assert ingest.stop() == 0
    assert router.stop() == 0


async def test_a_standby_ingest_node_takes_the_sessions_over(
    tmp_path: Path,
    names: Names,
    journal: Journal,
    redis_client: aioredis.Redis,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[..., DaemonProcess],
) -> None:
    """Leader mode: two ingest nodes, one consumes (the ingest lease); when it dies, the other
    resumes the same sessions, with what was published meanwhile."""
    routing = write_routing(tmp_path / "routing.yaml")
    nodes = await ingest_nodes(daemons, daemon_env, routing, {"i1": {}, "i2": {}})

    async def holder() -> str | None:
        value = await redis_client.get(f"{names.key_prefix}lease:ingest")
        return value.decode().partition(":")[0] if value else None

    first = await wait_until(holder, 10, "an ingest lease holder")
    standby = "i2" if first == "i1" else "i1"
    assert (await ready(nodes[standby].port) or {}).get("ingest_lease") is False
    # Only the holder consumes: one contact session connected, in the holder.
    assert events(nodes[standby].process, "mqtt.ingress.connected") == []

    nodes[first].process.kill()
    await mqtt_probe.publish(CALL, ari("StasisStart", "while-away"))

    async def journaled() -> bool:
        return any(k == "contact" for k, _ in await journal_kinds(journal))

    await wait_until(journaled, 20, "the call journaled by the standby")
    assert await holder() == standby
    assert {e["kind"] for e in events(nodes[standby].process, "mqtt.ingress.connected")} == {
        "agents",
        "contacts",
    }
    assert nodes[standby].process.stop() == 0


@pytest.mark.parametrize(
    ("args", "extra", "said"),
    [
        # Forwarded answers come in by SMTP and need the router's contacts: one process.
        (
            ("--role", "ingest"),
            {
                "outbound_mail": (
                    '{"host": "127.0.0.1", "port": 2500, "security": "none", "forward": '
                    '{"secret": "0123456789abcdef0123456789", "reply_address": '
                    '"antwort@team.example", "agents": {"anna": "anna@team.example"}}}'
                )
            },
            "outbound.mail.forward needs role all",
        ),
        (("--role", "router", "--http-addr", "nowhere"), {}, "--http-addr: 'nowhere' is not"),
    ],
)
def test_settings_a_role_cannot_serve_are_refused_at_start(
    tmp_path: Path,
    daemon_env: Callable[..., dict[str, str]],
    args: tuple[str, ...],
    extra: dict[str, str],
    said: str,
) -> None:
    import subprocess
    import sys

    from tests.daemon.conftest import REPO

    routing = write_routing(tmp_path / "routing.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "run", *args],
        cwd=REPO,
        env=daemon_env(routing, "x", **extra),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr.decode()
    assert said in done.stderr.decode()


async def test_in_shared_mode_every_ingest_node_consumes_without_a_lease(
    tmp_path: Path,
    names: Names,
    journal: Journal,
    redis_client: aioredis.Redis,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[..., DaemonProcess],
) -> None:
    from tests.daemon.conftest import drop_session

    routing = write_routing(tmp_path / "routing.yaml")
    # Shared mode: a persistent session of its own per node.
    shared = {
        node: {"mqtt_ingress": "shared", "mqtt_client_id": f"stw-{names.tag}-{node}"}
        for node in ("s1", "s2")
    }
    try:
        nodes = [
            node.process
            for node in (await ingest_nodes(daemons, daemon_env, routing, shared)).values()
        ]
        for node in nodes:
            kinds = {e["kind"] for e in events(node, "mqtt.ingress.connected")}
            assert kinds == {"agents", "contacts"}
        assert await redis_client.get(f"{names.key_prefix}lease:ingest") is None
        for n in range(20):
            await mqtt_probe.publish(CALL, ari("StasisStart", f"shared-{n}"))

        async def all_journaled() -> bool:
            return len(await journal_kinds(journal)) == 20

        await wait_until(all_journaled, 30, "every call journaled once")
        for node in nodes:
            assert node.stop() == 0
    finally:
        for node in shared:
            await drop_session(f"stw-{names.tag}-{node}")


def test_roles_sharing_a_node_id_publish_under_different_client_ids() -> None:
    # One settings file with router.node_id for both processes on a host: the broker would
    # throw one publisher off whenever the other connects if their client ids were equal.
    base = Settings(router=RouterSettings(node_id="host-a"))
    ids = {
        role: Publisher(msgspec.structs.replace(base, role=role))._identifier
        for role in ("all", "ingest", "router")
    }
    assert len(set(ids.values())) == 3
    assert ids["all"].endswith("-pub-host-a")  # a one-process daemon keeps its id


async def sample_readiness(port: int, until: asyncio.Event) -> list[tuple[int, Any]]:
    """``GET /readyz`` of a daemon every 0.1 s until ``until`` is set: (status, body) each."""
    seen: list[tuple[int, Any]] = []
    while not until.is_set():
        seen.append(await get(port, "/readyz"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), 0.1)
    return seen


async def publish_over(probe: MqttProbe, ids: list[str], seconds: float) -> None:
    """Publish a call per id, spread over ``seconds`` (traffic, not a burst: a session thrown
    off and reconnecting again and again would show in that time)."""
    for channel in ids:
        await probe.publish(CALL, ari("StasisStart", channel))
        await asyncio.sleep(seconds / len(ids))


def sessions_connected(daemon: DaemonProcess) -> list[str]:
    """The MQTT ingress sessions the daemon connected, by kind, as often as it did."""
    return sorted(e["kind"] for e in events(daemon, "mqtt.ingress.connected"))


async def contacts_journaled(journal: Journal) -> Counter[str]:
    """How often each contact id is in the journal."""
    return Counter(c for kind, c in await journal_kinds(journal) if kind == "contact")


async def test_an_all_and_an_ingest_node_side_by_side_share_the_ingest_lease(
    tmp_path: Path,
    names: Names,
    journal: Journal,
    redis_client: aioredis.Redis,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[..., DaemonProcess],
) -> None:
    """Leader mode, a rolling migration half done: the ingest node holds the ingest lease, the
    all node routes without consuming; neither throws the other's sessions off. When the ingest
    node dies, the all node takes the ingest lease (after the TTL) and consumes what was
    published meanwhile."""
    routing = write_routing(tmp_path / "routing.yaml")
    ingest, ingest_port = (await ingest_nodes(daemons, daemon_env, routing, {"ing": {}}))["ing"]
    all_port = free_port()
    both = daemons(daemon_env(routing, "all1", http_addr=f"127.0.0.1:{all_port}"), "all1")
    routing_ready = await wait_until(lambda: ready(all_port), STARTUP, "the all daemon ready")
    # It routes, publishes, and says that it does not consume MQTT.
    assert routing_ready["lease"] and routing_ready["mqtt"]
    assert routing_ready["ingest_lease"] is False

    calls = [f"side-{n}" for n in range(12)]
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_readiness(all_port, done))
    await publish_over(mqtt_probe, calls, 2.5)
    for channel in calls:
        await mqtt_probe.wait_for("events/contact.queued", contact_id=f"asterisk-ari:{channel}")
    done.set()
    samples = await sampler
    # Ready all along (no flap), never claiming the ingest lease it did not hold.
    assert samples and all(status == 200 for status, _ in samples), samples
    assert all(body["ingest_lease"] is False for _, body in samples)
    assert await contacts_journaled(journal) == Counter(f"asterisk-ari:{c}" for c in calls)
    # One connection per session, in the ingest node; none in the all node; nobody thrown off.
    assert sessions_connected(ingest) == ["agents", "contacts"]
    assert events(both, "mqtt.ingress.connected") == []
    assert events(ingest, "mqtt.ingress.disconnected") == []
    _, ingest_metrics = await get(ingest_port, "/metrics")
    _, all_metrics = await get(all_port, "/metrics")
    assert (mqtt_accepted(ingest_metrics), mqtt_accepted(all_metrics)) == (len(calls), 0)

    # The ingest node dies: its lease stays until it expires, then the all node takes it.
    ingest.kill()
    lease_key = f"{names.key_prefix}lease:ingest"
    left = await redis_client.get(lease_key)
    assert left is not None and left.decode().startswith("ing:")
    meanwhile = ["away-1", "away-2", "away-3"]
    for channel in meanwhile:
        await mqtt_probe.publish(CALL, ari("StasisStart", channel))
    for channel in meanwhile:
        await mqtt_probe.wait_for("events/contact.queued", contact_id=f"asterisk-ari:{channel}")
    held = await redis_client.get(lease_key)
    assert held is not None and held.decode().startswith("all1:")
    assert sessions_connected(both) == ["agents", "contacts"]
    assert await contacts_journaled(journal) == Counter(
        f"asterisk-ari:{c}" for c in calls + meanwhile
    )
    taken_over = await wait_until(lambda: ready(all_port), 10, "the all daemon ready again")
    assert taken_over["ingest_lease"] is True
    assert both.stop() == 0


async def test_an_ingest_node_joining_a_lone_all_node_waits_for_its_ingest_lease(
    tmp_path: Path,
    names: Names,
    journal: Journal,
    redis_client: aioredis.Redis,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[..., DaemonProcess],
) -> None:
    """The other step of a rolling migration: a lone all node consumes while it routes; an
    ingest node that joins stays a standby; the all node's graceful stop releases the ingest
    lease, and the ingest node takes the sessions over at once, with what was published."""
    routing = write_routing(tmp_path / "routing.yaml")
    all_port = free_port()
    both = daemons(daemon_env(routing, "all1", http_addr=f"127.0.0.1:{all_port}"), "all1")
    alone = await wait_until(lambda: ready(all_port), STARTUP, "the all daemon ready")
    assert alone["ingest_lease"] is True
    # Ready only once it consumes: an agent's login published now is not lost.
    assert sessions_connected(both) == ["agents", "contacts"]
    ingest, ingest_port = (await ingest_nodes(daemons, daemon_env, routing, {"ing": {}}))["ing"]
    standby = await ready(ingest_port)
    assert standby is not None and standby["ingest_lease"] is False

    calls = [f"lone-{n}" for n in range(8)]
    await publish_over(mqtt_probe, calls, 2.0)
    for channel in calls:
        await mqtt_probe.wait_for("events/contact.queued", contact_id=f"asterisk-ari:{channel}")
    assert await contacts_journaled(journal) == Counter(f"asterisk-ari:{c}" for c in calls)
    assert sessions_connected(both) == ["agents", "contacts"]
    assert events(ingest, "mqtt.ingress.connected") == []
    assert events(both, "mqtt.ingress.disconnected") == []

    # A graceful stop releases the ingest lease with the routing one: not left to expire.
    assert both.stop() == 0
    lease_key = f"{names.key_prefix}lease:ingest"
    holder = await redis_client.get(lease_key)
    assert holder is None or holder.decode().startswith("ing:")
    await mqtt_probe.publish(CALL, ari("StasisStart", "after-all"))

    async def journaled_once() -> bool:
        return (await contacts_journaled(journal))["asterisk-ari:after-all"] == 1

    await wait_until(journaled_once, 20, "the call journaled by the ingest node")
    assert sessions_connected(ingest) == ["agents", "contacts"]
    assert ingest.stop() == 0
