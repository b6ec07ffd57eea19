"""The platform sink: which routing decisions become platform actions, with keys that make a
decision the router replays after a crash queue once (real Redis, real engine)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from router.daemon.config import ChatwootSettings, OutboundSettings, RocketchatSettings
from router.daemon.outbox import Outbox
from router.daemon.replies import PlatformSink
from router.engine import Engine
from router.messages import EventCmd
from rules.load import parse_routing
from tests.daemon.conftest import Names
from tests.eventkit import event_cmd

pytestmark = pytest.mark.integration

ROUTING = """version: 1
skills: [support]
queues: {support: {skills: {support: 1}}}
agents:
  - {id: anna, skills: {support: 3}, accounts: {chatwoot: 12, rocketchat: annaRc}}
  - {id: bert, skills: {support: 3}}
rules: [{name: default, default: true, queue: support}]
"""
SETTINGS = OutboundSettings(
    chatwoot=ChatwootSettings(url="http://cw.invalid", account_id=1, api_token="t"),
    rocketchat=RocketchatSettings(url="http://rc.invalid", user_id="u", auth_token="t"),
)


def event(kind: str, contact_id: str, agent: str = "anna", **extra: object) -> EventCmd:
    source = contact_id.partition(":")[0]
    return event_cmd(kind, at=1000.5, contact_id=contact_id, source=source, agent_id=agent, **extra)


async def test_decisions_become_actions_once(redis_client: aioredis.Redis, names: Names) -> None:
    outbox = Outbox(redis_client, names.key_prefix)
    sink = PlatformSink(outbox, SETTINGS)
    await sink.restored(Engine(parse_routing(ROUTING)))
    decisions = [
        event("contact.assigned", "chatwoot:42"),
        event("contact.assigned", "rocketchat:R1"),
        event("contact.assigned", "chatwoot:43", agent="bert"),  # no Chatwoot account
        event("contact.assigned", "email:x@y"),  # nothing to do on a platform
        event("contact.completed", "chatwoot:42", outcome="completed"),
        event("contact.completed", "rocketchat:R1", outcome="ended:closed"),  # closed there
    ]
    await sink.submit(decisions)
    await sink.submit(decisions)  # replayed after a crash: queued once
    cw = await outbox.for_contact("chatwoot:42")
    assert [(m["action"], m["state"]) for m in cw] == [("assign", "queued"), ("resolve", "queued")]
    rc = await outbox.for_contact("rocketchat:R1")
    assert [m["action"] for m in rc] == ["forward"]
    assert await outbox.for_contact("chatwoot:43") == []
    assert await outbox.depth("chatwoot") == 2 and await outbox.depth("rocketchat") == 1
