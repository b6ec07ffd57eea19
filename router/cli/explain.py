"""``stellwerk explain ROUTING.yaml EVENT.json``: which rule routes a contact, and why.

The customer is what the routing file knows (crowd experts); ``--at`` sets the clock (ISO 8601;
without an offset it is local time in the routing file's timezone), default the event's
``occurred_at``, or now when the event has none. The input is one ContactEvent or a JSON list
of them (what ``stellwerk normalize`` prints for a batch); each event of a list is explained in
turn, headed by its position and contact id (``--json``: a list of explanations). Exit 0, 1 for
a bad routing file, 2 for a bad event (an empty list included) or ``--at``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from channels.contact_event import ContactEvent
from router.cli.check import load_or_report
from rules.table import Explanation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-command's arguments."""
    parser.add_argument("routing", metavar="ROUTING.yaml", help="the routing file")
    parser.add_argument(
        "event",
        metavar="EVENT.json",
        help="a ContactEvent as JSON, or a list of them as normalize prints ('-': stdin)",
    )
    parser.add_argument("--at", metavar="ISO8601", help="the time of the decision")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")


_EVENTS = msgspec.json.Decoder(ContactEvent | list[ContactEvent])


def _read_events(name: str) -> tuple[list[ContactEvent], bool]:
    """The events of the input, and whether it was a list."""
    data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    decoded = _EVENTS.decode(data)
    if isinstance(decoded, list):
        return decoded, True
    return [decoded], False


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
        events, is_list = _read_events(args.event)
    except OSError as exc:
        print(f"{args.event}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        print(f"{args.event}: not a ContactEvent: {exc}", file=sys.stderr)
        return 2
    if not events:
        print(f"{args.event}: an empty list: no ContactEvent to explain", file=sys.stderr)
        return 2
    at: float | None = None
    if args.at is not None:
        try:
            when = datetime.fromisoformat(args.at)
        except ValueError:
            print(f"--at: not an ISO 8601 time: {args.at!r}", file=sys.stderr)
            return 2
        if when.tzinfo is None:
            when = when.replace(tzinfo=table.tz)
        at = when.timestamp()
    explanations = [
        table.explain(
            event,
            table.customer_view(event),
            at if at is not None else event.occurred_at or time.time(),
        )
        for event in events
    ]
    if args.json:
        out: Any = explanations if is_list else explanations[0]
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(out)) + b"\n")
    elif not is_list:
        print(render(explanations[0]))
    else:
        blocks = [
            f"event {n} of {len(events)}: {event.contact_id}\n{render(explanation)}"
            for n, (event, explanation) in enumerate(zip(events, explanations, strict=True), 1)
        ]
        print("\n\n".join(blocks))
    return 0
