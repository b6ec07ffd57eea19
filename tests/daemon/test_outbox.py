"""The outbox against the real Redis: queued once per key, sent in order per destination,
retried through transient failures, failed for good on a refusal, resumed after a crash."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from router.daemon.outbox import (
    DESTINATIONS,
    OUTCOMES,
    OutboundMessage,
    OutboundMetrics,
    Outbox,
    Permanent,
    Transient,
)
from tests.daemon.conftest import Names, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Platform:
    """A destination with a script of answers: raise these, then accept."""

    failures: list[Exception] = field(default_factory=list)
    delivered: list[tuple[str, bool]] = field(default_factory=list)
    hold: asyncio.Event | None = None

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        if self.hold is not None:
            await self.hold.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.delivered.append((msg.key, uncertain))
        return f"remote-{msg.key}"


def message(key: str, destination: str = "chatwoot", body: str = "Hallo") -> OutboundMessage:
    return OutboundMessage(
        key=key,
        destination=destination,
        action="message",
        contact_id="chatwoot:42",
        agent_id="anna",
        body=body,
        params={"conversation_id": "42"},
    )


@contextlib.asynccontextmanager
async def running(outbox: Outbox) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(outbox.run(stop))
    try:
        await wait_until(lambda: outbox.sending.is_set() or task.done(), 5, "outbox lease")
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    assert got is not None, (name, labels)
    return got


async def test_queued_once_sent_in_order_with_metrics(
    redis_client: aioredis.Redis, names: Names
) -> None:
    registry = CollectorRegistry()
    metrics = OutboundMetrics(registry)
    for d in DESTINATIONS:
        for o in OUTCOMES:
            assert value(registry, "stellwerk_outbound_total", destination=d, outcome=o) == 0
    platform = Platform()
    outbox = Outbox(
        redis_client, names.key_prefix, destinations={"chatwoot": platform}, metrics=metrics
    )
    assert await outbox.append(message("k1"))
    assert not await outbox.append(message("k1", body="again"))  # same key: queued once
    assert await outbox.append(message("k2"))
    assert await outbox.depth("chatwoot") == 2
    assert value(registry, "stellwerk_outbound_depth", destination="chatwoot") == 2
    async with running(outbox):
        await wait_until(lambda: len(platform.delivered) == 2, 5, "two sends")
        await wait_until(
            lambda: value(registry, "stellwerk_outbound_depth", destination="chatwoot") == 0,
            5,
            "depth 0",
        )
    assert platform.delivered == [("k1", False), ("k2", False)]
    status = await outbox.status("k1")
    assert status is not None
    assert status["state"] == "sent" and status["attempts"] == 1
    assert status["remote_id"] == "remote-k1"
    assert [s["key"] for s in await outbox.for_contact("chatwoot:42")] == ["k1", "k2"]
    assert value(registry, "stellwerk_outbound_total", destination="chatwoot", outcome="sent") == 2
    assert await outbox.depth("chatwoot") == 0


async def test_transient_failures_retry_permanent_ones_fail(
    redis_client: aioredis.Redis, names: Names
) -> None:
    registry = CollectorRegistry()
    platform = Platform(
        failures=[
            Transient("connection refused"),
            Transient("timed out", uncertain=True),
            Permanent("not_found", "conversation 42 does not exist"),
        ]
    )
    outbox = Outbox(
        redis_client,
        names.key_prefix,
        destinations={"chatwoot": platform},
        metrics=OutboundMetrics(registry),
    )
    await outbox.append(message("a"))
    await outbox.append(message("b"))
    async with running(outbox):
        await wait_until(lambda: len(platform.delivered) == 1, 10, "the second message")
        await wait_until(
            lambda: (
                value(registry, "stellwerk_outbound_total", destination="chatwoot", outcome="sent")
                == 1
            ),
            5,
        )
    a = await outbox.status("a")
    assert a is not None and a["state"] == "failed" and "does not exist" in a["error"]
    assert a["attempts"] == 3
    # "b" came after "a" (order per destination) and went through at once.
    assert platform.delivered == [("b", False)]
    total = "stellwerk_outbound_total"
    assert value(registry, total, destination="chatwoot", outcome="retried") == 2
    assert value(registry, total, destination="chatwoot", outcome="failed") == 1


async def test_uncertain_flag_survives_a_crash_mid_send(
    redis_client: aioredis.Redis, names: Names
) -> None:
    """A worker cut off while the platform held the request: the next one knows it may have
    been delivered (the destination then looks before sending again)."""
    hold = asyncio.Event()
    first = Platform(hold=hold)
    outbox = Outbox(redis_client, names.key_prefix, destinations={"mail": first}, lease_ttl=0.5)
    await outbox.append(message("m1", destination="mail"))
    stop = asyncio.Event()
    task = asyncio.create_task(outbox.run(stop))
    status = None
    for _ in range(250):
        status = await outbox.status("m1")
        if status and status["state"] == "sending":
            break
        await asyncio.sleep(0.02)
    assert status is not None and status["state"] == "sending"
    task.cancel()  # the crash: no outcome recorded, nothing acknowledged
    with contextlib.suppress(asyncio.CancelledError):
        await task
    second = Platform()
    again = Outbox(redis_client, names.key_prefix, destinations={"mail": second}, lease_ttl=0.5)
    async with running(again):
        await wait_until(lambda: second.delivered, 5, "the re-send")
    assert second.delivered == [("m1", True)]
    done = await again.status("m1")
    assert done is not None and done["state"] == "sent" and done["attempts"] == 2
    assert await again.depth("mail") == 0
