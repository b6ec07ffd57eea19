"""What a mail backlog costs the engine's state: memory, snapshot and restore.

The example routing (``config/routing.yaml``) on a Monday morning, nobody logged in, and
``--contacts`` customer mails arriving (a backlog after an outage): subjects that the mail rules
route to the DSL, mobile, TV and billing mail queues, bodies of a few hundred bytes to several
kilobytes (greeting, the problem, contract details, a signature, often the quoted earlier mail),
a few attachments, and one customer in five writing more than once. All of them wait.

Prints the resident memory with the backlog in the engine (``rss_mib``; ``peak_rss_mib`` is the
process's high-water mark, snapshot and restore included), how long ``Engine.snapshot()`` takes
and how big it is (``snapshot_s``, ``snapshot_bytes``), and how long ``Engine.restore`` takes
(``restore_s``). The daemon writes that snapshot as one Redis value, which Redis caps at 512 MB
(``fits_one_redis_value``).

    .venv/bin/python benchmarks/state.py [--contacts 100000] [--seed 1] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from channels.contact_event import Attachment, ContactEvent, Sender
from router.engine import Engine
from router.messages import Tick
from rules.load import load_routing

ROOT = Path(__file__).resolve().parent.parent
#: Redis's limit for one string value (``proto-max-bulk-len``, 512 MB by default).
REDIS_VALUE_LIMIT = 512 * 1024 * 1024
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


def rss_mib() -> float:
    """The process's resident memory now (not its peak), from /proc."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run(contacts: int, seed: int) -> dict[str, Any]:
    """Fill an engine with ``contacts`` waiting mails; time snapshot and restore."""
    table = load_routing(ROOT / "config" / "routing.yaml")
    base_rss = rss_mib()
    engine = Engine(table)
    rng = random.Random(seed)
    now = MONDAY_9AM
    text_bytes = 0
    fill_started = time.perf_counter()
    for n in range(contacts):
        now += 0.01
        event = mail(n, rng)
        text_bytes += len((event.text or "").encode())
        engine.handle(event, now)
    fill_s = time.perf_counter() - fill_started
    waiting = sum(q["waiting"] for q in engine.queue_stats(now))
    gc.collect()
    rss = rss_mib()
    started = time.perf_counter()
    data = engine.snapshot()
    snapshot_s = time.perf_counter() - started
    started = time.perf_counter()
    restored = Engine.restore(table, data)
    restore_s = time.perf_counter() - started
    # The restored engine is ready to route: its first input sees the whole backlog.
    restored.handle(Tick(), now)
    restored_waiting = sum(q["waiting"] for q in restored.queue_stats(now))
    if restored_waiting != waiting:
        raise SystemExit(f"restore lost contacts: {waiting} waiting before, {restored_waiting}")
    return {
        "contacts": contacts,
        "waiting": waiting,
        "mean_text_bytes": round(text_bytes / max(contacts, 1)),
        "fill_s": round(fill_s, 2),
        "rss_mib": round(rss, 1),
        "engine_mib": round(rss - base_rss, 1),
        "snapshot_s": round(snapshot_s, 3),
        "snapshot_bytes": len(data),
        "restore_s": round(restore_s, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fits_one_redis_value": len(data) <= REDIS_VALUE_LIMIT,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000, help="waiting mails (100000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = run(args.contacts, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
