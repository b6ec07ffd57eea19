"""Transcripts in the real Redis: bounded, de-duplicated, expiring after the contact ends."""

from __future__ import annotations

import redis.asyncio as aioredis

from channels.contact_event import Attachment, ContactEvent, Sender
from router.daemon.config import DeskSettings
from router.daemon.transcripts import TranscriptStore
from tests.daemon.conftest import Names


def chat(n: int, text: str, kind: str = "update") -> ContactEvent:
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id="generic:chat-1",
        channel="chat",
        source="generic",
        external_id="chat-1",
        sender=Sender(email="erika@example.org"),
        text=text,
        occurred_at=1_800_000_000.0 + n,
        attachments=(Attachment(filename="a.png", content_type="image/png", size=10),)
        if n == 0
        else (),
    )


async def test_messages_are_kept_in_order_bounded_and_without_repeats(
    redis_client: aioredis.Redis, names: Names
) -> None:
    store = TranscriptStore(
        redis_client,
        names.key_prefix,
        DeskSettings(transcript_messages=3, transcript_chars=100, open_ttl=600),
    )
    await store.record([chat(0, "Hallo", kind="new")])
    await store.record([chat(1, "x" * 500)])
    await store.record([chat(1, "x" * 500)])  # a redelivery after a journal failure
    messages = await store.read("generic:chat-1")
    assert [m.text for m in messages] == ["Hallo", "x" * 100]
    assert messages[0].attachments[0].filename == "a.png" and messages[1].truncated
    for n in range(2, 6):
        await store.record([chat(n, f"m{n}")])
    assert [m.text for m in await store.read("generic:chat-1")] == ["m3", "m4", "m5"]
    assert 0 < await redis_client.ttl(store.key("generic:chat-1")) <= 600
    # Calls and ends carry nothing to read; an unknown contact has no transcript.
    call = ContactEvent(
        kind="new", contact_id="generic:call", channel="phone", source="generic", external_id="c"
    )
    await store.record([call])
    assert await store.read("generic:call") == []


async def test_a_finished_contacts_transcript_expires_after_the_retention(
    redis_client: aioredis.Redis, names: Names
) -> None:
    store = TranscriptStore(
        redis_client, names.key_prefix, DeskSettings(open_ttl=86400, transcript_ttl=120)
    )
    await store.record([chat(0, "Hallo", kind="new")])
    assert await redis_client.ttl(store.key("generic:chat-1")) > 120
    await store.finished(["generic:chat-1"])
    assert 0 < await redis_client.ttl(store.key("generic:chat-1")) <= 120
