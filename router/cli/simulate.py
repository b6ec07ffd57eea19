"""``stellwerk simulate``: the real engine on virtual time, reported per queue.

Two forms:

- ``stellwerk simulate [--routing FILE] [--scenario FILE] [--hours H] [--seed S] [--scale F]
  [--json]`` plays a scenario (arrival streams, handle times, agent behaviour) against a routing
  file; ``--scale`` makes the centre F times as big (``router.sim.simulation.scaled``).
- ``stellwerk simulate erlang --agents N --calls-per-interval C --aht-seconds A ...`` builds one
  queue with N identical agents — the M/M/c system of Erlang C — and prints the measured figures
  next to Erlang C's predictions, as a check of the engine and of the simulator.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import msgspec

from router.sim.erlang_check import ErlangResult, simulate_erlang
from router.sim.simulation import (
    Report,
    Scenario,
    ScenarioError,
    SimulationError,
    parse_scenario,
    scaled,
    simulate,
    with_agent_count,
)
from rules.load import RoutingFileError, build_table, load_routing

_ERLANG_OPTIONS = (
    "agents",
    "calls_per_interval",
    "interval_seconds",
    "aht_seconds",
    "target_seconds",
)


class UsageError(Exception):
    """Arguments that do not fit together; exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stellwerk simulate`` and ``stellwerk simulate erlang``."""
    parser.add_argument(
        "mode",
        nargs="?",
        choices=["erlang"],
        help="'erlang': one M/M/c queue, compared with Erlang C's predictions",
    )
    parser.add_argument("--routing", default="config/routing.yaml", help="routing file")
    parser.add_argument(
        "--scenario", default="config/scenario.yaml", help="scenario file (streams, handle times)"
    )
    parser.add_argument("--hours", type=_positive, help="simulated hours (overrides the scenario)")
    parser.add_argument("--seed", type=int, help="random seed (overrides the scenario)")
    parser.add_argument("--agents", type=_count, help="number of agents (erlang: required)")
    parser.add_argument(
        "--scale",
        type=_positive,
        metavar="F",
        help="a centre F times as big: every stream's rate and the number of agents times F"
        " (--agents, when given, sets the count instead)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    group = parser.add_argument_group("erlang mode")
    group.add_argument("--calls-per-interval", type=_non_negative, help="arrivals per interval")
    group.add_argument(
        "--interval-seconds", type=_positive, help="interval length in seconds (default 1800)"
    )
    group.add_argument("--aht-seconds", type=_positive, help="mean handle time in seconds")
    group.add_argument(
        "--target-seconds", type=_non_negative, help="service level target in seconds (default 20)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen form; 0 on success, 1 for unreadable or invalid files, 2 for bad usage."""
    progress = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        if args.mode == "erlang":
            result = run_erlang(args, progress)
            if args.json:
                print(msgspec.json.encode(result).decode())
            else:
                print(format_erlang(result))
            return 0
        report, scenario = run_scenario(args, progress)
    except UsageError as exc:
        print(f"stellwerk simulate: {exc}", file=sys.stderr)
        return 2
    except (ScenarioError, OSError) as exc:
        print(f"stellwerk simulate: {exc}", file=sys.stderr)
        return 1
    except RoutingFileError as exc:
        print(f"stellwerk simulate: {args.routing} does not validate:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except SimulationError as exc:
        print(f"stellwerk simulate: engine contract broken: {exc}", file=sys.stderr)
        return 3
    finally:
        if progress is not None:
            progress.clear()
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(format_report(report, scenario))
    return 0


# ---- the scenario form ---------------------------------------------------------------------


def run_scenario(
    args: argparse.Namespace, progress: Callable[[float], None] | None
) -> tuple[Report, Scenario]:
    """Load routing and scenario files, apply the command-line overrides, simulate."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in _ERLANG_OPTIONS[1:]
        if getattr(args, name) is not None
    ]
    if given:
        raise UsageError(f"{', '.join(given)} only apply to 'stellwerk simulate erlang'")
    scenario = parse_scenario(Path(args.scenario).read_bytes(), args.scenario)
    table = load_routing(args.routing)
    if args.scale is not None:
        scenario = scaled(scenario, args.scale, len(table.file.agents))
    overrides: dict[str, Any] = {}
    if args.hours is not None:
        overrides["hours"] = args.hours
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.agents is not None:
        overrides["agents"] = msgspec.structs.replace(scenario.agents, count=args.agents)
    scenario = msgspec.structs.replace(scenario, **overrides)
    if scenario.agents.count is not None:
        routing = with_agent_count(table.file, scenario.agents.count)
        table = build_table(routing, Path(args.routing).parent)
    return simulate(table, scenario, progress), scenario


def format_report(report: Report, scenario: Scenario) -> str:
    """The report as an aligned table for people."""
    start = datetime.fromtimestamp(scenario.start_epoch(), ZoneInfo(scenario.timezone))
    lines = [
        f"{report.hours:g} simulated hours from {start:%a %Y-%m-%d %H:%M} {scenario.timezone}, "
        f"seed {report.seed}: {report.arrivals} contacts, {report.agents} agents",
        "",
    ]
    header = (
        "queue",
        "offered",
        "answered",
        "abandoned",
        "waiting",
        "SL",
        "target",
        "ASA",
        "max wait",
        "P(wait)",
        "occupancy",
    )
    rows = [header]
    for q in report.queues:
        rows.append(
            (
                q.queue,
                str(q.offered),
                str(q.answered),
                str(q.abandoned),
                str(q.waiting_at_end),
                _pct(q.service_level),
                f"{q.sla_target * 100:g}/{q.sla_seconds:g}s",
                _secs(q.asa_seconds),
                _secs(q.max_wait_seconds),
                _pct(q.p_wait),
                _pct(q.occupancy),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    ex = report.experts
    lines += [
        "",
        f"crowd experts: {ex.contacts} contacts, {ex.answered} answered, {ex.abandoned} abandoned,"
        f" mean wait {_secs(ex.mean_wait_seconds)}, max wait {_secs(ex.max_wait_seconds)},"
        f" SL {_pct(ex.service_level)}",
        f"agent occupancy overall: {_pct(report.occupancy)}; rejected contacts: {report.rejected};"
        f" refused agent commands: {report.refused}",
    ]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


# ---- the Erlang C form ---------------------------------------------------------------------


def run_erlang(args: argparse.Namespace, progress: Callable[[float], None] | None) -> ErlangResult:
    """The ``erlang`` form's arguments → :func:`simulate_erlang`."""
    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("agents", "calls_per_interval", "aht_seconds")
        if getattr(args, name) is None
    ]
    if missing:
        raise UsageError(f"'simulate erlang' needs {', '.join(missing)}")
    if args.scale is not None:
        raise UsageError("--scale applies to a scenario, not to 'stellwerk simulate erlang'")
    if args.agents < 1:
        raise UsageError("--agents must be at least 1")
    return simulate_erlang(
        agents=args.agents,
        calls_per_interval=args.calls_per_interval,
        aht_seconds=args.aht_seconds,
        interval_seconds=args.interval_seconds or 1800.0,
        target_seconds=20.0 if args.target_seconds is None else args.target_seconds,
        hours=8.0 if args.hours is None else args.hours,
        seed=1 if args.seed is None else args.seed,
        progress=progress,
    )


