"""Twilio Voice end to end: the real daemon, Redis and Mosquitto, the Twilio peer as Twilio.

The peer places the calls (signed voice webhooks), runs every TwiML document the daemon
answers (parsed and checked with ``xml.etree`` against its description of TwiML), rings the
agents' endpoints as the test tells it and answers the REST calls the daemon makes. The agents
log in over MQTT; everything else happens on the phone.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from tests.daemon.conftest import EXPERT_PHONE, DaemonProcess, MqttProbe, wait_until
from tests.daemon.private_servers import free_port
from tests.peers.twilio import TwilioPeer
from tests.telephony.figures import TOKEN, assert_abandoned

pytestmark = pytest.mark.integration

ANNA, BERT, CLEO = "client:anna", "+4930222222", "sip:cleo@pbx.example.com"
HOTLINE = "+4930555999"
TWILIO_MUSIC = "http://com.twilio.music.classical.s3.amazonaws.com/BusyStrings.mp3"
"""Twilio's own published hold music (its twimlets page), the default music class."""


def routing_file(path: Path, offer_timeout: float = 1.0, max_missed: int = 3) -> Path:
    path.write_text(
        f"""version: 1
defaults: {{offer_timeout: {offer_timeout}, wrap_up: 0.3, reject_cooldown: 60,
            max_missed_offers: {max_missed}}}
skills: [support, second_level]
queues:
  support:
    skills: {{support: 1}}
    announcement: {{media: "All agents are busy. Please hold.", every: 1}}
  expert_desk: {{skills: {{second_level: 1}}, weight: 10}}
  hotline: {{skills: {{support: 1}}, phone_offer: desktop}}
agents:
  - {{id: anna, skills: {{support: 3, second_level: 2}}, endpoints: {{twilio: "{ANNA}"}}}}
  - {{id: bert, skills: {{support: 3, second_level: 2}}, endpoints: {{twilio: "{BERT}"}}}}
  - {{id: cleo, skills: {{support: 3, second_level: 2}}, endpoints: {{twilio: "{CLEO}"}}}}
experts:
  - {{id: x-heinz, name: Heinz, phones: ["{EXPERT_PHONE}"]}}
rules:
  - {{name: crowd_expert, when: customer.expert, queue: expert_desk, priority: 100}}
  - {{name: hotline, when: 'to == "{HOTLINE}"', queue: hotline}}
  - {{name: default, default: true, queue: support}}
""",
        encoding="utf-8",
    )
    return path


@dataclass
class World:
    peer: TwilioPeer
    probe: MqttProbe
    env: dict[str, str]
    extras: dict[str, str]
    routing: Path

    async def login(self, *agents: str) -> None:
        for agent in agents:
            await self.probe.agent(agent, op="login")
            await self.probe.wait_for("events/agent.state", agent_id=agent, state="available")

    def contact(self, sid: str) -> str:
        return f"twilio-voice:{sid}"


@pytest.fixture
def routing_options() -> dict[str, Any]:
    """Overridden by a test (``pytest.mark.parametrize`` indirect) for other timeouts."""
    return {}


@pytest.fixture
async def world(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    routing_options: dict[str, Any],
) -> AsyncIterator[World]:
    http = f"127.0.0.1:{free_port()}"
    public = f"http://{http}"
    webhook = f"{public}/v1/webhooks/twilio-voice"
    # the number also reports answered calls (a progress callback) besides their end
    events = frozenset({"answered", "completed"})
    peer = TwilioPeer(
        voice_url=webhook, status_callback=webhook, play_seconds=0.3, status_events=events
    )
    await peer.start(port=free_port())
    routing = routing_file(tmp_path / "routing.yaml", **routing_options)
    extras = {
        "http_addr": http,
        "twilio_account_sid": peer.account_sid,
        "twilio_auth_token": peer.auth_token,
        "twilio_api_base": peer.api_base,
        "twilio_public_url": public,
        "admin_token": TOKEN,
    }
    env = daemon_env(routing, **extras)
    try:
        yield World(peer=peer, probe=mqtt_probe, env=env, extras=extras, routing=routing)
    finally:
        await peer.close()


@pytest.fixture
async def running(world: World, start_daemon: Callable[..., Any]) -> World:
    """The world with the daemon running in this event loop."""
    await start_daemon(world.routing, **world.extras)
    return world


