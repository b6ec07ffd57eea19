"""MQTT identities and ACLs from ``stellwerk broker-config``, proven with real clients.

A private Mosquitto runs with the generated password and ACL files (no anonymous access) and the
real daemon connects with its own generated account. Each peer (telephony bridge, agents,
wallboard) connects with its own account. What the broker refuses never reaches the daemon:
every negative is closed by a sentinel message sent afterwards over the same connection, which
the broker delivers in order, so "it did not happen" is observed, not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
import yaml
from aiohttp import test_utils

from router.daemon.broker_config import BrokerConfigError, Generated, generate, mosquitto_verify
from tests.daemon.conftest import REPO, Names, ari, wait_until, write_routing
from tests.daemon.private_servers import HOST, MOSQUITTO, PrivateMosquitto

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs /usr/sbin/mosquitto"),
]
AGENTS = ("a01", "a02", "a03", "a04")


@dataclass
class Peer:
    """One MQTT client under one generated account, recording what it receives."""

    client: aiomqtt.Client
    received: list[tuple[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self) -> None:
        async for message in self.client.messages:
            raw = message.payload
            payload = json.loads(raw) if isinstance(raw, bytes) else raw
            self.received.append((str(message.topic), payload))
            self.changed.set()

    async def wait_for(self, topic: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for t, p in self.received:
                if t == topic and all(p.get(k) == v for k, v in match.items()):
                    return p
            return None

        return await wait_until(found, timeout, f"{topic} {match}")

    def topics(self) -> set[str]:
        return {t for t, _ in self.received}


@pytest.fixture
def generated(tmp_path: Path, names: Names) -> tuple[Path, Generated]:
    routing = write_routing(tmp_path / "routing.yaml", AGENTS, offer_timeout=60.0)
    out = tmp_path / "broker"
    return routing, generate(
        routing, out, prefix=names.topic_prefix, sources=["asterisk-ari:phone"]
    )


@pytest.fixture
def broker(tmp_path: Path, generated: tuple[Path, Generated]) -> Any:
    _, gen = generated
    mq = PrivateMosquitto(
        dir=tmp_path / "mq", auth_conf=(gen.out / "mosquitto-auth.conf").read_text()
    )
    mq.dir.mkdir()
    mq.start()
    yield mq
    mq.stop()


@pytest.fixture
async def peers(
    broker: PrivateMosquitto, generated: tuple[Path, Generated]
) -> AsyncIterator[Callable[..., Any]]:
    _, gen = generated
    stack = contextlib.AsyncExitStack()
    tasks: list[asyncio.Task[None]] = []

    async def connect(user: str, *subscriptions: str) -> Peer:
        client = aiomqtt.Client(
            HOST, broker.peer_port, username=user, password=gen.mqtt[user], identifier=user
        )
        await stack.enter_async_context(client)
        peer = Peer(client)
        for topic in subscriptions:
            await client.subscribe(topic, qos=1)
        tasks.append(asyncio.create_task(peer.pump()))
        return peer

    try:
        yield connect
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(aiomqtt.MqttError):
            await stack.aclose()


def test_generated_files_are_what_mosquitto_and_the_daemon_read(
    generated: tuple[Path, Generated], names: Names
) -> None:
    _, gen = generated
    creds = yaml.safe_load((gen.out / "credentials.yaml").read_text())
    assert (gen.out / "credentials.yaml").stat().st_mode & 0o777 == 0o600
    assert (gen.out / "daemon.env").stat().st_mode & 0o777 == 0o600
    users = {
        line.split(":", 1)[0]: line.split(":", 1)[1]
        for line in (gen.out / "mosquitto.passwd").read_text().splitlines()
    }
    assert set(users) == {"stellwerk", "source-asterisk-ari", "reader-wallboard"} | {
        f"agent-{a}" for a in AGENTS
    }
    for user, encoded in users.items():
        assert encoded.startswith("$7$101$")
        assert mosquitto_verify(creds["mqtt"][user], encoded)
        assert not mosquitto_verify(creds["mqtt"][user] + "x", encoded)
    acl = (gen.out / "mosquitto.acl").read_text()
    assert f"user agent-a01\ntopic write {names.topic_prefix}/agents/a01/cmd\n" in acl
    assert f"topic read {names.topic_prefix}/agents/a01/offers\n" in acl
    assert "pattern" not in acl and "topic readwrite" not in acl
    tokens = yaml.safe_load((gen.out / "http-tokens.yaml").read_text())["tokens"]
    assert {t["name"] for t in tokens} == {"admin", "supervisor"} | {f"agent:{a}" for a in AGENTS}
    assert all(t["sha256"] not in (gen.out / "credentials.yaml").read_text() for t in tokens)


def test_rerunning_keeps_every_password_and_adds_new_agents(
    tmp_path: Path, generated: tuple[Path, Generated], names: Names
) -> None:
    routing, first = generated
    write_routing(routing, (*AGENTS, "a05"), offer_timeout=60.0)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "broker-config",
            "--routing",
            str(routing),
            "--out",
            str(first.out),
            "--topic-prefix",
            names.topic_prefix,
            "--source",
            "asterisk-ari:phone",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    creds = yaml.safe_load((first.out / "credentials.yaml").read_text())
    for user, password in first.mqtt.items():
        assert creds["mqtt"][user] == password
    for name, token in first.http.items():
        assert creds["http"][name] == token
    assert "agent-a05" in creds["mqtt"] and "agent:a05" in creds["http"]
    assert "agent-a05:$7$" in (first.out / "mosquitto.passwd").read_text()


async def test_mosquitto_accepts_the_generated_passwords_and_nobody_anonymous(
    broker: PrivateMosquitto, generated: tuple[Path, Generated]
) -> None:
    _, gen = generated
    for user, password in (
        (None, None),
        ("agent-a01", "wrong"),
        ("nobody", "x"),
        ("agent-a01", gen.mqtt["agent-a04"]),
    ):
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(HOST, broker.peer_port, username=user, password=password):
                pass
    async with aiomqtt.Client(
        HOST, broker.peer_port, username="agent-a01", password=gen.mqtt["agent-a01"]
    ):
        pass


async def test_identities_can_only_do_what_their_acl_grants(
    tmp_path: Path,
    names: Names,
    broker: PrivateMosquitto,
    generated: tuple[Path, Generated],
    peers: Callable[..., Any],
    start_daemon: Callable[..., Any],
    redis_client: Any,
) -> None:
    routing, gen = generated
    p = names.topic_prefix
    http_port = test_utils.unused_port()
    await start_daemon(
        routing,
        mqtt_url=broker.url,
        mqtt_username="stellwerk",
        mqtt_password=gen.mqtt["stellwerk"],
        mqtt_client_id=f"stw-acl-{names.tag}",
        http_addr=f"127.0.0.1:{http_port}",
        auth_tokens_file=str(gen.out / "http-tokens.yaml"),
    )
    wall = await peers("reader-wallboard", f"{p}/events/#")
    bridge = await peers("source-asterisk-ari")
    a04 = await peers("agent-a04", f"{p}/agents/a04/offers")
    # a01 tries to listen to a04's offers and to everything; Mosquitto 2.0 acknowledges such a
    # subscription but delivers nothing the ACL does not let a01 read.
    a01 = await peers("agent-a01", f"{p}/agents/a01/offers", f"{p}/agents/a04/offers", f"{p}/#")
    supervisor = {"Authorization": f"Bearer {gen.http['supervisor']}"}
    base = f"http://127.0.0.1:{http_port}"

    async def http_get(path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(base + path, headers=supervisor) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    # The daemon's own traffic flows: a04 logs in, a call comes in, a04 is offered it.
    await a04.client.publish(f"{p}/agents/a04/cmd", json.dumps({"op": "login"}), qos=1)
    await wall.wait_for(f"{p}/events/agent.state", agent_id="a04", state="available")
    await bridge.client.publish(f"{p}/in/phone/asterisk-ari", ari("StasisStart", "c1"), qos=1)
    offer = await a04.wait_for(f"{p}/agents/a04/offers", type="offer")
    assert offer["contact_id"] == "asterisk-ari:c1"

    # a01 tries to accept a04's offer on a04's topic; then says something on its own topic.
    await a01.client.publish(f"{p}/agents/a01/cmd", json.dumps({"op": "login"}), qos=1)
    await a01.client.publish(
        f"{p}/agents/a04/cmd", json.dumps({"op": "accept", "offer_id": offer["offer_id"]}), qos=1
    )
    await a01.client.publish(
        f"{p}/agents/a01/cmd", json.dumps({"op": "state", "state": "away", "reason": "x"}), qos=1
    )
    await wall.wait_for(f"{p}/events/agent.state", agent_id="a01", state="away")
    contact = await http_get("/v1/contacts/asterisk-ari:c1")
    assert (contact["state"], contact["agent_id"]) == ("offered", "a04")
    assert not any(t.endswith("/contact.assigned") for t in wall.topics())

    # The bridge may feed its own ingress topic only: no agent commands, no other source.
    await bridge.client.publish(f"{p}/agents/a02/cmd", json.dumps({"op": "login"}), qos=1)
    await bridge.client.publish(f"{p}/in/chat/rocketchat", b"{}", qos=1)
    await bridge.client.publish(f"{p}/in/phone/asterisk-ari", ari("StasisStart", "c2"), qos=1)
    await wall.wait_for(f"{p}/events/contact.queued", contact_id="asterisk-ari:c2")
    agents = {a["id"]: a["state"] for a in (await http_get("/v1/agents"))["agents"]}
    assert agents["a02"] == "offline"
    assert await redis_client.xlen(f"{names.key_prefix}deadletter") == 0
    # A wallboard reads, it does not write.
    await wall.client.publish(f"{p}/in/phone/asterisk-ari", ari("StasisStart", "c3"), qos=1)

    # a04 accepts its own offer: that works, and a01 has seen none of a04's traffic.
    await a04.client.publish(
        f"{p}/agents/a04/cmd", json.dumps({"op": "accept", "offer_id": offer["offer_id"]}), qos=1
    )
    await wall.wait_for(f"{p}/events/contact.assigned", contact_id="asterisk-ari:c1")
    await bridge.client.publish(f"{p}/in/phone/asterisk-ari", ari("StasisStart", "c4"), qos=1)
    await wall.wait_for(f"{p}/events/contact.queued", contact_id="asterisk-ari:c4")
    assert not any(
        c["contact_id"] == "asterisk-ari:c3"
        for c in [p_ for _, p_ in wall.received]
        if isinstance(c, dict) and "contact_id" in c
    )
    assert a01.topics() <= {f"{p}/agents/a01/offers"}
    assert all(t == f"{p}/agents/a04/offers" for t in a04.topics())


def test_a_routing_file_that_does_not_validate_is_refused_with_its_problems(
    tmp_path: Path,
) -> None:
    routing = tmp_path / "r.yaml"
    routing.write_text("queues:\n  support: {}\nrules:\n  - {name: x, queue: nowhere}\n")
    with pytest.raises(BrokerConfigError) as info:
        generate(routing, tmp_path / "out")
    assert f"{routing}:4:" in str(info.value) and "nowhere" in str(info.value)
    assert not (tmp_path / "out").exists()
