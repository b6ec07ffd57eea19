"""The daemon's HTTP server (aiohttp): webhooks, metrics, health, and the small admin API.

Every route declares who may call it in :func:`make_app`'s table (``router.daemon.auth``):
``admin`` for changes, ``supervisor`` for reads (an admin may do what a supervisor may),
the agent holding a contact for ``/v1/contacts/{id}``, open for health and ``/metrics`` (unless
``auth.metrics: supervisor``), the source's signature for webhooks. 401 without a valid bearer
token, 403 for the wrong role. Routes other than monitoring are rate limited per client (429 with
``Retry-After``). docs/security.md has the whole picture, docs/operations.md the route table.

Routes:

- ``POST /v1/webhooks/{source}`` — the raw body and headers go to the shared
  :class:`~router.daemon.intake.Intake`, which checks the source's signature, decodes, and
  journals the events. A source without a secret is refused (401 ``unsigned_source``) unless
  listed in ``sources.unsigned``; sources without a native scheme sign with
  ``X-Stellwerk-Signature``. ``413`` beyond the source's body limit. ``202 {"accepted": n}``
  only after the journal write; ``401`` for a bad signature, ``404`` for an unknown source,
  ``400`` with the reason for any other rejected payload (it is in the dead-letter stream),
  ``503`` with ``Retry-After`` when the journal (Redis) is down, so the sender retries.
- ``GET /metrics``, ``/healthz``, ``/readyz`` (200 only when Redis and MQTT are connected and
  this daemon holds the routing lease and routes; an ingest node needs no lease;
  ``ingest_lease`` says whether a node consumes the leader-mode MQTT sessions; 503 with a
  ``detail`` while it restores the snapshot and replays the journal, or while the snapshot in
  Redis cannot be restored), ``/v1/openapi.json`` (the OpenAPI document).
- ``GET /v1/queues``, ``/v1/agents``, ``/v1/contacts/{id}``, ``/v1/experts``,
  ``/v1/customers/{ref}`` — read from the router's engine through the read-only
  :class:`RouterView`; 503 ``not_routing`` on a standby.
- ``POST /v1/rules/reload`` (422 with the problems of a routing file that does not validate; the
  running rules stay), ``PUT``/``DELETE /v1/experts/{id}``, ``POST /v1/customers/link`` — admin
  changes, journaled like every other input (``202`` once in the journal) and audited once each
  (``admin.change``: who, what, from where).

- Replies (:mod:`router.daemon.replies`): ``POST /v1/contacts/{id}/messages`` queues the
  assigned agent's answer in the outbox, ``GET /v1/contacts/{id}/messages`` shows the state of
  the contact's outbound messages.

Every error answer is JSON ``{"error": slug, "detail": sentence}``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import limits
import msgspec
import structlog
from aiohttp import web
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from channels.contact_event import SOURCES
from router.daemon import auth, desk, openapi
from router.daemon.auth import Authenticator, Principal, principal_of
from router.daemon.config import Settings, parse_addr
from router.daemon.intake import Intake
from router.daemon.journal import JournalUnavailable
from router.daemon.metrics import CONTENT_TYPE_LATEST, Metrics
from router.daemon.replies import add_outbound_routes
from router.messages import AdminCommand, LinkKeys, RemoveExpert, UpsertExpert
from rules.identity import normalize_handle
from rules.schema import Expert

if TYPE_CHECKING:
    from router.daemon.desk import DeskService

log = structlog.get_logger("stellwerk.http")

# Webhook bodies are small JSON or form posts; WhatsApp/Messenger batches stay well below this.
MAX_BODY = 4 * 1024 * 1024
RETRY_AFTER_SECONDS = "5"
_json = msgspec.json.Encoder()
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


class RouterView(Protocol):
    """The read-only part of the engine the HTTP API may see (``Engine`` has exactly these)."""

    def queue_stats(self, now: float) -> list[dict[str, Any]]:
        """Per queue statistics."""
        ...

    def agent_list(self) -> list[dict[str, Any]]:
        """Per agent state."""
        ...

    def contact_info(self, contact_id: str) -> dict[str, Any] | None:
        """One contact's state, or None when the engine does not know it."""
        ...

    def experts_report(self, now: float) -> dict[str, Any]:
        """``{"summary": {...}, "experts": [...]}``."""
        ...

    def customer_info(self, ref: str) -> dict[str, Any] | None:
        """One customer by id or identity key, or None."""
        ...


class ExpertBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of ``PUT /v1/experts/{id}``: an expert without its id (the path has it)."""

    name: str = ""
    level: Annotated[int, msgspec.Meta(ge=1, le=9)] = 1
    skills: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    handles: tuple[str, ...] = ()


class LinkBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /v1/customers/link``."""

    keys: tuple[str, ...]


_EXPERT_BODY = msgspec.json.Decoder(ExpertBody)
_LINK_BODY = msgspec.json.Decoder(LinkBody)
_KEY_KINDS = ("phone", "email", "handle")
MAX_EXPERT_ID = 200


def key_problem(key: str) -> str | None:
    """Why ``key`` is not an identity key the engine can link, or None when it is one."""
    kind, sep, value = key.partition(":")
    if not sep or kind not in _KEY_KINDS:
        return f"{key!r}: an identity key is phone:..., email:... or handle:source:user"
    if not value.strip():
        return f"{key!r}: the {kind} is empty"
    if kind == "phone" and sum(c.isdigit() for c in value) < 3:
        return f"{key!r}: not a phone number"
    if kind == "email" and "@" not in value:
        return f"{key!r}: not an e-mail address"
    if kind == "handle" and normalize_handle(value) is None:
        return f"{key!r}: a handle is source:user, e.g. handle:discourse:alice"
    return None


#: The readiness detail (and the ``not_routing`` one) while this daemon holds the routing lease
#: but has not restored yet: seconds with a large backlog, in which nothing is served.
RESTORING = "restoring the snapshot and replaying the journal: not routing yet"
NO_LEASE = "this daemon does not hold the routing lease"

ReloadFn = Callable[[], Awaitable[list[str]]]
"""Reload the routing file; returns its problems (empty when the new rules are in force)."""


@dataclass
class AppState:
    """What the daemon tells the HTTP app about itself; the daemon updates it as things change.

    ``view`` and ``reload`` are None while this daemon does not route (a standby, or before the
    snapshot is restored): the router sets them when it starts routing (``router.routing``)
    and clears them when its tenure ends, and ``/readyz`` follows ``view``.
    """

    redis_ok: bool = False
    mqtt_ok: bool = False
    lease_held: bool = False
    view: RouterView | None = None
    reload: ReloadFn | None = None
    #: the agent desktop and wallboard (router.daemon.desk), when the daemon runs them.
    desk: DeskService | None = None
    #: (entries, seconds) the router is behind the journal; None while it does not route.
    journal_lag: tuple[int, float] | None = None
    #: this process's role (``Settings.role``): what ``/readyz`` checks depends on it.
    role: str = "all"
    #: roles ingest and all, leader mode: whether this daemon holds the ingest lease (consumes
    #: the MQTT ingress sessions); None where there is none (shared mode, role router).
    ingest_lease_held: bool | None = False
    #: why this daemon's last restore failed (the snapshot in Redis cannot be read), until a
    #: restore succeeds; ``/readyz`` is 503 with it as the detail meanwhile.
    restore_failed: str | None = None

    def not_routing(self) -> str:
        """Why this daemon does not route (while ``view`` is None): the ``detail`` of
        ``/readyz`` and of the ``not_routing`` answers."""
        if self.restore_failed is not None:
            return self.restore_failed
        return RESTORING if self.lease_held else NO_LEASE


def _reply(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=_json.encode(payload),
        content_type="application/json",
        headers=headers,
    )


def _error(
    status: int, error: str, detail: str = "", headers: Mapping[str, str] | None = None
) -> web.Response:
    return _reply(status, {"error": error, "detail": detail}, headers)


