"""The daemon SIGKILLed between "the platform got the message" and "we recorded it": the real
daemon as a process, the peer holding its answer until the kill, then a fresh daemon.

- Rocket.Chat (message ``_id`` from the idempotency key) and Chatwoot (our key in the
  message's ``content_attributes``, looked up before an uncertain re-send): exactly once.
- Mail (SMTP has no idempotency key): at least once, every copy with the same Message-ID.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import threading
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller

from tests.daemon.conftest import DaemonProcess, MqttProbe, wait_until
from tests.daemon.private_servers import free_port
from tests.daemon.test_outbound_e2e import (
    AUTH_TOKENS,
    ROUTING,
    SUPERVISOR,
    TOKENS,
    Relay,
    chatwoot_message,
    rocketchat_message,
)
from tests.peers.base import Peer, serve
from tests.peers.chatwoot import ChatwootPeer, Conversation
from tests.peers.rocketchat import RocketchatPeer, Room

pytestmark = pytest.mark.integration


class HoldingRelay(Relay):
    """A relay that keeps the first message, then does not answer until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        while len(self.messages) == 1 and not self.release.is_set():
            await asyncio.sleep(0.02)
        return answer


class Harness:
    def __init__(
        self,
        env: dict[str, str],
        start: Callable[[dict[str, str], str], DaemonProcess],
        http: aiohttp.ClientSession,
        base: str,
        mqtt: MqttProbe,
    ) -> None:
        self.env, self.start, self.http, self.base, self.mqtt = env, start, http, base, mqtt

    async def up(self, name: str) -> DaemonProcess:
        daemon = self.start(self.env, name)

        async def ready() -> bool:
            try:
                async with self.http.get(f"{self.base}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, 20, "the daemon to route")
        return daemon

    async def api(self, method: str, path: str, body: Any = None, token: str = SUPERVISOR) -> Any:
        async with self.http.request(
            method, f"{self.base}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            return resp.status, await resp.json()

    async def webhook(self, source: str, payload: Any) -> None:
        async with self.http.post(
            f"{self.base}/v1/webhooks/{source}", data=json.dumps(payload).encode()
        ) as resp:
            assert resp.status == 202, await resp.text()

    async def take(self, contact_id: str) -> None:
        await self.mqtt.agent("anna", op="login")
        (offer,) = await self.mqtt.wait_for(
            "agents/anna/offers", type="offer", contact_id=contact_id, timeout=10
        )
        await self.mqtt.agent("anna", op="accept", offer_id=offer["offer_id"])
        await self.mqtt.wait_for("events/contact.assigned", contact_id=contact_id)

    async def outcome(self, contact_id: str, key: str) -> dict[str, Any]:
        async def sent() -> dict[str, Any] | None:
            status, body = await self.api("GET", f"/v1/contacts/{contact_id}/messages")
            if status != 200:
                return None
            return next(
                (m for m in body["messages"] if m["key"] == key and m["state"] == "sent"), None
            )

        return await wait_until(sent, 20, f"{key} confirmed")


@pytest.fixture
async def harness(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
) -> AsyncIterator[Callable[..., Any]]:
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING, encoding="utf-8")
    port = free_port()
    async with aiohttp.ClientSession() as http:

        def make(**outbound: str) -> Harness:
            env = daemon_env(
                routing,
                "a",
                http_addr=f"127.0.0.1:{port}",
                auth_tokens=AUTH_TOKENS,
                sources_unsigned=json.dumps(["chatwoot", "rocketchat"]),
                **outbound,
            )
            return Harness(env, daemons, http, f"http://127.0.0.1:{port}", mqtt_probe)

        yield make


@pytest.mark.parametrize("platform", ["rocketchat", "chatwoot"])
async def test_sigkill_between_send_and_ack_delivers_exactly_once(
    harness: Callable[..., Harness], platform: str
) -> None:
    peer: Peer
    if platform == "rocketchat":
        rc = RocketchatPeer()
        rc.rooms["CrashRoom00000001"] = Room()
        peer, contact_id, payload = (
            rc,
            "rocketchat:CrashRoom00000001",
            rocketchat_message("CrashRoom00000001", "Hallo?"),
        )
    else:
        cw = ChatwootPeer()
        cw.conversations[77] = Conversation()
        peer, contact_id, payload = cw, "chatwoot:77", chatwoot_message(77, "Hallo?")
    text = "Diese Antwort kommt genau einmal an."
    async with serve(peer):
        settings: dict[str, Any] = (
            {"url": peer.url, "user_id": "stellwerkBotId1", "auth_token": "rc-token"}
            if platform == "rocketchat"
            else {"url": peer.url, "account_id": 1, "api_token": "cw-token"}
        )
        h = harness(**{f"outbound_{platform}": json.dumps(settings)})
        first = await h.up("first")
        await h.webhook(platform, payload)
        await h.take(contact_id)

        def stored() -> list[Any]:
            if isinstance(peer, RocketchatPeer):
                return peer.rooms["CrashRoom00000001"].messages
            assert isinstance(peer, ChatwootPeer)
            return peer.conversations[77].messages

        def posts() -> list[Any]:
            return [r for r in peer.requests if r.method == "POST" and "essage" in r.path]

        # Let the assignment through, then hold every answer: the message arrives, the daemon
        # never hears so.
        await wait_until(lambda: len(peer.requests) >= 1, 10, "the assignment")
        await asyncio.sleep(0.3)
        peer.hold = asyncio.Event()
        status, body = await h.api(
            "POST", f"/v1/contacts/{contact_id}/messages", {"text": text}, TOKENS["anna"]
        )
        assert status == 202, body
        await wait_until(lambda: stored(), 10, "the message at the platform")
        first.kill()
        peer.hold.set()
        peer.hold = None
        await h.up("second")
        record = await h.outcome(contact_id, body["key"])
        assert record["attempts"] == 2
        assert [m.get("msg", m.get("content")) for m in stored()] == [text]
        if platform == "rocketchat":
            # Sent again after the restart, with the same _id: stored once.
            ids = [r.body["message"]["_id"] for r in posts()]
            assert len(ids) == 2 and ids[0] == ids[1]
        else:
            # Chatwoot: the restarted daemon looked (GET) and did not post again.
            assert len(posts()) == 1
            assert any(r.method == "GET" for r in peer.requests)


async def test_sigkill_mid_mail_resends_with_the_same_message_id(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    relay = HoldingRelay()
    relay_port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=relay_port)
    controller.start()
    try:
        smtp_port = free_port()
        h = harness(
            smtp_addr=f"127.0.0.1:{smtp_port}",
            outbound_mail=json.dumps(
                {"host": "127.0.0.1", "port": relay_port, "security": "none", "timeout": 30,
                 "from_address": "support@beispiel-telekom.de"}
            ),
        )  # fmt: skip
        first = await h.up("first")
        msg = EmailMessage()
        msg["From"] = "kunde@example.org"
        msg["To"] = "support@beispiel-telekom.de"
        msg["Subject"] = "Frage"
        msg["Message-ID"] = "<crash-root@example.org>"
        msg.set_content("Hallo?")

        def deliver() -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
                client.send_message(msg)

        await asyncio.to_thread(deliver)
        contact_id = "email:crash-root@example.org"
        await h.take(contact_id)
        status, body = await h.api(
            "POST", f"/v1/contacts/{contact_id}/messages", {"text": "Antwort"}, TOKENS["anna"]
        )
        assert status == 202, body
        await wait_until(lambda: relay.messages, 10, "the mail at the relay")
        first.kill()
        relay.release.set()
        await h.up("second")
        record = await h.outcome(contact_id, body["key"])
        # At least once: the relay may get it twice, but always as the same message.
        assert 1 <= len(relay.messages) <= 2
        assert {m["Message-ID"].strip() for m in relay.messages} == {f"<{record['remote_id']}>"}
        assert record["attempts"] == len(relay.messages)
    finally:
        controller.stop()
