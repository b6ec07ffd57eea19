"""Delta snapshots in the real Redis (``Journal.save_snapshot(append_to=...)``): a delta cut
short between two of its chunks leaves the snapshot as it was before it, and that snapshot
plus the journal after its cursor gives the state of the engine that never stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from channels.contact_event import ContactEvent
from router.daemon.journal import (
    ChunksMissing,
    ContactEntry,
    Journal,
    JournalUnavailable,
    Snapshot,
    SwitchUncertain,
    connect_redis,
)
from router.daemon.snapshots import DeltaCut, SnapshotChain, StateCut
from router.engine import Engine
from router.messages import Accept, EngineInput, Login, OfferCmd
from router.snapshot import encode_changes, encode_state
from router.state import STATE_DECODER, EngineState
from tests.daemon.conftest import DaemonProcess, Names, wait_until, write_routing
from tests.daemon.private_servers import PrivateRedis
from tests.daemon.test_daemon_recovery import routed_state, wait_log
from tests.daemon.test_snapshot_crash import mail, routing_a_backlog
from tests.router.enginekit import call
from tests.router.test_engine_stateful import ROUTING

pytestmark = pytest.mark.integration


class Crash(Exception):
    """The router died between two chunk writes."""


async def cut_short(chunks: Iterable[bytes], after: int) -> AsyncIterator[bytes]:
    for n, chunk in enumerate(chunks):
        if n == after:
            raise Crash()
        yield chunk


def inputs(first: int, count: int) -> list[EngineInput]:
    """Mails from a few returning customers, and the agents taking some of them."""
    out: list[EngineInput] = []
    for n in range(first, first + count):
        out.append(call(f"m{n}", channel="email", email=f"k{n % 9}@example.de"))
        if n % 4 == 0:
            out.append(call(f"m{n - 2}", channel="email", kind="end"))
    return out


def feed(engine: Engine, messages: list[EngineInput], t0: float) -> None:
    for i, message in enumerate(messages):
        for cmd in engine.handle(message, t0 + i * 0.1):
            if isinstance(cmd, OfferCmd) and i % 3 == 0:
                engine.handle(Accept(agent_id=cmd.agent_id, offer_id=cmd.offer_id), t0 + i * 0.1)


def copy(state: EngineState) -> EngineState:
    return STATE_DECODER.decode(Engine(ROUTING, state).snapshot())


async def append_mails(
    journal: Journal, accepted: list[ContactEvent], first: int, count: int
) -> None:
    """Journal ``count`` more mails one by one, a few milliseconds apart, while a daemon routes
    (so its snapshots are cut between them), and add them to ``accepted``."""
    for n in range(first, first + count):
        accepted.append(mail(n))
        await journal.append(ContactEntry(event=accepted[-1], at=time.time()))
        await asyncio.sleep(0.005)


async def kill_and_restart(
    dying: DaemonProcess,
    start: Callable[[], DaemonProcess],
    journal: Journal,
    routing: Path,
    accepted: list[ContactEvent],
) -> None:
    """Kill ``dying``; the daemon ``start`` gives restores every accepted contact, and the
    journal's state routes them all."""
    dying.kill()
    killed_at = time.time()
    successor = start()
    restored = await wait_log(successor, "router.restored")
    assert restored["contacts"] == len(accepted)
    state = await routed_state(journal, routing, killed_at)
    assert sorted(state.contacts) == sorted(e.contact_id for e in accepted)
    assert successor.stop() == 0


