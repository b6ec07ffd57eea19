"""The journal against the real Redis: order, durability signals, snapshots, fencing, trimming."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.contact_event import ContactEvent, Sender
from router.daemon.journal import (
    AgentEntry,
    ContactEntry,
    Journal,
    JournalUnavailable,
    SnapshotGone,
    TickEntry,
    connect_redis,
    decode_entry,
    encode_entry,
)
from router.messages import Accept, Login
from router.snapshot import SnapshotError, encode_state
from router.state import STATE_ENCODER, EngineState
from tests.daemon.conftest import Names, wait_until
from tests.servers import REDIS_URL, key_prefix

pytestmark = pytest.mark.integration


def call(n: int, kind: str = "new") -> ContactEvent:
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id=f"asterisk-ari:{n}",
        channel="phone",
        source="asterisk-ari",
        external_id=str(n),
        sender=Sender(phone="+4930123456"),
        text="Grüße aus Köln",
    )


async def test_entries_come_back_in_order_and_identical(journal: Journal) -> None:
    entries = [
        ContactEntry(event=call(1), at=100.0),
        AgentEntry(cmd=Login(agent_id="a1"), at=100.5),
        AgentEntry(cmd=Accept(agent_id="a1", offer_id="o1"), at=101.0),
        TickEntry(at=102.0),
        ContactEntry(event=call(1, "end"), at=103.0),
    ]
    ids = [await journal.append(entries[0])]
    ids += await journal.append_many(entries[1:])
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    got = await journal.read_after("0-0", block_ms=None, count=100)
    assert [i for i, _ in got] == ids
    assert [e for _, e in got] == entries
    # Reading after an id resumes exactly there.
    tail = await journal.read_after(ids[2], block_ms=None, count=100)
    assert [e for _, e in tail] == entries[3:]
    assert await journal.last_id() == ids[-1]


async def test_blocking_read_wakes_up_on_append(journal: Journal, names: Names) -> None:
    # The reader gets a connection of its own with a name, so the test can see in CLIENT LIST
    # when its XREAD is blocked in Redis: only an append after that is a test of the wake-up
    # ("$" means "after the newest entry when the XREAD arrives").
    name = f"stwtest-reader-{names.tag}"
    client = aioredis.Redis.from_url(REDIS_URL, client_name=name)
    reader_journal = Journal(client, names.key_prefix)
    reader = asyncio.create_task(reader_journal.read_after("$", block_ms=30_000, count=10))
    try:

        async def blocked() -> bool:
            clients = await journal.redis.client_list()
            return any(
                c.get("name") == name and c.get("cmd") == "xread" and "b" in c.get("flags", "")
                for c in clients
            )

        await wait_until(blocked, 30, "the XREAD to block in Redis")
        await journal.append(TickEntry(at=1.0))
        got = await asyncio.wait_for(reader, 10)
        assert [e for _, e in got] == [TickEntry(at=1.0)]
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.aclose()


async def test_a_foreign_entry_is_reported_not_fatal(journal: Journal) -> None:
    await journal.redis.xadd(journal.keys.journal, {b"e": b"{not json"})
    good = await journal.append(TickEntry(at=5.0))
    got = await journal.read_after("0-0", block_ms=None, count=10)
    assert got[0][1] is None
    assert got[1] == (good, TickEntry(at=5.0))


async def test_dead_letters_keep_reason_body_and_headers(journal: Journal) -> None:
    await journal.dead_letter(
        "twilio-voice",
        "bad_signature",
        "HMAC mismatch",
        b"\xff\x00raw",
        {"x-twilio-signature": "abc"},
    )
    (item,) = await journal.dead_letters()
    assert item["source"] == "twilio-voice"
    assert item["reason"] == "bad_signature"
    assert item["detail"] == "HMAC mismatch"
    assert item["body"] == b"\xff\x00raw"
    assert '"x-twilio-signature":"abc"' in item["headers"]


async def chunks_of(journal: Journal) -> list[bytes] | None:
    snap = await journal.load_snapshot()
    return None if snap is None else [c async for c in journal.snapshot_chunks(snap)]


async def snapshot_keys(journal: Journal) -> set[str]:
    return {
        k.decode()
        async for k in journal.redis.scan_iter(match=f"{journal.keys.snapshot}*")
        if k.decode() != journal.keys.snapshot_gens
    }


async def test_snapshot_round_trip_and_lease_fencing(journal: Journal) -> None:
    assert await journal.load_snapshot() is None
    await journal.redis.set(journal.keys.lease, "token-a")
    assert await journal.save_snapshot([b"state-1", b"more"], "5-0", lease_token="token-a")
    snap = await journal.load_snapshot()
    assert snap is not None and snap.last_id == "5-0"
    assert await chunks_of(journal) == [b"state-1", b"more"]
    # A router whose lease was taken over cannot overwrite the new holder's state.
    await journal.redis.set(journal.keys.lease, "token-b")
    assert not await journal.save_snapshot([b"stale"], "9-0", lease_token="token-a")
    assert await chunks_of(journal) == [b"state-1", b"more"]
    # ...nor leave its chunks behind: the pointer and its one generation are all there is.
    pointed = journal.keys.snapshot_gen(snap.gen)
    assert await snapshot_keys(journal) == {journal.keys.snapshot, pointed}
    assert not await journal.set_published("9-0", lease_token="token-a")
    assert await journal.published() == "0-0"
    assert await journal.set_published("9-0", lease_token="token-b")
    assert await journal.published() == "9-0"


async def test_a_snapshot_broken_off_mid_write_leaves_the_last_one_whole(journal: Journal) -> None:
    assert await journal.save_snapshot([b"a1", b"a2", b"a3"], "3-0")

    async def dies_after_two() -> AsyncIterator[bytes]:
        yield b"b1"
        yield b"b2"
        raise RuntimeError("the writer died here")

    with pytest.raises(RuntimeError):
        await journal.save_snapshot(dies_after_two(), "7-0")
    snap = await journal.load_snapshot()
    assert snap is not None and snap.last_id == "3-0"
    assert await chunks_of(journal) == [b"a1", b"a2", b"a3"]
    # The half-written generation is there until the next snapshot is in, then gone with
    # the old one.
    assert len(await snapshot_keys(journal)) == 3
    assert await journal.save_snapshot([b"c1"], "9-0")
    new = await journal.load_snapshot()
    assert new is not None and new.last_id == "9-0"
    assert await chunks_of(journal) == [b"c1"]
    pointed = journal.keys.snapshot_gen(new.gen)
    assert await snapshot_keys(journal) == {journal.keys.snapshot, pointed}
    # A reader still on the old generation learns it is gone (and reads the pointer again).
    with pytest.raises(SnapshotGone):
        [c async for c in journal.snapshot_chunks(snap)]


async def test_a_chunk_missing_is_found_before_any_chunk_is_read(journal: Journal) -> None:
    """A restore that retries on a lost generation costs a round trip, not a decode."""
    assert await journal.save_snapshot([f"c{i}".encode() for i in range(20)], "3-0")
    snap = await journal.load_snapshot()
    assert snap is not None
    await journal.redis.hdel(journal.keys.snapshot_gen(snap.gen), "17")  # type: ignore[misc]
    read: list[bytes] = []
    with pytest.raises(SnapshotGone) as gone:
        async for chunk in journal.snapshot_chunks(snap):
            read.append(chunk)
    assert read == []
    assert (gone.value.gen, gone.value.chunk, gone.value.chunks) == (snap.gen, 17, 20)
    assert str(gone.value) == f"snapshot {snap.gen}: chunk 17 of 20 is gone"


async def test_a_damaged_chunk_is_named_by_the_restore(journal: Journal) -> None:
    assert await journal.save_snapshot(list(encode_state(EngineState(), 1024)), "3-0")
    snap = await journal.load_snapshot()
    assert snap is not None and snap.chunks >= 1
    last = snap.chunks - 1
    await journal.redis.hset(journal.keys.snapshot_gen(snap.gen), str(last), b"\xc1")  # type: ignore[misc]
    with pytest.raises(SnapshotError, match=f"snapshot {snap.gen}: chunk {last} of {snap.chunks}"):
        await journal.snapshot_chain(snap)


async def test_a_snapshot_of_the_earlier_single_value_format_is_still_read(
    journal: Journal,
) -> None:
    state = EngineState(seq=7, clock=12.5)
    await journal.redis.hset(
        journal.keys.snapshot,
        mapping={"data": STATE_ENCODER.encode(state), "last_id": "4-0", "at": "1", "now": "12.5"},
    )
    snap = await journal.load_snapshot()
    assert snap is not None and (snap.last_id, snap.now) == ("4-0", 12.5)
    assert await journal.snapshot_state(snap) == state
    # The next snapshot replaces it with the chunked format.
    assert await journal.save_snapshot(encode_state(state), "5-0")
    snap = await journal.load_snapshot()
    assert snap is not None and snap.data is None and await journal.snapshot_state(snap) == state


async def test_trim_never_drops_what_the_snapshot_does_not_cover(journal: Journal) -> None:
    ids = await journal.append_many([TickEntry(at=float(i)) for i in range(300)])
    # retention 0: everything covered may go, but nothing after the covered id.
    covered = ids[149]
    await journal.trim(covered, retention=0.0)
    left = await journal.read_after("0-0", block_ms=None, count=1000)
    left_ids = [i for i, _ in left]
    assert set(ids[150:]) <= set(left_ids)
    # Long retention keeps everything, covered or not.
    await journal.trim(ids[-1], retention=3600.0)
    assert len(await journal.read_after("0-0", block_ms=None, count=1000)) == len(left)


async def test_redis_down_raises_journal_unavailable() -> None:
    # Nothing listens on port 1: every write must fail loudly, never pretend success.
    client = connect_redis("redis://127.0.0.1:1/0", timeout=0.5)
    journal = Journal(client, "stwtest:down:")
    try:
        with pytest.raises(JournalUnavailable):
            await journal.append(TickEntry(at=1.0))
        with pytest.raises(JournalUnavailable):
            await journal.append_many([TickEntry(at=1.0)])
        with pytest.raises(JournalUnavailable):
            await journal.dead_letter("x", "not_json", "", b"", {})
        with pytest.raises(JournalUnavailable):
            await journal.load_snapshot()
        assert not await journal.ping()
    finally:
        await client.aclose()


async def test_lag_counts_unapplied_entries(journal: Journal, redis_client: aioredis.Redis) -> None:
    ids = await journal.append_many([TickEntry(at=float(i)) for i in range(5)])
    assert (await journal.lag(ids[1]))[0] == 3
    assert await journal.lag(ids[-1]) == (0, 0.0)


texts = st.text(max_size=50)


@settings(max_examples=50, deadline=None)
@given(
    text=texts,
    tags=st.lists(st.text(min_size=1, max_size=8), max_size=3).map(tuple),
    attrs=st.dictionaries(st.text(max_size=8), texts, max_size=3),
    at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_every_entry_survives_encoding(
    text: str, tags: tuple[str, ...], attrs: dict[str, str], at: float
) -> None:
    event = ContactEvent(
        kind="update",
        contact_id="chatwoot:1",
        channel="chat",
        source="chatwoot",
        external_id="1",
        text=text,
        tags=tags,
        attributes=attrs,
    )
    entry = ContactEntry(event=event, at=at)
    assert decode_entry(encode_entry(entry)) == entry


@settings(max_examples=25, deadline=None)
@given(
    batches=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6),
    trim_after=st.integers(min_value=0, max_value=5),
)
def test_the_backlog_after_any_entry_is_exact_across_trims(
    batches: list[int], trim_after: int
) -> None:
    """added() - position(id) is the number of entries after id, also after a trim of older
    entries (the router trims only what its snapshot covers, never what comes after it)."""

    async def check() -> None:
        client = connect_redis(REDIS_URL)
        journal = Journal(client, key_prefix(f"lag-{uuid.uuid4().hex[:8]}"))
        try:
            assert await journal.added() == 0 and await journal.position("0-0") == 0
            ids: list[str] = []
            for n, size in enumerate(batches):
                ids += await journal.append_many([TickEntry(at=float(i)) for i in range(size)])
                if n == trim_after:
                    await client.xtrim(journal.keys.journal, maxlen=3)
            added = await journal.added()
            assert added == len(ids)
            kept = await client.xlen(journal.keys.journal)
            first = max(0, len(ids) - kept - 1)  # every entry after it is still there
            for i in sorted({first, (first + len(ids)) // 2, len(ids) - 1}):
                behind = len(ids) - 1 - i
                position = await journal.position(ids[i], cap=1000)
                assert position is not None and added - position == behind
            if len(ids) - 1 - first > 2:  # more than the cap behind: not counted, None
                assert await journal.position(ids[first], cap=2) is None
        finally:
            keys = [k async for k in client.scan_iter(match=f"{journal.keys.prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(check())
