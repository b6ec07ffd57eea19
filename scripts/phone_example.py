"""``make phone-example``: one morning on the phones, Stellwerk against a SIMULATED Asterisk.

The daemon (``stellwerk run``, a child process on the local Redis and Mosquitto, a key and topic
prefix of its own) is the Stasis application ``stellwerk`` of a simulated Asterisk: the ARI
protocol peer from the test suite (``tests/peers/ari.py``), which keeps real channels and
bridges and speaks ARI's REST API and events WebSocket. No real Asterisk, no real phones: the
callers and the agents' phones are played by this script. The agents log in over MQTT like any
desktop would.

The morning (a few seconds per "hour"):

- 08:00 Anna and Ben log in; five customers call, the first ones are rung at once, the
  rest are held with music;
- Ben's phone rings but he does not answer (RONA): the call goes back to its place and the
  next free agent rings;
- a customer hangs up while waiting;
- Heinz, a crowd expert, calls: his call overtakes the queue. Erika, who takes support calls
  as well as the expert desk, logs in and her phone rings for Heinz first, although support
  callers have waited longer;
- calls end, some by the caller hanging up, some by the agent.

Each call's timeline is printed at the end: held, rung at whom, bridged, ended and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiomqtt
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from router.daemon.telephony.asterisk import parse_leg_id  # noqa: E402
from tests.peers.ari import AriPeer  # noqa: E402

PREFIX = "stellwerk-phone-example"
KEYS = f"{PREFIX}:"
EXPERT = "+4930111111"
ROUTING = f"""\
version: 1
defaults: {{offer_timeout: 3, wrap_up: 1, max_missed_offers: 3}}
skills: [support, second_level]
queues:
  support: {{skills: {{support: 1}}, music_class: support-moh,
            announcement: {{media: "sound:queue-periodic-announce", every: 4}}}}
  expert_desk: {{skills: {{second_level: 1}}, weight: 10, music_class: expert-moh}}
agents:
  - {{id: anna, name: Anna, skills: {{support: 3}}, endpoints: {{asterisk: PJSIP/1001}}}}
  - {{id: ben, name: Ben, skills: {{support: 3}}, endpoints: {{asterisk: PJSIP/1002}}}}
  - {{id: erika, name: Erika, skills: {{support: 3, second_level: 4}},
     endpoints: {{asterisk: PJSIP/1003}}}}
experts:
  - {{id: x-heinz, name: Heinz Fischer, phones: ["{EXPERT}"]}}
rules:
  - {{name: crowd_expert, when: customer.expert, queue: expert_desk, priority: 100}}
  - {{name: default, default: true, queue: support}}
