"""Incremental snapshots (``router/snapshot.py``, ``Engine.take_changes``): a base and the
deltas cut after it, decoded in order, are the engine's state at the last cut, the tables'
order included, and the engine restored from them behaves the same. The engine machine of
``test_engine_stateful`` drives every transition; bases and deltas are cut between any of its
steps, with random chunk bounds."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import rule

from router.engine import Engine
from router.messages import Tick
from router.snapshot import decode_state, encode_changes, encode_state
from router.state import NO_EXCLUSIONS, STATE_DECODER, Changes, EngineState, moved
from tests.router.enginekit import call
from tests.router.test_engine_stateful import ROUTING, EngineMachine
from tests.router.test_snapshot_chunks import assert_bounded


def assert_same(restored: EngineState, live: EngineState) -> None:
    assert restored == live
    # The orders the engine acts on: the oldest customer is forgotten first, the oldest
    # finished contact is dropped first; contacts in the order they came.
    assert list(restored.contacts) == list(live.contacts)
    assert list(restored.customers) == list(live.customers)
    assert list(restored.finished) == list(live.finished)


class DeltaSnapshotMachine(EngineMachine):
    """The engine machine, snapshotted as a base plus deltas and restarted from them."""

    def __init__(self) -> None:
        super().__init__()
        self.engine.track_changes()
        self.chain = list(encode_state(self.engine.state))

    @rule(limit=st.integers(1, 4096))
    def cut_delta(self, limit: int) -> None:
        delta = encode_changes(self.engine.state, self.engine.take_changes(), limit)
        assert_bounded(delta, limit)
        self.chain += delta

    @rule(limit=st.integers(64, 4096))
    def cut_base(self, limit: int) -> None:
        self.engine.take_changes()  # the base holds them
        self.chain = list(encode_state(self.engine.state, limit))

    @rule(dt=st.floats(0, 30))
    def restart_from_snapshot(self, dt: float) -> None:
        # The machine's own restart (from one JSON snapshot): a new engine, so a new base.
        super().restart_from_snapshot(dt)
        self.engine.track_changes()
        self.chain = list(encode_state(self.engine.state))

    @rule(dt=st.floats(0, 30))
    def restart_from_base_and_deltas(self, dt: float) -> None:
        self.chain += encode_changes(self.engine.state, self.engine.take_changes())
        twin = Engine(ROUTING, decode_state(self.chain))
        assert_same(twin.state, self.engine.state)
        assert STATE_DECODER.decode(twin.snapshot()) == STATE_DECODER.decode(self.engine.snapshot())
        assert twin.next_deadline() == self.engine.next_deadline()
        twin.track_changes()
        assert twin.handle(Tick(), self.now + dt) == self.apply(Tick(), dt)
        assert NO_EXCLUSIONS == {}
        # Go on with the restored engine: its deltas continue the same chain.
        self.engine = twin


TestDeltaSnapshotMachine = DeltaSnapshotMachine.TestCase
TestDeltaSnapshotMachine.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_delta_holds_only_what_changed() -> None:
    # A backlog of 300 mails, then three more and one that ends: the delta is those four
    # (and the small tables), not the backlog.
    eng = Engine(ROUTING)
    eng.track_changes()
    for n in range(300):
        eng.handle(call(f"m{n}", channel="email", email=f"k{n}@example.de"), n / 1000)
    base = list(encode_state(eng.state))
    eng.take_changes()
    for n in range(300, 303):
        eng.handle(call(f"m{n}", channel="email", email=f"k{n}@example.de"), n / 1000)
    eng.handle(call("m7", channel="email", kind="end"), 0.4)
    changes = eng.take_changes()
    assert set(changes.contacts) == {f"generic:m{n}" for n in (300, 301, 302, 7)}
    delta = encode_changes(eng.state, changes)
    assert sum(map(len, delta)) < sum(map(len, base)) / 20
    assert_same(decode_state(base + delta), eng.state)


def test_an_engine_that_does_not_track_keeps_no_changes() -> None:
    eng = Engine(ROUTING)
    for n in range(50):
        eng.handle(call(f"m{n}", channel="email", email=f"k{n}@example.de"), n / 1000)
    assert len(eng.take_changes()) == 0


_MARKS = st.lists(
    st.tuples(
        st.sampled_from(["contacts", "customers", "finished", "keys"]),
        st.sampled_from("abcdef"),
        st.booleans(),
    ),
    max_size=40,
)


def _mark(changes: Changes, marks: list[tuple[str, str, bool]]) -> None:
    for table, key, was_moved in marks:
        if was_moved:
            moved(getattr(changes, table), key)
        else:
            getattr(changes, table).setdefault(key, False)


@given(_MARKS, _MARKS)
def test_changes_put_back_are_as_if_they_had_never_been_taken(
    before: list[tuple[str, str, bool]], after: list[tuple[str, str, bool]]
) -> None:
    # A delta that was not written puts its changes back: the next delta must then mark the
    # same records, in the same order, as if no cut had happened in between.
    unbroken, cut = Changes(), Changes()
    _mark(unbroken, before + after)
    _mark(cut, before)
    taken = cut.take()
    _mark(cut, after)
    cut.put_back(taken)
    for table in Changes.__slots__:
        assert list(getattr(cut, table).items()) == list(getattr(unbroken, table).items())
