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
        # The pages themselves hold no data and are public.
        async with session.get(f"http://127.0.0.1:{port}/desk") as r:
            assert r.status == 200 and "Content-Security-Policy" in r.headers
        async with session.get(f"http://127.0.0.1:{port}/static/../auth.py") as r:
            assert r.status == 404
