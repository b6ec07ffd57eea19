"""The routing lease against the real Redis: one holder, fenced renewal, hand-over."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis.asyncio as aioredis

from router.daemon.lease import Lease, LeaseKeeper
from tests.daemon.conftest import Names, wait_until

pytestmark = pytest.mark.integration


def pair(client: aioredis.Redis, names: Names, ttl: float = 0.6) -> tuple[Lease, Lease]:
    key = f"{names.key_prefix}lease"
    return Lease(client, key, "a", ttl), Lease(client, key, "b", ttl)


async def test_only_one_holds_the_lease(redis_client: aioredis.Redis, names: Names) -> None:
    a, b = pair(redis_client, names)
    assert await a.try_acquire() and a.held
    assert not await b.try_acquire() and not b.held
    assert await a.holder() == a.token
    # b knows someone else has it; a, whose token is still there, takes it again (a release
    # that did not reach Redis does not lock its holder out until the key expires).
    assert b.elsewhere and not a.elsewhere
    assert await a.try_acquire()
    # b cannot renew or release what it does not hold.
    assert not await b.renew()
    await b.release()
    assert await a.holder() == a.token


async def test_renewal_keeps_it_and_expiry_hands_it_over(
    redis_client: aioredis.Redis, names: Names
) -> None:
    a, b = pair(redis_client, names, ttl=30)
    assert await a.try_acquire()
    # Each renewal pushes the expiry out again to a full ttl (what Redis says, not a sleep).
    for _ in range(3):
        await redis_client.pexpire(a.key, 1000)  # as if most of the ttl had gone by
        assert await a.renew()
        assert await redis_client.pttl(a.key) > 1000
        assert await a.holder() == a.token
    assert not await b.try_acquire()
    # a stops renewing (it died): once its key expires, b takes the lease.
    a.ttl = b.ttl = 0.6
    assert await a.renew()  # its last renewal
    started = time.monotonic()
    stop = asyncio.Event()
    # Well under a second on an idle machine; the bound is only a last guard.
    assert await asyncio.wait_for(b.wait_acquire(stop), 30)
    assert await a.holder() == b.token
    assert time.monotonic() - started >= 0.5  # not before a's key expired
    assert not a.held  # a's own clock says it is gone too
    assert not await a.renew()


async def test_a_taken_over_lease_is_lost_at_the_next_renewal(
    redis_client: aioredis.Redis, names: Names
) -> None:
    a, b = pair(redis_client, names, ttl=5)
    assert await a.try_acquire()
    await redis_client.set(a.key, b.token)  # e.g. a was partitioned long enough
    assert not await a.renew()
    assert not a.held
    # keep() returns at once on loss, so the router stops routing.
    a.ttl = 0.15
    await asyncio.wait_for(a.keep(), 30)


async def test_release_hands_over_at_once(redis_client: aioredis.Redis, names: Names) -> None:
    a, b = pair(redis_client, names, ttl=30)
    assert await a.try_acquire()
    await a.release()
    assert not a.held
    assert await b.try_acquire()


async def test_an_ingest_lease_within_the_routing_one_is_held_only_while_routing(
    redis_client: aioredis.Redis, names: Names
) -> None:
    """Role all: the ingest lease is competed for only during routing tenures and given up
    with them; an ingest node holding it keeps it, and the router takes it when it is free."""
    # The keepers renew theirs (and poll every ttl / 5); the other holders' never expire here:
    # every hand-over below is a release.
    ttl, long = 1.5, 30.0
    routing = LeaseKeeper(Lease(redis_client, f"{names.key_prefix}lease", "all1", ttl))
    ingest_key = f"{names.key_prefix}lease:ingest"
    consuming = LeaseKeeper(
        Lease(redis_client, ingest_key, "all1", ttl, name="ingest"), within=routing
    )
    ingest_node = Lease(redis_client, ingest_key, "ing", long, name="ingest")
    changes: list[bool] = []
    consuming.on_change(changes.append)
    stop = asyncio.Event()
    other_router = Lease(redis_client, routing.lease.key, "all2", long)
    assert await other_router.try_acquire()  # all1 is a standby
    tasks = [asyncio.create_task(k.run(stop)) for k in (routing, consuming)]
    try:
        # A standby does not even compete (a keeper that did would have taken the free lease
        # at its first poll, at once): the ingest lease stays free for an ingest node.
        await asyncio.sleep(0.3)
        assert await redis_client.get(ingest_key) is None and not consuming.held
        assert await ingest_node.try_acquire()
        await other_router.release()
        # Routing now, beside the ingest node that holds the ingest lease: not consuming.
        await asyncio.wait_for(routing.tenure(stop), 30)
        assert not consuming.held and await ingest_node.holder() == ingest_node.token
        # The ingest node goes (gracefully): the router takes the ingest lease at its next poll.
        await ingest_node.release()
        lost = await asyncio.wait_for(consuming.tenure(stop), 30)
        assert lost is not None
        assert await consuming.lease.holder() == consuming.lease.token
        # The routing tenure ends: the ingest lease is given up with it, for anyone to take.
        routing.give_up(hold_off=long)
        await asyncio.wait_for(lost.wait(), 30)
        assert not consuming.held

        async def released() -> bool:
            return await redis_client.get(ingest_key) is None

        await wait_until(released, 10, "the ingest lease released")
        assert changes == [True, False]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_a_tenure_ends_even_when_a_renewal_in_flight_swallows_its_cancellation(
    redis_client: aioredis.Redis, names: Names
) -> None:
    """redis-py can swallow a cancellation that lands in a command (redis/redis-py#2028): a
    renewal in flight as the tenure ends must not keep the keeper, or the lease, for ever."""
    in_flight = asyncio.Event()

    class Swallowing(Lease):
        async def renew(self) -> bool:
            in_flight.set()
            # What redis-py does now and then: the cancellation is lost, the command completes.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.3)
            return await super().renew()

    keeper = LeaseKeeper(Swallowing(redis_client, f"{names.key_prefix}lease", "a", 0.6))
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    try:
        lost = await asyncio.wait_for(keeper.tenure(stop), 30)
        assert lost is not None
        await asyncio.wait_for(in_flight.wait(), 30)
        keeper.give_up(hold_off=30)  # ends the tenure in the middle of that renewal
        await asyncio.wait_for(lost.wait(), 5)

        async def released() -> bool:
            return await redis_client.get(keeper.lease.key) is None

        await wait_until(released, 5, "the lease released")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
