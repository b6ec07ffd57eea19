"""MQTT ingress acknowledges a message only once Redis has it (PUBACK after the journal write)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from router.daemon.config import Settings, load_settings
from router.daemon.intake import Intake
from router.daemon.journal import ContactEntry, Journal, connect_redis
from router.daemon.metrics import Metrics
from router.daemon.mqtt import Ingress, Publisher
from tests.daemon.conftest import MqttProbe, Names, ari, drop_session, wait_until
from tests.servers import MQTT_URL, REDIS_URL

pytestmark = pytest.mark.integration


def settings_for(names: Names, **env: str) -> Settings:
    """The daemon's settings in this test's namespace; ``env`` adds STELLWERK_* variables."""
    return load_settings(
        None,
        env={
            "STELLWERK_MQTT_URL": MQTT_URL,
            "STELLWERK_REDIS_URL": REDIS_URL,
            "STELLWERK_TOPIC_PREFIX": names.topic_prefix,
            "STELLWERK_KEY_PREFIX": names.key_prefix,
            "STELLWERK_MQTT_CLIENT_ID": f"stw-{names.tag}",
            "STELLWERK_MQTT_SHARE_GROUP": f"g{names.tag}",
            **env,
        },
    ).settings


async def contact_ids(journal: Journal) -> list[str]:
    """The contact ids of the journal's contact entries, in order."""
    rows = await journal.read_after("0-0", None, 100)
    return [e.event.contact_id for _, e in rows if isinstance(e, ContactEntry)]


async def journaled(journal: Journal, contact_id: str) -> None:
    """Wait until ``contact_id`` is in the journal: a sentinel published after what a test
    checks arrives after it (one publisher, in order), so then so has anything that would."""

    async def there() -> bool:
        return contact_id in await contact_ids(journal)

    await wait_until(there, 30, f"{contact_id} journaled")


class Running:
    """An Ingress task over a given journal; stopping it closes the connection without acks."""

    def __init__(self, settings: Settings, journal: Journal, publisher: Publisher) -> None:
        self.metrics = Metrics(CollectorRegistry())
        intake = Intake(journal, settings.decode_config(), metrics=self.metrics)
        self.ingress = Ingress(settings, intake, publisher, metrics=self.metrics)
        self.task = asyncio.create_task(self.ingress.run())

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "stellwerk_ingress_deliveries_total", {"transport": "mqtt", "outcome": outcome}
        )
        return value or 0.0

    async def kill(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_no_puback_while_redis_is_down_then_redelivered_and_journaled(
    names: Names, journal: Journal, mqtt_probe: MqttProbe
) -> None:
    settings = settings_for(names)
    publisher = Publisher(settings)
    pub_task = asyncio.create_task(publisher.run())
    down = Journal(connect_redis("redis://127.0.0.1:1/0", timeout=0.3), names.key_prefix)
    try:
        first = Running(settings, down, publisher)
        await wait_until(lambda: first.ingress.connected, 30, "ingress connected")
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "ack-1"))
        await mqtt_probe.publish("in/phone/asterisk-ari", b"not json")
        await wait_until(lambda: first.count("unavailable") >= 2, 30, "failed journal writes")
        assert first.count("accepted") == 0
        # The daemon dies while Redis is away: nothing was acknowledged to the broker.
        await first.kill()

        second = Running(settings, journal, publisher)
        rows = await wait_until(
            lambda: journal.read_after("0-0", None, 10), 30, "the redelivered call journaled"
        )
        ((_, entry),) = rows
        assert isinstance(entry, ContactEntry)
        assert entry.event.contact_id == "asterisk-ari:ack-1"
        # The bad payload was redelivered too, and is now in the dead-letter stream.
        dead = await wait_until(journal.dead_letters, 30, "the dead letter")
        assert [d["reason"] for d in dead] == ["not_json"]
        await wait_until(lambda: second.count("rejected") == 1, 30, "rejection counted")
        await second.kill()

        # Both were acknowledged this time (the rejected one too): nothing comes back.
        third = Running(settings, journal, publisher)
        await wait_until(lambda: third.ingress.connected, 30, "third ingress connected")
        # A redelivery comes as the session resumes, before anything published after it.
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "sentinel"))
        await journaled(journal, "asterisk-ari:sentinel")
        assert await contact_ids(journal) == ["asterisk-ari:ack-1", "asterisk-ari:sentinel"]
        assert len(await journal.dead_letters()) == 1
        assert (third.count("accepted"), third.count("rejected")) == (1, 0)
        await third.kill()
    finally:
        pub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pub_task
        await down.redis.aclose()
        await drop_session(f"stw-{names.tag}")