def verbs(xml: str) -> list[ET.Element]:
    return list(ET.fromstring(xml))


def assert_clean(peer: TwilioPeer) -> None:
    assert peer.errors == [], peer.errors
    assert all(doc.root is not None for doc in peer.documents)


async def test_unsigned_or_forged_requests_are_refused_and_journal_nothing(
    running: World, redis_client: Any, names: Any
) -> None:
    peer = running.peer
    base = running.extras["twilio_public_url"]
    caller = "CA" + "7" * 32
    form = {"AccountSid": peer.account_sid, "CallSid": caller, "CallStatus": "ringing"}
    # the agent leg's status callback and the dial's action, for an offer long gone
    leg = {**form, "CallSid": "CA" + "8" * 32, "ParentCallSid": caller, "CallStatus": "completed"}
    dialled = {**form, "CallStatus": "in-progress", "DialCallStatus": "no-answer"}
    # every route Twilio calls, with the form Twilio would send there
    routes = [
        ("/v1/webhooks/twilio-voice", form),
        ("/v1/telephony/twilio/route", form),
        ("/v1/telephony/twilio/wait?queue=support", form),
        ("/v1/telephony/twilio/leg?offer=o-gone", leg),
        ("/v1/telephony/twilio/dialled?offer=o-gone", dialled),
    ]
    good, other = RequestValidator(peer.auth_token), RequestValidator("other-token")
    async with aiohttp.ClientSession() as http:
        for path, body in routes:
            url = base + path
            for headers in (
                {},
                {"X-Twilio-Signature": other.compute_signature(url, body)},
                # signed, but for another URL (another host name)
                {
                    "X-Twilio-Signature": good.compute_signature(
                        url.replace("127.0.0.1", "localhost"), body
                    )
                },
                # signed, but for another form
                {"X-Twilio-Signature": good.compute_signature(url, {**body, "CallSid": "CA1"})},
            ):
                async with http.post(url, data=body, headers=headers) as resp:
                    assert resp.status == 401, path
                    assert resp.content_type == "text/xml"
                    assert [v.tag for v in verbs(await resp.text())] == ["Say", "Hangup"]
        # the same requests, signed: accepted and answered with the TwiML of each step
        answers = []
        for path, body in routes:
            url = base + path
            signed = {"X-Twilio-Signature": good.compute_signature(url, body)}
            async with http.post(url, data=body, headers=signed) as resp:
                assert resp.status == 200 and resp.content_type == "text/xml", path
                answers.append([v.tag for v in verbs(await resp.text())])
    assert answers == [
        ["Enqueue"],  # the caller is queued (nobody is logged in)
        ["Enqueue"],  # asked again: still queued
        ["Play"],  # the queue's music while waiting
        [],  # a leg's status callback is answered with empty TwiML
        ["Enqueue"],  # a dial that ended unanswered: back into the queue
    ]
    entries = await redis_client.xrange(f"{names.key_prefix}journal")
    # only the signed delivery (which a reconciliation running at the same moment may journal
    # once more; the engine routes a contact once)
    assert entries and all(caller.encode() in e[1][b"e"] for e in entries)
    assert all(b'"kind":"new"' in e[1][b"e"] for e in entries)


