"""The router task: lease -> restore snapshot -> replay the journal tail -> route live.

Only the lease holder routes. On taking the lease it restores the last snapshot and replays the
journal after it; commands of replayed entries up to the ``published`` mark were already carried
out by the previous holder and are not sent again, later ones are. It then re-publishes every
outstanding offer (agent desktops de-duplicate by ``offer_id``), so an offer made just before a
crash is never lost. Live, it reads the journal in order, applies each entry with
``now = entry.at`` (never going back in time), publishes the commands (QoS 1, PUBACKed), records
the published mark, and snapshots every ``snapshot_every`` entries or ``snapshot_interval``
seconds, after publishing, so a snapshot never covers an entry whose commands were not sent.
A snapshot is a delta cut in the loop and appended to the generation in Redis, and now and
then the chain is compacted by a process of its own (:mod:`router.daemon.snapshots`,
:mod:`router.daemon.compact`); one is written at a time.

Contacts' events live at the edge (:mod:`router.daemon.payloads`): the router stores the event
that created a contact when it applies it, puts it back into every offer before publishing,
and removes it after the next snapshot once the contact is finished.

Timers: when ``engine.next_deadline()`` is due the router appends a tick entry to the journal and
fires the timers when it reads the tick back, so a replay fires them at the same place.

An entry the engine fails on (a bug, not bad input: bad input never gets this far) is recorded in
the ``poison`` set and the dead-letter stream, and routing restarts from the snapshot without it,
so the daemon keeps routing and replays stay deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import operator
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from redis.exceptions import RedisError

from channels.contact_event import ContactEvent
from router.daemon.compact import REDIS_URL_ENV, Report
from router.daemon.http import AppState
from router.daemon.journal import (
    AdminEntry,
    AgentEntry,
    ChunksMissing,
    ContactEntry,
    Journal,
    JournalEntry,
    JournalUnavailable,
    Snapshot,
    SnapshotGone,
    SwitchUncertain,
    TickEntry,
    encode_entry,
)
from router.daemon.lease import Lease, LeaseKeeper
from router.daemon.metrics import Metrics
from router.daemon.mqtt import Message, Publisher, backoff, command_messages
from router.daemon.payloads import PayloadStore
from router.daemon.sinks import CommandSink
from router.daemon.snapshots import (
    Compaction,
    DeltaCut,
    SnapshotChain,
    SnapshotEncodeFailed,
    StateCut,
)
from router.engine import Engine
from router.events import ContactEventBase, ExpertAnswered
from router.messages import Command, EventCmd, RefusedCmd, Tick
from router.snapshot import CHUNK_BYTES, ChainSize, SnapshotError, decode_legacy
from router.state import EngineState
from rules.load import RoutingFileError, load_routing
from rules.table import RoutingTable

log = structlog.get_logger("stellwerk.router")

# An idle XREAD returns at least this often, so reloads and shutdown are never kept waiting.
MAX_BLOCK_MS = 250
# How often a restore reads the pointer again after a chunk of the snapshot went missing or
# did not decode, as long as the pointer moved meanwhile: the generation read was replaced.
# (The daemons' own switches and removals are fenced by the lease this restore holds, so the
# writer is another one: an operator putting a backup back, a tool without a lease token.)
# More than a few moves in a row means the pointer is not settling, and the restore gives up
# as for a lost snapshot; the next tenure tries again.
RESTORE_REREADS = 3
# Decision events get one canonical info line each; the rest go to debug (they are on MQTT).
_DECISIONS = frozenset(
    {
        "contact.queued",
        "contact.offered",
        "contact.rejected",
        "contact.abandoned",
        "contact.overflowed",
        "contact.escalated",
        "contact.answered_by_crowd",
        "agent.state",
        "expert.answered",
        "expert.updated",
        "expert.removed",
        "customer.linked",
    }
)
_LOG_FIELDS = (
    "contact_id",
    "channel",
    "source",
    "queue",
    "rule",
    "priority",
    "expert",
    "expert_id",
    "by_expert",
    "agent_id",
    "offer_id",
    "waited",
    "reason",
    "to",
    "state",
    "previous",
)


class _LostLease(Exception):
    """A fenced write was refused: another daemon routes now."""


class _SnapshotUnreadable(Exception):
    """The snapshot the pointer names cannot be read, and the pointer stays on it: its state
    is lost to this daemon until an operator puts it back. Routing from an empty engine would
    forget what only the snapshot holds (the journal before it is trimmed), so nobody routes."""

    def __init__(self, snap: Snapshot, reason: str, error: str) -> None:
        self.snap = snap
        #: ``missing`` (a chunk is gone) or ``damaged`` (a chunk does not decode).
        self.reason = reason
        self.error = error
        super().__init__(error)


class _Poisoned(Exception):
    """The engine raised on an entry; routing restarts without it."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__(entry_id)


