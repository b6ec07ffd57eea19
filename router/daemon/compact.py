"""Compaction: the full snapshot built in a process of its own, from what is in Redis.

The router appends deltas to its snapshot generation (:mod:`router.daemon.snapshots`); now and
then the chain is compacted into a new generation whose base is the whole state, so a restore
does not decode a long tail of deltas. That work (decoding the generation, encoding the state
again) is the size of the state, so it is done here, in a separate Python process the router
starts (``python -m router.daemon.compact``), not in the router's loop and not in a fork of
the router::

    STELLWERK_COMPACT_REDIS_URL=redis://... python -m router.daemon.compact \\
        --prefix stellwerk: --gen GEN --chunks N [--chunk-bytes B]

It reads the first ``N`` chunks of generation ``GEN`` (the base and the deltas the router had
written when it started it) with the same builder a restore uses, writes the state as a new
generation (listed in ``snapshot:gens``, pointed to by nothing) and prints one JSON line: the
new generation, its chunks and bytes, ``covers`` (= ``N``: the chunks of ``GEN`` it holds) and
its wall, CPU and peak memory. The router then copies the chunks written after ``N`` (its
deltas meanwhile) after those and switches the pointer
(:meth:`~router.daemon.journal.Journal.switch_compacted`, fenced by its lease). The process
writes nothing a reader follows: killed at any point, it leaves a generation nobody points
to, removed after the next switch, and the snapshot stays the router's chain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import resource
import signal
import sys
import time

import msgspec

from router.daemon.journal import Journal, Snapshot, connect_redis
from router.snapshot import CHUNK_BYTES, encode_state

_PR_SET_PDEATHSIG = 1  # prctl(2), Linux

#: the environment variable with the Redis URL (not an argument: it may hold a password).
REDIS_URL_ENV = "STELLWERK_COMPACT_REDIS_URL"


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """What a compaction wrote (its stdout line)."""

    gen: str
    chunks: int
    bytes: int
    #: the chunks of the source generation the new one holds (base + deltas then).
    covers: int
    #: the deltas among them (the chain counts those after ``covers`` on).
    deltas: int
    read_s: float
    write_s: float
    cpu_s: float
    max_rss_mib: float


def _peak_rss_kib() -> int:
    """This process's peak resident memory (``VmHWM``: of its own image, unlike
    ``ru_maxrss``, which a process started by a large one inherits across ``exec``)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def compact(journal: Journal, gen: str, chunks: int, limit: int = CHUNK_BYTES) -> Report:
    """Build the state of ``gen``'s first ``chunks`` chunks and write it as a new generation."""
    started = time.perf_counter()
    source = Snapshot(last_id="", at=0.0, gen=gen, chunks=chunks)
    state, size = await journal.snapshot_chain(source)
    read = time.perf_counter()
    new, written, nbytes = await journal.write_generation(encode_state(state, limit))
    done = time.perf_counter()
    return Report(
        gen=new,
        chunks=written,
        bytes=nbytes,
        covers=chunks,
        deltas=size.deltas,
        read_s=round(read - started, 3),
        write_s=round(done - read, 3),
        cpu_s=round(time.process_time(), 3),
        max_rss_mib=round(_peak_rss_kib() / 1024, 1),
    )


async def _main(args: argparse.Namespace) -> Report:
    client = connect_redis(os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0"), timeout=60)
    try:
        return await compact(Journal(client, args.prefix), args.gen, args.chunks, args.chunk_bytes)
    finally:
        await client.aclose()


def _die_with_parent() -> None:
    """Die with the router that started this (a compaction left running would only hold
    memory and write a generation nobody points to)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run one compaction; the report on stdout, exit 0; an error on stderr, exit 1."""
    parser = argparse.ArgumentParser(prog="python -m router.daemon.compact")
    parser.add_argument("--prefix", required=True, help="the installation's key prefix")
    parser.add_argument("--gen", required=True, help="the generation to compact")
    parser.add_argument("--chunks", type=int, required=True, help="its chunks to include")
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    args = parser.parse_args(argv)
    _die_with_parent()
    # The state is built once and lives until the process ends: no collections over it.
    gc.disable()
    try:
        report = asyncio.run(_main(args))
    except Exception as exc:  # reported to the router, which keeps its chain
        print(f"compaction failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(msgspec.to_builtins(report)) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Without tearing the state down object by object (seconds for a million contacts).
    os._exit(code)
