"""Asterisk's outbound WebSocket: Asterisk connects to the daemon's HTTP listener, events come
in and the REST requests go back over the same socket; the call behaves as over ARI's HTTP."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon.telephony.asterisk import OUTBOUND_PATH, basic_auth
from tests.daemon.conftest import MqttProbe, wait_until
from tests.daemon.private_servers import free_port
from tests.peers.ari import AriPeer
from tests.telephony.ari_world import (
    bridged_with,
    contact,
    login,
    no_violations,
    wait_held,
    wait_ringing,
    write_phone_routing,
)

pytestmark = pytest.mark.integration


async def test_a_call_over_asterisks_outbound_websocket(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    port = free_port()
    routing = write_phone_routing(tmp_path / "routing.yaml", ("anna",))
    await start_daemon(
        routing,
        http_addr=f"127.0.0.1:{port}",
        asterisk_outbound_username="asterisk",
        asterisk_outbound_password="ws-secret",
    )
    url = f"ws://127.0.0.1:{port}{OUTBOUND_PATH}"
    async with aiohttp.ClientSession() as http:
        # Without the right credentials Asterisk is turned away, whatever bytes they hold
        # (non-ASCII and non-UTF-8 ones once made the check itself fail: a 500).
        odd = [base64.b64encode(raw).decode() for raw in ("ü:x".encode(), b"\xff\xfe:x")]
        for headers in (
            {},
            {"Authorization": basic_auth("asterisk", "wrong")},
            *({"Authorization": f"Basic {value}"} for value in odd),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(url, protocols=("ari",), headers=headers)
            assert info.value.status == 401
    async with AriPeer() as peer:
        peer.connect_outbound(url, "asterisk", "ws-secret")
        await wait_until(lambda: peer.connected(), 10, "Asterisk's outbound socket")
        await login(mqtt_probe, "anna")
        cid = peer.place_call("+4930555201", "queue=support")
        await wait_held(peer, cid, "support-moh")
        peer.answer(await wait_ringing(peer, "PJSIP/anna"))
        await wait_until(lambda: bridged_with(peer, cid) == ["PJSIP/anna"], 5, "bridged")
        peer.hangup(cid)
        await mqtt_probe.wait_for("events/contact.completed", contact_id=contact(cid))
        await wait_until(lambda: not peer.channels and not peer.bridges, 5, "cleaned up")
        # Every REST call of the adapter went over the socket, none was invalid.
        assert ("POST", "/channels") in {r[:2] for r in peer.requests}
        assert no_violations(peer)
