"""A Meta Graph API peer: WhatsApp Cloud API and Messenger Send API text replies.

Our description, from Meta's documentation (developers.facebook.com: "WhatsApp Cloud API:
Send messages", "Messenger Platform: Send API"):

- ``Authorization: Bearer <token>``; a bad token is 401 with ``{"error": {"message": ...,
  "type": "OAuthException", "code": 190}}``.
- ``POST /{version}/{phone_number_id}/messages`` ``{"messaging_product": "whatsapp",
  "recipient_type": "individual", "to": wa_id, "type": "text", "text": {"body": ...}}``:
  200 ``{"messaging_product": "whatsapp", "contacts": [{"input", "wa_id"}], "messages":
  [{"id": "wamid..."}]}``; an unknown phone number id is 400 code 100.
- ``POST /{version}/me/messages`` ``{"recipient": {"id": psid}, "messaging_type": "RESPONSE",
  "message": {"text": ...}}``: 200 ``{"recipient_id", "message_id"}``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.peers.base import Peer, Seen, error, json_response, read_json


@dataclass
class GraphPeer(Peer):
    token: str = "graph-token"
    phone_number_ids: set[str] = field(default_factory=lambda: {"106540352242922"})
    sent: list[dict[str, Any]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/{version}/me/messages", self.messenger),
                web.post("/{version}/{phone_number_id}/messages", self.whatsapp),
            ]
        )
        return app

    async def _check(self, request: web.Request) -> tuple[Any, Seen]:
        body = await read_json(request)
        seen = Seen(request.method, request.path, dict(request.headers), body)
        self.requests.append(seen)
        self.received.set()
        if not request.match_info["version"].startswith("v"):
            raise _graph(seen, 400, "Unknown path components", 2500)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise _graph(seen, 401, "Invalid OAuth access token - Cannot parse access token", 190)
        return body if isinstance(body, dict) else {}, seen

    async def whatsapp(self, request: web.Request) -> web.Response:
        body, seen = await self._check(request)
        number = request.match_info["phone_number_id"]
        if number not in self.phone_number_ids:
            raise _graph(seen, 400, f"Object with ID '{number}' does not exist", 100)
        text = body.get("text")
        if (
            body.get("messaging_product") != "whatsapp"
            or not body.get("to")
            or body.get("type", "text") != "text"
            or not isinstance(text, dict)
            or not isinstance(text.get("body"), str)
        ):
            raise _graph(seen, 400, "(#100) Invalid parameter", 100)
        message_id = f"wamid.{next(self._ids):08d}"
        self.sent.append({"product": "whatsapp", "to": body["to"], "text": text["body"]})
        seen.status = 200
        return await self.answer(
            json_response(
                200,
                {
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                    "messages": [{"id": message_id}],
                },
            )
        )

    async def messenger(self, request: web.Request) -> web.Response:
        body, seen = await self._check(request)
        recipient = body.get("recipient")
        message = body.get("message")
        if (
            not isinstance(recipient, dict)
            or not recipient.get("id")
            or not isinstance(message, dict)
            or body.get("messaging_type") not in ("RESPONSE", "UPDATE", "MESSAGE_TAG")
        ):
            raise _graph(seen, 400, "(#100) param recipient must be non-empty.", 100)
        message_id = f"m_{next(self._ids):08d}"
        self.sent.append({"product": "messenger", "to": recipient["id"], "text": message["text"]})
        seen.status = 200
        return await self.answer(
            json_response(200, {"recipient_id": recipient["id"], "message_id": message_id})
        )


def _graph(seen: Seen, status: int, message: str, code: int) -> web.HTTPException:
    seen.status = status
    kind = "OAuthException" if code == 190 else "GraphMethodException"
    return error(
        status, {"error": {"message": message, "type": kind, "code": code, "fbtrace_id": "Atr1"}}
    )
