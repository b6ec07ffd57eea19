"""The routing lease: exactly one daemon routes at a time.

The lease is a Redis key holding the holder's token, set with ``SET NX PX ttl``; the holder
renews it every ``ttl / 3`` with a Lua check-and-extend (only its own token is extended). A
renewal that fails or finds another token means the lease is lost: the holder must stop routing at
once. It also counts itself as lost when it could not renew for ``ttl`` seconds by its own clock,
since the key may have expired in Redis meanwhile. A standby polls ``SET NX`` and takes over at
most ``ttl`` (plus one poll) after the holder died.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger("stellwerk.lease")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """One daemon's handle on the routing lease (``key``), identified by ``node_id``."""

    def __init__(self, client: aioredis.Redis, key: str, node_id: str, ttl: float) -> None:
        self.redis = client
        self.key = key
        self.node_id = node_id
        self.ttl = ttl
        # A fresh token per daemon start: a restarted node never mistakes an old lease for its own.
        self.token = f"{node_id}:{uuid.uuid4().hex}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._valid_until = 0.0
        self._failing = False

    @property
    def held(self) -> bool:
        """Whether we hold the lease by our own clock (renewed within the last ``ttl``)."""
        return time.monotonic() < self._valid_until

    async def try_acquire(self) -> bool:
        """Take the lease if it is free; True when we hold it now."""
        started = time.monotonic()
        try:
            ok = await self.redis.set(self.key, self.token, nx=True, px=int(self.ttl * 1000))
        except (RedisError, OSError) as exc:
            if not self._failing:  # once per outage, not once per poll
                log.warning("lease.acquire_failed", error=str(exc))
            self._failing = True
            return False
        self._failing = False
        if ok:
            self._valid_until = started + self.ttl
            return True
        return False

    async def renew(self) -> bool:
        """Extend our lease; False when it is no longer ours (or Redis did not answer)."""
        started = time.monotonic()
        try:
            ok = await self._renew(keys=[self.key], args=[self.token, int(self.ttl * 1000)])
        except (RedisError, OSError) as exc:
            log.warning("lease.renew_failed", error=str(exc))
            return self.held
        if ok:
            self._valid_until = started + self.ttl
            return True
        self._valid_until = 0.0
        return False

    async def release(self) -> None:
        """Give the lease up (graceful shutdown) so a standby takes over at once."""
        self._valid_until = 0.0
        with contextlib.suppress(RedisError, OSError):
            await self._release(keys=[self.key], args=[self.token])

    async def holder(self) -> str | None:
        """The token of whoever holds the lease now (None when free)."""
        value = await self.redis.get(self.key)
        return value.decode() if value else None

    async def wait_acquire(self, stopping: asyncio.Event) -> bool:
        """Poll until we hold the lease (True) or ``stopping`` is set (False)."""
        interval = max(0.05, self.ttl / 5)
        while not stopping.is_set():
            if await self.try_acquire():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
        return False

    async def keep(self) -> None:
        """Renew until the lease is lost; then return (the caller stops routing at once)."""
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            if not await self.renew():
                log.error("lease.lost", node=self.node_id)
                return
