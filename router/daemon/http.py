"""The daemon's HTTP server (aiohttp): webhooks, metrics, health, and the small admin API.

Routes (docs/operations.md):

- ``POST /v1/webhooks/{source}`` — the raw body and headers go to the shared
  :class:`~router.daemon.intake.Intake`, which checks
  the source's signature, decodes, and journals the events. ``202 {"accepted": n}`` only after
  the journal write; ``401`` for a bad signature, ``404`` for an unknown source, ``400`` with
  the reason for any other rejected payload (it is in the dead-letter stream), ``503`` with
  ``Retry-After`` when the journal (Redis) is down, so the sender retries and nothing is lost.
- ``GET /metrics`` (Prometheus text format), ``GET /healthz`` (the process answers),
  ``GET /readyz`` (200 only when Redis and MQTT are connected and this daemon holds the routing
  lease; 503 otherwise, with the reason).
- ``GET /v1/queues``, ``/v1/agents``, ``/v1/contacts/{id}`` — read from the router's engine
  through the read-only :class:`RouterView`; 503 ``not_routing`` on a standby.
- ``POST /v1/rules/reload`` — needs ``Authorization: Bearer <admin_token>``; a routing file that
  fails validation is refused with its problems (422) and the running rules stay.
- The crowd (docs/crowd.md): ``GET /v1/experts`` (the experts report; 503 on a standby),
  ``PUT /v1/experts/{id}`` (an expert as JSON: ``name``, ``level``, ``skills``, ``phones``,
  ``emails``, ``handles``; the id comes from the path), ``DELETE /v1/experts/{id}``,
  ``POST /v1/customers/link`` (``{"keys": ["phone:+49...", "email:..."]}``) and
  ``GET /v1/customers/{ref}`` (a customer id or an identity key, URL-encoded). Changes need the
  bearer token and are journaled like every other input (``202`` once in the journal; the
  router applies them in order, so they survive restarts and replays). The customer read needs
  the token as well: it is personal data (keys, contact history). The experts report is as
  public as ``/v1/queues``.

Every error answer is JSON ``{"error": slug, "detail": sentence}``.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import msgspec
import structlog
from aiohttp import web

from router.daemon.config import Settings, parse_addr
from router.daemon.intake import Intake
from router.daemon.journal import JournalUnavailable
from router.daemon.metrics import CONTENT_TYPE_LATEST, Metrics
from router.messages import AdminCommand, LinkKeys, RemoveExpert, UpsertExpert
from rules.identity import normalize_handle
from rules.schema import Expert

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


ReloadFn = Callable[[], Awaitable[list[str]]]
"""Reload the routing file; returns its problems (empty when the new rules are in force)."""


@dataclass
class AppState:
    """What the daemon tells the HTTP app about itself; the daemon updates it as things change.

    ``view`` and ``reload`` are None while this daemon does not route (a standby, or before the
    snapshot is restored).
    """

    redis_ok: bool = False
    mqtt_ok: bool = False
    lease_held: bool = False
    view: RouterView | None = None
    reload: ReloadFn | None = None


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
        self.intake = intake
        self.state = state
        self.admin_token = settings.admin_token
        self.metrics = metrics

    async def webhook(self, request: web.Request) -> web.Response:
        source = request.match_info["source"]
        body = await request.read()
        # Decoders take lower-cased header names (channels.base); a repeated header keeps its
        # first value, which is the one every signature scheme here uses.
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), value)
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

    async def healthz(self, request: web.Request) -> web.Response:
        return _reply(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        s = self.state
        checks = {"redis": s.redis_ok, "mqtt": s.mqtt_ok, "lease": s.lease_held}
        ready = all(checks.values())
        return _reply(200 if ready else 503, {"ready": ready, **checks})

    def _view(self) -> RouterView | web.Response:
        if self.state.view is None:
            return _error(503, "not_routing", "this daemon does not hold the routing lease")
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
        view = self._view()
        if isinstance(view, web.Response):
            return view
        contact_id = request.match_info["contact_id"]
        info = view.contact_info(contact_id)
        if info is None:
            return _error(404, "unknown_contact", f"no contact {contact_id!r}")
        return _reply(200, info)

    async def reload(self, request: web.Request) -> web.Response:
        denied = self._authorise(request)
        if denied is not None:
            return denied
        reload = self.state.reload
        if reload is None:
            return _error(503, "not_routing", "this daemon does not hold the routing lease")
        # The router logs the outcome (rules.reloaded / rules.reload_refused), as for SIGHUP.
        log.info("rules.reload_requested", trigger="http")
        problems = await reload()
        if problems:
            return _reply(
                422,
                {
                    "error": "invalid_routing",
                    "detail": "the routing file does not validate; the running rules stay",
                    "problems": problems,
                },
            )
        return _reply(200, {"reloaded": True})

    # ---- the crowd: experts and customers ------------------------------------------------------

    async def experts(self, request: web.Request) -> web.Response:
        view = self._view()
        if isinstance(view, web.Response):
            return view
        return _reply(200, view.experts_report(time.time()))

    async def put_expert(self, request: web.Request) -> web.Response:
        denied = self._authorise(request)
        if denied is not None:
            return denied
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
        return await self._journal_admin(UpsertExpert(expert=expert), expert_id=expert_id)

    async def delete_expert(self, request: web.Request) -> web.Response:
        denied = self._authorise(request)
        if denied is not None:
            return denied
        expert_id = request.match_info["expert_id"]
        view = self.state.view
        # The router would refuse it too (admin.refused), but the caller deserves to know now.
        if view is not None:
            report = view.experts_report(time.time())
            if not any(row.get("id") == expert_id for row in report.get("experts", ())):
                return _error(404, "unknown_expert", f"no expert {expert_id!r}")
        return await self._journal_admin(RemoveExpert(expert_id=expert_id), expert_id=expert_id)

    async def link_customers(self, request: web.Request) -> web.Response:
        denied = self._authorise(request)
        if denied is not None:
            return denied
        try:
            body = _LINK_BODY.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _error(400, "bad_link", f'expected {{"keys": ["phone:...", ...]}}: {exc}')
        if len(body.keys) < 2:
            return _error(400, "bad_link", "linking needs at least two identity keys")
        found = [p for key in body.keys if (p := key_problem(key)) is not None]
        if found:
            return _error(400, "bad_identity_key", "; ".join(found))
        return await self._journal_admin(LinkKeys(keys=body.keys), keys=list(body.keys))

    async def customer(self, request: web.Request) -> web.Response:
        denied = self._authorise(request)
        if denied is not None:
            return denied
        view = self._view()
        if isinstance(view, web.Response):
            return view
        ref = request.match_info["ref"]
        info = view.customer_info(ref)
        if info is None:
            return _error(404, "unknown_customer", f"no customer {ref!r}")
        return _reply(200, info)

    async def _journal_admin(self, cmd: AdminCommand, **about: Any) -> web.Response:
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
        log.info("admin.accepted", op=op, journal_id=entry_id, **about)
        return _reply(202, {"accepted": True, "op": op, "journal_id": entry_id, **about})

    def _authorise(self, request: web.Request) -> web.Response | None:
        if not self.admin_token:
            return _error(403, "admin_disabled", "no admin_token is configured")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.admin_token.encode()
        ):
            return _error(
                401,
                "unauthorized",
                "a valid 'Authorization: Bearer <admin_token>' is needed",
                {"WWW-Authenticate": 'Bearer realm="stellwerk"'},
            )
        return None


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes, wrong methods, oversized bodies and our own bugs answer in JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug = exc.reason.lower().replace(" ", "_")
        # Keep what the client needs (Allow on a 405); the body and its type are ours now.
        keep = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        return _error(exc.status, slug, exc.text or exc.reason, keep)
    except Exception:
        log.exception("http.handler_failed", path=request.path, method=request.method)
        return _error(500, "internal_error", "the daemon failed to handle this request")


def make_app(
    intake: Intake, state: AppState, settings: Settings, metrics: Metrics
) -> web.Application:
    """The aiohttp application; the daemon runs it with :func:`start_http`."""
    h = _Handlers(intake, state, settings, metrics)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_json_errors])
    app.add_routes(
        [
            web.post("/v1/webhooks/{source}", h.webhook),
            web.get("/metrics", h.metrics_page),
            web.get("/healthz", h.healthz),
            web.get("/readyz", h.readyz),
            web.get("/v1/queues", h.queues),
            web.get("/v1/agents", h.agents),
            web.get("/v1/contacts/{contact_id}", h.contact),
            web.post("/v1/rules/reload", h.reload),
            web.get("/v1/experts", h.experts),
            web.put("/v1/experts/{expert_id}", h.put_expert),
            web.delete("/v1/experts/{expert_id}", h.delete_expert),
            web.post("/v1/customers/link", h.link_customers),
            web.get("/v1/customers/{ref}", h.customer),
        ]
    )
    return app


async def start_http(app: web.Application, addr: str) -> web.AppRunner:
    """Serve ``app`` on ``addr`` (``host:port``); stop it with ``await runner.cleanup()``."""
    host, port = parse_addr(addr)
    # No access log: at webhook peak rates it would dwarf the one-line-per-decision log.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner
