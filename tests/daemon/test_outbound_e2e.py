"""Answering where the conversation lives, end to end: the real daemon on the real Redis and
Mosquitto, agents over MQTT, webhooks and mail in, and the platforms as protocol peers
(``tests/peers``) plus a real SMTP relay (aiosmtpd) out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller

from router.daemon.auth import hash_token
from tests.daemon.conftest import SAMPLES, MqttProbe, mail, send_mail, wait_until
from tests.daemon.private_servers import free_port
from tests.peers.base import serve
from tests.peers.chatwoot import ChatwootPeer, Conversation
from tests.peers.discourse import DiscoursePeer
from tests.peers.graph import GraphPeer
from tests.peers.rocketchat import RocketchatPeer, Room

pytestmark = pytest.mark.integration

TOKEN = "outbound-e2e-admin-token"
#: HTTP tokens: each agent's own (role agent) and a supervisor's.
TOKENS = {"anna": "tok-anna-e2e", "mod": "tok-mod-e2e", "bert": "tok-bert-e2e"}
SUPERVISOR = "tok-supervisor-e2e"
AUTH_TOKENS = json.dumps(
    [
        {"name": f"agent:{a}", "role": "agent", "agent_id": a, "sha256": hash_token(t)}
        for a, t in TOKENS.items()
    ]
    + [{"name": "wall", "role": "supervisor", "sha256": hash_token(SUPERVISOR)}]
)
DISCOURSE_SECRET = "outbound-e2e-discourse-secret"
WINDOW = 1.0
MAILBOX = "support@beispiel-telekom.de"
ROUTING = f"""version: 1
defaults: {{offer_timeout: 30, wrap_up: 0}}
skills: [support, community]
queues:
  support: {{skills: {{support: 1}}, channels: [chat, email]}}
  community_desk: {{skills: {{community: 1}}, channels: [social]}}
agents:
  - id: anna
    skills: {{support: 3}}
    capacity: {{phone: 0, chat: 3, email: 5, social: 0}}
    accounts: {{chatwoot: 12, rocketchat: annaRcId00000001}}
  - id: mod
    skills: {{community: 3}}
    capacity: {{phone: 0, chat: 0, email: 0, social: 5}}
    accounts: {{discourse: mod_user}}
rules:
  - {{name: community, when: channel == "social", queue: community_desk, crowd_first: {WINDOW}}}
  - {{name: default, default: true, queue: support}}
"""


class Relay:
    """The SMTP relay replies go to: a real SMTP server (aiosmtpd) keeping what it receives."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        #: while set, every message is answered with this reply and not kept (a busy relay)
        self.refusing: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refusing is not None:
            return self.refusing
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 OK: queued"


