"""Redis or the broker go away and come back: the daemon waits, reconnects, and loses nothing.

The shared Redis and Mosquitto must never be stopped, so every test here starts private ones on
free loopback ports (``private_servers``) and points a ``stellwerk run`` subprocess at them with
STELLWERK_* overrides. The test plays the telephony system (ARI events over MQTT), a chat
platform (webhooks over HTTP), the agents' desktops and an operator's probes (/healthz, /readyz),
and asserts what those would notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from channels.base import DecodeConfig
from channels.registry import decode
from router.daemon.journal import ContactEntry, Journal, connect_redis
from tests.daemon.conftest import (
    REPO,
    DaemonProcess,
    Names,
    ari,
    barrier,
    wait_until,
    write_routing,
)
from tests.daemon.private_servers import (
    HOST,
    MOSQUITTO,
    PrivateMosquitto,
    PrivateRedis,
    free_port,
)

pytestmark = pytest.mark.integration

CALL_TOPIC = "in/phone/asterisk-ari"
AGENTS = ("a1", "a2", "a3", "a4", "a5", "a6")
# Long enough that no offer expires during a test: every offer seen is a first offer.
OFFER_TIMEOUT = 120.0
# The daemon's reconnect back-off is capped at 10 s (router/daemon/mqtt.py backoff()).
BACKOFF_CAP = 10.0


# ---- private servers ------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    if not MOSQUITTO.exists():
        pytest.skip(f"{MOSQUITTO} is not installed")
    (tmp_path / "mosquitto").mkdir()
    server = PrivateMosquitto(tmp_path / "mosquitto")
    server.start()
    try:
        yield server
    finally:
        server.kill()


# ---- the daemon -----------------------------------------------------------------------------


ADMIN_TOKEN = "faults-admin-token"


class Daemon:
    """A ``stellwerk run`` subprocess and its HTTP API."""

    def __init__(self, process: DaemonProcess, http_port: int, session: aiohttp.ClientSession):
        self.process = process
        self.base = f"http://{HOST}:{http_port}"
        self.session = session

    @property
    def alive(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    async def get(self, path: str) -> tuple[int, Any]:
        # Reads of contacts need a role; the health routes ignore the token.
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with self.session.get(self.base + path, headers=headers) as resp:
            return resp.status, await resp.json()

    async def post(
        self, path: str, body: bytes, timeout: float = 5.0
    ) -> tuple[int, Any, dict[str, str]]:
        limit = aiohttp.ClientTimeout(total=timeout)
        async with self.session.post(self.base + path, data=body, timeout=limit) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    async def readyz(self) -> dict[str, Any]:
        status, body = await self.get("/readyz")
        assert (status == 200) == body["ready"], (status, body)
        return dict(body)

    async def wait_readyz(self, timeout: float = 10.0, **expected: bool) -> dict[str, Any]:
        """Wait until /readyz reports ``expected`` (e.g. ``ready=True`` or ``redis=False``)."""
        last: dict[str, Any] = {}

        async def matches() -> bool:
            nonlocal last
            last = await self.readyz()
            return all(last[k] == v for k, v in expected.items())

        try:
            await wait_until(matches, timeout, f"/readyz {expected}")
        except AssertionError as exc:
            log = self.process.log()[-3000:]
            raise AssertionError(f"{exc}; last /readyz: {last}\n{log}") from None
        return last

    def events(self, name: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines with ``event == name``."""
        return [line for line in self.process.log_lines() if line.get("event") == name]


@pytest.fixture
async def start_daemon(
    tmp_path: Path,
    names: Names,
    daemon_env: Callable[..., dict[str, str]],
) -> AsyncIterator[Callable[..., Any]]:
    """Start a daemon subprocess against the private servers; it is killed after the test."""
    started: list[DaemonProcess] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def start(redis: PrivateRedis, mqtt: PrivateMosquitto) -> Daemon:
        routing = write_routing(tmp_path / "routing.yaml", AGENTS, offer_timeout=OFFER_TIMEOUT)
        http_port = free_port()
        env = daemon_env(
            routing,
            redis_url=redis.url,
            mqtt_url=mqtt.url,
            http_addr=f"{HOST}:{http_port}",
            # The chat platform here sends unsigned webhooks: allowed only when marked so.
            sources_unsigned='["rocketchat"]',
            admin_token=ADMIN_TOKEN,
        )
        process = DaemonProcess(env=env, log_path=tmp_path / "daemon.log")
        process.start()
        started.append(process)
        daemon = Daemon(process, http_port, session)
        await wait_until(lambda: _accepts(http_port) or not daemon.alive, 30, "the HTTP API")
        assert daemon.alive, process.log()
        await daemon.wait_readyz(30, ready=True)
        return daemon

    try:
        yield start
    finally:
        await session.close()
        for process in started:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait(5)


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((HOST, port)) == 0


