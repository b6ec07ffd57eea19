"""A Chatwoot peer: the application API calls Stellwerk makes, with conversation state.

Our description of what Stellwerk relies on (checked against Chatwoot's swagger by
``tests/peers/test_descriptions.py`` when ``../shared/reference`` is there):

- Every call carries the header ``api_access_token`` (not ``Authorization``); a missing or
  unknown token is 401 ``{"error": "You need to sign in or sign up before continuing."}``.
- Paths are under ``/api/v1/accounts/{account_id}/conversations/{conversation_id}/`` where
  ``conversation_id`` is the per-account display id; an unknown one is 404.
- ``POST .../assignments`` ``{"assignee_id": <user id>}``: 200 with the agent object. A user id
  that is not an agent of the account *unassigns* the conversation (Chatwoot looks the user up
  and assigns what it found) and answers ``null``.
- ``POST .../toggle_status`` ``{"status": "open"|"resolved"|"pending"|"snoozed"}``: 200
  ``{"meta": {}, "payload": {"success": true, "conversation_id": N, "current_status": ...}}``.
- ``POST .../messages`` ``{"content": ..., "message_type": "outgoing", "private": false,
  "content_attributes": {...}}``: ``content`` required; 200 with the message (``message_type``
  as an integer, 1 = outgoing). ``GET .../messages``: ``{"meta": {...}, "payload": [...]}``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.peers.base import Peer, Seen, error, json_response, read_json

DESCRIPTION: dict[str, Any] = {
    "auth_header": "api_access_token",
    "base": "/api/v1/accounts/{account_id}/conversations/{conversation_id}",
    "operations": {
        "assignments": {"method": "post", "properties": ["assignee_id"]},
        "toggle_status": {
            "method": "post",
            "required": ["status"],
            "status": ["open", "resolved", "pending", "snoozed"],
        },
        "messages": {"method": "post", "required": ["content"]},
    },
}
STATUSES = DESCRIPTION["operations"]["toggle_status"]["status"]
MESSAGE_TYPES = {"incoming": 0, "outgoing": 1}


@dataclass
class Conversation:
    status: str = "open"
    assignee_id: int | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ChatwootPeer(Peer):
    token: str = "cw-token"
    account_id: int = 1
    agents: dict[int, str] = field(default_factory=lambda: {12: "Anna", 13: "Bert"})
    conversations: dict[int, Conversation] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(4711))

    def app(self) -> web.Application:
        app = web.Application()
        base = "/api/v1/accounts/{account_id}/conversations/{conversation_id}"
        app.add_routes(
            [
                web.post(base + "/assignments", self.assign),
                web.post(base + "/toggle_status", self.toggle_status),
                web.post(base + "/messages", self.post_message),
                web.get(base + "/messages", self.list_messages),
            ]
        )
        return app

    async def _check(self, request: web.Request) -> tuple[Conversation | None, Any, Seen]:
        body = await read_json(request) if request.method == "POST" else None
        seen = Seen(request.method, request.path, dict(request.headers), body)
        self.requests.append(seen)
        self.received.set()
        if request.headers.get("api_access_token") != self.token:
            raise _reply(seen, 401, {"error": "You need to sign in or sign up before continuing."})
        if request.match_info["account_id"] != str(self.account_id):
            raise _reply(seen, 401, {"error": "You are not authorized to access this account"})
        try:
            display_id = int(request.match_info["conversation_id"])
        except ValueError:
            raise _reply(seen, 404, {"error": "Resource could not be found"}) from None
        conversation = self.conversations.get(display_id)
        if conversation is None:
            raise _reply(seen, 404, {"error": "Resource could not be found"})
        return conversation, body, seen

    async def assign(self, request: web.Request) -> web.Response:
        conversation, body, seen = await self._check(request)
        assert conversation is not None
        if not isinstance(body, dict) or "assignee_id" not in body:
            seen.status = 200
            return await self.answer(json_response(200, None))
        assignee = body["assignee_id"]
        if assignee in self.agents:
            conversation.assignee_id = assignee
            seen.status = 200
            agent = {
                "id": assignee,
                "account_id": self.account_id,
                "availability_status": "online",
                "name": self.agents[assignee],
                "role": "agent",
            }
            return await self.answer(json_response(200, agent))
        conversation.assignee_id = None  # Chatwoot assigns what its look-up found: nobody
        seen.status = 200
        return await self.answer(json_response(200, None))

    async def toggle_status(self, request: web.Request) -> web.Response:
        conversation, body, seen = await self._check(request)
        assert conversation is not None
        status = body.get("status") if isinstance(body, dict) else None
        if status not in STATUSES:
            raise _reply(seen, 422, {"error": f"'{status}' is not a valid status"})
        conversation.status = status
        seen.status = 200
        payload = {
            "success": True,
            "conversation_id": int(request.match_info["conversation_id"]),
            "current_status": status,
        }
        return await self.answer(json_response(200, {"meta": {}, "payload": payload}))

    async def post_message(self, request: web.Request) -> web.Response:
        conversation, body, seen = await self._check(request)
        assert conversation is not None
        if not isinstance(body, dict) or not isinstance(body.get("content"), str):
            raise _reply(seen, 422, {"error": "content is required"})
        kind = body.get("message_type", "outgoing")
        if kind not in MESSAGE_TYPES:
            raise _reply(seen, 422, {"error": f"'{kind}' is not a valid message_type"})
        message = {
            "id": next(self._ids),
            "content": body["content"],
            "conversation_id": int(request.match_info["conversation_id"]),
            "message_type": MESSAGE_TYPES[kind],
            "content_type": "text",
            "content_attributes": body.get("content_attributes") or {},
            "created_at": int(time.time()),
            "private": bool(body.get("private", False)),
        }
        conversation.messages.append(message)
        seen.status = 200
        return await self.answer(json_response(200, message))

    async def list_messages(self, request: web.Request) -> web.Response:
        conversation, _, seen = await self._check(request)
        assert conversation is not None
        seen.status = 200
        return json_response(200, {"meta": {"contact": {}}, "payload": conversation.messages})


def _reply(seen: Seen, status: int, payload: Any) -> web.HTTPException:
    seen.status = status
    return error(status, payload)
