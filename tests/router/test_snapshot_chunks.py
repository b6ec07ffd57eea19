"""The chunked snapshot (``router/snapshot.py``): whatever state the engine reaches and however
small the chunks, decoding the chunks gives the same state, and the engine restored from them
behaves the same; a chunk is never over the bound unless one record alone is."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import rule

from router.engine import Engine
from router.messages import LinkKeys, Tick
from router.snapshot import (
    Head,
    SnapshotError,
    decode_legacy,
    decode_state,
    encode_changes,
    encode_state,
)
from router.state import NO_EXCLUSIONS, STATE_DECODER, EngineState
from tests.router.enginekit import call
from tests.router.test_engine_stateful import ROUTING, EngineMachine


def assert_bounded(chunks: list[bytes], limit: int) -> None:
    """Every chunk after the first head is within ``limit``, or holds one record."""
    assert msgspec.msgpack.decode(chunks[0])[0] == "head"
    for chunk in chunks[1:]:
        kind, *fields = msgspec.msgpack.decode(chunk)
        if kind == "head":
            continue  # a delta's
        # Key fixes hold keys to bind and keys to drop, "gone" (table, ids); the others, records.
        if kind == "keyfixes":
            records = len(fields[0]) + len(fields[1])
        elif kind == "gone":
            records = len(fields[1])
        else:
            records = len(fields[0])
        assert len(chunk) <= limit or records == 1, (kind, len(chunk), records)


class ChunkedSnapshotMachine(EngineMachine):
    """The engine machine, restarted from chunked snapshots with random chunk bounds."""

    @rule(limit=st.integers(1, 4096), dt=st.floats(0, 30))
    def restart_from_chunks(self, limit: int, dt: float) -> None:
        chunks = list(encode_state(self.engine.state, limit))
        assert_bounded(chunks, limit)
        twin = Engine(ROUTING, decode_state(chunks))
        # Compared as records, not as JSON text: a restored field equal to its default may be
        # written out where the original left it out (``queue_entered_at: 0.0``), same state.
        assert STATE_DECODER.decode(twin.snapshot()) == STATE_DECODER.decode(self.engine.snapshot())
        assert twin.next_deadline() == self.engine.next_deadline()
        assert twin.handle(Tick(), self.now + dt) == self.apply(Tick(), dt)
        assert STATE_DECODER.decode(twin.snapshot()) == STATE_DECODER.decode(self.engine.snapshot())
        # The shared "no exclusions" dict is never written to by either engine.
        assert NO_EXCLUSIONS == {}
        self.engine = twin


TestChunkedSnapshotMachine = ChunkedSnapshotMachine.TestCase
TestChunkedSnapshotMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(max_examples=40, deadline=None)
@given(
    mails=st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=40),
    limit=st.integers(64, 2048),
)
def test_a_backlog_round_trips_in_chunks_within_the_bound_and_keeps_no_bodies(
    mails: list[str], limit: int
) -> None:
    eng = Engine(ROUTING)  # nobody logged in: every mail waits
    for n, text in enumerate(mails):
        mail = call(f"m{n}", channel="email", email=f"k{n % 7}@example.de", text=text)
        eng.handle(mail, float(n))
    assert len(eng.state.contacts) == len(mails)
    chunks = list(encode_state(eng.state, limit))
    assert_bounded(chunks, limit)
    state = decode_state(chunks)
    assert state == eng.state
    # The orders the engine acts on are kept (the oldest customer is forgotten first); the
    # key index is a look-up table, rebuilt from the customers' keys in their order.
    assert list(state.contacts) == list(eng.state.contacts)
    assert list(state.customers) == list(eng.state.customers)
    assert list(state.finished) == list(eng.state.finished)
    # The bodies stayed at the edge: none is in the engine's state.
    encoded = b"".join(chunks)
    assert not any(t.encode() in encoded for t in mails if len(t) > 40)


def test_chunks_that_are_not_a_snapshot_are_refused() -> None:
    good = list(encode_state(Engine(ROUTING).state))
    with pytest.raises(SnapshotError):
        decode_state(good[1:])  # no head
    with pytest.raises(SnapshotError):
        decode_state([b"\xc1garbage"])
    with pytest.raises(SnapshotError):
        decode_state([])


def test_a_snapshot_of_the_earlier_format_gives_the_state_and_the_events() -> None:
    # The earlier format: the whole state as one JSON value, each contact with its event.
    eng = Engine(ROUTING)
    mails = [
        call(f"m{n}", channel="email", email=f"k{n}@example.de", text=f"Hallo {n}")
        for n in range(3)
    ]
    for n, mail in enumerate(mails):
        eng.handle(mail, float(n))
    old = json.loads(eng.snapshot())
    for mail in mails:
        contact = old["contacts"][mail.contact_id]
        del contact["source"]
        contact["event"] = msgspec.to_builtins(mail)
    state, events = decode_legacy(json.dumps(old).encode())
    assert msgspec.json.encode(state) == eng.snapshot()
    assert events == {m.contact_id: m for m in mails}
    with pytest.raises(SnapshotError):
        decode_legacy(b"[1, 2]")


def _encode_format_1(state: EngineState) -> list[bytes]:
    """Chunks as the previous version wrote them: customers before contacts, no
    vocabularies, and the whole key index as a table of its own."""
    enc = msgspec.msgpack.encode
    return [
        enc(Head(format=1, seq=state.seq, clock=state.clock)),
        enc(["agents", list(state.agents.values())]),
        enc(["offers", list(state.offers.values())]),
        enc(["experts", list(state.experts.values())]),
        enc(["counters", list(state.counters.items())]),
        enc(["customers", list(state.customers.values())]),
        enc(["contacts", list(state.contacts.values())]),
        enc(["keys", list(state.keys.items())]),
        enc(["finished", list(state.finished.items())]),
    ]


@settings(max_examples=20, deadline=None)
@given(mails=st.integers(1, 30), linked=st.booleans())
def test_a_snapshot_the_previous_version_wrote_restores_to_the_same_state(
    mails: int, linked: bool
) -> None:
    # A daemon upgraded in place restores the snapshot its predecessor left in Redis.
    eng = Engine(ROUTING)
    for n in range(mails):
        eng.handle(call(f"m{n}", channel="email", email=f"k{n % 5}@example.de"), float(n))
    if linked:
        eng.handle(LinkKeys(keys=("email:k0@example.de", "email:k1@example.de")), 99.0)
    state = decode_state(_encode_format_1(eng.state))
    assert state == eng.state
    assert list(state.customers) == list(eng.state.customers)
    twin = Engine(ROUTING, state)
    assert twin.handle(Tick(), 200.0) == eng.handle(Tick(), 200.0)


@settings(max_examples=20, deadline=None)
@given(mails=st.integers(1, 30), more=st.integers(0, 10), ended=st.integers(0, 40))
def test_deltas_on_a_snapshot_the_previous_version_wrote_restore_to_the_same_state(
    mails: int, more: int, ended: int
) -> None:
    # An upgraded daemon goes on appending deltas to the generation it restored.
    eng = Engine(ROUTING)
    eng.track_changes()
    for n in range(mails):
        eng.handle(call(f"m{n}", channel="email", email=f"k{n % 5}@example.de"), float(n))
    base = _encode_format_1(eng.state)
    eng.take_changes()
    for n in range(mails, mails + more):
        eng.handle(call(f"m{n}", channel="email", email=f"k{n % 7}@example.de"), float(n))
    eng.handle(call(f"m{ended}", channel="email", kind="end"), 99.0)
    state = decode_state(base + encode_changes(eng.state, eng.take_changes()))
    assert state == eng.state
    assert list(state.contacts) == list(eng.state.contacts)
    assert list(state.customers) == list(eng.state.customers)
    twin = Engine(ROUTING, state)
    assert twin.handle(Tick(), 200.0) == eng.handle(Tick(), 200.0)
