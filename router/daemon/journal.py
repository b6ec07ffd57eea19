"""The journal: every accepted input, in order, in a Redis Stream — written before the ack.

Ingress (MQTT, HTTP, SMTP) appends :class:`JournalEntry` values and acknowledges its sender only
after the append returned; the router consumes the stream in order and feeds the engine with
``now = entry.at``, so replaying the stream from a snapshot rebuilds exactly the same state.
Inputs that cannot be decoded go to the dead-letter stream instead, with their reason, and are
acknowledged too (redelivering them would change nothing).

Keys (all under the configured ``key_prefix``): ``journal`` (stream), ``deadletter`` (stream),
``published`` (id of the last entry whose commands the router published), ``lease`` (the
routing lease, see :mod:`router.daemon.lease`), ``poison`` (ids of entries the engine failed on;
skipped by every replay), and the snapshot:

* ``snapshot:{gen}``: one generation, a hash of chunks ``"0"``, ``"1"``... (each at most
  :data:`router.snapshot.CHUNK_BYTES`, see :mod:`router.snapshot`), written one at a time: a
  whole state, then the deltas appended to it (:func:`router.snapshot.encode_changes`), each
  made visible by a switch of the pointer to the new number of chunks;
* ``snapshot``: the pointer, a small hash (gen, chunks, last_id, at, now), switched in one
  fenced Lua call only after every chunk of the generation is there (the call counts them);
* ``snapshot:gens``: every generation started, so those left half-written by a crash are
  removed with the old ones after the next switch to a new generation, or when the next
  tenure restores.

A new generation's base is written either by the router (the first snapshot of an
installation) or by the compaction process (:mod:`router.daemon.compact`, from the chunks of
the current generation); :meth:`Journal.switch_compacted` then carries the deltas appended
meanwhile over and switches to it.

A reader follows the pointer, so it sees the old snapshot or the new one, never a mix. A
pointer with a ``data`` field is a snapshot of an earlier version (one JSON value) and is read
as such. Snapshot and published-mark writes are fenced by the lease token: a router that lost
its lease cannot overwrite the state of the one that took over.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, ResponseError

from channels.contact_event import ContactEvent
from router.messages import AdminCommand, AgentCommand
from router.snapshot import ChainSize, SnapshotError, StateBuilder, decode_legacy
from router.state import EngineState

DEADLETTER_MAXLEN = 100_000


class JournalUnavailable(Exception):
    """Redis could not durably take the write (or read); the input must not be acknowledged."""


class ContactEntry(msgspec.Struct, frozen=True, kw_only=True, tag="contact", tag_field="t"):
    """A normalised contact event, stamped with the time ingress received it."""

    event: ContactEvent
    at: float


class AgentEntry(msgspec.Struct, frozen=True, kw_only=True, tag="agent", tag_field="t"):
    """An agent command; ``cmd.agent_id`` is already the one from the MQTT topic."""

    cmd: AgentCommand
    at: float


class AdminEntry(msgspec.Struct, frozen=True, kw_only=True, tag="admin", tag_field="t"):
    """An admin API change (link identity keys, add/change/remove a crowd expert).

    Journaled like everything else so that customers and experts are rebuilt by replay and
    kept in the snapshot: the journal and snapshot in Redis are where they are stored.
    """

    cmd: AdminCommand
    at: float


class TickEntry(msgspec.Struct, frozen=True, kw_only=True, tag="tick", tag_field="t"):
    """Time passed: the router appends one when the engine's next deadline is due."""

    at: float


JournalEntry = ContactEntry | AgentEntry | AdminEntry | TickEntry

_ENCODER = msgspec.json.Encoder()
_DECODER: msgspec.json.Decoder[JournalEntry] = msgspec.json.Decoder(JournalEntry)
_FIELD = b"e"


def encode_entry(entry: JournalEntry) -> bytes:
    """The bytes stored in the stream for one entry."""
    return _ENCODER.encode(entry)


