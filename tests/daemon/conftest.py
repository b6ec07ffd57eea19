"""Shared fixtures of the daemon tests: the real Redis and Mosquitto, one namespace per test.

Every test gets its own Redis key prefix and MQTT topic prefix (``names``, under this run's
prefixes from :mod:`tests.servers`, which also says how to point the suite at other servers),
and everything under the key prefix is deleted afterwards, failed or not, so tests can run in
any order and next to a live daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import redis.asyncio as aioredis

from router.daemon.journal import Journal, connect_redis
from tests.daemon.private_servers import REDIS_SERVER, PrivateRedis
from tests.servers import (
    MQTT_HOST,
    MQTT_PASSWORD,
    MQTT_PORT,
    MQTT_URL,
    MQTT_USER,
    OWNERS,
    REDIS_URL,
)
from tests.servers import key_prefix as run_key_prefix
from tests.servers import topic_prefix as run_topic_prefix

__all__ = ["MQTT_HOST", "MQTT_PORT", "MQTT_URL", "REDIS_URL"]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Names:
    """One test's namespace."""

    key_prefix: str
    topic_prefix: str
    tag: str


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    tag = uuid.uuid4().hex[:10]
    OWNERS[tag] = request.node.nodeid
    return Names(key_prefix=run_key_prefix(tag), topic_prefix=run_topic_prefix(tag), tag=tag)


