"""FreeSWITCH end to end: the daemon on the real Redis and Mosquitto, the ESL peer as the switch.

Callers dial in on the peer (the dialplan parks them with ``stellwerk=true``), agents log in
over MQTT and pick up their ringing phones on the peer; the tests look at what a caller and an
agent would notice (music, ringing, the bridge, hang-ups) and at the daemon's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import EXPERT_PHONE, DaemonProcess, MqttProbe, wait_until
from tests.daemon.private_servers import free_port
from tests.peers.esl import Channel, EslPeer
from tests.telephony.figures import TOKEN, assert_abandoned

pytestmark = pytest.mark.integration

PASSWORD = "fs-secret"
PHONES = {
    "anna": "user/1001@default",
    "ben": "user/1002@default",
    "xena": "user/1009@default",
}


def routing(
    path: Path,
    agents: tuple[str, ...] = ("anna", "ben"),
    offer_timeout: float = 1.0,
    phone_offer: str = "phone",
) -> Path:
    lines = []
    for agent in agents:
        skills = "{support: 3, second_level: 2}" if agent == "xena" else "{support: 3}"
        lines.append(
            f"  - {{id: {agent}, skills: {skills}, capacity: {{phone: 1}}, "
            f"endpoints: {{freeswitch: '{PHONES[agent]}'}}}}"
        )
    path.write_text(
        f"""version: 1
defaults:
  offer_timeout: {offer_timeout}
  wrap_up: 0.5
  reject_cooldown: 60
skills: [support, second_level]
queues:
  support:
    skills: {{support: 1}}
    phone_offer: {phone_offer}
  expert_desk:
    skills: {{second_level: 1}}
    weight: 10
agents:
{chr(10).join(lines)}
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


@pytest.fixture
async def peer() -> AsyncIterator[EslPeer]:
    server = EslPeer(password=PASSWORD)
    await server.start()
    for dial in PHONES.values():
        server.register(dial)
    try:
        yield server
    finally:
        await server.stop()


def fs_env(peer: EslPeer) -> dict[str, str]:
    return {
        "freeswitch_host": "127.0.0.1",
        "freeswitch_port": str(peer.port),
        "freeswitch_password": PASSWORD,
    }


async def connected(peer: EslPeer) -> None:
    await peer.wait_for(lambda: peer.connections >= 1, 15, "the daemon on the event socket")


def call(peer: EslPeer, caller: str, **variables: str) -> str:
    return peer.place_call(caller, variables={"stellwerk": "true", **variables})


async def login(probe: MqttProbe, *agents: str) -> None:
    for agent in agents:
        await probe.agent(agent, op="login")
        await probe.wait_for("events/agent.state", agent_id=agent, state="available")


def leg_of(peer: EslPeer, caller: str, agent: str) -> list[Channel]:
    return [c for c in peer.ringing(PHONES[agent]) if c.variables.get("stellwerk_call") == caller]


def ringing_for(peer: EslPeer, caller: str) -> list[Channel]:
    return [c for c in peer.ringing() if c.variables.get("stellwerk_call") == caller]


def cid(uuid: str) -> str:
    return f"freeswitch:{uuid}"


