"""The daemon's HTTP server, for real: an aiohttp server on 127.0.0.1, the real Intake and decoders,
and a real Redis journal under a key prefix of its own."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import test_utils
from prometheus_client.parser import text_string_to_metric_families

from router.daemon.config import Settings, SourceSettings
from router.daemon.http import RESTORING, AppState, make_app, start_http
from router.daemon.intake import Intake
from router.daemon.journal import ContactEntry, Journal, connect_redis
from router.daemon.metrics import Metrics

SAMPLES = Path(__file__).parent.parent / "fixtures" / "samples"
DISCOURSE_SECRET = "discourse-test-secret"
ROCKETCHAT_TOKEN = "rocketchat-test-token"
ADMIN_TOKEN = "admin-test-token"


def settings(admin_token: str | None = ADMIN_TOKEN) -> Settings:
    return Settings(
        admin_token=admin_token,
        sources=SourceSettings(
            secrets={"discourse": DISCOURSE_SECRET, "rocketchat": ROCKETCHAT_TOKEN}
        ),
    )


class Api:
    """A running app and a client for it."""

    def __init__(self, client: test_utils.TestClient, state: AppState, metrics: Metrics) -> None:
        self.client = client
        self.state = state
        self.metrics = metrics

    async def post(self, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
        async with self.client.post(path, data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str, **headers: str) -> tuple[int, Any]:
        async with self.client.get(path, headers=headers) as resp:
            return resp.status, await resp.json()


async def _api(journal: Journal, cfg: Settings) -> AsyncIterator[Api]:
    metrics = Metrics()
    state = AppState()
    intake = Intake(journal, cfg.decode_config(), metrics=metrics)
    app = make_app(intake, state, cfg, metrics)
    async with test_utils.TestClient(test_utils.TestServer(app)) as client:
        yield Api(client, state, metrics)


@pytest.fixture
async def api(journal: Journal) -> AsyncIterator[Api]:
    async for a in _api(journal, settings()):
        yield a


def discourse_post() -> tuple[bytes, dict[str, str]]:
    body = (SAMPLES / "social" / "discourse-post-created.json").read_bytes()
    signature = "sha256=" + hmac.new(DISCOURSE_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {
        "X-Discourse-Event": "post_created",
        "X-Discourse-Event-Type": "post",
        "X-Discourse-Event-Signature": signature,
        "Content-Type": "application/json",
    }


async def journal_entries(journal: Journal) -> list[ContactEntry]:
    rows = await journal.read_after("0-0", None, 100)
    return [e for _, e in rows if isinstance(e, ContactEntry)]


@pytest.mark.integration
async def test_signed_webhook_is_journalled_before_202(api: Api, journal: Journal) -> None:
    body, headers = discourse_post()
    status, reply = await api.post("/v1/webhooks/discourse", body, **headers)
    assert (status, reply) == (202, {"accepted": 1})
    entries = await journal_entries(journal)
    assert [e.event.contact_id for e in entries] == [
        "discourse:" + str(json.loads(body)["post"]["topic_id"])
    ]
    assert entries[0].event.channel == "social"


@pytest.mark.integration
async def test_bad_signature_is_401_and_dead_lettered(api: Api, journal: Journal) -> None:
    body, headers = discourse_post()
    headers["X-Discourse-Event-Signature"] = "sha256=" + "0" * 64
    status, reply = await api.post("/v1/webhooks/discourse", body, **headers)
    assert status == 401
    assert reply["error"] == "bad_signature"
    assert await journal_entries(journal) == []
    dead = await journal.dead_letters()
    assert [(d["source"], d["reason"]) for d in dead] == [("discourse", "bad_signature")]
    assert dead[0]["body"] == body


@pytest.mark.integration
async def test_rejected_payload_is_400_with_its_reason(api: Api, journal: Journal) -> None:
    status, reply = await api.post(
        "/v1/webhooks/rocketchat", b"{not json", **{"X-RocketChat-Livechat-Token": ROCKETCHAT_TOKEN}
    )
    assert status == 400
    assert reply["error"] == "not_json"
    assert reply["detail"]
    status, reply = await api.post("/v1/webhooks/no-such-source", b"{}")
    assert (status, reply["error"]) == (404, "unknown_source")
    reasons = sorted(d["reason"] for d in await journal.dead_letters())
    assert reasons == ["not_json", "unknown_source"]
    assert api.metrics.rejected_inputs.labels("rocketchat", "not_json")._value.get() == 1


@pytest.mark.integration
async def test_valid_delivery_with_nothing_to_route_is_still_a_success(
    api: Api, journal: Journal
) -> None:
    body = (SAMPLES / "chat" / "rocketchat-message.json").read_bytes()
    payload = json.loads(body)
    # A message written by the agent is no input for the router (channels/chat.py)
    for message in payload["messages"]:
        message["agentId"] = "agent-7"
    status, reply = await api.post(
        "/v1/webhooks/rocketchat",
        json.dumps(payload).encode(),
        **{"X-RocketChat-Livechat-Token": ROCKETCHAT_TOKEN},
    )
    assert (status, reply) == (202, {"accepted": 0})
    assert await journal_entries(journal) == []


@pytest.mark.integration
async def test_journal_down_is_503_with_retry_after_and_nothing_acknowledged() -> None:
    # A real client pointed at a port where no Redis listens: every write fails.
    client = connect_redis("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        async for api in _api(Journal(client, "test-d2-down:"), settings()):
            body, headers = discourse_post()
            async with api.client.post(
                "/v1/webhooks/discourse", data=body, headers=headers
            ) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"].isdigit()
                assert (await resp.json())["error"] == "journal_unavailable"
            # a bad payload cannot be dead-lettered either, so it is not acknowledged
            status, reply = await api.post("/v1/webhooks/rocketchat", b"{not json")
            assert (status, reply["error"]) == (503, "journal_unavailable")
    finally:
        await client.aclose()


class View:
    """A router's read-only view with fixed content."""

    def queue_stats(self, now: float) -> list[dict[str, Any]]:
        return [
            {"name": "support", "waiting": 3, "oldest_wait": 12.5, "offered": 1, "agents_ready": 0}
        ]

    def agent_list(self) -> list[dict[str, Any]]:
        return [{"id": "a1", "state": "available"}, {"id": "a2", "state": "away"}]

    def contact_info(self, contact_id: str) -> dict[str, Any] | None:
        if contact_id == "asterisk-ari:1.1":
            return {"state": "queued", "queue": "support", "waited": 12.5}
        return None

    def experts_report(self, now: float) -> dict[str, Any]:
        return {"summary": {"experts": 0}, "experts": []}

    def customer_info(self, ref: str) -> dict[str, Any] | None:
        return None


