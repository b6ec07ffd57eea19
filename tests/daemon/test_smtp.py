"""The SMTP listener, for real: a socket on 127.0.0.1, the standard library's SMTP client, the real
Intake and email decoder, and a real Redis journal under a key prefix of its own."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import test_utils

from router.daemon.config import Settings
from router.daemon.intake import Intake
from router.daemon.journal import ContactEntry, Journal, connect_redis
from router.daemon.metrics import Metrics
from router.daemon.smtp import start_smtp

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).parent.parent / "fixtures" / "samples"


async def _listen(journal: Journal, max_size: int = 1024 * 1024) -> tuple[asyncio.Server, int]:
    metrics = Metrics()
    intake = Intake(journal, Settings().decode_config(), metrics=metrics)
    port = test_utils.unused_port()
    server = await start_smtp(
        intake, metrics, f"127.0.0.1:{port}", max_message_size=max_size, hostname="mx.test"
    )
    return server, port


def crlf(raw: bytes) -> bytes:
    """The sample files have Unix line ends; on the wire SMTP lines end in CRLF."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def send(port: int, raw: bytes, rcpt: str = "support@example.com") -> tuple[int, bytes]:
    """Deliver ``raw`` as an MTA would; the server's reply to the end of DATA."""
    raw = crlf(raw)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("mta.test")
        client.mail("sender@example.org")
        client.rcpt(rcpt)
        return client.data(raw)


@pytest.fixture
async def smtp_port(journal: Journal) -> AsyncIterator[int]:
    server, port = await _listen(journal)
    yield port
    server.close()
    await server.wait_closed()


async def test_mail_is_journalled_before_250(smtp_port: int, journal: Journal) -> None:
    raw = (SAMPLES / "email" / "reply-encoded-words.eml").read_bytes()
    code, reply = await asyncio.to_thread(send, smtp_port, raw)
    assert code == 250, reply
    rows = await journal.read_after("0-0", None, 10)
    entries = [e for _, e in rows if isinstance(e, ContactEntry)]
    assert len(entries) == 1
    event = entries[0].event
    assert event.channel == "email" and event.source == "email"
    assert event.sender.email == "rene@habr.de"
    # the thread root (first of References) keys the contact
    assert event.contact_id == "email:FECFDD4D-6EC3-4DE1-8A08-B4477345C4AA@habr.de"


async def test_mail_that_is_no_email_is_554_and_dead_lettered(
    smtp_port: int, journal: Journal
) -> None:
    code, reply = await asyncio.to_thread(send, smtp_port, b"just some words\r\nand more\r\n")
    assert code == 554
    assert b"5.6.0" in reply and b"not_email" in reply
    assert await journal.read_after("0-0", None, 10) == []
    dead = await journal.dead_letters()
    assert [(d["source"], d["reason"]) for d in dead] == [("email", "not_email")]
    assert "sender@example.org" in dead[0]["headers"]


async def test_journal_down_is_451_so_the_mta_keeps_the_mail() -> None:
    client = connect_redis("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        server, port = await _listen(Journal(client, "test-d2-smtp-down:"))
        try:
            raw = (SAMPLES / "email" / "multipart-encodings.eml").read_bytes()
            code, reply = await asyncio.to_thread(send, port, raw)
            assert code == 451
            assert reply.startswith(b"4.3.0")
        finally:
            server.close()
            await server.wait_closed()
    finally:
        await client.aclose()


async def test_oversized_mail_is_refused_by_size(journal: Journal) -> None:
    server, port = await _listen(journal, max_size=2000)
    try:
        raw = (SAMPLES / "email" / "multipart-encodings.eml").read_bytes()
        raw = raw.replace(b"\n\n", b"\n\n" + b"padding padding\n" * 200, 1)
        assert len(raw) > 2000
        code, _ = await asyncio.to_thread(send, port, raw)
        assert code == 552
        assert await journal.read_after("0-0", None, 10) == []
    finally:
        server.close()
        await server.wait_closed()


async def test_several_messages_on_one_connection(smtp_port: int, journal: Journal) -> None:
    def deliver_two() -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            for n in range(2):
                msg = (
                    f"From: Kunde {n} <kunde{n}@example.de>\r\nTo: support@example.com\r\n"
                    f"Subject: Frage {n}\r\nMessage-ID: <m{n}@example.de>\r\n\r\nHallo {n}\r\n"
                )
                code, _ = client.sendmail(
                    f"kunde{n}@example.de", ["support@example.com"], msg.encode()
                ) or (250, b"")
                codes.append(code)
        return codes

    assert await asyncio.to_thread(deliver_two) == [250, 250]
    rows = await journal.read_after("0-0", None, 10)
    assert sorted(e.event.contact_id for _, e in rows if isinstance(e, ContactEntry)) == [
        "email:m0@example.de",
        "email:m1@example.de",
    ]
