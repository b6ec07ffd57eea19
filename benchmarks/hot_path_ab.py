"""The hot path of two source trees compared fairly on a shared machine: interleaved chunks.

Each tree gets a worker process that builds and warms the engine exactly as
``benchmarks/hot_path.py`` does (its own copy of that module, so a tree from before a change
is measured with its own code); then the workers are asked in turn, the order alternating, for
``--chunks`` chunks of ``--per`` cycles each. A neighbour's burst then hits both about equally,
which separate runs minutes apart on a machine whose load swings from 1 to 5 do not.

    git archive <commit> | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    .venv/bin/python benchmarks/hot_path_ab.py /tmp/before . [--agents 5000 --queues 200]
        [--load 0.8] [--chunks 40 --per 1000] [--size-table] [--no-gc]

Prints one JSON line per tree (and size): decisions per second (wall and CPU) and the p50, p90,
p99 and p99.9 of the decisions' wall-clock and CPU times, in µs. ``--no-gc`` disables the
collector after the warm-up in both (what is left of the tail is then the engine's own).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def worker(root: str, agents: int, queues: int, load: float, no_gc: bool) -> None:
    """Build and warm one tree's engine, then run the chunks asked for on stdin."""
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("hot_path", Path(root, "benchmarks/hot_path.py"))
    assert spec is not None and spec.loader is not None
    hp = importlib.util.module_from_spec(spec)
    sys.modules["hot_path"] = hp  # (its dataclass looks its module up)
    spec.loader.exec_module(hp)
    from router.engine import Engine
    from router.messages import Login
    from rules.decision import CustomerView
    from rules.load import parse_routing

    size = hp.Size(agents=agents, queues=queues)
    engine = Engine(parse_routing(hp.routing_yaml(size, 1), "<benchmark>"))
    now = 1_767_600_000.0
    for a in range(size.agents):
        engine.handle(Login(agent_id=f"a{a:05d}"), now)
    pool = hp.Pool(engine)
    rng = random.Random(1)
    n = 0
    while n < int(size.agents * load):
        n += 1
        now += 0.001
        pool.settle(engine.handle(hp.contact(size, n, rng), now), now)
    view = CustomerView()
    for r in range(size.rules - size.unguarded - 2):
        engine.table.decide(hp.contact(size, n, rng, rule=r), view, now)
    gc.collect()
    gc.freeze()
    if no_gc:
        gc.disable()
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    print("ready", flush=True)
    for line in sys.stdin:
        wall: list[int] = []
        cpus: list[int] = []
        for _ in range(int(line)):
            n += 1
            now += 0.001
            event = hp.contact(size, n, rng)
            c0 = cpu()
            t0 = clock()
            commands = engine.handle(event, now)
            wall.append(clock() - t0)
            cpus.append(cpu() - c0)
            pool.settle(commands, now)
            pool.complete_oldest(now)
        print(json.dumps([wall, cpus]), flush=True)


def figures(wall: list[int], cpus: list[int]) -> dict[str, Any]:
    qw = statistics.quantiles(wall, n=1000, method="inclusive")
    qc = statistics.quantiles(cpus, n=1000, method="inclusive")
    return {
        "decisions": len(wall),
        "decisions_per_s": round(len(wall) / (sum(wall) / 1e9)),
        "decisions_per_cpu_s": round(len(cpus) / (sum(cpus) / 1e9)),
        "p50_us": round(qw[499] / 1e3, 1),
        "p90_us": round(qw[899] / 1e3, 1),
        "p99_us": round(qw[989] / 1e3, 1),
        "p999_us": round(qw[998] / 1e3, 1),
        "p50_cpu_us": round(qc[499] / 1e3, 1),
        "p99_cpu_us": round(qc[989] / 1e3, 1),
    }


def compare(trees: list[str], agents: int, queues: int, args: argparse.Namespace) -> None:
    """One interleaved comparison at one size; a JSON line per tree."""
    procs = []
    for root in trees:
        cmd = [sys.executable, __file__, "--worker", str(Path(root).resolve())]
        cmd += ["--agents", str(agents), "--queues", str(queues), "--load", str(args.load)]
        if args.no_gc:
            cmd.append("--no-gc")
        procs.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    results: list[tuple[list[int], list[int]]] = [([], []) for _ in trees]
    for i in range(args.chunks):
        order = range(len(procs)) if i % 2 == 0 else reversed(range(len(procs)))
        for k in order:
            proc = procs[k]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{args.per}\n")
            proc.stdin.flush()
            wall, cpus = json.loads(proc.stdout.readline())
            results[k][0].extend(wall)
            results[k][1].extend(cpus)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    load = os.getloadavg()
    for root, (wall, cpus) in zip(trees, results, strict=True):
        row = {"tree": root, "agents": agents, "queues": queues, **figures(wall, cpus)}
        row["load_average"] = [round(x, 2) for x in load]
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="two (or more) source trees")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--agents", type=int, default=5000)
    parser.add_argument("--queues", type=int, default=200)
    parser.add_argument("--load", type=float, default=0.8, help="busy share of the pool (0.8)")
    parser.add_argument("--chunks", type=int, default=40, help="chunks per tree (40)")
    parser.add_argument("--per", type=int, default=1000, help="cycles per chunk (1000)")
    parser.add_argument("--size-table", action="store_true", help="the nine sizes of hot_path")
    parser.add_argument("--no-gc", action="store_true", help="collector off after the warm-up")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.agents, args.queues, args.load, args.no_gc)
        return 0
    if len(args.trees) < 2:
        parser.error("give two source trees")
    if args.size_table:
        for agents in (500, 5000, 20000):
            for queues in (20, 200, 2000):
                compare(args.trees, agents, queues, args)
    else:
        compare(args.trees, args.agents, args.queues, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
