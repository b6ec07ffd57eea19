"""The socket under paho (``AiomqttInternals.coalesce_writes``): one ``send`` per loop turn for
every packet queued in it, one 64 KiB ``recv`` for many packets; nothing lost, reordered or
acknowledged that did not reach the broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import aiomqtt
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.daemon.config import Settings
from router.daemon.mqtt import AiomqttInternals, _CoalescedWrites, incoming_bound, make_client
from tests.daemon.conftest import Names, drop_session, wait_until
from tests.daemon.test_daemon_mqtt import settings_for


def small_window(names: Names, inflight: int) -> Settings:
    base = settings_for(names)
    return msgspec.structs.replace(
        base, mqtt=msgspec.structs.replace(base.mqtt, max_inflight=inflight)
    )


@contextlib.asynccontextmanager
async def consumer(settings: Settings, identifier: str) -> AsyncIterator[aiomqtt.Client]:
    """A persistent, manually acknowledging session like the ingress, on the buffered socket."""
    client = make_client(settings.mqtt, identifier, persistent=True, manual_ack=True)
    async with client:
        AiomqttInternals(client).coalesce_writes()
        yield client


@contextlib.asynccontextmanager
async def publisher(settings: Settings, identifier: str) -> AsyncIterator[AiomqttInternals]:
    client = make_client(settings.mqtt, identifier, persistent=False)
    async with client:
        internals = AiomqttInternals(client)
        internals.coalesce_writes()
        yield internals


async def take(client: aiomqtt.Client, count: int, timeout: float = 30) -> list[aiomqtt.Message]:
    """The next ``count`` messages, without acknowledging them."""
    internals = AiomqttInternals(client)
    messages = client.messages.__aiter__()
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            got.append(await messages.__anext__())
            internals.take_queued(got, count)
    return got


async def backlog(
    settings: Settings, publishing: Settings, topic: str, identifier: str, payloads: list[bytes]
) -> None:
    """The persistent session ``identifier`` (``settings``) subscribes to ``topic`` and goes
    offline; then ``payloads`` are published to it (``publishing``, QoS 1), the broker has
    acknowledged every one, and they wait in the session."""
    async with consumer(settings, identifier) as sub:
        await sub.subscribe(topic, qos=1)
    async with publisher(publishing, f"{identifier}-pub") as pub:
        done, _ = pub.publish_batch([(topic, p) for p in payloads])
        await asyncio.wait_for(done, 30)


async def resumed_backlog(
    settings: Settings, publishing: Settings, topic: str, identifier: str, count: int = 800
) -> tuple[list[int], int]:
    """A :func:`backlog` of ``count`` messages of 200 bytes and more, read back by resuming
    the session and acknowledging slowly: their numbers in the order they arrived, and the
    most messages that were in aiomqtt's queue at once (counting the batch just taken out)."""
    payload = b"x" * 200
    await backlog(
        settings, publishing, topic, identifier, [b"%d:" % n + payload for n in range(count)]
    )
    got: list[int] = []
    most = 0
    async with consumer(settings, identifier) as sub:
        internals = AiomqttInternals(sub)
        queue = internals._queue
        while len(got) < count:
            # A discarded message never comes back on this connection: waiting ends it.
            batch = await take(sub, 1, timeout=10)
            most = max(most, queue.qsize() + len(batch))
            internals.take_queued(batch, 10)
            await asyncio.sleep(0.001)  # a slow journal
            for message in batch:
                assert isinstance(message.payload, bytes)
                got.append(int(message.payload.partition(b":")[0]))
                internals.ack(message)
    return got, most


async def received_at_least(received: list[int], count: int) -> None:
    await wait_until(lambda: len(received) >= count, 30, f"{count} received")


def numbers(batch: list[aiomqtt.Message]) -> list[int]:
    return [int(m.payload) for m in batch if isinstance(m.payload, bytes)]


