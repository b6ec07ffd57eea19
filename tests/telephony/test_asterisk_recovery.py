"""Asterisk end to end, when things break: the daemon SIGKILLed with calls held and a phone
ringing, and the connection to Asterisk gone for 10 s while calls come and go."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import DaemonProcess, MqttProbe, wait_until
from tests.peers.ari import AriPeer
from tests.telephony.ari_world import (
    asterisk_env,
    bridged_with,
    contact,
    held,
    login,
    no_violations,
    wait_held,
    wait_ringing,
    write_phone_routing,
)

pytestmark = pytest.mark.integration


def ingress_up(daemon: DaemonProcess) -> bool:
    """Whether the daemon subscribed its MQTT ingress (agent commands before that are lost:
    the broker has no session for it yet)."""
    return any(line.get("event") == "mqtt.ingress.connected" for line in daemon.log_lines())


async def test_sigkill_with_held_calls_and_a_ringing_phone(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
) -> None:
    async with AriPeer() as peer:
        # A long offer timeout: the phone would ring on for a long time by itself.
        routing = write_phone_routing(
            tmp_path / "routing.yaml", ("anna", "ben", "carl"), offer_timeout=30.0
        )
        env = daemon_env(routing, **asterisk_env(peer))
        first = daemons(env, "first")
        await wait_until(lambda: peer.connected(), 15, "the daemon's events socket")
        await wait_until(lambda: ingress_up(first), 15, "the daemon's MQTT ingress")
        await login(mqtt_probe, "anna")
        calls = [peer.place_call(f"+4930555{i:03d}") for i in range(3)]
        for cid in calls:
            await wait_held(peer, cid, "support-moh")
        orphan = await wait_ringing(peer, "PJSIP/anna")
        first.kill()
        # Asterisk keeps every call and anna's phone keeps ringing; meanwhile anna logs out on
        # her desktop (the broker keeps the command for the daemon), so the offer her phone
        # rings for no longer exists once the daemon is back.
        await mqtt_probe.agent("anna", op="logout")
        await asyncio.sleep(0.3)
        assert all(cid in peer.channels for cid in calls) and orphan in peer.channels
        second = daemons(env, "second")
        await wait_until(lambda: peer.connected(), 15, "the restarted daemon's socket")
        await mqtt_probe.wait_for("events/agent.state", 15, agent_id="anna", state="offline")
        # The orphaned leg is hung up by Stellwerk (its own ring timeout is 35 s away).
        await wait_until(lambda: orphan not in peer.channels, 10, "the orphaned leg hung up")
        assert ("DELETE", f"/channels/{orphan}", {}) in peer.requests
        assert all(held(peer, cid) == "support-moh" for cid in calls)
        assert peer.ringing("PJSIP/anna") == []
        # Everybody answers now: each held call gets an agent exactly once.
        for agent in ("anna", "ben", "carl"):
            peer.set_endpoint(f"PJSIP/{agent}", "answer")
        await login(mqtt_probe, "ben", "carl")
        await mqtt_probe.agent("anna", op="login")
        await wait_until(
            lambda: all(len(bridged_with(peer, cid)) == 1 for cid in calls), 15, "all bridged"
        )
        assigned = Counter(p["contact_id"] for p in mqtt_probe.seen("events/contact.assigned"))
        assert assigned == Counter(contact(cid) for cid in calls)
        agents = {bridged_with(peer, cid)[0] for cid in calls}
        assert agents == {"PJSIP/anna", "PJSIP/ben", "PJSIP/carl"}
        assert second.stop() == 0
        assert no_violations(peer)


async def test_a_10s_outage_while_calls_arrive_and_end_ends_in_the_pbxs_view(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    async with AriPeer() as peer:
        routing = write_phone_routing(
            tmp_path / "routing.yaml", ("anna", "ben"), offer_timeout=30, wrap_up=0.3
        )
        daemon = await start_daemon(routing, **asterisk_env(peer))
        await wait_until(lambda: peer.connected(), 10, "the daemon's events socket")
        await login(mqtt_probe, "anna")
        talking = peer.place_call("+4930555101")
        peer.answer(await wait_ringing(peer, "PJSIP/anna"))
        await wait_until(lambda: bridged_with(peer, talking) == ["PJSIP/anna"], 5, "bridged")
        await login(mqtt_probe, "ben")
        ringing_for = peer.place_call("+4930555102")
        ben_leg = await wait_ringing(peer, "PJSIP/ben")

        await peer.drop()
        peer.hangup(talking)  # ends while nobody is listening
        peer.hangup(ringing_for)  # ben's phone would ring on for a caller who is gone
        missed = peer.place_call("+4930555103", "lang=de")  # arrives unseen
        short = peer.place_call("+4930555104")  # arrives and ends unseen
        peer.hangup(short)
        await asyncio.sleep(10)
        assert ben_leg in peer.channels
        peer.restore()

        await wait_until(lambda: peer.connected(), 20, "the daemon reconnects")
        await mqtt_probe.wait_for("events/contact.completed", 10, contact_id=contact(talking))
        await mqtt_probe.wait_for("events/contact.abandoned", 10, contact_id=contact(ringing_for))
        await wait_until(lambda: ben_leg not in peer.channels, 10, "ben's leg hung up")
        # The call that arrived unseen is journaled and routed: held, then an agent rings.
        await mqtt_probe.wait_for("events/contact.queued", 10, contact_id=contact(missed))
        offered = await mqtt_probe.wait_for("events/contact.offered", contact_id=contact(missed))
        agent = offered[0]["agent_id"]
        peer.answer(await wait_ringing(peer, f"PJSIP/{agent}"))
        await wait_until(lambda: bridged_with(peer, missed) == [f"PJSIP/{agent}"], 5, "bridged")
        offer = mqtt_probe.seen(f"agents/{agent}/offers")[-1]
        assert offer["contact"]["attributes"]["lang"] == "de"

        # Stellwerk's view matches the PBX's: the same calls, nothing stuck.
        def views_match() -> bool:
            engine = daemon.state.view
            ours = {
                c.id
                for c in engine.state.contacts.values()
                if c.id.startswith("asterisk-ari:") and c.state != "wrap_up"
            }
            return ours == {contact(c) for c in peer.in_app()}

        await wait_until(views_match, 5, "Stellwerk's calls == Asterisk's calls")
        assert set(peer.in_app()) == {missed}
        assert [c.id for c in peer.channels.values() if c.state == "Ringing"] == []
        assert set(peer.bridges) == {f"stw-call-{missed}"}
        assert contact(short) not in {
            p["contact_id"] for p in mqtt_probe.seen("events/contact.queued")
        }
        assert no_violations(peer)
