"""The telephony connector's translation: engine commands -> PBX actions, PBX happenings ->
journal entries, and reconciliation.

The driver here is a small fake that records what the connector asks of it (this is a test of
the connector, not of an adapter; the adapters are tested against protocol peers). Everything
else is real: the journal on the real Redis, the intake and its ARI decoder, the engine. A tiny
loop in the test plays the router: it applies journal entries to the engine and hands the
commands to the connector, as ``Router`` does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from channels.base import DecodeConfig
from router.daemon.intake import Intake
from router.daemon.journal import AgentEntry, ContactEntry, Journal, connect_redis
from router.daemon.telephony.connector import (
    HoldSpec,
    PbxCall,
    PbxEvents,
    PbxLeg,
    PbxView,
    TelephonyConnector,
)
from router.engine import Engine
from router.messages import Login, Tick
from rules.load import parse_routing
from tests.daemon.conftest import wait_until
from tests.daemon.private_servers import REDIS_SERVER, PrivateRedis

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "samples" / "phone"

ROUTING = """\
defaults: {offer_timeout: 5, wrap_up: 2}
skills: [support]
queues:
  support: {skills: {support: 1}, music_class: jazz,
            announcement: {media: "sound:queue-periodic-announce", every: 30}}
  desk: {skills: {support: 1}, phone_offer: desktop}
agents:
  - {id: anna, skills: {support: 3}, endpoints: {asterisk: PJSIP/1001}}
  - {id: ben, skills: {support: 3}, endpoints: {asterisk: PJSIP/1002}}
  - {id: carl, skills: {support: 3}}
rules:
  - {name: desk, when: 'attributes.queue == "desk"', queue: desk}
  - {name: default, default: true, queue: support}