@pytest.mark.parametrize("crash_after", [0, 1, 3, 7])
async def test_a_delta_cut_short_leaves_the_snapshot_before_it_and_the_journal_replays(
    journal: Journal, crash_after: int
) -> None:
    live = Engine(ROUTING)
    live.track_changes()
    for agent in ("a1", "a3", "a4"):
        live.handle(Login(agent_id=agent), 0.0)
    feed(live, inputs(0, 60), 1.0)
    assert await journal.save_snapshot(encode_state(live.state, 512), "1-0", now=10.0)
    live.take_changes()
    base = journal.saved
    assert base is not None
    feed(live, inputs(60, 40), 20.0)
    delta = encode_changes(live.state, live.take_changes(), 512)
    assert await journal.save_snapshot(delta, "2-0", now=30.0, append_to=base)
    after_delta = copy(live.state)
    head = journal.saved
    assert head is not None and head.gen == base.gen and head.chunks == base.chunks + len(delta)

    # The next delta dies part way: some of its chunks are in the generation, the pointer
    # still names the snapshot before it.
    tail = inputs(100, 30)
    feed(live, tail, 40.0)
    doomed = encode_changes(live.state, live.take_changes(), 512)
    assert len(doomed) > crash_after
    with pytest.raises(Crash):
        await journal.save_snapshot(cut_short(doomed, crash_after), "3-0", now=45.0, append_to=head)

    snap = await journal.load_snapshot()
    assert snap is not None and (snap.last_id, snap.chunks) == ("2-0", head.chunks)
    restored = await journal.snapshot_state(snap)
    assert restored == after_delta
    assert list(restored.customers) == list(after_delta.customers)
    # The journal after the cursor brings it to the live engine's state.
    twin = Engine(ROUTING, restored)
    feed(twin, tail, 40.0)
    assert copy(twin.state) == copy(live.state)
    assert list(twin.state.contacts) == list(live.state.contacts)

    # A router that goes on writes a full snapshot next (a new generation), and the old one,
    # with the chunks of the cut-short delta, goes.
    assert await journal.save_snapshot(encode_state(live.state), "3-0", now=45.0)
    snap = await journal.load_snapshot()
    assert snap is not None and snap.gen != base.gen
    assert not await journal.redis.exists(journal.keys.snapshot_gen(base.gen))


async def test_a_delta_whose_generation_is_gone_is_refused(journal: Journal) -> None:
    # Appending to a generation another writer removed (a full snapshot replaced it): the
    # switch counts the chunks and refuses, the pointer stays on the newer snapshot.
    eng = Engine(ROUTING)
    eng.track_changes()
    feed(eng, inputs(0, 10), 1.0)
    assert await journal.save_snapshot(encode_state(eng.state), "1-0")
    old = journal.saved
    assert old is not None
    assert await journal.save_snapshot(encode_state(eng.state), "2-0")
    feed(eng, inputs(10, 5), 5.0)
    # Not a passing failure: the router starts a new generation (a full snapshot) on this one.
    with pytest.raises(ChunksMissing):
        await journal.save_snapshot(
            encode_changes(eng.state, eng.take_changes()), "3-0", append_to=old
        )
    snap = await journal.load_snapshot()
    assert snap is not None and snap.last_id == "2-0"


async def test_the_chain_writes_full_snapshots_first_after_a_failure_and_every_n_deltas(
    journal: Journal,
) -> None:
    eng = Engine(ROUTING)
    eng.track_changes()
    chain = SnapshotChain(full_every=2, max_delta_share=100.0)

    async def write(cut: StateCut | DeltaCut, last_id: str) -> None:
        assert await journal.save_snapshot(cut.chunks(), last_id, append_to=cut.append_to)
        assert journal.saved is not None
        chain.written(cut, journal.saved)
        await cut.close()

    kinds = []
    for n in range(6):
        feed(eng, inputs(n * 10, 10), float(n * 10))
        cut = chain.cut(eng, fork=False)
        kinds.append("full" if cut.full else "delta")
        if n == 3:
            chain.failed()  # say Redis went away mid-write
            continue
        await write(cut, f"{n + 1}-0")
    assert kinds == ["full", "delta", "delta", "full", "full", "delta"]
    # Deltas cut while a full snapshot is being written wait, and follow it in order.
    feed(eng, inputs(100, 10), 100.0)
    chain.deltas = chain.full_every  # a full one is due
    full = chain.cut(eng, fork=False)
    assert full.full and chain.writing_full
    feed(eng, inputs(110, 10), 110.0)
    chain.cut_pending(eng, "8-0", 110.0, 4096)
    feed(eng, inputs(120, 10), 120.0)
    chain.cut_pending(eng, "9-0", 120.0, 4096)
    await write(full, "7-0")
    while chain.pending:
        delta, last_id, _ = chain.pending.pop(0)
        delta.append_to = chain.head
        await write(delta, last_id)
    snap = await journal.load_snapshot()
    assert snap is not None and snap.last_id == "9-0"
    assert copy(await journal.snapshot_state(snap)) == copy(eng.state)


