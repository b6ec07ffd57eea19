"""Mail forward mode over real SMTP: the daemon's own listener takes the customer's mail and the
agent's answer, a real relay (aiosmtpd) receives what the daemon sends; the real Redis and
Mosquitto in between, the agent accepting over MQTT.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import smtplib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller
from structlog.testing import capture_logs

from router.daemon.auth import hash_token
from tests.daemon.conftest import MqttProbe, mail, wait_until
from tests.daemon.private_servers import free_port
from tests.daemon.test_outbound_e2e import Relay

pytestmark = pytest.mark.integration

MAILBOX = "support@beispiel-telekom.de"
ANNA_MAILBOX = "anna.becker@team.beispiel-telekom.de"
REPLY_ADDRESS = "desk@stellwerk.beispiel-telekom.de"
SECRET = "forward-test-secret-0123456789"
SUPERVISOR = "forward-supervisor-token"
ROUTING = """version: 1
defaults: {offer_timeout: 30, wrap_up: 0}
skills: [support]
queues:
  support: {skills: {support: 1}, channels: [email]}
agents:
  - {id: anna, name: Anna Becker, skills: {support: 3}, capacity: {email: 5}}
rules:
  - {name: default, default: true, queue: support}
"""


@dataclass
class Mailroom:
    smtp_port: int
    base: str
    relay: Relay
    mqtt: MqttProbe
    http: aiohttp.ClientSession

    def send(self, mail: EmailMessage, to: str | None = None) -> None:
        """Deliver ``mail`` to the daemon's SMTP listener (raises what smtplib raises)."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as client:
            client.send_message(mail, to_addrs=[to] if to else None)

    async def deliver(self, mail: EmailMessage, to: str | None = None) -> None:
        await asyncio.to_thread(self.send, mail, to)

    async def outbound(self, contact_id: str) -> list[dict[str, Any]]:
        async with self.http.get(
            f"{self.base}/v1/contacts/{contact_id}/messages",
            headers={"Authorization": f"Bearer {SUPERVISOR}"},
        ) as resp:
            assert resp.status == 200
            return list((await resp.json())["messages"])

    async def take(self, contact_id: str) -> None:
        (offer,) = await self.mqtt.wait_for(
            "agents/anna/offers", type="offer", contact_id=contact_id
        )
        await self.mqtt.agent("anna", op="accept", offer_id=offer["offer_id"])
        await self.mqtt.wait_for("events/contact.assigned", contact_id=contact_id)

    async def received(self, count: int) -> list[EmailMessage]:
        await wait_until(lambda: len(self.relay.messages) >= count, 10, f"{count} at the relay")
        return self.relay.messages


@pytest.fixture
async def room(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> AsyncIterator[Mailroom]:
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING, encoding="utf-8")
    relay = Relay()
    relay_port, http_port, smtp_port = free_port(), free_port(), free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=relay_port)
    controller.start()
    try:
        forward = {
            "secret": SECRET,
            "reply_address": REPLY_ADDRESS,
            "agents": {"anna": ANNA_MAILBOX},
        }
        await start_daemon(
            routing,
            http_addr=f"127.0.0.1:{http_port}",
            smtp_addr=f"127.0.0.1:{smtp_port}",
            auth_tokens=json.dumps(
                [{"name": "wall", "role": "supervisor", "sha256": hash_token(SUPERVISOR)}]
            ),
            outbound_mail=json.dumps(
                {"host": "127.0.0.1", "port": relay_port, "security": "none", "forward": forward}
            ),
        )
        await mqtt_probe.agent("anna", op="login")
        await mqtt_probe.wait_for("events/agent.state", agent_id="anna", state="available")
        async with aiohttp.ClientSession() as http:
            yield Mailroom(smtp_port, f"http://127.0.0.1:{http_port}", relay, mqtt_probe, http)
    finally:
        controller.stop()


async def forwarded_question(room: Mailroom, root: str) -> EmailMessage:
    """The customer writes, anna takes it: the forward in anna's mailbox."""
    await room.deliver(
        mail("Erika Muster <erika@kunde.example>", MAILBOX, "Rechnung November",
             "Warum ist die Rechnung so hoch?", root)
    )  # fmt: skip
    await room.take(f"email:{root}")
    (forward,) = await room.received(1)
    return forward


