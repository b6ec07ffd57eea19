"""The routing lease against the real Redis: one holder, fenced renewal, hand-over."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from router.daemon.lease import Lease
from tests.daemon.conftest import Names

pytestmark = pytest.mark.integration


def pair(client: aioredis.Redis, names: Names, ttl: float = 0.6) -> tuple[Lease, Lease]:
    key = f"{names.key_prefix}lease"
    return Lease(client, key, "a", ttl), Lease(client, key, "b", ttl)


async def test_only_one_holds_the_lease(redis_client: aioredis.Redis, names: Names) -> None:
    a, b = pair(redis_client, names)
    assert await a.try_acquire() and a.held
    assert not await b.try_acquire() and not b.held
    assert await a.holder() == a.token
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
