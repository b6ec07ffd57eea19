"""The crowd service end to end: a real daemon against the real Redis and Mosquitto,
fed the way the world feeds it — Discourse webhooks (the real payload shape, signed) over HTTP,
Asterisk ARI calls over MQTT, e-mail over SMTP — and watched the way its users watch it: offers
on the agents' topics, events on ``{prefix}/events/...``, the experts report over HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.daemon.conftest import SAMPLES, MqttProbe, ari, mail, send_mail, wait_until

pytestmark = pytest.mark.integration

WINDOW = 1.5  # the crowd window of the test's routing file, seconds
SECRET = "crowd-e2e-discourse-secret"
TOKEN = "crowd-e2e-admin-token"
CALL_TOPIC = "in/phone/asterisk-ari"
HEINZ_PHONE = "0171 2345678"  # as the experts registry writes it; ARI sends it like this too
HEINZ_EMAIL = "Heinz.Fischer@example.net"

ROUTING = f"""version: 1
defaults:
  offer_timeout: 30
  wrap_up: 0
  preferred_agent_seconds: 3600
skills: [support, second_level, community]
queues:
  support:
    skills: {{support: 1}}
    channels: [phone, chat, email]
  expert_desk:
    skills: {{second_level: 1}}
    channels: [phone, chat, email, social]
    weight: 10
    sla: {{seconds: 10, percent: 95}}
  community_desk:
    skills: {{community: 1}}
    channels: [social]
    sla: {{seconds: 3600, percent: 80}}
agents:
  - {{id: anna, skills: {{support: 3}}, capacity: {{phone: 1, chat: 0, email: 5, social: 0}}}}
  - {{id: bert, skills: {{support: 3}}, capacity: {{phone: 1, chat: 0, email: 5, social: 0}}}}
  - {{id: xdesk, skills: {{second_level: 3}}, capacity: {{phone: 1, chat: 0, email: 5, social: 5}}}}
  - {{id: mod, skills: {{community: 3}}, capacity: {{phone: 0, chat: 0, email: 0, social: 5}}}}
experts:
  - {{id: x-clara, name: Clara Champ, level: 2, handles: ["discourse:clara"]}}
  - id: x-heinz
    name: Heinz Fischer
    level: 3
    phones: ["{HEINZ_PHONE}"]
    emails: [{HEINZ_EMAIL}]
    handles: ["discourse:heinzf"]
rules:
  - {{name: crowd_expert, when: customer.expert, queue: expert_desk, priority: 100}}
  - name: community_personal_data
    when: >-
      channel == "social"
      and (text ~ "(?i)rechnung|vertrag|iban" or subject ~ "(?i)rechnung|vertrag|iban")
    queue: community_desk
  - name: community_crowd_first
    when: channel == "social"
    queue: community_desk
    crowd_first: {WINDOW}
  - {{name: default, default: true, queue: support}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Crowd:
    """The running daemon, seen from outside: HTTP, SMTP and the MQTT probe."""

    http: aiohttp.ClientSession
    base: str
    smtp_port: int
    mqtt: MqttProbe

    async def discourse(
        self, topic: int, post_number: int, user: str, raw: str, title: str = "Frage"
    ) -> None:
        """Deliver a Discourse ``post_created`` webhook as Discourse does (signed)."""
        payload = json.loads((SAMPLES / "social" / "discourse-post-created.json").read_bytes())
        post = payload["post"]
        post.update(
            id=topic * 100 + post_number,
            topic_id=topic,
            post_number=post_number,
            username=user,
            name=user.title(),
            display_username=user.title(),
            raw=raw,
            cooked=f"<p>{raw}</p>",
            topic_title=title,
            topic_slug=f"topic-{topic}",
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            reply_to_post_number=None if post_number == 1 else 1,
        )
        body = json.dumps(payload).encode()
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-Discourse-Event": "post_created",
            "X-Discourse-Event-Type": "post",
            "X-Discourse-Event-Id": str(topic * 100 + post_number),
            "X-Discourse-Instance": "https://community.example.net",
            "X-Discourse-Event-Signature": f"sha256={signature}",
        }
        async with self.http.post(
            f"{self.base}/v1/webhooks/discourse", data=body, headers=headers
        ) as resp:
            assert resp.status == 202, await resp.text()

    async def mail(self, sender: str, subject: str, text: str, message_id: str) -> None:
        """Deliver an e-mail over SMTP as the company's mail server does."""
        msg = mail(sender, "support@beispiel-telekom.de", subject, text, message_id)
        await asyncio.to_thread(send_mail, self.smtp_port, msg)

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.http.request(
            method, f"{self.base}{path}", json=body, headers=headers
        ) as resp:
            return resp.status, await resp.json()

    async def expert(self, expert_id: str) -> dict[str, Any]:
        status, report = await self.api("GET", "/v1/experts")
        assert status == 200, report
        return next(row for row in report["experts"] if row["id"] == expert_id)

    async def login(self, *agents: str) -> None:
        for agent in agents:
            await self.mqtt.agent(agent, op="login")
        for agent in agents:
            await self.mqtt.wait_for("events/agent.state", agent_id=agent, state="available")