async def test_the_agent_answers_the_forward_in_her_own_mail_client_and_the_customer_gets_it(
    room: Mailroom,
) -> None:
    root = "frage.4711@kunde.example"
    contact = f"email:{root}"
    forward = await forwarded_question(room, root)
    assert (forward["To"], forward["From"]) == (ANNA_MAILBOX, MAILBOX)
    assert forward["Subject"] == "Fwd: Rechnung November"
    assert "Warum ist die Rechnung so hoch?" in forward.get_content()
    assert "erika@kunde.example" in forward.get_content()
    reply_to = forward["Reply-To"]
    local, _, domain = reply_to.partition("@")
    assert domain == REPLY_ADDRESS.partition("@")[2] and local.startswith("desk+")
    assert len(local) <= 64  # what SMTP allows a local part

    # Her mail client answers, quoting the forward below the answer.
    quoted = "\n".join(f"> {line}" for line in forward.get_content().splitlines())
    answer = mail(
        f"Anna Becker <{ANNA_MAILBOX}>", reply_to, "Re: Fwd: Rechnung November",
        f"Wir prüfen das gern.\n\nAm 1.12.2026 schrieb {MAILBOX}:\n{quoted}\n",
        "antwort-1@team.beispiel-telekom.de", In_Reply_To=forward["Message-ID"],
    )  # fmt: skip
    await room.deliver(answer)
    sent = (await room.received(2))[1]
    assert (sent["To"], sent["From"]) == ("erika@kunde.example", MAILBOX)
    assert sent["Subject"] == "Re: Rechnung November"
    assert sent["In-Reply-To"] == f"<{root}>" and f"<{root}>" in sent["References"]
    assert sent.get_content().strip() == "Wir prüfen das gern."
    # Her server delivers the same answer again (it did not see our 250): queued once.
    await room.deliver(answer)
    items = await room.outbound(contact)
    assert [(m["action"], m["agent_id"]) for m in items] == [
        ("forward", "anna"),
        ("message", "anna"),
    ]
    # Two items only (the second delivery queued nothing), so nothing more can go out.
    assert all(m["state"] == "sent" for m in items) and len(room.relay.messages) == 2

    # The customer answers Stellwerk's reply: it joins her contact, and anna gets it forwarded.
    await room.deliver(
        mail("erika@kunde.example", MAILBOX, "Re: Rechnung November", "Danke, ich warte.",
             "zweite.4712@kunde.example", In_Reply_To=sent["Message-ID"])
    )  # fmt: skip
    await room.mqtt.wait_for("events/contact.updated", contact_id=contact)
    again = (await room.received(3))[2]
    assert again["To"] == ANNA_MAILBOX and "Danke, ich warte." in again.get_content()
    assert "Warum ist die Rechnung" not in again.get_content()  # only the new message


def forged(token: str) -> str:
    """The same nonce with a MAC made under another secret (what an attacker can compute)."""
    nonce = token[:16]
    mac = hmac.new(b"attackers-guess-0123456789", nonce.encode(), hashlib.sha256).digest()
    return nonce + base64.b32encode(mac).decode().lower()[:16]


async def test_forged_unknown_and_stale_reply_addresses_are_refused_at_smtp_time(
    room: Mailroom,
) -> None:
    root = "frage.4800@kunde.example"
    forward = await forwarded_question(room, root)
    local, _, domain = forward["Reply-To"].partition("@")
    token = local.partition("+")[2]
    text = mail(ANNA_MAILBOX, "x", "Re", "Eine Antwort.", "a-2@team.beispiel-telekom.de")

    async def refused(to: str) -> tuple[int, str]:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            await room.deliver(text, to)
        ((code, message),) = caught.value.recipients.values()
        return code, message.decode()

    with capture_logs() as logs:
        code, why = await refused(f"desk+{forged(token)}@{domain}")
        assert code == 550 and "not made by Stellwerk" in why
        code, why = await refused(f"desk+{'a' * 32}@{domain}")
        assert code == 550 and "unknown or expired" in why
        code, why = await refused(f"desk+{token[:20]}@{domain}")
        assert code == 550 and "not made by Stellwerk" in why
        # Once the contact is completed, the genuine address is stale.
        await room.mqtt.agent("anna", op="complete", contact_id=f"email:{root}")
        await room.mqtt.wait_for("events/contact.completed", contact_id=f"email:{root}")
        code, why = await refused(forward["Reply-To"])
        assert code == 550 and "no longer yours" in why
    reasons = [e["reason"] for e in logs if e.get("event") == "forward.refused"]
    assert reasons == ["forged", "expired", "malformed", "stale"]
    # Nothing reached the customer; the relay holds the forward only.
    assert len(room.relay.messages) == 1


async def test_a_reply_address_must_be_the_only_recipient(room: Mailroom) -> None:
    root = "frage.4900@kunde.example"
    forward = await forwarded_question(room, root)

    def transactions() -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", room.smtp_port, timeout=10) as client:
            client.ehlo()
            client.mail(ANNA_MAILBOX)
            codes.append(client.rcpt(forward["Reply-To"])[0])
            code, message = client.rcpt(MAILBOX)
            codes.append(code)
            assert b"alone" in message
            client.rset()
            # In a transaction of its own the other recipient is customer mail as ever.
            client.mail(ANNA_MAILBOX)
            codes.append(client.rcpt(MAILBOX)[0])
            codes.append(client.rcpt(forward["Reply-To"])[0])
        return codes

    assert await asyncio.to_thread(transactions) == [250, 452, 250, 452]