# ---- the peers: telephony system and agent desktops over MQTT ------------------------------


class Peer:
    """One MQTT client with a persistent session for the test's side of the broker.

    Persistent, so that it can be disconnected for a broker restart and still receive what the
    daemon published meanwhile (the broker keeps its subscriptions and queues QoS 1 messages).
    """

    def __init__(self, port: int, names: Names) -> None:
        self.port = port
        self.prefix = names.topic_prefix
        self.identifier = f"peer-{names.tag}"
        self.received: list[tuple[str, Any]] = []
        self._client: aiomqtt.Client | None = None
        self._pump: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        client = aiomqtt.Client(
            HOST, self.port, identifier=self.identifier, clean_session=False, timeout=5
        )
        await client.__aenter__()
        self._client = client
        await client.subscribe(f"{self.prefix}/agents/+/offers", qos=1)
        await client.subscribe(f"{self.prefix}/events/#", qos=1)
        self._pump = asyncio.create_task(self._run_pump(client), name="peer-pump")

    async def disconnect(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)
            self._client = None

    async def _run_pump(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                raw = message.payload
                payload: Any = json.loads(raw) if isinstance(raw, bytes | str) else raw
                self.received.append((str(message.topic), payload))

    async def publish(self, topic: str, payload: bytes | dict[str, Any]) -> None:
        """Publish QoS 1; returns once the broker (not the daemon) acknowledged it."""
        assert self._client is not None
        body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        await self._client.publish(f"{self.prefix}/{topic}", body, qos=1)

    def seen(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        full = f"{self.prefix}/{topic}"
        return [
            p
            for t, p in self.received
            if t == full and isinstance(p, dict) and all(p.get(k) == v for k, v in match.items())
        ]

    async def wait_for(self, topic: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        found = await wait_until(lambda: self.seen(topic, **match), timeout, f"{topic} {match}")
        return dict(found[0])

    def offers_by_contact(self) -> dict[str, set[str]]:
        """contact id -> the offer ids made for it (a re-sent offer keeps its id)."""
        out: dict[str, set[str]] = {}
        for agent in AGENTS:
            for offer in self.seen(f"agents/{agent}/offers", type="offer"):
                out.setdefault(offer["contact_id"], set()).add(offer["offer_id"])
        return out


@pytest.fixture
async def peer(broker: PrivateMosquitto, names: Names) -> AsyncIterator[Peer]:
    p = Peer(broker.peer_port, names)
    await p.connect()
    try:
        yield p
    finally:
        await p.disconnect()


async def login_all(peer: Peer) -> None:
    for agent in AGENTS:
        await peer.publish(f"agents/{agent}/cmd", {"op": "login"})
    for agent in AGENTS:
        await peer.wait_for("events/agent.state", agent_id=agent, state="available")


def chat(text: str) -> tuple[bytes, str]:
    """A Rocket.Chat offline-form message (unsigned: the daemon marks the source so) and its
    contact id."""
    body = json.loads(
        (REPO / "tests/fixtures/samples/chat/rocketchat-offline-message.json").read_text()
    )
    body["message"] = text
    raw = json.dumps(body).encode()
    (event,) = decode("rocketchat", raw, {}, DecodeConfig())
    return raw, event.contact_id


async def journaled(redis: PrivateRedis, names: Names) -> dict[str, int]:
    """How many times each contact id is in the journal (``new`` and later entries)."""
    client = connect_redis(redis.url)
    try:
        rows = await Journal(client, names.key_prefix).read_after("0-0", None, 10_000)
    finally:
        await client.aclose()
    counts: dict[str, int] = {}
    for _, entry in rows:
        if isinstance(entry, ContactEntry):
            counts[entry.event.contact_id] = counts.get(entry.event.contact_id, 0) + 1
    return counts


async def all_published(redis: PrivateRedis, names: Names) -> bool:
    """Whether the router has recorded every journal entry's commands as carried out."""
    client = connect_redis(redis.url)
    try:
        journal = Journal(client, names.key_prefix)
        return await journal.published() == await journal.last_id()
    finally:
        await client.aclose()


def calls(*ids: str) -> list[str]:
    return [f"asterisk-ari:{i}" for i in ids]


# ---- Redis goes away -------------------------------------------------------------------------


async def test_redis_outage_nothing_is_acknowledged_and_no_call_is_lost(
    redis_server: PrivateRedis,
    broker: PrivateMosquitto,
    peer: Peer,
    names: Names,
    start_daemon: Callable[..., Any],
) -> None:
    daemon = await start_daemon(redis_server, broker)
    await login_all(peer)
    await peer.publish(CALL_TOPIC, ari("StasisStart", "r-0"))
    offer = await peer.wait_for("events/contact.offered", contact_id="asterisk-ari:r-0")
    await wait_until(lambda: peer.offers_by_contact().get("asterisk-ari:r-0"), 30, "r-0's offer")
    # The offer can reach the peer before the router records it as carried out (the
    # published mark); a restore would then send r-0's events again, as exact repeats. The
    # test is about what happens after that: wait for the mark.
    await wait_until(lambda: all_published(redis_server, names), 30, "the published mark")

    redis_server.kill()
    # The router notices at once (its blocking read breaks), gives up the lease and stops the
    # ingress without acknowledging anything; the broker keeps the calls for the daemon's
    # persistent session. (A batch already in ingress's hands is covered by test_daemon_mqtt.)
    await peer.publish(CALL_TOPIC, ari("StasisStart", "r-1"))
    down = await daemon.wait_readyz(30, redis=False)
    assert down["ready"] is False
    for call_id in ("r-2", "r-3"):
        await peer.publish(CALL_TOPIC, ari("StasisStart", call_id))
    # The agent takes the call offered before the outage: the broker keeps the command too.
    await peer.publish(
        f"agents/{offer['agent_id']}/cmd", {"op": "accept", "offer_id": offer["offer_id"]}
    )
    # A webhook sender is told to come back later, not given a 2xx for a contact nobody kept.
    body, chat_id = chat("Meine Rechnung stimmt nicht (während Redis weg ist)")
    status, reply, headers = await daemon.post("/v1/webhooks/rocketchat", body)
    assert (status, reply["error"]) == (503, "journal_unavailable")
    assert int(headers["Retry-After"]) > 0
    # The process is up and says so; it just is not ready. (The router has given up routing
    # for the outage: it said so.)
    await wait_until(lambda: daemon.events("router.redis_down"), 30, "the router to stop")
    assert daemon.alive
    assert await daemon.get("/healthz") == (200, {"status": "ok"})
    assert (await daemon.readyz())["ready"] is False
    assert len(peer.seen("events/contact.queued")) == 1, "routed without a journal?"
    assert not peer.seen("events/contact.assigned")

    # Redis comes back with its journal (AOF): the agents are still logged in, and every call
    # the broker held for the daemon is journaled and routed.
    outage_ended = time.monotonic()
    redis_server.start()
    await daemon.wait_readyz(30, ready=True)
    back_after = time.monotonic() - outage_ended
    status, reply, _ = await daemon.post("/v1/webhooks/rocketchat", body)  # the sender's retry
    assert (status, reply) == (202, {"accepted": 1})
    # The accept sent during the outage is carried out.
    assigned = await peer.wait_for("events/contact.assigned", contact_id="asterisk-ari:r-0")
    assert assigned["agent_id"] == offer["agent_id"]
    expected = [*calls("r-0", "r-1", "r-2", "r-3"), chat_id]
    for contact_id in expected:
        await peer.wait_for("events/contact.queued", contact_id=contact_id)
        await peer.wait_for("events/contact.offered", contact_id=contact_id)
    await barrier(peer)  # a duplicate would have been published before this

    # Nothing twice: one journal entry, one queued event, one offer (id) per contact. (r-0's
    # offer may have been re-sent after the restore, with its id: desktops de-duplicate.)
    assert await journaled(redis_server, names) == dict.fromkeys(expected, 1)
    assert len(peer.seen("events/contact.assigned")) == 1
    queued = [e["contact_id"] for e in peer.seen("events/contact.queued")]
    assert sorted(queued) == sorted(expected)
    offers = peer.offers_by_contact()
    assert {c: len(ids) for c, ids in offers.items()} == dict.fromkeys(expected, 1)
    assert daemon.alive and not daemon.events("daemon.crashed")
    # Capped back-off: back within the cap (plus slack for a loaded machine) once Redis is.
    assert back_after < BACKOFF_CAP + 10.0


async def test_redis_dies_in_the_middle_of_a_burst_and_every_call_is_routed_once(
    redis_server: PrivateRedis,
    broker: PrivateMosquitto,
    peer: Peer,
    names: Names,
    start_daemon: Callable[..., Any],
) -> None:
    daemon = await start_daemon(redis_server, broker)
    await login_all(peer)
    ids = [f"b-{i}" for i in range(40)]
    for n, call_id in enumerate(ids):
        if n == 20:
            redis_server.kill()
        await peer.publish(CALL_TOPIC, ari("StasisStart", call_id))
        await asyncio.sleep(0.01)
    await daemon.wait_readyz(30, redis=False)
    redis_server.start()
    await daemon.wait_readyz(30, ready=True)
    expected = calls(*ids)
    await wait_until(
        lambda: {e["contact_id"] for e in peer.seen("events/contact.queued")} >= set(expected),
        30,
        "every call queued",
    )
    await barrier(peer)
    # Ingress is at-least-once: a batch whose write reached the AOF just as Redis died may be
    # journaled again after the restart. The engine takes the repeat as an update, so nobody
    # notices: every call is queued once and offered (at most) once.
    counts = await journaled(redis_server, names)
    assert set(counts) == set(expected)
    # Events published just before Redis died may be sent again (their published mark was not
    # written): then as exact repeats of the same decision, never as a second decision.
    queued: dict[str, list[dict[str, Any]]] = {}
    for event in peer.seen("events/contact.queued"):
        queued.setdefault(event["contact_id"], []).append(event)
    assert set(queued) == set(expected)
    assert all(all(e == events[0] for e in events) for events in queued.values())
    offers = peer.offers_by_contact()
    assert len(offers) == len(AGENTS)  # one phone call each, the rest wait in the queue
    assert all(len(o) == 1 for o in offers.values())
    assert daemon.alive and not daemon.events("daemon.crashed")


async def test_a_hung_redis_is_waited_out_and_no_call_is_lost(
    redis_server: PrivateRedis,
    broker: PrivateMosquitto,
    peer: Peer,
    names: Names,
    start_daemon: Callable[..., Any],
) -> None:
    daemon = await start_daemon(redis_server, broker)
    await login_all(peer)

    # Not dead but hung (a stalled VM, a full disk under appendfsync always): connections stay
    # open and nothing answers, so only the client's timeouts tell.
    redis_server.pause()
    hung_at = time.monotonic()
    for call_id in ("h-1", "h-2"):
        await peer.publish(CALL_TOPIC, ari("StasisStart", call_id))
    body, chat_id = chat("Vertrag kündigen, bitte Rückruf")
    status, reply, headers = await daemon.post("/v1/webhooks/rocketchat", body, timeout=60)
    # Answered, not left hanging: after the client's socket timeout (5 s) and its one retry
    # (about 10 s; the bound leaves room for a loaded machine).
    assert time.monotonic() - hung_at < 30.0
    assert (status, reply["error"]) == (503, "journal_unavailable")
    assert int(headers["Retry-After"]) > 0
    assert await daemon.get("/healthz") == (200, {"status": "ok"})
    await daemon.wait_readyz(30, ready=False)
    assert not peer.seen("events/contact.queued")

    redis_server.resume()
    await daemon.wait_readyz(BACKOFF_CAP + 30.0, ready=True)
    status, reply, _ = await daemon.post("/v1/webhooks/rocketchat", body)
    assert (status, reply) == (202, {"accepted": 1})
    expected = [*calls("h-1", "h-2"), chat_id]
    for contact_id in expected:
        await peer.wait_for("events/contact.queued", contact_id=contact_id)
        await peer.wait_for("events/contact.offered", contact_id=contact_id)
    await barrier(peer)
    assert set(await journaled(redis_server, names)) == set(expected)
    assert {c: len(o) for c, o in peer.offers_by_contact().items()} == dict.fromkeys(expected, 1)
    assert daemon.alive and not daemon.events("daemon.crashed")


# ---- the broker goes away --------------------------------------------------------------------


async def test_broker_outage_daemon_reconnects_and_drops_nothing(
    redis_server: PrivateRedis,
    broker: PrivateMosquitto,
    peer: Peer,
    names: Names,
    start_daemon: Callable[..., Any],
) -> None:
    daemon = await start_daemon(redis_server, broker)
    await login_all(peer)

    await peer.disconnect()
    broker.stop()
    went_down = time.monotonic()
    await daemon.wait_readyz(30, mqtt=False)
    assert await daemon.get("/healthz") == (200, {"status": "ok"})
    # A chat still comes in over HTTP: Redis is up, so it is journaled and acknowledged. The
    # offer the router makes for it has to wait for the broker; it must not be dropped.
    body, chat_id = chat("Router blinkt rot, Internet geht nicht")
    status, reply, _ = await daemon.post("/v1/webhooks/rocketchat", body)
    assert (status, reply) == (202, {"accepted": 1})
    # It keeps trying (with back-off) and stays up meanwhile.
    await wait_until(lambda: len(daemon.events("mqtt.publisher.disconnected")) >= 2, 30, "a retry")
    assert daemon.alive

    broker.start()
    came_back = time.monotonic()
    await peer.connect()
    await daemon.wait_readyz(BACKOFF_CAP + 30.0, ready=True)
    reconnected_after = time.monotonic() - came_back
    await peer.publish(CALL_TOPIC, ari("StasisStart", "q-1"))

    expected = [chat_id, *calls("q-1")]
    for contact_id in expected:
        await peer.wait_for("events/contact.queued", contact_id=contact_id)
        await peer.wait_for("events/contact.offered", contact_id=contact_id)
    await barrier(peer)
    assert await journaled(redis_server, names) == dict.fromkeys(expected, 1)
    # The broker may deliver a message to the peer twice across its restart (QoS 1); what
    # matters is that the daemon made one offer (one offer id) per contact.
    offers = peer.offers_by_contact()
    assert {c: len(o) for c, o in offers.items()} == dict.fromkeys(expected, 1)
    assert {e["contact_id"] for e in peer.seen("events/contact.queued")} == set(expected)

    # Back-off, not a busy loop: a handful of attempts while the broker was away, and back
    # within the cap once it returned.
    attempts = len(daemon.events("mqtt.publisher.disconnected"))
    assert 2 <= attempts <= 20, (attempts, came_back - went_down)
    assert reconnected_after <= BACKOFF_CAP + 10.0  # the cap, plus slack for a loaded machine

    # A short blip next: the successful reconnect reset the back-off, so the daemon is back at
    # once instead of after the long delay the first outage had built up.
    links = ("mqtt.publisher.connected", "mqtt.ingress.connected")
    before = [len(daemon.events(link)) for link in links]
    broker.stop()
    broker.start()
    blip = time.monotonic()
    await wait_until(
        lambda: all(len(daemon.events(k)) > n for k, n in zip(links, before, strict=True)),
        30,
        "the daemon back after the blip",
    )
    # Measured: < 0.2 s. Without the reset the delay would be drawn from up to the cap (10 s).
    assert time.monotonic() - blip < 3.0
    await daemon.wait_readyz(30, ready=True)
    assert daemon.alive and not daemon.events("daemon.crashed")


async def test_calls_published_after_a_broker_restart_before_the_daemon_reconnects_are_routed(
    redis_server: PrivateRedis,
    broker: PrivateMosquitto,
    peer: Peer,
    names: Names,
    start_daemon: Callable[..., Any],
) -> None:
    daemon = await start_daemon(redis_server, broker)
    await login_all(peer)

    # Guards the leader-mode subscription being plain: Mosquitto 2.0 restores a persistent
    # session's plain subscriptions from its persistence file but not '$share/...' ones, and with
    # those these calls were acknowledged to the PBX and dropped (measured before db6c0d4).
    await peer.disconnect()
    broker.stop()
    await daemon.wait_readyz(30, mqtt=False)
    # The broker is back, but the daemon cannot reach it yet (its listener stays closed): the
    # PBX publishes calls and the broker acknowledges them, for the daemon's persistent session.
    broker.start(daemon=False)
    await peer.connect()
    for call_id in ("q-1", "q-2", "q-3"):
        await peer.publish(CALL_TOPIC, ari("StasisStart", call_id))
    assert (await daemon.readyz())["mqtt"] is False
    # The broker restarts once more with the daemon's listener (persistence keeps what it has).
    await peer.disconnect()
    broker.stop()
    broker.start()
    await peer.connect()
    await daemon.wait_readyz(BACKOFF_CAP + 30.0, ready=True)

    expected = calls("q-1", "q-2", "q-3")
    await wait_until(
        lambda: {e["contact_id"] for e in peer.seen("events/contact.queued")} >= set(expected),
        30,
        f"{expected} queued",
    )
    for contact_id in expected:
        await peer.wait_for("events/contact.offered", contact_id=contact_id)
    assert await journaled(redis_server, names) == dict.fromkeys(expected, 1)
    assert {c: len(o) for c, o in peer.offers_by_contact().items()} == dict.fromkeys(expected, 1)
    assert daemon.alive and not daemon.events("daemon.crashed")


async def test_broker_killed_and_restarted_routing_resumes(
    redis_server: PrivateRedis,
    broker: PrivateMosquitto,
    peer: Peer,
    start_daemon: Callable[..., Any],
) -> None:
    daemon = await start_daemon(redis_server, broker)
    await login_all(peer)
    await peer.publish(CALL_TOPIC, ari("StasisStart", "k-1"))
    await peer.wait_for("events/contact.offered", contact_id="asterisk-ari:k-1")

    await peer.disconnect()
    broker.kill()
    await daemon.wait_readyz(30, mqtt=False)
    broker.start()
    await peer.connect()
    await daemon.wait_readyz(BACKOFF_CAP + 30.0, ready=True)
    await peer.publish(CALL_TOPIC, ari("StasisStart", "k-2"))
    await peer.wait_for("events/contact.offered", contact_id="asterisk-ari:k-2")
    assert set(peer.offers_by_contact()) == set(calls("k-1", "k-2"))
    assert daemon.alive and not daemon.events("daemon.crashed")


async def test_offers_in_flight_when_the_broker_dies_are_resent_as_soon_as_it_is_back(
    redis_server: PrivateRedis,
    broker: PrivateMosquitto,
    peer: Peer,
    start_daemon: Callable[..., Any],
) -> None:
    daemon = await start_daemon(redis_server, broker)
    await login_all(peer)
    # The broker is SIGKILLed below: wait for its autosave (every 1 s) to write the peer's
    # session, which it would otherwise forget (that loss would be the broker's, not ours).
    subscribed = time.time()
    await wait_until(
        lambda: any(p.stat().st_mtime > subscribed for p in broker.dir.glob("*.db")),
        30,
        "the broker's autosave",
    )
    await peer.disconnect()

    # The broker hangs, so the offer for a chat arriving now is sent but never acknowledged;
    # then it dies (a watchdog restarts it) and is back at once.
    broker.pause()
    body, chat_id = chat("Paket nicht angekommen")
    status, _, _ = await daemon.post("/v1/webhooks/rocketchat", body)
    assert status == 202

    # The router has made the offer, and is stuck publishing it to the hung broker.
    async def offered() -> bool:
        status, info = await daemon.get(f"/v1/contacts/{chat_id}")
        return status == 200 and info.get("state") == "offered"

    await wait_until(offered, 30, "the router to make the offer")
    broker.kill()
    broker.start()
    back = time.monotonic()
    await peer.connect()
    await daemon.wait_readyz(30, ready=True)
    await peer.publish(CALL_TOPIC, ari("StasisStart", "f-1"))

    # The agent gets the offer, and routing goes on, within a few seconds of the broker's
    # return (the daemon's first reconnect attempts come after at most 0.2 s, 0.4 s, ...).
    await peer.wait_for("events/contact.offered", timeout=30.0, contact_id=chat_id)
    await peer.wait_for("events/contact.queued", timeout=30.0, contact_id="asterisk-ari:f-1")
    # A few seconds when idle; never as late as a back-off grown to its cap would make it.
    assert time.monotonic() - back < BACKOFF_CAP
    assert chat_id in peer.offers_by_contact()
    assert daemon.alive and not daemon.events("daemon.crashed")
