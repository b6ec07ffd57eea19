"""Every HTTP route with no token, a wrong token, a token of the wrong role and the right role;
the OpenAPI document (valid, and in step with the routes); a schemathesis fuzz run of it.

The daemon's real app runs in a thread of its own (so synchronous clients such as schemathesis
can call it) over a real Engine that holds a real offer, with a real Redis journal.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import redis
import requests
import schemathesis
from aiohttp import test_utils
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate

from channels.contact_event import ContactEvent, Sender
from router.daemon import auth, openapi
from router.daemon.auth import hash_token
from router.daemon.config import (
    AuthSettings,
    HttpSettings,
    Settings,
    SourceSettings,
    TokenSettings,
)
from router.daemon.http import AppState, make_app, start_http
from router.daemon.intake import Intake
from router.daemon.journal import Journal, connect_redis
from router.daemon.metrics import Metrics
from router.engine import Engine
from router.messages import Login, OfferCmd
from rules.load import load_routing
from tests.daemon.conftest import write_routing
from tests.daemon.private_servers import free_port
from tests.peers.twilio import TwilioPeer

pytestmark = pytest.mark.integration
REDIS_URL = "redis://127.0.0.1:6379/0"
TOKENS = {
    "admin": "t-admin",
    "supervisor": "t-supervisor",
    "a01": "t-agent-a01",
    "a02": "t-agent-a02",
    "legacy": "t-legacy-admin",
}
CALLER = "+4930555010"


def token_settings() -> tuple[TokenSettings, ...]:
    return (
        TokenSettings(name="ops", role="admin", sha256=hash_token(TOKENS["admin"])),
        TokenSettings(name="wall", role="supervisor", sha256=hash_token(TOKENS["supervisor"])),
        TokenSettings(
            name="agent:a01", role="agent", agent_id="a01", sha256=hash_token(TOKENS["a01"])
        ),
        TokenSettings(
            name="agent:a02", role="agent", agent_id="a02", sha256=hash_token(TOKENS["a02"])
        ),
    )


class Server:
    """The daemon's HTTP app on a loopback port, served from its own thread and event loop."""

    def __init__(self, cfg: Settings, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine
        self.port = test_utils.unused_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.prefix = f"test-roles-{uuid.uuid4().hex[:10]}:"
        self.reloads = 0
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="http-roles", daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        self._ready.wait(10)
        if self._failed is not None:
            raise self._failed
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{self.prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced in __enter__
            self._failed = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        client = connect_redis(REDIS_URL)
        metrics = Metrics()

        async def reload() -> list[str]:
            self.reloads += 1
            return []

        state = AppState(
            redis_ok=True, mqtt_ok=True, lease_held=True, view=self.engine, reload=reload
        )
        intake = Intake(Journal(client, self.prefix), self.cfg.decode_config(), metrics=metrics)
        self.app = make_app(intake, state, self.cfg, metrics)
        runner = await start_http(self.app, f"127.0.0.1:{self.port}")
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await client.aclose()

    def call(
        self, method: str, path: str, who: str | None = None, body: Any = None
    ) -> requests.Response:
        headers = {}
        if who == "wrong":
            headers["Authorization"] = "Bearer not-a-token"
        elif who is not None:
            headers["Authorization"] = f"Bearer {TOKENS[who]}"
        return requests.request(method, self.base + path, headers=headers, json=body, timeout=10)


def engine_with_an_offer(tmp: Path) -> tuple[Engine, str, str]:
    """a01 holds an offer for a call; (engine, contact id, customer id)."""
    routing = write_routing(tmp / "routing.yaml", ("a01", "a02"), offer_timeout=3600)
    engine = Engine(load_routing(routing))
    engine.handle(Login(agent_id="a01"), 1.0)
    call = ContactEvent(
        kind="new",
        contact_id="asterisk-ari:r1",
        channel="phone",
        source="asterisk-ari",
        external_id="r1",
        sender=Sender(phone=CALLER),
    )
    offers = [c for c in engine.handle(call, 2.0) if isinstance(c, OfferCmd)]
    assert [o.agent_id for o in offers] == ["a01"]
    info = engine.contact_info("asterisk-ari:r1")
    assert info is not None
    return engine, "asterisk-ari:r1", str(info["customer_id"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    engine, _, _ = engine_with_an_offer(tmp_path_factory.mktemp("roles"))
    cfg = Settings(
        admin_token=TOKENS["legacy"],
        auth=AuthSettings(tokens=token_settings()),
        # The fuzz run sends many requests quickly; the limit has its own test.
        http=HttpSettings(rate_limit=""),
        sources=SourceSettings(secrets={"discourse": "d-secret"}),
    )
    with Server(cfg, engine) as s:
        yield s


CONTACT = "/v1/contacts/" + quote("asterisk-ari:r1", safe="")
EVERYONE = {None, "wrong", "admin", "supervisor", "a01", "a02", "legacy"}
ADMINS = {"admin", "legacy"}
READERS = ADMINS | {"supervisor"}
# (method, route template, concrete path, body, who may)
ROUTES: list[tuple[str, str, str, Any, set[str | None]]] = [
    ("GET", "/healthz", "/healthz", None, EVERYONE),
    ("GET", "/readyz", "/readyz", None, EVERYONE),
    ("GET", "/metrics", "/metrics", None, EVERYONE),
    ("GET", "/v1/openapi.json", "/v1/openapi.json", None, EVERYONE),
    ("GET", "/v1/queues", "/v1/queues", None, READERS),
    ("GET", "/v1/agents", "/v1/agents", None, READERS),
    ("GET", "/v1/contacts/{contact_id}", CONTACT, None, READERS | {"a01"}),
    ("POST", "/v1/rules/reload", "/v1/rules/reload", None, ADMINS),
    ("GET", "/v1/experts", "/v1/experts", None, READERS),
    ("PUT", "/v1/experts/{expert_id}", "/v1/experts/x-new", {"name": "Neu"}, ADMINS),
    ("DELETE", "/v1/experts/{expert_id}", "/v1/experts/x-heinz", None, ADMINS),
    (
        "POST",
        "/v1/customers/link",
        "/v1/customers/link",
        {"keys": [f"phone:{CALLER}", "email:r1@example.org"]},
        ADMINS,
    ),
    ("GET", "/v1/customers/{ref}", "/v1/customers/" + quote(f"phone:{CALLER}"), None, READERS),
]


def test_the_table_covers_every_route(server: Server) -> None:
    declared = {(m, t) for m, t, _, _, _ in ROUTES} | {("POST", "/v1/webhooks/{source}")}
    routes = {
        (r.method, r.resource.canonical)
        for r in server.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert routes == declared


@pytest.mark.parametrize(("method", "template", "path", "body", "allowed"), ROUTES)
def test_each_route_answers_each_principal_as_declared(
    server: Server,
    method: str,
    template: str,
    path: str,
    body: Any,
    allowed: set[str | None],
) -> None:
    for who in sorted(EVERYONE, key=str):
        resp = server.call(method, path, who, body)
        if who in allowed:
            assert resp.status_code < 300, (who, resp.status_code, resp.text)
        elif who in (None, "wrong"):
            assert resp.status_code == 401, (who, resp.text)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        elif template == "/v1/contacts/{contact_id}":
            # Another agent's contact looks like no contact at all to an agent.
            assert resp.status_code == (404 if who == "a02" else 403), (who, resp.text)
        else:
            assert resp.status_code == 403, (who, resp.text)
        assert resp.headers["Content-Type"].split(";")[0] in (
            "application/json",
            "text/plain",
        )


def test_an_agent_reads_its_own_contact_with_the_history_its_offer_carried(
    server: Server,
) -> None:
    mine = server.call("GET", CONTACT, "a01").json()
    assert (mine["contact_id"], mine["agent_id"], mine["state"]) == (
        "asterisk-ari:r1",
        "a01",
        "offered",
    )
    assert "history" in mine
    theirs = server.call("GET", CONTACT, "a02")
    assert theirs.status_code == 404 and theirs.json()["error"] == "unknown_contact"
    # ...exactly as for a contact that does not exist, so ids cannot be probed
    unknown = server.call("GET", "/v1/contacts/asterisk-ari:none", "a02")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_contact")


def test_metrics_can_be_put_behind_a_supervisor_token(tmp_path: Path) -> None:
    engine, _, _ = engine_with_an_offer(tmp_path)
    cfg = Settings(auth=AuthSettings(tokens=token_settings(), metrics="supervisor"))
    with Server(cfg, engine) as s:
        assert s.call("GET", "/metrics").status_code == 401
        assert s.call("GET", "/metrics", "a01").status_code == 403
        resp = s.call("GET", "/metrics", "supervisor")
        assert resp.status_code == 200 and "stellwerk_auth_refused_total" in resp.text
        assert s.call("GET", "/healthz").status_code == 200


def test_refusals_and_admin_changes_are_counted_from_zero(server: Server) -> None:
    text = server.call("GET", "/metrics").text
    assert 'stellwerk_admin_changes_total{op="link_keys"}' in text
    assert 'stellwerk_auth_refused_total{reason="wrong_role",route="/v1/rules/reload"}' in text


# ---- the OpenAPI document ----------------------------------------------------------------------


# What each route's declared access (router.daemon.auth) may be documented as. A WebSocket says
# where its token travels, e.g. "agent (token in the first message)".
DOCUMENTED_ACCESS = {
    "self": {"supervisor or agent", "agent", "supervisor"},
    "metrics": {"public"},
}


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }


def served_v1_routes(app: Any) -> set[tuple[str, str]]:
    return {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None and r.resource.canonical.startswith("/v1")
    }


async def test_the_served_openapi_document_is_valid_and_matches_every_route_served(
    tmp_path: Path, start_daemon: Callable[..., Any]
) -> None:
    """The real daemon with every module that adds routes (the desk, replies, Asterisk's
    outbound WebSocket, Twilio): what /v1/openapi.json says is exactly what it serves."""
    twilio = TwilioPeer(voice_url="http://unused.invalid/", status_callback="")
    await twilio.start(port=free_port())
    try:
        http = f"127.0.0.1:{free_port()}"
        daemon = await start_daemon(
            write_routing(tmp_path / "routing.yaml", ("a01",)),
            http_addr=http,
            outbound_chatwoot=json.dumps(
                {"url": "http://127.0.0.1:9", "account_id": 1, "api_token": "t"}
            ),
            asterisk_outbound_username="asterisk",
            asterisk_outbound_password="ws-secret",
            twilio_account_sid=twilio.account_sid,
            twilio_auth_token=twilio.auth_token,
            twilio_api_base=twilio.api_base,
            twilio_public_url=f"http://{http}",
        )
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://{http}/v1/openapi.json") as resp,
        ):
            assert resp.status == 200
            doc = await resp.json()
        # The telephony routes under fuzzing too (from a thread: the daemon runs in this loop).
        await asyncio.to_thread(fuzz_unsigned_telephony, doc, f"http://{http}")
    finally:
        await twilio.close()
    validate(doc)
    served = served_v1_routes(daemon.app)
    # every module really is there: the test would not notice a module it did not start
    for module_route in (
        ("GET", "/v1/desk/ws"),
        ("POST", "/v1/contacts/{contact_id}/messages"),
        ("GET", "/v1/telephony/asterisk/ws"),
        ("POST", "/v1/telephony/twilio/wait"),
    ):
        assert module_route in served
    assert documented_routes(doc) == served
    for (method, path), access in daemon.app[auth.ACCESS_KEY].items():
        if path.startswith("/v1"):
            documented = doc["paths"][path][method.lower()]["x-stellwerk-access"]
            assert documented.split(" (")[0] in DOCUMENTED_ACCESS.get(access, {access}), (
                method,
                path,
                documented,
            )


def fuzz_unsigned_telephony(doc: dict[str, Any], base: str) -> None:
    """schemathesis over the telephony operations of ``doc``, never signed: no 500, and each
    refused (Twilio's signature, Asterisk's basic credentials) or a malformed form (400)."""
    schema = schemathesis.openapi.from_dict(doc).include(path_regex="^/v1/telephony/|twilio-voice")
    reached: set[str] = set()

    @settings(
        max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=schema.as_strategy())
    def run(case: Any) -> None:
        resp = case.call(base_url=base)
        reached.add(case.operation.path)
        assert resp.status_code in (400, 401), (case.method, case.formatted_path, resp.text)

    run()
    assert len(reached) >= 4, reached


def test_the_document_of_the_core_routes_matches_the_core_app(server: Server) -> None:
    """Without the modules, the app and its document shrink together."""
    doc = server.call("GET", "/v1/openapi.json").json()
    validate(doc)
    assert documented_routes(doc) == served_v1_routes(server.app)
    assert openapi.document() == openapi.document()  # a fresh copy, not shared state


PERSONAL = ("/v1/contacts/", "/v1/customers/")


def _fuzz_schema() -> Any:
    return schemathesis.openapi.from_dict(openapi.document())


@pytest.fixture(scope="module")
def fuzz_strategy() -> Any:
    return _fuzz_schema().as_strategy()


def test_fuzzing_the_document_finds_no_500_and_no_data_without_a_role(
    server: Server, fuzz_strategy: Any
) -> None:
    """A few seconds of schemathesis: as nobody, as an agent, as a supervisor."""
    seen: set[tuple[str, int]] = set()

    # Derandomized: the same 60 cases every run, so that whether they reach most operations
    # (the last assertion) does not depend on the draw.
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=fuzz_strategy)
    def run(case: Any) -> None:
        for who in (None, "a02", "supervisor", "admin"):
            headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
            resp = case.call(base_url=server.base, headers=headers)
            seen.add((case.operation.path, resp.status_code))
            assert resp.status_code < 500, (case.method, case.formatted_path, resp.text)
            access = case.operation.definition.raw.get("x-stellwerk-access")
            if who is None and access not in ("public", "signed"):
                assert resp.status_code in (401, 404, 405), (case.formatted_path, resp.text)
            if who == "a02" and case.formatted_path.startswith(PERSONAL):
                # a02 holds no contact: it may read none, and no customer
                assert resp.status_code in (403, 404, 405), (case.formatted_path, resp.text)
            if resp.status_code < 300 and resp.headers.get("Content-Type", "").startswith(
                "application/json"
            ):
                json.loads(resp.text)

    run()
    assert len({path for path, _ in seen}) >= 8, sorted(seen)  # it reached most operations
