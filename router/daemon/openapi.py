"""The OpenAPI 3.1 document of the daemon's ``/v1`` API, served at ``GET /v1/openapi.json``.

Written by hand (the handlers decode with msgspec, not with a framework that could generate it).
The modules that add routes of their own (the desk, replies, the telephony drivers) add their
path items with :func:`document_paths`. A test checks the document a real daemon serves, with
every module configured, against that daemon's routes in both directions, so a route cannot be
added without being documented, and validates it with ``openapi-spec-validator``. Each
operation names the role it needs in ``x-stellwerk-access`` (the route table in
``router.daemon.http``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

EXTRA_PATHS_KEY: web.AppKey[dict[str, Any]] = web.AppKey("stellwerk_openapi_extra", dict)


def document_paths(app: web.Application, paths: dict[str, Any]) -> None:
    """Add path items for routes another module adds to the app (``/v1/desk/ws`` ...)."""
    extra = app.get(EXTRA_PATHS_KEY)
    if extra is None:
        extra = {}
        app[EXTRA_PATHS_KEY] = extra
    extra.update(paths)


def form_callback(
    summary: str, query: tuple[tuple[str, str], ...] = (), *, standby: bool = False
) -> dict[str, Any]:
    """The path item of a Twilio callback: a signed form POST answered with TwiML
    (``standby``: a daemon that is not routing answers 503)."""
    twiml = {"text/xml": {"schema": {"type": "string"}}}
    params: list[dict[str, Any]] = [
        {
            "name": "X-Twilio-Signature",
            "in": "header",
            "required": True,
            "description": "Twilio's signature of the public URL and the form "
            "(telephony.twilio.auth_token)",
            "schema": {"type": "string"},
        }
    ]
    params += [
        {"name": name, "in": "query", "required": False, "description": text, "schema": {}}
        for name, text in query
    ]
    return {
        "post": {
            "summary": summary,
            "x-stellwerk-access": "signed",
            "security": [],
            "parameters": params,
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["AccountSid", "CallSid"],
                            "properties": {
                                "AccountSid": {"type": "string"},
                                "CallSid": {"type": "string"},
                                "CallStatus": {"type": "string"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {"description": "TwiML for the call", "content": twiml},
                "400": {"description": "not a form", "content": twiml},
                "401": {"description": "unsigned or wrongly signed: Say, Hangup", "content": twiml},
                "403": {"description": "signed, but not for this account", "content": twiml},
            }
            | (
                {"503": {"description": "not routing: Twilio uses the fallback URL"}}
                if standby
                else {}
            ),
        }
    }


def served(app: web.Application) -> dict[str, Any]:
    """The document as ``/v1/openapi.json`` serves it: :func:`document` plus the app's extras."""
    doc = document()
    doc["paths"].update(app.get(EXTRA_PATHS_KEY) or {})
    return doc


ERROR = {"$ref": "#/components/schemas/Error"}
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _listing(key: str) -> dict[str, Any]:
    """A 200 answer ``{key: [object, ...]}``."""
    return _json(
        {
            "type": "object",
            "required": [key],
            "properties": {key: {"type": "array", "items": OBJ}},
        },
        f"the {key}",
    )


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad input, with the reason",
        401: "no or an unknown bearer token (or a bad/missing webhook signature)",
        403: "the token's role may not do this",
        404: "not found",
        413: "body too large",
        409: "the contact is not in a state that allows this (e.g. not assigned)",
        422: "the routing file does not validate",
        429: "rate limited; see Retry-After",
        503: "not routing (a standby) or the journal is unavailable; retry",
    }
    return {str(c): _json(ERROR, text[c]) for c in codes}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


def _op(
    summary: str,
    access: str,
    ok: dict[str, Any],
    errors: tuple[int, ...],
    **extra: Any,
) -> dict[str, Any]:
    if "description" in ok:
        ok = {"200": ok}  # a single response object: the 200 answer
    op: dict[str, Any] = {
        "summary": summary,
        "x-stellwerk-access": access,
        "responses": {**ok, **_errors(*errors, 429)},
    }
    if access in ("admin", "supervisor", "agent", "supervisor or agent"):
        op["security"] = BEARER
    else:
        op["security"] = []
    op.update(extra)
    return op