async def test_no_answer_then_the_next_agent_answers_is_bridged_and_completed(
    running: World,
) -> None:
    peer, probe = running.peer, running.probe
    peer.agent(ANNA, "silent")
    peer.agent(BERT, "answer", after=0.2)
    sid = peer.incoming("+4930555111")
    cid = running.contact(sid)
    # Nobody is free yet: the first answer puts the caller into the support queue with the
    # daemon's waitUrl, and the waitUrl's document plays music (Twilio's default hold music)
    await probe.wait_for("events/contact.queued", contact_id=cid)
    await wait_until(lambda: peer.twiml(sid, "voice"), 5, "the voice webhook's answer")
    (enqueue,) = verbs(peer.twiml(sid, "voice")[0].text)
    assert (enqueue.tag, enqueue.text) == ("Enqueue", "support")
    assert "/v1/telephony/twilio/wait?queue=support" in enqueue.attrib["waitUrl"]
    await wait_until(lambda: peer.twiml(sid, "wait"), 5, "the wait document")
    hold = verbs(peer.twiml(sid, "wait")[0].text)
    assert [(v.tag, v.text) for v in hold] == [("Play", TWILIO_MUSIC)]
    assert peer.member_of(sid) == "support" and peer.legs() == []

    await running.login("anna")
    await probe.wait_for("events/contact.offered", contact_id=cid, agent_id="anna")
    await running.login("bert")
    await wait_until(lambda: peer.ringing(), 5, "anna's phone to ring")
    assert [leg.to for leg in peer.ringing()] == [ANNA]
    # anna does not answer: the offer expires, the dial stops, bert rings and answers
    await probe.wait_for("events/contact.assigned", 10, contact_id=cid, agent_id="bert")
    (anna_leg,) = peer.legs(sid, ANNA)
    (bert_leg,) = peer.legs(sid, BERT)
    assert anna_leg.status in ("canceled", "no-answer")
    assert bert_leg.status == "in-progress"
    assert f"bridged {bert_leg.sid}" in peer.calls[sid].timeline

    await peer.hangup(sid)
    await probe.wait_for("events/contact.completed", contact_id=cid)
    await probe.wait_for("events/agent.state", agent_id="bert", state="wrap_up")
    await probe.wait_for("events/agent.state", agent_id="bert", previous="wrap_up")
    await wait_until(lambda: not bert_leg.live, 5, "bert's leg to end")

    # the TwiML the daemon answered, as Twilio parsed it
    dials = [verbs(d.text)[0] for d in peer.twiml(sid) if d.text.find("<Dial") >= 0]
    assert [(d[0].tag, d[0].text) for d in dials] == [("Client", "anna"), ("Number", BERT)]
    for dial in dials:
        assert int(dial.attrib["timeout"]) >= 1
        assert "/v1/telephony/twilio/dialled?offer=" in dial.attrib["action"]
        assert set(dial[0].attrib["statusCallbackEvent"].split()) >= {"answered", "completed"}
    assert_clean(peer)


async def test_desktop_queue_rings_the_agent_after_the_desktop_accept(running: World) -> None:
    peer, probe = running.peer, running.probe
    peer.agent(ANNA, "answer", after=0.1)
    await running.login("anna")
    sid = peer.incoming("+4930555114", to=HOTLINE)
    cid = running.contact(sid)
    (offer,) = await probe.wait_for("events/contact.offered", contact_id=cid, agent_id="anna")
    await wait_until(lambda: peer.member_of(sid) == "hotline", 5, "the caller in the queue")
    assert peer.legs() == []  # a desktop offer: the phone does not ring yet
    await probe.agent("anna", op="accept", offer_id=offer["offer_id"])
    await probe.wait_for("events/contact.assigned", contact_id=cid, agent_id="anna")
    await wait_until(lambda: peer.legs(sid, ANNA) and peer.legs(sid, ANNA)[0].started, 5)
    (leg,) = peer.legs(sid, ANNA)
    assert f"bridged {leg.sid}" in peer.calls[sid].timeline
    await peer.hangup(leg.sid)
    await probe.wait_for("events/contact.completed", contact_id=cid)
    await wait_until(lambda: not peer.calls[sid].live, 5, "the call to end")
    assert_clean(peer)


async def test_caller_hangs_up_while_queued_is_abandoned_and_nothing_rings(
    running: World,
) -> None:
    peer, probe = running.peer, running.probe
    sid = peer.incoming("+4930555112")
    cid = running.contact(sid)
    (queued,) = await probe.wait_for("events/contact.queued", contact_id=cid)
    assert queued["queue"] == "support"
    await wait_until(lambda: peer.member_of(sid) == "support", 5, "the caller in the queue")

    # the support queue announces every second: the wait document is asked for again and
    # says the announcement once a second of waiting has passed
    def said() -> bool:
        return any(verbs(d.text)[0].tag == "Say" for d in peer.twiml(sid, "wait"))

    await wait_until(said, 5, "the announcement")
    waits = [verbs(d.text) for d in peer.twiml(sid, "wait")]
    assert verbs(peer.twiml(sid, "wait")[0].text)[0].tag == "Play"  # not at once
    assert all(v[-1].tag == "Play" and "loop" not in v[-1].attrib for v in waits)

    await peer.hangup(sid)
    (abandoned,) = await probe.wait_for("events/contact.abandoned", contact_id=cid)
    assert abandoned["reason"] == "hangup"
    await assert_abandoned(running.extras["twilio_public_url"], "support", 1)  # and counted
    await running.login("anna")  # an agent now: nobody to ring
    await asyncio.sleep(0.3)
    assert peer.legs() == []
    assert peer.member_of(sid) is None
    assert_clean(peer)