def decode_entry(data: bytes) -> JournalEntry:
    """The entry stored as ``data``; raises msgspec.DecodeError if it is not one."""
    return _DECODER.decode(data)


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one Stellwerk installation (one key prefix)."""

    prefix: str

    @property
    def journal(self) -> str:
        return f"{self.prefix}journal"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}deadletter"

    @property
    def snapshot(self) -> str:
        return f"{self.prefix}snapshot"

    def snapshot_gen(self, gen: str) -> str:
        """The hash of one snapshot generation's chunks."""
        return f"{self.prefix}snapshot:{gen}"

    @property
    def snapshot_gens(self) -> str:
        return f"{self.prefix}snapshot:gens"

    @property
    def published(self) -> str:
        return f"{self.prefix}published"

    @property
    def lease(self) -> str:
        return f"{self.prefix}lease"

    @property
    def poison(self) -> str:
        return f"{self.prefix}poison"


@dataclass(frozen=True)
class Snapshot:
    """A saved engine state: its generation and number of chunks (``data`` instead for a
    snapshot of an earlier version), the id of the last journal entry it includes, and the
    engine time (``now``) of that entry; ``at`` is the wall-clock time the snapshot was
    written. :meth:`Journal.snapshot_state` reads the state itself."""

    last_id: str
    at: float
    now: float = 0.0
    gen: str = ""
    chunks: int = 0
    data: bytes | None = None


class SwitchUncertain(JournalUnavailable):
    """The snapshot pointer's switch was sent but its answer did not come back: the pointer
    may or may not count the new chunks, so appending at the old head could remove chunks the
    pointer counts. The caller must read the pointer again (a new tenure) before appending."""


class ChunksMissing(JournalUnavailable):
    """The switch found the generation without the chunks it should have (it was removed, or
    Redis evicted it): appending to it again cannot succeed; a new generation is needed."""


class _Fenced(Exception):
    """A chunk write was refused: this router no longer holds the lease."""


class SnapshotGone(Exception):
    """A chunk of the snapshot being read is gone: a newer one replaced it meanwhile (read
    the pointer again), or, if the pointer still names it, the generation was removed or
    evicted. ``chunk`` is the first one found missing, of ``chunks``."""

    def __init__(self, gen: str, chunk: int, chunks: int) -> None:
        self.gen = gen
        self.chunk = chunk
        self.chunks = chunks
        super().__init__(f"snapshot {gen}: chunk {chunk} of {chunks} is gone")


def connect_redis(url: str, *, timeout: float = 5.0) -> aioredis.Redis:
    """A Redis client that fails fast (one quick retry) so ingress can answer 503 promptly.

    Longer outages are handled by the callers' own back-off, not by blocking inside a request.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.2), 1),
        health_check_interval=0,
    )


# Only the lease holder may switch the snapshot or set the published mark (ARGV[1] is its
# token). The switch also checks that every chunk of the generation landed (-1 if not).
_FENCED_SWITCH = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('HLEN', KEYS[3]) ~= tonumber(ARGV[3]) then return -1 end
redis.call('UNLINK', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'chunks', ARGV[3], 'last_id', ARGV[4],
           'at', ARGV[5], 'now', ARGV[6])
return 1
"""
# Appending to a generation: only the lease holder writes its chunks (a router that lost the
# lease must not overwrite a chunk the pointer already counts), and the first call of a delta
# (ARGV[3] = 1) drops chunks from ARGV[2] on, left by a delta that was not switched to.
_FENCED_APPEND = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(field) >= tonumber(ARGV[2]) then redis.call('HDEL', KEYS[1], field) end
  end
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
return 1
"""
# Removing generations: only while ARGV[1] holds the lease (KEYS[1]), and never the one the
# pointer (KEYS[2]) names now: a router that lost its lease (and still takes the pointer of its
# tenure for the current one) must not remove the generation the new holder switched to.
# KEYS[3] is snapshot:gens, KEYS[i + 2] the key of generation ARGV[i].
_FENCED_DROP = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local current = redis.call('HGET', KEYS[2], 'gen')
for i = 2, #ARGV do
  if ARGV[i] ~= current then
    redis.call('UNLINK', KEYS[i + 2])
    redis.call('SREM', KEYS[3], ARGV[i])
  end
end
return 1
"""
_FENCED_SET = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def _id_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


