"""How a routing daemon reacts when its snapshot goes wrong in Redis (the real one).

* The generation its deltas are appended to vanishes behind its back (``ChunksMissing``): the
  router starts a new generation with a full snapshot, trims the journal again, and what Redis
  holds restores to the live engine's state.
* The answer to the pointer's switch is lost (``SwitchUncertain``, made by a proxy between the
  daemon and Redis that drops exactly those replies): the router ends its tenure, restores from
  Redis, and nothing acknowledged is lost: the state equals a replay of the whole journal.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from router.daemon.journal import ContactEntry, Journal, Snapshot, SnapshotGone
from router.daemon.router_loop import _engine_input
from router.engine import Engine
from router.state import STATE_DECODER, EngineState
from rules.load import load_routing
from rules.table import RoutingTable
from tests.daemon.conftest import REDIS_URL, wait_until, write_routing
from tests.daemon.private_servers import RedisProxy
from tests.daemon.test_snapshot_crash import mail

pytestmark = pytest.mark.integration


def decoded(table: RoutingTable, state: EngineState) -> EngineState:
    """``state`` as a snapshot round trip gives it (the form two states are compared in)."""
    return STATE_DECODER.decode(Engine(table, state).snapshot())


async def append_mails(journal: Journal, first: int, count: int) -> list[str]:
    """Journal ``count`` mails one by one, a little apart (so snapshots fall between them)."""
    ids = []
    for n in range(first, first + count):
        ids.append(await journal.append(ContactEntry(event=mail(n), at=time.time())))
        await asyncio.sleep(0.002)
    return ids


async def settled(daemon: Any, journal: Journal) -> Snapshot:
    """Wait until the daemon applied the whole journal and a snapshot covers it; that one."""

    async def covered() -> Snapshot | None:
        last = await journal.last_id()
        run = daemon.router._run
        snap = await journal.load_snapshot()
        if run is None or run.last_id != last or snap is None or snap.last_id != last:
            return None
        return snap

    snap: Snapshot = await wait_until(covered, 30, "a snapshot of the whole journal")
    return snap


async def started(
    tmp_path: Path, start_daemon: Any, journal: Journal, mails: int, **settings: str
) -> tuple[RoutingTable, Any, Snapshot]:
    """A routing daemon (anna's routing, a delta every 20 records, ``settings`` on top) with
    ``mails`` mails journaled and a snapshot covering them: the table, the daemon, that
    snapshot."""
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    daemon = await start_daemon(routing, router_snapshot_delta_records="20", **settings)
    await append_mails(journal, 0, mails)
    return load_routing(routing), daemon, await settled(daemon, journal)


async def restored_state(journal: Journal, table: RoutingTable) -> EngineState:
    """What a restore from Redis gives now: the snapshot plus the journal after it."""
    while True:
        snap = await journal.load_snapshot()
        assert snap is not None
        try:
            state = await journal.snapshot_state(snap)
        except SnapshotGone:
            continue  # replaced while it was read
        break
    engine = Engine(table, state)
    now = snap.now
    for _, entry in await journal.read_after(snap.last_id, None, 100_000):
        assert entry is not None
        now = max(now, entry.at)
        engine.handle(_engine_input(entry), now)
    return decoded(table, engine.state)


async def replayed_state(journal: Journal, table: RoutingTable) -> EngineState:
    """The state the whole journal implies (every entry since the first, in order)."""
    engine = Engine(table)
    now = 0.0
    for _, entry in await journal.read_after("0-0", None, 100_000):
        assert entry is not None
        now = max(now, entry.at)
        engine.handle(_engine_input(entry), now)
    return decoded(table, engine.state)


async def test_a_generation_removed_behind_the_routers_back_is_replaced_by_a_full_one(
    tmp_path: Path, start_daemon: Any, journal: Journal
) -> None:
    table, daemon, before = await started(
        tmp_path, start_daemon, journal, 150, router_journal_retention="0"
    )
    assert before.chunks > 1

    # Gone (an operator's DEL, an eviction): every delta appended to it is refused now.
    await journal.redis.delete(journal.keys.snapshot_gen(before.gen))
    deleted_after = await journal.last_id()
    await append_mails(journal, 150, 150)

    async def new_generation() -> Snapshot | None:
        snap = await journal.load_snapshot()
        return snap if snap is not None and snap.gen != before.gen else None

    fresh = await wait_until(new_generation, 30, "a new generation")
    # A whole state: it restores without the removed chunks.
    assert await journal.redis.hlen(journal.keys.snapshot_gen(fresh.gen)) >= fresh.chunks  # type: ignore[misc]
    await settled(daemon, journal)
    # Trimming goes on: the entries before the removal (covered by the new generation) go.
    rows = await journal.redis.xrange(journal.keys.journal, count=1)
    first = rows[0][0].decode()
    assert _after(first, deleted_after)
    # The chain goes on, and Redis restores the live state.
    await append_mails(journal, 300, 40)
    snap = await settled(daemon, journal)
    assert snap.gen != before.gen  # (a compaction may have replaced the fresh one since)
    live = decoded(table, daemon.state.view.state)
    assert len(live.contacts) == 340
    assert await restored_state(journal, table) == live
    assert not await journal.redis.exists(journal.keys.snapshot_gen(before.gen))


def _after(a: str, b: str) -> bool:
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq)) > (int(bms), int(bseq))


class ReplyDropper(RedisProxy):
    """While armed, the reply to a call carrying ``marker`` (a script's SHA) is swallowed and
    the connection cut. The call itself reaches Redis and runs; only its answer is lost."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self.marker = b""
        self.armed = 0
        self.dropped = 0
        self.changed = asyncio.Event()

    def call(self, data: bytes, flag: asyncio.Event) -> None:
        if self.armed and self.marker and self.marker in data:
            self.armed -= 1
            flag.set()

    async def reply(self, data: bytes, flag: asyncio.Event) -> bool:
        if flag.is_set():
            # The call ran in Redis; its answer never arrives.
            self.dropped += 1
            self.changed.set()
            return False
        return True


@pytest.fixture
async def dropper() -> Any:
    """A :class:`ReplyDropper` in front of the shared Redis (ask for it before
    ``start_daemon``, so the daemon stops before the proxy does)."""
    proxy: ReplyDropper = await ReplyDropper.before(REDIS_URL)
    yield proxy
    await proxy.close()


async def test_a_lost_switch_answer_ends_the_tenure_and_loses_nothing(
    tmp_path: Path, dropper: ReplyDropper, start_daemon: Any, journal: Journal
) -> None:
    url = await dropper.start()
    table, daemon, before = await started(tmp_path, start_daemon, journal, 60, redis_url=url)
    first_engine = daemon.state.view

    # The next switch (a delta's) runs in Redis, and so does the client's retry of it, but
    # neither answer comes back.
    dropper.marker = daemon.router.journal._fenced_switch.sha.encode()
    dropper.armed = 2
    await append_mails(journal, 60, 40)
    await wait_until(lambda: dropper.dropped >= 2, 30, "the switch's answers dropped")
    dropper.armed = 0
    snap = await journal.load_snapshot()
    assert snap is not None and snap.at > before.at  # the switch did run

    # The tenure ended; the next one restored from Redis (the pointer as the switch left it).
    await wait_until(
        lambda: daemon.state.view is not None and daemon.state.view is not first_engine,
        30,
        "a new tenure",
    )
    await append_mails(journal, 100, 40)
    await settled(daemon, journal)
    live = decoded(table, daemon.state.view.state)
    assert sorted(live.contacts) == sorted(mail(n).contact_id for n in range(140))
    implied = await replayed_state(journal, table)
    assert live == implied
    assert await restored_state(journal, table) == implied


async def test_a_switch_whose_first_answer_is_lost_is_retried_and_routing_goes_on(
    tmp_path: Path, dropper: ReplyDropper, start_daemon: Any, journal: Journal
) -> None:
    # Only the first answer is lost: the client's retry runs the switch again (the same
    # fenced call with the same arguments, so it switches to the same place) and is answered.
    # Nothing is uncertain then: the tenure goes on, appending after that delta.
    url = await dropper.start()
    table, daemon, before = await started(tmp_path, start_daemon, journal, 60, redis_url=url)
    engine = daemon.state.view

    dropper.marker = daemon.router.journal._fenced_switch.sha.encode()
    dropper.armed = 1
    await append_mails(journal, 60, 40)
    await wait_until(lambda: dropper.dropped >= 1, 30, "the switch's answer dropped")
    await append_mails(journal, 100, 40)
    snap = await settled(daemon, journal)
    assert daemon.state.view is engine  # the same tenure
    assert snap.at > before.at
    live = decoded(table, engine.state)
    assert sorted(live.contacts) == sorted(mail(n).contact_id for n in range(140))
    assert live == await replayed_state(journal, table)
    assert await restored_state(journal, table) == live
