"""Property: restoring any snapshot and replaying the journal tail gives the live state.

The router's restore path (snapshot -> replay after its id, ``now`` never going back, ticks as
entries) is what makes SIGKILL harmless; here it is checked on random journals against the
real Redis: wherever the snapshot was cut, the restored engine equals the one that applied the
whole journal.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.contact_event import ContactEvent, Sender
from router.daemon.journal import (
    AdminEntry,
    AgentEntry,
    ContactEntry,
    Journal,
    JournalEntry,
    TickEntry,
    connect_redis,
)
from router.daemon.lease import Lease
from router.daemon.router_loop import Router, RouterOptions
from router.engine import Engine
from router.messages import (
    Accept,
    Complete,
    LinkKeys,
    Login,
    Logout,
    Reject,
    RemoveExpert,
    Tick,
    UpsertExpert,
)
from router.snapshot import encode_state
from rules.load import load_routing
from rules.schema import Expert
from tests.daemon.conftest import REDIS_URL, write_routing
from tests.router.test_snapshot_deltas import assert_same
from tests.servers import key_prefix

pytestmark = pytest.mark.integration

AGENTS = ("anna", "bert")


class Sink:
    """Stands in for the MQTT publisher."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        self.sent.extend(messages)


def call(n: int, kind: str) -> ContactEvent:
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id=f"asterisk-ari:{n}",
        channel="phone",
        source="asterisk-ari",
        external_id=str(n),
        sender=Sender(phone=f"+49301111{n:02d}"),
    )


step = st.one_of(
    st.tuples(st.just("call"), st.integers(0, 5), st.sampled_from(["new", "end"])),
    st.tuples(st.just("agent"), st.sampled_from(AGENTS), st.sampled_from(["login", "logout"])),
    st.tuples(st.just("accept"), st.sampled_from(AGENTS), st.integers(1, 12)),
    st.tuples(st.just("reject"), st.sampled_from(AGENTS), st.integers(1, 12)),
    st.tuples(st.just("complete"), st.sampled_from(AGENTS), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.none(), st.none()),
    # Admin changes (journaled by the HTTP API): callers become experts, stop being one, and
    # two callers turn out to be one customer.
    st.tuples(st.just("upsert"), st.integers(0, 5), st.integers(1, 3)),
    st.tuples(st.just("remove"), st.integers(0, 5), st.none()),
    st.tuples(st.just("link"), st.integers(0, 5), st.integers(0, 5)),
)


def entries_of(steps: list[tuple[Any, Any, Any]], gaps: list[float]) -> list[JournalEntry]:
    out: list[JournalEntry] = []
    at = 1_000.0
    for (kind, a, b), gap in zip(steps, gaps, strict=False):
        # Receive times are not monotonic across ingest nodes: allow small steps back.
        at += gap
        if kind == "call":
            out.append(ContactEntry(event=call(a, b), at=at))
        elif kind == "agent":
            cmd: Any = Login(agent_id=a) if b == "login" else Logout(agent_id=a)
            out.append(AgentEntry(cmd=cmd, at=at))
        elif kind == "accept":
            out.append(AgentEntry(cmd=Accept(agent_id=a, offer_id=f"o{b}"), at=at))
        elif kind == "reject":
            out.append(AgentEntry(cmd=Reject(agent_id=a, offer_id=f"o{b}"), at=at))
        elif kind == "complete":
            out.append(AgentEntry(cmd=Complete(agent_id=a, contact_id=f"asterisk-ari:{b}"), at=at))
        elif kind == "upsert":
            expert = Expert(id=f"x{a}", level=b, phones=(f"+49301111{a:02d}",))
            out.append(AdminEntry(cmd=UpsertExpert(expert=expert), at=at))
        elif kind == "remove":
            out.append(AdminEntry(cmd=RemoveExpert(expert_id=f"x{a}"), at=at))
        elif kind == "link":
            keys = (f"phone:+49301111{a:02d}", f"phone:+49301111{b:02d}")
            out.append(AdminEntry(cmd=LinkKeys(keys=keys), at=at))
        else:
            out.append(TickEntry(at=at))
    return out


def apply_directly(engine: Engine, entries: list[JournalEntry]) -> float:
    now = 0.0
    for entry in entries:
        now = max(now, entry.at)
        msg: Any = (
            entry.event
            if isinstance(entry, ContactEntry)
            else entry.cmd
            if isinstance(entry, AgentEntry | AdminEntry)
            else Tick()
        )
        engine.handle(msg, now)
    return now


@pytest.fixture(scope="module")
def routing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_routing(tmp_path_factory.mktemp("replay") / "r.yaml", AGENTS, offer_timeout=3)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(step, min_size=1, max_size=30),
    gaps=st.lists(st.floats(min_value=-1.0, max_value=5.0), min_size=30, max_size=30),
    cut=st.integers(min_value=0, max_value=30),
)
async def test_any_snapshot_plus_tail_equals_the_live_state(
    routing: Path, steps: list[tuple[Any, Any, Any]], gaps: list[float], cut: int
) -> None:
    table = load_routing(routing)
    entries = entries_of(steps, gaps)
    cut = min(cut, len(entries))
    prefix = key_prefix(f"replay-{uuid.uuid4().hex[:8]}")
    client = connect_redis(REDIS_URL)
    try:
        journal = Journal(client, prefix)
        ids = await journal.append_many(entries)
        lease = Lease(client, journal.keys.lease, "t", 30)
        assert await lease.try_acquire()
        options = RouterOptions(topic_prefix="p", routing_path=str(routing), batch=7)

        # Live: the whole journal, no snapshot.
        live = Router(options, journal, lease, Sink(), table)  # type: ignore[arg-type]
        live_run = await live._restore()
        live_state = live_run.engine.state
        assert live_run.snapshotting is not None
        await live_run.snapshotting  # the snapshot taken after the restore is in

        # Crash after ``cut`` entries: a snapshot of that point, then restore + replay.
        await client.delete(journal.keys.snapshot, journal.keys.published)
        head = Engine(table)
        now = apply_directly(head, entries[:cut])
        if cut:
            await journal.save_snapshot(encode_state(head.state), ids[cut - 1], now=now)
        restored = Router(options, journal, lease, Sink(), table)  # type: ignore[arg-type]
        restored_run = await restored._restore()
        # The same records and the same table orders (a restored identity-key index may list
        # its keys in another order, which nothing reads).
        assert_same(restored_run.engine.state, live_state)
        assert restored_run.snapshotting is not None
        await restored_run.snapshotting
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
