"""What a mail backlog costs the engine's state: memory, snapshot and restore.

The example routing (``config/routing.yaml``) on a Monday morning, nobody logged in, and
``--contacts`` customer mails arriving (a backlog after an outage): subjects that the mail rules
route to the DSL, mobile, TV and billing mail queues, bodies of a few hundred bytes to several
kilobytes (greeting, the problem, contract details, a signature, often the quoted earlier mail),
a few attachments, and one customer in five writing more than once. All of them wait.

Prints the resident memory with the backlog in the engine (``rss_mib``; ``peak_rss_mib`` is the
process's high-water mark, snapshot and restore included), and the snapshots the way the daemon
takes them (``router/daemon/snapshots.py``). First a full one: forked, encoded in chunks into a
pipe and read back (``snapshot_s`` until the last chunk is read, ``snapshot_bytes``, ``chunks``,
``max_chunk_bytes``; ``fork_ms`` is the routing loop's stall, the ``fork()`` itself). Then
``--delta-rounds`` deltas, each cut when more mails have changed ``--delta-records`` records
(the daemon's ``snapshot_delta_records``, 2,000): ``snapshot_stall_ms`` is the longest time a
delta cut held the routing loop (taking the engine's changes and encoding them),
``delta_stalls_ms`` each of them (``delta_stalls_cpu_ms``: the CPU time of each, which a
loaded machine does not inflate), ``delta_bytes`` the largest delta, ``delta_inputs`` the mails
of one delta. Restore is
decoding the full snapshot and the deltas (``decode_s``) plus building the engine's indexes,
``restore_s`` the two.

``--daemon`` also measures a real restart: the snapshot and the mails' bodies go into Redis (a
key prefix of its own, removed afterwards), ``stellwerk run`` is started on them, and
``restart_s`` is the time from starting the process to its ``router.routing`` log line (ready
to route), ``daemon_rss_mib`` its resident memory then. Before the restart the snapshot is
compacted the daemon's way (:mod:`router.daemon.compact`, a process of its own, over all but
the last delta): ``compact_s`` its wall time, ``compact_cpu_s`` and ``compact_rss_mib`` its
CPU and peak memory (not the router's), then the router's part, carrying the last delta over
and switching the pointer: ``switch_ms`` its wall time, ``switch_loop_stall_ms`` the longest
the event loop was held meanwhile. The restart restores the compacted snapshot.

    .venv/bin/python benchmarks/state.py [--contacts 100000] [--seed 1] [--json] [--daemon]
        [--delta-rounds 5] [--delta-records 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from channels.contact_event import Attachment, ContactEvent, Sender
from router.daemon.journal import Journal, Snapshot, connect_redis
from router.daemon.snapshots import DeltaCut, StateCut
from router.engine import Engine
from router.messages import Tick
from router.snapshot import decode_state
from router.state import EngineState
from rules.load import load_routing

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("STELLWERK_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
MQTT_URL = os.environ.get("STELLWERK_TEST_MQTT_URL") or "mqtt://127.0.0.1:1883"
MONDAY_9AM = 1_767_600_000.0 + 3600  # 2026-01-05 09:00 in Berlin: opening hours, not after hours

SUBJECTS = [
    "Störung DSL seit gestern Abend",
    "Internet sehr langsam, Router startet ständig neu",
    "Glasfaser-Anschluss: Termin für Techniker?",
    "FRITZ!Box zeigt Info-LED rot",
    "SIM-Karte gesperrt nach PIN-Eingabe",
    "Roaming in der Schweiz funktioniert nicht",
    "eSIM für neues Smartphone aktivieren",
    "Handy-Vertrag: Datenvolumen aufgebraucht",
    "TV-Receiver findet keine Sender mehr",
    "Fernsehen ruckelt seit dem Update",
    "Rechnung Dezember doppelt abgebucht",
    "Frage zur letzten Rechnung (Kundennummer im Text)",
    "Re: Ihre Störungsmeldung",
    "AW: Rechnung November",
]
OPENINGS = [
    "Sehr geehrte Damen und Herren,",
    "Hallo liebes Service-Team,",
    "Guten Tag,",
    "Hallo zusammen,",
]
PROBLEMS = [
    "seit gestern Abend gegen 19 Uhr funktioniert unser Internet nicht mehr. Die Info-LED am "
    "Router leuchtet rot und ein Neustart hat nichts geändert. Wir arbeiten beide im Homeoffice "
    "und sind dringend auf den Anschluss angewiesen.",
    "auf meiner Rechnung für Dezember wurde der Betrag zweimal abgebucht. Ich bitte um "
    "Erstattung des doppelt eingezogenen Betrags auf das bekannte Konto und um eine korrigierte "
    "Rechnung.",
    "mein Handy zeigt seit heute früh 'SIM-Karte nicht erkannt'. Ich habe die Karte schon in "
    "ein anderes Gerät gesteckt, dort dasselbe. Bitte schicken Sie mir eine Ersatzkarte oder "
    "sagen Sie mir, was ich tun kann.",
    "der Receiver findet nach dem automatischen Update keine Sender mehr. Ein Sendersuchlauf "
    "bricht bei 40 Prozent ab. Die Kabel sind alle fest und der Fernseher selbst funktioniert.",
    "ich bin im Urlaub in der Schweiz und habe kein mobiles Internet, obwohl Roaming in der App "
    "eingeschaltet ist. Telefonieren geht, Daten nicht. Ist in meinem Tarif etwas gesperrt?",
    "die Geschwindigkeit liegt seit einer Woche bei unter 5 Mbit/s statt der gebuchten 250. Ich "
    "habe die Messungen mit dem Breitbandmessungs-Tool gemacht und hänge das Protokoll an.",
    "der Techniker war für heute zwischen 8 und 12 Uhr angekündigt, ist aber nicht gekommen. "
    "Niemand hat sich gemeldet. Ich habe mir dafür extra frei genommen.",
]
DETAILS = [
    "Meine Kundennummer ist {cust}, der Anschluss läuft unter der Rufnummer 030 {num}.",
    "Vertragsnummer: V-{cust}-{num}. Ich bin unter 0170 {num} tagsüber erreichbar.",
    "Ich habe bereits am {day}. angerufen, Vorgangsnummer {num}, aber seitdem nichts gehört.",
    "Zur Sicherheit: das Gerät ist ein {device}, Firmware {fw}, an der TAE-Dose direkt.",
    "Wir haben den Router bereits auf Werkseinstellungen zurückgesetzt und neu eingerichtet.",
    "Bitte rufen Sie mich nicht vor 17 Uhr an, vorher bin ich bei der Arbeit.",
]
CLOSINGS = [
    "Vielen Dank im Voraus und freundliche Grüße",
    "Mit freundlichen Grüßen",
    "Beste Grüße",
    "Danke und viele Grüße",
]
DEVICES = ["FRITZ!Box 7590", "Speedport Smart 4", "FRITZ!Box 7530 AX", "Zyxel VMG8825"]
FIRST = ["Anna", "Jürgen", "Fatma", "Lukas", "Marie", "Cem", "Sabine", "Thomas", "Olga", "Nils"]
LAST = ["Schneider", "Yılmaz", "Becker", "Kowalski", "Hoffmann", "Nguyen", "Weber", "Klein"]


def mail_text(rng: random.Random, name: str) -> str:
    """A customer mail: greeting, problem, details, signature, and often the quoted history."""
    parts = [rng.choice(OPENINGS), "", rng.choice(PROBLEMS)]
    for _ in range(rng.randint(1, 4)):
        parts.append(
            rng.choice(DETAILS).format(
                cust=rng.randrange(10**9),
                num=rng.randrange(10**7),
                day=rng.randint(1, 28),
                device=rng.choice(DEVICES),
                fw=f"7.{rng.randint(10, 60)}",
            )
        )
    parts += ["", rng.choice(CLOSINGS), name, f"Musterstraße {rng.randint(1, 200)}"]
    if rng.random() < 0.4:
        # A reply quotes the thread so far, sometimes more than once.
        quoted = [rng.choice(PROBLEMS) for _ in range(rng.randint(1, 3))]
        parts += ["", "-----Ursprüngliche Nachricht-----"]
        parts += ["> " + line for q in quoted for line in q.split(". ")]
    return "\n".join(parts)


def mail(n: int, rng: random.Random) -> ContactEvent:
    """Mail number ``n``; about one in five comes from a customer who wrote before."""
    who = rng.randrange(n) if n > 5 and rng.random() < 0.2 else n
    name = f"{FIRST[who % len(FIRST)]} {LAST[who // len(FIRST) % len(LAST)]}"
    attachments: tuple[Attachment, ...] = ()
    if rng.random() < 0.25:
        attachments = (
            Attachment(
                filename=rng.choice(["rechnung.pdf", "foto_router.jpg", "speedtest.png"]),
                content_type=rng.choice(["application/pdf", "image/jpeg", "image/png"]),
                size=rng.randrange(20_000, 3_000_000),
            ),
        )
    subject = rng.choice(SUBJECTS)
    return ContactEvent(
        kind="new",
        contact_id=f"email:<m{n}@mail.example.net>",
        channel="email",
        source="email",
        external_id=f"<m{n}@mail.example.net>",
        thread_id=f"<m{n}@mail.example.net>",
        sender=Sender(email=f"kunde{who}@example.net", name=name),
        to="rechnung@beispiel-telekom.de" if "Rechnung" in subject else "service@beispiel.de",
        subject=subject,
        text=mail_text(rng, name),
        language="de",
        attributes={"message_id": f"<m{n}@mail.example.net>"},
        attachments=attachments,
        occurred_at=MONDAY_9AM,
    )


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory now (not its peak), from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


async def _cut(state: EngineState) -> tuple[list[bytes], float, float]:
    """The daemon's way: fork, read the chunks from the child; (chunks, seconds, fork s)."""
    started = time.perf_counter()
    cut = StateCut(state)
    chunks = [chunk async for chunk in cut.chunks()]
    return chunks, time.perf_counter() - started, cut.fork_s


