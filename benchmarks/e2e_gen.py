"""One load-generator process of ``benchmarks/e2e.py --generator-procs N`` (not run by hand).

A telephony bridge and a share of the agents in a process of its own, so that the benchmark
measures the daemon and not its own generator: at 3,000 calls/s the one-process generator
(``router.cli.loadgen``) needs more CPU than the daemon. It speaks MQTT 3.1.1 itself, in one
thread (:class:`Wire`: the few packets it needs, QoS 1 both ways): every packet due goes out in
one ``send`` per turn of its loop and one ``recv`` takes in whatever arrived, where paho-mqtt
made a ``send`` per packet, woke its network thread for every publish and built a message
object, a topic match and a lock per message (0.8-1.1 ms of CPU a call with it, beside the
daemon's 1.1-1.7). It keeps nothing per call but what the report needs.

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
import os
import resource
import selectors
import socket
import sys
import time
from collections.abc import Callable

import msgspec


class Offer(msgspec.Struct):
    """The fields of an offer or event the generator needs (msgspec skips the rest)."""

    type: str
    contact_id: str = ""
    offer_id: str = ""
    agent_id: str = ""


_OFFER = msgspec.json.Decoder(Offer)
CALLER = "+4915112345678"
EXTEN = "0800123456"
PUBLISH, PUBACK, SUBACK, CONNACK = 0x30, 0x40, 0x90, 0x20


# router.cli.loadgen.ari_event's bytes, from a template: that module imports aiohttp and the
# router (0.4 s of CPU a process at start), and json.dumps of the nested dict was a fifth of
# the generator's time per call. The fields put in are plain ASCII (no JSON escapes).
_ARI = (
    '{{"type": "{kind}", "application": "stellwerk", "timestamp": "{ts}", "channel": '
    '{{"id": "{cid}", "name": "PJSIP/trunk-{tail}", "state": "{state}", "caller": '
    '{{"name": "", "number": "{caller}"}}, "connected": {{"name": "", "number": ""}}, '
    '"accountcode": "", "dialplan": {{"context": "from-trunk", "exten": "{exten}", '
    '"priority": 1}}, "creationtime": "{ts}", "language": "de"}}}}'
)


def ari_event(kind: str, channel_id: str, caller: str, exten: str, ts: float) -> bytes:
    """An Asterisk ARI StasisStart/StasisEnd event as the ARI websocket sends it (the bytes
    of ``router.cli.loadgen.ari_event``)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"
    return _ARI.format(
        kind=kind,
        ts=stamp,
        cid=channel_id,
        tail=channel_id[-8:],
        state="Ring" if kind == "StasisStart" else "Up",
        caller=caller,
        exten=exten,
    ).encode()


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _length(n: int) -> bytes:
    """MQTT's variable-length "remaining length"."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


class Wire:
    """One MQTT 3.1.1 connection (clean session, no keep-alive), non-blocking: packets are
    queued into :attr:`out` and written by :meth:`flush`; :meth:`receive` parses whatever
    arrived and hands each PUBLISH to ``on_publish(topic, payload)``, acknowledging QoS 1."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.out = bytearray()
        self.inbuf = bytearray()
        self.connected = False
        #: packet ids of our QoS 1 publishes (and subscribes) not acknowledged yet -> the call's
        #: number for a call (``publish(..., call=n)``), else -1.
        self.pending: dict[int, int] = {}
        #: how many calls are among them.
        self.calls_pending = 0
        self._next_id = 0
        self.on_publish = lambda topic, payload: None
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + _string(client_id)
        self.out += b"\x10" + _length(len(body)) + body

    def _packet_id(self, call: int = -1) -> int:
        if len(self.pending) >= 65535:  # every id waits for its ack: the broker is stuck
            raise RuntimeError("all 65,535 MQTT packet ids are waiting for an acknowledgement")
        while True:  # ids in use (an ack that is very late) are skipped
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.pending:
                self.pending[self._next_id] = call
                if call >= 0:
                    self.calls_pending += 1
                return self._next_id

    def publish(self, topic: bytes, payload: bytes, call: int = -1) -> int:
        """Queue a QoS 1 PUBLISH (``topic`` already length-prefixed); its packet id."""
        mid = self._packet_id(call)
        size = len(topic) + 2 + len(payload)
        self.out += b"\x32" + _length(size) + topic + mid.to_bytes(2, "big") + payload
        return mid

    def subscribe(self, topics: list[str]) -> int:
        """Queue a SUBSCRIBE of ``topics`` at QoS 1; its packet id (pending until SUBACK)."""
        mid = self._packet_id()
        body = mid.to_bytes(2, "big") + b"".join(_string(t) + b"\x01" for t in topics)
        self.out += b"\x82" + _length(len(body)) + body
        return mid

    def disconnect(self) -> None:
        """Queue a DISCONNECT."""
        self.out += b"\xe0\x00"

    def flush(self) -> None:
        """Write as much of :attr:`out` as the socket takes now."""
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            del self.out[:sent]

    def receive(self) -> bool:
        """Read what arrived and handle every whole packet in it; False when the broker closed
        the connection."""
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return True
        if not data:
            return False
        buf = self.inbuf
        buf += data
        pos, end = 0, len(buf)
        on_publish, pending, out = self.on_publish, self.pending, self.out
        while pos + 2 <= end:
            first = buf[pos]
            size, shift, i, whole = 0, 0, pos + 1, False
            while i < end:
                byte = buf[i]
                i += 1
                size |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    whole = True
                    break
            if not whole or i + size > end:
                break  # the rest of this packet has not arrived yet
            kind = first & 0xF0
            if kind == PUBLISH:
                tlen = (buf[i] << 8) | buf[i + 1]
                topic = bytes(buf[i + 2 : i + 2 + tlen])
                at = i + 2 + tlen
                if first & 0x06:  # QoS 1 (the subscriptions ask for no more)
                    out += b"\x40\x02" + buf[at : at + 2]
                    at += 2
                on_publish(topic, bytes(buf[at : i + size]))
            elif kind in (PUBACK, SUBACK):
                if pending.pop((buf[i] << 8) | buf[i + 1], -1) >= 0:
                    self.calls_pending -= 1
            elif kind == CONNACK:
                if buf[i + 1] != 0:
                    raise SystemExit(f"e2e_gen: the broker refused the connection ({buf[i + 1]})")
                self.connected = True
            pos = i + size
        del buf[:pos]
        return True


