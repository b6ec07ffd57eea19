"""A Discourse peer: ``POST /posts.json`` as an API user, with topics and their posts.

Our description, from Discourse's API documentation (docs.discourse.org, "Creates a new topic,
a new post, or a private message"):

- Headers ``Api-Key`` and ``Api-Username``; a wrong pair is 403 ``{"errors": [...],
  "error_type": "invalid_access"}``.
- Body ``{"topic_id": N, "raw": "..."}`` (JSON or form); ``raw`` shorter than the site's
  ``min_post_length`` (20) is 422 ``{"action": "create_post", "errors": ["Body is too short
  ..."]}``, the same ``raw`` again from the same user within ``unique_posts_mins`` is 422
  "Body is too similar to what you recently posted". An unknown topic is 404.
- 200 with the post: ``id``, ``topic_id``, ``post_number``, ``username``, ``raw``, ``staff``...
- Then Discourse sends its ``post_created`` webhook; the peer calls ``on_post`` with the post.
- With the discourse-assign plugin: ``PUT /assign/assign`` ``{"target_id": topic,
  "target_type": "Topic", "username": ...}`` by a staff API user; an unknown user or topic is
  404, the topic already assigned to that user is 400 ``{"error": "@x is already assigned to
  this topic"}``; success ``{"success": "OK"}``.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.peers.base import Peer, Seen, error, json_response, read_json

MIN_POST_LENGTH = 20


@dataclass
class DiscoursePeer(Peer):
    api_key: str = "dc-key"
    #: user name -> whether staff (admin or moderator)
    users: dict[str, bool] = field(
        default_factory=lambda: {"support_team": True, "kim": False, "mod_user": False}
    )
    topics: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    on_post: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    #: topic id -> the user name it is assigned to (discourse-assign)
    assigned: dict[int, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(900001))

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/posts.json", self.create_post),
                web.put("/assign/assign.json", self.assign),
            ]
        )
        return app

    def _staff_caller(self, request: web.Request, seen: Seen) -> str:
        user = request.headers.get("Api-Username")
        if request.headers.get("Api-Key") != self.api_key or user not in self.users:
            seen.status = 403
            raise error(
                403,
                {
                    "errors": ["You are not permitted to view the requested resource. "
                               "The API username or key is invalid."],
                    "error_type": "invalid_access",
                },
            )  # fmt: skip
        return user

    async def assign(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        seen = Seen(request.method, request.path, dict(request.headers), body)
        self.requests.append(seen)
        self.received.set()
        caller = self._staff_caller(request, seen)
        if not self.users[caller]:
            seen.status = 403
            raise error(403, {"errors": ["You are not permitted"], "error_type": "invalid_access"})
        body = body if isinstance(body, dict) else {}
        for name in ("target_id", "target_type"):
            if name not in body:
                seen.status = 400
                raise error(400, {"errors": [f"param is missing or the value is empty: {name}"]})
        username = body.get("username")
        if body["target_type"] != "Topic" or body["target_id"] not in self.topics:
            seen.status = 404
            raise error(404, {"errors": ["The requested URL or resource could not be found."]})
        if username not in self.users:
            seen.status = 404
            raise error(404, {"errors": ["The requested URL or resource could not be found."]})
        if self.assigned.get(body["target_id"]) == username:
            seen.status = 400
            raise error(400, {"error": f"@{username} is already assigned to this topic"})
        self.assigned[body["target_id"]] = username
        seen.status = 200
        return await self.answer(json_response(200, {"success": "OK"}))

    async def create_post(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        seen = Seen(request.method, request.path, dict(request.headers), body)
        self.requests.append(seen)
        self.received.set()
        user = self._staff_caller(request, seen)
        if not isinstance(body, dict) or not isinstance(body.get("raw"), str):
            seen.status = 422
            raise error(422, {"action": "create_post", "errors": ["Body can't be blank"]})
        raw = body["raw"]
        topic = self.topics.get(body.get("topic_id"))  # type: ignore[arg-type]
        if topic is None:
            seen.status = 404
            raise error(
                404,
                {"errors": ["The requested URL or resource could not be found."],
                 "error_type": "not_found"},
            )  # fmt: skip
        if len(raw.strip()) < MIN_POST_LENGTH:
            seen.status = 422
            raise error(
                422,
                {"action": "create_post",
                 "errors": [f"Body is too short (minimum is {MIN_POST_LENGTH} characters)"]},
            )  # fmt: skip
        if any(p["username"] == user and p["raw"] == raw for p in topic):
            seen.status = 422
            raise error(
                422,
                {"action": "create_post",
                 "errors": ["Body is too similar to what you recently posted"]},
            )  # fmt: skip
        post = {
            "id": next(self._ids),
            "topic_id": body["topic_id"],
            "post_number": len(topic) + 1,
            "username": user,
            "raw": raw,
            "cooked": f"<p>{raw}</p>",
            "staff": self.users[user],
            "admin": self.users[user],
            "moderator": False,
            "post_type": 1,
        }
        topic.append(post)
        seen.status = 200
        response = await self.answer(json_response(200, post))
        if self.on_post is not None:
            await self.on_post(post)
        return response
