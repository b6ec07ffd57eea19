"""Taking a snapshot without stopping the router: encode the state in a forked child.

The engine changes its records in place, so a snapshot must be cut at one instant while
routing goes on. ``fork()`` gives exactly that: the child has a copy-on-write image of the
state as it was at the fork and encodes it (:func:`router.snapshot.encode_state`) into a pipe,
chunk by chunk; the router reads the chunks as they come and writes them to Redis, and in the
meantime goes on routing. The router's stall is the ``fork()`` itself (the kernel copies the
page tables, so it grows with the resident memory: 7-20 ms at 50-90 MB, 155 ms at 1 GB on the
development VM) plus reading each chunk.
The same idea as Redis's own ``BGSAVE``.

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

from router.snapshot import CHUNK_BYTES, encode_state
from router.state import EngineState

_LEN = 4  # bytes of the length prefix of each chunk in the pipe
_PR_SET_PDEATHSIG = 1  # prctl(2), Linux


class SnapshotEncodeFailed(Exception):
    """The child encoding the snapshot died or reported an error."""


class StateCut:
    """The chunks of one snapshot, from a forked child (or encoded at once without fork).

    Create it at the instant to cut (it forks in the constructor), then iterate
    :meth:`chunks` once; :meth:`close` kills a child that is still running. ``fork_s`` is how
    long the fork took (the router's stall), ``bytes`` how much was read so far.
    """

    def __init__(self, state: EngineState, *, fork: bool = True, limit: int = CHUNK_BYTES) -> None:
        self.bytes = 0
        self.fork_s = 0.0
        self._pid: int | None = None
        self._rfd: int | None = None
        self._inline: list[bytes] | None = None
        if not (fork and hasattr(os, "fork")):
            self._inline = list(encode_state(state, limit))
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
        self.fork_s = time.perf_counter() - started
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
