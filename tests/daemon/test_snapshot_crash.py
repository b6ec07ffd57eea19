"""A real daemon killed (SIGKILL) in the middle of writing a chunked snapshot.

The new generation is half in Redis when the process dies; the restarted daemon must restore
the previous snapshot whole (never a mix of old and new chunks), replay the journal after it,
and so hold every accepted mail, with its body still there for the offer; the half-written
generation is removed once the next snapshot is in. The mails' bodies are not in the engine:
they are in Redis beside it, and go when their contact is finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from channels.contact_event import ContactEvent, Sender
from router.daemon.journal import ContactEntry, Journal
from tests.daemon.conftest import DaemonProcess, MqttProbe, wait_until, write_routing
from tests.daemon.test_daemon_recovery import routed_state, wait_log


def mail(n: int) -> ContactEvent:
    return ContactEvent(
        kind="new",
        contact_id=f"email:<m{n}@example.net>",
        channel="email",
        source="email",
        external_id=f"<m{n}@example.net>",
        sender=Sender(email=f"kunde{n}@example.net"),
        subject=f"Störung {n}",
        text=f"Mail {n}: seit gestern kein Internet. " + "Viele Grüße " * 20,
    )


async def routing_a_backlog(
    journal: Journal,
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    env: dict[str, str],
    mails: int,
) -> tuple[DaemonProcess, list[ContactEvent]]:
    """``mails`` mails journaled, then a daemon (``first``) started on them; once it routes:
    the daemon and the mails."""
    accepted = [mail(n) for n in range(mails)]
    await journal.append_many([ContactEntry(event=e, at=time.time()) for e in accepted])
    first = daemons(env, "first")
    await wait_log(first, "router.routing")
    return first, accepted


async def half_written(journal: Journal, redis: aioredis.Redis) -> str | None:
    """A generation that has chunks in Redis but is not the one the pointer names."""
    pointed = await redis.hget(journal.keys.snapshot, "gen")  # type: ignore[misc]
    for gen in await redis.smembers(journal.keys.snapshot_gens):  # type: ignore[misc]
        if gen != pointed and await redis.hlen(journal.keys.snapshot_gen(gen.decode())):  # type: ignore[misc]
            return str(gen.decode())
    return None


async def test_sigkill_in_the_middle_of_a_snapshot_restores_the_last_whole_one(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[[dict[str, str], str], DaemonProcess],
    journal: Journal,
    redis_client: aioredis.Redis,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    # Small chunks, so that one snapshot of this backlog is hundreds of writes: a wide window.
    env = daemon_env(routing, "a", router_snapshot_chunk_bytes="1024")
    first, accepted = await routing_a_backlog(journal, daemons, env, 1500)
    # The one after the restore (written while routing starts) is in: there is a whole one.
    await wait_until(journal.load_snapshot, 60, "a first snapshot")

    # More mails keep arriving, so a snapshot is due every half second.
    stop = asyncio.Event()

    async def trickle() -> None:
        while not stop.is_set():
            event = mail(len(accepted))
            await journal.append(ContactEntry(event=event, at=time.time()))
            accepted.append(event)  # journaled: accepted
            await asyncio.sleep(0.01)

    feeder = asyncio.create_task(trickle())
    orphan = await wait_until(lambda: half_written(journal, redis_client), 60, "mid-write")
    first.kill()
    stop.set()
    await feeder
    killed_at = time.time()
    # Dead in the middle of it: the pointer still names the previous, whole generation.
    before = await journal.load_snapshot()
    assert before is not None and before.gen != orphan
    assert await redis_client.hlen(journal.keys.snapshot_gen(orphan)) > 0  # type: ignore[misc]

    second = daemons(env, "second")
    await wait_log(second, "router.restored")
    state = await routed_state(journal, routing, killed_at)
    # Every accepted mail is there once, waiting (nobody is logged in).
    assert sorted(state.contacts) == sorted(e.contact_id for e in accepted)
    assert {c.state for c in state.contacts.values()} == {"queued"}
    # The half-written generation went when the next daemon restored the whole one.
    gens = {g.decode() for g in await redis_client.smembers(journal.keys.snapshot_gens)}  # type: ignore[misc]
    assert orphan not in gens
    assert not await redis_client.exists(journal.keys.snapshot_gen(orphan))

    # The bodies survived beside the engine: anna's offers carry each mail's whole text.
    sent = {e.contact_id: msgspec.to_builtins(e) for e in accepted}
    await mqtt_probe.agent("anna", op="login")
    offers = await mqtt_probe.wait_for("agents/anna/offers", type="offer", count=5)
    assert [o["contact"] for o in offers] == [sent[o["contact_id"]] for o in offers]

    # A finished contact's body is removed (after the next snapshot); the others stay.
    done = offers[0]
    await mqtt_probe.agent("anna", op="accept", offer_id=done["offer_id"])
    await mqtt_probe.agent("anna", op="complete", contact_id=done["contact_id"])
    payloads = f"{journal.keys.prefix}payloads"

    async def removed() -> bool:
        return not await redis_client.hexists(payloads, done["contact_id"])  # type: ignore[misc]

    await wait_until(removed, 30, "the finished contact's body removed")
    assert await redis_client.hexists(payloads, offers[1]["contact_id"])  # type: ignore[misc]
    assert await redis_client.hlen(payloads) == len(accepted) - 1  # type: ignore[misc]
    assert second.stop() == 0
