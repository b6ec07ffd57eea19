"""``stellwerk replay``: run a recorded journal against a routing file.

The journal holds every input the router applied, with the time it applied it, so replaying it
through a fresh engine with *another* routing file answers "what would this rule change have
done to last Monday?" - the same engine, no clock, no I/O but reading the entries. The journal
comes from Redis (``--key-prefix``; what is there since the last trim) or from a file with one
entry per line, as stored in the stream (``XRANGE`` output of the ``e`` field, or an export).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import redis

from router.daemon.journal import (
    AdminEntry,
    AgentEntry,
    ContactEntry,
    JournalEntry,
    Keys,
    decode_entry,
)
from router.engine import Engine
from router.messages import EngineInput, EventCmd, RefusedCmd, Tick
from rules.check import load_or_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``replay`` options."""
    parser.add_argument("routing", help="the routing file to replay the journal against")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="a journal export: one entry (JSON) per line")
    source.add_argument("--key-prefix", help="read the journal from Redis under this key prefix")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Replay and print the report; 1 for an unreadable routing file or journal."""
    table = load_or_report(args.routing)
    if table is None:
        return 1
    try:
        entries = (
            _from_file(args.file) if args.file else _from_redis(args.redis_url, args.key_prefix)
        )
    except (OSError, redis.RedisError, ValueError) as exc:
        print(f"stellwerk replay: cannot read the journal: {exc}", file=sys.stderr)
        return 1
    report = replay(Engine(table), entries)
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(_text(report))
    return 0


def replay(engine: Engine, entries: list[JournalEntry | None]) -> dict[str, Any]:
    """Apply the entries in order (each at its own time) and report what routing did."""
    events: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    skipped = 0
    now = 0.0
    for entry in entries:
        if entry is None:
            skipped += 1
            continue
        now = max(now, entry.at)
        message: EngineInput
        if isinstance(entry, ContactEntry):
            message = entry.event
        elif isinstance(entry, AgentEntry | AdminEntry):
            message = entry.cmd
        else:
            message = Tick()
        for cmd in engine.handle(message, entry.at):
            if isinstance(cmd, EventCmd):
                events[cmd.type] += 1
            elif isinstance(cmd, RefusedCmd):
                refused[cmd.reason] += 1
    return {
        "entries": len(entries),
        "skipped": skipped,
        "until": now,
        "events": dict(sorted(events.items())),
        "refused": dict(sorted(refused.items())),
        "queues": engine.queue_stats(now),
    }


def _from_file(path: Path) -> list[JournalEntry | None]:
    entries: list[JournalEntry | None] = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append(decode_entry(line))
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}:{number}: not a journal entry: {exc}") from None
    return entries


def _from_redis(url: str, prefix: str) -> list[JournalEntry | None]:
    client = redis.Redis.from_url(url)
    rows: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(Keys(prefix).journal)  # type: ignore[assignment]
    entries: list[JournalEntry | None] = []
    for _, fields in rows:
        try:
            entries.append(decode_entry(fields[b"e"]))
        except (KeyError, msgspec.DecodeError):
            entries.append(None)
    return entries


def _text(report: dict[str, Any]) -> str:
    lines = [f"replayed {report['entries']} entries ({report['skipped']} unreadable, skipped)"]
    lines.append("events: " + ", ".join(f"{k} {v}" for k, v in report["events"].items()))
    if report["refused"]:
        lines.append("refused: " + ", ".join(f"{k} {v}" for k, v in report["refused"].items()))
    lines.append("")
    lines.append(
        f"{'queue':<16}{'entered':>8}{'answered':>10}{'abandoned':>10}{'waiting':>9}{'SL':>8}"
    )
    for q in report["queues"]:
        sl = "-" if q["service_level"] is None else f"{q['service_level']:.1%}"
        lines.append(
            f"{q['name']:<16}{q['entered']:>8}{q['answered']:>10}{q['abandoned']:>10}"
            f"{q['waiting']:>9}{sl:>8}"
        )
    return "\n".join(lines)