@pytest.fixture
async def redis_client(names: Names) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(REDIS_URL)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{names.key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def journal(redis_client: aioredis.Redis, names: Names) -> Journal:
    return Journal(redis_client, names.key_prefix)


# ---- MQTT ----------------------------------------------------------------------------------


@dataclass
class MqttProbe:
    """A test's MQTT client: publishes like a peer system, records what the daemon publishes."""

    client: aiomqtt.Client
    prefix: str
    received: list[tuple[str, Any]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, topic: str, payload: bytes | str | dict[str, Any]) -> None:
        """Publish (QoS 1) under the test's prefix; dicts are sent as JSON."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        await self.client.publish(f"{self.prefix}/{topic}", payload, qos=1)

    async def agent(self, agent_id: str, **cmd: Any) -> None:
        """Send an agent command (``op=...``) on the agent's cmd topic."""
        await self.publish(f"agents/{agent_id}/cmd", cmd)

    def seen(self, topic: str, **match: Any) -> list[Any]:
        """Payloads received on ``topic`` (relative) whose fields include ``match``."""
        full = f"{self.prefix}/{topic}"
        return [
            p
            for t, p in self.received
            if t == full and isinstance(p, dict) and all(p.get(k) == v for k, v in match.items())
        ]

    async def wait_for(
        self, topic: str, timeout: float = 20.0, count: int = 1, **match: Any
    ) -> list[Any]:
        """Wait until ``count`` matching payloads arrived on ``topic``; return them. (The
        timeout is a last guard for a loaded machine; it returns as soon as they are here.)"""
        deadline = time.monotonic() + timeout
        while True:
            found = self.seen(topic, **match)
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = [(t, p) for t, p in self.received[-10:]]
                raise AssertionError(
                    f"no {count}x {topic} {match} within {timeout}s; last seen: {recent}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _pump(self) -> None:
        async for message in self.client.messages:
            raw = message.payload
            try:
                payload: Any = json.loads(raw) if isinstance(raw, bytes | str) else raw
            except ValueError:
                payload = raw
            self.received.append((str(message.topic), payload))
            self._changed.set()


@pytest.fixture
async def mqtt_probe(names: Names) -> AsyncIterator[MqttProbe]:
    async with aiomqtt.Client(
        MQTT_HOST,
        MQTT_PORT,
        username=MQTT_USER,
        password=MQTT_PASSWORD,
        identifier=f"probe-{names.tag}",
    ) as client:
        await client.subscribe(f"{names.topic_prefix}/agents/+/offers", qos=1)
        await client.subscribe(f"{names.topic_prefix}/events/#", qos=1)
        probe = MqttProbe(client=client, prefix=names.topic_prefix)
        task = asyncio.create_task(probe._pump(), name="mqtt-probe")
        try:
            yield probe
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


# ---- the daemon as a subprocess -------------------------------------------------------------


@dataclass
class DaemonProcess:
    """``stellwerk run`` in a child process, configured through env overrides."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    #: more ``stellwerk run`` arguments (``--role``, ``--http-addr``)
    args: tuple[str, ...] = ()

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", *self.args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL: no chance to flush, snapshot or release anything."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait for the graceful exit; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out


@pytest.fixture
def daemon_env(names: Names, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Env for a daemon in this test's namespace; keyword arguments add STELLWERK_* overrides."""

    def make(routing: Path, node: str = "a", **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
        env.update(
            STELLWERK_ROUTING=str(routing),
            STELLWERK_REDIS_URL=REDIS_URL,
            STELLWERK_MQTT_URL=MQTT_URL,
            # Leader ingress: every daemon of the installation resumes the same session.
            STELLWERK_MQTT_CLIENT_ID=f"stw-{names.tag}",
            STELLWERK_MQTT_SHARE_GROUP=f"g{names.tag}",
            STELLWERK_KEY_PREFIX=names.key_prefix,
            STELLWERK_TOPIC_PREFIX=names.topic_prefix,
            STELLWERK_HTTP_ADDR="",
            STELLWERK_SMTP_ADDR="",
            STELLWERK_LOG_FORMAT="json",
            STELLWERK_ROUTER_NODE_ID=node,
            # Short, so a standby takes over quickly; not so short that a renewal late on a
            # loaded machine loses the lease in the middle of a test.
            STELLWERK_ROUTER_LEASE_TTL="3.0",
            STELLWERK_ROUTER_SNAPSHOT_INTERVAL="0.5",
        )
        env.update({f"STELLWERK_{k.upper()}": v for k, v in extra.items()})
        return env

    return make


async def drop_session(client_id: str) -> None:
    """Make the broker forget a persistent ingress session a test created (clean-session
    connect), and its agent-command companion (``{client_id}-agents``)."""
    for identifier in (client_id, f"{client_id}-agents"):
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(
                MQTT_HOST,
                MQTT_PORT,
                username=MQTT_USER,
                password=MQTT_PASSWORD,
                identifier=identifier,
                clean_session=True,
            ):
                pass


@pytest.fixture
async def daemons(
    tmp_path: Path, names: Names, redis_client: aioredis.Redis
) -> AsyncIterator[Callable[..., DaemonProcess]]:
    """Start daemons as subprocesses (``start(env, name, *args)``, args for ``stellwerk
    run``); every one still running is stopped after the test."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str], name: str = "a", *args: str) -> DaemonProcess:
        d = DaemonProcess(env=env, log_path=tmp_path / f"daemon-{name}.log", args=args)
        d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(5)
    await drop_session(f"stw-{names.tag}")


# ---- routing files, payloads, the daemon in-process -----------------------------------------

SAMPLES = REPO / "tests" / "fixtures" / "samples"
EXPERT_PHONE = "+4930111111"


def write_routing(
    path: Path,
    agents: tuple[str, ...] = ("anna",),
    *,
    offer_timeout: float = 1.0,
    wrap_up: float = 0.3,
) -> Path:
    """A small routing file: a support queue, an expert desk (weight 10), one expert."""
    agent_lines = "\n".join(
        f"  - {{id: {a}, skills: {{support: 3, second_level: 2}}, "
        f"capacity: {{phone: 1, chat: 3, email: 5, social: 5}}}}"
        for a in agents
    )
    path.write_text(
        f"""version: 1
defaults:
  offer_timeout: {offer_timeout}
  wrap_up: {wrap_up}
  reject_cooldown: 60
skills: [support, second_level]
queues:
  support:
    skills: {{support: 1}}
  expert_desk:
    skills: {{second_level: 1}}
    weight: 10
agents:
{agent_lines}
experts:
  - {{id: x-heinz, name: Heinz, phones: ["{EXPERT_PHONE}"]}}
rules:
  - name: crowd_expert
    when: customer.expert
    queue: expert_desk
    priority: 100
  - name: default
    default: true
    queue: support
""",
        encoding="utf-8",
    )
    return path


def ari(event: str, channel_id: str, caller: str = "030 5550100", exten: str = "1000") -> bytes:
    """A real ARI event (StasisStart / StasisEnd sample) for another channel, caller, number."""
    name = {"StasisStart": "asterisk-ari-stasis-start", "StasisEnd": "asterisk-ari-stasis-end"}
    data = json.loads((SAMPLES / "phone" / f"{name[event]}.json").read_bytes())
    data["channel"]["id"] = channel_id
    data["channel"]["caller"]["number"] = caller
    data["channel"]["dialplan"]["exten"] = exten
    return json.dumps(data).encode()


def mail(
    sender: str, to: str, subject: str, text: str, message_id: str, **extra: str
) -> EmailMessage:
    """A customer's plain-text mail, dated now; ``extra`` headers by name (``In_Reply_To``
    is ``In-Reply-To``)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{message_id}>"
    msg["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    for name, value in extra.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(text)
    return msg


def send_mail(port: int, msg: EmailMessage) -> None:
    """Deliver ``msg`` to the daemon's SMTP listener on ``port``, as a mail server does
    (blocking: call it in a thread from a test's loop)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.send_message(msg)


async def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def start_daemon(
    daemon_env: Callable[..., dict[str, str]],
    redis_client: aioredis.Redis,
) -> AsyncIterator[Callable[..., Any]]:
    """Run ``Daemon`` in this event loop; returns once it routes. Stopped after the test
    (before the test's Redis keys are deleted, hence the ``redis_client`` dependency)."""
    from router.daemon.config import load_settings
    from router.daemon.main import Daemon
    from rules.load import load_routing

    running: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(routing: Path, node: str = "a", **extra: str) -> Any:
        env = daemon_env(routing, node, **extra)
        daemon = Daemon(load_settings(None, env=env), load_routing(routing), handle_signals=False)
        task = asyncio.create_task(daemon.run(), name=f"daemon-{node}")
        running.append((daemon, task))
        await wait_until(
            lambda: task.done() or (daemon.state.view is not None and daemon.state.mqtt_ok),
            10,
            "the daemon to route",
        )
        if task.done():
            task.result()
        return daemon

    yield start
    for daemon, _ in running:
        daemon.stopping.set()
    for _, task in running:
        await asyncio.wait_for(task, 15)
    if running:
        settings = running[0][0].settings
        await drop_session(settings.mqtt.identifier(settings.topic_prefix))


async def barrier(probe: Any, timeout: float = 30.0) -> None:
    """Return once the daemon has applied and published everything the test sent before.

    A login for an agent the routing file does not know goes through the broker, the ingress
    and the journal like any other input, and the router publishes its refusal after the
    commands of every earlier journal entry: once the refusal is here, so is anything (a
    duplicate, say) that earlier inputs made the daemon publish. ``probe`` is anything with
    ``publish(topic, payload)`` and ``wait_for(topic, timeout=..., **match)`` under the test's
    prefix (:class:`MqttProbe`, the fault tests' peer).
    """
    ghost = f"barrier-{uuid.uuid4().hex[:8]}"
    await probe.publish(f"agents/{ghost}/cmd", {"op": "login"})
    await probe.wait_for(f"agents/{ghost}/offers", timeout=timeout, type="refused")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private ``redis-server`` for tests that stop, pause or kill it (never the shared one)."""
    if not REDIS_SERVER.exists():
        pytest.skip(f"{REDIS_SERVER} is not installed")
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()
