"""Answering from the desk, in a real browser (headless Debian Chromium, Playwright).

The real daemon on the real Redis and Mosquitto; the platforms are the protocol peers of
``tests/peers`` and the mail relay a real SMTP server (aiosmtpd); customers write through the
daemon's webhooks and its SMTP listener. The agent works only with the page: accepts, writes in
the reply box, sends, completes. What the platforms hold at the end is the judge.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon.auth import hash_token
from tests.daemon.conftest import SAMPLES, MqttProbe, mail, send_mail, wait_until
from tests.daemon.private_servers import free_port
from tests.daemon.test_outbound_e2e import (
    MAILBOX,
    Relay,
    chatwoot_message,
    discourse_post,
    outbound_env,
    peers,
)
from tests.peers.chatwoot import ChatwootPeer, Conversation
from tests.peers.discourse import DiscoursePeer
from tests.peers.graph import GraphPeer

pytestmark = pytest.mark.integration

TOKENS = {"anna": "anna-reply-token"}
DISCOURSE_SECRET = "desk-replies-discourse-secret"
ROUTING = """version: 1
defaults: {offer_timeout: 60, wrap_up: 0}
skills: [support]
away_reasons: {break: Break}
queues:
  support: {skills: {support: 1}, channels: [chat, email]}
  community_desk: {skills: {support: 1}, channels: [social]}
agents:
  - id: anna
    name: Anna Becker
    skills: {support: 3}
    capacity: {chat: 3, email: 5, social: 1}
    accounts: {chatwoot: 12, discourse: anna_becker}
rules:
  - {name: community, when: channel == "social", queue: community_desk, crowd_first: 0.5}
  - {name: default, default: true, queue: support}
