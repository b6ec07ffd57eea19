"""MQTT: ingress with acknowledgement after the journal write, and the publisher of commands.

Ingress is two persistent sessions (QoS 1; ``$share/{group}/...`` in shared mode): the contact
session (client id ``MqttSettings.identifier``) subscribes to ``{prefix}/in/{channel}/{source}``
(native payloads), the agent session (that id + ``-agents``) to ``{prefix}/agents/{agent_id}/cmd``
(agent commands). Two sessions because the broker delivers each session's messages in order:
with one, an agent's accept would queue behind every call waiting in the broker under overload,
and the agent would stay "offered" meanwhile (docs/operations.md has what was measured).

aiomqtt 2.5 has no manual-ack switch of its own, so we turn on paho-mqtt's
(``manual_ack_set(True)`` on the wrapped client, before connecting) and send each PUBACK with
``ack(mid, qos)`` only after the journal append returned. A payload the decoder rejects is in the
dead-letter stream and is acknowledged too; only an unreachable Redis withholds the PUBACK: the
batch is retried with back-off while the connection lasts, and if the daemon dies meanwhile the
broker redelivers the message to the session when it is resumed (see ``MqttSettings.ingress``:
by default the ingest lease holder consumes, and a standby taking over resumes the same session).

The publisher is a second connection (clean session) that sends offers, cancels, refusals and
events with QoS 1 and waits for the broker's PUBACK, reconnecting with capped, jittered back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt
import msgspec
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from redis.backoff import ExponentialWithJitterBackoff

from router.daemon.config import MqttSettings, Settings
from router.daemon.intake import Intake
from router.daemon.journal import JournalUnavailable
from router.daemon.metrics import Metrics
from router.messages import CancelOfferCmd, Command, EventCmd, OfferCmd, RefusedCmd

log = structlog.get_logger("stellwerk.mqtt")

_ENCODE = msgspec.json.Encoder().encode
MAX_BATCH = 256
Message = tuple[str, bytes]
"""(topic, payload) to publish."""


def backoff() -> ExponentialWithJitterBackoff:
    """Capped (10 s), fully jittered exponential back-off for reconnects and retries."""
    return ExponentialWithJitterBackoff(cap=10.0, base=0.1)


def client_tls(mqtt: MqttSettings) -> ssl.SSLContext:
    """TLS for ``mqtts://``: the broker verified against ``tls_ca`` (else the system's CAs),
    with the client certificate ``tls_cert``/``tls_key`` when set."""
    context = ssl.create_default_context(cafile=mqtt.tls_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mqtt.tls_cert and mqtt.tls_key:
        context.load_cert_chain(mqtt.tls_cert, mqtt.tls_key)
    return context


def incoming_bound(mqtt: MqttSettings) -> int:
    """How many received messages the ingress client holds in memory at most."""
    return 2 * mqtt.max_inflight + MAX_BATCH


def make_client(
    mqtt: MqttSettings, identifier: str, *, persistent: bool, manual_ack: bool = False
) -> aiomqtt.Client:
    """An aiomqtt client from the settings (not yet connected).

    MQTT 5 unless ``mqtt.protocol`` is 311 (3.1.1). A persistent v5 session needs both
    ``clean_start=False`` (aiomqtt's default starts clean on the first connect, which would drop
    the queued ingress) and a session expiry interval; its Receive Maximum lets the broker keep
    ``max_inflight`` unacknowledged messages on the way, so the journal writes can be batched.
    """
    user, password = mqtt.credentials
    # The publisher keeps no session: 3.1.1 spares paho building v5 properties per message.
    v5 = mqtt.protocol == 5 and persistent
    properties: Properties | None = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.ReceiveMaximum = min(mqtt.max_inflight, 65535)
        if persistent:
            properties.SessionExpiryInterval = int(mqtt.session_expiry)
    client = aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        username=user,
        password=password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else not persistent,
        clean_start=(not persistent) if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
        keepalive=mqtt.keepalive,
        # paho's own window (the publisher's side) is a queue it scans whole on every PUBACK
        # (``_update_inflight``): with 1,000 in flight that was a tenth of the daemon's CPU.
        # The publisher's outstanding messages are bounded by one router batch instead
        # (``router.batch`` entries' commands); the ingress publishes nothing but PUBACKs.
        max_inflight_messages=mqtt.max_inflight if persistent else 0,
        # Bounded concurrency keeps aiomqtt's per-call bookkeeping (linear in pending calls) cheap.
        max_concurrent_outgoing_calls=256,
        tls_context=client_tls(mqtt) if mqtt.tls else None,
        # Neither paho nor aiomqtt turns Nagle off; with delayed ACKs it adds ~40 ms per hop.
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        timeout=10.0,
        # A bound on aiomqtt's incoming queue (unbounded by default), which discards what
        # does not fit. The broker sends at most Receive Maximum (``max_inflight``)
        # unacknowledged QoS 1 messages, and we acknowledge only after the journal write,
        # except when a resumed session sends its backlog (Mosquitto 2.0 sends more): the
        # read-ahead then holds at half the bound (``coalesce_writes``). The margin is for
        # QoS 0 messages, discarded beyond the bound (at most once, by definition).
        max_queued_incoming_messages=incoming_bound(mqtt) if manual_ack else None,
    )
    client.pending_calls_threshold = 1_000_000  # many in-flight publishes are normal here
    if manual_ack:
        # Must be set before CONNACK: a persistent session delivers its backlog at once.
        AiomqttInternals(client).enable_manual_ack()
    return client


class AiomqttInternals:
    """The only place that reaches into aiomqtt's private attributes, and why.

    aiomqtt 2.5 has no public API for four things the daemon needs: (1) paho-mqtt's manual
    acknowledgement (``manual_ack_set``), without which paho PUBACKs a message as soon as it
    arrives, before the journal holds it; (2) sending that PUBACK (paho's ``ack``); (3) taking
    the messages that already arrived without awaiting the iterator once per message (the
    iterator costs a task per message; draining the queue lets one journal round trip take a
    whole batch); (4) publishing a batch with one wait for all its PUBACKs (``publish()``
    costs a coroutine, a semaphore, an ``asyncio.Event`` and a ``wait_for`` task per message:
    a seventh of the daemon's busy time at 300 calls/s); (5) writing every packet paho queued
    in one event-loop turn with one ``send`` (:meth:`coalesce_writes`): paho sends each packet
    with a ``send`` of its own, and aiomqtt has the loop watch the socket for writability
    (``add_writer`` from a thread-safe wake-up, ``remove_writer`` after) for every burst. They
    go through the wrapped paho client (``_client``; for (5) its socket ``_sock``, the public
    ``on_socket_(un)register_write`` hooks aiomqtt set on it, and aiomqtt's ``_disconnected``
    future to report an error as aiomqtt's own callback would), the incoming queue
    (``_queue``) and the map of pending publishes (``_pending_publishes``, mid -> object with
    ``set()``, which aiomqtt's ``on_publish`` callback pops and sets); an aiomqtt or paho
    upgrade that renames them breaks here, and only here.

    Over TLS, (5) is only the read hold (:class:`_HeldTlsReads` in place of paho's
    ``ssl.SSLSocket``): an ``SSLSocket`` can want a read to write, so paho keeps its own writes
    there, but the hold is needed for correctness on every transport (a resumed backlog must
    not overfill aiomqtt's queue). The SSL object keeps decrypted bytes that the loop's
    ``select`` does not see (``pending()``), so after a read, and when a hold ends, paho goes
    on reading while there are any, as aiomqtt's own reader callback does.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._aiomqtt = client
        self._paho: paho.Client = client._client
        self._queue: asyncio.Queue[aiomqtt.Message] = client._queue
        self._pending: dict[int, Any] = client._pending_publishes

    def coalesce_writes(self) -> None:
        """From now on, write all the packets paho queues in one loop turn with one ``send``,
        and hold reading while aiomqtt's bounded queue is half full (call on the event loop,
        once connected; see :class:`_CoalescedWrites`).

        TLS connections keep paho's own writes (an ``SSLSocket`` can want a read to write) and
        get the read hold alone (:class:`_HeldTlsReads`).
        """
        client = self._paho
        sock = client._sock
        if sock is None or isinstance(sock, _CoalescedWrites | _HeldTlsReads):
            return
        loop = asyncio.get_running_loop()
        disconnected: asyncio.Future[None] = self._aiomqtt._disconnected

        def failed(exc: BaseException) -> None:
            # What aiomqtt's own reader and writer callbacks do when paho's loop_* raises.
            if not disconnected.done():
                disconnected.set_exception(exc)

        queue = self._queue
        # Hold the read-ahead while aiomqtt's bounded queue is half full: the broker does not
        # keep to Receive Maximum when a resumed session sends its backlog (Mosquitto 2.0
        # sent 290 at once to a window of 50), and aiomqtt drops what does not fit, which
        # then stays unacknowledged for the rest of the connection.
        hold = (lambda: queue.qsize() >= queue.maxsize // 2) if queue.maxsize else None
        if isinstance(sock, ssl.SSLSocket):
            if hold is not None:
                reads = _HeldTlsReads(sock, loop, client.loop_read, failed, hold)
                # aiomqtt's reader gives way to the same with the hold (removed at close).
                loop.add_reader(sock.fileno(), reads.readable)
                client._sock = reads
            return
        writes = _CoalescedWrites(
            sock,  # type: ignore[arg-type]  # paho's SocketLike; a plain socket here
            loop,
            client.loop_write,
            failed,
            loop_read=client.loop_read,
            hold=hold,
        )
        register, unregister = client.on_socket_register_write, client.on_socket_unregister_write

        def on_register(paho_client: paho.Client, userdata: Any, registered: Any) -> None:
            if registered is writes:
                writes.schedule()
            elif register is not None:  # a socket of a later connect: aiomqtt's way
                register(paho_client, userdata, registered)

        def on_unregister(paho_client: paho.Client, userdata: Any, registered: Any) -> None:
            if registered is not writes and unregister is not None:
                unregister(paho_client, userdata, registered)

        # aiomqtt's writer, if paho had asked for one: from here on the flush writes. Its
        # reader gives way to the same with the hold (aiomqtt removes it at close).
        loop.remove_writer(sock.fileno())
        loop.add_reader(sock.fileno(), writes.readable)
        client._sock = writes
        client.on_socket_register_write = on_register
        client.on_socket_unregister_write = on_unregister
        if client.want_write():
            writes.schedule()

    def enable_manual_ack(self) -> None:
        """Let the caller send every PUBACK itself (must be called before connecting)."""
        self._paho.manual_ack_set(True)

    def ack(self, message: aiomqtt.Message) -> None:
        """Send the PUBACK of ``message`` (a no-op for QoS 0)."""
        self._paho.ack(message.mid, message.qos)

    def take_queued(self, batch: list[aiomqtt.Message], limit: int) -> None:
        """Move messages that already arrived into ``batch``, up to ``limit`` in all."""
        queue = self._queue
        while len(batch) < limit:
            try:
                batch.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def publish_batch(self, messages: Sequence[Message]) -> tuple[asyncio.Future[None], list[int]]:
        """Hand every message to paho (QoS 1) at once: (a future done when the broker has
        PUBACKed all of them, their message ids for :meth:`forget`).

        Raises aiomqtt.MqttCodeError when paho refuses one (no connection); nothing of the
        batch is waited for then.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acks = _BatchAcks(len(messages), done)
        mids: list[int] = []
        for topic, payload in messages:
            info = self._paho.publish(topic, payload, 1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self.forget(mids)
                raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
            # (PUBACKs are read on this thread, by the loop's reader callback: none can have
            # arrived between publish() and here.)
            if info.is_published():
                acks.set()
            else:
                self._pending[info.mid] = acks
                mids.append(info.mid)
        return done, mids

    def forget(self, mids: Iterable[int]) -> None:
        """Stop waiting for the PUBACKs of ``mids`` (a batch given up or cut off)."""
        for mid in mids:
            self._pending.pop(mid, None)


CLOSE_TIMEOUT = 2.0
"""Seconds :meth:`_CoalescedWrites.close` waits at most for the socket to take the rest."""
RESUME_AFTER = 0.002
"""Seconds a held read-ahead waits before it looks at aiomqtt's queue again."""
READ_AHEAD = 65536
"""Bytes one ``recv`` of :class:`_CoalescedWrites` asks the socket for."""


class _HeldReads:
    """What the two socket wrappers paho reads through share: the read hold. While ``hold``
    says the consumer is behind, the loop stops watching the socket (the bytes wait in its
    buffer, TCP holds the broker back) and looks again in ``RESUME_AFTER`` seconds; the end of
    a hold runs :meth:`readable` at once, for bytes already read that the socket will not
    signal again. Subclasses set the fields and define :meth:`readable`."""

    __slots__ = (
        "_closed",
        "_failed",
        "_hold",
        "_loop",
        "_loop_read",
        "_resume_handle",
        "_sock",
        "fileno",
    )

    _sock: socket.socket
    _loop: asyncio.AbstractEventLoop
    _hold: Callable[[], bool] | None
    _resume_handle: asyncio.TimerHandle | None
    _closed: bool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def readable(self) -> None:
        """The loop's reader callback (in place of aiomqtt's)."""
        raise NotImplementedError

    def _held(self) -> bool:
        if self._hold is None or not self._hold():
            return False
        if self._resume_handle is None and not self._closed:
            self._loop.remove_reader(self._sock.fileno())
            self._resume_handle = self._loop.call_later(RESUME_AFTER, self._resume)
        return True

    def _resume(self) -> None:
        self._resume_handle = None
        if self._closed or self._held():
            return
        self._loop.add_reader(self._sock.fileno(), self.readable)
        self.readable()

    def _end_hold(self) -> None:
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None


class _CoalescedWrites(_HeldReads):
    """The socket paho writes to once connected (see :meth:`AiomqttInternals.coalesce_writes`):
    its ``send`` only queues the bytes (and says all were sent); the packets of one loop turn
    then go out with one real ``send``. Its ``recv`` hands paho the bytes of one 64 KiB read
    (paho reads three times a packet), and :meth:`readable`, the loop's reader callback, has
    paho go on until they are used up, unless ``hold`` says the consumer is behind.

    Per burst of packets paho would make one ``send`` system call per packet (eight a call:
    five publishes and three PUBACKs), and aiomqtt an ``add_writer`` (after a thread-safe
    wake-up of the loop), a poll for writability and a ``remove_writer``. Here paho's
    register-write hook schedules :meth:`_flush` with ``call_soon``; the flush lets paho write
    every queued packet (into this buffer) and sends the buffer at once. Order is kept: bytes
    leave in the order paho wrote them, a partial ``send`` keeps the rest at the front and
    waits for writability. A failed ``send`` (the connection broke) drops the buffer, makes
    every later paho write fail (paho's own lost-connection path) and shuts the socket down, so
    paho's reader sees the end at once: whatever was not acknowledged is the broker's to
    redeliver (ingress) or the publisher's to send again, as with paho's own writes.

    What paho believes sent may still be in this buffer for one loop turn: that only matters
    for QoS 0 ``on_publish`` (the daemon publishes QoS 1, done on the broker's PUBACK).
    """

    __slots__ = (
        "_error",
        "_flush_handle",
        "_flushing",
        "_in",
        "_in_at",
        "_loop_write",
        "_out",
        "_writing",
    )

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        loop_write: Callable[[], object],
        failed: Callable[[BaseException], None],
        *,
        loop_read: Callable[[], object] = lambda: None,
        hold: Callable[[], bool] | None = None,
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._loop_write = loop_write
        self._failed = failed
        self._out: list[bytes | bytearray] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flushing = False
        self._writing = False  # a partial send: waiting for the socket to take more
        self._error: OSError | None = None
        self._closed = False
        self._loop_read = loop_read
        self._hold = hold
        self._resume_handle: asyncio.TimerHandle | None = None
        self._in = b""  # the last read, and how much of it paho has taken
        self._in_at = 0
        self.fileno = sock.fileno

    def readable(self) -> None:
        """The loop's reader callback (in place of aiomqtt's, which does the same without the
        hold): paho reads packets until the bytes read ahead are used up."""
        try:
            while not self._closed and not self._held():
                self._loop_read()
                if self._in_at >= len(self._in):
                    return
        except Exception as exc:  # reported as aiomqtt's own reader callback does
            self._failed(exc)

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of the last ``READ_AHEAD`` read; a new read once it is used up
        (``BlockingIOError`` and ``b""`` reach paho as from the socket)."""
        data, at = self._in, self._in_at
        if self._hold is not None and self._held():
            raise BlockingIOError  # paho keeps its place in the packet and returns
        if at >= len(data):
            data = self._sock.recv(READ_AHEAD)
            if not data:
                return data
            self._in, at = data, 0
        end = min(at + size, len(data))
        self._in_at = end
        return data[at:end]

    def pending(self) -> int:
        """Bytes read ahead that paho has not taken yet."""
        return len(self._in) - self._in_at

    def send(self, data: bytes | bytearray) -> int:
        """Queue ``data`` for this turn's ``send``; raises the error that broke the connection."""
        if self._error is not None:
            raise self._error
        self._out.append(data)  # (paho hands over a fresh slice: no copy needed)
        if not self._flushing:
            self.schedule()  # written outside a flush (paho's own loop_write): flush it too
        return len(data)

    def schedule(self) -> None:
        """Flush at the end of this loop turn (once, however many packets come meanwhile)."""
        if self._flush_handle is None and not self._closed:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._closed:
            return
        self._flushing = True
        try:
            self._loop_write()  # paho: every packet it has queued -> send() -> self._out
        except Exception as exc:  # reported as aiomqtt's own writer callback does
            self._failed(exc)
        finally:
            self._flushing = False
        if not self._closed and not self._writing:
            self._send_out()

    def _send_out(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(exc)
            return
        if sent < len(data):
            out.append(data[sent:])
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._sock.fileno(), self._writable)
        elif self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

    def _writable(self) -> None:
        if not self._closed:
            self._send_out()

    def _fail(self, exc: OSError) -> None:
        self._error = exc
        self._out.clear()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())
        # paho's reader callback then reads the end of the stream: its lost-connection path.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Send what is still queued (PUBACKs, a DISCONNECT: paho wrote them before it closed,
        as it would have, whole, to the socket), then close."""
        if self._closed:
            return
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._end_hold()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())
        if self._out and self._error is None:
            with contextlib.suppress(OSError):
                # Blocking (briefly) only here: a send buffer full at close is rare.
                self._sock.settimeout(CLOSE_TIMEOUT)
                self._sock.sendall(b"".join(self._out))
        self._out.clear()
        self._sock.close()


class _HeldTlsReads(_HeldReads):
    """The TLS socket paho reads from once connected (see
    :meth:`AiomqttInternals.coalesce_writes`): paho's writes go straight to the ``SSLSocket``
    (``send`` is the socket's own), its reads stop while ``hold`` says the consumer is behind.

    No read-ahead buffer of our own: the SSL object already reads a whole TLS record (up to
    16 KiB) and hands paho its decrypted bytes from memory. Those bytes are invisible to the
    loop's ``select``, so :meth:`readable` has paho go on while ``pending()`` says there are
    any, and the end of a hold runs it at once (the socket may never turn readable again for
    bytes the SSL object already holds).
    """

    __slots__ = ("send",)

    _sock: ssl.SSLSocket

    def __init__(
        self,
        sock: ssl.SSLSocket,
        loop: asyncio.AbstractEventLoop,
        loop_read: Callable[[], object],
        failed: Callable[[BaseException], None],
        hold: Callable[[], bool],
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._loop_read = loop_read
        self._failed = failed
        self._hold = hold
        self._resume_handle: asyncio.TimerHandle | None = None
        self._closed = False
        # paho's writes (once a packet) go to the SSLSocket itself, SSLWant* errors included.
        self.send = sock.send
        self.fileno = sock.fileno

    def readable(self) -> None:
        """The loop's reader callback (in place of aiomqtt's, which does the same without the
        hold): paho reads packets until the SSL object holds no decrypted bytes."""
        try:
            while not self._closed and not self._held():
                self._loop_read()
                if self._closed or self._sock.pending() == 0:
                    return
        except Exception as exc:  # reported as aiomqtt's own reader callback does
            self._failed(exc)

    def recv(self, size: int) -> bytes:
        """The SSLSocket's ``recv``, unless held (``BlockingIOError``: paho keeps its place in
        the packet and returns)."""
        if self._held():
            raise BlockingIOError
        return self._sock.recv(size)

    def close(self) -> None:
        """Stop the hold's timer and close the socket."""
        self._closed = True
        self._end_hold()
        self._sock.close()


class _BatchAcks:
    """Stands in for aiomqtt's per-publish ``asyncio.Event``: each ``set()`` is one PUBACK;
    the last one completes the batch's future."""

    __slots__ = ("_done", "_left")

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self._left = count
        self._done = done
        if count == 0:
            done.set_result(None)

    def set(self) -> None:
        self._left -= 1
        if self._left <= 0 and not self._done.done():
            self._done.set_result(None)


# ---- commands -> messages ------------------------------------------------------------------


def wire_body(cmd: Command) -> dict[str, Any]:
    """The JSON body desktops get for a command: ``{"type": "offer" | "cancel" | "refused",
    ...}`` on ``{prefix}/agents/{id}/offers``, ``{"type": event type, ...}`` for events. One
    shape for every desktop transport (MQTT, the desk's WebSocket)."""
    if isinstance(cmd, EventCmd):
        body: dict[str, Any] = msgspec.to_builtins(cmd.event)
        return body
    kind = (
        "offer"
        if isinstance(cmd, OfferCmd)
        else "cancel"
        if isinstance(cmd, CancelOfferCmd)
        else "refused"
    )
    return {"type": kind, **msgspec.structs.asdict(cmd)}


def command_messages(cmd: Command, prefix: str) -> list[Message]:
    """The MQTT messages that carry out one engine command."""
    if isinstance(cmd, OfferCmd | CancelOfferCmd | RefusedCmd):
        body = wire_body(cmd)
        if cmd.agent_id is None:
            # An admin command the engine refused (unknown expert, bad identity key): there is
            # no agent to tell, and agents' topics must not carry it.
            return [(f"{prefix}/events/admin.refused", _ENCODE(body))]
        return [(f"{prefix}/agents/{cmd.agent_id}/offers", _ENCODE(body))]
    if isinstance(cmd, EventCmd):
        return [(f"{prefix}/events/{cmd.type}", _ENCODE(cmd.event))]
    return []


def refused_message(prefix: str, agent_id: str, reason: str, detail: str) -> Message:
    """Tell an agent desktop that its command was refused (bad JSON, unknown op...)."""
    body = {"type": "refused", "agent_id": agent_id, "reason": reason, "detail": detail}
    return f"{prefix}/agents/{agent_id}/offers", _ENCODE(body)


# ---- publisher -----------------------------------------------------------------------------


class Publisher:
    """QoS 1 publishing over its own connection; ``publish_many`` returns once all are PUBACKed.

    While the broker is unreachable, publishing waits (and retries) rather than dropping: an
    offer the agent never saw would strand its contact until the offer expired.
    """

    def __init__(self, settings: Settings, *, on_status: Callable[[bool], None] | None = None):
        self.settings = settings
        self._client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        # Set when the current connection is gone (a new event per connection).
        self._lost = asyncio.Event()
        self._on_status = on_status
        # Unique per daemon (several share one ingress client id in leader mode), and per role:
        # an ingest and a router process on one host may share a settings file that names
        # ``router.node_id``, and two clients with one id throw each other off the broker.
        ingress_id = settings.mqtt.identifier(settings.topic_prefix)
        role = "" if settings.role == "all" else f"{settings.role}-"
        self._identifier = f"{ingress_id}-pub-{role}{settings.node_id()}"

    @property
    def connected(self) -> bool:
        """Whether the publishing connection is up."""
        return self._ready.is_set()

    async def run(self) -> None:
        """Keep the connection up until cancelled."""
        delays = backoff()
        failures = 0
        while True:
            client = make_client(self.settings.mqtt, self._identifier, persistent=False)
            try:
                async with client:
                    AiomqttInternals(client).coalesce_writes()
                    failures = 0
                    self._client = client
                    self._lost = asyncio.Event()
                    self._ready.set()
                    self._status(True)
                    log.info("mqtt.publisher.connected", client_id=self._identifier)
                    # Nothing is subscribed: the iterator only ends (raising) when the link drops.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.publisher.disconnected", error=str(exc))
            finally:
                self._ready.clear()
                self._client = None
                self._lost.set()
                self._status(False)
            failures += 1
            await asyncio.sleep(delays.compute(failures))

    def _status(self, up: bool) -> None:
        if self._on_status is not None:
            self._on_status(up)

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Publish all (QoS 1) in one batch; send the batch again until the broker PUBACKed
        every message of one attempt."""
        if not messages:
            return
        delays = backoff()
        failures = 0
        while True:
            await self._ready.wait()
            client, lost = self._client, self._lost
            if client is None:
                continue
            internals = AiomqttInternals(client)
            try:
                acked, mids = internals.publish_batch(messages)
            except aiomqtt.MqttError as exc:
                failures += 1
                log.warning(
                    "mqtt.publish.retry", failed=len(messages), attempt=failures, error=str(exc)
                )
                await asyncio.sleep(delays.compute(failures))
                continue
            watch: asyncio.Future[Any] = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait(
                    (acked, watch), timeout=client.timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                watch.cancel()
                if not acked.done():
                    internals.forget(mids)
                    acked.cancel()
            if acked.done() and not acked.cancelled():
                return
            # The connection dropped under these publishes (aiomqtt would let each one wait out
            # its timeout, with routing stalled), or the broker did not PUBACK them all within
            # the client timeout: send the whole batch again (on the next connection, if need
            # be). Desktops de-duplicate offers by offer_id; events are at-least-once.
            failures += 1
            log.warning("mqtt.publish.resend", pending=len(messages), attempt=failures)
            if not lost.is_set():
                await asyncio.sleep(delays.compute(failures))

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish one message (QoS 1), waiting for the connection if need be."""
        await self.publish_many([(topic, payload)])


# ---- ingress -------------------------------------------------------------------------------


IngressKind = Literal["contacts", "agents"]
"""Which of the two ingress sessions: the ``in/`` topics, or the agents' ``cmd`` topics."""


def ingress_topics(prefix: str, kind: IngressKind) -> tuple[str, ...]:
    """The plain topic filters one ingress session consumes."""
    return (f"{prefix}/in/+/+",) if kind == "contacts" else (f"{prefix}/agents/+/cmd",)


def ingress_identifier(settings: Settings, kind: IngressKind) -> str:
    """The MQTT client id of one ingress session: the contact session has
    ``MqttSettings.identifier``, the agent session that id with ``-agents`` appended."""
    base = settings.mqtt.identifier(settings.topic_prefix)
    return base if kind == "contacts" else f"{base}-agents"


class Ingress:
    """Consumes one kind of ingress topic into the journal (see module docstring): ``contacts``
    (``{prefix}/in/+/+``) or ``agents`` (``{prefix}/agents/+/cmd``), each on its own persistent
    session, so agents' commands never wait behind a backlog of contacts in the broker."""

    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        publisher: Publisher,
        *,
        kind: IngressKind = "contacts",
        metrics: Metrics | None = None,
        on_status: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.publisher = publisher
        self.kind = kind
        self.metrics = metrics
        self._on_status = on_status
        self.prefix = settings.topic_prefix
        self.identifier = ingress_identifier(settings, kind)
        group = settings.mqtt.share_group
        plain = ingress_topics(self.prefix, kind)
        shared = tuple(f"$share/{group}/{t}" for t in plain)
        # In leader mode one session per kind consumes everything: a plain subscription, which
        # the broker restores from its persistence after a restart ($share ones it does not), so
        # calls published before the daemon reconnects wait in the session instead of vanishing.
        leader = settings.mqtt.ingress != "shared"
        self.topics = plain if leader else shared
        # The persistent session may still hold the other mode's subscriptions (the ingress
        # mode was changed): each message would arrive twice.
        stale = list(shared if leader else plain)
        if kind == "contacts":
            # Before agent commands had a session of their own, the contact session (same
            # client id) subscribed to them too, and the broker restores that subscription on
            # every reconnect: left alone, each command would reach both sessions and be
            # journaled twice, and the contact session's copy would still wait behind its
            # backlog. Dropped explicitly, in both modes' spellings.
            for topic in ingress_topics(self.prefix, "agents"):
                stale += [topic, f"$share/{group}/{topic}"]
        self._stale_topics = tuple(stale)
        self._stopping = asyncio.Event()
        self.connected = False

    def stop(self) -> None:
        """Stop taking new messages (the batch in hand is still journaled and acknowledged)."""
        self._stopping.set()

    async def run(self) -> None:
        """Connect, subscribe and consume until :meth:`stop` or cancellation."""
        self._stopping.clear()
        delays = backoff()
        failures = 0
        identifier = self.identifier
        while not self._stopping.is_set():
            client = make_client(self.settings.mqtt, identifier, persistent=True, manual_ack=True)
            try:
                async with client:
                    AiomqttInternals(client).coalesce_writes()
                    for topic in self.topics:
                        await self._subscribe(client, topic)
                    # Subscriptions this session may hold from an earlier mode or version
                    # (see __init__); unsubscribing one it does not hold is harmless.
                    await client.unsubscribe(list(self._stale_topics))
                    failures = 0
                    self._status(True)
                    log.info(
                        "mqtt.ingress.connected",
                        client_id=identifier,
                        kind=self.kind,
                        topics=self.topics,
                    )
                    await self._consume(client)
                    return
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.ingress.disconnected", error=str(exc))
            finally:
                self._status(False)
            failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delays.compute(failures))

    async def _subscribe(self, client: aiomqtt.Client, topic: str) -> None:
        # A retained message on an ingress topic would be journaled again at every
        # (re)subscription; MQTT 5 can say "never send retained", 3.1.1 gets them dead-lettered.
        if self.settings.mqtt.protocol == 5:
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            await client.subscribe(topic, options=options)
        else:
            await client.subscribe(topic, qos=1)

    def _status(self, up: bool) -> None:
        self.connected = up
        if self._on_status is not None:
            self._on_status(up)

    async def _consume(self, client: aiomqtt.Client) -> None:
        messages = client.messages.__aiter__()
        internals = AiomqttInternals(client)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(messages.__anext__())
                done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await nxt
                    return
                batch = [nxt.result()]
                # Whatever else is already queued goes into the same journal round trip.
                internals.take_queued(batch, MAX_BATCH)
                await self._handle_batch(internals, batch)
        finally:
            stop.cancel()

    async def _handle_batch(
        self, internals: AiomqttInternals, batch: list[aiomqtt.Message]
    ) -> None:
        stages = _Batch.split(self.prefix, batch)
        delays = backoff()
        failures = 0
        while True:
            try:
                await self._journal(stages)
                break
            except JournalUnavailable as exc:
                # No PUBACK: the messages stay the broker's until Redis takes them.
                failures += 1
                if self.metrics is not None:
                    self.metrics.observe_ingress("mqtt", "unavailable")
                log.warning("mqtt.ingress.journal_down", error=str(exc), held=len(batch))
                await asyncio.sleep(delays.compute(failures))
        for message in batch:
            internals.ack(message)
        if self.metrics is not None:
            for ok in stages.outcomes:
                self.metrics.observe_ingress("mqtt", "accepted" if ok else "rejected")
        if stages.refusals:
            await self.publisher.publish_many(stages.refusals)

    async def _journal(self, stages: _Batch) -> None:
        # Each stage is marked done once written, so a retry after a Redis failure does not
        # journal the earlier stages twice.
        if stages.deliveries:
            results = await self.intake.accept_many(stages.deliveries)
            stages.outcomes.extend(r.ok for r in results)
            stages.deliveries = []
        if stages.commands:
            cmd_results = await self.intake.accept_agent_commands(stages.commands)
            for (agent_id, _), res in zip(stages.commands, cmd_results, strict=True):
                stages.outcomes.append(res.ok)
                if not res.ok:
                    stages.refusals.append(
                        refused_message(self.prefix, agent_id, res.reason or "", res.detail)
                    )
            stages.commands = []
        while stages.strays:
            topic, payload = stages.strays[0]
            await self.intake.journal.dead_letter(
                "mqtt",
                "unroutable",
                f"retained or unknown topic {topic}",
                payload,
                {"mqtt-topic": topic},
            )
            stages.outcomes.append(False)
            stages.strays.pop(0)


@dataclass
class _Batch:
    """One batch of ingress messages sorted by kind, with what has been journaled so far."""

    deliveries: list[tuple[str, bytes, Mapping[str, str]]] = field(default_factory=list)
    commands: list[tuple[str, bytes]] = field(default_factory=list)
    strays: list[tuple[str, bytes]] = field(default_factory=list)
    outcomes: list[bool] = field(default_factory=list)
    refusals: list[Message] = field(default_factory=list)

    @classmethod
    def split(cls, prefix: str, batch: Iterable[aiomqtt.Message]) -> _Batch:
        out = cls()
        for message in batch:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            parts = topic[len(prefix) + 1 :].split("/")
            if message.retain:
                out.strays.append((topic, payload))
            elif len(parts) == 3 and parts[0] == "in":
                out.deliveries.append(
                    (parts[2], payload, {"mqtt-topic": topic, "channel": parts[1]})
                )
            elif len(parts) == 3 and parts[0] == "agents" and parts[2] == "cmd":
                out.commands.append((parts[1], payload))
            else:
                out.strays.append((topic, payload))
        return out
