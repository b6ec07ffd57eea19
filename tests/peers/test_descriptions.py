"""The Chatwoot and Rocket.Chat peers' own descriptions agree with the vendors' API definitions
in ``../shared/reference`` (read at test time, never copied into the repository)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers import chatwoot, rocketchat

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"


def reference(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is absent: the vendors' reference files are not beside the checkout")
    return path


def test_chatwoot_description_matches_the_swagger() -> None:
    spec: dict[str, Any] = json.loads(reference("chatwoot", "swagger-excerpt.json").read_text())
    schemes = spec["components"]["securitySchemes"]
    # Every way Chatwoot authenticates these calls is the api_access_token header.
    assert {(s["in"], s["name"]) for s in schemes.values()} == {
        ("header", chatwoot.DESCRIPTION["auth_header"])
    }
    base = "/api/v1/accounts/{account_id}/conversations/{conversation_id}"
    assert chatwoot.DESCRIPTION["base"] == base
    for name, op in chatwoot.DESCRIPTION["operations"].items():
        item = spec["paths"][f"{base}/{name}"]
        operation = item[op["method"]]
        security = {key for entry in operation["security"] for key in entry}
        assert security <= set(schemes), name
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        if "$ref" in body:
            continue  # the message payload's schema is not in the excerpt (endpoints.md has it)
        assert set(body.get("required", [])) == set(op.get("required", [])), name
        for prop in op.get("properties", []):
            assert prop in body["properties"], (name, prop)
        if "status" in op:
            assert body["properties"]["status"]["enum"] == op["status"]
    # The ids in the path are integers (the conversation's display id).
    params = spec["components"]["parameters"]
    assert params["conversation_id"]["schema"]["type"] == "integer"
    notes = reference("chatwoot", "endpoints.md").read_text()
    assert "display_id" in notes and "`content` (required)" in notes


def _server_schema(text: str, name: str) -> dict[str, Any]:
    """A ``const NAME = {...};`` block of server-validation.md, read as YAML-ish JSON."""
    match = re.search(rf"const {name} = (\{{.*?\n\}});", text, re.S)
    assert match is not None, name
    block = re.sub(r"(\w+):", r'"\1":', match.group(1).replace("'", '"'))
    block = re.sub(r",(\s*[}\]])", r"\1", block)
    return dict(json.loads(block))


def test_rocketchat_description_matches_the_openapi_and_the_server() -> None:
    spec = yaml.safe_load(reference("rocketchat", "openapi-omnichannel-excerpt.yaml").read_text())
    params = spec["components"]["parameters"]
    headers = {params["AuthToken"]["name"], params["UserId"]["name"]}
    assert headers == set(rocketchat.DESCRIPTION["auth_headers"])
    for path, op in rocketchat.DESCRIPTION["operations"].items():
        post = spec["paths"][path]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema.get("required", [])) == set(op["required"]), path
        if "message_required" in op:
            message = schema["properties"]["message"]
            assert message["required"] == op["message_required"]
            assert "_id" not in message["properties"]  # documented in the description only
        refs = {p["$ref"].rsplit("/", 1)[-1] for p in post.get("parameters", [])}
        assert refs & {"AuthToken", "Auth-Token"} and "UserId" in refs, path
    text = reference("rocketchat", "server-validation.md").read_text()
    forward = _server_schema(text, "LiveChatRoomForwardSchema")
    close = _server_schema(text, "POSTLivechatRoomCloseByUserParamsSchema")
    ops = rocketchat.DESCRIPTION["operations"]
    for schema, path in (
        (forward, "/api/v1/livechat/room.forward"),
        (close, "/api/v1/livechat/room.closeByUser"),
    ):
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) == set(ops[path]["required"])
        assert set(schema["properties"]) == set(ops[path]["properties"])
    assert "_id" in text and "idempotent" in text  # chat.sendMessage's caller-chosen id
