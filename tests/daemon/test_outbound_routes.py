"""The reply routes exist exactly when a platform is configured, each declared with its access
and documented in the OpenAPI document (valid, in step with the served routes)."""

from __future__ import annotations

from openapi_spec_validator import validate

from router.daemon import auth, openapi
from router.daemon.config import ChatwootSettings, OutboundSettings, Settings
from router.daemon.http import AppState, make_app
from router.daemon.intake import Intake
from router.daemon.journal import Journal, connect_redis
from router.daemon.metrics import Metrics

PATH = "/v1/contacts/{contact_id}/messages"


def app_for(settings: Settings) -> object:
    intake = Intake(
        Journal(connect_redis("redis://127.0.0.1:6379/0"), "stwtest:routes:"),
        settings.decode_config(),
    )
    return make_app(intake, AppState(), settings, Metrics())


def served(app: object) -> set[tuple[str, str]]:
    return {
        (r.method, r.resource.canonical)
        for r in app.router.routes()  # type: ignore[attr-defined]
        if r.method != "HEAD" and r.resource is not None
    }


def test_routes_documented_and_declared_when_configured() -> None:
    settings = Settings(
        outbound=OutboundSettings(
            chatwoot=ChatwootSettings(url="http://cw.invalid", account_id=1, api_token="t")
        )
    )
    app = app_for(settings)
    assert {("POST", PATH), ("GET", PATH)} <= served(app)
    access = app[auth.ACCESS_KEY]  # type: ignore[index]
    assert access[("POST", PATH)] == "agent" and access[("GET", PATH)] == "self"
    doc = openapi.served(app)  # type: ignore[arg-type]
    validate(doc)
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == {(m, p) for m, p in served(app) if p.startswith("/v1")}
    assert doc["paths"][PATH]["post"]["x-stellwerk-access"] == "agent"


def test_no_routes_without_a_platform() -> None:
    assert not {("POST", PATH), ("GET", PATH)} & served(app_for(Settings()))