def format_erlang(result: ErlangResult) -> str:
    """Measured against predicted, side by side."""
    rows = [
        ("", "simulated", "Erlang C"),
        ("service level", _pct(result.service_level), _pct(result.erlang_service_level)),
        ("ASA", _secs(result.asa_seconds), _secs(result.erlang_asa_seconds)),
        ("P(wait)", _pct(result.p_wait), _pct(result.erlang_p_wait)),
        ("occupancy", _pct(result.occupancy), _pct(result.erlang_occupancy)),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    head = (
        f"M/M/{result.agents}: {result.traffic_erlang:.2f} Erlang "
        f"({result.calls_per_interval:g} calls per {result.interval_seconds:g}s, "
        f"AHT {result.aht_seconds:g}s), target {result.target_seconds:g}s, "
        f"{result.hours:g} h, seed {result.seed}: {result.offered} offered, "
        f"{result.answered} answered"
    )
    body = [
        "  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2])])
        for r in rows
    ]
    return "\n".join([head, "", *body])


# ---- helpers -------------------------------------------------------------------------------


class _ProgressBar:
    """A one-line ``\r`` progress bar, shown only once a run has taken half a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, fraction: float) -> None:
        if not self.shown and time.monotonic() - self.started < 0.5:
            return
        self.shown = True
        filled = int(fraction * 40)
        bar = "#" * filled + "." * (40 - filled)
        self.stream.write(f"\rsimulating [{bar}] {fraction * 100:3.0f}%")
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text}")
    return value
