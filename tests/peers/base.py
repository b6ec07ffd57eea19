"""What every HTTP peer shares: an aiohttp server on a free loopback port, a request log."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    """One request as the peer received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class Peer:
    """Base of the HTTP peers: ``requests`` logs everything, ``hold`` stalls answers."""

    requests: list[Seen] = field(default_factory=list)
    #: while set to an Event that is not set, answers to requests are held back (the platform
    #: got the request and did its work, but the caller has no answer yet).
    hold: asyncio.Event | None = None
    received: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def app(self) -> web.Application:  # pragma: no cover - overridden
        raise NotImplementedError

    async def answer(self, response: web.Response) -> web.Response:
        """Return ``response``, after ``hold`` is released if one is set."""
        if self.hold is not None:
            await self.hold.wait()
        return response


def json_response(status: int, payload: Any) -> web.Response:
    return web.json_response(payload, status=status)


def error(status: int, payload: Any) -> web.HTTPException:
    """An aiohttp HTTP error carrying the platform's JSON error body."""
    classes: dict[int, type[web.HTTPException]] = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        403: web.HTTPForbidden,
        404: web.HTTPNotFound,
        415: web.HTTPUnsupportedMediaType,
        422: web.HTTPUnprocessableEntity,
        429: web.HTTPTooManyRequests,
    }
    return classes[status](text=json.dumps(payload), content_type="application/json")


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or raise the 400 every one of these platforms answers."""
    raw = await request.read()
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="expected application/json")
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise web.HTTPBadRequest(text="body is not JSON") from None


@contextlib.asynccontextmanager
async def serve(peer: Peer) -> AsyncIterator[Peer]:
    """Run ``peer`` on 127.0.0.1 on a free port; ``peer.url`` is its base URL."""
    runner = web.AppRunner(peer.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    peer.url = f"http://127.0.0.1:{port}"
    try:
        yield peer
    finally:
        if peer.hold is not None:
            peer.hold.set()
        await runner.cleanup()
