"""The outbox: every message or platform action Stellwerk sends, journaled before it is sent.

One path for everything that leaves Stellwerk towards a platform: an agent's reply (mail,
Chatwoot, Rocket.Chat, Discourse, WhatsApp, Messenger) and the actions that carry out a routing
decision where the conversation lives (assign, forward, resolve, close).

Durability. :meth:`Outbox.append` writes, in one Lua script (atomic in Redis), the message's
status record ``{prefix}outbox:msg:{key}`` and an entry in the destination's stream
``{prefix}outbox:{destination}``, unless a record under that idempotency key exists already
(then nothing is added: the same reply, or the same engine decision replayed after a restart,
is queued once). Only then does the caller say "queued".

Sending. One worker per destination reads its stream through the consumer group ``senders``:
an entry stays in the group's pending list until its outcome is recorded, then it is
acknowledged and deleted (the status record keeps the outcome), so the stream's length is the
destination's depth. Before each attempt the record says ``sending`` and its attempt count
goes up; a crash in the middle leaves ``sending`` behind, and the next worker (the same daemon
restarted, or another one) starts with that entry's *uncertain* flag set, which a destination
uses to look before it sends again (see :mod:`router.daemon.platforms` for what each platform
allows). Transient failures (connection refused, timeouts, 5xx, 429, SMTP 4xx) are retried
with capped, jittered back-off (:func:`router.daemon.mqtt.backoff`) for as long as it takes:
a message is never dropped, and its record says ``retrying`` with the last error meanwhile.
Permanent failures (4xx, SMTP 5xx) end as ``failed`` with the platform's reason. Destinations
are independent: a Chatwoot outage does not hold back mail. Within a destination the order is
kept (assign before the first message, the last message before resolve).

Exactly one daemon sends at a time: the worker holds the outbox lease ``{prefix}outbox:lease``
(the same mechanism as the routing lease) and checks it before every attempt.

Metrics: ``stellwerk_outbound_total{destination,outcome}`` (``sent``, ``retried``,
``failed``; every destination pre-created at zero) and ``stellwerk_outbound_depth{destination}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError, ResponseError

from router.daemon.journal import JournalUnavailable
from router.daemon.lease import Lease
from router.daemon.mqtt import backoff

log = structlog.get_logger("stellwerk.outbox")

DESTINATIONS: tuple[str, ...] = (
    "mail",
    "chatwoot",
    "rocketchat",
    "discourse",
    "whatsapp",
    "messenger",
)
OUTCOMES: tuple[str, ...] = ("sent", "retried", "failed")
FINAL_STATES = frozenset({"sent", "failed"})
GROUP = "senders"
CONSUMER = "sender"
#: how long the outcome of a finished message stays readable (the desk shows it).
STATUS_TTL = 7 * 86400
_FIELD = b"m"
#: how long stopping waits for the workers (an attempt in flight is cut off after this).
LANE_STOP_TIMEOUT = 3.0


class _LeaseLost(Exception):
    """The outbox lease ran out while a worker was about to send."""


class OutboundMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One thing to send: an agent's reply or a platform action.

    ``key`` is the idempotency key (the same key is queued once); ``action`` is ``message``
    (``body`` holds the text), or ``assign``, ``forward``, ``resolve``, ``close``. ``params``
    carries what the destination needs (platform ids, addresses, mail headers).
    """

    key: str
    destination: str
    action: str
    contact_id: str
    agent_id: str | None = None
    body: str = ""
    params: dict[str, str] = msgspec.field(default_factory=dict)
    created_at: float = 0.0


_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder(OutboundMessage).decode


class Transient(Exception):
    """The platform could not take it now; retry. ``uncertain``: it may have taken it."""

    def __init__(self, detail: str, *, uncertain: bool = False) -> None:
        self.detail = detail
        self.uncertain = uncertain
        super().__init__(detail)