async def test_caller_hangs_up_while_the_agent_rings_stops_the_dial(running: World) -> None:
    peer, probe = running.peer, running.probe
    peer.agent(CLEO, "silent")
    await running.login("cleo")
    sid = peer.incoming("+4930555113")
    cid = running.contact(sid)
    await probe.wait_for("events/contact.offered", contact_id=cid, agent_id="cleo")
    await wait_until(lambda: peer.ringing(), 5, "cleo's phone to ring")
    await peer.hangup(sid)
    await probe.wait_for("events/contact.abandoned", contact_id=cid)
    (leg,) = peer.legs(sid)
    await wait_until(lambda: not leg.live, 5, "the leg to stop ringing")
    assert leg.status == "canceled"
    assert peer.ringing() == []
    assert_clean(peer)


async def test_busy_agent_rejects_and_the_expert_overtakes_the_queue(running: World) -> None:
    peer, probe = running.peer, running.probe
    waiting = [peer.incoming(f"+49305550{n:03d}") for n in range(3)]
    for sid in waiting:
        await probe.wait_for("events/contact.queued", contact_id=running.contact(sid))
    expert = peer.incoming(EXPERT_PHONE)
    (queued,) = await probe.wait_for("events/contact.queued", contact_id=running.contact(expert))
    assert queued["queue"] == "expert_desk" and queued["expert"] is True
    await wait_until(lambda: peer.member_of(expert) == "expert_desk", 5, "the expert queued")

    peer.agent(BERT, "busy", after=0.1)
    peer.agent(ANNA, "answer", after=0.1)
    await running.login("bert")
    # bert is rung first, for the expert, and is busy: a reject, and anna gets the expert next
    offer = (await probe.wait_for("events/contact.offered", agent_id="bert"))[0]
    assert offer["contact_id"] == running.contact(expert)
    # the queued expert is dequeued to the dial with a Queue Member update (Url only)
    dequeued = await wait_until(
        lambda: [r for r in peer.requests if r[1].endswith(f"/Members/{expert}.json")], 5
    )
    assert dequeued[0][0] == "POST" and set(dequeued[0][2]) <= {"Url", "Method"}
    assert dequeued[0][2]["Url"].endswith("/v1/telephony/twilio/route")
    await wait_until(lambda: peer.legs(expert, BERT) and not peer.legs(expert, BERT)[0].live, 5)
    assert peer.legs(expert, BERT)[0].status == "busy"
    await running.login("anna")
    assigned = (await probe.wait_for("events/contact.assigned", 10, agent_id="anna"))[0]
    assert assigned["contact_id"] == running.contact(expert)
    assert peer.legs(expert, ANNA)[0].status == "in-progress"
    # bert, busy, turned the others down too: they wait in the support queue again
    await wait_until(lambda: all(peer.member_of(s) == "support" for s in waiting), 5, "queued")
    assert probe.seen("events/contact.assigned") == [assigned]
    # the agent hangs up: complete, and the caller's call ends too
    await peer.hangup(peer.legs(expert, ANNA)[0].sid)
    await probe.wait_for("events/contact.completed", contact_id=running.contact(expert))
    await wait_until(lambda: not peer.calls[expert].live, 5, "the expert's call to end")
    assert_clean(peer)


async def wait_log(daemon: DaemonProcess, event: str, after: int = 0) -> dict[str, Any]:
    """The first JSON log line of ``daemon`` with this ``event`` past line ``after``."""

    def find() -> dict[str, Any] | None:
        for line in daemon.log_lines()[after:]:
            if line.get("event") == event:
                return line
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}):\n{daemon.log()}")
        return None

    found: dict[str, Any] = await wait_until(find, 10, f"log event {event}")
    return found