@pytest.fixture
async def crowd(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> AsyncIterator[Crowd]:
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING, encoding="utf-8")
    http_port, smtp_port = free_port(), free_port()
    await start_daemon(
        routing,
        http_addr=f"127.0.0.1:{http_port}",
        smtp_addr=f"127.0.0.1:{smtp_port}",
        admin_token=TOKEN,
        secret_discourse=SECRET,
    )
    base = f"http://127.0.0.1:{http_port}"
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(f"{base}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, 30, "the HTTP server")
        yield Crowd(http=http, base=base, smtp_port=smtp_port, mqtt=mqtt_probe)


async def test_a_topic_a_champion_answers_in_the_window_never_reaches_an_agent(
    crowd: Crowd,
) -> None:
    await crowd.login("mod")
    await crowd.discourse(501, 1, "kunde1", "Mein WLAN bricht abends immer ab, was tun?")
    (held,) = await crowd.mqtt.wait_for("events/contact.crowd_window")
    assert held["contact_id"] == "discourse:501" and held["crowd"] is True
    # The asker adding details keeps it one contact, still waiting for the crowd.
    await crowd.discourse(501, 2, "kunde1", "Router ist eine Fritzbox 7590.")
    await crowd.discourse(501, 3, "clara", "Stell den Kanal von Auto auf 1, 6 oder 11.")
    (done,) = await crowd.mqtt.wait_for("events/contact.answered_by_crowd")
    assert (done["contact_id"], done["by"], done["by_expert"]) == (
        "discourse:501",
        "discourse:clara",
        "x-clara",
    )
    await crowd.mqtt.wait_for("events/expert.answered", expert_id="x-clara")
    # The window passes: nothing is offered to the community desk, now or later. The barrier
    # is a second topic posted now: its window ends after the first one's would have, and
    # timers fire in order, so once it reaches the desk, anything the first window's end
    # would have done has been published before.
    await crowd.discourse(599, 1, "kunde9", "Wie richte ich die Rufumleitung ein?")
    await crowd.mqtt.wait_for(
        "events/contact.queued", timeout=WINDOW + 30, contact_id="discourse:599"
    )
    mine = {"contact_id": "discourse:501"}
    assert [
        o for o in crowd.mqtt.seen("agents/mod/offers") if o.get("contact_id") == "discourse:501"
    ] == []
    assert crowd.mqtt.seen("events/contact.queued", **mine) == []
    assert len(crowd.mqtt.seen("events/contact.crowd_window", **mine)) == 1
    clara = await crowd.expert("x-clara")
    assert (clara["answers"], clara["activity"]) == (1, "active_day")
    assert clara["last_seen"] >= held["at"]


async def test_an_unanswered_topic_reaches_the_community_desk_when_the_window_ends(
    crowd: Crowd,
) -> None:
    await crowd.login("mod")
    posted = time.time()
    await crowd.discourse(502, 1, "kunde2", "Seit dem Update zeigt der Receiver kein Bild.")
    await crowd.mqtt.wait_for("events/contact.crowd_window", contact_id="discourse:502")
    (offer,) = await crowd.mqtt.wait_for("agents/mod/offers", timeout=WINDOW + 30, type="offer")
    assert time.time() - posted >= WINDOW
    assert (offer["contact_id"], offer["queue"]) == ("discourse:502", "community_desk")
    assert offer["contact"]["text"] == "Seit dem Update zeigt der Receiver kein Bild."
    await crowd.mqtt.agent("mod", op="accept", offer_id=offer["offer_id"])
    (assigned,) = await crowd.mqtt.wait_for("events/contact.assigned")
    # The wait counts from the original post, the crowd window included.
    assert assigned["waited"] >= WINDOW
    assert assigned["crowd"] is True


async def test_a_billing_question_skips_the_crowd_window(crowd: Crowd) -> None:
    await crowd.login("mod")
    posted = time.time()
    await crowd.discourse(
        503, 1, "kunde3", "Auf meiner Rechnung steht ein Betrag, den ich nicht kenne.", "Rechnung"
    )
    (offer,) = await crowd.mqtt.wait_for("agents/mod/offers", type="offer")
    assert time.time() - posted < WINDOW
    assert offer["contact_id"] == "discourse:503"
    (queued,) = await crowd.mqtt.wait_for("events/contact.queued")
    assert (queued["rule"], queued["queue"], queued["crowd"]) == (
        "community_personal_data",
        "community_desk",
        False,
    )
    assert crowd.mqtt.seen("events/contact.crowd_window") == []


async def test_an_expert_reaches_the_expert_desk_by_phone_email_and_community_handle(
    crowd: Crowd,
) -> None:
    await crowd.login("anna", "xdesk", "mod")
    await crowd.mqtt.publish(CALL_TOPIC, ari("StasisStart", "heinz-call.1", HEINZ_PHONE))
    await crowd.mail(
        f"Heinz Fischer <{HEINZ_EMAIL.lower()}>",
        "Glasfaser-Anschluss bei einem Kunden",
        "Hallo, beim Kunden in der Lindenstr. kommt kein Sync zustande.",
        "heinz-1@example.net",
    )
    await crowd.discourse(504, 1, "heinzf", "Kennt jemand das Problem mit Firmware 7.57?")
    queued = await crowd.mqtt.wait_for("events/contact.queued", count=3)
    assert {(q["rule"], q["queue"], q["expert"], q["expert_id"]) for q in queued} == {
        ("crowd_expert", "expert_desk", True, "x-heinz")
    }
    assert {q["channel"] for q in queued} == {"phone", "email", "social"}
    # The expert desk takes them one after the other (a call fills an agent's capacity).
    for n in range(1, 4):
        offers = await crowd.mqtt.wait_for("agents/xdesk/offers", count=n, type="offer")
        await crowd.mqtt.agent("xdesk", op="accept", offer_id=offers[-1]["offer_id"])
        await crowd.mqtt.agent("xdesk", op="complete", contact_id=offers[-1]["contact_id"])
        await crowd.mqtt.wait_for("events/contact.completed", count=n)
    assert {o["contact"]["channel"] for o in offers} == {"phone", "email", "social"}
    # Never a 1st-level offer, and the expert's own topic is not held for the crowd.
    assert crowd.mqtt.seen("agents/anna/offers") == []
    assert crowd.mqtt.seen("agents/mod/offers") == []
    assert crowd.mqtt.seen("events/contact.crowd_window") == []
    heinz = await crowd.expert("x-heinz")
    assert (heinz["contacts"], heinz["answered"], heinz["abandoned"]) == (3, 3, 0)
    # The expert's own waits, reported apart from everyone else's.
    assert heinz["max_wait"] is not None and 0 <= heinz["mean_wait"] <= heinz["max_wait"] < 10


async def test_a_customer_who_emailed_and_then_calls_is_offered_with_the_email_in_history(
    crowd: Crowd,
) -> None:
    await crowd.login("anna", "bert")
    await crowd.mail(
        "Karin Kunde <karin.kunde@example.org>",
        "Router blinkt rot",
        "Seit gestern blinkt mein Router rot, Internet geht nicht.",
        "karin-1@example.org",
    )
    (mail_offer,) = await crowd.mqtt.wait_for("events/contact.offered")
    agent = mail_offer["agent_id"]
    (offer,) = crowd.mqtt.seen(f"agents/{agent}/offers", type="offer")
    await crowd.mqtt.agent(agent, op="accept", offer_id=offer["offer_id"])
    await crowd.mqtt.agent(agent, op="complete", contact_id=offer["contact_id"])
    await crowd.mqtt.wait_for("events/contact.completed")
    # Her number and address are one customer (the CRM knows; the admin API links them).
    status, _ = await crowd.api(
        "POST",
        "/v1/customers/link",
        {"keys": ["email:karin.kunde@example.org", "phone:030 5550199"]},
    )
    assert status == 202
    await crowd.mqtt.wait_for("events/customer.linked")
    await crowd.mqtt.publish(CALL_TOPIC, ari("StasisStart", "karin-call.1", "030 5550199"))
    (call_offer,) = await crowd.mqtt.wait_for(
        "events/contact.offered", contact_id="asterisk-ari:karin-call.1"
    )
    # The agent who answered her e-mail gets the call (preferred agent), with the e-mail in it.
    assert call_offer["agent_id"] == agent
    (offer,) = crowd.mqtt.seen(
        f"agents/{agent}/offers", type="offer", contact_id="asterisk-ari:karin-call.1"
    )
    assert [
        (h["channel"], h["subject"], h["agent_id"], h["outcome"]) for h in offer["history"]
    ] == [("email", "Router blinkt rot", agent, "completed")]
    status, info = await crowd.api("GET", "/v1/customers/phone:+49305550199")
    assert status == 200 and info["customer_id"] == offer["customer_id"]
