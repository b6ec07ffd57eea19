"""A Rocket.Chat omnichannel peer: forwarding, closing and writing into livechat rooms.

Our description of what Stellwerk relies on (checked against Rocket.Chat's OpenAPI and the
server's validators by ``tests/peers/test_descriptions.py`` when ``../shared/reference`` is
there):

- Every call carries ``X-Auth-Token`` and ``X-User-Id`` of one user; otherwise 401
  ``{"status": "error", "message": "You must be logged in to do this."}``.
- Bodies are validated with ``additionalProperties: false``: an unknown key, or a missing
  required one, is 400 ``{"success": false, "error": "... [invalid-params]", "errorType":
  "invalid-params"}``.
- ``POST /api/v1/livechat/room.forward`` ``{"roomId", "userId"?, "departmentId"?, "comment"?,
  "clientAction"?}`` (note ``roomId``): ``error-invalid-room`` for an unknown room, a closed one
  is ``This_conversation_is_already_closed``; an agent it cannot hand to is ``{"success":
  false}``. Success ``{"success": true}``; the room is then served by that agent.
- ``POST /api/v1/livechat/room.closeByUser`` ``{"rid", "comment"?, "tags"?, ...}`` (note
  ``rid``): ``error-invalid-room``, ``error-room-already-closed``.
- ``POST /api/v1/chat.sendMessage`` ``{"message": {"rid", "msg", "_id"?}}``: a message whose
  ``_id`` is already stored is not stored again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.peers.base import Peer, Seen, error, json_response, read_json

FORWARD_KEYS = {"roomId", "userId", "departmentId", "comment", "clientAction"}
CLOSE_KEYS = {"rid", "comment", "tags", "generateTranscriptPdf", "transcriptEmail", "forceClose"}
DESCRIPTION: dict[str, Any] = {
    "auth_headers": ["X-Auth-Token", "X-User-Id"],
    "operations": {
        "/api/v1/livechat/room.forward": {"required": ["roomId"], "properties": FORWARD_KEYS},
        "/api/v1/livechat/room.closeByUser": {"required": ["rid"], "properties": CLOSE_KEYS},
        "/api/v1/chat.sendMessage": {"required": ["message"], "message_required": ["rid"]},
    },
}


@dataclass
class Room:
    open: bool = True
    served_by: str | None = None
    closed_by: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RocketchatPeer(Peer):
    user_id: str = "stellwerkBotId1"
    token: str = "rc-token"
    agents: dict[str, str] = field(
        default_factory=lambda: {"annaRcId00000001": "anna", "bertRcId00000001": "bert"}
    )
    rooms: dict[str, Room] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/api/v1/livechat/room.forward", self.forward),
                web.post("/api/v1/livechat/room.closeByUser", self.close),
                web.post("/api/v1/chat.sendMessage", self.send_message),
            ]
        )
        return app

    async def _check(self, request: web.Request, required: list[str], keys: set[str] | None) -> Any:
        body = await read_json(request)
        seen = Seen(request.method, request.path, dict(request.headers), body)
        self.requests.append(seen)
        self.received.set()
        if (
            request.headers.get("X-Auth-Token") != self.token
            or request.headers.get("X-User-Id") != self.user_id
        ):
            seen.status = 401
            raise error(401, {"status": "error", "message": "You must be logged in to do this."})
        if not isinstance(body, dict):
            body = {}
        for name in required:
            if name not in body:
                raise _invalid(seen, f"must have required property '{name}'")
        if keys is not None:
            for name in body:
                if name not in keys:
                    raise _invalid(seen, "must NOT have additional properties")
        return body, seen

    async def forward(self, request: web.Request) -> web.Response:
        body, seen = await self._check(request, ["roomId"], FORWARD_KEYS)
        room = self.rooms.get(body["roomId"])
        if room is None:
            raise _failure(seen, "error-invalid-room")
        if not room.open:
            raise _failure(seen, "This_conversation_is_already_closed")
        user = body.get("userId")
        if user not in self.agents:
            raise _failure(seen, None)  # Livechat.transfer returned false
        room.served_by = user
        seen.status = 200
        return await self.answer(json_response(200, {"success": True}))

    async def close(self, request: web.Request) -> web.Response:
        body, seen = await self._check(request, ["rid"], CLOSE_KEYS)
        room = self.rooms.get(body["rid"])
        if room is None:
            raise _failure(seen, "error-invalid-room")
        if not room.open:
            raise _failure(seen, "error-room-already-closed")
        room.open = False
        room.closed_by = self.user_id
        seen.status = 200
        return await self.answer(json_response(200, {"success": True}))

    async def send_message(self, request: web.Request) -> web.Response:
        body, seen = await self._check(request, [], None)
        message = body.get("message")
        if not isinstance(message, dict):
            raise _failure(seen, 'The "message" parameter must be provided. [error-invalid-params]')
        if "rid" not in message:
            raise _failure(seen, "The 'rid' property on the message object is missing.")
        room = self.rooms.get(message["rid"])
        if room is None:
            raise _failure(seen, "error-invalid-room")
        message_id = message.get("_id") or f"gen{len(room.messages):014d}"
        stored = next((m for m in room.messages if m["_id"] == message_id), None)
        if stored is None:
            stored = {
                "_id": message_id,
                "rid": message["rid"],
                "msg": message.get("msg", ""),
                "u": {"_id": self.user_id, "username": "stellwerk"},
            }
            room.messages.append(stored)
        seen.status = 200
        return await self.answer(json_response(200, {"message": stored, "success": True}))


def _invalid(seen: Seen, text: str) -> web.HTTPException:
    seen.status = 400
    return error(
        400, {"success": False, "error": f"{text} [invalid-params]", "errorType": "invalid-params"}
    )


def _failure(seen: Seen, text: str | None) -> web.HTTPException:
    seen.status = 400
    return error(400, {"success": False} if text is None else {"success": False, "error": text})
