"""A snapshot that cannot be read when a daemon restores it (the real Redis, real daemons).

* Its chunks are gone (an operator's DEL, an eviction) or one is damaged: the daemon does not
  route from an empty engine (that would forget the contacts only the snapshot holds) and
  does not crash either. It logs ``router.snapshot_unreadable`` once per attempt, answers
  ``/readyz`` with 503 and the reason, counts it, and tries again; once the chunks are back,
  it restores them and routes the contacts queued before.
* The pointer moves on to a readable generation while the old one is read: the restore
  reads the new one, in the same tenure. A pointer that keeps moving is given up on after
  ``RESTORE_REREADS`` re-reads, naming the last one read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon.journal import AgentEntry, ContactEntry, Journal, Snapshot, SnapshotGone
from router.daemon.lease import LeaseKeeper
from router.daemon.router_loop import RESTORE_REREADS, Router
from router.messages import Login
from tests.daemon.conftest import DaemonProcess, MqttProbe, wait_until, write_routing
from tests.daemon.private_servers import free_port
from tests.daemon.test_daemon_recovery import wait_log
from tests.daemon.test_snapshot_crash import mail
from tests.daemon.test_snapshot_faults import settled

pytestmark = pytest.mark.integration

MAILS = 30


async def seeded(start_daemon: Callable[..., Any], journal: Journal, routing: Path) -> Snapshot:
    """A snapshot of MAILS queued mails in Redis, written by a daemon that then stopped (so no
    daemon runs); its pointer."""
    seeder = await start_daemon(routing, "seed", router_snapshot_chunk_bytes="1024")
    await journal.append_many([ContactEntry(event=mail(n), at=time.time()) for n in range(MAILS)])
    await settled(seeder, journal)
    seeder.stopping.set()
    # Released after its last snapshot: from here on nothing writes the pointer.

    async def released() -> bool:
        return not await journal.redis.exists(journal.keys.lease)

    await wait_until(released, 15, "the seeder to stop")
    snap = await journal.load_snapshot()
    assert snap is not None and snap.chunks > 2
    return snap


async def readyz(http: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, Any]]:
    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


async def metric(http: aiohttp.ClientSession, port: int, line: str) -> float | None:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return None


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in daemon.log_lines() if line.get("event") == name]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize("fault", ["missing", "damaged"])
async def test_an_unreadable_snapshot_stops_routing_until_it_is_put_back(
    fault: str,
    tmp_path: Path,
    start_daemon: Callable[..., Any],
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[..., DaemonProcess],
    mqtt_probe: MqttProbe,
    journal: Journal,
    http: aiohttp.ClientSession,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    snap = await seeded(start_daemon, journal, routing)
    key = journal.keys.snapshot_gen(snap.gen)
    saved = await journal.redis.hgetall(key)  # type: ignore[misc]
    if fault == "missing":
        await journal.redis.delete(key)
    else:
        await journal.redis.hset(key, str(snap.chunks - 1), b"\xc1 not msgpack")  # type: ignore[misc]
    # Were anybody routing, anna would be offered one of the queued mails.
    login_id = await journal.append(AgentEntry(cmd=Login(agent_id="anna"), at=time.time()))

    port = free_port()
    d = daemons(daemon_env(routing, "b", http_addr=f"127.0.0.1:{port}"), "b")

    def attempts() -> bool:
        assert d.proc is not None
        assert d.proc.poll() is None, f"the daemon exited:\n{d.log()}"  # it keeps running
        return len(events(d, "router.snapshot_unreadable")) >= 3

    await wait_until(attempts, 30, "3 attempts to restore")
    status, body = await readyz(http, port)
    assert status == 503 and body["ready"] is False
    assert "cannot be restored" in body["detail"] and snap.gen in body["detail"]
    assert fault in body["detail"]
    found = await metric(http, port, f'stellwerk_snapshot_unreadable_total{{reason="{fault}"}}')
    assert found is not None and found >= 3
    # Nothing was routed: no offer, and the journal's published mark stayed before the login.
    assert mqtt_probe.seen("agents/anna/offers") == []
    assert await journal.published() != login_id

    # Put back as it was, in one call (the damaged chunk overwritten).
    await journal.redis.hset(key, mapping=saved)  # type: ignore[misc]
    offers = await mqtt_probe.wait_for("agents/anna/offers", timeout=30, type="offer")
    assert offers[0]["contact_id"] == mail(0).contact_id  # the oldest mail from before
    restored = await wait_log(d, "router.restored")
    assert restored["contacts"] == MAILS
    status, body = await readyz(http, port)
    assert status == 200 and "detail" not in body

    # One line per attempt, each a tenure of its own that ended, with what the operator needs.
    lines = events(d, "router.snapshot_unreadable")
    routing_tenures = [e for e in events(d, "lease.acquired") if e.get("lease") == "routing"]
    assert len(routing_tenures) == len(lines) + 1
    assert [line["attempt"] for line in lines] == list(range(1, len(lines) + 1))
    for line in lines:
        assert line["level"] == "error"
        assert (line["gen"], line["last_id"], line["reason"]) == (snap.gen, snap.last_id, fault)
        assert key in line["remedy"]
    assert d.stop() == 0


async def test_a_pointer_moved_on_while_its_old_generation_is_read_restores_the_new_one(
    tmp_path: Path,
    start_daemon: Callable[..., Any],
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    snap = await seeded(start_daemon, journal, routing)
    # A readable copy of the generation (what a compaction writes), nobody points to it yet;
    # the generation the pointer names is gone.
    moved = "c0ffee" + snap.gen[6:]
    old_key, new_key = journal.keys.snapshot_gen(snap.gen), journal.keys.snapshot_gen(moved)
    await journal.redis.copy(old_key, new_key)
    await journal.redis.sadd(journal.keys.snapshot_gens, moved)  # type: ignore[misc]
    await journal.redis.delete(old_key)

    chunks = Journal.snapshot_chunks
    switched: list[str] = []

    async def reading(self: Journal, at: Snapshot) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks(self, at):
                yield chunk
        except SnapshotGone:
            if not switched:
                # Between the failed read and the retry, the switch to the new generation.
                await self.redis.hset(self.keys.snapshot, "gen", moved)  # type: ignore[misc]
                switched.append(at.gen)
            raise

    gave_up: list[float] = []
    give_up = LeaseKeeper.give_up

    def counted(self: LeaseKeeper, hold_off: float = 0.0) -> None:
        gave_up.append(hold_off)
        give_up(self, hold_off)

    monkeypatch.setattr(Journal, "snapshot_chunks", reading)
    monkeypatch.setattr(LeaseKeeper, "give_up", counted)
    daemon = await start_daemon(routing, "b")
    assert switched == [snap.gen]
    assert gave_up == []  # the same tenure read the new pointer and routes
    assert daemon.state.restore_failed is None
    assert len(daemon.state.view.state.contacts) == MAILS
    # It went on from the new generation (a compaction may have replaced it since); the old
    # one is forgotten.
    assert daemon.router._run.chain.head.gen != snap.gen
    gens = await journal.redis.smembers(journal.keys.snapshot_gens)  # type: ignore[misc]
    assert snap.gen not in {g.decode() for g in gens}


async def test_a_pointer_that_keeps_moving_is_given_up_on_after_a_few_rereads(
    tmp_path: Path,
    start_daemon: Callable[..., Any],
    daemon_env: Callable[..., dict[str, str]],
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from router.daemon.config import load_settings
    from router.daemon.main import Daemon
    from rules.load import load_routing

    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    snap = await seeded(start_daemon, journal, routing)
    await journal.redis.delete(journal.keys.snapshot_gen(snap.gen))
    chunks = Journal.snapshot_chunks
    read: list[str] = []

    async def reading(self: Journal, at: Snapshot) -> AsyncIterator[bytes]:
        read.append(at.gen)
        try:
            async for chunk in chunks(self, at):
                yield chunk
        except SnapshotGone:
            if len(read) <= RESTORE_REREADS + 1:
                # Switched again, to another generation that is gone too.
                gen = f"gone{len(read)}"
                await self.redis.hset(self.keys.snapshot, "gen", gen)  # type: ignore[misc]
            raise

    given_up: list[str] = []
    unreadable = Router._snapshot_unreadable

    def recorded(self: Router, exc: Any, attempt: int, delay: float) -> None:
        given_up.append(exc.snap.gen)
        unreadable(self, exc, attempt, delay)

    monkeypatch.setattr(Journal, "snapshot_chunks", reading)
    monkeypatch.setattr(Router, "_snapshot_unreadable", recorded)
    env = daemon_env(routing, "b")
    daemon = Daemon(load_settings(None, env=env), load_routing(routing), handle_signals=False)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: task.done() or len(given_up) >= 2, 20, "two attempts")
        assert not task.done()
    finally:
        daemon.stopping.set()
        await asyncio.wait_for(task, 15)
    # The first attempt read the pointer 1 + RESTORE_REREADS times, each time a new one,
    # and gave up on the last it read; the next attempt found the pointer settled (on one
    # that is gone as well) and gave up at once.
    moved = [f"gone{n}" for n in range(1, RESTORE_REREADS + 1)]
    assert read[: RESTORE_REREADS + 2] == [snap.gen, *moved, f"gone{RESTORE_REREADS + 1}"]
    assert given_up[:2] == [moved[-1], f"gone{RESTORE_REREADS + 1}"]
    assert daemon.state.view is None