async def test_a_daemon_killed_after_deltas_restores_the_full_snapshot_and_its_deltas(
    tmp_path: Path,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    journal: Journal,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    # A delta after every few mails; full snapshots only the first one of a tenure.
    env = daemon_env(routing, "a", router_snapshot_delta_records="20")
    first, accepted = await routing_a_backlog(journal, daemons, env, 200)
    full = await wait_until(journal.load_snapshot, 60, "the first, full snapshot")

    async def deltas_after_it() -> Snapshot | None:
        snap = await journal.load_snapshot()
        return (
            snap
            if snap is not None and snap.gen == full.gen and snap.chunks > full.chunks
            else None
        )

    await append_mails(journal, accepted, 200, 60)
    await wait_until(deltas_after_it, 30, "deltas appended to the full snapshot")
    await kill_and_restart(first, lambda: daemons(env, "second"), journal, routing, accepted)


async def test_a_delta_that_failed_to_get_in_goes_into_the_next_one(
    redis_server: PrivateRedis, names: Names
) -> None:
    # Redis stops while a delta is written: its changes go back to the engine, the chain
    # keeps its head, and the next delta (Redis back) carries them: the snapshot is then
    # exactly the engine's state, with no full snapshot in between.
    client = connect_redis(redis_server.url, timeout=1.0)
    journal = Journal(client, names.key_prefix)
    eng = Engine(ROUTING)
    eng.track_changes()
    chain = SnapshotChain(full_every=100, max_delta_share=100.0)
    for agent in ("a1", "a3"):
        eng.handle(Login(agent_id=agent), 0.0)
    feed(eng, inputs(0, 40), 1.0)

    async def write(cut: StateCut | DeltaCut, last_id: str) -> None:
        assert await journal.save_snapshot(cut.chunks(), last_id, append_to=cut.append_to)
        assert journal.saved is not None
        chain.written(cut, journal.saved)

    try:
        await write(chain.cut(eng, fork=False, limit=512), "1-0")
        base = chain.head
        assert base is not None
        feed(eng, inputs(40, 30), 10.0)
        doomed = chain.cut(eng, fork=False, limit=512)
        assert not doomed.full and eng.changed() == 0
        redis_server.stop()
        with pytest.raises(JournalUnavailable):
            await journal.save_snapshot(doomed.chunks(), "2-0", append_to=doomed.append_to)
        chain.failed(doomed)
        assert chain.head == base and eng.changed() > 0
        feed(eng, inputs(70, 20), 20.0)
        redis_server.start()
        good = chain.cut(eng, fork=False, limit=512)
        assert not good.full
        await write(good, "3-0")
        snap = await journal.load_snapshot()
        assert snap is not None and snap.gen == base.gen and snap.last_id == "3-0"
        restored = await journal.snapshot_state(snap)
        assert copy(restored) == copy(eng.state)
        assert list(restored.contacts) == list(eng.state.contacts)
        assert list(restored.customers) == list(eng.state.customers)
        assert list(restored.finished) == list(eng.state.finished)
    finally:
        await client.aclose()


async def test_chunks_left_by_a_delta_that_was_not_switched_to_are_replaced(
    journal: Journal,
) -> None:
    # A delta written in part (and never switched to) leaves chunks after the head; the next
    # delta, appended at the same place, replaces them and the switch counts right.
    eng = Engine(ROUTING)
    eng.track_changes()
    feed(eng, inputs(0, 30), 1.0)
    assert await journal.save_snapshot(encode_state(eng.state, 512), "1-0")
    eng.take_changes()
    head = journal.saved
    assert head is not None
    feed(eng, inputs(30, 40), 5.0)
    big = encode_changes(eng.state, eng.take_changes(), 256)
    with pytest.raises(Crash):
        await journal.save_snapshot(cut_short(big, len(big) - 1), "2-0", append_to=head)
    feed(eng, inputs(70, 2), 9.0)
    small = encode_changes(eng.state, eng.take_changes())
    assert len(small) < len(big) - 1
    assert await journal.save_snapshot(small, "3-0", append_to=head)
    snap = await journal.load_snapshot()
    assert snap is not None and snap.chunks == head.chunks + len(small)


async def test_a_delta_of_a_router_that_lost_the_lease_is_not_written(journal: Journal) -> None:
    # The lease moved on: the old holder's chunks are refused, not only its switch, so it
    # cannot overwrite a chunk of the generation the new holder appends to.
    eng = Engine(ROUTING)
    eng.track_changes()
    feed(eng, inputs(0, 10), 1.0)
    await journal.redis.set(journal.keys.lease, b"mine")
    assert await journal.save_snapshot(encode_state(eng.state), "1-0", lease_token="mine")
    head = journal.saved
    assert head is not None
    await journal.redis.set(journal.keys.lease, b"theirs")
    feed(eng, inputs(10, 10), 2.0)
    delta = encode_changes(eng.state, eng.take_changes())
    assert not await journal.save_snapshot(delta, "2-0", lease_token="mine", append_to=head)
    assert await journal.redis.hlen(journal.keys.snapshot_gen(head.gen)) == head.chunks  # type: ignore[misc]


async def test_a_delta_whose_switch_answer_was_lost_is_not_taken_for_one_that_failed(
    journal: Journal,
) -> None:
    # The switch ran in Redis but its answer never came back (a timeout): the pointer may
    # count the delta. That is not a delta that failed to get in (whose changes the next
    # delta, appended at the old head, carries): appending there would remove chunks the
    # pointer counts. The journal says so with SwitchUncertain, which ends the tenure.
    eng = Engine(ROUTING)
    eng.track_changes()
    feed(eng, inputs(0, 10), 1.0)
    assert await journal.save_snapshot(encode_state(eng.state), "1-0")
    eng.take_changes()
    head = journal.saved
    assert head is not None
    feed(eng, inputs(10, 10), 2.0)
    switch = journal._fenced_switch

    async def answer_lost(**kwargs: Any) -> Any:
        await switch(**kwargs)
        raise ConnectionError("timed out reading the answer")

    journal._fenced_switch = answer_lost  # type: ignore[assignment]
    with pytest.raises(SwitchUncertain):
        await journal.save_snapshot(
            encode_changes(eng.state, eng.take_changes()), "2-0", append_to=head
        )
    snap = await journal.load_snapshot()
    assert snap is not None and snap.chunks > head.chunks  # the pointer did count it


async def test_a_router_that_lost_the_lease_does_not_remove_the_new_holders_snapshot(
    journal: Journal,
) -> None:
    # The old holder still takes its tenure's generation for the pointer's (its compaction
    # failed before it noticed the loss) while the new holder has switched to one of its own:
    # the old holder's clean-up removes nothing, and even an unfenced one spares the pointer's.
    eng = Engine(ROUTING)
    feed(eng, inputs(0, 10), 1.0)
    await journal.redis.set(journal.keys.lease, b"old")
    assert await journal.save_snapshot(encode_state(eng.state), "1-0", lease_token="old")
    assert journal.saved is not None
    old_gen = journal.saved.gen
    await journal.redis.set(journal.keys.lease, b"new")
    feed(eng, inputs(10, 10), 2.0)
    assert await journal.save_snapshot(encode_state(eng.state), "2-0", lease_token="new")
    snap = await journal.load_snapshot()
    assert snap is not None and snap.gen != old_gen
    for token in ("old", None):
        await journal.drop_generations_except(old_gen, lease_token=token)
        restored = await journal.snapshot_state(snap)
        assert copy(restored) == copy(eng.state)


async def test_a_restarted_daemon_appends_its_deltas_to_the_generation_it_restored(
    tmp_path: Path,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    journal: Journal,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    # Deltas of a few records on a large state: none of the reasons for a full one.
    env = daemon_env(routing, "a", router_snapshot_delta_records="20")
    first, accepted = await routing_a_backlog(journal, daemons, env, 600)
    full = await wait_until(journal.load_snapshot, 60, "the first, full snapshot")
    assert first.stop() == 0
    left = await journal.load_snapshot()
    assert left is not None and left.gen == full.gen

    second = daemons(env, "second")
    await wait_log(second, "router.routing")
    await append_mails(journal, accepted, 600, 50)

    async def appended() -> Snapshot | None:
        snap = await journal.load_snapshot()
        return snap if snap is not None and snap.chunks > left.chunks else None

    snap = await wait_until(appended, 30, "deltas of the second tenure")
    assert snap.gen == full.gen  # no full snapshot of its own
    await kill_and_restart(second, lambda: daemons(env, "third"), journal, routing, accepted)
