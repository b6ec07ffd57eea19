"""A small asyncio client for FreeSWITCH's event socket (ESL), inbound mode.

What it relies on from the wire protocol (mod_event_socket):

- **Framing.** Every message is a block of ``Name: value`` lines ended by an empty line; if the
  block has ``Content-Length: N``, exactly N bytes of body follow. FreeSWITCH writes LF only,
  and puts the headers in either order (events start with ``Content-Length``, api responses
  with ``Content-Type``), so the parser never depends on their order.
- **Session.** The server speaks first with ``Content-Type: auth/request``; the client answers
  ``auth <password>`` and gets a ``command/reply`` whose ``Reply-Text`` is ``+OK accepted`` or
  ``-ERR invalid`` (followed by a disconnect notice). Nothing else is answered before auth.
- **Replies.** Every command gets exactly one reply, in the order the commands were sent:
  ``command/reply`` (``Reply-Text``) for ordinary commands, ``api/response`` (the output as the
  body) for ``api``. Events are interleaved between replies but never replace one, so the
  client keeps one FIFO of waiting commands and hands every reply to the oldest.
- **Events.** ``event json <NAMES>`` subscribes; each event is a frame of type
  ``text/event-json`` whose body is one JSON object of string values (an event body travels
  as ``_body``). ``text/event-plain`` is parsed as well (URL-encoded ``Name: value`` lines,
  optionally an inner ``Content-Length`` and body), so the client can be pointed at a switch
  that only sends plain.
- **bgapi.** ``bgapi <cmd>`` with our own ``Job-UUID`` header returns ``+OK Job-UUID: <id>``
  at once; the command's output arrives later as the ``_body`` of a ``BACKGROUND_JOB`` event
  carrying the same ``Job-UUID``. Unlike ``api originate``, which holds the socket (and every
  event behind it) until the phone answers or gives up, it never blocks the connection.
- **Disconnect.** ``text/disconnect-notice`` announces that the server closes the socket
  (``Content-Disposition: linger`` is only a warning and is ignored).

Why hand-written: ``genesis``, the asyncio ESL library, only subscribes in ``plain`` (its
subscription ledger sends ``event plain``), pins ``redis<6`` (this project uses redis 7) and
pulls in FastAPI, uvicorn, OpenTelemetry, typer and watchdog; ``switchio`` is a 2017 alpha
that runs its own event loop in a background thread and whose maintainer has asked for
someone to take it over; ``greenswitch`` is built on gevent; ``aioesl`` (2016) is
unmaintained; ``python-ESL`` wraps the blocking C library. The protocol needed here is a
framing rule and five commands, about 250 lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import msgspec

__all__ = [
    "EslAuthError",
    "EslClient",
    "EslCommandError",
    "EslConnectionLost",
    "EslError",
    "EslProtocolError",
    "Frame",
    "parse_plain_event",
    "read_frame",
]

MAX_CONTENT_LENGTH = 16 * 1024 * 1024
"""FreeSWITCH's own limit on a message body; a larger length means the stream is corrupt."""

_MAX_HEADER_LINES = 1000
_JSON = msgspec.json.Decoder(dict[str, Any])


class EslError(Exception):
    """Base class of the client's errors."""


class EslConnectionLost(EslError):
    """The socket closed (or was never open); commands in flight have no answer."""


class EslAuthError(EslError):
    """The switch refused the password."""


class EslProtocolError(EslError):
    """Bytes that are not an ESL message: the stream cannot be trusted any more."""


class EslCommandError(EslError):
    """A command answered ``-ERR ...`` (the reply text is the message)."""