class Permanent(Exception):
    """The platform refused it for good (``reason`` slug, ``detail`` sentence)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Destination(Protocol):
    """A platform client the worker delivers through."""

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        """Send ``msg``; the platform's id for it (or ``""``). Raises Transient or Permanent.

        ``uncertain`` says an earlier attempt may have reached the platform: a destination
        that can find out whether it did looks first instead of sending twice.
        """
        ...


@dataclass(frozen=True)
class OutboxKeys:
    """The outbox's Redis keys under one key prefix."""

    prefix: str

    def stream(self, destination: str) -> str:
        return f"{self.prefix}outbox:{destination}"

    def status(self, key: str) -> str:
        return f"{self.prefix}outbox:msg:{key}"

    def contact(self, contact_id: str) -> str:
        return f"{self.prefix}outbox:contact:{contact_id}"

    @property
    def lease(self) -> str:
        return f"{self.prefix}outbox:lease"


# KEYS: status, stream, contact index. ARGV: encoded message, key, destination, action,
# contact id, agent id, created_at, ttl. Returns 1 when queued, 0 when the key existed.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[1])
redis.call('HSET', KEYS[1], 'key', ARGV[2], 'destination', ARGV[3], 'action', ARGV[4],
  'contact_id', ARGV[5], 'agent_id', ARGV[6], 'state', 'queued', 'attempts', 0,
  'created_at', ARGV[7], 'updated_at', ARGV[7], 'entry', id)
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[8])
return 1
"""


class OutboundMetrics:
    """``stellwerk_outbound_total`` and ``stellwerk_outbound_depth``, pre-created at zero."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = Counter(
            "stellwerk_outbound",
            "Outbound messages and platform actions by destination and outcome: sent (the "
            "platform took it), retried (a transient failure, tried again), failed (refused "
            "for good, shown to the agent).",
            ["destination", "outcome"],
            registry=registry,
        )
        self.depth = Gauge(
            "stellwerk_outbound_depth",
            "Outbound messages queued or in flight (not yet confirmed) per destination.",
            ["destination"],
            registry=registry,
        )
        for destination in DESTINATIONS:
            self.depth.labels(destination).set(0)
            for outcome in OUTCOMES:
                self.total.labels(destination, outcome)


