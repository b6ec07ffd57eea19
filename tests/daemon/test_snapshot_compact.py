"""Compaction (``router/daemon/compact.py``): the full snapshot built by a process of its own
from the generation in Redis, while the router keeps appending deltas; the router carries the
deltas written meanwhile over and switches. Whatever the interleaving, the snapshot is the
live engine's state; a compaction killed half-way leaves the previous snapshot whole."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from router.daemon.compact import REDIS_URL_ENV, Report, compact
from router.daemon.journal import Journal
from router.daemon.snapshots import Compaction, DeltaCut, SnapshotChain, StateCut
from router.engine import Engine
from router.messages import Login
from tests.daemon.conftest import REDIS_URL, DaemonProcess, wait_until, write_routing
from tests.daemon.test_daemon_recovery import wait_log
from tests.daemon.test_snapshot_crash import routing_a_backlog
from tests.daemon.test_snapshot_deltas import append_mails, copy, feed, inputs, kill_and_restart
from tests.router.test_engine_stateful import ROUTING

pytestmark = pytest.mark.integration


class Chain:
    """An engine and its snapshot chain in Redis, written the way the router writes them."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.engine = Engine(ROUTING)
        self.engine.track_changes()
        self.chain = SnapshotChain(full_every=1000, max_delta_share=1000.0)
        self.n = 0
        for agent in ("a1", "a3", "a4"):
            self.engine.handle(Login(agent_id=agent), 0.0)

    def feed(self, count: int) -> None:
        feed(self.engine, inputs(self.n, count), 1.0 + self.n)
        self.n += count

    async def snapshot(self) -> None:
        cut: StateCut | DeltaCut = self.chain.cut(self.engine, fork=False, limit=700, compact=True)
        assert await self.journal.save_snapshot(
            cut.chunks(), f"{self.n + 1}-0", append_to=cut.append_to
        )
        assert self.journal.saved is not None
        self.chain.written(cut, self.journal.saved)

    async def switch(self, compaction: Compaction, report: Report) -> None:
        head = self.chain.head
        assert head is not None and head.gen == compaction.head.gen
        assert await self.journal.switch_compacted(report.gen, report.chunks, report.covers, head)
        assert self.journal.saved is not None
        self.chain.compacted(compaction, self.journal.saved, report.bytes)

    async def assert_restores(self) -> None:
        snap = await self.journal.load_snapshot()
        assert snap is not None and snap.last_id == f"{self.n + 1}-0"
        restored = await self.journal.snapshot_state(snap)
        live = self.engine.state
        assert copy(restored) == copy(live)
        assert list(restored.contacts) == list(live.contacts)
        assert list(restored.customers) == list(live.customers)
        assert list(restored.finished) == list(live.finished)


async def run_compaction(journal: Journal, compaction: Compaction) -> asyncio.subprocess.Process:
    env = dict(os.environ, **{REDIS_URL_ENV: REDIS_URL})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router.daemon.compact",
        "--prefix",
        journal.keys.prefix,
        "--gen",
        compaction.head.gen,
        "--chunks",
        str(compaction.head.chunks),
        "--chunk-bytes",
        "700",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )


async def test_a_compaction_while_deltas_keep_coming_gives_the_live_state(
    journal: Journal,
) -> None:
    c = Chain(journal)
    c.feed(40)
    await c.snapshot()  # the first: a full one
    for _ in range(3):
        c.feed(10)
        await c.snapshot()
    compaction = c.chain.compaction()
    proc = await run_compaction(journal, compaction)
    # The router goes on while the process works: more deltas on the old generation.
    for _ in range(3):
        c.feed(10)
        await c.snapshot()
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    report = msgspec.json.decode(out.strip().splitlines()[-1], type=Report)
    assert report.covers == compaction.head.chunks and report.deltas == 3
    old = c.chain.head
    assert old is not None
    await c.switch(compaction, report)
    head = c.chain.head
    assert head is not None and head.gen == report.gen and head.gen != old.gen
    assert head.chunks == report.chunks + (old.chunks - report.covers)
    assert c.chain.deltas == 3  # those carried over
    assert not await journal.redis.exists(journal.keys.snapshot_gen(old.gen))
    await c.assert_restores()
    # The chain goes on in the new generation.
    c.feed(10)
    await c.snapshot()
    assert c.chain.head is not None and c.chain.head.gen == report.gen
    await c.assert_restores()


async def test_a_compaction_killed_half_way_leaves_the_snapshot_as_it_was(
    journal: Journal,
) -> None:
    c = Chain(journal)
    c.feed(300)
    await c.snapshot()
    c.feed(20)
    await c.snapshot()
    compaction = c.chain.compaction()
    proc = await run_compaction(journal, compaction)
    gens = journal.keys.snapshot_gens

    async def writing() -> str | None:
        members = {g.decode() for g in await journal.redis.smembers(gens)}  # type: ignore[misc]
        new = members - {compaction.head.gen}
        if not new:
            return None
        gen = new.pop()
        return gen if await journal.redis.hlen(journal.keys.snapshot_gen(gen)) else None  # type: ignore[misc]

    half = await wait_until(writing, 30, "the compaction writing its generation")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    c.feed(10)
    await c.snapshot()  # the router goes on: a delta on the old generation
    assert c.chain.head is not None and c.chain.head.gen == compaction.head.gen
    await c.assert_restores()
    # The next compaction's switch removes what the killed one left.
    again = c.chain.compaction()
    report = await compact(journal, again.head.gen, again.head.chunks, 700)
    await c.switch(again, report)
    assert not await journal.redis.exists(journal.keys.snapshot_gen(half))
    await c.assert_restores()


@pytest.mark.parametrize("seed", range(6))
async def test_compactions_and_deltas_in_any_interleaving_give_the_live_state(
    journal: Journal, seed: int
) -> None:
    # Deltas, compactions started and finished at random points (in process: the same code
    # as the process's), several of them over the chain's life.
    rng = random.Random(seed)
    c = Chain(journal)
    c.feed(30)
    await c.snapshot()
    running: tuple[Compaction, Report] | None = None
    for _ in range(25):
        step = rng.random()
        if step < 0.5:
            c.feed(rng.randint(1, 12))
            await c.snapshot()
        elif running is None:
            compaction = c.chain.compaction()
            report = await compact(journal, compaction.head.gen, compaction.head.chunks, 700)
            running = (compaction, report)
        else:
            await c.switch(*running)
            running = None
        await c.assert_restores()


async def test_a_daemon_compacts_its_chain_and_restores_from_the_compacted_snapshot(
    tmp_path: Path,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    journal: Journal,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    # A compaction after every two deltas.
    env = daemon_env(
        routing, "a", router_snapshot_delta_records="10", router_snapshot_full_every="2"
    )
    first, accepted = await routing_a_backlog(journal, daemons, env, 100)
    full = await wait_until(journal.load_snapshot, 60, "the first, full snapshot")
    await append_mails(journal, accepted, 100, 60)
    switched = await wait_log(first, "router.compaction_switched", 60)
    assert switched["gen"] != full.gen
    compacted = await wait_log(first, "router.compacted")
    assert compacted["cpu_s"] > 0
    await kill_and_restart(first, lambda: daemons(env, "second"), journal, routing, accepted)
