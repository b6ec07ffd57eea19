"""HTTP authentication and authorisation: bearer tokens with roles, declared per route.

Who is asking comes from the ``Authorization: Bearer <token>`` header alone, never from a field
the client writes. Tokens are stored as SHA-256 hex digests (``auth.tokens`` in the settings,
``auth.tokens_file`` written by ``stellwerk broker-config``); the legacy ``admin_token`` /
``STELLWERK_ADMIN_TOKEN`` is an admin token. A presented token is hashed and compared with every
stored digest in constant time (:func:`hmac.compare_digest`, no early exit), and is never logged.

Roles (:data:`Role`):

- ``admin``: changes (rules reload, experts, customer links) and everything a supervisor may.
- ``supervisor``: reads of queues, agents, contacts, customers, experts, the wallboard.
- ``agent``: its own offers and contacts only; the principal's ``agent_id`` is the one agent it
  may act as. Neither admin nor supervisor may act as an agent (they have no agent id).

Every route of the daemon's aiohttp app declares its :data:`Access` in the app's route table
(:func:`add_routes` / :func:`declare`); :func:`auth_middleware` enforces a role before the
handler runs and refuses a route nobody declared (fail closed). Handlers that need the caller
read it with :func:`principal_of`; handlers that authenticate themselves (a WebSocket whose
token comes in the first message) are declared ``"self"`` and use :meth:`Authenticator.authenticate`
and :func:`audit_refusal`.

Every refusal is logged once (``auth.refused``: reason, route, method, remote address, the
principal's name when known; never the token) and counted in
``stellwerk_auth_refused_total{reason,route}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import msgspec
import structlog
import yaml
from aiohttp import web

from router.daemon.config import Role, Settings, SettingsError, TokenSettings

__all__ = [
    "ACCESS_KEY",
    "AUTHENTICATOR_KEY",
    "PRINCIPAL_KEY",
    "ROLES",
    "Access",
    "Authenticator",
    "Principal",
    "add_routes",
    "audit_refusal",
    "auth_middleware",
    "bearer_token",
    "declare",
    "hash_token",
    "load_tokens_file",
    "principal_of",
    "require",
    "require_agent",
]

log = structlog.get_logger("stellwerk.auth")

ROLES: tuple[Role, ...] = get_args(Role)

Access = Role | Literal["public", "signed", "metrics", "self"]
"""What a route needs: a role (a token whose principal :meth:`~Principal.may` it), or

- ``public``: nothing (``/healthz``, ``/readyz``, static pages that hold no data);
- ``signed``: the sender's own signature, checked by the channel decoder (webhooks);
- ``metrics``: open unless ``auth.metrics`` asks for a supervisor token;
- ``self``: the handler authenticates the caller itself (a WebSocket sending its token in the
  first message); it must call :meth:`Authenticator.authenticate` and :func:`audit_refusal`.
"""
ACCESS_VALUES: frozenset[str] = frozenset(ROLES) | {"public", "signed", "metrics", "self"}

REALM = 'Bearer realm="stellwerk"'
RECHECK_SECONDS = 1.0
"""How often the tokens file's modification time is looked at (rotation without restart)."""


@dataclass(frozen=True)
class Principal:
    """Who made a request, from its token.

    ``name`` names the token's owner for audit logs (``ops-script``, ``agent:a01``, ``wall-1``);
    ``agent_id`` is set for role ``agent``: the only agent it may act as or read.
    """

    name: str
    role: Role
    agent_id: str | None = None

    def may(self, role: Role) -> bool:
        """Whether this principal may do what ``role`` may.

        An admin may do everything a supervisor may; an agent only agent things; only an agent
        (with its ``agent_id``) may do agent things: admins and supervisors read every contact
        through supervisor routes, they never act as an agent.
        """
        if self.role == role:
            return True
        return self.role == "admin" and role == "supervisor"


class RefusalCounter(Protocol):
    """Where refusals are counted (``router.daemon.metrics.Metrics`` has it)."""

    def observe_auth_refused(self, reason: str, route: str) -> None:
        """Count one refused request."""
        ...