async def test_a_batch_far_larger_than_the_inflight_window_arrives_whole_and_in_order(
    names: Names, mqtt_probe: MqttProbe
) -> None:
    """The publisher hands a whole batch to paho at once and waits once for its PUBACKs:
    800 events, eight times ``max_inflight``, all reach a subscriber, in order, and
    ``publish_many`` returns only once the broker has every one. (Fewer than the stock
    broker's 1,000 queued messages per subscriber, which it would drop beyond.)"""
    settings = msgspec.structs.replace(
        settings_for(names),
        mqtt=msgspec.structs.replace(settings_for(names).mqtt, max_inflight=100),
    )
    publisher = Publisher(settings)
    task = asyncio.create_task(publisher.run())
    try:
        topic = f"{names.topic_prefix}/events/test.batch"
        batch = [(topic, json.dumps({"type": "test.batch", "n": n}).encode()) for n in range(800)]
        await asyncio.wait_for(publisher.publish_many(batch), 30)
        got = await mqtt_probe.wait_for("events/test.batch", count=800, timeout=30)
        assert [p["n"] for p in got] == list(range(800))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_commands_become_messages_on_the_right_topics() -> None:
    from channels.contact_event import ContactEvent
    from router.daemon.mqtt import command_messages
    from router.events import AgentStateChanged
    from router.messages import CancelOfferCmd, EventCmd, OfferCmd, RefusedCmd

    contact = ContactEvent(
        kind="new",
        contact_id="asterisk-ari:1",
        channel="phone",
        source="asterisk-ari",
        external_id="1",
    )
    offer = OfferCmd(
        offer_id="o1",
        agent_id="anna",
        contact_id="asterisk-ari:1",
        queue="support",
        expires_at=100.0,
        contact=contact,
        customer_id="c1",
    )
    ((topic, body),) = command_messages(offer, "p")
    assert topic == "p/agents/anna/offers"
    data = json.loads(body)
    assert (data["type"], data["offer_id"], data["contact"]["channel"]) == ("offer", "o1", "phone")
    cancel = CancelOfferCmd(offer_id="o1", agent_id="anna", contact_id="x", reason="expired")
    ((topic, body),) = command_messages(cancel, "p")
    assert topic == "p/agents/anna/offers" and json.loads(body)["type"] == "cancel"
    ((topic, body),) = command_messages(
        EventCmd(
            event=AgentStateChanged(
                at=1.0, agent_id="a", state="away", previous="available", reason=None
            )
        ),
        "p",
    )
    assert topic == "p/events/agent.state"
    assert json.loads(body) == {
        "type": "agent.state",
        "at": 1.0,
        "agent_id": "a",
        "state": "away",
        "previous": "available",
        "reason": None,
    }
    ((topic, body),) = command_messages(RefusedCmd(agent_id="bert", reason="not_your_offer"), "p")
    assert topic == "p/agents/bert/offers"
    assert json.loads(body)["reason"] == "not_your_offer"
    # An admin refusal (no agent) goes to the event stream, never to an agent's topic.
    ((topic, body),) = command_messages(RefusedCmd(agent_id=None, reason="unknown_expert"), "p")
    assert topic == "p/events/admin.refused"
    assert json.loads(body)["reason"] == "unknown_expert"


async def test_a_retained_ingress_message_is_not_journaled_again_on_every_subscribe(
    names: Names, journal: Journal, mqtt_probe: MqttProbe
) -> None:
    settings = settings_for(names)
    publisher = Publisher(settings)
    pub_task = asyncio.create_task(publisher.run())
    topic = f"{names.topic_prefix}/in/phone/asterisk-ari"
    await mqtt_probe.client.publish(topic, ari("StasisStart", "stale"), qos=1, retain=True)
    try:
        for _ in range(2):  # two (re)subscriptions
            running = Running(settings, journal, publisher)
            await wait_until(lambda r=running: r.ingress.connected, 30, "ingress connected")
            await running.kill()
        running = Running(settings, journal, publisher)
        await wait_until(lambda: running.ingress.connected, 30, "ingress connected")
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "fresh"))
        # A retained message would come with the subscription, before "fresh".
        await journaled(journal, "asterisk-ari:fresh")
        assert await contact_ids(journal) == ["asterisk-ari:fresh"]
        await running.kill()
    finally:
        await mqtt_probe.client.publish(topic, b"", qos=1, retain=True)  # clear it
        pub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pub_task
        await drop_session(f"stw-{names.tag}")


async def test_switching_the_ingress_mode_does_not_deliver_every_call_twice(
    names: Names, journal: Journal, mqtt_probe: MqttProbe
) -> None:
    # A session left by a daemon in "shared" mode still holds the $share subscriptions when the
    # daemon comes back in "leader" mode (or the other way round); unless they are dropped, a
    # call matches both and is journaled twice.
    shared = settings_for(names, STELLWERK_MQTT_INGRESS="shared")
    leader = settings_for(names)
    publisher = Publisher(leader)
    pub_task = asyncio.create_task(publisher.run())
    try:
        before = Running(shared, journal, publisher)
        await wait_until(lambda: before.ingress.connected, 30, "shared ingress connected")
        await before.kill()
        after = Running(leader, journal, publisher)
        await wait_until(lambda: after.ingress.connected, 30, "leader ingress connected")
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "once"))
        # A second copy through a stale subscription is sent with the first, before the
        # copies of a message published after it.
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "sentinel"))
        await journaled(journal, "asterisk-ari:sentinel")
        ids = await contact_ids(journal)
        assert ids.count("asterisk-ari:once") == 1, ids
        await after.kill()
    finally:
        pub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pub_task
        await drop_session(f"stw-{names.tag}")
