"""The FreeSWITCH driver against the ESL peer: what it does to calls and what it reports.

The connector's side is a recorder of the driver's reports; the switch side is the ESL peer
with its real channel state. End-to-end behaviour through Redis and MQTT is in
test_freeswitch_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from channels.base import DecodeConfig
from channels.phone import decode_freeswitch
from router.daemon.telephony.connector import HoldSpec
from router.daemon.telephony.freeswitch import FreeswitchDriver, FreeswitchError
from rules.schema import Announcement
from tests.peers.esl import EslPeer


@dataclass
class Reports:
    """What the driver told the connector, in order."""

    items: list[tuple[Any, ...]] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)

    connects: int = 0

    async def call_arrived(self, call_id: str, payload: bytes) -> bool:
        self.bodies[call_id] = payload
        self.items.append(("arrived", call_id))
        return True

    async def call_ended(self, call_id: str, payload: bytes) -> None:
        self.bodies[f"end:{call_id}"] = payload
        self.items.append(("ended", call_id))

    async def leg_answered(self, offer_id: str) -> None:
        self.items.append(("answered", offer_id))

    async def leg_failed(self, offer_id: str, reason: str) -> None:
        self.items.append(("failed", offer_id, reason))

    async def leg_hung_up(self, offer_id: str) -> None:
        self.items.append(("leg_hung_up", offer_id))

    async def connected(self) -> None:
        self.connects += 1


@pytest.fixture
async def peer() -> AsyncIterator[EslPeer]:
    server = EslPeer(password="pw")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running(
    peer: EslPeer, **options: float
) -> AsyncIterator[tuple[FreeswitchDriver, Reports]]:
    reports = Reports()
    driver = FreeswitchDriver("127.0.0.1", peer.port, "pw", connect_timeout=1.0, **options)
    task = asyncio.create_task(driver.run(reports))
    await peer.wait_for(lambda: reports.connects == 1, 5, "the driver connected")
    try:
        yield driver, reports
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(peer: EslPeer, predicate: Any, what: str) -> Any:
    return await peer.wait_for(predicate, 5, what)


def stellwerk(**extra: str) -> dict[str, str]:
    return {"stellwerk": "true", **{f"stellwerk_{k}": v for k, v in extra.items()}}


async def test_a_parked_call_is_reported_with_its_variables_and_held(peer: EslPeer) -> None:
    async with running(peer) as (driver, reports):
        other = peer.place_call("+4930555099")  # not for Stellwerk: no variable
        uid = peer.place_call("+4930555010", variables=stellwerk(queue="billing", lang="de"))
        await until(peer, lambda: ("arrived", uid) in reports.items, "the call reported")
        [event] = decode_freeswitch(reports.bodies[uid], {}, DecodeConfig())
        assert event.contact_id == f"freeswitch:{uid}" and event.kind == "new"
        assert event.attributes["queue"] == "billing" and event.attributes["lang"] == "de"
        assert event.sender.phone == "+4930555010"
        await driver.hold(uid, HoldSpec())
        await driver.hold(uid, HoldSpec())  # held again (reconciliation): still one stream
        assert peer.channels[uid].playing == ["local_stream://moh"]
        await driver.hold(uid, HoldSpec(music_class="premium"))
        assert peer.channels[uid].playing == ["local_stream://premium"]
        assert all(i[1] != other for i in reports.items)
        view = driver.view()
        assert view is not None and set(view.calls) == {uid} and view.legs == {}


async def test_a_call_parked_unanswered_is_answered_before_the_music(peer: EslPeer) -> None:
    async with running(peer) as (driver, reports):
        uid = peer.place_call(variables=stellwerk(), answer=False)
        await until(peer, lambda: reports.items, "arrival")
        assert peer.channels[uid].answer_state == "ringing"
        await driver.hold(uid, HoldSpec())
        assert peer.channels[uid].answer_state == "answered"
        assert peer.channels[uid].playing == ["local_stream://moh"]
        await driver.hold(uid, HoldSpec())
        assert sum(c == f"api uuid_answer {uid}" for c in peer.commands) == 1


async def test_the_announcement_breaks_into_the_music(peer: EslPeer) -> None:
    async with running(peer) as (driver, reports):
        uid = peer.place_call(variables=stellwerk())
        await until(peer, lambda: reports.items, "arrival")
        spec = HoldSpec(announcement=Announcement(media="/sounds/wait.wav", every=0.2))
        await driver.hold(uid, spec)
        await until(
            peer,
            lambda: peer.channels[uid].playing == ["/sounds/wait.wav", "local_stream://moh"],
            "the announcement, then the music again",
        )


async def test_ring_answer_bridge_and_the_agent_hangs_up(peer: EslPeer) -> None:
    peer.register("user/1001@default")
    async with running(peer) as (driver, reports):
        uid = peer.place_call(variables=stellwerk())
        await until(peer, lambda: reports.items, "arrival")
        await driver.hold(uid, HoldSpec())
        await driver.ring("o7", uid, "user/1001@default", 5.0)
        [leg] = await until(peer, lambda: peer.ringing("user/1001@default"), "ringing")
        assert leg.variables["stellwerk_offer_id"] == "o7"
        assert leg.variables["stellwerk_call"] == uid
        assert leg.cid_num == "+4930555010"
        assert not any(c.startswith("api originate") for c in peer.commands)
        peer.pick_up(leg.uuid)
        await until(peer, lambda: ("answered", "o7") in reports.items, "the accept")
        view = driver.view()
        assert view is not None and view.legs["o7"].answered and view.legs["o7"].call_id == uid
        await driver.bridge(uid, "o7")
        assert peer.channels[uid].other == leg.uuid and peer.channels[uid].playing == []
        peer.hang_up(leg.uuid)
        await until(peer, lambda: not peer.channels[uid].alive, "the caller hung up too")
        await until(peer, lambda: ("ended", uid) in reports.items, "the call's end")
        assert ("leg_hung_up", "o7") in reports.items
        assert not any(i[0] == "failed" for i in reports.items)


@pytest.mark.parametrize(
    ("behaviour", "reason"), [("busy", "busy"), ("reject", "declined"), (None, "failed")]
)
async def test_a_phone_that_cannot_answer_is_reported(
    peer: EslPeer, behaviour: str | None, reason: str
) -> None:
    if behaviour is not None:
        peer.register("user/1002@default", behaviour)
    async with running(peer) as (driver, reports):
        uid = peer.place_call(variables=stellwerk())
        await until(peer, lambda: reports.items, "arrival")
        await driver.ring("o1", uid, "user/1002@default", 5.0)
        await until(peer, lambda: ("failed", "o1", reason) in reports.items, reason)
        await asyncio.sleep(0.1)  # the BACKGROUND_JOB arrives too: still one report
        assert [i for i in reports.items if i[0] == "failed"] == [("failed", "o1", reason)]


async def test_the_switch_gives_up_ringing_shortly_after_the_offer_expires(peer: EslPeer) -> None:
    peer.register("user/1003@default")
    async with running(peer) as (driver, reports):
        uid = peer.place_call(variables=stellwerk())
        await until(peer, lambda: reports.items, "arrival")
        # The connector's ring timeout plus the driver's two-second backstop.
        await driver.ring("o2", uid, "user/1003@default", 0.4)
        [leg] = peer.ringing()
        assert leg.variables["originate_timeout"] == "3"
        await driver.ring("o2", uid, "user/1003@default", 0.4)  # repeated: still one phone
        assert len(peer.ringing()) == 1


async def test_stop_ring_and_caller_hang_up_stop_the_phone(peer: EslPeer) -> None:
    peer.register("user/1004@default")
    peer.register("user/1005@default")
    async with running(peer) as (driver, reports):
        uid = peer.place_call(variables=stellwerk())
        await until(peer, lambda: reports.items, "arrival")
        await driver.ring("o3", uid, "user/1004@default", 5.0)
        [leg] = await until(peer, lambda: peer.ringing("user/1004@default"), "ringing")
        await driver.stop_ring("o3")
        assert peer.channels[leg.uuid].hangup_cause == "ORIGINATOR_CANCEL"
        await driver.ring("o4", uid, "user/1005@default", 5.0)
        [leg2] = await until(peer, lambda: peer.ringing("user/1005@default"), "ringing")
        peer.hang_up(uid)
        await until(peer, lambda: not peer.channels[leg2.uuid].alive, "the leg stopped")
        await until(peer, lambda: ("ended", uid) in reports.items, "the call's end")
        [event] = decode_freeswitch(reports.bodies[f"end:{uid}"], {}, DecodeConfig())
        assert event.kind == "end" and event.attributes["cause"] == "NORMAL_CLEARING"
        assert not any(i[0] in ("failed", "answered") for i in reports.items)


async def test_reconnect_rebuilds_the_picture_of_the_switch(peer: EslPeer) -> None:
    peer.register("user/1006@default")
    async with running(peer) as (driver, reports):
        kept = peer.place_call("+4930555001", variables=stellwerk())
        gone = peer.place_call("+4930555002", variables=stellwerk())
        await until(peer, lambda: len(reports.items) == 2, "two arrivals")
        sever = asyncio.create_task(peer.sever(1.0))
        await until(peer, lambda: driver.view() is None, "the socket cut")
        new = peer.place_call("+4930555003", variables=stellwerk(queue="sales"))
        peer.hang_up(gone)
        with pytest.raises(FreeswitchError):
            await driver.ring("o5", kept, "user/1006@default", 5.0)
        await sever
        await until(peer, lambda: reports.connects == 2, "the reconnect")
        view = driver.view()
        assert view is not None and set(view.calls) == {kept, new}
        # The missed call's payload journals it as new; the vanished one's as ended.
        [event] = decode_freeswitch(view.calls[new].payload, {}, DecodeConfig())
        assert event.kind == "new" and event.attributes["queue"] == "sales"
        [end] = decode_freeswitch(driver.ended_payload(gone), {}, DecodeConfig())
        assert end.kind == "end" and end.contact_id == f"freeswitch:{gone}"
        assert reports.items == [("arrived", kept), ("arrived", gone)]  # the connector decides


async def test_an_earlier_runs_agent_leg_is_in_the_view_and_can_be_stopped(
    peer: EslPeer,
) -> None:
    peer.register("user/1007@default")
    async with running(peer) as (driver, _):
        uid = peer.place_call(variables=stellwerk())
        await driver.ring("o6", uid, "user/1007@default", 5.0)
        [leg] = await until(peer, lambda: peer.ringing(), "ringing")
    # A new run of the driver (a restarted daemon) finds the leg and its offer on the switch.
    async with running(peer) as (driver, reports):
        view = driver.view()
        assert view is not None and set(view.calls) == {uid}
        assert view.legs["o6"].call_id == uid and not view.legs["o6"].answered
        await driver.stop_ring("o6")
        await until(peer, lambda: not peer.channels[leg.uuid].alive, "the orphan hung up")
        assert peer.channels[uid].alive and reports.items == []
        view = driver.view()
        assert view is not None and view.legs == {}


async def test_a_plain_uuid_dump_is_read_like_a_json_one(peer: EslPeer) -> None:
    """Older FreeSWITCH answers ``uuid_dump <uuid> json`` in plain form; both must work."""
    from router.daemon.telephony.esl import EslClient
    from router.daemon.telephony.freeswitch import _dump_fields

    uid = peer.place_call("+4930555077", variables=stellwerk(queue="q1"))
    client = await EslClient.connect("127.0.0.1", peer.port, "pw")
    plain = _dump_fields(await client.api(f"uuid_dump {uid}"))
    as_json = _dump_fields(await client.api(f"uuid_dump {uid} json"))
    assert plain is not None and as_json is not None
    assert plain["Unique-ID"] == as_json["Unique-ID"] == uid
    assert plain["variable_stellwerk_queue"] == as_json["variable_stellwerk_queue"] == "q1"
    assert _dump_fields(await client.api("uuid_dump nope json")) is None
    await client.close()


async def test_a_switch_that_stops_answering_is_left_and_reconnected(peer: EslPeer) -> None:
    async with running(peer, keepalive=0.2, command_timeout=0.5) as (driver, reports):
        uid = peer.place_call(variables=stellwerk())
        await until(peer, lambda: reports.items, "arrival")
        peer.stall()
        with pytest.raises(FreeswitchError):  # an action does not hang on a silent switch
            await driver.hold(uid, HoldSpec())
        await until(peer, lambda: driver.view() is None, "the silent connection given up")
        peer.resume()
        await until(peer, lambda: reports.connects >= 2, "a fresh connection")
        view = driver.view()
        assert view is not None and set(view.calls) == {uid}


async def test_the_same_driver_runs_again_after_a_lost_lease(peer: EslPeer) -> None:
    """The connector stops the driver when the routing lease is lost and runs it again with
    the next tenure: the second run starts from the switch's picture, not the stale one."""
    reports = Reports()
    driver = FreeswitchDriver("127.0.0.1", peer.port, "pw", connect_timeout=1.0)
    first = asyncio.create_task(driver.run(reports))
    await peer.wait_for(lambda: reports.connects == 1, 5, "the first run")
    kept = peer.place_call("+4930555081", variables=stellwerk())
    gone = peer.place_call("+4930555082", variables=stellwerk())
    await until(peer, lambda: len(reports.items) == 2, "two arrivals")
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await until(peer, lambda: peer.connections == 0, "the socket let go")
    assert driver.view() is None
    peer.hang_up(gone)
    second = asyncio.create_task(driver.run(reports))
    try:
        await peer.wait_for(lambda: reports.connects == 2, 5, "the second run")
        view = driver.view()
        assert view is not None and set(view.calls) == {kept}
    finally:
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