async def test_readiness_needs_redis_mqtt_the_lease_and_a_restored_router(api: Api) -> None:
    assert await api.get("/healthz") == (200, {"status": "ok"})
    status, reply = await api.get("/readyz")
    assert status == 503
    assert reply == {
        "ready": False,
        "role": "all",
        "redis": False,
        "mqtt": False,
        "lease": False,
        "routing": False,
        "journal_lag": None,
        "ingest_lease": False,
    }
    api.state.redis_ok = api.state.mqtt_ok = True
    assert (await api.get("/readyz"))[0] == 503
    # The lease is taken, the snapshot not restored yet: the API cannot serve, so not ready.
    api.state.lease_held = True
    assert await api.get("/readyz") == (
        503,
        {
            "ready": False,
            "role": "all",
            "redis": True,
            "mqtt": True,
            "lease": True,
            "routing": False,
            "journal_lag": None,
            "detail": RESTORING,
            "ingest_lease": False,
        },
    )
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert await api.get("/v1/queues", **auth) == (
        503,
        {"error": "not_routing", "detail": RESTORING},
    )
    # Restored (what the router sets as it logs router.routing). While routing, the detail
    # carries the backlog: behind, but ready (still the router). Not holding the ingest lease
    # (an ingest node beside it consumes MQTT) is detail too.
    api.state.view = View()
    api.state.journal_lag = (1200, 2.3456)
    assert await api.get("/readyz") == (
        200,
        {
            "ready": True,
            "role": "all",
            "redis": True,
            "mqtt": True,
            "lease": True,
            "routing": True,
            "journal_lag": {"entries": 1200, "seconds": 2.346},
            "ingest_lease": False,
        },
    )
    # Consuming the MQTT sessions as well (alone, or the ingest node gone): it says so.
    api.state.ingest_lease_held = True
    status, reply = await api.get("/readyz")
    assert (status, reply["ingest_lease"]) == (200, True)
    # The tenure ends (the lease lost): not ready again, and the API says why.
    api.state.lease_held = False
    api.state.view = None
    api.state.journal_lag = None
    status, reply = await api.get("/readyz")
    assert (status, reply["lease"], reply["routing"]) == (503, False, False)
    assert "detail" not in reply
    assert await api.get("/v1/queues", **auth) == (
        503,
        {"error": "not_routing", "detail": "this daemon does not hold the routing lease"},
    )


async def test_a_snapshot_that_cannot_be_restored_is_the_readiness_detail(api: Api) -> None:
    api.state.redis_ok = api.state.mqtt_ok = api.state.lease_held = True
    reason = "the snapshot in Redis cannot be restored (missing: chunk 3 of 9 is gone)"
    # Held for a moment (the next attempt), but nothing routes until a restore succeeds.
    api.state.restore_failed = reason
    status, reply = await api.get("/readyz")
    assert (status, reply["ready"], reply["detail"]) == (503, False, reason)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert await api.get("/v1/queues", **auth) == (
        503,
        {"error": "not_routing", "detail": reason},
    )
    # The next attempt holds the lease and restores: the failure stays the detail until it
    # succeeds.
    status, reply = await api.get("/readyz")
    assert (status, reply["detail"]) == (503, reason)
    api.state.restore_failed = None
    api.state.view = View()
    status, reply = await api.get("/readyz")
    assert status == 200 and "detail" not in reply


