"""The ARI peer's own description of ARI against Asterisk's published resource listings, and
the peer's behaviour where Asterisk's test suite pins it down."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon.telephony.asterisk import basic_auth
from tests.daemon.conftest import wait_until
from tests.peers.ari import OPERATIONS, AriPeer, Bridge

REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "asterisk"


def _swagger() -> dict[tuple[str, str], dict[str, Any]]:
    if not (REFERENCE / "channels.json").is_file():
        pytest.skip(f"the Asterisk reference is not there ({REFERENCE.resolve()}); skipped")
    ops: dict[tuple[str, str], dict[str, Any]] = {}
    for name in ("channels.json", "bridges.json"):
        for api in json.loads((REFERENCE / name).read_text())["apis"]:
            for op in api["operations"]:
                ops[(op["httpMethod"], api["path"])] = op
    return ops


def test_every_operation_the_peer_knows_is_in_the_swagger_with_the_same_parameters() -> None:
    swagger = _swagger()
    for op in OPERATIONS:
        spec = swagger.get((op.method, op.path))
        assert spec is not None, f"{op.method} {op.path} is not in Asterisk's resource listing"
        query = [p for p in spec.get("parameters", []) if p["paramType"] == "query"]
        assert {p["name"] for p in query} == op.known, (op.method, op.path)
        assert {p["name"] for p in query if p.get("required")} == op.required, op.path
        takes_body = any(p["paramType"] == "body" for p in spec.get("parameters", []))
        assert takes_body == op.body, op.path
        documented = {int(e["code"]) for e in spec.get("errorResponses", [])}
        assert op.errors == documented, (op.method, op.path, documented)


def _models() -> dict[str, Any]:
    """The models of events.json, channels.json and bridges.json (skips without them)."""
    if not (REFERENCE / "events.json").is_file():
        pytest.skip(f"the Asterisk reference is not there ({REFERENCE.resolve()}); skipped")
    models: dict[str, Any] = {}
    for name in ("events.json", "channels.json", "bridges.json"):
        models.update(json.loads((REFERENCE / name).read_text())["models"])
    return models


_PRIMITIVES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "Date": str,
    "int": int,
    "long": int,
    "double": (int, float),
    "boolean": bool,
    "object": dict,
}


def _ancestors(kind: str, models: dict[str, Any]) -> list[str]:
    """The models whose ``subTypes`` lead to ``kind``, the farthest first."""
    for name, model in models.items():
        if kind in model.get("subTypes", ()):
            return [*_ancestors(name, models), name]
    return []


def conforms(value: Any, kind: str, models: dict[str, Any], where: str) -> list[str]:
    """Where ``value`` differs from the swagger type ``kind`` (model, List[...], primitive)."""
    if kind.startswith("List[") and kind.endswith("]"):
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [e for i, v in enumerate(value) for e in conforms(v, kind[5:-1], models, where)]
    if kind in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[kind]) and not (kind == "int" and value is True)
        return [] if ok else [f"{where}: {value!r} is not {kind}"]
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not a {kind}"]
    # the model's own properties and those of its ancestors (an event: Event, Message)
    props: dict[str, Any] = {}
    for ancestor in [*_ancestors(kind, models), kind]:
        props.update(models[ancestor]["properties"])
    problems = [f"{where}: {kind} lacks {k}" for k, v in props.items() if v.get("required")]
    problems = [p for p in problems if p.rsplit(" ", 1)[1] not in value]
    problems += [f"{where}: {kind} has no property {k}" for k in value if k not in props]
    for key, item in value.items():
        spec = props.get(key)
        if spec is None:
            continue
        problems += conforms(item, spec["type"], models, f"{where}.{key}")
        allowed = spec.get("allowableValues", {})
        if allowed.get("valueType") == "LIST" and item not in allowed["values"]:
            problems.append(f"{where}.{key}: {item!r} not one of {allowed['values']}")
    return problems


async def test_every_event_the_peer_emits_has_its_shape_in_events_json() -> None:
    """One call through everything the peer emits: connecting, holding, ringing an agent,
    bridging, hanging up, a second connection replacing the first; every event against the
    published models, nested channels and bridges included."""
    models = _models()
    async with (
        AriPeer() as peer,
        aiohttp.ClientSession(headers={"Authorization": basic_auth("stellwerk", "secret")}) as http,
    ):
        events: list[dict[str, Any]] = []

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                events.append(json.loads(msg.data))

        async def call(method: str, path: str, **params: str) -> Any:
            async with http.request(method, f"{peer.url}/ari/{path}", params=params) as r:
                assert r.status < 300, (method, path, r.status, await r.text())
                return await r.json() if r.status == 200 else None

        def seen(*kinds: str) -> bool:
            return set(kinds) <= {e["type"] for e in events}

        first = await http.ws_connect(f"{peer.url}/ari/events?app=stellwerk")
        reader = asyncio.create_task(read(first))
        await wait_until(lambda: seen("ApplicationRegistered"), 5)
        cid = peer.place_call("+4930123456", "queue=billing")
        await call("POST", f"channels/{cid}/answer")
        hold = await call("POST", "bridges", type="holding")
        await call("POST", f"bridges/{hold['id']}/addChannel", channel=cid)
        peer.set_endpoint("PJSIP/1001", "answer")
        leg = await call("POST", "channels", endpoint="PJSIP/1001", app="stellwerk")
        await wait_until(lambda: [e for e in events if e["type"] == "StasisStart"][1:], 5)
        await call("POST", f"bridges/{hold['id']}/removeChannel", channel=cid)
        await call("DELETE", f"bridges/{hold['id']}")
        mixing = await call("POST", "bridges", type="mixing")
        await call("POST", f"bridges/{mixing['id']}/addChannel", channel=f"{cid},{leg['id']}")
        peer.hangup(cid)  # leaves the bridge, ends in Stasis, is destroyed
        await wait_until(lambda: seen("ChannelDestroyed"), 5)
        second = await http.ws_connect(f"{peer.url}/ari/events?app=stellwerk")
        await wait_until(lambda: seen("ApplicationReplaced"), 5)
        await second.close()
        await first.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    kinds = {e["type"] for e in events}
    assert kinds == {
        "ApplicationRegistered",
        "StasisStart",
        "ChannelStateChange",
        "ChannelEnteredBridge",
        "ChannelLeftBridge",
        "BridgeDestroyed",
        "ChannelHangupRequest",
        "StasisEnd",
        "ChannelDestroyed",
        "ApplicationReplaced",
    }
    for event in events:
        assert event["type"] in models["Event"]["subTypes"]
        assert conforms(event, event["type"], models, event["type"]) == []
    stasis = [e for e in events if e["type"] == "StasisStart"]
    assert stasis[0]["args"] == ["queue=billing"] and stasis[1]["channel"]["id"] == leg["id"]
    states = [e["channel"]["state"] for e in events if e["type"] == "ChannelStateChange"]
    assert states == ["Up", "Ringing", "Up"]  # the caller answered; the leg rang and answered


def test_the_checker_finds_what_differs_from_events_json() -> None:
    """The comparison above would notice a wrong shape (so its empty answer means something)."""
    models = _models()
    ok = {
        "type": "BridgeDestroyed",
        "application": "stellwerk",
        "timestamp": "2026-12-01T10:00:00.000+0000",
        "asterisk_id": "00:11:22:33:44:55",
        "bridge": Bridge(id="b", bridge_type="holding").json(),
    }
    assert conforms(ok, "BridgeDestroyed", models, "e") == []
    assert conforms({**ok, "extra": 1}, "BridgeDestroyed", models, "e") == [
        "e: BridgeDestroyed has no property extra"
    ]
    no_bridge = {k: v for k, v in ok.items() if k != "bridge"}
    assert conforms(no_bridge, "BridgeDestroyed", models, "e") == [
        "e: BridgeDestroyed lacks bridge"
    ]
    bad_channels = {**ok, "bridge": {**ok["bridge"], "channels": "c1"}}
    assert conforms(bad_channels, "BridgeDestroyed", models, "e") == [
        "e.bridge.channels: 'c1' is not a list"
    ]


async def test_the_peer_answers_errors_where_asterisk_does() -> None:
    async with (
        AriPeer() as peer,
        aiohttp.ClientSession(headers={"Authorization": basic_auth("stellwerk", "secret")}) as http,
    ):

        async def call(method: str, path: str, **params: str) -> int:
            async with http.request(method, f"{peer.url}/ari/{path}", params=params) as r:
                return r.status

        async with aiohttp.ClientSession() as anon, anon.get(f"{peer.url}/ari/channels") as r:
            assert r.status == 401
        cid = peer.place_call("+4930123456")
        assert await call("POST", f"channels/{cid}/answer") == 204
        assert await call("POST", "channels/nope/answer") == 404
        # Originated and ringing, not yet in Stasis: 409 for Stasis-only operations.
        assert (
            await call("POST", "channels", endpoint="PJSIP/1001", app="stellwerk", channelId="leg1")
            == 200
        )
        assert (
            await call("POST", "channels", endpoint="PJSIP/1001", app="stellwerk", channelId="leg1")
            == 409
        )
        assert await call("POST", "channels/leg1/answer") == 409
        assert await call("POST", "bridges/b1", type="mixing") == 200
        assert await call("POST", "bridges/b1", type="mixing") == 409
        assert await call("POST", "bridges/b1/addChannel", channel="leg1") == 422
        assert await call("POST", "bridges/b1/addChannel", channel="ghost") == 400
        assert await call("POST", "bridges/b2/addChannel", channel=cid) == 404
        assert await call("POST", "bridges/b1/addChannel", channel=cid) == 204
        assert await call("DELETE", f"channels/{cid}", reason="bored") == 400
        # Created, in Stasis, never dialled: 412 where Asterisk's testsuite expects it
        # (channels/create/off-nominal); hanging it up works, then it is gone.
        assert await call("POST", "channels/create", endpoint="PJSIP/1002", app="stellwerk") == 200
        (created,) = [c for c in peer.channels.values() if c.endpoint == "PJSIP/1002"]
        assert created.app == "stellwerk" and created.state == "Down"
        assert await call("POST", f"channels/{created.id}/answer") == 412
        assert await call("POST", f"channels/{created.id}/moh", mohClass="default") == 412
        assert await call("DELETE", f"channels/{created.id}/moh") == 412
        assert await call("POST", f"channels/{created.id}/play", media="sound:beep") == 412
        assert await call("DELETE", f"channels/{created.id}") == 204
        assert await call("GET", f"channels/{created.id}") == 404
        assert peer.violations == []
        # Outside the description: recorded as a violation of the adapter.
        assert await call("POST", "channels/leg1/answer", mohClass="x") == 400
        assert await call("GET", "asterisk/infoo") == 404
        assert await call("POST", "channels", app="stellwerk") == 400
        assert len(peer.violations) == 3


async def test_a_ringing_leg_times_out_busy_and_answered_legs_behave() -> None:
    async with AriPeer() as peer:
        peer.set_endpoint("PJSIP/busy", "busy")
        assert (
            peer.handle("POST", "/channels", {"endpoint": "PJSIP/busy", "app": "a"}, None)[0] == 200
        )
        status, ch = peer.handle(
            "POST",
            "/channels",
            {"endpoint": "PJSIP/1", "app": "a", "timeout": "1", "appArgs": "x,y"},
            None,
        )
        assert status == 200
        import asyncio

        await asyncio.sleep(0.1)
        assert [c.endpoint for c in peer.channels.values()] == ["PJSIP/1"]  # busy one gone
        assert peer.channels[ch["id"]].state == "Ringing"
        await asyncio.sleep(1.1)
        assert ch["id"] not in peer.channels  # nobody answered within the timeout
        _, ch = peer.handle(
            "POST", "/channels", {"endpoint": "PJSIP/1", "app": "a", "appArgs": "x,y"}, None
        )
        await asyncio.sleep(0.05)
        peer.answer("PJSIP/1")
        leg = peer.channels[ch["id"]]
        assert (leg.state, leg.app, leg.dialplan["app_data"]) == ("Up", "a", "a,x,y")
