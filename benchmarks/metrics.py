"""What the router's bookkeeping costs per call: metrics, the /metrics page and decision log lines.

With the routing file of ``benchmarks/e2e.py`` (``--agents`` phone agents, one queue), all agents
logged in, 70 % of them on a call and 200 mails waiting, it times

- ``Metrics.refresh`` (the queue and agent gauges; the router runs it every second and on every
  scrape of /metrics),
- the ``observe_*`` calls of one call (its three journal entries' commands and decisions, two
  contact events received, three MQTT deliveries),
- ``Metrics.exposition`` (the /metrics page; about a thousand series),
- the decision log lines of one call (``contact.queued`` and ``contact.offered`` at info,
  ``contact.assigned`` and ``contact.completed`` at debug) through the daemon's JSON logging
  to /dev/null, in batches of 20 calls as the router loop logs them.

    .venv/bin/python benchmarks/metrics.py [--agents 1000] [--json]

Each figure is the median of ``--repeat`` timings (5 by default). Run it twice and give the
machine's load average beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import structlog
from e2e import routing_file

from channels.contact_event import ContactEvent
from router.daemon import router_loop
from router.daemon.config import LogSettings
from router.daemon.main import configure_logging
from router.daemon.metrics import Metrics
from router.engine import Engine
from router.messages import Accept, Command, Login, OfferCmd
from rules.load import parse_routing


def _call(n: int, kind: str = "new", channel: str = "phone") -> ContactEvent:
    source = "asterisk-ari" if channel == "phone" else "email"
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id=f"{source}:{n}",
        channel=channel,  # type: ignore[arg-type]
        source=source,
        external_id=str(n),
    )


def _median(fn: Callable[[], object], times: int, repeat: int) -> float:
    """Median seconds of one ``fn()`` over ``repeat`` rounds of ``times`` calls."""
    rounds = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(times):
            fn()
        rounds.append((time.perf_counter() - started) / times)
    return statistics.median(rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    engine = Engine(parse_routing(routing_file(args.agents)))
    metrics = Metrics()
    metrics.prime(engine.table)
    now = 1.0
    for i in range(args.agents):
        engine.handle(Login(agent_id=f"e{i:04d}"), now)
    # The commands of whole calls (offered, accepted, hung up), for the observe_* timing.
    calls: list[tuple[list[Command], ...]] = []
    for i in range(1000):
        queued = engine.handle(_call(i), now)
        offer = next(c for c in queued if isinstance(c, OfferCmd))
        accepted = engine.handle(Accept(agent_id=offer.agent_id, offer_id=offer.offer_id), now)
        calls.append((queued, accepted, engine.handle(_call(i, "end"), now)))
        now += 0.001
    # Then the floor the gauges are read from: 70 % of the agents on a call, mails waiting.
    for i in range(10_000, 10_000 + args.agents * 7 // 10):
        for cmd in engine.handle(_call(i), now):
            if isinstance(cmd, OfferCmd):
                engine.handle(Accept(agent_id=cmd.agent_id, offer_id=cmd.offer_id), now)
    for i in range(200):
        engine.handle(_call(20_000 + i, channel="email"), now)

    refresh = _median(lambda: metrics.refresh(engine, now + 5), 50, args.repeat)
    received = (_call(0), _call(0, "end"))
    turn = iter(range(1 << 62))

    def observe() -> None:
        for cmds in calls[next(turn) % len(calls)]:
            metrics.observe_commands(cmds)
            metrics.observe_decision(0.0001)
        for event in received:
            metrics.observe_received(event)
        for _ in range(3):
            metrics.observe_ingress("mqtt", "accepted")

    observe_s = _median(observe, 1000, args.repeat)
    page = metrics.exposition()
    exposition = _median(metrics.exposition, 20, args.repeat)

    # The decision lines of 20 calls, as one batch of the router loop, at info level.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        configure_logging(LogSettings(format="json", level="info"))
        structlog.contextvars.bind_contextvars(node="bench")
        batch = [
            cmd
            for queued, accepted, ended in calls[:20]
            for cmd in (*queued, *accepted, *ended)
            if not isinstance(cmd, OfferCmd)
        ]
        lines = _median(lambda: router_loop._log_commands(batch), 200, args.repeat) / 20
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)

    result = {
        "agents": args.agents,
        "refresh_ms": round(refresh * 1e3, 3),
        "observe_us_per_call": round(observe_s * 1e6, 1),
        "exposition_ms": round(exposition * 1e3, 2),
        "exposition_lines": len(page.splitlines()),
        "log_lines_us_per_call": round(lines * 1e6, 1),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"Metrics.refresh, {args.agents} agents:     {result['refresh_ms']} ms")
        print(f"observe_* of one call:            {result['observe_us_per_call']} us")
        print(
            f"/metrics page ({result['exposition_lines']} lines):      {result['exposition_ms']} ms"
        )
        print(f"decision log lines of one call:   {result['log_lines_us_per_call']} us")
        print(f"load average:                     {result['loadavg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