"""


def ingress_up(log: Path) -> bool:
    """Whether the daemon (JSON log lines in ``log``) subscribed its MQTT ingress."""
    return '"mqtt.ingress.connected"' in log.read_text(errors="replace")


def wipe() -> None:
    r = redis.Redis.from_url(os.environ.get("STELLWERK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    keys = list(r.scan_iter(match=KEYS + "*"))
    if keys:
        r.delete(*keys)


class Morning:
    def __init__(self, peer: AriPeer) -> None:
        self.peer = peer
        self.start = time.time()
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.names: dict[str, str] = {}

    def say(self, text: str) -> None:
        print(f"  [{time.time() - self.start:5.1f}s] {text}", flush=True)

    async def pump(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            data = json.loads(message.payload) if isinstance(message.payload, bytes) else {}
            kind = str(message.topic).removeprefix(f"{PREFIX}/events/")
            self.events.append((time.time(), kind, data))

    async def until(self, what: str, check: Any, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            await asyncio.sleep(0.05)
        raise SystemExit(f"phone-example: timed out waiting for {what}")

    def seen(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [
            d
            for _, k, d in self.events
            if k == kind and all(d.get(a) == b for a, b in match.items())
        ]

    def call(self, number: str, who: str) -> str:
        cid = self.peer.place_call(number)
        self.names[cid] = who
        self.say(f"{who} ({number}) calls")
        return cid

    def timeline(self) -> None:
        per_call: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for at, cid, what in self.peer.history:
            leg = parse_leg_id(cid) if cid else None
            if leg is not None:
                per_call[leg[1]].append((at, f"agent phone: {what}"))
            elif cid in self.names:
                per_call[cid].append((at, f"asterisk: {what}"))
        for at, kind, data in self.events:
            cid = str(data.get("contact_id", "")).removeprefix("asterisk-ari:")
            if cid not in self.names or not kind.startswith("contact."):
                continue
            detail = {
                "contact.queued": f"queued in {data.get('queue')}",
                "contact.offered": f"offered to {data.get('agent_id')}",
                "contact.offer_expired": f"{data.get('agent_id')} did not answer (RONA)",
                "contact.offer_rejected": f"{data.get('agent_id')} rejected ({data.get('reason')})",
                "contact.assigned": f"answered by {data.get('agent_id')} after "
                f"{data.get('waited', 0):.1f}s",
                "contact.completed": f"completed by {data.get('agent_id')} ({data.get('outcome')})",
                "contact.abandoned": f"abandoned after {data.get('waited', 0):.1f}s "
                f"({data.get('reason')})",
                "contact.wrap_up_done": f"{data.get('agent_id')}'s wrap-up over",
            }.get(kind)
            if detail:
                per_call[cid].append((at, f"stellwerk: {detail}"))
        print("\nEach call's timeline (seconds since the morning began):")
        for cid, who in self.names.items():
            print(f"\n  {who}  (channel {cid})")
            for at, line in sorted(per_call[cid]):
                print(f"    {at - self.start:5.1f}s  {line}")


async def morning(peer: AriPeer, m: Morning) -> None:
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"{PREFIX}-desks") as mqtt:
        await mqtt.subscribe(f"{PREFIX}/events/#", qos=1)
        pump = asyncio.create_task(m.pump(mqtt))

        async def login(agent: str) -> None:
            await mqtt.publish(f"{PREFIX}/agents/{agent}/cmd", json.dumps({"op": "login"}), qos=1)
            await m.until(f"{agent} available", lambda: m.seen("agent.state", agent_id=agent))
            m.say(f"{agent.capitalize()} logs in")

        # Anna picks up after a moment; Ben's phone rings out the first time.
        peer.set_endpoint("PJSIP/1001", "answer")
        peer.answer_delay = 0.8
        await login("ben")
        await login("anna")
        m.call("+4930555010", "Frau Albrecht")
        await m.until("Ben's phone rings", lambda: peer.ringing("PJSIP/1002"))
        m.say("Ben's phone rings ... he is away from his desk and does not answer")
        m.call("+4930555011", "Herr Berger")
        m.call("+4930555012", "Frau Czerny")
        fourth = m.call("+4930555013", "Herr Demir")
        await m.until("RONA", lambda: m.seen("contact.offer_expired", agent_id="ben"))
        m.say("Ben missed the call: it goes back to its place in the queue")
        peer.set_endpoint("PJSIP/1002", "answer")  # Ben is back at his desk
        await asyncio.sleep(1.0)
        m.say("Herr Demir gives up waiting and hangs up")
        peer.hangup(fourth)
        heinz = m.call(EXPERT, "Heinz Fischer (crowd expert)")
        await m.until("Heinz queued", lambda: m.seen("contact.queued", queue="expert_desk"))
        m.say("Heinz is recognised as a crowd expert: straight to the expert desk")
        m.call("+4930555014", "Frau Engel")
        # who called before Heinz and still waits (Anna and Ben are on the phone)
        older = [
            who
            for cid, who in list(m.names.items())[: list(m.names).index(heinz)]
            if not m.seen("contact.assigned", contact_id=f"asterisk-ari:{cid}")
            and not m.seen("contact.abandoned", contact_id=f"asterisk-ari:{cid}")
        ]
        peer.set_endpoint("PJSIP/1003", "answer")
        await login("erika")
        await m.until("Heinz answered", lambda: m.seen("contact.assigned", agent_id="erika"))
        first = m.seen("contact.offered", agent_id="erika")[0]
        if first["contact_id"] != f"asterisk-ari:{heinz}":
            raise SystemExit("phone-example: Erika was not rung for Heinz first")
        m.say(
            "Erika takes support calls too, and her phone rings for Heinz first: he overtakes "
            + (", ".join(older) + ", who waited longer" if older else "the support queue")
        )
        # Every call that is put through is talked for a while and then ends: sometimes the
        # caller hangs up, sometimes the agent.
        ended: set[str] = {fourth}
        turn = 0
        while len(ended) < len(m.names):
            for cid in m.names:
                if cid in ended:
                    continue
                assigned = m.seen("contact.assigned", contact_id=f"asterisk-ari:{cid}")
                gone = m.seen("contact.abandoned", contact_id=f"asterisk-ari:{cid}")
                if gone:
                    ended.add(cid)
                    continue
                if not assigned or time.time() - m.start < assigned[0]["at"] - m.start + 1.5:
                    continue
                agent = assigned[0]["agent_id"]
                turn += 1
                if turn % 2:
                    peer.hangup(cid)
                    m.say(f"{m.names[cid]} says thank you and hangs up")
                else:
                    for leg in [
                        c.id
                        for c in list(peer.channels.values())
                        if (ref := parse_leg_id(c.id)) is not None and ref[1] == cid
                    ]:
                        peer.hangup(leg)
                    m.say(f"{agent.capitalize()} finishes with {m.names[cid]} and hangs up")
                ended.add(cid)
            await asyncio.sleep(0.1)
        await m.until(
            "every call finished",
            lambda: all(
                m.seen("contact.completed", contact_id=f"asterisk-ari:{c}")
                or m.seen("contact.abandoned", contact_id=f"asterisk-ari:{c}")
                for c in m.names
            ),
            20,
        )
        await asyncio.sleep(0.5)
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await pump


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="stellwerk-phone."))
    routing = work / "routing.yaml"
    routing.write_text(ROUTING, encoding="utf-8")
    wipe()
    print("phone-example: Stellwerk and a SIMULATED Asterisk (the ARI protocol peer of the test")
    print("               suite: real channels and bridges, no real phones), one morning.\n")
    async with AriPeer(username="stellwerk", password="example-ari-secret") as peer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
        env.update(
            STELLWERK_ROUTING=str(routing),
            STELLWERK_KEY_PREFIX=KEYS,
            STELLWERK_TOPIC_PREFIX=PREFIX,
            STELLWERK_MQTT_CLIENT_ID=f"{PREFIX}-daemon",
            STELLWERK_HTTP_ADDR="",
            STELLWERK_SMTP_ADDR="",
            STELLWERK_LOG_FORMAT="json",
            STELLWERK_ASTERISK_URL=peer.url,
            STELLWERK_ASTERISK_USERNAME=peer.username,
            STELLWERK_ASTERISK_PASSWORD=peer.password,
        )
        log = (work / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        m = Morning(peer)
        try:
            await m.until("the daemon to connect to the simulated Asterisk", peer.connected, 20)
            # Agents' logins before the daemon subscribed would be lost on a first run.
            await m.until("the daemon's MQTT ingress", lambda: ingress_up(work / "daemon.log"), 20)
            m.say(
                f"Stellwerk connected to the simulated Asterisk at {peer.url} (Stasis app "
                "'stellwerk')"
            )
            await morning(peer, m)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
            log.close()
            wipe()
        m.timeline()
        problems = peer.violations
        print(f"\nARI requests made by Stellwerk: {len(peer.requests)}, invalid: {len(problems)}")
        for p in problems:
            print(f"  {p}")
        print(f"Daemon log: {work / 'daemon.log'}")
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