async def test_rona_then_answer_bridge_hangup_and_wrap_up(
    tmp_path: Path, peer: EslPeer, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(routing(tmp_path / "r.yaml"), **fs_env(peer))
    await connected(peer)
    await login(mqtt_probe, "anna", "ben")
    caller = call(peer, "+4930555010")
    [first] = await peer.wait_for(lambda: ringing_for(peer, caller), 10, "the first agent rings")
    # The caller hears music while the phone rings.
    await peer.wait_for(
        lambda: peer.channels[caller].playing == ["local_stream://moh"], 5, "hold music"
    )
    first_agent = next(a for a, d in PHONES.items() if d == first.dial)
    second_agent = "ben" if first_agent == "anna" else "anna"
    # Nobody answers: RONA after the offer timeout stops that phone, the other one rings.
    [second] = await peer.wait_for(
        lambda: leg_of(peer, caller, second_agent), 10, "the second agent rings"
    )
    assert peer.channels[first.uuid].hangup_cause == "ORIGINATOR_CANCEL"
    peer.pick_up(second.uuid)
    await mqtt_probe.wait_for(
        "events/contact.assigned", contact_id=cid(caller), agent_id=second_agent
    )
    await peer.wait_for(lambda: peer.channels[caller].other == second.uuid, 5, "the bridge")
    assert peer.channels[caller].playing == []
    peer.hang_up(caller)
    await mqtt_probe.wait_for("events/contact.completed", contact_id=cid(caller))
    await mqtt_probe.wait_for("events/agent.state", agent_id=second_agent, state="wrap_up")
    await mqtt_probe.wait_for("events/agent.state", agent_id=second_agent, state="available")
    await peer.wait_for(lambda: not peer.channels[second.uuid].alive, 5, "the agent leg ended")
    assert peer.alive() == []
    assert not any(c.startswith("api originate") for c in peer.commands)


async def test_hang_up_while_held_and_while_ringing(
    tmp_path: Path, peer: EslPeer, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    http = f"127.0.0.1:{free_port()}"
    await start_daemon(
        routing(tmp_path / "r.yaml", ("anna",), offer_timeout=5.0),
        http_addr=http,
        admin_token=TOKEN,
        **fs_env(peer),
    )
    await connected(peer)
    held = call(peer, "+4930555020")
    await mqtt_probe.wait_for("events/contact.queued", contact_id=cid(held))
    await peer.wait_for(lambda: peer.channels[held].playing, 5, "music for the caller")
    peer.hang_up(held)
    [abandoned] = await mqtt_probe.wait_for("events/contact.abandoned", contact_id=cid(held))
    assert not [c for c in peer.commands if "originate" in c]  # nothing rang
    await assert_abandoned(f"http://{http}", "support", 1)  # and counted

    await login(mqtt_probe, "anna")
    caller = call(peer, "+4930555021")
    [leg] = await peer.wait_for(lambda: ringing_for(peer, caller), 10, "anna rings")
    peer.hang_up(caller)
    await peer.wait_for(lambda: not peer.channels[leg.uuid].alive, 5, "the phone stops")
    assert peer.channels[leg.uuid].hangup_cause == "ORIGINATOR_CANCEL"
    await mqtt_probe.wait_for("events/contact.abandoned", contact_id=cid(caller))
    assert abandoned["contact_id"] == cid(held)
    await assert_abandoned(f"http://{http}", "support", 2)


async def test_an_expert_overtakes_the_queue(
    tmp_path: Path, peer: EslPeer, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(routing(tmp_path / "r.yaml", ("xena",), offer_timeout=5.0), **fs_env(peer))
    await connected(peer)
    waiting = [call(peer, f"+49305550{30 + i}") for i in range(4)]
    for uid in waiting:
        await mqtt_probe.wait_for("events/contact.queued", contact_id=cid(uid))
    expert = call(peer, EXPERT_PHONE)
    await mqtt_probe.wait_for("events/contact.queued", contact_id=cid(expert), queue="expert_desk")
    await login(mqtt_probe, "xena")
    [leg] = await peer.wait_for(lambda: peer.ringing(), 10, "the first phone to ring")
    assert leg.variables["stellwerk_call"] == expert
    assert len(peer.ringing()) == 1


async def test_sigkill_with_held_calls_and_a_ringing_leg(
    tmp_path: Path,
    peer: EslPeer,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
) -> None:
    env = daemon_env(routing(tmp_path / "r.yaml", ("anna", "ben")), **fs_env(peer))
    daemon = daemons(env, "a")
    await connected(peer)
    await login(mqtt_probe, "anna")
    calls = [call(peer, "+4930555040"), call(peer, "+4930555041"), call(peer, "+4930555042")]
    [orphan] = await peer.wait_for(lambda: peer.ringing(PHONES["anna"]), 10, "anna rings")
    for uid in calls:
        await mqtt_probe.wait_for("events/contact.queued", contact_id=cid(uid))
    daemon.kill()
    await peer.wait_for(lambda: peer.connections == 0, 5, "the socket closed with the process")
    assert orphan.alive  # still ringing: nobody told the switch

    mark = len(peer.commands)
    daemon = daemons(env, "a2")
    await connected(peer)

    def held_again() -> bool:
        since = peer.commands[mark:]
        return all(
            f"api uuid_broadcast {uid} local_stream://moh aleg" in since
            and peer.channels[uid].playing == ["local_stream://moh"]
            for uid in calls
        )

    # Nobody is left in silence: every waiting caller's music is started again.
    await peer.wait_for(held_again, 15, "every held call held again")
    await login(mqtt_probe, "ben")
    # The leg the dead daemon rang is hung up by Stellwerk (not rung out by the switch).
    await peer.wait_for(lambda: not orphan.alive, 15, "the orphaned leg hung up")
    assert orphan.hangup_cause == "ORIGINATOR_CANCEL"
    # Every held call gets an agent, exactly once: answer every phone that rings.
    bridged: dict[str, str] = {}

    async def answer_all() -> bool:
        for leg in peer.ringing():
            peer.pick_up(leg.uuid)
        for uid in calls:
            other = peer.channels[uid].other
            if other is not None and uid not in bridged:
                bridged[uid] = other
                peer.hang_up(uid)  # talked, done: the agent is free for the next call
        return len(bridged) == len(calls)

    await wait_until(answer_all, 30, "every held call bridged to an agent")
    for uid in calls:
        # Completed after its caller hung up; the assignment was published before that.
        await mqtt_probe.wait_for("events/contact.completed", contact_id=cid(uid))
        assigned = mqtt_probe.seen("events/contact.assigned", contact_id=cid(uid))
        assert len(assigned) == 1, (uid, assigned)
    assert daemon.proc is not None and daemon.proc.poll() is None


async def test_the_event_socket_drops_for_ten_seconds(
    tmp_path: Path, peer: EslPeer, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    daemon = await start_daemon(
        routing(tmp_path / "r.yaml", ("anna",), offer_timeout=5.0), **fs_env(peer)
    )
    await connected(peer)
    before = call(peer, "+4930555050")
    ends = call(peer, "+4930555051")
    for uid in (before, ends):
        await mqtt_probe.wait_for("events/contact.queued", contact_id=cid(uid))
    sever = asyncio.create_task(peer.sever(10.0))
    await peer.wait_for(lambda: peer.connections == 0, 5, "the socket cut")
    during = call(peer, "+4930555052", queue="billing")
    peer.hang_up(ends)
    await sever
    await connected(peer)
    await mqtt_probe.wait_for("events/contact.abandoned", contact_id=cid(ends), timeout=15)
    await mqtt_probe.wait_for("events/contact.queued", contact_id=cid(during), timeout=15)
    await peer.wait_for(lambda: peer.channels[during].playing, 5, "the missed call held")
    engine = daemon.state.view

    def views_match() -> bool:
        active = {
            c.id
            for c in engine.state.contacts.values()
            if c.id.startswith("freeswitch:") and c.state not in ("done", "abandoned")
        }
        return active == {cid(c.uuid) for c in peer.alive() if c.direction == "inbound"}

    await wait_until(views_match, 5, "the engine's calls to be the switch's")
    # held again after the reconnect (the reconciliation's hold may still be on its way)
    await peer.wait_for(
        lambda: peer.channels[before].playing == ["local_stream://moh"], 5, "the music again"
    )
    # Nothing is stuck: the agent logs in and both waiting calls are put through.
    await login(mqtt_probe, "anna")
    [leg] = await peer.wait_for(lambda: peer.ringing(), 10, "anna rings")
    peer.pick_up(leg.uuid)
    assert leg.variables["stellwerk_call"] in (before, during)
    await mqtt_probe.wait_for("events/contact.assigned", agent_id="anna")


async def test_a_busy_phone_is_a_reject_and_the_next_agent_rings_at_once(
    tmp_path: Path, peer: EslPeer, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(routing(tmp_path / "r.yaml", offer_timeout=30.0), **fs_env(peer))
    await connected(peer)
    peer.register(PHONES["anna"], "busy")
    await login(mqtt_probe, "anna", "ben")
    caller = call(peer, "+4930555061")
    # Whoever is offered first: anna's phone is busy, so ben's rings long before 30 s.
    [leg] = await peer.wait_for(lambda: leg_of(peer, caller, "ben"), 10, "ben rings")
    busy = [c for c in peer.channels.values() if c.dial == PHONES["anna"]]
    assert [c.hangup_cause for c in busy] == ["USER_BUSY"]  # anna (longest idle) was first
    peer.pick_up(leg.uuid)
    await mqtt_probe.wait_for("events/contact.assigned", contact_id=cid(caller), agent_id="ben")
    await peer.wait_for(lambda: peer.channels[caller].other == leg.uuid, 5, "the bridge")


async def test_a_desktop_queue_rings_the_phone_after_the_accept_on_the_desktop(
    tmp_path: Path, peer: EslPeer, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    await start_daemon(
        routing(tmp_path / "r.yaml", ("anna",), offer_timeout=30.0, phone_offer="desktop"),
        **fs_env(peer),
    )
    await connected(peer)
    await login(mqtt_probe, "anna")
    caller = call(peer, "+4930555060")
    [offer] = await mqtt_probe.wait_for("agents/anna/offers")
    assert peer.ringing() == []  # a desktop queue: the offer is on the screen, not the phone
    await mqtt_probe.agent("anna", op="accept", offer_id=offer["offer_id"])
    await mqtt_probe.wait_for("events/contact.assigned", contact_id=cid(caller))
    [leg] = await peer.wait_for(lambda: leg_of(peer, caller, "anna"), 5, "anna's phone rings")
    peer.pick_up(leg.uuid)
    await peer.wait_for(lambda: peer.channels[caller].other == leg.uuid, 5, "the bridge")
    # The agent ends the call from the desktop: caller and phone hang up.
    await mqtt_probe.agent("anna", op="complete", contact_id=cid(caller))
    await mqtt_probe.wait_for("events/contact.completed", contact_id=cid(caller))
    await peer.wait_for(lambda: not peer.channels[caller].alive, 5, "the call ended")
    await peer.wait_for(lambda: not peer.channels[leg.uuid].alive, 5, "the phone hung up")
