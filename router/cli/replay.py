"""``stellwerk replay``: run a recorded journal against a routing file.

The journal holds every input the router applied, with the time it applied it, so replaying it
through a fresh engine with *another* routing file answers "what would this rule change have
done to last Monday?" - the same engine, no clock, no I/O but reading the entries. The journal
comes from Redis (what is there since the last trim) or from a file with one entry per line, as
stored in the stream (``XRANGE`` output of the ``e`` field, or an export).

Settings come as for ``stellwerk run``: ``--config`` (default ``$STELLWERK_CONFIG``, else
``config/stellwerk.yaml`` when it exists), then the ``STELLWERK_*`` variables
(``STELLWERK_REDIS_URL``, ``STELLWERK_KEY_PREFIX``, ``STELLWERK_ROUTING``), then
``--redis-url`` and ``--key-prefix``. The routing file argument defaults to the settings'
``routing``. An empty or missing journal is an error (exit 1): a report of nothing would look
like a quiet Monday.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis

from router.cli.check import load_or_report
from router.daemon.config import SettingsError, load_settings, settings_path
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

PROG = "stellwerk replay"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``replay`` options."""
    parser.add_argument(
        "routing",
        nargs="?",
        help="the routing file to replay the journal against (default: the settings' routing)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings file, as for 'stellwerk run' (default: $STELLWERK_CONFIG, else "
        "config/stellwerk.yaml when it exists); STELLWERK_* variables override it",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, help="a journal export: one entry (JSON) per line")
    source.add_argument(
        "--key-prefix",
        help="read the journal from Redis under this key prefix (default: the "
        "settings' key_prefix)",
    )
    parser.add_argument("--redis-url", help="the Redis server (default: the settings' redis.url)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Replay and print the report; 1 for an unreadable routing file or an unreadable, empty
    or missing journal, 2 for bad settings."""
    try:
        settings = load_settings(settings_path(args.config)).settings
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    table = load_or_report(args.routing or settings.routing, prefix=f"{PROG}: ")
    if table is None:
        return 1
    url = args.redis_url or settings.redis.url
    prefix = args.key_prefix if args.key_prefix is not None else settings.key_prefix
    try:
        entries = _from_file(args.file) if args.file else _from_redis(url, prefix)
    except (OSError, redis.RedisError, ValueError) as exc:
        print(f"{PROG}: cannot read the journal: {exc}", file=sys.stderr)
        return 1
    if not entries:
        where = (
            f"in {args.file}"
            if args.file
            else f"under key prefix {prefix!r} at {_redact(url)} (key {Keys(prefix).journal!r})"
        )
        print(
            f"{PROG}: no journal entries {where}; check the key prefix and the Redis URL "
            "(database number included), or the journal was trimmed",
            file=sys.stderr,
        )
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


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _from_redis(url: str, prefix: str) -> list[JournalEntry | None]:
    client = redis.Redis.from_url(url)
    try:
        rows: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(Keys(prefix).journal)  # type: ignore[assignment]
    finally:
        client.close()
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