@pytest.mark.parametrize("routing_options", [{"offer_timeout": 6.0}])
async def test_sigkill_with_held_calls_and_a_ringing_agent(
    world: World, daemons: Callable[[dict[str, str], str], DaemonProcess]
) -> None:
    peer, probe = world.peer, world.probe
    first = daemons(world.env, "first")
    await wait_log(first, "telephony.reconciled")
    await wait_log(first, "mqtt.ingress.connected")
    peer.agent(ANNA, "silent")
    await world.login("anna")
    calls = [peer.incoming(f"+49305551{n:02d}") for n in range(3)]
    await probe.wait_for(
        "events/contact.offered", agent_id="anna", contact_id=world.contact(calls[0])
    )
    await wait_until(lambda: peer.ringing(), 5, "anna's phone to ring")
    (orphan,) = peer.ringing()
    await wait_until(lambda: all(peer.member_of(s) for s in calls[1:]), 5, "two callers queued")

    first.kill()
    # everybody answers from now on; the daemon comes back while anna's phone still rings
    for endpoint in (ANNA, BERT, CLEO):
        peer.agent(endpoint, "answer", after=0.2)
    second = daemons(world.env, "second")
    await wait_log(second, "telephony.reconciled")
    await world.login("bert", "cleo")

    for sid in calls:
        await probe.wait_for("events/contact.assigned", 15, contact_id=world.contact(sid))
    # the leg rung before the kill is not the one that was bridged: it was hung up
    await wait_until(lambda: not orphan.live, 5, "the orphaned leg to end")
    assert orphan.status == "canceled"
    for sid in calls:
        assert len(probe.seen("events/contact.assigned", contact_id=world.contact(sid))) == 1
        answered = [leg for leg in peer.legs(sid) if leg.started is not None]
        assert len(answered) == 1 and answered[0].live, peer.calls[sid].timeline
        assert peer.member_of(sid) is None
    assert peer.ringing() == []
    # only the requests Twilio made while the daemon was dead failed
    assert [e for e in peer.errors if "11200" not in e] == []
    second.stop()


@pytest.mark.parametrize("routing_options", [{"max_missed": 100}])
async def test_rest_api_unreachable_for_ten_seconds_views_match_afterwards(
    world: World, start_daemon: Callable[..., Any]
) -> None:
    peer, probe = world.peer, world.probe
    daemon = await start_daemon(world.routing, **world.extras)
    peer.agent(ANNA, "answer", after=0.2)
    gone = peer.incoming("+4930555201")
    await probe.wait_for("events/contact.queued", contact_id=world.contact(gone))

    reads = len([r for r in peer.requests if r[1].endswith("/Calls.json")])
    await peer.set_reachable(False)
    down = asyncio.get_running_loop().time()
    first = peer.incoming("+4930555202")
    second = peer.incoming("+4930555203")
    brief = peer.incoming("+4930555204")
    for sid in (first, second, brief):
        await probe.wait_for("events/contact.queued", contact_id=world.contact(sid))
    await peer.hangup(gone)
    await peer.hangup(brief)
    await world.login("anna")  # offers now cannot reach Twilio: ringing fails, RONA follows
    await probe.wait_for("events/contact.offered", agent_id="anna")
    await asyncio.sleep(max(0.0, 10.0 - (asyncio.get_running_loop().time() - down)))
    await peer.set_reachable(True)

    assigned = await probe.wait_for("events/contact.assigned", 20, agent_id="anna")
    served = assigned[0]["contact_id"].removeprefix("twilio-voice:")
    # whichever of the two held the offer when the API came back (RONA alternated them)
    assert served in (first, second)
    other = second if served == first else first
    (leg,) = [leg for leg in peer.legs(served) if leg.live]
    await peer.hangup(leg.sid)  # anna finishes; the other caller is next
    await probe.wait_for("events/contact.assigned", 10, contact_id=world.contact(other))

    view = daemon.state.view
    assert view is not None
    states = {
        sid: view.contact_info(world.contact(sid))["state"]
        for sid in peer.calls
        if peer.calls[sid].parent_sid is None
    }
    assert states == {gone: "abandoned", brief: "abandoned", served: "done", other: "assigned"}
    for sid, call in peer.calls.items():
        if call.parent_sid is None:
            assert call.live == (sid == other), (sid, call.status, states.get(sid))
    assert [leg.to for leg in peer.legs() if leg.live] == [ANNA]
    # after the outage the driver read Twilio's view again (and the connector reconciled)
    assert len([r for r in peer.requests if r[1].endswith("/Calls.json")]) > reads
    assert [e for e in peer.errors if "11200" not in e] == []
