"""One load-generator process of ``benchmarks/e2e.py --generator-procs N`` (not run by hand).

A telephony bridge and a share of the agents in a process of its own, so that the benchmark
measures the daemon and not its own generator: at 3,000 calls/s the one-process generator
(``router.cli.loadgen``) needs more CPU than the daemon. It uses paho-mqtt directly (MQTT
3.1.1, its network loop in a thread) and keeps nothing per call but what the report needs.

Per call: a ``StasisStart`` over MQTT (QoS 1); whichever generator process simulates the
agent the daemon offers the call to accepts it, and the caller hangs up (``StasisEnd``) as
soon as ``contact.assigned`` arrives. The generator processes share that event topic
(``$share``), so the broker hands each event to one of them, and that one hangs up. (Hanging
up right after the accept would not do: MQTT orders messages per topic only, and the daemon
journals a batch's ingress payloads before its agent commands.) The channel id carries the
send time (CLOCK_MONOTONIC, the same clock in every process on Linux), so the process that
receives the offer measures the ingress->offer latency of another process's call.

It talks to the parent over stdin/stdout, one JSON object a line:

- it prints ``{"ready": true}`` once its agents' logins are PUBACKed;
- ``{"op": "send", "phase": i, "rate": r, "duration": d}``: send ``r`` calls/s for ``d`` s;
  prints ``{"sent": ..., "acked": ..., "send_seconds": ...}`` when done;
- ``{"op": "count", "phase": i}``: prints ``{"offered": n}``, the calls of phase ``i`` it saw
  offered so far;
- ``{"op": "report", "phase": i}``: prints what it saw of phase ``i`` (offered contact ids
  with their latencies in ms, its own calls the broker never PUBACKed) and its CPU seconds;
- ``{"op": "quit"}``: logs its agents out and exits.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import threading
import time
from pathlib import Path

import msgspec
import paho.mqtt.client as paho

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.cli.loadgen import ari_event  # noqa: E402


class Offer(msgspec.Struct):
    """The fields of an offer or event the generator needs (msgspec skips the rest)."""

    type: str
    contact_id: str = ""
    offer_id: str = ""
    agent_id: str = ""


_OFFER = msgspec.json.Decoder(Offer)
CALLER = "+4915112345678"
EXTEN = "0800123456"


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Generator:
    """The bridge and agents of one process (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.prefix: str = args.prefix
        self.run: str = args.run
        self.index: int = args.index
        self.agents: list[str] = [a for a in args.agents.split(",") if a]
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"e2e-{self.run}-gen{self.index}",
            protocol=paho.MQTTv311,
        )
        # No window of paho's own: it scans all its queued messages on every PUBACK.
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        # phase -> contact id -> ms from send to the first offer this process saw.
        self.offered: dict[int, dict[str, float]] = {}
        self.other_offers = 0
        # phase -> its calls the broker did not PUBACK within 30 s of the end of sending.
        self.unacked: dict[int, list[int]] = {}
        self.lock = threading.Lock()
        self.ari_topic = f"{self.prefix}/in/phone/asterisk-ari"
        self.connected = threading.Event()
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.connect(args.host, args.port, keepalive=60)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # no Nagle on the bridge either
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        """Connect, subscribe to the agents' offers, log them in; then say ready."""
        self.client.loop_start()
        if not self.connected.wait(10):
            raise SystemExit("e2e_gen: no CONNACK from the broker")
        topics = [(f"{self.prefix}/agents/{a}/offers", 1) for a in self.agents]
        topics.append((f"$share/e2e-{self.run}/{self.prefix}/events/contact.assigned", 1))
        for i in range(0, len(topics), 100):
            self.client.subscribe(topics[i : i + 100])
        logins = [self._cmd(a, {"op": "login"}) for a in self.agents]
        for info in logins:
            info.wait_for_publish(10)
        # A SUBACK is not awaited above; a round trip through the broker orders it before us.
        self.client.publish(f"{self.prefix}/e2e/sync", b"", qos=1).wait_for_publish(10)

    def _cmd(self, agent_id: str, body: dict[str, str]) -> paho.MQTTMessageInfo:
        return self.client.publish(
            f"{self.prefix}/agents/{agent_id}/cmd", json.dumps(body).encode(), qos=1
        )

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        now = time.monotonic_ns()
        try:
            offer = _OFFER.decode(msg.payload)
        except msgspec.DecodeError:
            return
        channel_id = offer.contact_id.partition(":")[2]
        if offer.type == "contact.assigned":
            self.client.publish(
                self.ari_topic, ari_event("StasisEnd", channel_id, "", "", time.time()), qos=1
            )
            return
        if offer.type != "offer":
            return
        parts = channel_id.split(".")
        if len(parts) == 5 and parts[0] == f"g{self.run}":
            phase, sent_us = int(parts[1]), int(parts[4])
            seen = self.offered.setdefault(phase, {})
            if offer.contact_id not in seen:
                seen[offer.contact_id] = (now / 1000 - sent_us) / 1000.0
        else:
            self.other_offers += 1
        self._cmd(offer.agent_id, {"op": "accept", "offer_id": offer.offer_id})

    def send(self, phase: int, rate: float, duration: float) -> dict[str, float]:
        """Send ``rate`` calls/s for ``duration`` s, paced by the clock; wait for the PUBACKs."""
        total = int(rate * duration + 1e-9)
        infos: list[tuple[int, paho.MQTTMessageInfo]] = []
        started = time.monotonic()
        n = 0
        while n < total:
            now = time.monotonic()
            due = min(total, int((now - started) * rate) + 1)
            while n < due:
                channel_id = f"g{self.run}.{phase}.{self.index}.{n}.{time.monotonic_ns() // 1000}"
                payload = ari_event("StasisStart", channel_id, CALLER, EXTEN, time.time())
                infos.append((n, self.client.publish(self.ari_topic, payload, qos=1)))
                n += 1
            ahead = started + n / rate - time.monotonic()
            if ahead > 0:
                time.sleep(min(ahead, 0.002))
        send_seconds = time.monotonic() - started
        deadline = time.monotonic() + 30
        unacked = []
        for i, info in infos:
            if not info.is_published():
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                unacked.append(i)
        self.unacked[phase] = unacked
        return {"sent": total, "acked": total - len(unacked), "send_seconds": send_seconds}

    def report(self, phase: int) -> dict[str, object]:
        """What this process saw of ``phase``."""
        return {
            "offered": self.offered.get(phase, {}),
            "unacked": [
                f"g{self.run}.{phase}.{self.index}.{i}" for i in self.unacked.get(phase, [])
            ],
            "other_offers": self.other_offers,
            "cpu_seconds": cpu_seconds(),
        }

    def quit(self) -> None:
        """Log the agents out and disconnect."""
        for info in [self._cmd(a, {"op": "logout"}) for a in self.agents]:
            info.wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--agents", required=True, help="comma-separated agent ids")
    args = parser.parse_args()
    gen = Generator(args)
    gen.start()

    def say(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "send":
            say(gen.send(cmd["phase"], cmd["rate"], cmd["duration"]))
        elif op == "count":
            say({"offered": len(gen.offered.get(cmd["phase"], {}))})
        elif op == "report":
            say(gen.report(cmd["phase"]))
        elif op == "quit":
            gen.quit()
            say({"bye": True})
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
