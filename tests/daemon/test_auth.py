"""router.daemon.auth: tokens with roles, stored hashed, checked per declared route.

The HTTP side runs a real aiohttp server (aiohttp's test server on a loopback port) with the
daemon's own middlewares; no Redis or MQTT is needed here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import test_utils, web
from hypothesis import given
from hypothesis import strategies as st

from router.daemon import auth
from router.daemon.auth import Authenticator, Principal, hash_token
from router.daemon.config import (
    AuthSettings,
    Settings,
    SettingsError,
    TokenSettings,
    load_settings,
)
from router.daemon.metrics import Metrics

ADMIN = "admin-secret-1"
SUPERVISOR = "supervisor-secret-2"
AGENT_A01 = "agent-a01-secret-3"


def tokens() -> tuple[TokenSettings, ...]:
    return (
        TokenSettings(name="ops", role="admin", sha256=hash_token(ADMIN)),
        TokenSettings(name="wall-1", role="supervisor", sha256=hash_token(SUPERVISOR)),
        TokenSettings(name="agent:a01", role="agent", agent_id="a01", sha256=hash_token(AGENT_A01)),
    )


def test_roles_nest_admin_over_supervisor_and_agents_apart() -> None:
    admin = Principal("ops", "admin")
    supervisor = Principal("wall", "supervisor")
    agent = Principal("agent:a01", "agent", "a01")
    assert admin.may("admin") and admin.may("supervisor")
    assert supervisor.may("supervisor") and not supervisor.may("admin")
    assert agent.may("agent") and not agent.may("supervisor") and not agent.may("admin")
    # Nobody but an agent acts as an agent: the others have no agent id to act as.
    assert not admin.may("agent") and not supervisor.may("agent")


def test_tokens_authenticate_to_their_principal_and_nothing_else() -> None:
    a = Authenticator(Settings(auth=AuthSettings(tokens=tokens())))
    assert a.authenticate(ADMIN) == Principal("ops", "admin")
    assert a.authenticate(SUPERVISOR) == Principal("wall-1", "supervisor")
    assert a.authenticate(AGENT_A01) == Principal("agent:a01", "agent", "a01")
    for wrong in (None, "", "x", ADMIN + " ", ADMIN.upper(), hash_token(ADMIN)):
        assert a.authenticate(wrong) is None


@given(st.text(min_size=1, max_size=40))
def test_no_other_string_is_a_valid_token(candidate: str) -> None:
    a = Authenticator(Settings(auth=AuthSettings(tokens=tokens())))
    expected = {ADMIN: "ops", SUPERVISOR: "wall-1", AGENT_A01: "agent:a01"}.get(candidate)
    found = a.authenticate(candidate)
    assert (found.name if found else None) == expected


def test_the_legacy_admin_token_is_an_admin() -> None:
    a = Authenticator(Settings(admin_token="legacy"))
    assert a.authenticate("legacy") == Principal("admin_token", "admin")
    assert a.authenticate("other") is None


def test_token_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="agent_id"):
        TokenSettings(name="a", role="agent", sha256=hash_token("x"))
    with pytest.raises(ValueError, match="agent_id"):
        TokenSettings(name="s", role="supervisor", agent_id="a01", sha256=hash_token("x"))
    with pytest.raises(ValueError, match="sha256"):
        TokenSettings(name="s", role="supervisor", sha256="not-a-hash")


def _write_tokens(path: Path, entries: list[dict[str, str]]) -> None:
    path.write_text(yaml.safe_dump({"tokens": entries}), encoding="utf-8")


def test_tokens_file_relative_to_the_settings_file_and_from_env(tmp_path: Path) -> None:
    _write_tokens(
        tmp_path / "tokens.yaml",
        [{"name": "wall-2", "role": "supervisor", "sha256": hash_token("w2")}],
    )
    (tmp_path / "stellwerk.yaml").write_text("auth:\n  tokens_file: tokens.yaml\n")
    loaded = load_settings(tmp_path / "stellwerk.yaml", env={})
    assert loaded.settings.auth.tokens_file == str(tmp_path / "tokens.yaml")
    assert Authenticator(loaded.settings).authenticate("w2") == Principal("wall-2", "supervisor")
    env = {
        "STELLWERK_AUTH_TOKENS": json.dumps(
            [{"name": "ops", "role": "admin", "sha256": hash_token("o")}]
        )
    }
    from_env = load_settings(None, env=env).settings
    assert Authenticator(from_env).authenticate("o") == Principal("ops", "admin")
    with pytest.raises(SettingsError, match="STELLWERK_AUTH_TOKENS: expected a JSON list"):
        load_settings(None, env={"STELLWERK_AUTH_TOKENS": "nope"})


def test_a_broken_tokens_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    _write_tokens(path, [{"name": "x", "role": "agent", "sha256": hash_token("t")}])
    with pytest.raises(SettingsError, match=r"tokens\.yaml.*agent_id"):
        Authenticator(Settings(auth=AuthSettings(tokens_file=str(path))))
    with pytest.raises(SettingsError, match="cannot read"):
        Authenticator(Settings(auth=AuthSettings(tokens_file=str(tmp_path / "missing.yaml"))))


def test_a_rotated_tokens_file_takes_effect_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    _write_tokens(path, [{"name": "wall", "role": "supervisor", "sha256": hash_token("old")}])
    now = [0.0]
    a = Authenticator(Settings(auth=AuthSettings(tokens_file=str(path))), clock=lambda: now[0])
    assert a.authenticate("old") is not None
    _write_tokens(path, [{"name": "wall", "role": "supervisor", "sha256": hash_token("new")}])
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    now[0] = 5.0
    assert a.authenticate("old") is None
    assert a.authenticate("new") == Principal("wall", "supervisor")
    # A file that became invalid keeps the tokens in force (and is logged), not an open door.
    path.write_text("tokens: [{name: broken}]\n")
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    now[0] = 10.0
    assert a.authenticate("new") == Principal("wall", "supervisor")


# ---- HTTP: require, the middleware, the route table -------------------------------------------


async def _whoami(request: web.Request) -> web.Response:
    principal = auth.principal_of(request)
    return web.json_response({"name": principal.name if principal else None})


async def _own(request: web.Request) -> web.Response:
    principal = auth.require_agent(request)
    return web.json_response({"agent_id": principal.agent_id})


@pytest.fixture
async def client() -> AsyncIterator[tuple[test_utils.TestClient, Metrics]]:
    metrics = Metrics()
    settings = Settings(auth=AuthSettings(tokens=tokens()))
    app = web.Application(middlewares=[auth.auth_middleware])
    app[auth.AUTHENTICATOR_KEY] = Authenticator(settings, metrics=metrics)
    auth.add_routes(
        app,
        [
            (web.get("/admin", _whoami), "admin"),
            (web.get("/sup", _whoami), "supervisor"),
            (web.get("/open", _whoami), "public"),
            (web.get("/own", _own), "self"),
        ],
    )
    app.router.add_get("/forgotten", _whoami)  # added without a declaration
    async with test_utils.TestClient(test_utils.TestServer(app)) as c:
        yield c, metrics


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_require_answers_401_403_or_lets_through(
    client: tuple[test_utils.TestClient, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    c, metrics = client
    async with c.get("/admin") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["error"] == "unauthorized"
    async with c.get("/admin", headers=_bearer("nope")) as r:
        assert r.status == 401
    async with c.get("/admin", headers={"Authorization": f"Basic {ADMIN}"}) as r:
        assert r.status == 401
    async with c.get("/admin", headers=_bearer(SUPERVISOR)) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "forbidden"
    async with c.get("/admin", headers=_bearer(ADMIN)) as r:
        assert r.status == 200 and await r.json() == {"name": "ops"}
    async with c.get("/sup", headers=_bearer(ADMIN)) as r:
        assert r.status == 200  # an admin may do what a supervisor may
    async with c.get("/sup", headers=_bearer(AGENT_A01)) as r:
        assert r.status == 403
    async with c.get("/open") as r:
        assert r.status == 200 and await r.json() == {"name": None}
    async with c.get("/own", headers=_bearer(AGENT_A01)) as r:
        assert await r.json() == {"agent_id": "a01"}
    async with c.get("/own", headers=_bearer(ADMIN)) as r:
        assert r.status == 403
    refused = metrics.auth_refused
    # (Basic is no bearer token at all.)
    assert refused.labels("no_token", "/admin")._value.get() == 2
    assert refused.labels("bad_token", "/admin")._value.get() == 1
    assert refused.labels("wrong_role", "/admin")._value.get() == 1
    assert refused.labels("wrong_role", "/sup")._value.get() == 1


async def test_an_undeclared_route_is_refused(
    client: tuple[test_utils.TestClient, Metrics],
) -> None:
    c, _ = client
    async with c.get("/forgotten", headers=_bearer(ADMIN)) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "undeclared_route"


async def test_refusals_never_log_the_token(
    client: tuple[test_utils.TestClient, Metrics], capsys: pytest.CaptureFixture[str]
) -> None:
    c, _ = client
    async with c.get("/admin", headers=_bearer("secret-guess-xyz")) as r:
        assert r.status == 401
    async with c.get("/admin", headers=_bearer(SUPERVISOR)) as r:
        assert r.status == 403
    out = capsys.readouterr()
    logged = out.out + out.err
    assert "auth.refused" in logged and "wall-1" in logged
    assert "secret-guess-xyz" not in logged and SUPERVISOR not in logged


def test_declare_refuses_an_unknown_access() -> None:
    app = web.Application()
    with pytest.raises(ValueError, match="not one of"):
        auth.declare(app, "GET", "/x", "everyone")  # type: ignore[arg-type]


def test_every_route_of_the_daemon_declares_its_access() -> None:
    """Walks the real app's router: a route added without a declaration fails here."""
    from router.daemon.http import AppState, make_app
    from router.daemon.intake import Intake
    from router.daemon.journal import Journal, connect_redis

    settings = Settings(auth=AuthSettings(tokens=tokens()))
    journal = Journal(connect_redis("redis://127.0.0.1:1/0"), "unused:")
    app = make_app(Intake(journal, settings.decode_config()), AppState(), settings, Metrics())
    undeclared = []
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        if auth.access_of(app, route.method, resource.canonical) is None:
            undeclared.append(f"{route.method} {resource.canonical}")
    assert undeclared == []
    assert auth.access_of(app, "POST", "/v1/rules/reload") == "admin"
    assert auth.access_of(app, "GET", "/v1/customers/{ref}") == "supervisor"


def test_the_daemon_refuses_to_start_with_a_broken_tokens_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.daemon.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
    env["STELLWERK_AUTH_TOKENS_FILE"] = str(tmp_path / "missing.yaml")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "run",
            "--check-config",
            "--config",
            str(REPO / "config" / "stellwerk.yaml"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "missing.yaml: cannot read" in done.stderr and "Traceback" not in done.stderr
