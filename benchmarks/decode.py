"""Decode throughput per source: real samples, one core, a time.perf_counter loop.

    .venv/bin/python benchmarks/decode.py [--iterations N] [--seconds S] [--repeat R] [--json]

For each source, every real sample of it (tests/fixtures/samples-by-source.json) is decoded in a
loop of N iterations (fewer for slow samples, so that one loop lasts about S seconds), with the
signature check on where the sample's secret is known (Twilio). The best of R repeats is kept,
so that a scheduler hiccup does not count. A source's figure is the rate over its samples,
each decoded equally often, in deliveries per second (every sample but Rocket.Chat's agent
message yields one or more ContactEvents).

Caller numbers are cached after the first parse (channels.common); the main ("cold") figure
clears that cache before every decode, as if every event came from a new caller. The "warm"
column is the rate for repeated events of a known caller (answer, DTMF, hangup of one call).
The "cold cpu" column is the cold rate by CPU time (time.process_time) instead of wall-clock
time: on a shared machine it shows what the code costs when the scheduler takes the core away.
``--json`` prints ``{source: events_per_s}`` (cold, wall clock) only; the default prints the
tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from channels.base import DecodeConfig, Decoder, Headers  # noqa: E402
from channels.registry import SOURCES  # noqa: E402
from rules.identity import _parse_phone  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TARGETS = {"asterisk-ari": 50_000.0, "freeswitch": 50_000.0}


def load_samples() -> dict[str, list[tuple[str, bytes, dict[str, str], DecodeConfig]]]:
    """Every source's samples as (file name, body, headers, config)."""
    manifest: dict[str, Any] = json.loads((FIXTURES / "samples-by-source.json").read_text())
    samples: dict[str, list[tuple[str, bytes, dict[str, str], DecodeConfig]]] = {}
    for source, entries in manifest.items():
        if source.startswith("_"):
            continue
        for entry in entries:
            headers = dict(entry.get("headers", {}))
            if "headers_file" in entry:
                headers.update(json.loads((FIXTURES / entry["headers_file"]).read_text()))
            config = DecodeConfig(
                secrets={source: entry["secret"]} if "secret" in entry else {},
                public_urls={source: entry["url"]} if "url" in entry else {},
            )
            body = (FIXTURES / entry["file"]).read_bytes()
            samples.setdefault(source, []).append((Path(entry["file"]).name, body, headers, config))
    return samples


def rate(
    decoder: Decoder, body: bytes, headers: Headers, config: DecodeConfig, n: int, cold: bool
) -> tuple[float, float]:
    """Deliveries per second decoding ``body`` ``n`` times: by wall clock and by CPU time."""
    clear = _parse_phone.cache_clear
    decoder(body, headers, config)  # warm the imports' own caches (phonenumbers metadata)
    cpu = time.process_time()
    start = time.perf_counter()
    if cold:
        for _ in range(n):
            clear()
            decoder(body, headers, config)
    else:
        for _ in range(n):
            decoder(body, headers, config)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return n / wall, n / max(cpu, 1e-9)


def iterations_for(
    decoder: Decoder, body: bytes, headers: Headers, config: DecodeConfig, cap: int, seconds: float
) -> int:
    """Loop length: ``cap``, or fewer where that would take much longer than ``seconds``."""
    probe = max(1, min(cap, 20))
    per_decode = 1.0 / rate(decoder, body, headers, config, probe, cold=True)[1]
    return max(probe, min(cap, int(seconds / per_decode)))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="decodes per loop (cap)")
    parser.add_argument(
        "--seconds", type=float, default=0.5, help="shorten loops of slow samples to about this"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repeats; the best is kept")
    parser.add_argument("--json", action="store_true", help="print {source: events_per_s}")
    args = parser.parse_args(argv)

    cold: dict[str, float] = {}
    warm: dict[str, float] = {}
    cold_cpu: dict[str, float] = {}
    rows: list[tuple[str, str, int, float, float, float]] = []
    for source, samples in load_samples().items():
        decoder = SOURCES[source]
        times = [0.0, 0.0, 0.0]
        for name, body, headers, config in samples:
            n = iterations_for(decoder, body, headers, config, args.iterations, args.seconds)
            cold_runs = [rate(decoder, body, headers, config, n, True) for _ in range(args.repeat)]
            warm_runs = [rate(decoder, body, headers, config, n, False) for _ in range(args.repeat)]
            best = (
                max(r[0] for r in cold_runs),
                max(r[0] for r in warm_runs),
                max(r[1] for r in cold_runs),
            )
            rows.append((source, name, n, *best))
            for i, value in enumerate(best):
                times[i] += 1.0 / value
        cold[source], warm[source], cold_cpu[source] = (len(samples) / t for t in times)

    if args.json:
        print(json.dumps({s: round(r) for s, r in cold.items()}))
        return 0
    head = f"{'cold/s':>10} {'warm/s':>10} {'cold cpu/s':>11}"
    print(f"{'source':<13} {'sample':<36} {'N':>6} {head}")
    for source, name, n, c, w, u in rows:
        print(f"{source:<13} {name:<36} {n:>6} {c:>10,.0f} {w:>10,.0f} {u:>11,.0f}")
    print()
    print(f"{'source':<13} {head}")
    for source in cold:
        target = TARGETS.get(source)
        note = ""
        if target is not None:
            note = f"  target {target:,.0f}: " + ("met" if cold[source] >= target else "NOT met")
        figures = f"{cold[source]:>10,.0f} {warm[source]:>10,.0f} {cold_cpu[source]:>11,.0f}"
        print(f"{source:<13} {figures}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
