"""The agent desktop and the wallboard in a real browser (headless Debian Chromium, Playwright).

The daemon runs in this event loop against the real Redis and Mosquitto; customers write over
MQTT ingress like any adapter; the pages are driven as a person would, and the page's own
transport (the WebSocket) is also driven by hand to try what the UI does not offer.
Screenshots go to ``artifacts/`` (gitignored) for a person to look at.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon.auth import hash_token
from tests.daemon.conftest import MqttProbe
from tests.daemon.private_servers import free_port

pytestmark = pytest.mark.integration

TOKENS = {"anna": "anna-secret-token", "bert": "bert-secret-token", "wall": "wall-secret-token"}


def routing(path: Path, *, offer_timeout: float = 60, wrap_up: float = 30) -> Path:
    path.write_text(
        f"""version: 1
timezone: Europe/Berlin
defaults: {{offer_timeout: {offer_timeout}, wrap_up: {wrap_up}, reject_cooldown: 60}}
skills: [support]
away_reasons: {{break: Break, training: Training}}
dispositions: {{solved: Solved, callback: Call back}}
queues:
  support:
    description: First-level support
    skills: {{support: 1}}
    sla: {{seconds: 30, percent: 80}}
agents:
  - {{id: anna, name: Anna Becker, skills: {{support: 3}}, capacity: {{chat: 3, email: 5}}}}
  - {{id: bert, name: Bert Brandt, skills: {{support: 3}}, capacity: {{chat: 3, email: 5}}}}
experts:
  - {{id: x-erika, name: Erika, level: 3, emails: [erika@example.org]}}
rules:
  - {{name: crowd_expert, when: customer.expert, queue: support, priority: 50}}
  - {{name: default, default: true, queue: support}}
