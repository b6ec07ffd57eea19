"""The deltas cut while a full snapshot is written wait in ``SnapshotChain.pending``, up to a
bound in bytes; past it the changes stay marked in the engine and the first delta after the
full one carries them. Whatever the bound and wherever the cuts fall, the full snapshot, the
waiting deltas and that delta, read in order, give the engine's state: nothing is lost."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from router.daemon.journal import Snapshot
from router.daemon.snapshots import DeltaCut, SnapshotChain, StateCut
from router.engine import Engine
from router.snapshot import decode_state
from tests.daemon.test_snapshot_deltas import copy, feed, inputs
from tests.router.test_engine_stateful import ROUTING


def chunks_of(cut: StateCut | DeltaCut) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [chunk async for chunk in cut.chunks()]

    return asyncio.run(collect())


@settings(max_examples=40, deadline=None)
@given(
    bound=st.integers(1, 40_000),
    steps=st.lists(st.tuples(st.integers(1, 12), st.booleans()), min_size=1, max_size=25),
)
def test_waiting_deltas_stay_within_their_bound_and_lose_nothing(
    bound: int, steps: list[tuple[int, bool]]
) -> None:
    eng = Engine(ROUTING)
    eng.track_changes()
    chain = SnapshotChain(max_pending_bytes=bound)
    feed(eng, inputs(0, 10), 0.0)
    full = chain.cut(eng, fork=False)  # no head yet: a full one, being written from here on
    assert full.full and chain.writing_full
    first, t = 10, 10.0
    for count, cut_now in steps:
        feed(eng, inputs(first, count), t)
        first, t = first + count, t + count
        if not cut_now:
            continue
        waiting = chain.pending_bytes()
        cut = chain.cut_pending(eng, f"{first}-0", t, 4096)
        assert (cut is None) == (waiting >= bound)
        # At most one delta beyond the bound: the one that reached it.
        assert chain.pending_bytes() - chain.pending[-1][0].size < bound
    assert all(cut.size > 0 for cut, _, _ in chain.pending)

    # The full snapshot is in; the waiting deltas follow it, then the next delta.
    chunks = chunks_of(full)
    chain.written(full, Snapshot(last_id="1-0", at=0.0, gen="g", chunks=len(chunks)))
    for delta, last_id, _ in list(chain.pending):
        delta.append_to = chain.head
        more = chunks_of(delta)
        chunks += more
        chain.written(delta, Snapshot(last_id=last_id, at=0.0, gen="g", chunks=len(chunks)))
    chain.pending = []
    last = chain.cut(eng, fork=False, compact=True)
    assert not last.full
    chunks += chunks_of(last)
    assert copy(decode_state(chunks)) == copy(eng.state)