"""


def stasis_start(channel_id: str, *args: str) -> bytes:
    data = json.loads((SAMPLE / "asterisk-ari-stasis-start.json").read_bytes())
    data["channel"]["id"] = channel_id
    data["args"] = list(args)
    return json.dumps(data).encode()


def stasis_end(channel_id: str) -> bytes:
    data = json.loads((SAMPLE / "asterisk-ari-stasis-end.json").read_bytes())
    data["channel"]["id"] = channel_id
    return json.dumps(data).encode()


class FakeDriver:
    """Records every action; its view is whatever the test sets."""

    source = "asterisk-ari"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.pbx: PbxView | None = PbxView()
        self.events: PbxEvents | None = None

    async def run(self, events: PbxEvents) -> None:
        self.events = events
        await asyncio.Event().wait()

    def view(self) -> PbxView | None:
        return self.pbx

    async def hold(self, call_id: str, spec: HoldSpec) -> None:
        self.calls.append(("hold", call_id, spec.music_class))

    async def ring(self, offer_id: str, call_id: str, endpoint: str, timeout: float) -> None:
        self.calls.append(("ring", offer_id, call_id, endpoint, round(timeout)))

    async def stop_ring(self, offer_id: str) -> None:
        self.calls.append(("stop_ring", offer_id))

    async def bridge(self, call_id: str, offer_id: str) -> None:
        self.calls.append(("bridge", call_id, offer_id))

    async def hangup(self, call_id: str) -> None:
        self.calls.append(("hangup", call_id))

    def ended_payload(self, call_id: str) -> bytes:
        return stasis_end(call_id)

    def http_routes(self) -> Sequence[web.AbstractRouteDef]:
        return []

    def openapi_paths(self) -> dict[str, Any]:
        return {}

    def take(self) -> list[tuple[Any, ...]]:
        out, self.calls = self.calls, []
        return out


class World:
    """Journal + engine + connector, and a router stand-in that applies what was journaled."""

    def __init__(self, journal: Journal) -> None:
        self.now = 1000.0
        self.journal = journal
        self.table = parse_routing(ROUTING, "routing.yaml")
        self.engine = Engine(self.table)
        self.driver = FakeDriver()
        self.intake = Intake(journal, DecodeConfig(), clock=lambda: self.now)
        self.connector = TelephonyConnector(
            "asterisk", self.driver, self.intake, self.table, clock=lambda: self.now
        )
        self.last = "0-0"
        self.events: list[str] = []

    async def start(self) -> None:
        await self.connector.restored(self.engine)
        self.task = asyncio.create_task(self.connector.run())
        await self.settle()

    async def feed(self, message: Any) -> None:
        cmds = self.engine.handle(message, self.now)
        self.events += [getattr(c, "type", type(c).__name__) for c in cmds]
        await self.connector.submit(cmds)

    async def settle(self) -> None:
        """Apply everything journaled (as the router would), until the connector is idle."""
        for _ in range(20):
            await asyncio.sleep(0)
            await asyncio.wait_for(self.connector.drain(), 5)
            rows = await self.journal.read_after(self.last, None, 100)
            if not rows:
                return
            for entry_id, entry in rows:
                self.last = entry_id
                assert isinstance(entry, ContactEntry | AgentEntry)
                await self.feed(entry.event if isinstance(entry, ContactEntry) else entry.cmd)

    async def tick(self, seconds: float) -> None:
        self.now += seconds
        await self.feed(Tick())
        await self.settle()

    def offer(self, contact: str) -> str:
        info = self.engine.contact_info(f"asterisk-ari:{contact}")
        assert info is not None and info["offer_id"], info
        return str(info["offer_id"])

    def state(self, contact: str) -> str | None:
        info = self.engine.contact_info(f"asterisk-ari:{contact}")
        return None if info is None else info["state"]


@pytest.fixture
async def world(journal: Journal) -> Any:
    w = World(journal)
    await w.start()
    yield w
    w.task.cancel()
    await asyncio.gather(w.task, return_exceptions=True)


async def test_a_call_is_journaled_then_held_rung_accepted_bridged_and_hung_up(world: Any) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    assert await w.connector.call_arrived("c1", stasis_start("c1"))
    assert w.state("c1") is None  # journaled, not yet applied: nothing done to the call yet
    assert d.take() == []
    await w.settle()
    # Held with the queue's music, and anna's phone rings for the offer (5 s + 5 s grace).
    calls = d.take()
    offer = w.offer("c1")
    assert calls == [
        ("hold", "c1", "default"),
        ("hold", "c1", "jazz"),
        ("ring", offer, "c1", "PJSIP/1001", 10),
    ]
    assert w.state("c1") == "offered"
    await w.connector.leg_answered(offer)
    await w.settle()
    assert w.state("c1") == "assigned"
    assert d.take() == [("bridge", "c1", offer)]
    # The agent hangs up: complete, wrap-up, and the caller's side is cleaned up.
    await w.connector.leg_hung_up(offer)
    await w.settle()
    assert "contact.completed" in w.events
    assert w.state("c1") == "wrap_up"
    assert d.take() == [("hangup", "c1")]


async def test_no_answer_is_rona_and_the_next_agent_rings(world: Any) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    await w.connector.call_arrived("c1", stasis_start("c1"))
    await w.settle()
    await w.feed(Login(agent_id="ben"))
    await w.settle()
    d.take()
    first = w.offer("c1")
    await w.tick(5.1)  # the offer expires: the engine's RONA, not the PBX
    calls = d.take()
    assert calls[0] == ("stop_ring", first)
    assert calls[1][:4] == ("ring", calls[1][1], "c1", "PJSIP/1002")
    assert "contact.offer_expired" in w.events


async def test_busy_rejects_and_rings_the_next_agent_at_once(world: Any) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    await w.feed(Login(agent_id="ben"))
    await w.connector.call_arrived("c1", stasis_start("c1"))
    await w.settle()
    first = next(c for c in d.take() if c[0] == "ring")
    await w.connector.leg_failed(first[1], "busy")
    await w.settle()
    assert "contact.offer_rejected" in w.events
    second = [c for c in d.take() if c[0] == "ring"]
    assert len(second) == 1 and second[0][3] != first[3]


async def test_no_answer_from_the_pbx_is_not_a_reject(world: Any) -> None:
    w = world
    await w.feed(Login(agent_id="anna"))
    await w.connector.call_arrived("c1", stasis_start("c1"))
    await w.settle()
    await w.connector.leg_failed(w.offer("c1"), "noanswer")
    await w.settle()
    assert "contact.offer_rejected" not in w.events
    assert w.state("c1") == "offered"


async def test_caller_hangs_up_while_ringing_stops_the_leg(world: Any) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    await w.connector.call_arrived("c1", stasis_start("c1"))
    await w.settle()
    d.take()
    offer = w.offer("c1")
    await w.connector.call_ended("c1", stasis_end("c1"))
    await w.settle()
    assert d.take() == [("stop_ring", offer), ("hangup", "c1")]
    assert w.state("c1") == "abandoned"


async def test_stasis_args_reach_the_rules_and_desktop_queues_ring_after_the_accept(
    world: Any, journal: Journal
) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    await w.connector.call_arrived("c1", stasis_start("c1", "queue=desk"))
    await w.settle()
    assert w.engine.contact_info("asterisk-ari:c1")["queue"] == "desk"
    assert not [c for c in d.take() if c[0] == "ring"]  # the desktop offer first
    offer = w.offer("c1")
    await w.intake.accept_agent_command(
        "anna", json.dumps({"op": "accept", "offer_id": offer}).encode()
    )
    await w.settle()
    assert d.take() == [("ring", offer, "c1", "PJSIP/1001", 10)]
    await w.connector.leg_answered(offer)
    await w.settle()
    assert d.take() == [("bridge", "c1", offer)]
    assert w.state("c1") == "assigned"


async def test_an_agent_without_a_phone_here_gets_a_desktop_offer_only(world: Any) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="carl"))
    await w.connector.call_arrived("c1", stasis_start("c1"))
    await w.settle()
    assert w.state("c1") == "offered"
    assert [c for c in d.take() if c[0] == "ring"] == []


async def test_an_accept_the_engine_refuses_hangs_the_answered_leg_up(world: Any) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    await w.connector.call_arrived("c1", stasis_start("c1"))
    await w.settle()
    d.take()
    offer = w.offer("c1")
    # The agent answers just as the offer expires; the expiry is applied first.
    w.now += 5.1
    await w.feed(Tick())
    await w.connector.leg_answered(offer)
    await w.settle()
    assert ("stop_ring", offer) in d.take()
    assert w.state("c1") == "queued"


async def test_reconcile_journals_missed_calls_ends_vanished_ones_and_stops_orphans(
    world: Any,
) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    await w.feed(Login(agent_id="ben"))
    await w.connector.call_arrived("gone", stasis_start("gone"))
    await w.settle()
    d.take()
    # While "disconnected": "gone" ended on the PBX (with anna's leg ringing for it), "missed"
    # arrived, and a leg rings for an offer the engine never made.
    d.pbx = PbxView(
        calls={"missed": PbxCall(call_id="missed", payload=stasis_start("missed"))},
        legs={"o99": PbxLeg(offer_id="o99", call_id="missed", answered=False)},
    )
    await w.connector.connected()
    await w.settle()
    calls = d.take()
    assert ("stop_ring", "o99") in calls
    assert w.state("gone") == "abandoned"
    assert w.state("missed") == "offered"
    assert ("hold", "missed", "default") in calls or ("hold", "missed", "jazz") in calls
    assert any(c[0] == "ring" and c[2] == "missed" for c in calls)
    # A second reconcile with the same PBX view routes nothing twice.
    offers = [e for e in w.events if e == "contact.offered"]
    d.pbx = PbxView(
        calls={"missed": PbxCall(call_id="missed", payload=stasis_start("missed"))},
        legs={
            o: PbxLeg(offer_id=o, call_id="missed", answered=False) for o in w.engine.state.offers
        },
    )
    await w.connector.connected()
    await w.settle()
    assert [e for e in w.events if e == "contact.offered"] == offers
    assert ("hold", "missed", "jazz") in d.take()  # held again: nobody left in silence


async def test_reconcile_rings_again_an_offer_whose_leg_is_missing(world: Any) -> None:
    w, d = world, world.driver
    await w.feed(Login(agent_id="anna"))
    await w.connector.call_arrived("c1", stasis_start("c1"))
    await w.settle()
    d.take()
    d.pbx = PbxView(calls={"c1": PbxCall(call_id="c1", payload=stasis_start("c1"))})
    await w.connector.connected()
    await w.settle()
    assert d.take() == [("hold", "c1", "jazz"), ("ring", w.offer("c1"), "c1", "PJSIP/1001", 10)]


async def test_a_standby_never_talks_to_the_pbx(journal: Journal) -> None:
    w = World(journal)
    task = asyncio.create_task(w.connector.run())
    try:
        for _ in range(20):
            await asyncio.sleep(0)
        assert w.driver.events is None  # no lease tenure: the driver is not even started
        await w.connector.restored(w.engine)
        await wait_until(lambda: w.driver.events is not None, 5, "the driver started")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_call_redis_cannot_take_is_retried_until_journaled(tmp_path: Path) -> None:
    if not REDIS_SERVER.exists():
        pytest.skip(f"{REDIS_SERVER} is not installed")
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    client = connect_redis(server.url)
    try:
        w = World(Journal(client, "t:"))
        await w.start()
        w.driver.pbx = PbxView(calls={"c1": PbxCall(call_id="c1", payload=stasis_start("c1"))})
        server.stop()
        assert not await w.connector.call_arrived("c1", stasis_start("c1"))
        assert w.driver.take() == []  # not journaled: not answered either
        server.start()
        await wait_until(lambda: w.journal.read_after("0-0", None, 10), 10, "journaled")
        await w.settle()
        assert w.state("c1") == "queued"
        assert ("hold", "c1", "jazz") in w.driver.take()
        w.task.cancel()
        await asyncio.gather(w.task, return_exceptions=True)
    finally:
        await client.aclose()
        server.kill()


async def test_a_lost_lease_lets_go_of_the_pbx_until_the_next_tenure(journal: Journal) -> None:
    leading = True
    w = World(journal)
    w.connector = TelephonyConnector(
        "asterisk", w.driver, w.intake, w.table, clock=lambda: w.now, leading=lambda: leading
    )
    runs: list[str] = []
    real_run = w.driver.run

    async def run(events: PbxEvents) -> None:
        runs.append("start")
        try:
            await real_run(events)
        finally:
            runs.append("stop")

    w.driver.run = run  # type: ignore[method-assign]
    task = asyncio.create_task(w.connector.run())
    try:
        await w.connector.restored(w.engine)
        await wait_until(lambda: runs == ["start"], 5, "the driver started")
        leading = False  # a standby took over
        await wait_until(lambda: runs == ["start", "stop"], 5, "the driver stopped")
        leading = True
        await w.connector.restored(w.engine)  # this daemon routes again
        await wait_until(lambda: runs == ["start", "stop", "start"], 5, "started again")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