async def _read(cut: DeltaCut) -> list[bytes]:
    return [chunk async for chunk in cut.chunks()]


def run(
    contacts: int, seed: int, daemon: bool, delta_rounds: int = 5, delta_records: int = 2000
) -> dict[str, Any]:
    """Fill an engine with ``contacts`` waiting mails; time snapshot and restore."""
    table = load_routing(ROOT / "config" / "routing.yaml")
    base_rss = rss_mib()
    engine = Engine(table)
    rng = random.Random(seed)
    now = MONDAY_9AM
    text_bytes = 0
    prefix = f"stwbench:{uuid.uuid4().hex[:8]}:"
    store = redis.Redis.from_url(REDIS_URL) if daemon else None
    bodies: dict[str, bytes] = {}
    fill_started = time.perf_counter()
    for n in range(contacts):
        now += 0.01
        event = mail(n, rng)
        text_bytes += len((event.text or "").encode())
        engine.handle(event, now)
        if store is not None:
            # What the router stores beside the engine when it applies the mail.
            bodies[event.contact_id] = msgspec.json.encode(event)
            if len(bodies) >= 1000:
                store.hset(f"{prefix}payloads", mapping=bodies)  # type: ignore[arg-type]
                bodies.clear()
    if store is not None and bodies:
        store.hset(f"{prefix}payloads", mapping=bodies)  # type: ignore[arg-type]
    bodies.clear()
    fill_s = time.perf_counter() - fill_started
    gc.collect()
    rss = rss_mib()
    # The daemon's engine tracks its changes from its first (full) snapshot on.
    engine.track_changes()
    chunks, snapshot_s, fork_s = asyncio.run(_cut(engine.state))
    engine.take_changes()
    full_bytes = sum(map(len, chunks))
    head = Snapshot(last_id="0-0", at=0.0, gen="bench", chunks=len(chunks))
    stalls: list[float] = []
    stalls_cpu: list[float] = []
    delta_sizes: list[int] = []
    n = contacts
    delta_inputs = 0
    last_delta = 0
    for _ in range(delta_rounds):
        first = n
        while engine.changed() < delta_records:
            now += 0.01
            event = mail(n, rng)
            n += 1
            engine.handle(event, now)
            if store is not None:
                bodies[event.contact_id] = msgspec.json.encode(event)
        if store is not None and bodies:
            store.hset(f"{prefix}payloads", mapping=bodies)  # type: ignore[arg-type]
            bodies.clear()
        delta_inputs = max(delta_inputs, n - first)
        # What the router loop does for a delta (SnapshotChain.cut), on the loop.
        started, cpu = time.perf_counter(), time.thread_time()
        cut = DeltaCut(engine.state, engine.take_changes(), head)
        stalls.append(time.perf_counter() - started)
        stalls_cpu.append(time.thread_time() - cpu)
        delta = asyncio.run(_read(cut))
        last_delta = len(delta)
        delta_sizes.append(sum(map(len, delta)))
        chunks += delta
    waiting = sum(q["waiting"] for q in engine.queue_stats(now))
    # Restore in a fresh process, as a restarting daemon does (this one's memory is fragmented
    # by the fill, and its pages are still marked copy-on-write after the fork).
    with tempfile.NamedTemporaryFile(suffix=".chunks") as file:
        for chunk in chunks:
            file.write(len(chunk).to_bytes(4, "big") + chunk)
        file.flush()
        out = subprocess.run(
            [sys.executable, __file__, "--restore-from", file.name, "--now", repr(now)],
            capture_output=True,
            check=True,
        )
    restored = json.loads(out.stdout)
    if restored["waiting"] != waiting:
        raise SystemExit(f"restore lost contacts: {waiting} waiting before, {restored}")
    result: dict[str, Any] = {
        "contacts": contacts,
        "waiting": waiting,
        "mean_text_bytes": round(text_bytes / max(contacts, 1)),
        "fill_s": round(fill_s, 2),
        "rss_mib": round(rss, 1),
        "engine_mib": round(rss - base_rss, 1),
        "snapshot_s": round(snapshot_s, 3),
        "fork_ms": round(fork_s * 1000, 2),
        "snapshot_bytes": full_bytes,
        "chunks": len(chunks),
        "max_chunk_bytes": max(map(len, chunks)),
        "snapshot_stall_ms": round(max(stalls, default=0.0) * 1000, 2),
        "delta_stalls_ms": [round(x * 1000, 2) for x in stalls],
        "delta_stalls_cpu_ms": [round(x * 1000, 2) for x in stalls_cpu],
        "delta_inputs": delta_inputs,
        "delta_bytes": max(delta_sizes, default=0),
        "decode_s": restored["decode_s"],
        "restore_s": restored["restore_s"],
        "restore_cpu_s": restored["restore_cpu_s"],
        "restored_rss_mib": restored["rss_mib"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if store is not None:
        print(json.dumps(result), file=sys.stderr)  # in case the restart fails
        del engine
        gc.collect()
        try:
            asyncio.run(_save(prefix, chunks, now))
            del chunks
            result.update(asyncio.run(_compact(prefix, last_delta)))
            result.update(restart(prefix, waiting))
        finally:
            keys = list(store.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                store.unlink(*keys)
    return result


def restore_from(path: str, now: float) -> dict[str, Any]:
    """Decode the chunks in ``path`` and build the engine, as the daemon's restore does (the
    collector off meanwhile); the times, the resident memory then, and the waiting count."""
    table = load_routing(ROOT / "config" / "routing.yaml")
    with open(path, "rb") as file:
        data = file.read()
    chunks = []
    i = 0
    while i < len(data):
        size = int.from_bytes(data[i : i + 4], "big")
        chunks.append(data[i + 4 : i + 4 + size])
        i += 4 + size
    del data
    gc.disable()
    started, cpu = time.perf_counter(), time.process_time()
    state = decode_state(chunks)
    decode_s = time.perf_counter() - started
    engine = Engine(table, state)
    restore_s = time.perf_counter() - started
    cpu = time.process_time() - cpu
    gc.freeze()
    gc.enable()
    del chunks
    # Ready to route: its first input sees the whole backlog.
    engine.handle(Tick(), now)
    return {
        "decode_s": round(decode_s, 3),
        "restore_s": round(restore_s, 3),
        "restore_cpu_s": round(cpu, 3),
        "rss_mib": round(rss_mib(), 1),
        "waiting": sum(q["waiting"] for q in engine.queue_stats(now)),
    }


async def _save(prefix: str, chunks: list[bytes], now: float) -> None:
    client = connect_redis(REDIS_URL, timeout=60)
    try:
        await Journal(client, prefix).save_snapshot(chunks, "0-0", now=now)
    finally:
        await client.aclose()


async def _compact(prefix: str, carried: int) -> dict[str, Any]:
    """The daemon's compaction of the snapshot in Redis: ``python -m router.daemon.compact``
    over all but the last delta (``carried`` chunks, as if written while it ran), then the
    router's part: carrying that delta over and switching, timed with the longest stall of
    the event loop meanwhile."""
    client = connect_redis(REDIS_URL, timeout=60)
    try:
        journal = Journal(client, prefix)
        head = await journal.load_snapshot()
        assert head is not None
        covers = head.chunks - carried
        started = time.perf_counter()
        out = subprocess.run(
            [
                *(sys.executable, "-m", "router.daemon.compact", "--prefix", prefix),
                *("--gen", head.gen, "--chunks", str(covers)),
            ],
            cwd=ROOT,
            env=dict(os.environ, STELLWERK_COMPACT_REDIS_URL=REDIS_URL),
            capture_output=True,
            check=True,
        )
        compact_s = time.perf_counter() - started
        report = json.loads(out.stdout.splitlines()[-1])
        longest = 0.0
        ticking = True

        async def ticker() -> None:
            nonlocal longest
            last = time.perf_counter()
            while ticking:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                longest = max(longest, now - last - 0.001)
                last = now

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        if not await journal.switch_compacted(report["gen"], report["chunks"], covers, head):
            raise SystemExit("the switch to the compacted snapshot was refused")
        switch_s = time.perf_counter() - started
        ticking = False
        await tick
    finally:
        await client.aclose()
    return {
        "compact_s": round(compact_s, 2),
        "compact_cpu_s": report["cpu_s"],
        "compact_rss_mib": report["max_rss_mib"],
        "compact_carried_chunks": carried,
        "switch_ms": round(switch_s * 1000, 2),
        "switch_loop_stall_ms": round(longest * 1000, 2),
    }


def restart(prefix: str, waiting: int) -> dict[str, Any]:
    """``stellwerk run`` on the backlog in Redis: seconds until it routes, its memory then."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
    env.update(
        STELLWERK_ROUTING=str(ROOT / "config" / "routing.yaml"),
        STELLWERK_REDIS_URL=REDIS_URL,
        STELLWERK_MQTT_URL=MQTT_URL,
        STELLWERK_MQTT_CLIENT_ID=f"stw-bench-{prefix.split(':')[1]}",
        STELLWERK_KEY_PREFIX=prefix,
        STELLWERK_TOPIC_PREFIX=prefix.replace(":", "-").rstrip("-"),
        STELLWERK_HTTP_ADDR="",
        STELLWERK_SMTP_ADDR="",
        STELLWERK_LOG_FORMAT="json",
        STELLWERK_ROUTER_NODE_ID="bench",
    )
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            restored: dict[str, Any] | None = None
            while time.monotonic() - started < 600:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the daemon exited:\n{log.read().decode()[-3000:]}")
                log.seek(0)
                lines = [json.loads(x) for x in log.read().splitlines() if x.startswith(b"{")]
                restored = next((x for x in lines if x.get("event") == "router.restored"), None)
                if any(x.get("event") == "router.routing" for x in lines):
                    break
                time.sleep(0.05)
            else:
                raise SystemExit("the daemon did not route within 600 s")
            restart_s = time.monotonic() - started
            daemon_rss = rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    if restored is None or restored.get("contacts") != waiting:
        raise SystemExit(f"the daemon restored {restored}, not {waiting} contacts")
    return {"restart_s": round(restart_s, 2), "daemon_rss_mib": round(daemon_rss, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000, help="waiting mails (100000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--daemon", action="store_true", help="also restart a real daemon on the backlog"
    )
    parser.add_argument(
        "--delta-rounds", type=int, default=5, help="delta snapshots after the full one (5)"
    )
    parser.add_argument(
        "--delta-records", type=int, default=2000, help="changed records per delta (2000)"
    )
    parser.add_argument("--restore-from", help=argparse.SUPPRESS)
    parser.add_argument("--now", type=float, default=MONDAY_9AM, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.restore_from:
        print(json.dumps(restore_from(args.restore_from, args.now)))
        return 0
    result = run(args.contacts, args.seed, args.daemon, args.delta_rounds, args.delta_records)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