""",
        encoding="utf-8",
    )
    return path


def tokens_env() -> str:
    entries = [
        {"name": f"agent:{a}", "role": "agent", "agent_id": a, "sha256": hash_token(TOKENS[a])}
        for a in ("anna", "bert")
    ]
    entries.append({"name": "wall-1", "role": "supervisor", "sha256": hash_token(TOKENS["wall"])})
    return json.dumps(entries)


async def desk_page(browser: Any, base: str, agent: str) -> Any:
    page = await (await browser.new_context(viewport={"width": 1400, "height": 900})).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(f"{base}/desk")
    await page.fill("#agent-id", agent)
    await page.fill("#token", TOKENS[agent])
    await page.click("#signin-button")
    await page.wait_for_selector("#status:text('live')")
    return page


async def publish(probe: MqttProbe, channel: str, payload: dict[str, Any]) -> None:
    await probe.publish(f"in/{channel}/generic", payload)


async def test_an_agent_takes_a_chat_with_its_history_and_follow_up_and_completes_it(
    tmp_path: Path, start_daemon: Any, mqtt_probe: MqttProbe, browser: Any, artifacts: Path
) -> None:
    port = free_port()
    await start_daemon(
        routing(tmp_path / "r.yaml"), http_addr=f"127.0.0.1:{port}", auth_tokens=tokens_env()
    )
    base = f"http://127.0.0.1:{port}"
    # Earlier, by mail: the customer wrote about a wrong bill and gave up before anyone took it.
    await publish(
        mqtt_probe,
        "email",
        {
            "kind": "new",
            "channel": "email",
            "id": "mail-1",
            "email": "erika@example.org",
            "name": "Erika Muster",
            "subject": "Rechnung zu hoch",
            "text": "Die Rechnung ist falsch.",
        },
    )
    await mqtt_probe.wait_for("events/contact.queued", contact_id="generic:mail-1")
    await publish(
        mqtt_probe,
        "email",
        {"kind": "end", "channel": "email", "id": "mail-1", "end_reason": "closed"},
    )
    await mqtt_probe.wait_for("events/contact.abandoned", contact_id="generic:mail-1")
    # Now a chat, queued while nobody is available, and a follow-up while it waits.
    await publish(
        mqtt_probe,
        "chat",
        {
            "kind": "new",
            "channel": "chat",
            "id": "chat-1",
            "email": "erika@example.org",
            "name": "Erika Muster",
            "text": "Hallo, ich habe noch eine Frage zur Rechnung.",
            "attachments": [
                {"filename": "rechnung.pdf", "content_type": "application/pdf", "size": 40960}
            ],
        },
    )
    await mqtt_probe.wait_for("events/contact.queued", contact_id="generic:chat-1")
    await publish(
        mqtt_probe,
        "chat",
        {
            "kind": "update",
            "channel": "chat",
            "id": "chat-1",
            "email": "erika@example.org",
            "name": "Erika Muster",
            "text": "Kundennummer 4711, falls das hilft.",
        },
    )
    await mqtt_probe.wait_for("events/contact.updated", contact_id="generic:chat-1")

    anna = await desk_page(browser, base, "anna")
    bert = await desk_page(browser, base, "bert")
    await anna.wait_for_selector("#agent-state:text('Offline')")
    await anna.click("#go-available")
    offer = await anna.wait_for_selector("article.offer[data-contact='generic:chat-1']")
    # A visible countdown that runs.
    first = await offer.eval_on_selector(".countdown", "e => e.textContent")
    await asyncio.sleep(1.3)
    second = await offer.eval_on_selector(".countdown", "e => e.textContent")
    assert first.endswith(" s") and int(second[:-2]) < int(first[:-2]) <= 60
    # The whole thread (the follow-up sent while queued), the attachment, the history, why.
    await anna.wait_for_selector(
        "article.offer .messages li:has-text('Kundennummer 4711, falls das hilft.')"
    )
    text = await offer.inner_text()
    assert "Hallo, ich habe noch eine Frage zur Rechnung." in text
    assert "rechnung.pdf" in text
    assert "Rechnung zu hoch" in text and "Mail" in text  # the earlier email, in the history
    assert "Crowd expert · level 3" in text
    assert await offer.eval_on_selector(".rule", "e => e.textContent") == "crowd_expert"
    await anna.screenshot(path=str(artifacts / "desk-offer.png"))

    # Bert, signed in beside her, never sees her offer ...
    await bert.click("#go-available")
    await bert.wait_for_selector("#agent-state:text('Available')")
    assert await bert.query_selector("article.offer") is None
    # ... and cannot act on it through the page's own transport either.
    offer_id = await offer.get_attribute("data-offer")
    refusals = await raw_desk_commands(
        base,
        TOKENS["bert"],
        [
            {"op": "accept", "offer_id": offer_id},
            {"op": "accept", "offer_id": offer_id, "agent_id": "anna"},
            {"op": "transcript", "contact_id": "generic:chat-1"},
        ],
    )
    assert (
        sorted(r.get("reason") for r in refusals) == ["not_your_contact"] + ["not_your_offer"] * 2
    )
    assert await bert.query_selector("article.offer, article.contact") is None

    # Anna accepts; the contact stays with her; a follow-up while she works on it arrives live.
    await anna.click(f"article.offer[data-offer='{offer_id}'] button.accept")
    await anna.wait_for_selector("article.contact.assigned[data-contact='generic:chat-1']")
    await publish(
        mqtt_probe,
        "chat",
        {
            "kind": "update",
            "channel": "chat",
            "id": "chat-1",
            "email": "erika@example.org",
            "name": "Erika Muster",
            "text": "Danke schon mal!",
        },
    )
    await anna.wait_for_selector("article.contact .messages li:has-text('Danke schon mal!')")
    # A reload: the open work comes back from the daemon, not from the page's memory.
    await anna.reload()
    await anna.wait_for_selector("article.contact.assigned[data-contact='generic:chat-1']")
    await anna.wait_for_selector("article.contact .messages li:has-text('Kundennummer 4711')")
    await anna.screenshot(path=str(artifacts / "desk-contact.png"))
    await anna.select_option("article.contact select.disposition", "solved")
    await anna.click("article.contact button.complete")
    done = await mqtt_probe.wait_for("events/contact.completed", contact_id="generic:chat-1")
    assert done[0]["disposition"] == "solved" and done[0]["agent_id"] == "anna"
    wrap = await anna.wait_for_selector("article.contact.wrap_up .wrapup-countdown")
    assert 25 <= int((await wrap.inner_text())[:-2]) <= 30
    assert "Solved" in await anna.inner_text("article.contact.wrap_up")
    metrics = await http_get(base, "/metrics")
    assert (
        'stellwerk_contacts_dispositions_total{disposition="solved",queue="support"} 1.0' in metrics
    )
    assert (
        'stellwerk_contacts_dispositions_total{disposition="callback",queue="support"} 0.0'
        in metrics
    )
    assert anna.errors == [] and bert.errors == []


async def raw_desk_commands(base: str, token: str, commands: list[dict[str, Any]]) -> list[Any]:
    """Send commands over /v1/desk/ws as the page does; the answers to each (refused/ack)."""
    answers = []
    url = base.replace("http", "ws") + "/v1/desk/ws"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"op": "auth", "token": token}))
        for i, command in enumerate(commands):
            await ws.send_str(json.dumps({**command, "ref": f"t{i}"}))
        while len(answers) < len(commands):
            msg = json.loads((await ws.receive(timeout=5)).data)
            # The journal takes a command (ack); the engine's refusal follows on its own.
            if msg["type"] in ("refused", "offer") and msg.get("reason") != "rate_limited":
                answers.append(msg)
    return answers


async def http_get(base: str, path: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(base + path, headers=headers) as r:
        return await r.text()


async def test_the_desk_socket_refuses_bad_tokens_and_other_roles(
    tmp_path: Path, start_daemon: Any
) -> None:
    port = free_port()
    await start_daemon(
        routing(tmp_path / "r.yaml"), http_addr=f"127.0.0.1:{port}", auth_tokens=tokens_env()
    )
    url = f"ws://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for path, token, error in [
            ("/v1/desk/ws", "wrong", "unauthorized"),
            ("/v1/desk/ws", TOKENS["wall"], "forbidden"),  # a supervisor is not an agent
            ("/v1/wall/ws", TOKENS["anna"], "forbidden"),  # an agent sees no wallboard
        ]:
            async with session.ws_connect(url + path) as ws:
                await ws.send_str(json.dumps({"op": "auth", "token": token}))
                msg = json.loads((await ws.receive(timeout=5)).data)
                assert (msg["type"], msg["error"]) == ("error", error)
                closed = await ws.receive(timeout=5)
                assert closed.type == aiohttp.WSMsgType.CLOSE
        # Commands are rate limited per connection (a burst of 20, then 20 a second).
        async with session.ws_connect(url + "/v1/desk/ws") as ws:
            await ws.send_str(json.dumps({"op": "auth", "token": TOKENS["anna"]}))
            for i in range(40):
                await ws.send_str(json.dumps({"op": "transcript", "contact_id": "x", "ref": i}))
            reasons = []
            while len(reasons) < 40:
                msg = json.loads((await ws.receive(timeout=5)).data)
                if msg["type"] == "refused":
                    reasons.append(msg["reason"])
            assert reasons.count("not_your_contact") >= 20
            assert 0 < reasons.count("rate_limited") <= 20
        # The pages themselves hold no data and are public.
        async with session.get(f"http://127.0.0.1:{port}/desk") as r:
            assert r.status == 200 and "Content-Security-Policy" in r.headers
        async with session.get(f"http://127.0.0.1:{port}/static/../auth.py") as r:
            assert r.status == 404


def routing_two_queues(path: Path) -> Path:
    """Chats (long offers, no wrap-up) and calls (short offers), one missed offer is enough."""
    path.write_text(
        """version: 1
