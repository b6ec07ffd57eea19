"""Asterisk end to end: the daemon as a Stasis application on the ARI peer, through the real
Redis and Mosquitto. The agents' phones are the peer's endpoints; the agents log in over MQTT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import MqttProbe, wait_until
from tests.daemon.private_servers import free_port
from tests.peers.ari import AriPeer
from tests.telephony.ari_world import (
    EXPERT_PHONE,
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
from tests.telephony.figures import TOKEN, assert_abandoned

pytestmark = pytest.mark.integration


async def test_no_answer_then_answer_bridge_caller_hangs_up_completed_and_wrap_up(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    async with AriPeer() as peer:
        routing = write_phone_routing(tmp_path / "routing.yaml", ("anna", "ben"))
        await start_daemon(routing, **asterisk_env(peer))
        await wait_until(lambda: peer.connected(), 10, "the daemon's events socket")
        await login(mqtt_probe, "anna", "ben")
        cid = peer.place_call("+4930555001")
        await wait_held(peer, cid, "support-moh")
        # The first agent's phone rings (longest idle: anna logged in first) and nobody answers.
        first = await mqtt_probe.wait_for("events/contact.offered", contact_id=contact(cid))
        first_agent = first[0]["agent_id"]
        await wait_ringing(peer, f"PJSIP/{first_agent}")
        await mqtt_probe.wait_for("events/contact.offer_expired", contact_id=contact(cid))
        # RONA: the leg stops ringing, the caller is still held, the other agent rings.
        await wait_until(lambda: not peer.ringing(f"PJSIP/{first_agent}"), 5, "leg stopped")
        second_agent = "ben" if first_agent == "anna" else "anna"
        leg = await wait_ringing(peer, f"PJSIP/{second_agent}")
        assert held(peer, cid) == "support-moh"
        peer.answer(leg)
        await mqtt_probe.wait_for(
            "events/contact.assigned", contact_id=contact(cid), agent_id=second_agent
        )
        await wait_until(
            lambda: bridged_with(peer, cid) == [f"PJSIP/{second_agent}"], 5, "caller bridged"
        )
        assert not any(b.bridge_type == "holding" for b in peer.bridges.values())
        # The caller hangs up: completed, wrap-up, the agent leg and the bridge are gone.
        peer.hangup(cid)
        done = await mqtt_probe.wait_for("events/contact.completed", contact_id=contact(cid))
        assert done[0]["agent_id"] == second_agent
        await mqtt_probe.wait_for("events/agent.state", agent_id=second_agent, state="wrap_up")
        await wait_until(lambda: not peer.channels and not peer.bridges, 5, "all cleaned up")
        await mqtt_probe.wait_for("events/agent.state", agent_id=second_agent, state="available")
        assert no_violations(peer)


async def test_hang_up_while_held_is_abandoned_and_nothing_rings(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    async with AriPeer() as peer:
        routing = write_phone_routing(tmp_path / "routing.yaml", ("anna",))
        http = f"127.0.0.1:{free_port()}"
        await start_daemon(routing, http_addr=http, admin_token=TOKEN, **asterisk_env(peer))
        await wait_until(lambda: peer.connected(), 10, "the daemon's events socket")
        cid = peer.place_call("+4930555002")  # nobody logged in: the caller waits
        await wait_held(peer, cid, "support-moh")
        await mqtt_probe.wait_for("events/contact.queued", contact_id=contact(cid))
        # The queue's announcement is played into the caller's holding bridge now and then.
        hold = peer.bridges[f"stw-hold-{cid}"]
        await wait_until(lambda: len(hold.plays) >= 2, 5, "the announcement, twice")
        assert set(hold.plays) == {"sound:queue-periodic-announce"}
        peer.hangup(cid)
        gone = await mqtt_probe.wait_for("events/contact.abandoned", contact_id=contact(cid))
        assert gone[0]["queue"] == "support"
        await assert_abandoned(f"http://{http}", "support", 1)  # and counted
        await wait_until(lambda: not peer.bridges, 5, "the holding bridge is gone")
        await login(mqtt_probe, "anna")
        assert peer.ringing("PJSIP/anna") == []
        assert not [r for r in peer.requests if r[:2] == ("POST", "/channels")]
        assert no_violations(peer)


async def test_hang_up_while_the_agent_rings_stops_the_leg(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    async with AriPeer() as peer:
        routing = write_phone_routing(tmp_path / "routing.yaml", ("anna",), offer_timeout=10)
        await start_daemon(routing, **asterisk_env(peer))
        await wait_until(lambda: peer.connected(), 10, "the daemon's events socket")
        await login(mqtt_probe, "anna")
        cid = peer.place_call("+4930555003")
        leg = await wait_ringing(peer, "PJSIP/anna")
        peer.hangup(cid)
        await mqtt_probe.wait_for("events/contact.abandoned", contact_id=contact(cid))
        await wait_until(lambda: leg not in peer.channels, 5, "the agent's phone stops ringing")
        await wait_until(lambda: not peer.channels and not peer.bridges, 5, "all cleaned up")
        assert no_violations(peer)


async def test_an_expert_overtakes_a_long_queue_and_rings_the_expert_desk_first(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    async with AriPeer() as peer:
        routing = write_phone_routing(
            tmp_path / "routing.yaml", ("anna",), expert_agents=("erika",), offer_timeout=10
        )
        await start_daemon(routing, **asterisk_env(peer))
        await wait_until(lambda: peer.connected(), 10, "the daemon's events socket")
        waiting = [peer.place_call(f"+49305551{i:02d}") for i in range(6)]
        for cid in waiting:
            await wait_held(peer, cid, "support-moh")
        expert = peer.place_call(EXPERT_PHONE)
        await wait_held(peer, expert, "expert-moh")
        queued = await mqtt_probe.wait_for("events/contact.queued", contact_id=contact(expert))
        assert queued[0]["queue"] == "expert_desk" and queued[0]["expert"] is True
        # Erika logs in; she takes support calls as well as the expert desk's, and six support
        # calls have waited longer: her phone rings for the expert first all the same.
        await login(mqtt_probe, "erika")
        leg = await wait_ringing(peer, "PJSIP/erika")
        assert peer.channels[leg].caller["number"] == EXPERT_PHONE
        peer.answer(leg)
        await wait_until(lambda: bridged_with(peer, expert) == ["PJSIP/erika"], 5, "bridged")
        assert all(held(peer, cid) == "support-moh" for cid in waiting)
        offers = mqtt_probe.seen("events/contact.offered", agent_id="erika")
        assert [o["contact_id"] for o in offers] == [contact(expert)]
        # Once the expert is done she takes the support queue, oldest call first: she could
        # have taken any of them, and the expert overtook them.
        peer.hangup(expert)
        await mqtt_probe.wait_for("events/contact.completed", contact_id=contact(expert))
        leg = await wait_ringing(peer, "PJSIP/erika")
        assert peer.channels[leg].caller["number"] == "+4930555100"
        assert no_violations(peer)


async def test_busy_agent_is_a_reject_and_the_next_agent_rings_at_once(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    async with AriPeer() as peer:
        routing = write_phone_routing(tmp_path / "routing.yaml", ("anna", "ben"), offer_timeout=30)
        peer.set_endpoint("PJSIP/anna", "busy")
        await start_daemon(routing, **asterisk_env(peer))
        await wait_until(lambda: peer.connected(), 10, "the daemon's events socket")
        await login(mqtt_probe, "anna", "ben")
        cid = peer.place_call("+4930555004", "lang=de")
        rejected = await mqtt_probe.wait_for("events/contact.offer_rejected", timeout=5)
        assert rejected[0]["agent_id"] == "anna" and rejected[0]["reason"] == "phone_busy"
        await wait_ringing(peer, "PJSIP/ben", timeout=3)  # long before the 30 s offer timeout
        offered = await mqtt_probe.wait_for("agents/ben/offers")
        assert offered[0]["contact"]["attributes"]["lang"] == "de"  # Stasis args are attributes
        peer.hangup(cid)
        await wait_until(lambda: not peer.channels, 5, "cleaned up")
        assert no_violations(peer)


async def test_a_desktop_queue_rings_the_phone_after_the_agent_accepts_on_the_desktop(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    async with AriPeer() as peer:
        routing = write_phone_routing(tmp_path / "routing.yaml", ("anna",), offer_timeout=10)
        await start_daemon(routing, **asterisk_env(peer))
        await wait_until(lambda: peer.connected(), 10, "the daemon's events socket")
        await login(mqtt_probe, "anna")
        cid = peer.place_call("+4930555301", "queue=callback_desk")
        (offer,) = await mqtt_probe.wait_for("agents/anna/offers")
        assert offer["queue"] == "callback_desk"
        assert peer.ringing("PJSIP/anna") == []  # the desktop offer comes first
        await mqtt_probe.agent("anna", op="accept", offer_id=offer["offer_id"])
        leg = await wait_ringing(peer, "PJSIP/anna")
        peer.answer(leg)
        await wait_until(lambda: bridged_with(peer, cid) == ["PJSIP/anna"], 5, "bridged")
        peer.hangup(leg)  # the agent hangs up: completed
        done = await mqtt_probe.wait_for("events/contact.completed", contact_id=contact(cid))
        assert done[0]["agent_id"] == "anna"
        await wait_until(lambda: not peer.channels and not peer.bridges, 5, "cleaned up")
        assert no_violations(peer)
