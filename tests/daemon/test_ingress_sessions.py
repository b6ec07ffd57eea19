"""Agents' commands have an MQTT session of their own: they never wait behind a backlog of
contacts in the broker, and an upgraded installation's contact session stops taking them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog.testing
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from router.daemon.intake import Intake
from router.daemon.journal import AgentEntry, ContactEntry, Journal, connect_redis
from router.daemon.mqtt import Ingress, Publisher
from tests.daemon.conftest import MqttProbe, Names, ari, drop_session, wait_until, write_routing
from tests.daemon.test_daemon_mqtt import settings_for
from tests.servers import MQTT_HOST, MQTT_PASSWORD, MQTT_PORT, MQTT_USER

pytestmark = pytest.mark.integration

# Below the stock broker's 1,000 messages queued per offline session (it drops beyond).
BACKLOG = 600


async def journal_kinds(journal: Journal) -> list[tuple[str, str]]:
    """("contact", contact id) / ("agent", agent id) per journal entry, in journal order."""
    out: list[tuple[str, str]] = []
    last = "0-0"
    while rows := await journal.read_after(last, None, 1000):
        for entry_id, entry in rows:
            last = entry_id
            if isinstance(entry, ContactEntry):
                out.append(("contact", entry.event.contact_id))
            elif isinstance(entry, AgentEntry):
                out.append(("agent", entry.cmd.agent_id))
    return out


async def test_an_agent_command_overtakes_a_backlog_of_contacts_waiting_in_the_broker(
    names: Names,
    journal: Journal,
    mqtt_probe: MqttProbe,
    start_daemon: Callable[..., Any],
    tmp_path: Path,
) -> None:
    routing = write_routing(tmp_path / "routing.yaml", agents=("anna",))
    # A first run creates both persistent sessions and their subscriptions; then the daemon
    # is away while calls pile up in the broker, and an agent logs in after all of them.
    first = await start_daemon(routing, "a")
    first.stopping.set()
    await wait_until(lambda: first.state.lease_held is False and not first.state.mqtt_ok, 15)
    for n in range(BACKLOG):
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", f"bk-{n}"))
    await mqtt_probe.agent("anna", op="login")

    await start_daemon(routing, "b")

    async def all_journaled() -> list[tuple[str, str]] | None:
        kinds = await journal_kinds(journal)
        return kinds if len(kinds) >= BACKLOG + 1 else None

    kinds = await wait_until(all_journaled, 60, "the backlog and the login journaled")
    position = kinds.index(("agent", "anna"))
    # On one session the login would come after every call (the broker delivers a session's
    # messages in order); on its own it is journaled while the backlog is still coming in.
    assert position < BACKLOG, f"the login was journaled after all {BACKLOG} waiting calls"
    assert sorted(k for k, _ in kinds) == ["agent"] + ["contact"] * BACKLOG


async def test_an_upgraded_contact_session_no_longer_takes_agent_commands(
    names: Names, journal: Journal, mqtt_probe: MqttProbe
) -> None:
    settings = settings_for(names)
    prefix = names.topic_prefix
    # The session as an earlier version left it: one client id subscribed to both kinds.
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 600
    async with aiomqtt.Client(
        MQTT_HOST,
        MQTT_PORT,
        username=MQTT_USER,
        password=MQTT_PASSWORD,
        identifier=f"stw-{names.tag}",
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    ) as old:
        await old.subscribe(f"{prefix}/in/+/+", qos=1)
        await old.subscribe(f"{prefix}/agents/+/cmd", qos=1)

    publisher = Publisher(settings)
    pub_task = asyncio.create_task(publisher.run())
    intake = Intake(journal, settings.decode_config())
    contacts = Ingress(settings, intake, publisher)  # the contact session only
    task = asyncio.create_task(contacts.run())
    try:
        await wait_until(lambda: contacts.connected, 30, "contact session connected")
        await mqtt_probe.agent("anna", op="login")
        # Published after the command by the same client: on the same session it would come
        # after the command, so once it is journaled the command would have been too.
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "sentinel"))

        async def sentinel() -> bool:
            return ("contact", "asterisk-ari:sentinel") in await journal_kinds(journal)

        await wait_until(sentinel, 30, "the sentinel journaled")
        assert await journal_kinds(journal) == [("contact", "asterisk-ari:sentinel")]
    finally:
        contacts.stop()
        for t in (task, pub_task):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await drop_session(f"stw-{names.tag}")


async def test_the_agent_session_acknowledges_only_what_redis_has(
    names: Names, journal: Journal, mqtt_probe: MqttProbe
) -> None:
    """No PUBACK while Redis is down: the command waits in the agent session and the next
    consumer journals it (the same guarantee as the contact session's)."""
    settings = settings_for(names)
    publisher = Publisher(settings)
    pub_task = asyncio.create_task(publisher.run())
    down = Journal(connect_redis("redis://127.0.0.1:1/0", timeout=0.3), names.key_prefix)

    def run(on: Journal) -> tuple[Ingress, asyncio.Task[None]]:
        intake = Intake(on, settings.decode_config())
        agents = Ingress(settings, intake, publisher, kind="agents")
        return agents, asyncio.create_task(agents.run())

    async def kill(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        first, task = run(down)
        await wait_until(lambda: first.connected, 30, "agent session connected")
        # The journal write fails: that is logged, and retried while the connection lasts.
        with structlog.testing.capture_logs() as logs:
            await mqtt_probe.agent("anna", op="login")
            await wait_until(
                lambda: any(e["event"] == "mqtt.ingress.journal_down" for e in logs),
                30,
                "a failed journal write",
            )
        await kill(task)

        second, task = run(journal)
        await wait_until(lambda: journal_kinds(journal), 30, "the redelivered command journaled")
        assert await journal_kinds(journal) == [("agent", "anna")]
        assert second.identifier == f"stw-{names.tag}-agents"
        await kill(task)
    finally:
        await kill(pub_task)
        await down.redis.aclose()
        await drop_session(f"stw-{names.tag}")