defaults: {offer_timeout: 60, wrap_up: 0, max_missed_offers: 1, reject_cooldown: 60}
skills: [support]
away_reasons: {break: Break, training: Training}
dispositions: {solved: Solved}
queues:
  chats: {skills: {support: 1}, channels: [chat]}
  calls: {skills: {support: 1}, channels: [phone], offer_timeout: 1.5}
agents:
  - {id: anna, name: Anna Becker, skills: {support: 3}, capacity: {phone: 1, chat: 3}}
rules:
  - {name: calls, when: channel == "phone", queue: calls}
  - {name: default, default: true, queue: chats}
""",
        encoding="utf-8",
    )
    return path


async def test_three_chats_at_once_a_calls_details_away_reasons_and_not_responding(
    tmp_path: Path, start_daemon: Any, mqtt_probe: MqttProbe, browser: Any, artifacts: Path
) -> None:
    port = free_port()
    daemon = await start_daemon(
        routing_two_queues(tmp_path / "r.yaml"),
        http_addr=f"127.0.0.1:{port}",
        auth_tokens=tokens_env(),
    )
    base = f"http://127.0.0.1:{port}"
    anna = await desk_page(browser, base, "anna")
    await anna.click("#go-available")
    await anna.wait_for_selector("#agent-state:text('Available')")
    for n in range(1, 5):
        await publish(
            mqtt_probe,
            "chat",
            {
                "kind": "new",
                "channel": "chat",
                "id": f"c{n}",
                "handle": f"guest{n}",
                "text": f"Frage Nummer {n}",
            },
        )
        await mqtt_probe.wait_for("events/contact.queued", contact_id=f"generic:c{n}")
        if n <= 3:
            await anna.click(f"article.offer[data-contact='generic:c{n}'] button.accept")
            await anna.wait_for_selector(f"article.contact.assigned[data-contact='generic:c{n}']")
    # Three chats fill her budget: the fourth waits, and no offer for it shows.
    assert daemon.state.view.contact_info("generic:c4")["state"] == "queued"
    assert len(await anna.query_selector_all("article.contact.assigned")) == 3
    assert await anna.query_selector("article.offer") is None
    await anna.screenshot(path=str(artifacts / "desk-three-chats.png"))
    # Completing one frees a slot: the fourth is offered at once.
    await anna.select_option("article.contact[data-contact='generic:c2'] select", "solved")
    await anna.click("article.contact[data-contact='generic:c2'] button.complete")
    await anna.wait_for_selector("article.offer[data-contact='generic:c4']")
    assert await anna.query_selector("article.contact[data-contact='generic:c2']") is None

    # Away needs one of the routing file's reasons; the page offers exactly those.
    reasons = await anna.eval_on_selector_all("#away-reason option", "os => os.map(o => o.value)")
    assert reasons == ["break", "training"]
    refused = await raw_desk_commands(
        base, TOKENS["anna"], [{"op": "state", "state": "away", "reason": "coffee"}]
    )
    assert refused[0]["reason"] == "unknown_away_reason"
    await anna.select_option("#away-reason", "training")
    await anna.click("#go-away")
    await anna.wait_for_selector("#agent-state:text('Away · Training')")
    # Away withdraws the pending offer; the held chats stay with her.
    await anna.wait_for_selector("article.offer", state="detached")
    for n in (1, 3):
        await anna.select_option(f"article.contact[data-contact='generic:c{n}'] select", "solved")
        await anna.click(f"article.contact[data-contact='generic:c{n}'] button.complete")
    await anna.wait_for_selector("article.contact", state="detached")
    await anna.click("#go-available")
    await anna.wait_for_selector("article.offer[data-contact='generic:c4']")
    await anna.click("article.offer[data-contact='generic:c4'] button.reject")
    await anna.wait_for_selector("article.offer", state="detached")

    # A call: caller, dialled number and IVR arguments. She lets it ring out: not responding.
    await publish(
        mqtt_probe,
        "phone",
        {
            "kind": "new",
            "channel": "phone",
            "id": "call-1",
            "from": "+4930123456",
            "to": "+498003322002",
            "attributes": {"ivr_choice": "2", "contract": "K-4711"},
        },
    )
    call = await anna.wait_for_selector("article.offer[data-contact='generic:call-1']")
    text = await call.inner_text()
    assert "+4930123456" in text and "+498003322002" in text
    assert "ivr_choice" in text and "K-4711" in text
    await anna.screenshot(path=str(artifacts / "desk-call.png"))
    banner = await anna.wait_for_selector("#not-responding", timeout=5000)
    assert "Go available" in await banner.inner_text()
    await anna.wait_for_selector("#agent-state:text('Not responding')")
    await anna.screenshot(path=str(artifacts / "desk-not-responding.png"))
    await anna.click("#go-available")
    await anna.wait_for_selector("#agent-state:text('Available')")
    assert await anna.query_selector("#not-responding") is None
    assert anna.errors == []


async def test_the_desk_reconnects_after_a_daemon_restart_and_shows_the_open_work(
    tmp_path: Path, start_daemon: Any, mqtt_probe: MqttProbe, browser: Any
) -> None:
    port = free_port()
    path = routing(tmp_path / "r.yaml")
    first = await start_daemon(path, http_addr=f"127.0.0.1:{port}", auth_tokens=tokens_env())
    base = f"http://127.0.0.1:{port}"
    anna = await desk_page(browser, base, "anna")
    await anna.click("#go-available")
    await publish(
        mqtt_probe,
        "chat",
        {"kind": "new", "channel": "chat", "id": "r1", "handle": "guest", "text": "Hallo?"},
    )
    await anna.click("article.offer[data-contact='generic:r1'] button.accept")
    await anna.wait_for_selector("article.contact.assigned[data-contact='generic:r1']")
    # The daemon goes away (a deploy, a lease moving): the page notices and keeps trying.
    first.stopping.set()
    await anna.wait_for_selector("#status:text('reconnecting')", timeout=15000)
    await start_daemon(path, http_addr=f"127.0.0.1:{port}", auth_tokens=tokens_env())
    await anna.wait_for_selector("#status:text('live')", timeout=15000)
    # The snapshot from the new daemon holds her contact; she can finish it.
    await anna.wait_for_selector("article.contact.assigned[data-contact='generic:r1']")
    await anna.select_option("article.contact select.disposition", "callback")
    await anna.click("article.contact button.complete")
    done = await mqtt_probe.wait_for("events/contact.completed", contact_id="generic:r1")
    assert done[0]["disposition"] == "callback"
    assert anna.errors == []