@dataclass
class RouterOptions:
    """How the router loop behaves (from :class:`~router.daemon.config.RouterSettings`)."""

    topic_prefix: str
    routing_path: str
    batch: int = 512
    snapshot_every: int = 5000
    snapshot_interval: float = 10.0
    journal_retention: float = 3600.0
    #: the bound of one snapshot chunk (one Redis value).
    snapshot_chunk_bytes: int = CHUNK_BYTES
    #: cut snapshots by forking (routing goes on while they are written); False: encode them
    #: in the routing loop (it waits for the encode).
    snapshot_fork: bool = True
    #: a full snapshot after this many deltas (see router.daemon.snapshots.SnapshotChain).
    snapshot_full_every: int = 360
    #: a delta as soon as this many records changed: what bounds the stall of a delta cut.
    snapshot_delta_records: int = 2000
    #: the Redis URL the compaction process uses (:mod:`router.daemon.compact`, the daemon's
    #: own): full snapshots after the first are built there. Empty: by fork, in the router.
    compact_redis_url: str = ""
    #: a failed compaction is tried again after this many seconds.
    compact_retry: float = 30.0


@dataclass
class _Run:
    """The state of one routing session (one lease tenure)."""

    engine: Engine
    last_id: str
    now: float
    published: str
    since_snapshot: int = 0
    snapshot_at: float = field(default_factory=time.monotonic)
    tick_pending: bool = False
    poison: set[str] = field(default_factory=set)
    # The journal's ``entries-added`` count at ``last_id`` (None: not known yet): the exact
    # backlog is the journal's count now minus this.
    position: int | None = None
    # The snapshot being written (its task), and the contacts that may have finished since the
    # last one (their stored events go once a snapshot is in and they are still finished).
    snapshotting: asyncio.Task[bool] | None = None
    finished: set[str] = field(default_factory=set)
    # Which snapshot comes next, a delta or a full one; the engine tracks its changes for it.
    chain: SnapshotChain = field(default_factory=SnapshotChain)
    # The compaction process under way (its task), and when a failed one is tried again.
    compacting: asyncio.Task[tuple[Compaction, Report] | None] | None = None
    compact_after: float = 0.0