def hash_token(token: str) -> str:
    """The SHA-256 hex digest a token is stored as."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _TokensFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tokens: tuple[TokenSettings, ...] = ()


def load_tokens_file(path: str | Path) -> tuple[TokenSettings, ...]:
    """The tokens of a tokens file (``tokens: [{name, role, agent_id, sha256}, ...]``).

    Raises :class:`~router.daemon.config.SettingsError` naming the file for anything unreadable
    or invalid.
    """
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
    try:
        raw = yaml.safe_load(text) or {}
        return msgspec.convert(raw, _TokensFile).tokens
    except yaml.YAMLError as exc:
        raise SettingsError([f"{shown}: not valid YAML: {exc}"]) from None
    except msgspec.ValidationError as exc:
        raise SettingsError([f"{shown}: {exc}"]) from None


def _principals(settings: Settings) -> list[tuple[bytes, Principal]]:
    entries: list[tuple[bytes, Principal]] = []
    tokens = list(settings.auth.tokens)
    if settings.auth.tokens_file:
        tokens.extend(load_tokens_file(settings.auth.tokens_file))
    for t in tokens:
        entries.append((bytes.fromhex(t.sha256), Principal(t.name, t.role, t.agent_id)))
    if settings.admin_token:
        digest = hashlib.sha256(settings.admin_token.encode("utf-8")).digest()
        entries.append((digest, Principal("admin_token", "admin")))
    return entries


class Authenticator:
    """Checks bearer tokens against stored hashes (constant time); never logs a token.

    The tokens file is re-read when its modification time changes (looked at once a second at
    most), so rotating a credential needs no restart; a file that became invalid is logged
    (``auth.tokens_file_invalid``) and the tokens already loaded stay in force.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: RefusalCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._clock = clock
        self._path = settings.auth.tokens_file
        self._mtime = self._stat()
        self._checked = clock()
        # Raises SettingsError at start: a daemon with a broken tokens file must not start.
        self._entries = _principals(settings)

    @property
    def metrics_need_token(self) -> bool:
        """Whether ``/metrics`` wants a supervisor token (``auth.metrics``)."""
        return self.settings.auth.metrics != "open"

    def _stat(self) -> float | None:
        if not self._path:
            return None
        try:
            return os.stat(self._path).st_mtime_ns / 1e9
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        if not self._path:
            return
        now = self._clock()
        if now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self._entries = _principals(self.settings)
        except SettingsError as exc:
            log.error("auth.tokens_file_invalid", problems=exc.problems)
            return
        log.info("auth.tokens_reloaded", path=self._path, tokens=len(self._entries))

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal a token belongs to, or None for no token or an unknown one."""
        self._maybe_reload()
        if not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Principal | None = None
        # Every stored digest is compared, so the time taken says nothing about which matched.
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest) and found is None:
                found = principal
        return found

    def count_refused(self, reason: str, route: str) -> None:
        """Count one refusal in the metrics (when the daemon's metrics are attached)."""
        if self.metrics is not None:
            self.metrics.observe_auth_refused(reason, route)


AUTHENTICATOR_KEY: web.AppKey[Authenticator] = web.AppKey("stellwerk_authenticator", Authenticator)
ACCESS_KEY: web.AppKey[dict[tuple[str, str], str]] = web.AppKey("stellwerk_route_access", dict)
PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("stellwerk_principal", Principal)
"""Where :func:`auth_middleware` leaves the authenticated :class:`Principal` on the request."""


def bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer X``, or None when there is none."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def route_name(request: web.Request) -> str:
    """The route's path template (``/v1/contacts/{contact_id}``), bounded for metric labels."""
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical


def audit_refusal(
    request: web.Request, reason: str, principal: Principal | None = None, **about: object
) -> None:
    """Log one refused request (who, what, from where; never the token) and count it."""
    route = route_name(request)
    log.warning(
        "auth.refused",
        reason=reason,
        method=request.method,
        route=route,
        path=request.path,
        remote=request.remote,
        principal=principal.name if principal else None,
        role=principal.role if principal else None,
        **about,
    )
    authenticator = request.app.get(AUTHENTICATOR_KEY)
    if authenticator is not None:
        authenticator.count_refused(reason, route)


def _json_exc(
    cls: type[web.HTTPUnauthorized] | type[web.HTTPForbidden],
    error: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> web.HTTPException:
    body = json.dumps({"error": error, "detail": detail})
    return cls(text=body, content_type="application/json", headers=headers)


def unauthorized(detail: str) -> web.HTTPException:
    """A 401 with ``WWW-Authenticate`` and a JSON body."""
    return _json_exc(web.HTTPUnauthorized, "unauthorized", detail, {"WWW-Authenticate": REALM})


def forbidden(error: str, detail: str) -> web.HTTPException:
    """A 403 with a JSON body."""
    return _json_exc(web.HTTPForbidden, error, detail)


def require(request: web.Request, role: Role | Iterable[Role]) -> Principal:
    """The request's principal if it may do what ``role`` (or one of several roles) may.

    Raises ``web.HTTPUnauthorized`` (401, with ``WWW-Authenticate``) for no or an unknown token
    and ``web.HTTPForbidden`` (403) for a token of the wrong role; both are audited.
    """
    roles: tuple[Role, ...] = (role,) if isinstance(role, str) else tuple(role)
    cached = request.get(PRINCIPAL_KEY)
    principal: Principal | None = cached if isinstance(cached, Principal) else None
    if principal is None:
        authenticator = request.app[AUTHENTICATOR_KEY]
        token = bearer_token(request)
        principal = authenticator.authenticate(token)
        if principal is None:
            reason = "no_token" if token is None else "bad_token"
            audit_refusal(request, reason)
            raise unauthorized("a valid 'Authorization: Bearer <token>' is needed")
        request[PRINCIPAL_KEY] = principal
    if not any(principal.may(r) for r in roles):
        audit_refusal(request, "wrong_role", principal, needs=list(roles))
        raise forbidden("forbidden", f"this needs role {' or '.join(roles)}")
    return principal


def require_agent(request: web.Request) -> Principal:
    """Like ``require(request, "agent")``; the principal returned always has an ``agent_id``."""
    principal = require(request, "agent")
    assert principal.agent_id is not None  # TokenSettings guarantees it for role agent
    return principal


def principal_of(request: web.Request) -> Principal | None:
    """The principal :func:`auth_middleware` or :func:`require` authenticated, if any."""
    found = request.get(PRINCIPAL_KEY)
    return found if isinstance(found, Principal) else None


# ---- the route table ---------------------------------------------------------------------------


def _table(app: web.Application) -> dict[tuple[str, str], str]:
    table = app.get(ACCESS_KEY)
    if table is None:
        table = {}
        app[ACCESS_KEY] = table
    return table


def declare(app: web.Application, method: str, path: str, access: Access) -> None:
    """Declare what ``method path`` (the route's template, e.g. ``/v1/contacts/{id}``) needs."""
    if access not in ACCESS_VALUES:
        raise ValueError(f"{access!r} is not one of {sorted(ACCESS_VALUES)}")
    _table(app)[(method.upper(), path)] = access


def add_routes(app: web.Application, routes: Iterable[tuple[web.RouteDef, Access]]) -> None:
    """Add routes and declare their access at once: ``[(web.get(path, h), "supervisor"), ...]``."""
    defs = []
    for route, access in routes:
        declare(app, route.method, route.path, access)
        defs.append(route)
    app.add_routes(defs)


def access_of(app: web.Application, method: str, path: str) -> str | None:
    """The declared access of a route (HEAD shares GET's), or None when undeclared."""
    table = _table(app)
    method = method.upper()
    found = table.get((method, path))
    if found is None and method == "HEAD":
        found = table.get(("GET", path))
    return found


_ROLE_OF: dict[str, Role] = {r: r for r in ROLES}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Enforce each route's declared access before its handler runs (fail closed)."""
    resource = request.match_info.route.resource
    if resource is None or request.match_info.http_exception is not None:
        return await handler(request)  # 404 / 405: nothing to protect
    access = access_of(request.app, request.method, resource.canonical)
    if access is None:
        log.error("auth.undeclared_route", method=request.method, route=resource.canonical)
        audit_refusal(request, "undeclared_route")
        raise forbidden("undeclared_route", "this route declares no access; refused")
    role = _ROLE_OF.get(access)
    if role is not None:
        require(request, role)
    elif access == "metrics" and request.app[AUTHENTICATOR_KEY].metrics_need_token:
        require(request, "supervisor")
    return await handler(request)
