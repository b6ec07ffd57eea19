"""Webhooks are signed unless a source is explicitly marked unsigned; bodies are bounded per
source; a flooding client gets 429 with Retry-After. Real aiohttp server, real Redis journal."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from router.daemon.config import HttpSettings, Settings, SourceSettings
from router.daemon.journal import Journal
from tests.daemon.conftest import write_routing
from tests.daemon.test_http import (
    ADMIN_TOKEN,
    DISCOURSE_SECRET,
    Api,
    _api,
    discourse_post,
    journal_entries,
)

GENERIC_SECRET = "generic-shared-secret"
pytestmark = pytest.mark.integration


def generic_call(call_id: str = "call-1", pad: int = 0) -> bytes:
    return json.dumps(
        {"kind": "new", "channel": "phone", "id": call_id, "from": "+4930123456", "text": "x" * pad}
    ).encode()


def sign(body: bytes, secret: str = GENERIC_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture
async def api(journal: Journal) -> AsyncIterator[Api]:
    cfg = Settings(
        admin_token=ADMIN_TOKEN,
        http=HttpSettings(rate_limit="20/second"),
        sources=SourceSettings(
            secrets={"discourse": DISCOURSE_SECRET, "generic": GENERIC_SECRET},
            unsigned=("rocketchat",),
            max_body={"generic": 2000},
        ),
    )
    async for a in _api(journal, cfg):
        yield a


async def test_a_source_without_secret_is_refused_unless_marked_unsigned(
    api: Api, journal: Journal
) -> None:
    # chatwoot has a signature scheme, but no secret is configured and it is not marked unsigned
    status, reply = await api.post("/v1/webhooks/chatwoot", b"{}")
    assert (status, reply["error"]) == (401, "unsigned_source")
    status, reply = await api.post("/v1/webhooks/asterisk-ari", b"{}")
    assert (status, reply["error"]) == (401, "unsigned_source")
    assert await journal_entries(journal) == []
    refused = api.metrics.auth_refused
    assert refused.labels("unsigned_source", "/v1/webhooks/{source}")._value.get() == 2
    # rocketchat is marked unsigned: its (valid) payload is taken without a token
    from tests.daemon.test_faults import chat

    body, contact_id = chat("hallo")
    status, reply = await api.post("/v1/webhooks/rocketchat", body)
    assert (status, reply) == (202, {"accepted": 1})
    assert [e.event.contact_id for e in await journal_entries(journal)] == [contact_id]


async def test_sources_without_a_native_scheme_sign_with_the_stellwerk_header(
    api: Api, journal: Journal
) -> None:
    body = generic_call()
    status, reply = await api.post("/v1/webhooks/generic", body)
    assert (status, reply["error"]) == (401, "bad_signature")
    status, reply = await api.post(
        "/v1/webhooks/generic", body, **{"X-Stellwerk-Signature": sign(body, "wrong")}
    )
    assert (status, reply["error"]) == (401, "bad_signature")
    status, reply = await api.post(
        "/v1/webhooks/generic", body, **{"X-Stellwerk-Signature": sign(body)}
    )
    assert (status, reply) == (202, {"accepted": 1})
    assert [e.event.contact_id for e in await journal_entries(journal)] == ["generic:call-1"]


async def test_a_signed_native_webhook_still_works(api: Api, journal: Journal) -> None:
    body, headers = discourse_post()
    assert await api.post("/v1/webhooks/discourse", body, **headers) == (202, {"accepted": 1})


async def test_bodies_are_bounded_per_source(api: Api, journal: Journal) -> None:
    big = generic_call("big", pad=2100)
    status, reply = await api.post(
        "/v1/webhooks/generic", big, **{"X-Stellwerk-Signature": sign(big)}
    )
    assert (status, reply["error"]) == (413, "body_too_large")
    assert "2000 bytes" in reply["detail"]
    # the same size is fine for a source with the default limit (1 MiB)
    small_enough = generic_call("ok", pad=1500)
    status, _ = await api.post(
        "/v1/webhooks/generic", small_enough, **{"X-Stellwerk-Signature": sign(small_enough)}
    )
    assert status == 202
    assert [e.event.contact_id for e in await journal_entries(journal)] == ["generic:ok"]


async def test_a_flooding_client_gets_429_with_retry_after(api: Api) -> None:
    statuses = []
    retry_after = None
    for _ in range(40):
        async with api.client.post("/v1/webhooks/chatwoot", data=b"{}") as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                retry_after = resp.headers["Retry-After"]
                assert (await resp.json())["error"] == "rate_limited"
    assert statuses[:20] == [401] * 20
    assert 429 in statuses[20:] and set(statuses[20:]) <= {401, 429}
    assert retry_after is not None and 1 <= int(retry_after) <= 2
    # monitoring is never limited
    async with api.client.get("/healthz") as resp:
        assert resp.status == 200
    assert api.metrics.auth_refused.labels("rate_limited", "/v1/webhooks/{source}")._value.get() > 0


def test_unsigned_sources_are_checked_in_the_settings() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        SourceSettings(unsigned=("nope",))
    with pytest.raises(ValueError, match="one or the other"):
        SourceSettings(unsigned=("generic",), secrets={"generic": "s"})


async def test_the_daemon_warns_at_start_for_every_unsigned_source(
    tmp_path: Path, start_daemon: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    routing = write_routing(tmp_path / "routing.yaml")
    await start_daemon(routing, sources_unsigned='["rocketchat", "generic"]')
    warned = [
        line for line in capsys.readouterr().out.splitlines() if "webhook.unsigned_source" in line
    ]
    assert len(warned) == 2
    assert any("source=rocketchat" in w for w in warned)
    assert any("source=generic" in w for w in warned)
