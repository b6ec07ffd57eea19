"""Taking a snapshot without stopping the router: deltas in the loop, the whole state now and
then from a process of its own (compaction), and a forked child only for the very first one.

**Deltas.** Most snapshots are incremental (:class:`SnapshotChain` decides): the engine marks
the records it changes, and a delta cut takes those marks and encodes just those records
(:func:`router.snapshot.encode_changes`) in the router's loop, at once. The stall is the size
of what changed since the last snapshot, not of the state: about a millisecond for a few
thousand changed records, whether a hundred or a million contacts wait. The delta's chunks
are appended to the generation in Redis and the pointer is switched to count them
(:meth:`~router.daemon.journal.Journal.save_snapshot` with ``append_to``), so a crash in the
middle leaves the snapshot as it was before the delta. A restore decodes the whole state and
the deltas after it in order.

**The chain goes on.** A tenure starts with the chain of the generation it restored
(:meth:`SnapshotChain.restored`): its first snapshot is a delta appended to it, not a new
full one. A delta that does not get in (a timeout, Redis away for a moment) puts the changes
it took back into the engine (:meth:`~router.engine.Engine.put_back_changes`, merged in front
of those marked since, see :meth:`router.state.Changes.put_back`): the next delta carries
them, appended at the same place (the chunks the failed one left past the pointer are
replaced). A delta whose switch went unanswered (``SwitchUncertain``) may be in, so it ends
the tenure instead. Chunks of an append are written only while the router holds the lease, like the
switch, so a router that lost it cannot overwrite a chunk the new holder's pointer counts.

**Compaction.** Every ``full_every`` deltas, or when the deltas add up to half the size of the
state, the chain is due for a whole state again, so a restore does not decode a long tail of
deltas. The router (with ``compact_redis_url``) starts ``python -m router.daemon.compact``, a
separate process (spawned, not forked: the router's memory is not copied or shared), which
reads the generation's chunks up to the head it was given from Redis, builds the state with
the restore's own builder and writes it as a new generation nobody points to yet. Deltas go
on meanwhile, on the old generation. When the process reports, the router (as its next
snapshot write) copies the chunks written after the point the compaction covers into the new
generation and switches the pointer in one fenced call
(:meth:`~router.daemon.journal.Journal.switch_compacted`); the old generations go then. The
router's part is copying a few delta chunks; nothing the size of the state runs in it. A
compaction that fails or is killed leaves a generation nobody points to (removed after the
next switch); the chain goes on and the compaction is tried again later.

**The fork** remains for a full snapshot when there is no generation to append to at all: the
first snapshot of a fresh installation (or after a snapshot of the earlier, unchunked format),
and every full one when compaction is off. The engine changes its records in place, so such a
snapshot must be cut at one instant while routing goes on; ``fork()`` gives exactly that: the
child has a copy-on-write image of the state as it was at the fork and encodes it
(:func:`router.snapshot.encode_state`) into a pipe, chunk by chunk; the router reads the
chunks as they come and writes them to Redis, and in the meantime goes on routing. The
router's stall is the ``fork()`` itself (the kernel copies the page tables, so it grows with
the resident memory: 7-20 ms at 50-90 MB, 58-155 ms at 1 GB on the development VM) plus
reading each chunk. The same idea as Redis's own ``BGSAVE``. Deltas cut while it is written
wait in :attr:`SnapshotChain.pending` and follow it, up to :data:`MAX_PENDING_BYTES`
(:meth:`SnapshotChain.cut_pending`).

The child touches nothing but the state and its end of the pipe and leaves with ``os._exit``
(no atexit handlers, no buffered output of the parent flushed twice, no sockets closed). Where
``fork`` is missing, or with ``fork=False``, the chunks are encoded at once in the caller
(routing waits for the encode) and written afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import time
from collections.abc import AsyncGenerator

from router.daemon.journal import Snapshot
from router.engine import Engine
from router.snapshot import CHUNK_BYTES, ChainSize, encode_changes, encode_state
from router.state import Changes, EngineState

_LEN = 4  # bytes of the length prefix of each chunk in the pipe
#: how many bytes of encoded deltas may wait for a full snapshot being written
#: (:meth:`SnapshotChain.cut_pending`); beyond it the changes stay marked in the engine.
MAX_PENDING_BYTES = 64 * 1024 * 1024
_PR_SET_PDEATHSIG = 1  # prctl(2), Linux


class SnapshotEncodeFailed(Exception):
    """The child encoding the snapshot died or reported an error."""


class StateCut:
    """The chunks of one snapshot, from a forked child (or encoded at once without fork).

    Create it at the instant to cut (it forks in the constructor), then iterate
    :meth:`chunks` once; :meth:`close` kills a child that is still running. ``fork_s`` is how
    long the fork took (the router's stall), ``bytes`` how much was read so far.
    """

    #: a full snapshot: a new generation (see DeltaCut).
    append_to: Snapshot | None = None
    full = True

    def __init__(self, state: EngineState, *, fork: bool = True, limit: int = CHUNK_BYTES) -> None:
        self.bytes = 0
        self.fork_s = 0.0
        #: how long the cut held the router (the fork, or the whole encode without fork).
        self.stall_s = 0.0
        self._pid: int | None = None
        self._rfd: int | None = None
        self._inline: list[bytes] | None = None
        if not (fork and hasattr(os, "fork")):
            started = time.perf_counter()
            self._inline = list(encode_state(state, limit))
            self.stall_s = time.perf_counter() - started
            return
        rfd, wfd = os.pipe()
        started = time.perf_counter()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:  # no memory for the page tables, or too many processes
            os.close(rfd)
            os.close(wfd)
            raise
        if pid == 0:  # the child: encode, write, leave
            _encode_in_child(state, limit, rfd, wfd, parent)
        self.fork_s = self.stall_s = time.perf_counter() - started
        os.close(wfd)
        self._pid, self._rfd = pid, rfd

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The chunks in order; raises SnapshotEncodeFailed if the child did not finish."""
        if self._inline is not None:
            for chunk in self._inline:
                self.bytes += len(chunk)
                yield chunk
            return
        assert self._rfd is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        pipe = os.fdopen(self._rfd, "rb", buffering=0)
        self._rfd = None
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while True:
                head = await reader.read(_LEN)
                if not head:
                    break
                if len(head) < _LEN:
                    head += await reader.readexactly(_LEN - len(head))
                size = int.from_bytes(head, "big")
                if size == 0:  # the child's end mark: everything was written
                    await self._reap(expect_ok=True)
                    return
                chunk = await reader.readexactly(size)
                self.bytes += size
                yield chunk
            await self._reap(expect_ok=True)
            raise SnapshotEncodeFailed("the snapshot child ended without its end mark")
        except asyncio.IncompleteReadError as exc:
            await self._reap(expect_ok=False)
            raise SnapshotEncodeFailed("the snapshot child ended in the middle of a chunk") from exc
        finally:
            transport.close()

    async def _reap(self, *, expect_ok: bool) -> None:
        pid, self._pid = self._pid, None
        if pid is None:
            return
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if expect_ok and code != 0:
            raise SnapshotEncodeFailed(f"the snapshot child exited with {code}")

    async def close(self) -> None:
        """Stop a child that is still running (the snapshot was abandoned) and reap it."""
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            await self._reap(expect_ok=False)


def _encode_in_child(state: EngineState, limit: int, rfd: int, wfd: int, parent: int) -> None:
    """The forked child's whole life: it never returns."""
    code = 1
    try:
        # Signals are the parent's business: a Ctrl-C or SIGTERM to the process group must not
        # run the parent's handlers in here (asyncio's would write to the parent's wake-up fd).
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        # Die with the parent: a child left over would hold its listening sockets open.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)  # the parent is already gone
        # A collection would touch every object, and so copy every page of the parent.
        gc.disable()
        os.close(rfd)
        with os.fdopen(wfd, "wb", buffering=1 << 20) as out:
            for chunk in encode_state(state, limit):
                out.write(len(chunk).to_bytes(_LEN, "big"))
                out.write(chunk)
            out.write(bytes(_LEN))
        code = 0
    finally:
        os._exit(code)


class DeltaCut:
    """A delta snapshot: the records changed since the last cut, encoded at once.

    ``stall_s`` is the encode (the router waits for it); the chunks go after those of
    ``append_to``, the snapshot the router wrote last (set when it is written, for a delta cut
    while a full snapshot is still being written).
    """

    fork_s = 0.0
    full = False

    def __init__(
        self,
        state: EngineState,
        changes: Changes,
        append_to: Snapshot | None,
        limit: int = CHUNK_BYTES,
        engine: Engine | None = None,
    ) -> None:
        started = time.perf_counter()
        self._chunks = encode_changes(state, changes, limit)
        self.stall_s = time.perf_counter() - started
        #: the encoded bytes it holds until written.
        self.size = sum(len(chunk) for chunk in self._chunks)
        self.append_to: Snapshot | None = append_to
        self.records = len(changes)
        self.bytes = 0
        #: what the cut took, and from which engine: marked again should the write fail.
        self.changes = changes
        self.engine = engine

    def put_back(self) -> None:
        """The delta was not written: its changes go back to the engine for the next one."""
        if self.engine is not None:
            self.engine.put_back_changes(self.changes)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The delta's chunks in order."""
        for chunk in self._chunks:
            self.bytes += len(chunk)
            yield chunk

    async def close(self) -> None:
        """Nothing to stop (no child)."""


class Compaction:
    """A compaction under way: the head it compacts, and the chain's count of deltas and
    their bytes then (those after it are carried over into the new generation)."""

    def __init__(self, head: Snapshot, deltas: int, delta_bytes: int) -> None:
        self.head = head
        self.deltas = deltas
        self.delta_bytes = delta_bytes


class SnapshotChain:
    """One tenure's snapshots: which to cut next, a delta or a full one (module docstring).

    The engine must track its changes (:meth:`~router.engine.Engine.track_changes`) from the
    state the chain starts at; call :meth:`written` when a snapshot is in and :meth:`failed`
    when one was not written (the next is then a full one).
    """

    def __init__(
        self,
        *,
        full_every: int = 360,
        max_delta_share: float = 0.5,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.full_every = full_every
        self.max_delta_share = max_delta_share
        self.max_pending_bytes = max_pending_bytes
        #: the pointer of the last snapshot written, which a delta is appended to.
        self.head: Snapshot | None = None
        #: a full snapshot is being written (deltas cut meanwhile wait in ``pending``).
        self.writing_full = False
        #: deltas cut while a full snapshot was written, with the entry id and engine time
        #: each covers; written after it, in order.
        self.pending: list[tuple[DeltaCut, str, float]] = []
        self.deltas = 0
        self.delta_bytes = 0
        self.base_bytes = 0

    def full_due(self) -> bool:
        """Is the next snapshot a full one?"""
        return (
            self.head is None
            or self.deltas >= self.full_every
            or self.delta_bytes > self.base_bytes * self.max_delta_share
        )

    def cut(
        self, engine: Engine, *, fork: bool = True, limit: int = CHUNK_BYTES, compact: bool = False
    ) -> StateCut | DeltaCut:
        """Cut the next snapshot of ``engine`` now (a fork for a full one, OSError if refused).

        With ``compact`` a full one is cut only when there is no head to append to: the
        chain is compacted by :mod:`router.daemon.compact` instead (:meth:`compacted`)."""
        # Taken at the instant of the cut, either way: a full snapshot holds them.
        changes = engine.take_changes()
        if self.head is None or (not compact and self.full_due()):
            try:
                cut = StateCut(engine.state, fork=fork, limit=limit)
            except OSError:
                self.failed()
                raise
            self.writing_full = True
            return cut
        return DeltaCut(engine.state, changes, self.head, limit, engine)

    def pending_bytes(self) -> int:
        """The encoded bytes of the deltas waiting in :attr:`pending`."""
        return sum(cut.size for cut, _, _ in self.pending)

    def cut_pending(self, engine: Engine, last_id: str, now: float, limit: int) -> DeltaCut | None:
        """While a full snapshot is written: cut a delta now, to be written after it (so the
        changes meanwhile never make one large delta, and a large stall, at the end).

        None once the waiting deltas hold ``max_pending_bytes``: how long a full write takes
        is up to Redis (and the fork's child), so without a bound they would grow with it
        (each carries the small tables whole, too). Nothing is lost at the bound: the changes
        stay marked in the engine (one mark per record, however often it changes: bounded
        by the records touched) and the first delta after the full one carries them, with a
        stall the size of what changed meanwhile."""
        if self.pending_bytes() >= self.max_pending_bytes:
            return None
        cut = DeltaCut(engine.state, engine.take_changes(), None, limit, engine)
        self.pending.append((cut, last_id, now))
        return cut

    def written(self, cut: StateCut | DeltaCut, head: Snapshot) -> None:
        """``cut`` is in Redis, and ``head`` is the pointer now."""
        if cut.full:
            self.base_bytes, self.deltas, self.delta_bytes = cut.bytes, 0, 0
            self.writing_full = False
        else:
            self.deltas += 1
            self.delta_bytes += cut.bytes
        self.head = head

    def compaction(self) -> Compaction:
        """The compaction of the chain as it is now (its head), to start."""
        assert self.head is not None
        return Compaction(self.head, self.deltas, self.delta_bytes)

    def compacted(self, compaction: Compaction, head: Snapshot, base_bytes: int) -> None:
        """The pointer is ``head`` now: the compaction's base (``base_bytes``) and the deltas
        written after the chunks it covers, carried over."""
        self.head = head
        self.base_bytes = base_bytes
        self.deltas -= compaction.deltas
        self.delta_bytes -= compaction.delta_bytes

    def restored(self, head: Snapshot, size: ChainSize) -> None:
        """The engine was restored from ``head`` (of that size): the chain goes on from it,
        the next delta is appended to its generation."""
        self.head = head
        self.base_bytes, self.deltas, self.delta_bytes = (
            size.base_bytes,
            size.deltas,
            size.delta_bytes,
        )

    def failed(self, cut: StateCut | DeltaCut | None = None) -> None:
        """A snapshot was not written. A delta appended to the head puts its changes back
        (and those of the deltas waiting after it), so the next delta carries them and the
        chain goes on; otherwise (a full one) the changes are only in a full one now."""
        if isinstance(cut, DeltaCut) and cut.engine is not None and self.head is not None:
            for later, _, _ in reversed(self.pending):
                later.put_back()
            self.pending = []
            cut.put_back()
            return
        self.head = None
        self.writing_full = False
        self.pending = []