@dataclass(frozen=True)
class Frame:
    """One ESL message: its headers (names as sent) and its body."""

    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def content_type(self) -> str:
        """The ``Content-Type`` header, or ``""`` (frames without one are not valid ESL)."""
        return self.headers.get("Content-Type", "")


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame; :class:`EslConnectionLost` at end of stream.

    Blank lines before a header block are skipped (the server does the same with commands).
    """
    headers: dict[str, str] = {}
    lines = 0
    while True:
        try:
            raw = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            raise EslConnectionLost("connection closed by the switch") from exc
        except asyncio.LimitOverrunError as exc:
            raise EslProtocolError("header line too long") from exc
        line = raw.rstrip(b"\r\n")
        if not line:
            if headers:
                break
            continue
        lines += 1
        if lines > _MAX_HEADER_LINES:
            raise EslProtocolError("too many header lines")
        name, sep, value = line.decode("utf-8", "replace").partition(":")
        if not sep or not name.strip() or " " in name.strip():
            raise EslProtocolError(f"not a header line: {line[:80]!r}")
        headers.setdefault(name.strip(), value.strip())
    body = b""
    length = headers.get("Content-Length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_CONTENT_LENGTH:
            raise EslProtocolError(f"bad Content-Length {length!r}")
        try:
            body = await reader.readexactly(int(length))
        except asyncio.IncompleteReadError as exc:
            raise EslConnectionLost("connection closed inside a message body") from exc
    return Frame(headers=headers, body=body)


def parse_plain_event(body: bytes) -> dict[str, str]:
    """A ``text/event-plain`` body as the same dict ``text/event-json`` would give.

    Values are URL-decoded; an inner ``Content-Length`` introduces the event's own body, kept
    as ``_body`` like the JSON form does.
    """
    head, _, rest = body.partition(b"\n\n")
    event: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.partition(":")
        if sep and name.strip():
            event.setdefault(name.strip(), unquote(value.strip()))
    length = event.get("Content-Length")
    if length is not None and length.isdigit():
        event["_body"] = rest[: int(length)].decode("utf-8", "replace")
    return event


def _event_of(frame: Frame) -> dict[str, Any] | None:
    if frame.content_type == "text/event-json":
        try:
            return _JSON.decode(frame.body)
        except msgspec.DecodeError as exc:
            raise EslProtocolError(f"event-json body is not a JSON object: {exc}") from exc
    if frame.content_type == "text/event-plain":
        return parse_plain_event(frame.body)
    return None


@dataclass
class _State:
    pending: deque[asyncio.Future[Frame]] = field(default_factory=deque)
    jobs: dict[str, asyncio.Future[str]] = field(default_factory=dict)


class EslClient:
    """One authenticated inbound ESL connection.

    ``await EslClient.connect(host, port, password)`` logs in; :meth:`events` yields the
    subscribed events as dicts until the connection ends, then raises
    :class:`EslConnectionLost`. Commands may be sent from any task while :meth:`events` is
    being consumed; replies are matched in order. The event queue is bounded: a consumer that
    falls ``max_events`` behind gets the connection closed (and will reconcile after its
    reconnect) rather than a reader that stops reading and so starves the replies it awaits.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_events: int = 10_000,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._state = _State()
        self._events: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue(max_events)
        self._closed: BaseException | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        password: str,
        *,
        timeout: float = 5.0,
        max_events: int = 10_000,
    ) -> EslClient:
        """Open the socket, wait for ``auth/request`` and log in; raises on refusal."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=timeout
            )
        except (OSError, TimeoutError) as exc:
            raise EslConnectionLost(f"cannot connect to {host}:{port}: {exc}") from exc
        client = cls(reader, writer, max_events=max_events)
        try:
            greeting = await asyncio.wait_for(read_frame(reader), timeout=timeout)
            if greeting.content_type == "text/rude-rejection":
                raise EslAuthError(f"refused by the switch's ACL: {greeting.body!r}")
            if greeting.content_type != "auth/request":
                raise EslProtocolError(f"expected auth/request, got {greeting.content_type!r}")
            writer.write(f"auth {password}\n\n".encode())
            await writer.drain()
            reply = await asyncio.wait_for(read_frame(reader), timeout=timeout)
            text = reply.headers.get("Reply-Text", "")
            if reply.content_type != "command/reply" or not text.startswith("+OK"):
                raise EslAuthError(f"authentication refused: {text or reply.content_type!r}")
        except TimeoutError as exc:
            await client.close()
            raise EslConnectionLost("no greeting or auth reply from the switch") from exc
        except BaseException:
            await client.close()
            raise
        client._reader_task = asyncio.create_task(client._read_loop(), name="esl-reader")
        return client

    # ------------------------------------------------------------------ commands

    async def command(self, line: str, headers: Mapping[str, str] | None = None) -> Frame:
        """Send one command (and extra header lines); its reply frame."""
        if self._closed is not None:
            raise EslConnectionLost("connection is closed") from self._closed
        if "\n" in line or any("\n" in f"{k}{v}" for k, v in (headers or {}).items()):
            raise ValueError("an ESL command and its headers are single lines")
        text = line + "\n" + "".join(f"{k}: {v}\n" for k, v in (headers or {}).items()) + "\n"
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._state.pending.append(future)
        try:
            self._writer.write(text.encode())
            await self._writer.drain()
        except OSError as exc:
            self._fail(EslConnectionLost(f"write failed: {exc}"))
        return await future

    async def subscribe(self, events: Sequence[str], fmt: str = "json") -> None:
        """``event json A B C``; raises :class:`EslCommandError` unless enabled."""
        reply = await self.command(f"event {fmt} {' '.join(events)}")
        self._check(reply.headers.get("Reply-Text", ""))

    async def api(self, cmd: str) -> str:
        """Run ``api <cmd>`` and return its output (``-ERR ...`` outputs are returned as is)."""
        reply = await self.command(f"api {cmd}")
        if reply.content_type != "api/response":
            raise EslProtocolError(f"api answered with {reply.content_type!r}")
        return reply.body.decode("utf-8", "replace")

    async def bgapi(self, cmd: str, job_uuid: str | None = None) -> asyncio.Future[str]:
        """Start ``bgapi <cmd>``; a future for the job's output (the BACKGROUND_JOB body).

        The future is registered before the command is sent, so a job that finishes at once
        is not missed; it fails with :class:`EslConnectionLost` if the connection ends first.
        """
        job = job_uuid or str(uuid.uuid4())
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # A job nobody awaits any more (its leg was cancelled) must not log "never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._state.jobs[job] = future
        try:
            reply = await self.command(f"bgapi {cmd}", {"Job-UUID": job})
            self._check(reply.headers.get("Reply-Text", ""))
        except BaseException:
            self._state.jobs.pop(job, None)
            raise
        return future

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yield events (dicts of strings) until the connection ends; then raise."""
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                # Leave the marker for any other consumer and for later calls.
                with contextlib.suppress(asyncio.QueueFull):
                    self._events.put_nowait(item)
                raise item
            yield item

    @property
    def closed(self) -> bool:
        """True once the connection has ended (by either side)."""
        return self._closed is not None

    async def close(self) -> None:
        """Say ``exit`` if still open, then close the socket and stop the reader."""
        if self._closed is None and self._reader_task is not None:
            with contextlib.suppress(EslError, OSError, TimeoutError):
                await asyncio.wait_for(self.command("exit"), timeout=1.0)
        self._fail(EslConnectionLost("closed by the client"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check(text: str) -> None:
        if not text.startswith("+OK"):
            raise EslCommandError(text or "empty reply")

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader)
                kind = frame.content_type
                if kind in ("command/reply", "api/response"):
                    if not self._state.pending:
                        raise EslProtocolError(f"{kind} without a command waiting for it")
                    future = self._state.pending.popleft()
                    if not future.done():
                        future.set_result(frame)
                elif kind == "text/disconnect-notice":
                    if frame.headers.get("Content-Disposition") == "linger":
                        continue
                    raise EslConnectionLost("the switch sent a disconnect notice")
                else:
                    event = _event_of(frame)
                    if event is not None:
                        self._dispatch(event)
        except EslError as exc:
            self._fail(exc)
        except (OSError, ConnectionError) as exc:
            self._fail(EslConnectionLost(str(exc)))

    def _dispatch(self, event: dict[str, Any]) -> None:
        if event.get("Event-Name") == "BACKGROUND_JOB":
            future = self._state.jobs.pop(str(event.get("Job-UUID", "")), None)
            if future is not None and not future.done():
                future.set_result(str(event.get("_body", "")))
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            raise EslConnectionLost("event consumer fell behind; reconnect and reconcile") from None

    def _fail(self, exc: BaseException) -> None:
        if self._closed is not None:
            return
        self._closed = exc
        while self._state.pending:
            future = self._state.pending.popleft()
            if not future.done():
                future.set_exception(exc)
        for job in self._state.jobs.values():
            if not job.done():
                job.set_exception(exc)
        self._state.jobs.clear()
        # The marker must get through even to a full queue: drop the oldest event for it.
        if self._events.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._events.get_nowait()
        self._events.put_nowait(exc)
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()