class Generator:
    """The bridge and agents of one process (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.prefix: str = args.prefix
        self.run: str = args.run
        self.index: int = args.index
        self.agents: list[str] = [a for a in args.agents.split(",") if a]
        self.wire = Wire(args.host, args.port, f"e2e-{self.run}-gen{self.index}")
        self.wire.on_publish = self._on_publish
        # phase -> contact id -> ms from send to the first offer this process saw.
        self.offered: dict[int, dict[str, float]] = {}
        self.other_offers = 0
        # phase -> its calls the broker did not PUBACK within 30 s of the end of sending.
        self.unacked: dict[int, list[int]] = {}
        self.ari_topic = _string(f"{self.prefix}/in/phone/asterisk-ari")
        self.cmd_topics = {a: _string(f"{self.prefix}/agents/{a}/cmd") for a in self.agents}
        self.own = f"g{self.run}"
        self.now_ns = 0  # when the data being handled arrived
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wire.sock, selectors.EVENT_READ)
        self.watching = selectors.EVENT_READ

    # ---- the network ------------------------------------------------------------------------

    def turn(self, timeout: float) -> None:
        """One turn of the loop: wait up to ``timeout`` s for data, handle it, write out."""
        wire = self.wire
        wire.flush()
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if wire.out else 0)
        if want != self.watching:
            self.selector.modify(wire.sock, want)
            self.watching = want
        for key, events in self.selector.select(timeout):
            if key.fileobj is wire.sock and events & selectors.EVENT_READ:
                self.now_ns = time.monotonic_ns()
                if not wire.receive():
                    raise SystemExit("e2e_gen: the broker closed the connection")
        wire.flush()

    def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Turn the loop until ``done()`` is true or ``timeout`` s passed; whether it is."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.turn(min(left, 0.05))
        return True

    def start(self) -> None:
        """Connect, subscribe to the agents' offers, log them in; then say ready."""
        wire = self.wire
        if not self.until(lambda: wire.connected, 10):
            raise SystemExit("e2e_gen: no CONNACK from the broker")
        topics = [f"{self.prefix}/agents/{a}/offers" for a in self.agents]
        topics.append(f"$share/e2e-{self.run}/{self.prefix}/events/contact.assigned")
        for i in range(0, len(topics), 100):
            wire.subscribe(topics[i : i + 100])
        for agent in self.agents:
            self._cmd(agent, b'{"op": "login"}')
        if not self.until(lambda: not wire.pending, 10):
            raise SystemExit("e2e_gen: the subscriptions or logins were not acknowledged")

    def _cmd(self, agent_id: str, body: bytes) -> int:
        return self.wire.publish(self.cmd_topics[agent_id], body)

    def _on_publish(self, _topic: bytes, payload: bytes) -> None:
        try:
            offer = _OFFER.decode(payload)
        except msgspec.DecodeError:
            return
        channel_id = offer.contact_id.partition(":")[2]
        if offer.type == "contact.assigned":
            self.wire.publish(
                self.ari_topic, ari_event("StasisEnd", channel_id, "", "", time.time())
            )
            return
        if offer.type != "offer":
            return
        parts = channel_id.split(".")
        if len(parts) == 5 and parts[0] == self.own:
            phase, sent_us = int(parts[1]), int(parts[4])
            seen = self.offered.setdefault(phase, {})
            if offer.contact_id not in seen:
                seen[offer.contact_id] = (self.now_ns / 1000 - sent_us) / 1000.0
        else:
            self.other_offers += 1
        body = b'{"op": "accept", "offer_id": ' + json.dumps(offer.offer_id).encode() + b"}"
        self._cmd(offer.agent_id, body)

    # ---- the operations ---------------------------------------------------------------------

    def send(self, phase: int, rate: float, duration: float) -> dict[str, float]:
        """Send ``rate`` calls/s for ``duration`` s, paced by the clock; wait for the PUBACKs."""
        total = int(rate * duration + 1e-9)
        wire = self.wire
        started = time.monotonic()
        n = 0
        while n < total:
            now = time.monotonic()
            due = min(total, int((now - started) * rate) + 1)
            while n < due:
                channel_id = f"g{self.run}.{phase}.{self.index}.{n}.{time.monotonic_ns() // 1000}"
                payload = ari_event("StasisStart", channel_id, CALLER, EXTEN, time.time())
                wire.publish(self.ari_topic, payload, call=n)
                n += 1
            # Until the next call is due, or data arrives: no polling in between (every
            # system call counts here, a recv or send on loopback costs 50-70 us on this box).
            ahead = started + n / rate - time.monotonic()
            self.turn(max(0.0, min(ahead, 0.05)))
        send_seconds = time.monotonic() - started
        self.until(lambda: not wire.calls_pending, 30)
        # (calls of an earlier phase still unacknowledged were counted there)
        unacked = sorted(n for n in wire.pending.values() if n >= 0)
        self.unacked[phase] = unacked
        for mid in [m for m, n in wire.pending.items() if n >= 0]:
            wire.pending[mid] = -1
        wire.calls_pending = 0
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
        for agent in self.agents:
            self._cmd(agent, b'{"op": "logout"}')
        self.until(lambda: not self.wire.pending, 10)
        self.wire.disconnect()
        self.wire.flush()
        self.wire.sock.close()


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

    # Its CPU so far (start-up, imports, logins), which is no call's.
    say({"ready": True, "cpu_seconds": cpu_seconds()})
    # The parent's requests arrive on stdin while offers keep arriving from the broker: one
    # loop serves both.
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    gen.selector.register(stdin, selectors.EVENT_READ)
    pending = b""
    while True:
        gen.turn(0.05)
        try:
            chunk = os.read(stdin, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            return 0  # the parent went away
        pending += chunk
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
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


if __name__ == "__main__":
    sys.exit(main())