StatusFn = Callable[[dict[str, Any]], Awaitable[None]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Outbox:
    """Append outbound messages durably; run the per-destination workers (see module doc)."""

    def __init__(
        self,
        client: aioredis.Redis,
        key_prefix: str,
        *,
        destinations: Mapping[str, Destination] | None = None,
        metrics: OutboundMetrics | None = None,
        node_id: str = "outbox",
        lease_ttl: float = 5.0,
        on_status: StatusFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.keys = OutboxKeys(key_prefix)
        self.destinations = dict(destinations or {})
        self.metrics = metrics
        self.lease = Lease(client, self.keys.lease, node_id, lease_ttl)
        self.on_status = on_status
        self._clock = clock
        self._append = client.register_script(_APPEND)
        self.sending = asyncio.Event()
        """Set while this daemon holds the outbox lease and its workers run."""

    # ---- producers ------------------------------------------------------------------------

    async def append(self, msg: OutboundMessage) -> bool:
        """Queue ``msg`` durably; False when its key was queued before (nothing added).

        Raises :class:`JournalUnavailable` when Redis does not take the write: then nothing
        was queued and the caller must not say it was.
        """
        if msg.destination not in DESTINATIONS:
            raise ValueError(f"unknown destination {msg.destination!r}")
        at = msg.created_at or self._clock()
        if not msg.created_at:
            msg = msgspec.structs.replace(msg, created_at=at)
        try:
            added = await self._append(
                keys=[
                    self.keys.status(msg.key),
                    self.keys.stream(msg.destination),
                    self.keys.contact(msg.contact_id),
                ],
                args=[
                    _ENCODE(msg),
                    msg.key,
                    msg.destination,
                    msg.action,
                    msg.contact_id,
                    msg.agent_id or "",
                    repr(at),
                    STATUS_TTL,
                ],
            )
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        if added:
            log.info(
                "outbound.queued",
                key=msg.key,
                destination=msg.destination,
                action=msg.action,
                contact_id=msg.contact_id,
                agent_id=msg.agent_id,
            )
            await self._refresh_depth(msg.destination)
        return bool(added)

    async def status(self, key: str) -> dict[str, Any] | None:
        """The status record of one message (state, attempts, error, remote id), or None."""
        try:
            raw = await self.redis.hgetall(self.keys.status(key))  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        if not raw:
            return None
        record: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        record.pop("entry", None)
        record["attempts"] = int(record.get("attempts", 0))
        for name in ("created_at", "updated_at"):
            if name in record:
                record[name] = float(record[name])
        if not record.get("agent_id"):
            record["agent_id"] = None
        record["uncertain"] = record.get("uncertain") == "1"
        return record

    async def for_contact(self, contact_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The status records of a contact's outbound messages and actions, oldest first."""
        try:
            keys = await self.redis.zrange(self.keys.contact(contact_id), 0, limit - 1)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        found = []
        for key in keys:
            record = await self.status(_text(key))
            if record is not None:
                found.append(record)
        return found

    async def depth(self, destination: str) -> int:
        """How many messages of ``destination`` are not yet confirmed."""
        return int(await self.redis.xlen(self.keys.stream(destination)))

    async def _refresh_depth(self, destination: str) -> None:
        if self.metrics is None:
            return
        with contextlib.suppress(RedisError, OSError):
            self.metrics.depth.labels(destination).set(await self.depth(destination))

    # ---- the workers ------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Hold the outbox lease and run one worker per configured destination, until
        ``stopping`` is set. Losing the lease (or Redis) stops the workers; they start again
        once it is held again, from the pending entries."""
        failures = 0
        delays = backoff()
        while not stopping.is_set():
            if not await self.lease.wait_acquire(stopping):
                return
            log.info("outbox.lease_acquired", node=self.lease.node_id)
            self.sending.set()
            halt = asyncio.Event()
            lanes = [
                asyncio.create_task(self._lane(name, dest, halt), name=f"outbox-{name}")
                for name, dest in self.destinations.items()
            ]
            keep = asyncio.create_task(self.lease.keep(halt), name="outbox-lease")
            stop = asyncio.create_task(stopping.wait(), name="outbox-stop")
            try:
                done, _ = await asyncio.wait(
                    [*lanes, keep, stop], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                self.sending.clear()
                # redis-py can swallow a cancellation that lands in a blocking read, so the
                # lanes also watch ``halt`` (their reads block for 0.5 s at most), and so does
                # the lease's renewal.
                halt.set()
                tasks = [*lanes, keep, stop]
                for task in tasks:
                    task.cancel()
                _, pending = await asyncio.wait(tasks, timeout=LANE_STOP_TIMEOUT)
                if pending:
                    log.warning("outbox.lanes_slow_to_stop", lanes=[t.get_name() for t in pending])
                results = [t.exception() if not t.cancelled() else None for t in tasks if t.done()]
                await self.lease.release()
            errors = [
                r for r in results if isinstance(r, Exception) and not isinstance(r, _LeaseLost)
            ]
            for error in errors:
                if not isinstance(error, JournalUnavailable | RedisError | OSError):
                    raise error
            if errors:
                failures += 1
                log.warning("outbox.redis_down", error=str(errors[0]))
                await asyncio.sleep(delays.compute(failures))
            elif keep in done:
                log.error("outbox.lease_lost", node=self.lease.node_id)

    async def _lane(self, name: str, dest: Destination, halt: asyncio.Event) -> None:
        stream = self.keys.stream(name)
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # First what an earlier holder (or this daemon before a crash) took and did not
        # confirm, then new entries.
        start = "0"
        while not halt.is_set():
            reply = await self.redis.xreadgroup(
                GROUP, CONSUMER, {stream: start}, count=16, block=None if start == "0" else 500
            )
            rows = [row for _s, entries in reply or () for row in entries]
            if start == "0" and not rows:
                start = ">"
                continue
            for entry_id, fields in rows:
                if not fields:  # deleted while pending: nothing left to do
                    await self.redis.xack(stream, GROUP, entry_id)
                    continue
                if halt.is_set():
                    return
                await self._process(name, dest, stream, entry_id, fields, halt)
            await self._refresh_depth(name)

    async def _process(
        self,
        name: str,
        dest: Destination,
        stream: str,
        entry_id: Any,
        fields: Mapping[Any, Any],
        halt: asyncio.Event,
    ) -> None:
        raw = fields.get(_FIELD)
        try:
            msg = _DECODE(raw) if raw is not None else None
        except msgspec.DecodeError:
            msg = None
        if msg is None:
            log.error("outbox.entry_unreadable", destination=name, entry=_text(entry_id))
            await self._ack(stream, entry_id)
            return
        status_key = self.keys.status(msg.key)
        delays = backoff()
        failures = 0
        while True:
            if not self.lease.held or halt.is_set():
                raise _LeaseLost  # another daemon may send now: do not race it
            record = await self.redis.hgetall(status_key)  # type: ignore[misc]
            state = _text(record.get(b"state", b"queued"))
            if state in FINAL_STATES:
                # Recorded before a crash, not yet acknowledged: done already.
                await self._ack(stream, entry_id)
                return
            uncertain = state == "sending" or record.get(b"uncertain") == b"1"
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    status_key, mapping={"state": "sending", "updated_at": repr(self._clock())}
                )
                pipe.hincrby(status_key, "attempts", 1)
                await pipe.execute()
            try:
                remote = await dest.deliver(msg, uncertain=uncertain)
            except Transient as exc:
                failures += 1
                wait = delays.compute(failures)
                await self.redis.hset(  # type: ignore[misc]
                    status_key,
                    mapping={
                        "state": "retrying",
                        "error": exc.detail[:500],
                        "uncertain": "1" if exc.uncertain or uncertain else "0",
                        "updated_at": repr(self._clock()),
                        "next_attempt_at": repr(self._clock() + wait),
                    },
                )
                self._count(name, "retried")
                log.warning(
                    "outbound.retry",
                    key=msg.key,
                    destination=name,
                    action=msg.action,
                    error=exc.detail,
                    attempt=failures,
                    wait=round(wait, 2),
                )
                if failures == 1:
                    await self._notify(msg.key)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(halt.wait(), wait)
                continue
            except Permanent as exc:
                await self._finish(stream, entry_id, status_key, "failed", error=str(exc))
                self._count(name, "failed")
                log.warning(
                    "outbound.failed",
                    key=msg.key,
                    destination=name,
                    action=msg.action,
                    contact_id=msg.contact_id,
                    reason=exc.reason,
                    detail=exc.detail,
                )
                await self._notify(msg.key)
                return
            await self._finish(stream, entry_id, status_key, "sent", remote_id=remote)
            self._count(name, "sent")
            log.info(
                "outbound.sent",
                key=msg.key,
                destination=name,
                action=msg.action,
                contact_id=msg.contact_id,
                remote_id=remote,
                uncertain=uncertain,
            )
            await self._notify(msg.key)
            return

    async def _finish(
        self,
        stream: str,
        entry_id: Any,
        status_key: str,
        state: str,
        *,
        error: str = "",
        remote_id: str = "",
    ) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                status_key,
                mapping={
                    "state": state,
                    "error": error[:500],
                    "remote_id": remote_id,
                    "uncertain": "0",
                    "updated_at": repr(self._clock()),
                },
            )
            pipe.hdel(status_key, "next_attempt_at")
            pipe.expire(status_key, STATUS_TTL)
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def _ack(self, stream: str, entry_id: Any) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    def _count(self, destination: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.total.labels(destination, outcome).inc()

    async def _notify(self, key: str) -> None:
        if self.on_status is None:
            return
        record = await self.status(key)
        if record is None:
            return
        try:
            await asyncio.wait_for(self.on_status(record), 2.0)
        except Exception as exc:  # a status push is a courtesy; the record is what counts
            log.warning("outbound.notify_failed", key=key, error=str(exc))