OBJ: dict[str, Any] = {"type": "object"}
ACCEPTED_ADMIN = _json(
    {
        "type": "object",
        "required": ["accepted", "op", "journal_id"],
        "properties": {
            "accepted": {"type": "boolean"},
            "op": {"type": "string"},
            "journal_id": {"type": "string"},
        },
    },
    "journaled; the router applies it in order",
)


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Stellwerk daemon API",
            "version": "1",
            "description": "Webhooks, reads of the router's state and admin changes. Every "
            "error is JSON {error, detail}. Roles: admin (changes, and every supervisor read), "
            "supervisor (reads), agent (its own contacts).",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
                "Expert": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "level": {"type": "integer", "minimum": 1, "maximum": 9},
                        "skills": {"type": "array", "items": {"type": "string"}},
                        "phones": {"type": "array", "items": {"type": "string"}},
                        "emails": {"type": "array", "items": {"type": "string"}},
                        "handles": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
        "paths": {
            "/v1/openapi.json": {
                "get": _op("This document", "public", _json(OBJ, "the OpenAPI document"), ())
            },
            "/v1/webhooks/{source}": {
                "parameters": [_path_param("source", "the source's name, e.g. discourse")],
                "post": _op(
                    "A platform's native webhook, signed with its own scheme or "
                    "X-Stellwerk-Signature (sha256=HMAC of the body)",
                    "signed",
                    _json(
                        {
                            "type": "object",
                            "required": ["accepted"],
                            "properties": {"accepted": {"type": "integer", "minimum": 0}},
                        },
                        "journaled",
                    ),
                    (400, 401, 404, 413, 503),
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": {}}},
                    },
                ),
            },
            "/v1/queues": {
                "get": _op(
                    "Per queue statistics",
                    "supervisor",
                    _listing("queues"),
                    (401, 403, 503),
                )
            },
            "/v1/agents": {
                "get": _op(
                    "Per agent state",
                    "supervisor",
                    _listing("agents"),
                    (401, 403, 503),
                )
            },
            "/v1/contacts/{contact_id}": {
                "parameters": [_path_param("contact_id", "e.g. asterisk-ari:1400609726.3")],
                "get": _op(
                    "One contact with the customer's history: supervisors any, an agent only a "
                    "contact offered or assigned to it (else 404)",
                    "supervisor or agent",
                    _json(OBJ, "the contact"),
                    (401, 403, 404, 503),
                ),
            },
            "/v1/rules/reload": {
                "post": _op(
                    "Reload the routing file",
                    "admin",
                    _json(
                        {
                            "type": "object",
                            "required": ["reloaded"],
                            "properties": {"reloaded": {"type": "boolean"}},
                        },
                        "the new rules are in force",
                    ),
                    (401, 403, 422, 503),
                )
            },
            "/v1/experts": {
                "get": _op(
                    "The crowd's experts report",
                    "supervisor",
                    _json(
                        {
                            "type": "object",
                            "required": ["summary", "experts"],
                            "properties": {
                                "summary": OBJ,
                                "experts": {"type": "array", "items": OBJ},
                            },
                        },
                        "the report",
                    ),
                    (401, 403, 503),
                )
            },
            "/v1/experts/{expert_id}": {
                "parameters": [_path_param("expert_id", "the expert's id")],
                "put": _op(
                    "Add or change an expert",
                    "admin",
                    {"202": ACCEPTED_ADMIN},
                    (400, 401, 403, 503),
                    requestBody={
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Expert"}}
                        },
                    },
                ),
                "delete": _op(
                    "Remove an expert",
                    "admin",
                    {"202": ACCEPTED_ADMIN},
                    (401, 403, 404, 503),
                ),
            },
            "/v1/customers/link": {
                "post": _op(
                    "Tie identity keys to one customer",
                    "admin",
                    {"202": ACCEPTED_ADMIN},
                    (400, 401, 403, 503),
                    requestBody={
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["keys"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "keys": {
                                            "type": "array",
                                            "minItems": 2,
                                            "items": {"type": "string"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                )
            },
            "/v1/customers/{ref}": {
                "parameters": [_path_param("ref", "a customer id or an identity key")],
                "get": _op(
                    "One customer: identity keys and contact history (personal data)",
                    "supervisor",
                    _json(OBJ, "the customer"),
                    (401, 403, 404, 503),
                ),
            },
        },
    }