class Router:
    """Routes while this daemon holds the lease; a standby otherwise."""

    def __init__(
        self,
        options: RouterOptions,
        journal: Journal,
        lease: Lease,
        publisher: Publisher,
        table: RoutingTable,
        *,
        metrics: Metrics | None = None,
        state: AppState | None = None,
        clock: Callable[[], float] = time.time,
        sinks: Sequence[CommandSink] = (),
    ) -> None:
        self.options = options
        self.journal = journal
        self.lease = lease
        self.publisher = publisher
        self.table = table
        self.metrics = metrics
        self.state = state if state is not None else AppState()
        self._clock = clock
        self.sinks = tuple(sinks)
        self.payloads = PayloadStore(journal.redis, journal.keys.prefix, journal.keys.lease)
        self._reloads: asyncio.Queue[asyncio.Future[list[str]]] = asyncio.Queue()
        self._run: _Run | None = None
        # Whether the current tenure got as far as routing (resets the failure back-off).
        self._routed = False

    # ---- the outer loop: lease tenure -------------------------------------------------------

    async def run(self, stopping: asyncio.Event, keeper: LeaseKeeper) -> None:
        """Route during every tenure of ``keeper`` (the lease task), until ``stopping`` is set.

        The lease itself is the keeper's: this loop only follows it. When routing fails it ends
        the tenure (``keeper.give_up``): at once after a poisoned entry, after a jittered
        back-off while Redis is away. The back-off counts consecutive failures only: a tenure
        that restored and routed resets it, so a later outage starts from a short delay again.
        """
        delays = backoff()
        failures = 0
        while not stopping.is_set():
            lost = await keeper.tenure(stopping)
            if lost is None:
                break
            self._routed = False
            route = asyncio.create_task(self._route(stopping), name="router.route")
            watch = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({route, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                route.cancel()
                # Its outcome is looked at below; here it only has to be finished.
                await asyncio.gather(route, return_exceptions=True)
                self._end_tenure()
            if self._routed:
                failures = 0
            if route.cancelled():  # the tenure ended under it
                log.error("router.stopped", reason="lease_lost")
                continue
            exc = route.exception()
            if exc is None:
                break  # stopping: the final snapshot was written; the keeper releases the lease
            if isinstance(exc, _LostLease):
                log.error("router.stopped", reason="lease_taken_over")
                keeper.give_up()
            elif isinstance(exc, _Poisoned):
                keeper.give_up()
            elif isinstance(exc, _SnapshotUnreadable):
                # Lost state, not an outage: routing without it would forget queued
                # contacts. Keep running, say why (log, /readyz, metric) and look again later:
                # an operator who puts the snapshot back gets a routing daemon back.
                failures += 1
                delay = delays.compute(failures)
                self._snapshot_unreadable(exc, failures, delay)
                keeper.give_up(hold_off=delay)
            elif isinstance(exc, JournalUnavailable):
                # Redis went away: give the lease back (it may expire anyway) and start over
                # from the snapshot once it is back.
                failures += 1
                delay = delays.compute(failures)
                log.warning(
                    "router.redis_down", error=str(exc), attempt=failures, retry_in=round(delay, 3)
                )
                keeper.give_up(hold_off=delay)
            else:
                raise exc
            await lost.wait()
        self.state.reload = None

    def _snapshot_unreadable(self, exc: _SnapshotUnreadable, attempt: int, delay: float) -> None:
        snap, keys = exc.snap, self.journal.keys
        where = keys.snapshot_gen(snap.gen) if snap.gen else keys.snapshot
        log.error(
            "router.snapshot_unreadable",
            gen=snap.gen,
            chunks=snap.chunks,
            last_id=snap.last_id,
            reason=exc.reason,
            error=exc.error,
            attempt=attempt,
            retry_in=round(delay, 3),
            remedy=(
                f"not routing: put {where} back from a backup of Redis (this daemon retries "
                f"and restores it by itself), or delete {keys.snapshot} to route from what "
                "the journal still holds, forgetting the rest"
            ),
        )
        self.state.restore_failed = (
            f"the snapshot in Redis cannot be restored ({exc.reason}: {exc.error}; the "
            f"pointer's last_id {snap.last_id}): not routing; attempt {attempt}, the next "
            f"in {round(delay, 1)} s; put {where} back from a backup"
        )
        if self.metrics is not None:
            self.metrics.observe_snapshot_unreadable(exc.reason)

    def _end_tenure(self) -> None:
        if self._run is not None and self._run.snapshotting is not None:
            self._run.snapshotting.cancel()
        if self._run is not None and self._run.compacting is not None:
            self._run.compacting.cancel()  # its process is killed
        self.state.view = None
        self.state.reload = None
        self.state.journal_lag = None
        self._run = None
        # A reload asked for during this tenure must not wait for the next one.
        while not self._reloads.empty():
            fut = self._reloads.get_nowait()
            if not fut.done():
                fut.set_result(["not applied: this daemon stopped routing"])

    # ---- one tenure -----------------------------------------------------------------------------

    async def _route(self, stopping: asyncio.Event) -> None:
        run = await self._restore()
        self._run = run
        self.state.view = run.engine
        self.state.reload = self.reload
        self.state.restore_failed = None
        self._routed = True
        log.info("router.routing", last_id=run.last_id)
        last_refresh = 0.0
        orphans = asyncio.create_task(self._find_orphans(run), name="router.payload_orphans")
        try:
            while not stopping.is_set():
                await self._serve_reloads(run)
                block = self._block_ms(run)
                rows = await self.journal.read_after(run.last_id, block, self.options.batch)
                if rows:
                    await self._apply_batch(run, rows, live=True)
                await self._maybe_tick(run)
                await self._maybe_snapshot(run)
                if time.monotonic() - last_refresh >= 1.0:
                    last_refresh = time.monotonic()
                    await self._refresh_metrics(run)
            # Graceful hand-over: everything in the journal is applied, published and
            # snapshotted.
            while rows := await self.journal.read_after(run.last_id, None, self.options.batch):
                await self._apply_batch(run, rows, live=True)
            await self._snapshot(run)
        finally:
            orphans.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await orphans
        log.info("router.handed_over", last_id=run.last_id)

    async def _restore(self) -> _Run:
        # Restoring builds millions of objects that all live on: collections meanwhile would
        # walk them again and again (minutes for a million waiting mails). One pass at the end.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return await self._restore_state()
        finally:
            if enabled:
                gc.enable()

    async def _read_snapshot(
        self,
    ) -> tuple[Snapshot | None, EngineState, dict[str, ContactEvent], ChainSize]:
        """The pointer and the state it names (with the events of a snapshot of the earlier
        format, which go to the edge, and the chain's size); an empty state without a pointer.

        A chunk gone or damaged while the pointer moved on is a newer snapshot replacing the
        one read: read the new one (at most RESTORE_REREADS times). Still the same pointer:
        raises _SnapshotUnreadable."""
        snap = await self.journal.load_snapshot()
        rereads = 0
        while snap is not None:
            try:
                if snap.data is not None:
                    state, events = decode_legacy(snap.data)
                    return snap, state, events, ChainSize()
                state, size = await self.journal.snapshot_chain(snap)
                return snap, state, {}, size
            except SnapshotGone as exc:
                reason, error = "missing", str(exc)
            except SnapshotError as exc:
                reason, error = "damaged", str(exc)
            if rereads == RESTORE_REREADS:
                raise _SnapshotUnreadable(snap, reason, error)
            again = await self.journal.load_snapshot()
            if again == snap:
                raise _SnapshotUnreadable(snap, reason, error)
            rereads += 1
            log.info(
                "router.restore_reread",
                gen=snap.gen,
                new_gen=again.gen if again is not None else None,
                reason=reason,
                error=error,
            )
            snap = again
        return None, EngineState(), {}, ChainSize()

    async def _restore_state(self) -> _Run:
        snap, state, events, size = await self._read_snapshot()
        if events and not await self.payloads.write(events, lease_token=self.lease.token):
            # A snapshot of the earlier format: its contacts' events go to the edge now.
            raise _LostLease()
        if snap is not None:
            # Building the indexes of a large state takes seconds of pure Python: in a thread,
            # so the loop keeps renewing the lease meanwhile (nothing else uses the engine yet).
            engine = await asyncio.to_thread(Engine, self.table, state)
            run = _Run(engine=engine, last_id=snap.last_id, now=snap.now, published="0-0")
        else:
            engine = Engine(self.table)
            run = _Run(engine=engine, last_id="0-0", now=0.0, published="0-0")
        run.chain.full_every = self.options.snapshot_full_every
        if snap is not None and snap.data is None:
            # The first snapshot of the tenure is a delta appended to this generation; what a
            # crash left half-written beside it goes now, not at the next compaction.
            run.chain.restored(snap, size)
            await self.journal.drop_generations_except(snap.gen, lease_token=self.lease.token)
        run.engine.track_changes()
        run.published = await self.journal.published()
        run.poison = await self.journal.poisoned()
        replayed = 0
        while rows := await self.journal.read_after(run.last_id, None, self.options.batch):
            replayed += len(rows)
            await self._apply_batch(run, rows, live=False)
        run.position = await self.journal.position(run.last_id)
        offers = await self.payloads.fill(run.engine.outstanding_offers())
        if offers:
            await self.publisher.publish_many(
                [m for cmd in offers for m in command_messages(cmd, self.options.topic_prefix)]
            )
        for sink in self.sinks:
            await sink.restored(engine)
        # The routing table and the restored state live as long as the tenure: move them out of
        # the collector's way, so full collections over them do not pause routing for 100+ ms.
        # (No collection first: over a million records it would hold the loop for seconds.)
        gc.freeze()
        # Written while routing starts: a restart before it is in restores the same snapshot
        # and replays the same tail again.
        self._start_snapshot(run)
        log.info(
            "router.restored",
            snapshot=snap.last_id if snap else None,
            replayed=replayed,
            offers_republished=len(offers),
            contacts=len(run.engine.state.contacts),
        )
        return run

    def _block_ms(self, run: _Run) -> int:
        deadline = run.engine.next_deadline()
        if deadline is None or run.tick_pending:
            return MAX_BLOCK_MS
        wait = deadline - self._clock()
        return max(1, min(MAX_BLOCK_MS, int(wait * 1000) + 1))

    async def _apply_batch(
        self, run: _Run, rows: list[tuple[str, JournalEntry | None]], *, live: bool
    ) -> None:
        poison = run.poison
        if run.position is not None:
            run.position += len(rows)
        sending: list[Command] = []
        # The events of contacts created in this batch, stored before anything goes out.
        created: dict[str, ContactEvent] = {}
        for entry_id, entry in rows:
            if entry is None or entry_id in poison:
                log.error("journal.entry_skipped", id=entry_id, poisoned=entry_id in poison)
                run.last_id = entry_id
                continue
            if isinstance(entry, TickEntry):
                run.tick_pending = False
            run.now = max(run.now, entry.at)
            contacts = run.engine.state.contacts
            before = (
                contacts.get(entry.event.contact_id) if isinstance(entry, ContactEntry) else None
            )
            started = time.perf_counter()
            try:
                cmds = run.engine.handle(_engine_input(entry), run.now)
            except Exception as exc:
                await self._poison(run, entry_id, entry, exc, sending, created)
                raise _Poisoned(entry_id) from exc
            if self.metrics is not None:
                self.metrics.observe_decision(time.perf_counter() - started)
            if isinstance(entry, ContactEntry):
                rec = contacts.get(entry.event.contact_id)
                if rec is not None and rec is not before:
                    created[rec.id] = entry.event
            for cmd in cmds:
                if isinstance(cmd, EventCmd) and isinstance(
                    cmd.event, ContactEventBase | ExpertAnswered
                ):
                    run.finished.add(cmd.event.contact_id)
            run.last_id = entry_id
            run.since_snapshot += 1
            if _id_after(entry_id, run.published):
                if self.metrics is not None:
                    self.metrics.observe_commands(cmds)
                sending.extend(cmds)
        await self._send(run, sending, created, live=live)
        if _id_after(run.last_id, run.published):
            if not await self.journal.set_published(run.last_id, lease_token=self.lease.token):
                raise _LostLease()
            run.published = run.last_id

    async def _send(
        self, run: _Run, cmds: list[Command], created: dict[str, ContactEvent], *, live: bool
    ) -> None:
        """Store the new contacts' events, then publish ``cmds`` (offers with their events)
        and hand them to the sinks."""
        contacts = run.engine.state.contacts
        keep = {cid: event for cid, event in created.items() if cid in contacts}
        if keep and not await self.payloads.write(keep, lease_token=self.lease.token):
            raise _LostLease()
        if not cmds:
            return
        cmds = await self.payloads.fill(cmds, created)
        prefix = self.options.topic_prefix
        out: list[Message] = []
        _log_commands(cmds)
        for cmd in cmds:
            out.extend(command_messages(cmd, prefix))
        if out:
            if live and not self.lease.held:
                raise _LostLease()
            await self.publisher.publish_many(out)
        for sink in self.sinks:
            await sink.submit(cmds)

    async def _poison(
        self,
        run: _Run,
        entry_id: str,
        entry: JournalEntry,
        exc: Exception,
        sending: list[Command],
        created: dict[str, ContactEvent],
    ) -> None:
        log.exception("router.engine_failed", id=entry_id, entry_type=type(entry).__name__)
        # What the entries before it decided still goes out, and is marked as sent.
        await self._send(run, sending, created, live=False)
        if _id_after(run.last_id, run.published):
            await self.journal.set_published(run.last_id, lease_token=self.lease.token)
        await self.journal.add_poisoned(entry_id)
        await self.journal.dead_letter(
            "journal", "engine_error", f"{type(exc).__name__}: {exc}", encode_entry(entry), {}
        )

    async def _maybe_tick(self, run: _Run) -> None:
        deadline = run.engine.next_deadline()
        if deadline is None or run.tick_pending:
            return
        now = self._clock()
        if now >= deadline:
            await self.journal.append(TickEntry(at=max(now, run.now)))
            run.tick_pending = True

    async def _maybe_snapshot(self, run: _Run) -> None:
        if self.options.compact_redis_url:
            self._maybe_compact(run)
        task = run.snapshotting
        if task is not None:
            if not task.done():
                if (
                    run.chain.writing_full
                    and run.engine.changed() >= self.options.snapshot_delta_records
                ):
                    # Deltas go on while a full snapshot is written; they follow it (up to
                    # the chain's bound: then the changes wait in the engine).
                    pending = run.chain.cut_pending(
                        run.engine, run.last_id, run.now, self.options.snapshot_chunk_bytes
                    )
                    if pending is not None:
                        run.since_snapshot = 0
                        run.snapshot_at = time.monotonic()
                return
            run.snapshotting = None
            # A lost lease or Redis away ends the tenure here.
            if task.result():
                await self._after_snapshot(run)
        if run.since_snapshot == 0:
            return
        due = (
            run.since_snapshot >= self.options.snapshot_every
            or time.monotonic() - run.snapshot_at >= self.options.snapshot_interval
            or run.engine.changed() >= self.options.snapshot_delta_records
        )
        if due:
            self._start_snapshot(run)

    def _start_snapshot(self, run: _Run) -> None:
        """Cut a snapshot now (a delta, or a full one by fork) and write it in the background;
        one at a time."""
        if run.snapshotting is not None:
            return
        try:
            cut = run.chain.cut(
                run.engine,
                fork=self.options.snapshot_fork,
                limit=self.options.snapshot_chunk_bytes,
                compact=bool(self.options.compact_redis_url),
            )
        except OSError as exc:  # fork refused (memory, process limit): try again when due
            log.error("router.snapshot_failed", error=str(exc))
            run.snapshot_at = time.monotonic()
            return
        run.since_snapshot = 0
        run.snapshot_at = time.monotonic()
        run.snapshotting = asyncio.create_task(
            self._write_snapshot(cut, run.chain, run.last_id, run.now), name="router.snapshot"
        )

    async def _write_snapshot(
        self, cut: StateCut | DeltaCut, chain: SnapshotChain, last_id: str, now: float
    ) -> bool:
        """Write ``cut`` (and the deltas cut meanwhile); whether it got in."""
        started = time.perf_counter()
        chunks = cut.chunks()
        try:
            ok = await self.journal.save_snapshot(
                chunks, last_id, now=now, lease_token=self.lease.token, append_to=cut.append_to
            )
        except SnapshotEncodeFailed as exc:
            # The child died (killed, out of memory): the previous snapshot stays, the journal
            # after it is kept, and the next one (a full one) is tried when due.
            chain.failed(cut)
            log.error("router.snapshot_failed", error=str(exc), last_id=last_id)
            return False
        except JournalUnavailable as exc:
            if cut.full or isinstance(exc, SwitchUncertain):
                # A full one, or a delta whose switch may have happened (its answer lost): the
                # next delta, appended at the head the chain knows, would remove chunks the
                # pointer may count. The tenure ends; the next restores the pointer as it is.
                chain.failed(cut)
                raise
            # A delta that did not get in (a timeout, say): its changes go to the next one.
            # Should Redis be away, reading the journal ends the tenure anyway.
            chain.failed(cut)
            if isinstance(exc, ChunksMissing):
                # Its generation is gone (removed, evicted): every later delta would be
                # refused the same way, and the journal never trimmed. A full one next.
                chain.failed()
            log.error("router.snapshot_failed", error=str(exc), last_id=last_id)
            return False
        except BaseException:
            chain.failed(cut)
            raise
        finally:
            await chunks.aclose()
            await cut.close()
        if not ok or self.journal.saved is None:
            chain.failed()
            raise _LostLease()
        chain.written(cut, self.journal.saved)
        while chain.pending:
            # The deltas cut while this full snapshot was written, after it in order.
            delta, last_id, now = chain.pending.pop(0)
            delta.append_to = chain.head
            try:
                ok = await self.journal.save_snapshot(
                    delta.chunks(),
                    last_id,
                    now=now,
                    lease_token=self.lease.token,
                    append_to=delta.append_to,
                )
            except BaseException:
                chain.failed(delta)
                raise
            if not ok or self.journal.saved is None:
                chain.failed(delta)
                raise _LostLease()
            chain.written(delta, self.journal.saved)
        if last_id != "0-0":
            await self.journal.trim(last_id, self.options.journal_retention)
        log.debug(
            "router.snapshot",
            last_id=last_id,
            size=cut.bytes,
            seconds=round(time.perf_counter() - started, 3),
            delta=cut.append_to is not None,
            stall_ms=round(cut.stall_s * 1000, 2),
            fork_ms=round(cut.fork_s * 1000, 2),
        )
        return True

    def _maybe_compact(self, run: _Run) -> None:
        """Start a compaction when the chain is due for a full snapshot; when one is done
        and no snapshot is being written, switch to its generation (in the snapshot task)."""
        chain, task = run.chain, run.compacting
        if task is None:
            if (
                chain.head is not None
                and chain.head.gen
                and chain.full_due()
                and time.monotonic() >= run.compact_after
            ):
                run.compacting = asyncio.create_task(
                    self._compact(chain, chain.compaction()), name="router.compact"
                )
            return
        if not task.done() or run.snapshotting is not None:
            return
        run.compacting = None
        outcome = task.result()
        if outcome is None:
            run.compact_after = time.monotonic() + self.options.compact_retry
            return
        compaction, report = outcome
        if chain.head is None or chain.head.gen != compaction.head.gen:
            return  # the chain started again meanwhile; the generation goes at the next switch
        run.snapshotting = asyncio.create_task(
            self._switch_compacted(chain, compaction, report), name="router.snapshot"
        )

    async def _compact(
        self, chain: SnapshotChain, compaction: Compaction
    ) -> tuple[Compaction, Report] | None:
        """Run :mod:`router.daemon.compact` on ``compaction.head`` and read its report; None
        if it failed (the chain goes on, the snapshot is the one it had). Cancelled, the
        process is killed."""
        outcome = await self._run_compaction(compaction)
        head = chain.head
        if outcome is None and head is not None and head.gen == compaction.head.gen:
            # What it wrote (up to a whole state) goes at once, not at the next switch.
            with contextlib.suppress(JournalUnavailable):
                await self.journal.drop_generations_except(head.gen, lease_token=self.lease.token)
        return outcome

    async def _run_compaction(self, compaction: Compaction) -> tuple[Compaction, Report] | None:
        head = compaction.head
        started = time.perf_counter()
        env = dict(os.environ)
        env[REDIS_URL_ENV] = self.options.compact_redis_url
        try:
            proc = await self._spawn_compaction(head, env)
        except OSError as exc:  # no memory, too many processes
            log.error("router.compaction_failed", error=str(exc))
            return None
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return self._compaction_report(compaction, proc.returncode, out, err, started)

    async def _spawn_compaction(
        self, head: Snapshot, env: dict[str, str]
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router.daemon.compact",
            "--prefix",
            self.journal.keys.prefix,
            "--gen",
            head.gen,
            "--chunks",
            str(head.chunks),
            "--chunk-bytes",
            str(self.options.snapshot_chunk_bytes),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )

    def _compaction_report(
        self,
        compaction: Compaction,
        code: int | None,
        out: bytes,
        err: bytes,
        started: float,
    ) -> tuple[Compaction, Report] | None:
        head = compaction.head
        try:
            report = msgspec.json.decode(out.strip().splitlines()[-1], type=Report)
        except (IndexError, msgspec.DecodeError, msgspec.ValidationError):
            report = None
        if code != 0 or report is None or report.covers != head.chunks:
            log.error(
                "router.compaction_failed",
                code=code,
                error=err.decode(errors="replace").strip()[-500:],
            )
            return None
        log.info(
            "router.compacted",
            gen=report.gen,
            chunks=report.chunks,
            size=report.bytes,
            deltas=report.deltas,
            seconds=round(time.perf_counter() - started, 3),
            cpu_s=report.cpu_s,
            max_rss_mib=report.max_rss_mib,
        )
        return compaction, report

    async def _switch_compacted(
        self, chain: SnapshotChain, compaction: Compaction, report: Report
    ) -> bool:
        """Carry the deltas written since the compaction started over into its generation
        and switch the pointer to it. Covers nothing new: False (see _maybe_snapshot)."""
        head = chain.head
        assert head is not None
        started = time.perf_counter()
        try:
            ok = await self.journal.switch_compacted(
                report.gen, report.chunks, report.covers, head, lease_token=self.lease.token
            )
        except ChunksMissing as exc:
            # A generation it copies from or switches to is gone: ending the tenure would
            # restore a pointer to it and fail. The chain starts again with a full snapshot.
            chain.failed()
            log.error("router.snapshot_failed", error=str(exc), last_id=head.last_id)
            return False
        if not ok or self.journal.saved is None:
            raise _LostLease()
        chain.compacted(compaction, self.journal.saved, report.bytes)
        log.info(
            "router.compaction_switched",
            gen=report.gen,
            carried=head.chunks - report.covers,
            seconds=round(time.perf_counter() - started, 3),
        )
        return False

    async def _snapshot(self, run: _Run) -> None:
        """Write a snapshot of the state now and wait until it is in (and the one before)."""
        for start in (False, True):
            if start:
                self._start_snapshot(run)
            task, run.snapshotting = run.snapshotting, None
            if task is not None and await task:
                await self._after_snapshot(run)

    async def _after_snapshot(self, run: _Run) -> None:
        """A snapshot is in: the stored events of contacts finished by now can go (a restart
        restores that snapshot or a later one, in which they are finished; what came after it
        was published, so a replay re-sends none of their offers)."""
        contacts = run.engine.state.contacts
        gone = [cid for cid in run.finished if cid not in contacts]
        run.finished = set()
        if gone and not await self.payloads.write({}, gone, lease_token=self.lease.token):
            raise _LostLease()

    async def _find_orphans(self, run: _Run) -> None:
        """Once per tenure, look through the stored events for contacts the engine no longer
        handles (their removal was lost with an earlier tenure); the next snapshot removes
        them. Reads only, in small steps, beside routing."""
        cursor = 0
        while True:
            try:
                cursor, fields = await self.journal.redis.hscan(
                    self.payloads.key, cursor, count=1000
                )
            except (RedisError, OSError):
                return  # Redis away: the routing loop notices; the next tenure looks again
            contacts = run.engine.state.contacts
            for raw in fields:
                cid = raw.decode()
                if cid not in contacts:
                    run.finished.add(cid)
            if not cursor:
                return

    async def _refresh_metrics(self, run: _Run) -> None:
        if self.metrics is None:
            return
        self.metrics.refresh(run.engine, self._clock())
        if run.position is None:
            run.position = await self.journal.position(run.last_id)
        # Exact and O(1) once the position is known; the age is that of the oldest entry
        # not yet applied. (Counting the backlog entry by entry would cost most exactly when
        # the router is behind.)
        _, age = await self.journal.lag(run.last_id, cap=1)
        entries = 0
        if run.position is not None:
            entries = max(0, await self.journal.added() - run.position)
        else:
            entries, _ = await self.journal.lag(run.last_id, cap=1000)
        self.metrics.set_journal_lag(entries, age)
        self.state.journal_lag = (entries, age)

    # ---- reloads ------------------------------------------------------------------------------

    async def reload(self) -> list[str]:
        """Reload the routing file; its problems (then the running rules stay), or [] when the
        new rules are in force. Applied by the routing loop between batches."""
        if self._run is None:
            return self._load_table()
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        await self._reloads.put(fut)
        return await fut

    def _load_table(self) -> list[str]:
        """Load and validate the file; on success it becomes the table for the next tenure."""
        try:
            table = load_routing(self.options.routing_path)
        except RoutingFileError as exc:
            problems = [str(p) for p in exc.problems]
            log.error("rules.reload_refused", path=self.options.routing_path, problems=problems)
            if self.metrics is not None:
                self.metrics.observe_reload(False)
            return problems
        self.table = table
        if self.metrics is not None:
            self.metrics.prime(table)
            self.metrics.observe_reload(True)
        log.info("rules.reloaded", path=self.options.routing_path)
        return []

    async def _serve_reloads(self, run: _Run) -> None:
        while not self._reloads.empty():
            fut = self._reloads.get_nowait()
            try:
                problems = self._load_table()
                if not problems:
                    events = await self.payloads.events(run.engine.rerouted_by(self.table))
                    cmds = run.engine.reload(self.table, max(run.now, self._clock()), events)
                    if self.metrics is not None:
                        self.metrics.observe_commands(cmds)
                    cmds = await self.payloads.fill(cmds)
                    msgs = [m for c in cmds for m in command_messages(c, self.options.topic_prefix)]
                    if msgs:
                        await self.publisher.publish_many(msgs)
                    for sink in self.sinks:
                        await sink.submit(cmds)
                    # A replay must not apply earlier entries under the new rules: snapshot now.
                    await self._snapshot(run)
            except BaseException as exc:
                if not fut.done():
                    fut.set_exception(exc)
                raise
            if not fut.done():
                fut.set_result(problems)


def _engine_input(entry: JournalEntry) -> Any:
    if isinstance(entry, ContactEntry):
        return entry.event
    if isinstance(entry, AgentEntry | AdminEntry):
        return entry.cmd
    return Tick()


def _id_after(a: str, b: str) -> bool:
    """Whether stream id ``a`` is after ``b``."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) > (int(bms), int(bseq or 0))


def _log_commands(cmds: Sequence[Command]) -> None:
    """One canonical line per decision event (info), the other events at debug, refusals as
    warnings."""
    # Resolved once a batch instead of through the module's lazy proxy on every line (it still
    # follows a reconfiguration, between batches); debug lines are not even built when the
    # level filters them out.
    logger = log.bind()
    enabled = getattr(logger, "is_enabled_for", None)
    debug = enabled is None or bool(enabled(logging.DEBUG))
    for cmd in cmds:
        if isinstance(cmd, EventCmd):
            event = cmd.event
            shape = _LOG_SHAPES.get(type(event))
            if shape is None:
                shape = _LOG_SHAPES[type(event)] = _log_shape(type(event))
            name, fields, values, decision = shape
            if decision:
                logger.info(name, **dict(zip(fields, values(event), strict=True)))
            elif debug:
                logger.debug(name, **dict(zip(fields, values(event), strict=True)))
        elif isinstance(cmd, RefusedCmd):
            if cmd.agent_id is None:
                log.warning("admin.refused", reason=cmd.reason, detail=cmd.detail)
            else:
                log.warning(
                    "agent.refused", agent_id=cmd.agent_id, reason=cmd.reason, detail=cmd.detail
                )


_LogShape = tuple[str, tuple[str, ...], Callable[[Any], tuple[Any, ...]], bool]
# Per event class: its name, which of _LOG_FIELDS it has (events differ in which they carry), a
# getter of their values, and whether it is a decision (an info line). Found once per class
# instead of sixteen hasattr and a getattr per field on every event.
_LOG_SHAPES: dict[type, _LogShape] = {}


def _log_shape(cls: type) -> _LogShape:
    name = str(cls.__struct_config__.tag)  # type: ignore[attr-defined]
    fields = tuple(k for k in _LOG_FIELDS if hasattr(cls, k))
    getter = operator.attrgetter(*fields) if fields else (lambda _: ())
    # attrgetter of one name gives the value itself, not a 1-tuple.
    values = (lambda e: (getter(e),)) if len(fields) == 1 else getter
    return name, fields, values, name in _DECISIONS