class Journal:
    """The journal, dead-letter stream and snapshots of one installation."""

    def __init__(self, client: aioredis.Redis, key_prefix: str) -> None:
        self.redis = client
        self.keys = Keys(key_prefix)
        #: the pointer of the last snapshot :meth:`save_snapshot` switched to.
        self.saved: Snapshot | None = None
        self._fenced_switch = client.register_script(_FENCED_SWITCH)
        self._fenced_set = client.register_script(_FENCED_SET)
        self._fenced_append = client.register_script(_FENCED_APPEND)
        self._fenced_drop = client.register_script(_FENCED_DROP)

    # ---- ingress ------------------------------------------------------------------------

    async def append(self, entry: JournalEntry) -> str:
        """Append one entry; its stream id. Raises JournalUnavailable when Redis is down."""
        try:
            entry_id = await self.redis.xadd(self.keys.journal, {_FIELD: encode_entry(entry)})
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def append_many(self, entries: Sequence[JournalEntry]) -> list[str]:
        """Append several entries in one round trip, in order (all or an exception)."""
        if not entries:
            return []
        try:
            # MULTI/EXEC: a batch lands whole or not at all, so a retry does not half-duplicate.
            async with self.redis.pipeline(transaction=True) as pipe:
                for entry in entries:
                    pipe.xadd(self.keys.journal, {_FIELD: encode_entry(entry)})
                ids = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def dead_letter(
        self,
        source: str,
        reason: str,
        detail: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Keep a rejected input with its reason for inspection (bounded stream)."""
        fields: dict[Any, Any] = {
            b"source": source,
            b"reason": reason,
            b"detail": detail,
            b"body": body,
            b"headers": _ENCODER.encode(dict(headers or {})),
            b"at": repr(time.time()),
        }
        try:
            entry_id = await self.redis.xadd(
                self.keys.deadletter, fields, maxlen=DEADLETTER_MAXLEN, approximate=True
            )
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The oldest ``count`` dead letters (for tests and operators), decoded."""
        rows = await self.redis.xrange(self.keys.deadletter, count=count)
        out: list[dict[str, Any]] = []
        for entry_id, fields in rows:
            item: dict[str, Any] = {"id": entry_id.decode()}
            for k, v in fields.items():
                key = k.decode()
                item[key] = v if key == "body" else v.decode("utf-8", "replace")
            out.append(item)
        return out

    # ---- router -------------------------------------------------------------------------

    async def read_after(
        self, last_id: str, block_ms: int | None, count: int
    ) -> list[tuple[str, JournalEntry | None]]:
        """Entries after ``last_id`` (oldest first), waiting up to ``block_ms`` for the first.

        An entry that does not decode (written by a foreign tool, or corrupt) comes back as
        ``(id, None)`` so the router can skip it and report it instead of stopping.
        """
        try:
            reply = await self.redis.xread(
                {self.keys.journal: last_id}, count=count, block=block_ms
            )
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        out: list[tuple[str, JournalEntry | None]] = []
        for _stream, rows in reply or ():
            for entry_id, fields in rows:
                raw = fields.get(_FIELD)
                entry: JournalEntry | None = None
                if raw is not None:
                    try:
                        entry = decode_entry(raw)
                    except msgspec.DecodeError:
                        entry = None
                out.append((entry_id.decode(), entry))
        return out

    async def last_id(self) -> str:
        """The id of the newest entry in the journal, ``"0-0"`` when empty."""
        try:
            rows = await self.redis.xrevrange(self.keys.journal, count=1)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return rows[0][0].decode() if rows else "0-0"

    async def lag(self, after_id: str, cap: int = 10_000) -> tuple[int, float]:
        """(entries after ``after_id`` up to ``cap``, age in seconds of the oldest of them)."""
        start = "(" + after_id if after_id != "0-0" else "-"
        try:
            rows = await self.redis.xrange(self.keys.journal, min=start, count=cap)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        if not rows:
            return 0, 0.0
        age = max(0.0, time.time() - _id_ms(rows[0][0].decode()) / 1000.0)
        return len(rows), age

    async def added(self) -> int:
        """How many entries were ever appended to the journal (Redis 7 ``entries-added``;
        trimming does not lower it). 0 while the journal does not exist."""
        try:
            info = await self.redis.xinfo_stream(self.keys.journal)
        except ResponseError:
            return 0  # no such key yet
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return int(info.get("entries-added", 0))

    async def position(self, last_id: str, cap: int = 1000) -> int | None:
        """The ``entries-added`` count at entry ``last_id``: the number of entries appended up
        to and including it, so that ``added() - position`` is the exact backlog after it.

        Read atomically with the entries after ``last_id`` (MULTI/EXEC); None when more than
        ``cap`` of them are there already (the caller counts again later).
        """
        start = "(" + last_id if last_id != "0-0" else "-"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.exists(self.keys.journal)
                pipe.xinfo_stream(self.keys.journal)
                pipe.xrange(self.keys.journal, min=start, count=cap + 1)
                exists, info, rows = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        if not exists:
            return 0
        if isinstance(info, Exception) or isinstance(rows, Exception) or len(rows) > cap:
            return None
        return int(info.get("entries-added", 0)) - len(rows)

    async def save_snapshot(
        self,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        last_id: str,
        *,
        now: float = 0.0,
        lease_token: str | None = None,
        append_to: Snapshot | None = None,
    ) -> bool:
        """Save the engine state (as :func:`router.snapshot.encode_state`'s chunks) covering
        the journal up to ``last_id``: a new generation, chunk by chunk, then the pointer, then
        the older generations are removed (``UNLINK``: Redis frees them in the background).

        With ``append_to`` (the pointer this router switched to last, :attr:`saved`) the chunks
        are a delta (:func:`router.snapshot.encode_changes`) written after that generation's
        chunks, and the pointer then counts them too; until the switch a reader sees the
        snapshot without them, and a delta cut short leaves that snapshot as it was.

        With ``lease_token`` the switch happens only while that token holds the lease; returns
        False when it does not (the caller lost the lease and must stop routing).
        """
        if append_to is not None:
            gen, n = append_to.gen, append_to.chunks
        else:
            gen, n = uuid.uuid4().hex[:16], 0
        key = self.keys.snapshot_gen(gen)
        try:
            return await self._save(chunks, last_id, now, lease_token, append_to, gen, n, key)
        except _Fenced:
            return False

    async def _save(
        self,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        last_id: str,
        now: float,
        lease_token: str | None,
        append_to: Snapshot | None,
        gen: str,
        n: int,
        key: str,
    ) -> bool:
        try:
            # Also for a delta: should its generation be gone, what it wrote is removed with
            # the old generations after the next switch.
            await self.redis.sadd(self.keys.snapshot_gens, gen)  # type: ignore[misc]
            first = n
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    await self._put_chunk(key, n, chunk, append_to, first, lease_token)
                    n += 1
            else:
                for chunk in chunks:
                    await self._put_chunk(key, n, chunk, append_to, first, lease_token)
                    n += 1
            try:
                done = await self._fenced_switch(
                    keys=[self.keys.snapshot, self.keys.lease, key],
                    args=[lease_token or "", gen, n, last_id, repr(time.time()), repr(now)],
                )
            except (RedisError, OSError) as exc:
                raise SwitchUncertain(str(exc)) from exc
            if done == -1:
                raise ChunksMissing(f"snapshot {gen}: chunks missing at the switch")
            if not done:
                if append_to is None:
                    await self._drop_generations({gen})
                return False
            if append_to is None:
                gens = await self.redis.smembers(self.keys.snapshot_gens)  # type: ignore[misc]
                await self._drop_generations({g.decode() for g in gens} - {gen}, lease_token)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        self.saved = Snapshot(last_id=last_id, at=time.time(), now=now, gen=gen, chunks=n)
        return True

    async def write_generation(
        self, chunks: Iterable[bytes] | AsyncIterable[bytes]
    ) -> tuple[str, int, int]:
        """Write ``chunks`` as a new generation that nothing points to yet (the compaction's
        full state, see :mod:`router.daemon.compact`): (generation, chunks, bytes). Listed in
        ``snapshot:gens`` first, so one left unfinished is removed after the next switch."""
        gen = uuid.uuid4().hex[:16]
        key = self.keys.snapshot_gen(gen)
        n = size = 0
        try:
            await self.redis.sadd(self.keys.snapshot_gens, gen)  # type: ignore[misc]
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    await self.redis.hset(key, str(n), chunk)  # type: ignore[misc,arg-type]
                    n, size = n + 1, size + len(chunk)
            else:
                for chunk in chunks:
                    await self.redis.hset(key, str(n), chunk)  # type: ignore[misc,arg-type]
                    n, size = n + 1, size + len(chunk)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return gen, n, size

    async def switch_compacted(
        self,
        gen: str,
        chunks: int,
        covers: int,
        head: Snapshot,
        *,
        lease_token: str | None = None,
    ) -> bool:
        """Make generation ``gen`` (``chunks`` chunks: the state of ``head``'s generation up
        to its chunk ``covers``) the snapshot: the chunks ``head`` has after ``covers`` (the
        deltas written meanwhile) are copied after them, one at a time, then the pointer is
        switched to ``gen`` with ``head``'s journal cursor, in one fenced call, and the older
        generations go. Until the switch ``head`` stays the snapshot, whole.

        False when ``lease_token`` no longer holds the lease (``gen`` is removed then)."""
        src = self.keys.snapshot_gen(head.gen)
        key = self.keys.snapshot_gen(gen)
        n = chunks
        try:
            for i in range(covers, head.chunks):
                chunk = await self.redis.hget(src, str(i))  # type: ignore[misc]
                if chunk is None:
                    # The head's generation was removed (by hand, evicted): no switch to a
                    # copy of it can succeed, now or later.
                    raise ChunksMissing(f"snapshot {head.gen}: chunk {i} is gone")
                await self.redis.hset(key, str(n), chunk)  # type: ignore[misc]
                n += 1
            done = await self._fenced_switch(
                keys=[self.keys.snapshot, self.keys.lease, key],
                args=[lease_token or "", gen, n, head.last_id, repr(time.time()), repr(head.now)],
            )
            if done == -1:
                raise ChunksMissing(f"snapshot {gen}: chunks missing at the switch")
            if not done:
                await self._drop_generations({gen})
                return False
            gens = await self.redis.smembers(self.keys.snapshot_gens)  # type: ignore[misc]
            await self._drop_generations({g.decode() for g in gens} - {gen}, lease_token)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        self.saved = Snapshot(last_id=head.last_id, at=time.time(), now=head.now, gen=gen, chunks=n)
        return True

    async def _put_chunk(
        self,
        key: str,
        n: int,
        chunk: bytes,
        append_to: Snapshot | None,
        first: int,
        lease_token: str | None,
    ) -> None:
        if append_to is None:  # a new generation: nobody else writes to it
            await self.redis.hset(key, str(n), chunk)  # type: ignore[misc,arg-type]
            return
        done = await self._fenced_append(
            keys=[key, self.keys.lease],
            args=[lease_token or "", n, "1" if n == first else "0", chunk],
        )
        if not done:
            raise _Fenced()

    async def drop_generations_except(self, gen: str, *, lease_token: str | None = None) -> None:
        """Remove every generation but ``gen`` (the pointer's): what a crashed snapshot or a
        failed compaction left. With ``lease_token`` nothing is removed unless that token holds
        the lease; the generation the pointer names in Redis is never removed."""
        try:
            gens = await self.redis.smembers(self.keys.snapshot_gens)  # type: ignore[misc]
            await self._drop_generations({g.decode() for g in gens} - {gen}, lease_token)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc

    async def _drop_generations(self, gens: set[str], lease_token: str | None = None) -> None:
        if gens:
            names = sorted(gens)
            await self._fenced_drop(
                keys=[
                    self.keys.lease,
                    self.keys.snapshot,
                    self.keys.snapshot_gens,
                    *(self.keys.snapshot_gen(g) for g in names),
                ],
                args=[lease_token or "", *names],
            )

    async def load_snapshot(self) -> Snapshot | None:
        """The last saved snapshot's pointer, or None when there is none yet."""
        try:
            fields = await self.redis.hgetall(self.keys.snapshot)  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        if not fields or (b"gen" not in fields and b"data" not in fields):
            return None
        return Snapshot(
            last_id=fields.get(b"last_id", b"0-0").decode(),
            at=float(fields.get(b"at", b"0")),
            now=float(fields.get(b"now", b"0")),
            gen=fields.get(b"gen", b"").decode(),
            chunks=int(fields.get(b"chunks", b"0")),
            data=fields.get(b"data"),
        )

    async def snapshot_chunks(self, snap: Snapshot) -> AsyncIterator[bytes]:
        """The chunks of ``snap``, in order, read a few at a time; raises SnapshotGone when a
        newer snapshot replaced it meanwhile (load the pointer again), or before the first
        chunk when one is missing already."""
        key = self.keys.snapshot_gen(snap.gen)
        # A generation removed or evicted is found before anything is decoded: a restore that
        # retries while it stays gone costs a round trip, not a decode of the state up to it.
        missing = await self._first_missing(key, snap.chunks)
        if missing is not None:
            raise SnapshotGone(snap.gen, missing, snap.chunks)
        step = 8
        for first in range(0, snap.chunks, step):
            fields = [str(i) for i in range(first, min(first + step, snap.chunks))]
            try:
                values = await self.redis.hmget(key, fields)  # type: ignore[misc]
            except (RedisError, OSError) as exc:
                raise JournalUnavailable(str(exc)) from exc
            for i, value in enumerate(values, first):
                if value is None:
                    raise SnapshotGone(snap.gen, i, snap.chunks)
                yield value

    async def _first_missing(self, key: str, chunks: int) -> int | None:
        step = 1024
        try:
            for first in range(0, chunks, step):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for i in range(first, min(first + step, chunks)):
                        pipe.hexists(key, str(i))
                    found = await pipe.execute()
                for i, there in enumerate(found, first):
                    if not there:
                        return i
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return None

    async def snapshot_state(self, snap: Snapshot) -> EngineState:
        """The engine state ``snap`` holds, decoded chunk by chunk (a SnapshotError from
        :mod:`router.snapshot` if it is damaged). For a snapshot of the earlier format the
        router uses :func:`router.snapshot.decode_legacy`, which also gives the events."""
        if snap.data is not None:
            return decode_legacy(snap.data)[0]
        return (await self.snapshot_chain(snap))[0]

    async def snapshot_chain(self, snap: Snapshot) -> tuple[EngineState, ChainSize]:
        """The state of a chunked snapshot ``snap``, and the size of its full state and of
        the deltas after it (where a router that goes on appending starts counting).

        Raises SnapshotGone for a missing chunk and SnapshotError (naming the chunk) for one
        that does not decode."""
        with StateBuilder() as builder:
            n = 0
            async for chunk in self.snapshot_chunks(snap):
                try:
                    builder.feed(chunk)
                except SnapshotError as exc:
                    raise SnapshotError(
                        f"snapshot {snap.gen}: chunk {n} of {snap.chunks}: {exc}"
                    ) from exc
                n += 1
            try:
                return builder.finish(), builder.size
            except SnapshotError as exc:
                raise SnapshotError(f"snapshot {snap.gen}: {exc}") from exc

    async def set_published(self, last_id: str, *, lease_token: str | None = None) -> bool:
        """Record that the commands of every entry up to ``last_id`` were published."""
        try:
            done = await self._fenced_set(
                keys=[self.keys.published, self.keys.lease], args=[lease_token or "", last_id]
            )
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return bool(done)

    async def published(self) -> str:
        """The id up to which commands were published, ``"0-0"`` if never."""
        try:
            value = await self.redis.get(self.keys.published)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return value.decode() if value else "0-0"

    async def trim(self, covered_id: str, retention: float) -> int:
        """Drop entries covered by a snapshot (``<= covered_id``) and older than ``retention`` s.

        Never drops anything newer than the snapshot, so a restart can always replay the tail.
        Returns how many entries were removed (approximate trimming: Redis frees whole nodes).
        """
        keep_from_ms = int((time.time() - retention) * 1000)
        min_id = min(_id_ms(covered_id), keep_from_ms)
        if min_id <= 0:
            return 0
        try:
            removed = await self.redis.xtrim(self.keys.journal, minid=str(min_id), approximate=True)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return int(removed)

    async def add_poisoned(self, entry_id: str) -> None:
        """Set entry ``entry_id`` aside for good: the engine failed on it, so every replay
        of the daemon (a restart, a standby taking over) skips it."""
        try:
            await self.redis.sadd(self.keys.poison, entry_id)  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc

    async def poisoned(self) -> set[str]:
        """The ids of the entries set aside with :meth:`add_poisoned`."""
        try:
            members = await self.redis.smembers(self.keys.poison)  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return {m.decode() for m in members}

    async def ping(self) -> bool:
        """Whether Redis answers."""
        try:
            return bool(await self.redis.ping())  # type: ignore[misc]
        except (RedisError, OSError):
            return False
