"""The routing lease: exactly one daemon routes at a time (and, with another key, the ingest
lease: exactly one daemon consumes the leader-mode MQTT sessions, whether of role ``ingest`` or
``all``).

The lease is a Redis key holding the holder's token, taken by a Lua call when it is free (like
``SET NX PX ttl``) or still holds our own token (a release that did not reach Redis); the holder
renews it every ``ttl / 3`` with a Lua check-and-extend (only its own token is extended). A
renewal that fails or finds another token means the lease is lost: the holder must stop routing at
once. It also counts itself as lost when it could not renew for ``ttl`` seconds by its own clock,
since the key may have expired in Redis meanwhile. A standby polls and takes over at most
``ttl`` (plus one poll) after the holder died.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger("stellwerk.lease")

# Free, or still ours (a release that did not get through, an outage shorter than the ttl): take
# it. 1 when we hold it now, 0 when another daemon does.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
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
    """One daemon's handle on a lease (``key``), identified by ``node_id``: the routing lease,
    or (``name="ingest"``) the ingest lease that the daemons consuming the MQTT ingress sessions
    (roles ``ingest`` and ``all``) hold in leader mode. ``name`` is only for the log lines."""

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        node_id: str,
        ttl: float,
        *,
        name: str = "routing",
    ) -> None:
        self.redis = client
        self.key = key
        self.name = name
        self.node_id = node_id
        self.ttl = ttl
        # A fresh token per daemon start: a restarted node never mistakes an old lease for its own.
        self.token = f"{node_id}:{uuid.uuid4().hex}"
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._valid_until = 0.0
        self._failing = False
        #: whether the last attempt to take the lease found another daemon holding it
        self.elsewhere = False
        #: called with the new ``elsewhere`` when it changes
        self.on_elsewhere: Callable[[bool], None] | None = None

    @property
    def held(self) -> bool:
        """Whether we hold the lease by our own clock (renewed within the last ``ttl``)."""
        return time.monotonic() < self._valid_until

    async def try_acquire(self) -> bool:
        """Take the lease if it is free (or still ours); True when we hold it now."""
        started = time.monotonic()
        try:
            ok = await self._acquire(keys=[self.key], args=[self.token, int(self.ttl * 1000)])
        except (RedisError, OSError) as exc:
            if not self._failing:  # once per outage, not once per poll
                log.warning("lease.acquire_failed", error=str(exc))
            self._failing = True
            self._set_elsewhere(False)  # not known
            return False
        self._failing = False
        self._set_elsewhere(not ok)
        if ok:
            self._valid_until = started + self.ttl
            return True
        return False

    def _set_elsewhere(self, value: bool) -> None:
        if value != self.elsewhere:
            self.elsewhere = value
            if self.on_elsewhere is not None:
                self.on_elsewhere(value)

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

    async def wait_acquire(self, stopping: asyncio.Event, *also: asyncio.Event) -> bool:
        """Poll until we hold the lease (True) or ``stopping`` (or one of ``also``) is set
        (False)."""
        interval = max(0.05, self.ttl / 5)
        ends = (stopping, *also)
        while not any(end.is_set() for end in ends):
            if await self.try_acquire():
                return True
            await _first_set(ends, interval)
        return False

    async def keep(self, until: asyncio.Event | None = None) -> None:
        """Renew until the lease is lost (then return: the caller stops routing at once), or
        until ``until`` is set. The caller sets ``until`` before it cancels this: redis-py can
        swallow a cancellation that lands in a command (redis/redis-py#2028), and a renewal in
        flight when the holder ends its tenure would otherwise go on renewing, for ever, a lease
        nobody follows any more."""
        interval = self.ttl / 3
        done = until if until is not None else asyncio.Event()
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), interval)
            if done.is_set():
                return
            if not await self.renew():
                log.error("lease.lost", node=self.node_id, lease=self.name)
                return


class LeaseKeeper:
    """The one task that holds one of this daemon's leases (``lease``, or ``ingest-lease``, in
    the supervisor).

    It takes the lease when it is free, renews it while held and releases it when it stops.
    Whatever only the lease holder may do follows it: the router (the routing lease) and, in
    leader mode, the MQTT ingress (the ingest lease) wait for :meth:`tenure` and stop when the
    tenure's ``lost`` event is set. The router ends a tenure early with :meth:`give_up` (an
    entry the engine failed on, Redis gone, a fenced write refused); the keeper then releases
    the lease and, after ``hold_off`` seconds, competes for it again.

    With ``within`` (another keeper) it competes only during that keeper's tenures and ends its
    own tenure, releasing the lease, when theirs ends: a role ``all`` daemon holds the ingest
    lease only while it routes, so a standby ``all`` node never consumes, and an ``ingest`` node
    that holds the ingest lease leaves the routing node routing without consuming.
    """

    def __init__(self, lease: Lease, *, within: LeaseKeeper | None = None) -> None:
        self.lease = lease
        self._within = within
        self._held = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost.set()
        self._give_up = asyncio.Event()
        self._hold_off = 0.0
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def held(self) -> bool:
        """Whether a tenure is running (the lease is held and not being given up)."""
        return self._held.is_set()

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(held)`` when a tenure starts (True) and when it ends (False)."""
        self._listeners.append(listener)

    async def tenure(self, stopping: asyncio.Event) -> asyncio.Event | None:
        """Wait until this daemon holds the lease: the event set when this tenure ends, or None
        when ``stopping`` was set first."""
        while not stopping.is_set():
            if self._held.is_set():
                return self._lost
            waits = [
                asyncio.ensure_future(self._held.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return None

    def give_up(self, hold_off: float = 0.0) -> None:
        """End the current tenure: release the lease, compete again after ``hold_off`` s."""
        self._hold_off = max(self._hold_off, hold_off)
        self._give_up.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Hold the lease whenever possible until ``stopping`` is set; then release it."""
        while not stopping.is_set():
            self._give_up.clear()
            self._hold_off = 0.0
            ends = [stopping]
            if self._within is not None:
                outer = await self._within.tenure(stopping)
                if outer is None:
                    break
                ends.append(outer)
            if not await self.lease.wait_acquire(*ends):
                continue  # stopping (the loop ends), or the outer tenure ended: wait for the next
            if any(end.is_set() for end in ends):
                await self.lease.release()  # taken as the outer tenure ended: not ours to keep
                continue
            log.info("lease.acquired", node=self.lease.node_id, lease=self.lease.name)
            self._lost = asyncio.Event()
            self._held.set()
            self._notify(True)
            ended = asyncio.Event()
            waits = [
                asyncio.ensure_future(self.lease.keep(ended)),
                asyncio.ensure_future(self._give_up.wait()),
                *(asyncio.ensure_future(end.wait()) for end in ends),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.set()
                for w in waits:
                    w.cancel()
                # The tenure ends now: whatever follows it stops at once, without waiting for
                # a renewal in flight.
                self._held.clear()
                self._lost.set()
                self._notify(False)
                # Before the release: no renewal of ours may land after it.
                await asyncio.gather(*waits, return_exceptions=True)
            # Only our own token is deleted (a lease lost to another daemon stays theirs).
            await self.lease.release()
            log.info("lease.released", node=self.lease.node_id, lease=self.lease.name)
            if self._hold_off > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self._hold_off)

    def _notify(self, held: bool) -> None:
        for listener in self._listeners:
            listener(held)


async def _first_set(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    """Return when one of ``events`` is set, or after ``timeout`` seconds."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
