"""The ARI peer's own description of ARI against Asterisk's published resource listings, and
the peer's behaviour where Asterisk's test suite pins it down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon.telephony.asterisk import basic_auth
from tests.peers.ari import OPERATIONS, AriPeer

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


def test_the_peers_events_have_the_shapes_of_events_json() -> None:
    if not (REFERENCE / "events.json").is_file():
        pytest.skip(f"the Asterisk reference is not there ({REFERENCE.resolve()}); skipped")
    models = json.loads((REFERENCE / "events.json").read_text())["models"]
    channel_model = json.loads((REFERENCE / "channels.json").read_text())["models"]["Channel"]
    bridge_model = json.loads((REFERENCE / "bridges.json").read_text())["models"]["Bridge"]
    peer = AriPeer()
    captured: list[dict[str, Any]] = []
    peer._send = lambda app, event: captured.append(event)  # type: ignore[method-assign]
    cid = peer.place_call("+4930123456", "queue=billing")
    peer.channels[cid].bridge = None
    peer.hangup(cid)
    assert [e["type"] for e in captured] == [
        "StasisStart",
        "ChannelHangupRequest",
        "StasisEnd",
        "ChannelDestroyed",
    ]
    base = {**models["Message"]["properties"], **models["Event"]["properties"]}
    for event in captured:
        props = {**base, **models[event["type"]]["properties"]}
        required = {k for k, v in props.items() if v.get("required")}
        assert required <= set(event), (event["type"], required - set(event))
        assert set(event) <= set(props), (event["type"], set(event) - set(props))
        channel = event["channel"]
        channel_required = {k for k, v in channel_model["properties"].items() if v.get("required")}
        assert channel_required <= set(channel) <= set(channel_model["properties"])
    assert captured[0]["args"] == ["queue=billing"]
    from tests.peers.ari import Bridge

    bridge = Bridge(id="b", bridge_type="holding").json()
    bridge_required = {k for k, v in bridge_model["properties"].items() if v.get("required")}
    assert bridge_required <= set(bridge) <= set(bridge_model["properties"])


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
