"""Routing decisions per second on one core: 1,000 rules, 200 queues, 5,000 agents.

A *decision* is one ``Engine.handle(ContactEvent(kind="new"), now)`` call: identity look-up,
rule choice (through the rule index), queue, agent choice and the offer. A *cycle* adds what
keeps the pool alive: the agent accepts the offer and, so that capacity frees up again, the
oldest assigned contact is completed (which drains any backlog into new offers, accepted too).
Before timing, ``--load`` × 5,000 contacts are opened; every cycle opens one and completes
one, so that many stay open: at 0.8 most agents are busy and every new contact is offered at
once (the full decision path); above the pool's capacity (e.g. ``--load 3``) a steady backlog
waits, new contacts are queued and each completion offers the best waiting one instead.

    .venv/bin/python benchmarks/hot_path.py [--seconds 10 | --decisions N] [--load 0.8]
        [--retention SECONDS] [--json] [--profile]

``--size-table`` runs the same for 500 / 5,000 / 20,000 agents x 20 / 200 / 2,000 queues
(``--decisions`` each, 5,000 by default) and prints one row per size: the cost of a decision
should not grow with the centre.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import json
import pstats
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from channels.contact_event import Channel, ContactEvent, Sender
from router.engine import Engine
from router.events import ContactAssigned
from router.messages import Accept, Command, Complete, EventCmd, Login, OfferCmd
from rules.decision import CustomerView
from rules.load import parse_routing

TARGET = 100_000
TABLE_AGENTS = (500, 5000, 20000)
TABLE_QUEUES = (20, 200, 2000)


@dataclass(frozen=True)
class Size:
    """How big the generated centre is (the defaults are the benchmark's)."""

    skills: int = 60
    queues: int = 200
    rules: int = 1000
    unguarded: int = 20
    agents: int = 5000
    experts: int = 200
    #: ``defaults.customer_retention`` in seconds (None: the default, 30 days, which a run
    #: never reaches; a small one makes every run forget customers all along, as a daemon
    #: running past its retention does: a decision is 1 ms of engine time).
    retention: float | None = None


def routing_yaml(size: Size, seed: int = 1) -> str:
    """A large routing file: skills, queues with skill needs, indexed rules, agents, experts."""
    rng = random.Random(seed)
    skills = [f"s{i:02d}" for i in range(size.skills)]
    out = [
        "version: 1",
        "timezone: Europe/Berlin",
        "defaults: {offer_timeout: 3600, wrap_up: 0"
        + (f", customer_retention: {size.retention:g}" if size.retention is not None else "")
        + "}",
        f"skills: [{', '.join(skills)}]",
        "queues:",
    ]
    for q in range(size.queues):
        need = rng.sample(skills, 1)[0]
        out.append(f"  q{q:03d}: {{skills: {{{need}: 1}}, sla: {{seconds: 30, percent: 80}}}}")
    out.append("agents:")
    for a in range(size.agents):
        own = rng.sample(skills, 6)
        levels = ", ".join(f"{s}: {rng.randint(1, 5)}" for s in own)
        out.append(
            f"  - {{id: a{a:05d}, skills: {{{levels}}},"
            " capacity: {phone: 1, chat: 3, email: 5, social: 5}}"
        )
    out.append("experts:")
    for e in range(size.experts):
        out.append(f"  - {{id: x{e:03d}, level: 2, phones: ['+49170{e:07d}']}}")
    out.append("rules:")
    # Unguarded rules every contact goes through (spam filter, keyword and tag routing).
    for r in range(size.unguarded):
        cond = f'text ~ "(?i)stichwort{r}\\\\b"' if r % 2 else f'"tag{r}" in tags'
        out.append(f"  - {{name: free{r}, when: '{cond}', queue: q{r % size.queues:03d}}}")
    out.append(
        "  - {name: experts, when: 'customer.expert and channel == \"phone\"',"
        f" queue: q{size.queues - 1:03d}, priority: 50}}"
    )
    # Rules guarded by the dialled number or mailbox (and a channel): the index finds them.
    for r in range(size.rules - size.unguarded - 2):
        queue = f"q{r % size.queues:03d}"
        if r % 3 == 0:
            cond = f'channel == "email" and to == "service{r}@example.com"'
        elif r % 3 == 1:
            cond = f'channel == "chat" and to == "inbox{r}"'
        else:
            cond = f'to == "+49800{r:07d}" and hour >= 0'
        out.append(f"  - {{name: r{r}, when: '{cond}', queue: {queue}}}")
    out.append("  - {name: default, default: true, queue: q000}")
    return "\n".join(out) + "\n"


def contact(size: Size, n: int, rng: random.Random, rule: int | None = None) -> ContactEvent:
    """One new contact hitting one of the guarded rules (``rule``, or a random one; a few
    from experts)."""
    r = rng.randrange(size.rules - size.unguarded - 2) if rule is None else rule
    kind = r % 3
    channel: Channel
    if kind == 0:
        channel, to, sender = "email", f"service{r}@example.com", Sender(email=f"c{n}@example.org")
    elif kind == 1:
        channel, to, sender = "chat", f"inbox{r}", Sender(handle=f"rocketchat:c{n}")
    else:
        channel, to = "phone", f"+49800{r:07d}"
        sender = Sender(phone=f"+49170{rng.randrange(size.experts):07d}" if n % 50 == 0 else None)
        if sender.phone is None:
            sender = Sender(phone=f"+4930{n:09d}")
    return ContactEvent(
        kind="new",
        contact_id=f"generic:b{n}",
        channel=channel,
        source="generic",
        external_id=f"b{n}",
        sender=sender,
        to=to,
        subject="Frage zu meinem Anschluss",
        text="Guten Tag, mein Router blinkt rot seit gestern. Was kann ich tun?",
        occurred_at=0.0,
    )


class Pool:
    """Plays the agents: accepts every offer, remembers assignments oldest first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.assigned: collections.deque[tuple[str, str]] = collections.deque()
        self.offers = 0

    def settle(self, commands: list[Command], now: float) -> None:
        """Accept every offer in ``commands`` (and in what the accepts return)."""
        todo = commands
        while todo:
            more: list[Command] = []
            for cmd in todo:
                if isinstance(cmd, OfferCmd):
                    self.offers += 1
                    more += self.engine.handle(
                        Accept(agent_id=cmd.agent_id, offer_id=cmd.offer_id), now
                    )
                elif isinstance(cmd, EventCmd) and isinstance(cmd.event, ContactAssigned):
                    self.assigned.append((cmd.event.agent_id, cmd.event.contact_id))
            todo = more

    def complete_oldest(self, now: float) -> None:
        agent_id, contact_id = self.assigned.popleft()
        self.settle(
            self.engine.handle(Complete(agent_id=agent_id, contact_id=contact_id), now), now
        )


def run(
    seconds: float | None,
    decisions: int | None,
    load: float,
    seed: int,
    profiler: cProfile.Profile | None = None,
    size: Size = Size(),
) -> dict[str, Any]:
    """Build the engine, fill the pool, then time decisions; returns the figures."""
    build_started = time.perf_counter()
    table = parse_routing(routing_yaml(size, seed), "<benchmark>")
    engine = Engine(table)
    build_s = time.perf_counter() - build_started
    now = 1_767_600_000.0  # 2026-01-05 08:00 UTC+1, a Monday morning
    for a in range(size.agents):
        engine.handle(Login(agent_id=f"a{a:05d}"), now)
    pool = Pool(engine)
    rng = random.Random(seed)
    n = 0
    # Warm up: open ``load`` x agents contacts; this also fills the rule index's cache and the
    # customer table as a running daemon would have them.
    while n < int(size.agents * load):
        n += 1
        now += 0.001
        pool.settle(engine.handle(contact(size, n, rng), now), now)
    if not pool.assigned:
        raise SystemExit("no contact was assigned during warm-up: nothing to complete")
    # The rule index computes each dialled number's candidate rules on first sight; a running
    # daemon has seen them all, and a small centre's warm-up would not have.
    view = CustomerView()
    for r in range(size.rules - size.unguarded - 2):
        engine.table.decide(contact(size, n, rng, rule=r), view, now)
    latencies: list[int] = []
    cpu_times: list[int] = []
    offered_at_once = 0
    gc.collect()
    gc.freeze()  # as the daemon does once it has restored its state
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = started + seconds if seconds is not None else None
    limit = decisions if decisions is not None else sys.maxsize
    clock = time.perf_counter_ns
    cpu = time.process_time_ns
    while len(latencies) < limit:
        n += 1
        now += 0.001
        event = contact(size, n, rng)
        if profiler is not None:
            profiler.enable()
        c0 = cpu()
        t0 = clock()
        commands = engine.handle(event, now)
        latencies.append(clock() - t0)
        cpu_times.append(cpu() - c0)
        if profiler is not None:
            profiler.disable()
        offered_at_once += any(isinstance(c, OfferCmd) for c in commands)
        pool.settle(commands, now)
        pool.complete_oldest(now)
        if deadline is not None and len(latencies) % 1000 == 0 and time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - started
    cpu_elapsed = time.process_time() - cpu_started
    total_ns = sum(latencies)
    cpu_ns = sum(cpu_times)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    cpu_quantiles = statistics.quantiles(cpu_times, n=100, method="inclusive")
    return {
        "rules": size.rules,
        "queues": size.queues,
        "agents": size.agents,
        "decisions": len(latencies),
        "decisions_per_s": round(len(latencies) / (total_ns / 1e9)),
        "p50_us": round(quantiles[49] / 1000, 2),
        "p99_us": round(quantiles[98] / 1000, 2),
        "max_us": round(max(latencies) / 1000, 2),
        "cycle_per_s": round(len(latencies) / elapsed),
        # On a shared machine wall-clock figures include time other processes had the core;
        # these count only this process's CPU time.
        "decisions_per_cpu_s": round(len(latencies) / (cpu_ns / 1e9)),
        # The same quantiles of each decision's CPU time: what the engine costs, without the
        # time another process held the core (which is most of a shared machine's wall p99).
        "p50_cpu_us": round(cpu_quantiles[49] / 1000, 2),
        "p99_cpu_us": round(cpu_quantiles[98] / 1000, 2),
        "cycle_per_cpu_s": round(len(latencies) / cpu_elapsed),
        "offered_at_once": round(offered_at_once / len(latencies), 3),
        "open_contacts": int(size.agents * load),
        "waiting": sum(q["waiting"] for q in engine.queue_stats(now)),
        "build_seconds": round(build_s, 2),
        "target_decisions_per_s": TARGET,
    }


def size_table(decisions: int, load: float, seed: int, as_json: bool) -> int:
    """One run per centre size; a row each as it finishes (or one JSON list at the end)."""
    rows = []
    columns = (
        "agents",
        "queues",
        "decisions_per_s",
        "decisions_per_cpu_s",
        "p50_us",
        "p99_us",
        "p99_cpu_us",
    )
    if not as_json:
        print(" | ".join(columns) + " | build_seconds", flush=True)
    for agents in TABLE_AGENTS:
        for queues in TABLE_QUEUES:
            result = run(None, decisions, load, seed, size=Size(agents=agents, queues=queues))
            rows.append(result)
            if not as_json:
                cells = [str(result[c]) for c in columns] + [str(result["build_seconds"])]
                print(" | ".join(cells), flush=True)
    if as_json:
        print(json.dumps(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--seconds", type=float, help="run for this long (default 10)")
    bound.add_argument("--decisions", type=int, help="run this many decisions")
    parser.add_argument("--load", type=float, default=0.8, help="busy share of the pool (0.8)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--agents", type=int, default=Size.agents, help="agents (5000)")
    parser.add_argument("--queues", type=int, default=Size.queues, help="queues (200)")
    parser.add_argument("--rules", type=int, default=Size.rules, help="rules (1000)")
    parser.add_argument(
        "--retention",
        type=float,
        help="customer_retention in seconds (default 30 days: never reached in a run)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the decisions; top costs on stderr"
    )
    parser.add_argument(
        "--size-table",
        action="store_true",
        help="run every size of 500/5000/20000 agents x 20/200/2000 queues",
    )
    args = parser.parse_args(argv)
    if args.size_table:
        return size_table(args.decisions or 5000, args.load, args.seed, args.json)
    seconds = args.seconds if args.seconds is not None or args.decisions else 10.0
    profiler = cProfile.Profile() if args.profile else None
    size = Size(
        agents=args.agents,
        queues=args.queues,
        rules=max(args.rules, Size.unguarded + 3),
        retention=args.retention,
    )
    result = run(seconds, args.decisions, args.load, args.seed, profiler, size)
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(20)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
