"""Intake: decoded events reach the journal, bad input the dead-letter stream, never both."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from channels.base import DecodeConfig
from router.daemon.intake import Intake
from router.daemon.journal import (
    AgentEntry,
    ContactEntry,
    Journal,
    JournalUnavailable,
    connect_redis,
)
from router.daemon.metrics import Metrics
from router.messages import Accept, Login

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "samples"


def make_intake(journal: Journal) -> tuple[Intake, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Intake(journal, DecodeConfig(), metrics=metrics, clock=lambda: 1234.5), metrics


async def test_a_real_ari_call_is_journaled(journal: Journal) -> None:
    intake, metrics = make_intake(journal)
    body = (SAMPLES / "phone" / "asterisk-ari-stasis-start.json").read_bytes()
    result = await intake.accept("asterisk-ari", body, {})
    assert result.ok and result.accepted == 1
    ((entry_id, entry),) = await journal.read_after("0-0", None, 10)
    assert entry_id == result.ids[0]
    assert isinstance(entry, ContactEntry)
    assert entry.at == 1234.5
    assert entry.event.contact_id == "asterisk-ari:1400609726.3"
    assert entry.event.kind == "new"
    assert (
        metrics.registry.get_sample_value(
            "stellwerk_contacts_received_total",
            {"channel": "phone", "source": "asterisk-ari", "kind": "new"},
        )
        == 1.0
    )
    assert await journal.dead_letters() == []


async def test_bad_payload_goes_to_dead_letter_not_journal(journal: Journal) -> None:
    intake, metrics = make_intake(journal)
    result = await intake.accept("asterisk-ari", b"{this is not json", {"x-test": "1"})
    assert not result.ok and result.reason == "not_json"
    assert await journal.read_after("0-0", None, 10) == []
    (dead,) = await journal.dead_letters()
    assert (dead["source"], dead["reason"], dead["body"]) == (
        "asterisk-ari",
        "not_json",
        b"{this is not json",
    )
    assert (
        metrics.registry.get_sample_value(
            "stellwerk_rejected_inputs_total", {"source": "asterisk-ari", "reason": "not_json"}
        )
        == 1.0
    )


async def test_unknown_source_is_rejected_with_reason(journal: Journal) -> None:
    intake, _ = make_intake(journal)
    result = await intake.accept("carrier-pigeon", b"{}", {})
    assert result.reason == "unknown_source"
    assert [d["reason"] for d in await journal.dead_letters()] == ["unknown_source"]


async def test_batch_keeps_order_and_separates_bad_from_good(journal: Journal) -> None:
    intake, _ = make_intake(journal)
    start = (SAMPLES / "phone" / "asterisk-ari-stasis-start.json").read_bytes()
    end = (SAMPLES / "phone" / "asterisk-ari-stasis-end.json").read_bytes()
    results = await intake.accept_many(
        [("asterisk-ari", start, {}), ("asterisk-ari", b"[]", {}), ("asterisk-ari", end, {})]
    )
    assert [r.reason for r in results] == [None, "bad_shape", None]
    got = await journal.read_after("0-0", None, 10)
    assert [i for i, _ in got] == [results[0].ids[0], results[2].ids[0]]
    kinds = [e.event.kind for _, e in got if isinstance(e, ContactEntry)]
    assert kinds == ["new", "end"]


async def test_agent_id_comes_from_the_topic_not_the_payload(journal: Journal) -> None:
    intake, _ = make_intake(journal)
    result = await intake.accept_agent_command(
        "anna", b'{"op": "accept", "offer_id": "o-7", "agent_id": "bert"}'
    )
    assert result.ok
    ((_, entry),) = await journal.read_after("0-0", None, 10)
    assert entry == AgentEntry(cmd=Accept(agent_id="anna", offer_id="o-7"), at=1234.5)


async def test_bad_agent_commands_are_dead_lettered_and_counted(journal: Journal) -> None:
    intake, metrics = make_intake(journal)
    results = await intake.accept_agent_commands(
        [("anna", b"nope"), ("anna", b'{"op": "dance"}'), ("anna", b'{"op": "login"}')]
    )
    assert [r.reason for r in results] == ["not_json", "bad_command", None]
    entries = [e for _, e in await journal.read_after("0-0", None, 10)]
    assert entries == [AgentEntry(cmd=Login(agent_id="anna"), at=1234.5)]
    dead = await journal.dead_letters()
    assert [(d["source"], d["reason"]) for d in dead] == [
        ("agent-cmd", "not_json"),
        ("agent-cmd", "bad_command"),
    ]
    assert '"agent_id":"anna"' in dead[0]["headers"]
    assert (
        metrics.registry.get_sample_value(
            "stellwerk_rejected_inputs_total", {"source": "agent-cmd", "reason": "bad_command"}
        )
        == 1.0
    )


async def test_redis_down_propagates_so_nothing_is_acknowledged() -> None:
    client = connect_redis("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        intake, metrics = make_intake(Journal(client, "stwtest:down:"))
        body = (SAMPLES / "phone" / "asterisk-ari-stasis-start.json").read_bytes()
        with pytest.raises(JournalUnavailable):
            await intake.accept("asterisk-ari", body, {})
        # Even a rejection must be kept before it is acknowledged.
        with pytest.raises(JournalUnavailable):
            await intake.accept("asterisk-ari", b"garbage", {})
        assert (
            metrics.registry.get_sample_value(
                "stellwerk_rejected_inputs_total", {"source": "asterisk-ari", "reason": "not_json"}
            )
            is None
        )
    finally:
        await client.aclose()


async def test_a_hanging_observer_does_not_hold_the_journal_write(journal: Journal) -> None:
    """The transcript observer writes to Redis before the journal does; when that write hangs
    (a stalled Redis), intake gives up on it and still journals, instead of adding its socket
    timeouts to the journal's before the sender gets an answer."""
    import asyncio

    from router.daemon import intake as intake_module

    intake, _ = make_intake(journal)
    seen: list[int] = []

    async def hangs(events: object) -> None:
        seen.append(1)
        await asyncio.Event().wait()

    intake.observers.append(hangs)
    body = (SAMPLES / "phone" / "asterisk-ari-stasis-start.json").read_bytes()
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await asyncio.wait_for(intake.accept("asterisk-ari", body, {}), 10)
    assert result.ok and result.accepted == 1 and seen == [1]
    assert loop.time() - started >= intake_module.OBSERVE_TIMEOUT
    ((entry_id, _entry),) = await journal.read_after("0-0", None, 10)
    assert entry_id == result.ids[0]
