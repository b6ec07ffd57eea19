"""The routing path end to end: MQTT ingress -> journal -> engine -> MQTT offers and events.

A real daemon (in this event loop) against the real Redis and Mosquitto; the test plays the
telephony system (ARI events on ``{prefix}/in/phone/asterisk-ari``) and the agents' desktops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.daemon.journal import Journal
from tests.daemon.conftest import EXPERT_PHONE, MqttProbe, ari, wait_until, write_routing

pytestmark = pytest.mark.integration

CALL_TOPIC = "in/phone/asterisk-ari"


async def login(probe: MqttProbe, *agents: str) -> None:
    for agent in agents:
        await probe.agent(agent, op="login")
    for agent in agents:
        await probe.wait_for("events/agent.state", agent_id=agent, state="available")


async def test_an_ari_call_reaches_a_logged_in_agent_as_an_offer(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(write_routing(tmp_path / "r.yaml", ("anna",)))
    await login(mqtt_probe, "anna")
    sent = time.time()
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-1.1"))
    (offer,) = await mqtt_probe.wait_for("agents/anna/offers", type="offer")
    assert offer["contact_id"] == "asterisk-ari:call-1.1"
    assert offer["queue"] == "support"
    assert offer["contact"]["channel"] == "phone"
    assert offer["contact"]["sender"]["phone"] == "+49305550100"
    assert sent <= offer["expires_at"] <= time.time() + 1.5
    (queued,) = await mqtt_probe.wait_for("events/contact.queued")
    assert (queued["rule"], queued["queue"]) == ("default", "support")
    await mqtt_probe.wait_for("events/contact.offered", agent_id="anna")


async def test_accept_complete_and_wrap_up(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(write_routing(tmp_path / "r.yaml", ("anna",), wrap_up=0.3))
    await login(mqtt_probe, "anna")
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-2.1"))
    (offer,) = await mqtt_probe.wait_for("agents/anna/offers", type="offer")
    await mqtt_probe.agent("anna", op="accept", offer_id=offer["offer_id"])
    (assigned,) = await mqtt_probe.wait_for("events/contact.assigned")
    assert assigned["agent_id"] == "anna" and assigned["contact_id"] == "asterisk-ari:call-2.1"
    assert assigned["waited"] >= 0
    await mqtt_probe.agent("anna", op="complete", contact_id="asterisk-ari:call-2.1")
    (done,) = await mqtt_probe.wait_for("events/contact.completed")
    assert done["agent_id"] == "anna" and done["handled"] >= 0
    await mqtt_probe.wait_for("events/agent.state", agent_id="anna", state="wrap_up")
    # Wrap-up ends by itself (a timer: tick through the journal) and anna is free again.
    await mqtt_probe.wait_for("events/contact.wrap_up_done", timeout=3)
    await mqtt_probe.wait_for(
        "events/agent.state", agent_id="anna", state="available", previous="wrap_up"
    )


async def test_an_expired_offer_goes_to_the_next_agent(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(write_routing(tmp_path / "r.yaml", ("anna", "bert"), offer_timeout=0.5))
    await login(mqtt_probe, "anna", "bert")
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-3.1"))
    (first,) = await mqtt_probe.wait_for("events/contact.offered")
    missed_by = first["agent_id"]
    other = "bert" if missed_by == "anna" else "anna"
    # Nobody answers: the offer is withdrawn from the first agent and made to the other one.
    (cancel,) = await mqtt_probe.wait_for(f"agents/{missed_by}/offers", type="cancel", timeout=3)
    assert cancel["offer_id"] == first["offer_id"] and cancel["reason"] == "expired"
    (second,) = await mqtt_probe.wait_for(f"agents/{other}/offers", type="offer", timeout=3)
    assert second["contact_id"] == "asterisk-ari:call-3.1"
    assert second["offer_id"] != first["offer_id"]
    await mqtt_probe.wait_for("events/contact.offer_expired", agent_id=missed_by)


async def test_a_hang_up_while_queued_abandons_the_contact(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    daemon = await start_daemon(write_routing(tmp_path / "r.yaml", ("anna",)))
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-4.1"))
    await mqtt_probe.wait_for("events/contact.queued", contact_id="asterisk-ari:call-4.1")
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisEnd", "call-4.1"))
    (gone,) = await mqtt_probe.wait_for("events/contact.abandoned")
    assert gone["contact_id"] == "asterisk-ari:call-4.1" and gone["queue"] == "support"
    assert gone["waited"] >= 0
    # Nothing is left to offer: an agent logging in now gets no offer for it.
    await login(mqtt_probe, "anna")
    assert mqtt_probe.seen("agents/anna/offers", type="offer") == []
    assert daemon.state.view.queue_stats(time.time())[0]["waiting"] == 0
    assert metric_sum(daemon, "stellwerk_contacts_abandoned_total", queue="support") == 1.0


async def test_an_experts_call_overtakes_a_long_queue(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(write_routing(tmp_path / "r.yaml", ("anna",)))
    for n in range(5):
        await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", f"call-5.{n}", f"030 555010{n}"))
    await mqtt_probe.wait_for("events/contact.queued", count=5)
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-5.x", EXPERT_PHONE))
    (queued,) = await mqtt_probe.wait_for(
        "events/contact.queued", contact_id="asterisk-ari:call-5.x"
    )
    assert (queued["queue"], queued["rule"], queued["expert"]) == (
        "expert_desk",
        "crowd_expert",
        True,
    )
    await login(mqtt_probe, "anna")
    (offer,) = await mqtt_probe.wait_for("agents/anna/offers", type="offer")
    assert offer["contact_id"] == "asterisk-ari:call-5.x"
    assert offer["queue"] == "expert_desk"


async def test_an_agent_cannot_accept_another_agents_offer(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    daemon = await start_daemon(
        write_routing(tmp_path / "r.yaml", ("anna", "bert"), offer_timeout=5)
    )
    await login(mqtt_probe, "anna", "bert")
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-6.1"))
    (offered,) = await mqtt_probe.wait_for("events/contact.offered")
    owner = offered["agent_id"]
    thief = "bert" if owner == "anna" else "anna"
    # The thief even claims to be the owner in the payload: the topic decides who speaks.
    await mqtt_probe.publish(
        f"agents/{thief}/cmd", {"op": "accept", "offer_id": offered["offer_id"], "agent_id": owner}
    )
    (refused,) = await mqtt_probe.wait_for(f"agents/{thief}/offers", type="refused")
    assert refused["reason"] == "not_your_offer"
    assert mqtt_probe.seen("events/contact.assigned") == []
    # The owner still can.
    await mqtt_probe.agent(owner, op="accept", offer_id=offered["offer_id"])
    (assigned,) = await mqtt_probe.wait_for("events/contact.assigned")
    assert assigned["agent_id"] == owner
    refused_count = daemon.metrics.registry.get_sample_value(
        "stellwerk_agent_commands_refused_total", {"reason": "not_your_offer"}
    )
    assert refused_count == 1.0


async def test_bad_payloads_are_dead_lettered_and_the_daemon_keeps_going(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    start_daemon: Callable[..., Any],
    journal: Journal,
) -> None:
    daemon = await start_daemon(write_routing(tmp_path / "r.yaml", ("anna",)))
    await mqtt_probe.publish(CALL_TOPIC, b"\xff\xfe not json at all")
    await mqtt_probe.publish("in/phone/no-such-pbx", b"{}")
    await mqtt_probe.publish("agents/anna/cmd", b"{oops")
    await mqtt_probe.publish("agents/anna/cmd", {"op": "teleport"})
    refusals = await mqtt_probe.wait_for("agents/anna/offers", type="refused", count=2)
    assert [r["reason"] for r in refusals] == ["not_json", "bad_command"]
    dead = await wait_until(
        lambda: _when(journal.dead_letters(), lambda d: len(d) >= 4), 5, "4 dead letters"
    )
    reasons = sorted((d["source"], d["reason"]) for d in dead)
    assert reasons == [
        ("agent-cmd", "bad_command"),
        ("agent-cmd", "not_json"),
        ("asterisk-ari", "not_json"),
        ("no-such-pbx", "unknown_source"),
    ]
    bad_body = next(d for d in dead if d["source"] == "asterisk-ari")["body"]
    assert bad_body == b"\xff\xfe not json at all"
    # Still routing: a good call after the garbage is offered as usual.
    await login(mqtt_probe, "anna")
    await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-7.1"))
    await mqtt_probe.wait_for(
        "agents/anna/offers", type="offer", contact_id="asterisk-ari:call-7.1"
    )
    assert (
        daemon.metrics.registry.get_sample_value(
            "stellwerk_rejected_inputs_total", {"source": "asterisk-ari", "reason": "not_json"}
        )
        == 1.0
    )


def metric_sum(daemon: Any, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(
        sample.value
        for family in daemon.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def _when(coro: Any, ok: Callable[[Any], bool]) -> Any:
    value = await coro
    return value if ok(value) else None


class RecordingSink:
    """A command sink as a telephony connector would be one: it sees what the engine decided."""

    def __init__(self) -> None:
        self.cmds: list[Any] = []
        self.restores = 0

    async def submit(self, cmds: Any) -> None:
        self.cmds.extend(cmds)

    async def restored(self, engine: Any) -> None:
        assert not self.cmds, "restored() comes before the first live command"
        self.restores += 1


async def test_command_sinks_see_every_decision_once_in_order(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    redis_client: Any,
) -> None:
    import asyncio

    from router.daemon.config import load_settings
    from router.daemon.main import Daemon
    from router.messages import EventCmd, OfferCmd
    from rules.load import load_routing

    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    daemon = Daemon(
        load_settings(None, env=daemon_env(routing)), load_routing(routing), handle_signals=False
    )
    sink = RecordingSink()
    daemon.sinks.append(sink)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: daemon.state.view is not None and daemon.state.mqtt_ok, 10)
        assert sink.restores == 1
        await login(mqtt_probe, "anna")
        await mqtt_probe.publish(CALL_TOPIC, ari("StasisStart", "call-sink.1"))
        (offer,) = await mqtt_probe.wait_for("agents/anna/offers", type="offer")
        await wait_until(lambda: any(isinstance(c, OfferCmd) for c in sink.cmds), 5, "the sink")
        offers = [c for c in sink.cmds if isinstance(c, OfferCmd)]
        assert [o.offer_id for o in offers] == [offer["offer_id"]]
        assert offers[0].contact.contact_id == "asterisk-ari:call-sink.1"
        types = [c.type for c in sink.cmds if isinstance(c, EventCmd)]
        assert types.index("contact.queued") < types.index("contact.offered")
    finally:
        daemon.stopping.set()
        await asyncio.wait_for(task, 15)


async def test_a_mail_without_charset_arrives_over_smtp_ungarbled_and_matches_keywords(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    """What swaks sends by default: a raw UTF-8 body and no charset parameter."""
    import asyncio
    import smtplib

    from tests.daemon.private_servers import free_port

    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    routing.write_text(
        routing.read_text().replace(
            "  - name: default\n",
            '  - name: outage\n    when: text ~ "(?i)gestört"\n    queue: expert_desk\n'
            "  - name: default\n",
        )
    )
    port = free_port()
    await start_daemon(routing, smtp_addr=f"127.0.0.1:{port}")
    await login(mqtt_probe, "anna")
    text = "Mein DSL ist seit gestern gestört. Grüße, Jürgen Müller"
    raw = (
        "From: Jürgen Müller <j.mueller@example.org>\r\nTo: support@example.com\r\n"
        "Subject: Störung\r\nMessage-ID: <swaks-1@example.org>\r\n\r\n" + text + "\r\n"
    ).encode("utf-8")

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("mta.test")
            client.mail("j.mueller@example.org")
            client.rcpt("support@example.com")
            return client.data(raw)

    code, reply = await asyncio.to_thread(send)
    assert code == 250, reply
    (offer,) = await mqtt_probe.wait_for("agents/anna/offers", type="offer")
    assert offer["contact"]["text"] == text
    (queued,) = await mqtt_probe.wait_for("events/contact.queued")
    assert (queued["rule"], queued["queue"]) == ("outage", "expert_desk")
