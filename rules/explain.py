"""``stellwerk explain ROUTING.yaml EVENT.json``: which rule routes a contact, and why.

The customer is what the routing file knows (crowd experts); ``--at`` sets the clock (ISO 8601;
without an offset it is local time in the routing file's timezone), default the event's
``occurred_at``, or now when the event has none. Exit 0, 1 for a bad routing file, 2 for a bad
event or ``--at``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from router.model import CONTACT_EVENT_DECODER, ContactEvent
from rules.check import load_or_report
from rules.table import Explanation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-command's arguments."""
    parser.add_argument("routing", metavar="ROUTING.yaml", help="the routing file")
    parser.add_argument("event", metavar="EVENT.json", help="a ContactEvent as JSON ('-': stdin)")
    parser.add_argument("--at", metavar="ISO8601", help="the time of the decision")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")


def _read_event(name: str) -> ContactEvent:
    data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    return CONTACT_EVENT_DECODER.decode(data)


def _value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(explanation: Explanation) -> str:
    """The explanation as text for a person."""
    d = explanation.decision
    lines = [f"rule:        {d.rule}"]
    if d.reject is not None:
        lines.append(f"reject:      {d.reject}")
    else:
        lines.append(f"queue:       {d.queue}")
    lines.append(f"priority:    {d.priority}")
    skills = ", ".join(f"{k}>={v}" for k, v in d.skills.items()) or "-"
    lines.append(f"skills:      {skills} (in addition to the queue's)")
    lines.append(f"crowd_first: {d.crowd_first if d.crowd_first is not None else '-'}")
    if d.tags:
        lines.append(f"tags:        {', '.join(d.tags)}")
    for step in d.escalate:
        parts = []
        if step.skills is not None:
            parts.append("skills " + ", ".join(f"{k}>={v}" for k, v in step.skills.items()))
        if step.queue is not None:
            parts.append(f"queue {step.queue}")
        if step.priority is not None:
            parts.append(f"priority {step.priority}")
        lines.append(f"escalate:    after {step.after:g} s: {'; '.join(parts)}")
    c = explanation.customer
    who = f"expert {c.id} (level {c.expert_level})" if c.expert else "not a known expert"
    lines.append(f"customer:    {who}")
    lines.append(
        f"clock:       {explanation.at} ({explanation.weekday}, hour {explanation.hour},"
        f" minute {explanation.minute})"
    )
    lines.append("why:")
    for trace in explanation.trace:
        mark = "MATCH" if trace.matched else "no   "
        if trace.condition is None:
            lines.append(f"  {mark} {trace.rule}: default rule, always matches")
            continue
        lines.append(f"  {mark} {trace.rule}")
        for seen in trace.why:
            values = ", ".join(f"{k} = {_value(v)}" for k, v in seen.values.items())
            verdict = "true " if seen.result else "false"
            suffix = f"   [{values}]" if values else ""
            lines.append(f"          {verdict} {seen.condition}{suffix}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load the routing file and the event, decide, and print why."""
    table = load_or_report(args.routing)
    if table is None:
        return 1
    try:
        event = _read_event(args.event)
    except OSError as exc:
        print(f"{args.event}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        print(f"{args.event}: not a ContactEvent: {exc}", file=sys.stderr)
        return 2
    if args.at is not None:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            print(f"--at: not an ISO 8601 time: {args.at!r}", file=sys.stderr)
            return 2
        if at.tzinfo is None:
            at = at.replace(tzinfo=table.tz)
        now = at.timestamp()
    else:
        now = event.occurred_at or time.time()
    explanation = table.explain(event, table.customer_view(event), now)
    if args.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(explanation)) + b"\n")
    else:
        print(render(explanation))
    return 0