class _Handlers:
    def __init__(
        self, intake: Intake, state: AppState, settings: Settings, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.state = state
        self.metrics = metrics

    async def webhook(self, request: web.Request) -> web.Response:
        source = request.match_info["source"]
        sources = self.settings.sources
        if source in SOURCES:
            limit = sources.body_limit(source)
            if (request.content_length or 0) > limit:
                return _too_large(source, limit)
        body = await request.read()
        if source in SOURCES and len(body) > sources.body_limit(source):
            return _too_large(source, sources.body_limit(source))
        # Decoders take lower-cased header names (channels.base); a repeated header keeps its
        # first value, which is the one every signature scheme here uses.
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), value)
        if source in SOURCES and source not in sources.unsigned:
            refused = _unsigned_refusal(request, source, sources.secrets.get(source), body, headers)
            if refused is not None:
                return refused
        try:
            outcome = await self.intake.accept(source, body, headers)
        except JournalUnavailable as exc:
            self.metrics.observe_ingress("http", "unavailable")
            log.warning("webhook.not_accepted", source=source, reason="journal_unavailable")
            return _error(
                503,
                "journal_unavailable",
                str(exc) or "the journal is unreachable; retry",
                {"Retry-After": RETRY_AFTER_SECONDS},
            )
        if outcome.reason is not None:
            self.metrics.observe_ingress("http", "rejected")
            status = {"bad_signature": 401, "unknown_source": 404}.get(outcome.reason, 400)
            return _error(status, outcome.reason, outcome.detail)
        self.metrics.observe_ingress("http", "accepted")
        return _reply(202, {"accepted": outcome.accepted})

    async def metrics_page(self, request: web.Request) -> web.Response:
        view = self.state.view
        if view is not None:
            self.metrics.refresh(view, time.time())
        self.metrics.set_status(
            redis=self.state.redis_ok, mqtt=self.state.mqtt_ok, lease=self.state.lease_held
        )
        response = web.Response(body=self.metrics.exposition())
        # CONTENT_TYPE_LATEST carries its own charset parameter, so set the header verbatim.
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return _reply(200, openapi.served(request.app))

    async def healthz(self, request: web.Request) -> web.Response:
        return _reply(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        s = self.state
        if s.role == "ingest":
            # Every ingest node takes webhooks and mail, the standby of a leader-mode pair
            # too: ready with Redis and the broker ("mqtt" includes the ingress sessions when
            # this node consumes them). Who holds the ingest lease is detail.
            checks = {"redis": s.redis_ok, "mqtt": s.mqtt_ok}
            ready = all(checks.values())
            body: dict[str, Any] = {
                "ready": ready,
                "role": s.role,
                **checks,
                "ingest_lease": s.ingest_lease_held,
            }
            return _reply(200 if ready else 503, body)
        # The lease alone is not enough: a new holder restores the snapshot and replays the
        # journal first (seconds with a large backlog), and until then the read API and the
        # desk answer not_routing. A snapshot that cannot be restored: the lease may even be
        # held for a moment (the next attempt), but nothing routes until a restore succeeds.
        routing = s.view is not None
        checks = {"redis": s.redis_ok, "mqtt": s.mqtt_ok, "lease": s.lease_held, "routing": routing}
        ready = all(checks.values()) and s.restore_failed is None
        lag = None
        if s.journal_lag is not None:
            lag = {"entries": s.journal_lag[0], "seconds": round(s.journal_lag[1], 3)}
        # The backlog is detail, not readiness: a router behind in a burst is still the router.
        body = {"ready": ready, "role": s.role, **checks, "journal_lag": lag}
        if not routing:
            detail = s.not_routing()
            if detail != NO_LEASE:  # a standby: "lease": false says it all
                body["detail"] = detail
        if s.role == "all":
            # Detail too: a routing node beside an ingest node that holds the ingest lease
            # routes (ready) without consuming MQTT ("mqtt" is then its publisher alone). Who
            # holds it changes only when a holder goes, so readiness does not flap with it.
            body["ingest_lease"] = s.ingest_lease_held
        return _reply(200 if ready else 503, body)

    def _view(self) -> RouterView | web.Response:
        if self.state.view is None:
            return _error(503, "not_routing", self.state.not_routing())
        return self.state.view

    async def queues(self, request: web.Request) -> web.Response:
        view = self._view()
        if isinstance(view, web.Response):
            return view
        return _reply(200, {"queues": view.queue_stats(time.time())})

    async def agents(self, request: web.Request) -> web.Response:
        view = self._view()
        if isinstance(view, web.Response):
            return view
        return _reply(200, {"agents": view.agent_list()})

    async def contact(self, request: web.Request) -> web.Response:
        # Supervisors (and admins) read every contact, with the customer's history (they may
        # read customers); an agent only a contact offered or assigned to it, with the same
        # history its offer carried. Anything else answers 404 like an unknown contact, so an
        # agent cannot probe which contact ids exist.
        principal = auth.require(request, ("supervisor", "agent"))
        view = self._view()
        if isinstance(view, web.Response):
            return view
        contact_id = request.match_info["contact_id"]
        info = view.contact_info(contact_id)
        if principal.role == "agent" and (
            info is None
            or info.get("agent_id") != principal.agent_id
            or info.get("state") not in AGENT_VISIBLE_STATES
        ):
            if info is not None:
                auth.audit_refusal(request, "not_your_contact", principal, contact_id=contact_id)
            info = None
        if info is None:
            return _error(404, "unknown_contact", f"no contact {contact_id!r}")
        return _reply(200, info)

    async def reload(self, request: web.Request) -> web.Response:
        reload = self.state.reload
        if reload is None:
            return _error(503, "not_routing", "this daemon does not hold the routing lease")
        # The router logs the outcome (rules.reloaded / rules.reload_refused), as for SIGHUP.
        log.info("rules.reload_requested", trigger="http")
        problems = await reload()
        who = _who(request)
        if problems:
            return _reply(
                422,
                {
                    "error": "invalid_routing",
                    "detail": "the routing file does not validate; the running rules stay",
                    "problems": problems,
                },
            )
        log.info("admin.change", op="reload", via="http", **who)
        self.metrics.observe_admin_change("reload")
        return _reply(200, {"reloaded": True})

    # ---- the crowd: experts and customers ------------------------------------------------------

    async def experts(self, request: web.Request) -> web.Response:
        view = self._view()
        if isinstance(view, web.Response):
            return view
        return _reply(200, view.experts_report(time.time()))

    async def put_expert(self, request: web.Request) -> web.Response:
        expert_id = request.match_info["expert_id"].strip()
        if not expert_id or len(expert_id) > MAX_EXPERT_ID:
            return _error(400, "bad_expert", f"an expert id is 1 to {MAX_EXPERT_ID} characters")
        try:
            body = _EXPERT_BODY.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _error(400, "bad_expert", str(exc))
        problems = [key_problem(f"handle:{h}") for h in body.handles]
        problems += [key_problem(f"email:{e}") for e in body.emails]
        problems += [key_problem(f"phone:{p}") for p in body.phones]
        found = [p for p in problems if p is not None]
        if found:
            return _error(400, "bad_expert", "; ".join(found))
        expert = Expert(id=expert_id, **msgspec.structs.asdict(body))
        return await self._journal_admin(request, UpsertExpert(expert=expert), expert_id=expert_id)

    async def delete_expert(self, request: web.Request) -> web.Response:
        expert_id = request.match_info["expert_id"]
        view = self.state.view
        # The router would refuse it too (admin.refused), but the caller deserves to know now.
        if view is not None:
            report = view.experts_report(time.time())
            if not any(row.get("id") == expert_id for row in report.get("experts", ())):
                return _error(404, "unknown_expert", f"no expert {expert_id!r}")
        return await self._journal_admin(
            request, RemoveExpert(expert_id=expert_id), expert_id=expert_id
        )

    async def link_customers(self, request: web.Request) -> web.Response:
        try:
            body = _LINK_BODY.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _error(400, "bad_link", f'expected {{"keys": ["phone:...", ...]}}: {exc}')
        if len(body.keys) < 2:
            return _error(400, "bad_link", "linking needs at least two identity keys")
        found = [p for key in body.keys if (p := key_problem(key)) is not None]
        if found:
            return _error(400, "bad_identity_key", "; ".join(found))
        return await self._journal_admin(request, LinkKeys(keys=body.keys), keys=list(body.keys))

    async def customer(self, request: web.Request) -> web.Response:
        view = self._view()
        if isinstance(view, web.Response):
            return view
        ref = request.match_info["ref"]
        info = view.customer_info(ref)
        if info is None:
            return _error(404, "unknown_customer", f"no customer {ref!r}")
        return _reply(200, info)

    async def _journal_admin(
        self, request: web.Request, cmd: AdminCommand, **about: Any
    ) -> web.Response:
        try:
            entry_id = await self.intake.accept_admin(cmd)
        except JournalUnavailable as exc:
            return _error(
                503,
                "journal_unavailable",
                str(exc) or "the journal is unreachable; retry",
                {"Retry-After": RETRY_AFTER_SECONDS},
            )
        op = msgspec.to_builtins(cmd)["op"]
        # The audit line: once per change, who and from where (never the token).
        log.info("admin.change", op=op, journal_id=entry_id, **_who(request), **about)
        self.metrics.observe_admin_change(op)
        return _reply(202, {"accepted": True, "op": op, "journal_id": entry_id, **about})


NATIVE_SIGNATURES = frozenset(
    {"twilio-voice", "rocketchat", "chatwoot", "whatsapp", "messenger", "discourse", "x"}
)
"""Sources whose decoder checks the platform's own signature when the source has a secret."""
SIGNATURE_HEADER = "x-stellwerk-signature"
"""For the other sources over HTTP: ``sha256=<hex HMAC-SHA256 of the body with the secret>``."""


def _too_large(source: str, limit: int) -> web.Response:
    log.warning("webhook.too_large", source=source, limit=limit)
    return _error(413, "body_too_large", f"a {source} webhook body may be at most {limit} bytes")


def _unsigned_refusal(
    request: web.Request,
    source: str,
    secret: str | None,
    body: bytes,
    headers: Mapping[str, str],
) -> web.Response | None:
    """401 for a webhook of a source that must be signed but cannot be checked, else None."""
    if secret is None:
        auth.audit_refusal(request, "unsigned_source", source=source)
        return _error(
            401,
            "unsigned_source",
            f"source {source!r} has no signing secret configured; set sources.secrets or mark "
            "it in sources.unsigned",
        )
    if source in NATIVE_SIGNATURES:
        return None  # the decoder checks the platform's own signature
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(headers.get(SIGNATURE_HEADER, "").encode(), expected.encode()):
        auth.audit_refusal(request, "bad_signature", source=source)
        return _error(
            401, "bad_signature", f"{SIGNATURE_HEADER} must be sha256=<HMAC-SHA256 of the body>"
        )
    return None


AGENT_VISIBLE_STATES = frozenset({"offered", "assigned", "wrap_up"})
"""Contact states in which the agent holding it may read it."""


def _who(request: web.Request) -> dict[str, Any]:
    principal: Principal | None = principal_of(request)
    return {
        "principal": principal.name if principal else None,
        "role": principal.role if principal else None,
        "remote": request.remote,
    }


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes, wrong methods, oversized bodies and our own bugs answer in JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise  # redirects, and our own JSON refusals (router.daemon.auth)
        slug = exc.reason.lower().replace(" ", "_")
        # Keep what the client needs (Allow on a 405); the body and its type are ours now.
        keep = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        return _error(exc.status, slug, exc.text or exc.reason, keep)
    except Exception:
        log.exception("http.handler_failed", path=request.path, method=request.method)
        return _error(500, "internal_error", "the daemon failed to handle this request")


UNLIMITED_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Monitoring is never rate limited: a scrape must not be refused during a flood."""


class RateLimit:
    """A per-client (remote address) sliding-window limit, from the ``limits`` library.

    Its asyncio storage: the threaded one starts a timer thread for every expiry round.
    """

    def __init__(self, spec: str) -> None:
        self.items = limits.parse_many(spec)
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        # client -> until when its refusals are already logged (one line per flood, not per
        # refused request; every refusal is still counted)
        self.logged: dict[str, float] = {}

    def first_refusal(self, client: str, wait: int) -> bool:
        """Whether this refusal starts a new flood of ``client`` (so it is logged)."""
        now = time.monotonic()
        if self.logged.get(client, 0.0) > now:
            return False
        if len(self.logged) > 10_000:
            self.logged = {c: t for c, t in self.logged.items() if t > now}
        self.logged[client] = now + wait
        return True

    async def retry_after(self, client: str) -> int | None:
        """None when ``client`` may go on (the hit is counted), else seconds to wait."""
        refused = [item for item in self.items if not await self.limiter.hit(item, client)]
        if not refused:
            return None
        resets = [(await self.limiter.get_window_stats(i, client)).reset_time for i in refused]
        return max(1, math.ceil(max(resets) - time.time()))


RATE_LIMIT_KEY: web.AppKey[RateLimit] = web.AppKey("stellwerk_rate_limit", RateLimit)


@web.middleware
async def _rate_limit(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    limit = request.app.get(RATE_LIMIT_KEY)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    if limit is None or route in UNLIMITED_ROUTES:
        return await handler(request)
    client = request.remote or "unknown"
    wait = await limit.retry_after(client)
    if wait is not None:
        if limit.first_refusal(client, wait):
            auth.audit_refusal(request, "rate_limited")
        else:
            request.app[auth.AUTHENTICATOR_KEY].count_refused("rate_limited", route)
        return _error(
            429,
            "rate_limited",
            f"too many requests from this client; retry in {wait} s",
            {"Retry-After": str(wait)},
        )
    return await handler(request)


def make_app(
    intake: Intake,
    state: AppState,
    settings: Settings,
    metrics: Metrics,
    authenticator: Authenticator | None = None,
    *,
    role: str = "all",
) -> web.Application:
    """The aiohttp application; the daemon runs it with :func:`start_http`.

    Every route declares what it needs (``router.daemon.auth``); a route added without a
    declaration is refused. Other modules add theirs with ``auth.add_routes(app, [...])``.

    ``role`` (``Settings.role``) picks the routes: monitoring (``/healthz``, ``/readyz``,
    ``/metrics``, the OpenAPI document) everywhere; the webhooks where contacts are taken in
    (``all``, ``ingest``); the read and admin API, the desk and replies where the engine runs
    (``all``, ``router``). docs/daemon.md, "Roles".
    """
    h = _Handlers(intake, state, settings, metrics)
    sources = settings.sources
    # The hard cap for any body; webhooks are held to their source's own limit below it.
    cap = max(MAX_BODY, sources.max_body_default, *sources.max_body.values())
    app = web.Application(
        client_max_size=cap, middlewares=[_json_errors, _rate_limit, auth.auth_middleware]
    )
    app[auth.AUTHENTICATOR_KEY] = authenticator or Authenticator(settings, metrics=metrics)
    if settings.http.rate_limit:
        app[RATE_LIMIT_KEY] = RateLimit(settings.http.rate_limit)
    monitoring: list[tuple[web.RouteDef, auth.Access]] = [
        (web.get("/metrics", h.metrics_page), "metrics"),
        (web.get("/healthz", h.healthz), "public"),
        (web.get("/v1/openapi.json", h.openapi), "public"),
        (web.get("/readyz", h.readyz), "public"),
    ]
    if role != "router":
        auth.add_routes(app, [(web.post("/v1/webhooks/{source}", h.webhook), "signed")])
    auth.add_routes(app, monitoring)
    if role != "ingest":
        _add_engine_routes(app, h, state, settings)
    metrics.precreate_auth(path for (_, path) in app[auth.ACCESS_KEY])
    return app


def _add_engine_routes(
    app: web.Application, h: _Handlers, state: AppState, settings: Settings
) -> None:
    """The routes that need the engine (reads, admin changes, the desk, replies)."""
    auth.add_routes(
        app,
        [
            (web.get("/v1/queues", h.queues), "supervisor"),
            (web.get("/v1/agents", h.agents), "supervisor"),
            # supervisor, or the agent the contact is offered/assigned to (checked in h.contact)
            (web.get("/v1/contacts/{contact_id}", h.contact), "self"),
            (web.post("/v1/rules/reload", h.reload), "admin"),
            (web.get("/v1/experts", h.experts), "supervisor"),
            (web.put("/v1/experts/{expert_id}", h.put_expert), "admin"),
            (web.delete("/v1/experts/{expert_id}", h.delete_expert), "admin"),
            (web.post("/v1/customers/link", h.link_customers), "admin"),
            (web.get("/v1/customers/{ref}", h.customer), "supervisor"),
        ],
    )
    desk.register(app, state)  # /desk, /wall and their WebSockets (docs/desk.md)
    if settings.outbound.configured:
        add_outbound_routes(app, state)


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The HTTPS listener's TLS context (TLS 1.2 or later) from PEM certificate and key files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


HTTP_SHUTDOWN_TIMEOUT = 2.0


async def start_http(
    app: web.Application, addr: str, *, tls: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve ``app`` on ``addr`` (``host:port``), HTTPS with ``tls``; stop it with
    ``await runner.cleanup()``."""
    host, port = parse_addr(addr)
    # No access log: at webhook peak rates it would dwarf the one-line-per-decision log.
    # At shutdown, requests still running get 2 s (aiohttp's default is 60 s), so that a
    # straggling connection cannot hold up the daemon's hand-over, which is bounded at 10 s.
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
    await site.start()
    return runner