"""


@dataclass
class Desk:
    base: str
    smtp_port: int
    page: Any
    chatwoot: ChatwootPeer
    discourse: DiscoursePeer
    graph: GraphPeer
    relay: Relay
    http: aiohttp.ClientSession
    #: the Discourse posts whose webhook the daemon took
    echoed: list[int] = field(default_factory=list)

    async def webhook(self, source: str, payload: Any) -> None:
        async with self.http.post(
            f"{self.base}/v1/webhooks/{source}", data=json.dumps(payload).encode()
        ) as resp:
            assert resp.status == 202, await resp.text()

    async def discourse_webhook(self, body: bytes) -> None:
        """A signed ``post_created`` delivery, as Discourse sends it."""
        signature = hmac.new(DISCOURSE_SECRET.encode(), body, hashlib.sha256).hexdigest()
        async with self.http.post(
            f"{self.base}/v1/webhooks/discourse",
            data=body,
            headers={
                "X-Discourse-Event": "post_created",
                "X-Discourse-Event-Signature": f"sha256={signature}",
            },
        ) as resp:
            assert resp.status == 202, await resp.text()

    async def accept(self, contact_id: str) -> Any:
        """Anna accepts the offer for ``contact_id`` in the page; its contact card."""
        await self.page.click(f"article.offer[data-contact='{contact_id}'] button.accept")
        return await self.page.wait_for_selector(
            f"article.contact.assigned[data-contact='{contact_id}']"
        )

    async def write(self, contact_id: str, text: str) -> None:
        card = f"article.contact[data-contact='{contact_id}']"
        await self.page.fill(f"{card} textarea.reply-text", text)
        await self.page.click(f"{card} button.send")

    def mail(self, *, subject: str, text: str, message_id: str, **extra: str) -> None:
        """The customer's mail to the daemon's SMTP listener."""
        erika = "Erika Muster <erika@kunde.example>"
        send_mail(self.smtp_port, mail(erika, MAILBOX, subject, text, message_id, **extra))


@pytest.fixture
async def desk(
    tmp_path: Path, start_daemon: Callable[..., Any], browser: Any
) -> AsyncIterator[Desk]:
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING, encoding="utf-8")
    http_port, smtp_port = free_port(), free_port()
    anna = {"name": "agent:anna", "role": "agent", "agent_id": "anna"}
    tokens = [{**anna, "sha256": hash_token(TOKENS["anna"])}]
    async with peers() as (cw, rc, dc, gr, relay, relay_port):
        urls = {"chatwoot": cw.url, "rocketchat": rc.url, "discourse": dc.url, "graph": gr.url}
        env = outbound_env(urls, relay_port)
        # A window of no time at all: every WhatsApp reply is outside it, without waiting.
        env["outbound_whatsapp"] = json.dumps(
            {"url": gr.url, "access_token": "graph-token", "window": 0}
        )
        await start_daemon(
            routing,
            http_addr=f"127.0.0.1:{http_port}",
            smtp_addr=f"127.0.0.1:{smtp_port}",
            auth_tokens=json.dumps(tokens),
            sources_unsigned=json.dumps(["chatwoot", "whatsapp"]),
            secret_discourse=DISCOURSE_SECRET,
            **env,
        )
        base = f"http://127.0.0.1:{http_port}"
        context = await browser.new_context(viewport={"width": 1400, "height": 900})
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{base}/desk")
        await page.fill("#agent-id", "anna")
        await page.fill("#token", TOKENS["anna"])
        await page.click("#signin-button")
        await page.wait_for_selector("#status:text('live')")
        await page.click("#go-available")
        await page.wait_for_selector("#agent-state:text('Available')")
        async with aiohttp.ClientSession() as http:
            desk = Desk(base, smtp_port, page, cw, dc, gr, relay, http)

            async def echo(post: dict[str, Any]) -> None:
                # Discourse tells Stellwerk about every new post, the staff's own ones too.
                body = discourse_post(
                    post["topic_id"], post["post_number"], post["username"], post["raw"],
                    staff=post["staff"],
                )  # fmt: skip
                await desk.discourse_webhook(body)
                desk.echoed.append(post["post_number"])

            dc.on_post = echo
            yield desk
        await context.close()
        assert errors == []


async def test_a_chatwoot_conversation_answered_from_the_desk_once_though_the_answer_was_lost(
    desk: Desk, artifacts: Path
) -> None:
    page = desk.page
    desk.chatwoot.conversations[42] = Conversation()
    await desk.webhook("chatwoot", chatwoot_message(42, "Mein Router blinkt rot."))
    await desk.accept("chatwoot:42")
    # Accepting in the desk assigns the conversation to anna's Chatwoot user.
    await wait_until(lambda: desk.chatwoot.conversations[42].assignee_id == 12, 10, "assigned")

    # The daemon takes the first send, but its answer never reaches the page (the network
    # drops it): the page sends again, under the same key.
    posts: list[str] = []

    async def lose_first_answer(route: Any) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        posts.append(route.request.headers["idempotency-key"])
        if len(posts) == 1:
            await route.fetch()
            await route.abort("connectionreset")
        else:
            await route.continue_()

    await page.route("**/v1/contacts/*/messages", lose_first_answer)
    await desk.write("chatwoot:42", "Bitte einmal neu starten.")
    reply = "article.contact[data-contact='chatwoot:42'] .messages li.reply"
    await page.wait_for_selector(f"{reply} .reply-state.reply-sent")
    await wait_until(lambda: len(posts) >= 2, 10, "the page's second send")
    assert len(set(posts)) == 1
    # The conversation holds the answer exactly once, as an outgoing public message.
    assert [
        (m["content"], m["message_type"], m["private"])
        for m in desk.chatwoot.conversations[42].messages
    ] == [("Bitte einmal neu starten.", 1, False)]
    # In the thread: the customer's message, then anna's answer under her name.
    items = await page.eval_on_selector_all(
        "article.contact[data-contact='chatwoot:42'] .messages li",
        "ls => ls.map(l => [l.className, l.innerText])",
    )
    assert [cls for cls, _ in items] == ["customer", "staff reply"]
    assert "Mein Router blinkt rot." in items[0][1]
    assert "Anna Becker" in items[1][1] and "Bitte einmal neu starten." in items[1][1]
    assert "sent" in items[1][1]
    await page.screenshot(path=str(artifacts / "desk-reply.png"))

    # After a reload the state comes from the daemon, not from the page.
    await page.unroute("**/v1/contacts/*/messages")
    await page.reload()
    await page.wait_for_selector(f"{reply} .reply-state.reply-sent")
    assert len(await page.query_selector_all(reply)) == 1

    await page.click("article.contact[data-contact='chatwoot:42'] button.complete")
    await wait_until(lambda: desk.chatwoot.conversations[42].status == "resolved", 10, "resolved")
    await page.wait_for_selector("article.contact", state="detached")
    assert len(desk.chatwoot.conversations[42].messages) == 1


async def test_a_mail_answered_from_the_desk_and_the_customers_answer_showing_live(
    desk: Desk,
) -> None:
    root = "frage.4711@kunde.example"
    contact = f"email:{root}"
    await asyncio.to_thread(
        desk.mail, subject="Rechnung November", text="Warum so hoch?", message_id=root
    )
    await desk.accept(contact)
    # The relay is busy at first: the reply shows as retrying, with the relay's answer.
    desk.relay.refusing = "451 4.3.2 Busy, try again later"
    await desk.write(contact, "Wir prüfen das gern.")
    card = f"article.contact[data-contact='{contact}']"
    retrying = await desk.page.wait_for_selector(f"{card} li.reply:has(.reply-retrying)")
    assert "451" in await retrying.inner_text() and "Busy" in await retrying.inner_text()
    desk.relay.refusing = None
    await desk.page.wait_for_selector(f"{card} li.reply .reply-state.reply-sent")
    (sent,) = desk.relay.messages
    assert (sent["From"], sent["To"]) == (MAILBOX, "erika@kunde.example")
    assert sent["Subject"] == "Re: Rechnung November"
    assert sent["In-Reply-To"] == f"<{root}>" and f"<{root}>" in sent["References"]
    assert sent.get_content().strip() == "Wir prüfen das gern."
    # Her mail client answers the reply, keeping only In-Reply-To: it joins the same contact
    # and appears in the open card at once.
    await asyncio.to_thread(
        desk.mail,
        subject="Re: Rechnung November",
        text="Danke, ich warte.",
        message_id="antwort.4712@kunde.example",
        In_Reply_To=sent["Message-ID"],
    )
    await desk.page.wait_for_selector(f"{card} .messages li.customer:has-text('Danke, ich warte.')")
    texts = await desk.page.eval_on_selector_all(
        f"{card} .messages li .text", "ls => ls.map(l => l.innerText)"
    )
    assert texts == ["Warum so hoch?", "Wir prüfen das gern.", "Danke, ich warte."]
    assert len(await desk.page.query_selector_all("article.contact, article.offer")) == 1


async def test_outside_the_whatsapp_window_the_desk_says_why_and_a_generic_chat_has_no_box(
    desk: Desk, mqtt_probe: MqttProbe
) -> None:
    sample = json.loads((SAMPLES / "chat" / "whatsapp-text.json").read_bytes())
    await desk.webhook("whatsapp", sample)
    contact = "whatsapp:16505551234"
    await desk.accept(contact)
    await desk.write(contact, "Ja, auch in Blau.")
    card = f"article.contact[data-contact='{contact}']"
    error = await desk.page.wait_for_selector(f"{card} .reply-error:not(:empty)")
    # The sentence is the route's own, asked independently with anna's token.
    async with desk.http.post(
        f"{desk.base}/v1/contacts/{contact}/messages",
        json={"text": "Ja, auch in Blau."},
        headers={"Authorization": f"Bearer {TOKENS['anna']}"},
    ) as resp:
        assert resp.status == 409
        refusal = await resp.json()
    assert refusal["error"] == "outside_messaging_window"
    assert await error.inner_text() == refusal["detail"]
    # The text is kept in the box; nothing went to Meta.
    assert await desk.page.input_value(f"{card} textarea.reply-text") == "Ja, auch in Blau."
    assert desk.graph.sent == [] and desk.graph.requests == []
    assert await desk.page.query_selector(f"{card} li.reply") is None

    # A chat from a source Stellwerk cannot answer: no reply box at all.
    await mqtt_probe.publish(
        "in/chat/generic",
        {"kind": "new", "channel": "chat", "id": "g1", "handle": "guest", "text": "Hallo?"},
    )
    generic = await desk.accept("generic:g1")
    assert await generic.query_selector("form.reply") is None
    assert await desk.page.query_selector(f"{card} form.reply") is not None


async def test_a_community_question_answered_from_the_desk_as_staff_shows_once(
    desk: Desk, artifacts: Path
) -> None:
    desk.discourse.topics[7001] = [{"username": "kim", "raw": "Frage"}]
    desk.discourse.users["anna_becker"] = False  # anna's own Discourse user, not staff
    await desk.discourse_webhook(
        discourse_post(7001, 1, "kim", "Wie richte ich Mesh-WLAN ein?", staff=False)
    )
    # Nobody from the crowd answers within the window: it reaches the community desk.
    await desk.accept("discourse:7001")
    await wait_until(lambda: desk.discourse.assigned.get(7001) == "anna_becker", 10, "assigned")
    card = "article.contact[data-contact='discourse:7001']"
    # Too short for Discourse: it refuses, and the desk shows its reason.
    await desk.write("discourse:7001", "Siehe FAQ.")
    failed = await desk.page.wait_for_selector(f"{card} li.reply:has(.reply-failed)")
    assert "too short" in await failed.inner_text()
    answer = "Im Menü WLAN > Mesh den Repeater hinzufügen."
    await desk.write("discourse:7001", answer)
    await desk.page.wait_for_selector(f"{card} li.reply .reply-state.reply-sent")
    await wait_until(lambda: len(desk.discourse.topics[7001]) == 2, 10, "the staff post")
    post = desk.discourse.topics[7001][1]
    assert (post["username"], post["raw"], post["staff"]) == ("support_team", answer, True)
    # Discourse reports the staff post back (into the transcript, before the daemon's 202); the
    # thread, read afresh, still shows the answer once, as anna's.
    await wait_until(lambda: desk.echoed == [2], 10, "the staff post's webhook")
    await desk.page.reload()
    await desk.page.wait_for_selector(f"{card} li.reply .reply-state.reply-sent")
    texts = await desk.page.eval_on_selector_all(
        f"{card} .messages li", "ls => ls.map(l => l.innerText)"
    )
    assert len(texts) == 3 and "Siehe FAQ." in texts[1] and "failed" in texts[1]
    assert "Anna Becker" in texts[2] and answer in texts[2] and "sent" in texts[2]
    await desk.page.screenshot(path=str(artifacts / "desk-reply-community.png"))
