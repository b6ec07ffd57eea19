"""The hot path pure and compiled with mypyc, alternating: what a compiled engine buys.

The routing core is typed (mypy strict) and so compiles with mypyc (part of mypy, a dev
dependency) without a change. This benchmark copies ``router/``, ``rules/``, ``channels/`` and
``benchmarks/hot_path.py`` into a temporary directory, compiles there every engine module that
mypyc can take, and runs ``hot_path.py --json`` alternately in the pure and the compiled copy,
each run a process of its own. Nothing is compiled in the repository: the daemon and the tests
always run the pure-Python modules.

Not compiled: the modules that define msgspec Structs (the records, events, commands and the
rule schema): mypyc cannot compile a class with msgspec's metaclass (``msgspec.field`` defaults
fail at import), so the records the engine reads and writes stay interpreted objects either way.

    .venv/bin/python benchmarks/compiled.py [--rounds 3] [--seconds 5] [--load 0.8] [--json]

Needs a C compiler and the Python headers (Debian: ``gcc``; pyenv and the Debian ``python3-dev``
ship the headers). The compile takes about 30 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: the engine's pure modules that define no msgspec Struct (those mypyc compiles).
COMPILED = (
    "router/agent_index.py",
    "router/contact_queues.py",
    "router/customers.py",
    "router/engine.py",
    "router/experts.py",
    "router/lifecycle.py",
    "router/timers.py",
    "router/views.py",
    "rules/identity.py",
    "rules/prefilter.py",
    "rules/table.py",
)


def copy_tree(dest: Path) -> None:
    """The packages and the benchmark, as they are in the working tree."""
    for package in ("router", "rules", "channels"):
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
    (dest / "benchmarks").mkdir()
    shutil.copy2(ROOT / "benchmarks" / "hot_path.py", dest / "benchmarks" / "hot_path.py")


def compile_engine(dest: Path) -> None:
    """mypyc over :data:`COMPILED`, in ``dest`` (the extensions land beside the sources)."""
    mypyc = Path(sys.executable).with_name("mypyc")
    done = subprocess.run(
        [str(mypyc), *COMPILED], cwd=dest, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"mypyc failed (exit {done.returncode})")
    built = sorted(p.name for p in (dest / "router").glob("*.so"))
    if len(built) < sum(1 for m in COMPILED if m.startswith("router/")):
        raise SystemExit(f"mypyc built only {built}")


def hot_path(tree: Path, seconds: float, load: float) -> dict[str, Any]:
    """One run of the benchmark in ``tree`` (a process of its own)."""
    options = ["--json", "--seconds", str(seconds), "--load", str(load)]
    done = subprocess.run(
        [sys.executable, "benchmarks/hot_path.py", *options],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def engine_file(tree: Path) -> str:
    """Which file ``router.engine`` is imported from in ``tree`` (the proof of what ran)."""
    done = subprocess.run(
        [sys.executable, "-c", "import router.engine as e; print(e.__file__)"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip()).name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds a run (5)")
    parser.add_argument("--load", type=float, default=0.8, help="hot_path.py --load (0.8)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stellwerk-mypyc-") as tmp:
        pure, compiled = Path(tmp) / "pure", Path(tmp) / "compiled"
        copy_tree(pure)
        copy_tree(compiled)
        compile_engine(compiled)
        files = {"pure": engine_file(pure), "compiled": engine_file(compiled)}
        runs: dict[str, list[dict[str, Any]]] = {"pure": [], "compiled": []}
        for _ in range(args.rounds):
            runs["pure"].append(hot_path(pure, args.seconds, args.load))
            runs["compiled"].append(hot_path(compiled, args.seconds, args.load))
    summary: dict[str, Any] = {"rounds": args.rounds, "load": args.load}
    for name, results in runs.items():
        summary[name] = {
            "engine_module": files[name],
            "decisions_per_s": [r["decisions_per_s"] for r in results],
            "decisions_per_cpu_s": [r["decisions_per_cpu_s"] for r in results],
            "p50_us": [r["p50_us"] for r in results],
            "p99_us": [r["p99_us"] for r in results],
        }
    pure_cpu = statistics.median(summary["pure"]["decisions_per_cpu_s"])
    compiled_cpu = statistics.median(summary["compiled"]["decisions_per_cpu_s"])
    summary["speedup_per_cpu_s"] = round(compiled_cpu / pure_cpu, 2)
    if args.json:
        print(json.dumps(summary))
    else:
        for name in runs:
            row = summary[name]
            print(
                f"{name:9} {row['engine_module']:45} decisions/s {row['decisions_per_s']}"
                f"  per CPU-s {row['decisions_per_cpu_s']}  p50 {row['p50_us']} µs"
                f"  p99 {row['p99_us']} µs"
            )
        print(f"compiled / pure (median decisions per CPU-second): {summary['speedup_per_cpu_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
