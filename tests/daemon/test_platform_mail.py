"""Mail replies through a real SMTP relay (aiosmtpd): sent, refused for good, or retried while
the relay is down, and the status says which."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiosmtpd.controller import Controller

from router.daemon.config import MailSettings
from router.daemon.outbox import OutboundMessage, Outbox, Permanent, Transient
from router.daemon.platforms import Mail
from tests.daemon.conftest import Names, wait_until
from tests.daemon.private_servers import free_port
from tests.daemon.test_outbound_e2e import Relay

pytestmark = pytest.mark.integration


class Refusing(Relay):
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "554 5.7.1 Relay access denied"


def reply(key: str = "reply:email:q@x:anna:1") -> OutboundMessage:
    return OutboundMessage(
        key=key,
        destination="mail",
        action="message",
        contact_id="email:q@x",
        agent_id="anna",
        body="Guten Tag,\nwir kümmern uns.",
        params={
            "to": "kunde@example.org",
            "from": "support@example.net",
            "subject": "Re: Frage",
            "message_id": "stw.abc.0123456789ab@example.net",
            "in_reply_to": "q@x",
            "references": "q@x",
        },
        created_at=1_800_000_000.0,
    )


async def test_sent_refused_and_down() -> None:
    relay, refusing = Relay(), Refusing()
    ports = free_port(), free_port()
    controllers = [
        Controller(handler, hostname="127.0.0.1", port=port)
        for handler, port in zip((relay, refusing), ports, strict=True)
    ]
    for c in controllers:
        c.start()
    try:
        ok = Mail(MailSettings(host="127.0.0.1", port=ports[0], security="none", timeout=5))
        assert await ok.deliver(reply(), uncertain=False) == "stw.abc.0123456789ab@example.net"
        (got,) = relay.messages
        assert got["In-Reply-To"] == "<q@x>" and got["References"] == "<q@x>"
        assert got.get_content().splitlines() == ["Guten Tag,", "wir kümmern uns."]
        no = Mail(MailSettings(host="127.0.0.1", port=ports[1], security="none", timeout=5))
        with pytest.raises(Permanent, match="554"):
            await no.deliver(reply(), uncertain=False)
    finally:
        for c in controllers:
            c.stop()
    down = Mail(MailSettings(host="127.0.0.1", port=free_port(), security="none", timeout=2))
    with pytest.raises(Transient):
        await down.deliver(reply(), uncertain=False)


async def test_a_relay_that_is_down_is_retried_until_it_takes_the_reply(
    redis_client: aioredis.Redis, names: Names
) -> None:
    port = free_port()
    mail = Mail(MailSettings(host="127.0.0.1", port=port, security="none", timeout=2))
    outbox = Outbox(redis_client, names.key_prefix, destinations={"mail": mail})
    await outbox.append(reply())
    stop = asyncio.Event()
    task = asyncio.create_task(outbox.run(stop))
    try:

        async def retrying() -> dict[str, Any] | None:
            status = await outbox.status("reply:email:q@x:anna:1")
            return status if status and status["state"] == "retrying" else None

        status = await wait_until(retrying, 10, "retrying")
        assert "mail:" in status["error"]  # what the desk shows meanwhile
        relay = Relay()
        controller = Controller(relay, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            await wait_until(lambda: relay.messages, 20, "the reply once the relay is up")
        finally:
            controller.stop()

        async def sent() -> bool:
            status = await outbox.status("reply:email:q@x:anna:1")
            return bool(status and status["state"] == "sent")

        await wait_until(sent, 5, "sent")
        assert len(relay.messages) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