@dataclass
class World:
    http: aiohttp.ClientSession
    base: str
    smtp_port: int
    mqtt: MqttProbe
    chatwoot: ChatwootPeer
    rocketchat: RocketchatPeer
    discourse: DiscoursePeer
    graph: GraphPeer
    relay: Relay
    webhooks: list[int] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)

    async def webhook(self, source: str, payload: Any, **headers: str) -> None:
        async with self.http.post(
            f"{self.base}/v1/webhooks/{source}", data=json.dumps(payload).encode(), headers=headers
        ) as resp:
            assert resp.status == 202, await resp.text()

    async def api(
        self, method: str, path: str, body: Any = None, *, token: str = SUPERVISOR
    ) -> tuple[int, Any]:
        async with self.http.request(
            method, f"{self.base}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            return resp.status, await resp.json()

    async def send(self, agent: str, contact_id: str, text: Any) -> tuple[int, Any]:
        """The agent's desk sends a reply with the agent's own token."""
        body = text if isinstance(text, dict) else {"text": text}
        return await self.api(
            "POST", f"/v1/contacts/{contact_id}/messages", body, token=TOKENS[agent]
        )

    async def take(self, agent: str, contact_id: str) -> None:
        """The agent accepts its offer for ``contact_id``."""
        (offer,) = await self.mqtt.wait_for(
            f"agents/{agent}/offers", type="offer", contact_id=contact_id, timeout=WINDOW + 5
        )
        await self.mqtt.agent(agent, op="accept", offer_id=offer["offer_id"])
        await self.mqtt.wait_for("events/contact.assigned", contact_id=contact_id)

    async def login(self, agent: str) -> None:
        await self.mqtt.agent(agent, op="login")
        await self.mqtt.wait_for("events/agent.state", agent_id=agent, state="available")

    async def outbound(self, contact_id: str) -> list[dict[str, Any]]:
        status, body = await self.api("GET", f"/v1/contacts/{contact_id}/messages")
        assert status == 200, body
        return list(body["messages"])

    async def settled(self, contact_id: str, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` outbound items of the contact have their outcome."""

        async def done() -> list[dict[str, Any]] | None:
            found = await self.outbound(contact_id)
            final = [m for m in found if m["state"] in ("sent", "failed")]
            return found if len(final) >= count else None

        return await wait_until(done, 10, f"{count} outbound items of {contact_id}")

    def mail(self, *, sender: str, subject: str, text: str, message_id: str, **extra: str) -> None:
        send_mail(self.smtp_port, mail(sender, MAILBOX, subject, text, message_id, **extra))


def discourse_post(topic: int, number: int, user: str, raw: str, *, staff: bool) -> bytes:
    """A Discourse ``post_created`` delivery for another topic, post, author (real sample)."""
    payload = json.loads((SAMPLES / "social" / "discourse-post-created.json").read_bytes())
    payload["post"].update(
        id=topic * 100 + number,
        topic_id=topic,
        post_number=number,
        username=user,
        name=user,
        display_username=user,
        raw=raw,
        cooked=f"<p>{raw}</p>",
        staff=staff,
        admin=staff,
        moderator=False,
        reply_to_post_number=None if number == 1 else 1,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
    )
    return json.dumps(payload).encode()


def outbound_env(world_urls: dict[str, str], smtp_relay_port: int) -> dict[str, str]:
    """The daemon's outbound settings pointing at the peers (as STELLWERK_* overrides)."""
    return {
        "outbound_chatwoot": json.dumps(
            {"url": world_urls["chatwoot"], "account_id": 1, "api_token": "cw-token"}
        ),
        "outbound_rocketchat": json.dumps(
            {
                "url": world_urls["rocketchat"],
                "user_id": "stellwerkBotId1",
                "auth_token": "rc-token",
            }
        ),
        "outbound_discourse": json.dumps(
            {
                "url": world_urls["discourse"],
                "api_key": "dc-key",
                "api_username": "support_team",
                "assign": True,
            }
        ),
        "outbound_whatsapp": json.dumps(
            {"url": world_urls["graph"], "access_token": "graph-token", "window": 2.0}
        ),
        "outbound_messenger": json.dumps(
            {"url": world_urls["graph"], "access_token": "graph-token"}
        ),
        "outbound_mail": json.dumps(
            {"host": "127.0.0.1", "port": smtp_relay_port, "security": "none", "timeout": 5}
        ),
    }


@contextlib.asynccontextmanager
async def peers() -> AsyncIterator[
    tuple[ChatwootPeer, RocketchatPeer, DiscoursePeer, GraphPeer, Relay, int]
]:
    relay = Relay()
    relay_port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=relay_port)
    controller.start()
    try:
        async with (
            serve(ChatwootPeer()) as cw,
            serve(RocketchatPeer()) as rc,
            serve(DiscoursePeer()) as dc,
            serve(GraphPeer()) as gr,
        ):
            assert isinstance(cw, ChatwootPeer) and isinstance(rc, RocketchatPeer)
            assert isinstance(dc, DiscoursePeer) and isinstance(gr, GraphPeer)
            yield cw, rc, dc, gr, relay, relay_port
    finally:
        controller.stop()


@pytest.fixture
async def world(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> AsyncIterator[World]:
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING, encoding="utf-8")
    http_port, smtp_port = free_port(), free_port()
    async with peers() as (cw, rc, dc, gr, relay, relay_port):
        urls = {"chatwoot": cw.url, "rocketchat": rc.url, "discourse": dc.url, "graph": gr.url}
        daemon = await start_daemon(
            routing,
            http_addr=f"127.0.0.1:{http_port}",
            smtp_addr=f"127.0.0.1:{smtp_port}",
            admin_token=TOKEN,
            auth_tokens=AUTH_TOKENS,
            secret_discourse=DISCOURSE_SECRET,
            sources_unsigned=json.dumps(["chatwoot", "rocketchat", "whatsapp", "messenger"]),
            **outbound_env(urls, relay_port),
        )
        async with aiohttp.ClientSession() as http:
            w = World(
                http, f"http://127.0.0.1:{http_port}", smtp_port, mqtt_probe, cw, rc, dc, gr, relay
            )

            async def echo(post: dict[str, Any]) -> None:
                # Discourse tells Stellwerk about every new post, the staff's own ones too.
                body = discourse_post(
                    post["topic_id"], post["post_number"], post["username"], post["raw"],
                    staff=post["staff"],
                )  # fmt: skip
                signature = hmac.new(DISCOURSE_SECRET.encode(), body, hashlib.sha256).hexdigest()
                async with http.post(
                    f"{w.base}/v1/webhooks/discourse",
                    data=body,
                    headers={
                        "X-Discourse-Event": "post_created",
                        "X-Discourse-Event-Signature": f"sha256={signature}",
                    },
                ) as resp:
                    w.webhooks.append(resp.status)

            dc.on_post = echo

            async def watch(record: dict[str, Any]) -> None:
                w.statuses.append(record)

            # What the desk's live feed registers for (in-process, besides the MQTT push).
            daemon.outbound.watchers.append(watch)
            yield w


def chatwoot_message(conversation: int, text: str) -> dict[str, Any]:
    payload = json.loads((SAMPLES / "chat" / "chatwoot-message-created.json").read_bytes())
    payload["conversation"]["id"] = conversation
    payload["content"] = text
    return dict(payload)


def rocketchat_message(room: str, text: str) -> dict[str, Any]:
    """A visitor's message in ``room`` (the sample is an agent's; the visitor writes here)."""
    payload = json.loads((SAMPLES / "chat" / "rocketchat-message.json").read_bytes())
    payload["_id"] = room
    payload["messages"] = [
        {
            "u": {"_id": payload["visitor"]["_id"], "username": payload["visitor"]["username"]},
            "_id": f"{room}-m1",
            "username": payload["visitor"]["username"],
            "msg": text,
            "ts": "2023-02-02T10:21:05.391Z",
        }
    ]
    return dict(payload)


async def test_chatwoot_assigned_answered_resolved(world: World) -> None:
    world.chatwoot.conversations[42] = Conversation()
    await world.login("anna")
    await world.webhook("chatwoot", chatwoot_message(42, "Mein Router blinkt rot."))
    await world.take("anna", "chatwoot:42")
    # Accepting in Stellwerk assigns the conversation to anna's Chatwoot user.
    await wait_until(lambda: world.chatwoot.conversations[42].assignee_id == 12, 10, "assigned")
    status, body = await world.send("anna", "chatwoot:42", "Bitte einmal neu starten.")
    assert status == 202, body
    assert body["status"]["state"] in ("queued", "sending", "sent")
    await wait_until(lambda: world.chatwoot.conversations[42].messages, 10, "the message")
    (posted,) = world.chatwoot.conversations[42].messages
    assert (posted["content"], posted["message_type"], posted["private"]) == (
        "Bitte einmal neu starten.",
        1,
        False,
    )
    # The desk hears on the agent's own topic that the message went out.
    (pushed,) = await world.mqtt.wait_for(
        "agents/anna/offers", type="outbound", action="message", state="sent"
    )
    assert pushed["contact_id"] == "chatwoot:42" and pushed["key"] == body["key"]
    await wait_until(
        lambda: any(r["key"] == body["key"] and r["state"] == "sent" for r in world.statuses),
        5,
        "the in-process status watcher",
    )
    await world.mqtt.agent("anna", op="complete", contact_id="chatwoot:42")
    await wait_until(lambda: world.chatwoot.conversations[42].status == "resolved", 10, "resolved")
    items = await world.settled("chatwoot:42", 3)
    assert [(m["action"], m["state"]) for m in items] == [
        ("assign", "sent"),
        ("message", "sent"),
        ("resolve", "sent"),
    ]
    # Every request carried Chatwoot's own auth header, and nothing was refused.
    assert all(r.headers.get("api_access_token") == "cw-token" for r in world.chatwoot.requests)
    assert all(r.status == 200 for r in world.chatwoot.requests)


async def test_rocketchat_forwarded_answered_closed(world: World) -> None:
    world.rocketchat.rooms["Tc5SyBZHovD4k8BXv"] = Room()
    await world.login("anna")
    await world.webhook("rocketchat", rocketchat_message("Tc5SyBZHovD4k8BXv", "Hallo?"))
    await world.take("anna", "rocketchat:Tc5SyBZHovD4k8BXv")
    room = world.rocketchat.rooms["Tc5SyBZHovD4k8BXv"]
    await wait_until(lambda: room.served_by == "annaRcId00000001", 10, "forwarded")
    status, body = await world.send("anna", "rocketchat:Tc5SyBZHovD4k8BXv", "Guten Tag!")
    assert status == 202, body
    await wait_until(lambda: room.messages, 10, "the message")
    assert [m["msg"] for m in room.messages] == ["Guten Tag!"]
    await world.mqtt.agent("anna", op="complete", contact_id="rocketchat:Tc5SyBZHovD4k8BXv")
    await wait_until(lambda: not room.open, 10, "closed")
    items = await world.settled("rocketchat:Tc5SyBZHovD4k8BXv", 3)
    assert [(m["action"], m["state"]) for m in items] == [
        ("forward", "sent"),
        ("message", "sent"),
        ("close", "sent"),
    ]
    assert all(r.status == 200 for r in world.rocketchat.requests)


async def test_discourse_question_the_crowd_left_is_answered_as_staff(world: World) -> None:
    world.discourse.topics[7001] = [{"username": "kim", "raw": "Frage"}]
    await world.login("mod")
    body = discourse_post(7001, 1, "kim", "Wie richte ich Mesh-WLAN ein?", staff=False)
    signature = hmac.new(DISCOURSE_SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with world.http.post(
        f"{world.base}/v1/webhooks/discourse",
        data=body,
        headers={
            "X-Discourse-Event": "post_created",
            "X-Discourse-Event-Signature": f"sha256={signature}",
        },
    ) as resp:
        assert resp.status == 202
    await world.mqtt.wait_for("events/contact.crowd_window", contact_id="discourse:7001")
    # Nobody from the crowd answers: after the window it reaches the community desk.
    await world.take("mod", "discourse:7001")
    # discourse-assign: the topic is the agent's in Discourse too.
    await wait_until(lambda: world.discourse.assigned.get(7001) == "mod_user", 10, "assigned")
    answer = "Im Menü WLAN > Mesh den Repeater hinzufügen, dann ist alles verbunden."
    status, reply = await world.send("mod", "discourse:7001", answer)
    assert status == 202, reply
    await wait_until(lambda: len(world.discourse.topics[7001]) == 2, 10, "the staff post")
    post = world.discourse.topics[7001][1]
    assert (post["username"], post["raw"], post["staff"]) == ("support_team", answer, True)
    # Discourse's webhook for the staff post comes back: it is not the crowd's answer.
    await wait_until(lambda: world.webhooks == [202], 10, "the staff post's webhook")
    await world.mqtt.agent("mod", op="complete", contact_id="discourse:7001")
    (done,) = await world.mqtt.wait_for("events/contact.completed", contact_id="discourse:7001")
    assert done["agent_id"] == "mod" and done["crowd"] is True
    assert world.mqtt.seen("events/contact.answered_by_crowd") == []
    async with world.http.get(f"{world.base}/metrics") as resp:
        metrics = await resp.text()
    assert (
        'stellwerk_crowd_outcomes_total{channel="social",outcome="assigned",source="discourse"} 1.0'
        in metrics
    )
    # Every crowd outcome's series exists from the start at 0; this one stays there.
    assert (
        'stellwerk_crowd_outcomes_total{channel="social",outcome="answered_by_crowd",'
        'source="discourse"} 0.0' in metrics
    )
    # the topic's assignment and the staff post
    assert 'stellwerk_outbound_total{destination="discourse",outcome="sent"} 2.0' in metrics


async def test_mail_reply_threads_and_the_customers_answer_joins_the_contact(
    world: World,
) -> None:
    await world.login("anna")
    root = "first-question.4711@kunde.example"
    await asyncio.to_thread(
        world.mail,
        sender="Erika Muster <erika@kunde.example>",
        subject="Rechnung November",
        text="Warum ist die Rechnung so hoch?",
        message_id=root,
    )
    contact = f"email:{root}"
    await world.take("anna", contact)
    status, body = await world.send("anna", contact, "Wir prüfen das gern.")
    assert status == 202, body
    await wait_until(lambda: world.relay.messages, 10, "the reply at the relay")
    (sent,) = world.relay.messages
    assert sent["From"] == MAILBOX and sent["To"] == "erika@kunde.example"
    assert sent["Subject"] == "Re: Rechnung November"
    assert sent["In-Reply-To"] == f"<{root}>"
    assert f"<{root}>" in sent["References"]
    assert sent.get_content().strip() == "Wir prüfen das gern."
    (item,) = await world.settled(contact, 1)
    assert item["remote_id"] == sent["Message-ID"].strip().strip("<>")
    await world.mqtt.agent("anna", op="complete", contact_id=contact)
    await world.mqtt.wait_for("events/contact.completed", contact_id=contact)
    # Her mail client answers our reply and keeps only In-Reply-To: it joins her contact.
    await asyncio.to_thread(
        world.mail,
        sender="erika@kunde.example",
        subject="Re: Rechnung November",
        text="Danke, ich warte.",
        message_id="second.4712@kunde.example",
        In_Reply_To=sent["Message-ID"],
    )
    offers = await world.mqtt.wait_for("agents/anna/offers", type="offer", count=2)
    assert [o["contact_id"] for o in offers] == [contact, contact]


async def test_whatsapp_reply_inside_the_window_and_refused_outside(world: World) -> None:
    await world.login("anna")
    sample = json.loads((SAMPLES / "chat" / "whatsapp-text.json").read_bytes())
    await world.webhook("whatsapp", sample)
    await world.take("anna", "whatsapp:16505551234")
    status, body = await world.send("anna", "whatsapp:16505551234", "Ja, auch in Blau.")
    assert status == 202, body
    await wait_until(lambda: world.graph.sent, 10, "the WhatsApp reply")
    assert world.graph.sent == [
        {"product": "whatsapp", "to": "16505551234", "text": "Ja, auch in Blau."}
    ]
    assert world.graph.requests[0].path == "/v21.0/106540352242922/messages"
    await asyncio.sleep(2.2)  # the test's window is 2 s
    status, body = await world.send("anna", "whatsapp:16505551234", "Noch da?")
    assert status == 409 and body["error"] == "outside_messaging_window", body
    assert "2 h" not in body["detail"] and "within" in body["detail"]
    assert len(world.graph.sent) == 1


async def test_messenger_reply_goes_to_the_send_api(world: World) -> None:
    await world.login("anna")
    sample = json.loads((SAMPLES / "chat" / "messenger-quick-reply.json").read_bytes())
    sample["entry"][0]["messaging"][0]["sender"]["id"] = "6543210987654321"
    await world.webhook("messenger", sample)
    await world.take("anna", "messenger:6543210987654321")
    status, body = await world.send("anna", "messenger:6543210987654321", "Hallo zurück!")
    assert status == 202, body
    await wait_until(lambda: world.graph.sent, 10, "the Messenger reply")
    assert world.graph.sent == [
        {"product": "messenger", "to": "6543210987654321", "text": "Hallo zurück!"}
    ]
    (request,) = world.graph.requests
    assert (request.path, request.body["messaging_type"]) == ("/v21.0/me/messages", "RESPONSE")
    (item,) = await world.settled("messenger:6543210987654321", 1)
    assert item["state"] == "sent" and item["remote_id"].startswith("m_")


async def test_only_the_assigned_agent_may_answer(world: World) -> None:
    world.chatwoot.conversations[43] = Conversation()
    await world.webhook("chatwoot", chatwoot_message(43, "Hallo"))
    await world.mqtt.wait_for("events/contact.queued", contact_id="chatwoot:43")
    path = "/v1/contacts/chatwoot:43/messages"
    async with world.http.post(f"{world.base}{path}", json={"text": "Hi"}) as resp:
        assert resp.status == 401  # no token
    status, body = await world.api("POST", path, {"text": "Hi"}, token=SUPERVISOR)
    assert status == 403  # a supervisor is not an agent
    status, body = await world.api("POST", path, {"text": "Hi"}, token=TOKEN)
    assert status == 403  # nor is the admin
    status, body = await world.send("anna", "chatwoot:43", "Hi")
    assert status == 404 and body["error"] == "unknown_contact"  # queued: not anna's (yet)
    await world.login("anna")
    await world.take("anna", "chatwoot:43")
    status, body = await world.send("bert", "chatwoot:43", "Hi")
    assert status == 404 and body["error"] == "unknown_contact"  # not bert's contact
    status, body = await world.api("GET", path, token=TOKENS["bert"])
    assert status == 404
    status, body = await world.send("anna", "chatwoot:43", {"txt": "Hi"})
    assert status == 400 and body["error"] == "bad_message"
    status, body = await world.send("anna", "nope:1", "Hi")
    assert status == 404
    # The desk retries a send whose answer it lost: the Idempotency-Key queues it once.
    for _ in range(2):
        async with world.http.post(
            f"{world.base}{path}",
            json={"text": "Einmal bitte."},
            headers={"Authorization": f"Bearer {TOKENS['anna']}", "Idempotency-Key": "desk-1"},
        ) as resp:
            assert resp.status == 202
    await world.settled("chatwoot:43", 2)
    assert [m["content"] for m in world.chatwoot.conversations[43].messages] == ["Einmal bitte."]
    status, body = await world.api("GET", path, token=TOKENS["anna"])
    assert status == 200 and len(body["messages"]) == 2  # the assignment and the message