@pytest.mark.integration
async def test_a_burst_of_thousands_of_publishes_and_pubacks_loses_and_reorders_nothing(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """4,000 QoS 1 messages from a publisher on the buffered socket to a consumer on one:
    every message arrives once and in order, every PUBACK of both sides arrives (the
    publisher's batches complete; the consumer's session has nothing to redeliver), and
    aiomqtt never drops one from its bounded queue."""
    settings = small_window(names, 200)
    topic = f"{names.topic_prefix}/in/phone/burst"
    identifier = f"stw-{names.tag}-burst"
    received: list[int] = []
    try:
        async with consumer(settings, identifier) as sub:
            await sub.subscribe(topic, qos=1)
            acks = AiomqttInternals(sub)

            async def consume() -> None:
                while len(received) < 4000:
                    batch = await take(sub, 1)
                    acks.take_queued(batch, 256)
                    received.extend(numbers(batch))
                    for message in batch:  # all PUBACKs of a batch in one loop turn
                        acks.ack(message)

            task = asyncio.create_task(consume())
            async with publisher(settings, f"stw-{names.tag}-pub") as pub:
                for start in range(0, 4000, 500):
                    done, _ = pub.publish_batch(
                        [(topic, str(n).encode()) for n in range(start, start + 500)]
                    )
                    await asyncio.wait_for(done, 30)
                    # Within the broker's queue per session (1,000 by default) and in order.
                    await received_at_least(received, start + 500)
            await asyncio.wait_for(task, 30)
        assert received == list(range(4000))
        # Every PUBACK reached the broker: the resumed session has nothing to redeliver.
        async with consumer(settings, identifier) as again:
            with pytest.raises(TimeoutError):
                await take(again, 1, timeout=1.0)
    finally:
        await drop_session(identifier)
    assert "Message queue is full" not in caplog.text


@pytest.mark.integration
async def test_a_connection_broken_with_pubacks_in_the_buffer_gets_them_redelivered(
    names: Names,
) -> None:
    """The PUBACKs of 50 messages are queued; the connection breaks before they leave: the
    client sees the disconnection (paho's own path) and the resumed session delivers all 50
    again, so none of them is lost although the daemon had 'acknowledged' them."""
    settings = small_window(names, 100)
    topic = f"{names.topic_prefix}/in/phone/broken"
    identifier = f"stw-{names.tag}-broken"
    try:
        await backlog(settings, settings, topic, identifier, [b"%d" % n for n in range(50)])
        with pytest.raises(aiomqtt.MqttError):
            async with consumer(settings, identifier) as sub:
                batch = await take(sub, 50)
                assert numbers(batch) == list(range(50))
                internals = AiomqttInternals(sub)
                for message in batch:
                    internals.ack(message)  # queued in the buffer, flushed at the turn's end
                writes = internals._paho._sock
                assert isinstance(writes, _CoalescedWrites)
                writes._sock.shutdown(socket.SHUT_RDWR)  # the link breaks before the flush
                async for _ in sub.messages:  # ends with MqttError: paho saw the connection go
                    pass
        async with consumer(settings, identifier) as again:
            redelivered = await take(again, 50)
            assert numbers(redelivered) == list(range(50))
            assert all(m.payload and m.mid for m in redelivered)
    finally:
        await drop_session(identifier)


@pytest.mark.integration
async def test_a_backlog_read_ahead_never_overfills_aiomqtts_queue(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """800 messages wait in the session; the consumer (Receive Maximum 50, aiomqtt's queue
    bounded at ``incoming_bound``: 356) reads ahead in 64 KiB reads and acknowledges slowly.
    Resuming the session, the broker sends far more than 50 at once (Mosquitto 2.0 does);
    none is dropped from the queue, and all arrive in order."""
    caplog.set_level(logging.WARNING)
    settings = small_window(names, 50)
    topic = f"{names.topic_prefix}/in/phone/backlog"
    identifier = f"stw-{names.tag}-backlog"
    try:
        got, most = await resumed_backlog(settings, settings, topic, identifier)
        assert got == list(range(800))
        # The broker sent beyond the window (it does, resuming a backlog): the read-ahead
        # held back at half of aiomqtt's bound instead of overfilling it.
        assert most <= incoming_bound(settings.mqtt) // 2 + 1
    finally:
        await drop_session(identifier)
    assert "Message queue is full" not in caplog.text


# ---- the buffer itself, over a socket pair -------------------------------------------------


async def through_pair(writes: list[bytes], reads: list[int]) -> bytes:
    """Write ``writes`` through a _CoalescedWrites (as paho would: one flush a loop turn for
    what was queued in it) into a socket pair with a tiny send buffer, read the other end
    through another one in reads of the given sizes; what arrived."""
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for s in (left, right):
        s.setblocking(False)
    queued: list[bytes] = []
    writer: _CoalescedWrites

    def loop_write() -> None:  # paho's loop_write: every queued packet to the socket
        while queued:
            writer.send(queued.pop(0))

    def failed(exc: BaseException) -> None:
        raise AssertionError(exc)

    writer = _CoalescedWrites(left, loop, loop_write, failed)
    reader = _CoalescedWrites(right, loop, lambda: None, failed)
    total = sum(len(w) for w in writes)
    got = bytearray()
    arrived = asyncio.Event()
    sizes = iter(reads)

    def readable() -> None:
        while True:  # as aiomqtt's reader: packets until the socket has no more
            try:
                chunk = reader.recv(next(sizes, 1 << 16))
            except BlockingIOError:
                return
            if not chunk:
                return
            got.extend(chunk)
            if len(got) >= total:
                arrived.set()

    loop.add_reader(right.fileno(), readable)
    try:
        for i, data in enumerate(writes):
            queued.append(data)
            writer.schedule()
            if i % 3 == 2:
                await asyncio.sleep(0)  # a new loop turn now and then
        if total:
            await asyncio.wait_for(arrived.wait(), 10)
    finally:
        loop.remove_reader(right.fileno())
        writer.close()
        reader.close()
    return bytes(got)


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(st.binary(min_size=1, max_size=20_000), max_size=30),
    reads=st.lists(st.integers(min_value=1, max_value=5000), max_size=50),
)
def test_bytes_leave_and_arrive_whole_and_in_order_whatever_the_sizes(
    writes: list[bytes], reads: list[int]
) -> None:
    """Whatever packets are queued in whatever turns, and however the socket takes them
    (partial sends against a 4 KiB buffer) and paho asks for them: the peer reads exactly
    their concatenation."""
    assert asyncio.run(through_pair(writes, reads)) == b"".join(writes)


async def test_a_failed_send_fails_every_later_write_and_ends_the_stream() -> None:
    """Once a ``send`` failed (the peer is gone), paho's next write fails too (its
    lost-connection path) and the socket reads as ended, so paho's reader notices."""
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    left.setblocking(False)
    right.close()
    errors: list[BaseException] = []
    writes = _CoalescedWrites(left, loop, lambda: writes.send(b"packet"), errors.append)
    writes.schedule()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    with pytest.raises(OSError):
        writes.send(b"more")
    assert writes.recv(10) == b""
    writes.close()