async def test_an_ingest_node_is_ready_without_a_lease_a_router_needs_the_routing_one(
    api: Api,
) -> None:
    api.state.role = "ingest"
    api.state.redis_ok = api.state.mqtt_ok = True
    # Every ingest node takes webhooks and mail: a leader-mode standby is ready too.
    assert await api.get("/readyz") == (
        200,
        {"ready": True, "role": "ingest", "redis": True, "mqtt": True, "ingest_lease": False},
    )
    api.state.mqtt_ok = False
    assert (await api.get("/readyz"))[0] == 503
    api.state.role = "router"
    api.state.mqtt_ok = True
    status, reply = await api.get("/readyz")
    assert (status, reply["role"], reply["lease"]) == (503, "router", False)
    api.state.lease_held = True
    assert (await api.get("/readyz"))[0] == 503  # restoring
    api.state.view = View()
    assert (await api.get("/readyz"))[0] == 200


async def test_read_api_serves_the_router_view_and_503_on_a_standby(api: Api) -> None:
    # The admin token may read what a supervisor may.
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for path in ("/v1/queues", "/v1/agents", "/v1/contacts/x"):
        status, reply = await api.get(path, **auth)
        assert (status, reply["error"]) == (503, "not_routing")
    api.state.view = View()
    status, reply = await api.get("/v1/queues", **auth)
    assert status == 200 and reply["queues"][0]["waiting"] == 3
    status, reply = await api.get("/v1/agents", **auth)
    assert status == 200 and [a["id"] for a in reply["agents"]] == ["a1", "a2"]
    assert await api.get("/v1/contacts/asterisk-ari:1.1", **auth) == (
        200,
        {"state": "queued", "queue": "support", "waited": 12.5},
    )
    status, reply = await api.get("/v1/contacts/nobody", **auth)
    assert (status, reply["error"]) == (404, "unknown_contact")


async def test_metrics_are_valid_exposition_with_fresh_gauges(api: Api) -> None:
    api.state.view = View()
    api.state.redis_ok = True
    async with api.client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert values[("stellwerk_queue_waiting", (("queue", "support"),))] == 3
    assert values[("stellwerk_agents", (("state", "away"),))] == 1
    assert values[("stellwerk_connected", (("peer", "redis"),))] == 1
    assert values[("stellwerk_connected", (("peer", "mqtt"),))] == 0


async def test_rules_reload_needs_the_bearer_token(api: Api) -> None:
    calls: list[int] = []
    problems: list[str] = []

    async def reload() -> list[str]:
        calls.append(1)
        return list(problems)

    api.state.reload = reload
    status, reply = await api.post("/v1/rules/reload", b"")
    assert (status, reply["error"]) == (401, "unauthorized")
    status, reply = await api.post("/v1/rules/reload", b"", Authorization="Bearer wrong-token")
    assert (status, reply["error"]) == (401, "unauthorized")
    assert calls == []
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert await api.post("/v1/rules/reload", b"", **auth) == (200, {"reloaded": True})
    problems.append("routing.yaml:3:5: unknown queue 'nope'")
    status, reply = await api.post("/v1/rules/reload", b"", **auth)
    assert status == 422
    assert reply["error"] == "invalid_routing"
    assert reply["problems"] == ["routing.yaml:3:5: unknown queue 'nope'"]
    assert len(calls) == 2


async def test_admin_calls_are_off_without_a_token(journal: Journal) -> None:
    async for api in _api(journal, settings(admin_token=None)):

        async def reload() -> list[str]:
            raise AssertionError("must not be called")

        api.state.reload = reload
        status, reply = await api.post("/v1/rules/reload", b"", Authorization="Bearer ")
        assert (status, reply["error"]) == (401, "unauthorized")
        status, reply = await api.post("/v1/rules/reload", b"", Authorization="Bearer x")
        assert (status, reply["error"]) == (401, "unauthorized")


async def test_unknown_routes_and_methods_answer_in_json(api: Api) -> None:
    status, reply = await api.get("/v1/nothing-here")
    assert (status, reply["error"]) == (404, "not_found")
    status, reply = await api.get("/v1/webhooks/discourse")
    assert (status, reply["error"]) == (405, "method_not_allowed")


@pytest.mark.integration
async def test_start_http_serves_on_a_real_port(journal: Journal) -> None:
    import aiohttp

    cfg = settings()
    metrics = Metrics()
    app = make_app(Intake(journal, cfg.decode_config(), metrics=metrics), AppState(), cfg, metrics)
    port = test_utils.unused_port()
    runner = await start_http(app, f"127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as session:
            body, headers = discourse_post()
            async with session.post(
                f"http://127.0.0.1:{port}/v1/webhooks/discourse", data=body, headers=headers
            ) as resp:
                assert resp.status == 202
    finally:
        await runner.cleanup()
    assert len(await journal_entries(journal)) == 1


async def test_oversized_webhook_is_413_in_json(api: Api) -> None:
    big = io.BytesIO(b"x" * (4 * 1024 * 1024 + 1))
    async with api.client.post("/v1/webhooks/discourse", data=big) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"
