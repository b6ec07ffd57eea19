"""The agent desktop (``/desk``) and the supervisor wallboard (``/wall``), served by the daemon.

Both pages are static ES modules (``router/daemon/static/``) that open one WebSocket each:

- ``/v1/desk/ws`` for agents. The first message is ``{"op": "auth", "token": T}`` with the
  agent's own token (role ``agent``); the principal's ``agent_id`` is the only agent the
  connection acts as and hears about. Then the page speaks the agent contract of MQTT desktops:
  it sends the ``op`` commands of :mod:`router.messages` (``login``, ``state``, ``accept``,
  ``reject``, ``complete``, ``logout``), which are journaled with
  ``Intake.accept_agent_command(principal.agent_id, body)`` (an ``agent_id`` in the payload is
  ignored), and it receives what ``{prefix}/agents/{id}/offers`` carries (``offer``, ``cancel``,
  ``refused``) and the ``{prefix}/events/...`` events about its own work (``agent.state`` of
  itself, ``contact.*`` whose ``agent_id`` is itself), in the same JSON shapes. On connect it
  gets ``hello`` (its name, the routing file's away reasons and dispositions, the server's
  clock, the sources it can answer) and ``snapshot`` (its state, offers and held contacts, from
  the engine), so a reload or reconnect never hides work; ``transcript`` messages carry a
  contact's conversation. With replies on (:meth:`DeskService.attach`), an agent's reply joins
  its contact's transcript as the agent's message, and ``outbound`` messages carry the outbox's
  status records of the agent's contacts (from ``Outbound.watchers``). The page sends replies
  to ``POST /v1/contacts/{id}/messages`` with the agent's own token.
- ``/v1/wall/ws`` for supervisors (role ``supervisor`` or ``admin``): ``board`` messages (see
  :mod:`router.daemon.wall`) pushed when something changed, at most every
  ``PUSH_INTERVAL`` seconds, and at least every second; ``{"op": "release", "contact_id": C}``
  journals a :class:`~router.messages.ReleaseContact` admin command.

The filtering is done here, on the server, per authenticated connection; the page never sees
another agent's offers. Each connection has a bounded outgoing queue: a client too slow to read
it is disconnected (it reconnects and gets a fresh snapshot) rather than slowing routing down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
import structlog
from aiohttp import WSMsgType, web

from router.daemon import auth, openapi
from router.daemon.auth import Principal
from router.daemon.config import Settings
from router.daemon.intake import Intake
from router.daemon.journal import JournalUnavailable
from router.daemon.metrics import Metrics
from router.daemon.mqtt import wire_body
from router.daemon.payloads import PayloadStore
from router.daemon.sinks import CommandSink
from router.daemon.transcripts import TranscriptStore, reply_message, to_builtins
from router.daemon.wall import WallBoard
from router.events import (
    ContactAbandoned,
    ContactAnsweredByCrowd,
    ContactCompleted,
    ContactRejected,
    ContactUpdated,
    agent_of,
)
from router.messages import Command, EventCmd, OfferCmd, ReleaseContact

if TYPE_CHECKING:
    from router.daemon.http import AppState
    from router.daemon.outbox import OutboundMessage
    from router.daemon.replies import Outbound
    from router.engine import Engine

log = structlog.get_logger("stellwerk.desk")

AUTH_TIMEOUT = 10.0
PUSH_INTERVAL = 0.25
OUTBOX_LIMIT = 1000
MAX_MESSAGE = 64 * 1024
#: commands per connection per second, sustained (a burst of this many is allowed).
COMMAND_RATE = 20.0
#: contact events an agent hears about when they concern its own work.
_FINISHED = (ContactCompleted, ContactAbandoned, ContactAnsweredByCrowd, ContactRejected)
_STATIC = {
    "desk.html": "text/html",
    "wall.html": "text/html",
    "desk.js": "text/javascript",
    "wall.js": "text/javascript",
    "common.js": "text/javascript",
    "stellwerk.css": "text/css",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_json = msgspec.json.Encoder()


def wire(cmd: Command) -> dict[str, Any]:
    """A command in the JSON shape MQTT desktops get, as plain builtins."""
    body: dict[str, Any] = msgspec.to_builtins(wire_body(cmd))
    return body


class _Client:
    """One open WebSocket: who it is and its bounded outbox (a writer task drains it)."""

    def __init__(self, ws: web.WebSocketResponse, principal: Principal) -> None:
        self.ws = ws
        self.principal = principal
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUTBOX_LIMIT)
        self.tokens = COMMAND_RATE
        self.refilled = time.monotonic()
        #: the close code the writer uses when it reaches the end of the outbox.
        self.close_code = 1008

    def refuse(self, reason: str, detail: str, **extra: Any) -> bool:
        """Queue a ``refused`` message, in the shape MQTT desktops get it."""
        return self.send({"type": "refused", "reason": reason, "detail": detail, **extra})

    def journal_unavailable(self, ref: Any) -> bool:
        """Queue the ``error`` for a command the journal did not take (Redis is down)."""
        return self.send(
            {
                "type": "error",
                "error": "journal_unavailable",
                "detail": "not taken; retry",
                "ref": ref,
            }
        )

    def send(self, payload: dict[str, Any]) -> bool:
        """Queue a message; False (and the connection is closed) when the client is too slow."""
        try:
            self.outbox.put_nowait(payload)
            return True
        except asyncio.QueueFull:
            log.warning("desk.client_too_slow", principal=self.principal.name)
            with contextlib.suppress(asyncio.QueueFull):
                self.outbox.get_nowait()
                self.outbox.put_nowait(None)  # tells the writer to close
            return False

    def allow(self) -> bool:
        """Token bucket: may the client send one more command now?"""
        now = time.monotonic()
        self.tokens = min(COMMAND_RATE, self.tokens + (now - self.refilled) * COMMAND_RATE)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class DeskService:
    """The desk's and the wallboard's server side; its :attr:`sinks` go to ``Daemon.sinks``."""

    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        redis: aioredis.Redis,
        metrics: Metrics,
        state: AppState,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.metrics = metrics
        self.state = state
        self.transcripts = TranscriptStore(redis, settings.key_prefix, settings.desk)
        self.payloads = PayloadStore(redis, settings.key_prefix)
        self.wall = WallBoard(redis, settings.key_prefix, settings.desk, metrics)
        self.engine: Engine | None = None
        self.agents: dict[str, set[_Client]] = {}
        self.walls: set[_Client] = set()
        self._finished: list[str] = []
        intake.observers.append(self.transcripts.record)
        self.sinks: list[CommandSink] = [self, self.wall]
        self.outbound: Outbound | None = None

    def attach(self, outbound: Outbound) -> None:
        """Replies are on: the desk shows its agents' replies in their threads and how each
        fares (``outbound`` messages with the outbox's status records, live)."""
        self.outbound = outbound
        outbound.watchers.append(self._outbound_changed)
        outbound.replied.append(self._replied)

    async def _outbound_changed(self, record: dict[str, Any]) -> None:
        agent_id = record.get("agent_id")
        for client in list(self.agents.get(agent_id, ())) if isinstance(agent_id, str) else ():
            client.send({"type": "outbound", **record})

    async def _replied(self, msg: OutboundMessage, contact: dict[str, Any]) -> None:
        # The agent's reply joins the conversation's transcript, so the thread shows it (after a
        # reload too) beside what the customer wrote; then the agent's desks get the thread.
        engine = self.engine
        agent = (
            next((a for a in engine.table.file.agents if a.id == msg.agent_id), None)
            if engine is not None
            else None
        )
        source = msg.contact_id.partition(":")[0]
        message = reply_message(
            msg.key,
            msg.body,
            msg.created_at,
            str(contact.get("channel") or ""),
            source,
            (agent.name if agent is not None else None) or msg.agent_id or "",
            self.settings.desk.transcript_chars,
        )
        await self.transcripts.add(msg.contact_id, message)
        for client in list(self.agents.get(msg.agent_id or "", ())):
            client.send({"type": "_transcript", "contact_id": msg.contact_id})

    # ---- the engine's side (CommandSink) -------------------------------------------------------

    def _routing(self) -> Engine | None:
        """The engine, while this daemon routes (None on a standby)."""
        if self.engine is not None and self.state.view is self.engine:
            return self.engine
        return None

    async def restored(self, engine: Engine) -> None:
        """A lease tenure began: every open desk gets a fresh snapshot from this engine."""
        self.engine = engine
        for clients in self.agents.values():
            for client in clients:
                self._send_snapshot(client, engine)

    async def submit(self, cmds: Sequence[Command]) -> None:
        """Forward each agent's own offers and events to its open desks (never anyone else's)."""
        finished: list[str] = []
        for cmd in cmds:
            if isinstance(cmd, EventCmd):
                if isinstance(cmd.event, _FINISHED):
                    finished.append(cmd.event.contact_id)
                agent_id = agent_of(cmd.event)
            else:
                agent_id = cmd.agent_id
            if not isinstance(agent_id, str):
                continue
            clients = self.agents.get(agent_id)
            if not clients:
                continue
            payload = wire(cmd)
            for client in list(clients):
                client.send(payload)
                transcript = (
                    cmd.contact_id
                    if isinstance(cmd, OfferCmd)
                    else cmd.event.contact_id
                    if isinstance(cmd, EventCmd) and isinstance(cmd.event, ContactUpdated)
                    else None
                )
                if transcript is not None:
                    # The writer reads the transcript from Redis when it gets there.
                    client.send({"type": "_transcript", "contact_id": transcript})
        # Their TTLs are set by run(), off the routing path.
        self._finished.extend(finished)

    # ---- background work ----------------------------------------------------------------------

    async def run(self) -> None:
        """Push the board to open wallboards, keep the stuck gauge fresh, close every connection
        when this daemon stops routing (they reconnect to the one that routes), and save the
        wallboard's counters and the transcripts' TTLs to Redis, each in its own loop (a slow
        Redis holds up saving, never the pushes)."""
        await asyncio.gather(self._pusher(), self._saver())

    async def _pusher(self) -> None:
        last_push = 0.0
        was_routing = False
        while True:
            await asyncio.sleep(PUSH_INTERVAL)
            last_push, was_routing = self._push(last_push, was_routing)

    async def _saver(self) -> None:
        try:
            while True:
                await asyncio.sleep(PUSH_INTERVAL)
                await self._save()
        finally:
            # Shutting down: what is counted but not saved yet goes to Redis if it can.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._save()), 2.0)

    async def _save(self) -> None:
        await self.wall.flush()
        if self._finished:
            finished, self._finished = self._finished, []
            await self.transcripts.finished(finished)

    def _push(self, last_push: float, was_routing: bool) -> tuple[float, bool]:
        """One round of the pusher; returns (when the board last went out, routing now)."""
        engine = self._routing()
        if engine is None:
            if was_routing:
                self._close_all("this daemon no longer routes")
            return last_push, False
        now = time.time()
        due = self.wall.dirty or now - last_push >= 1.0
        if self.walls and due:
            board = self.wall.board(engine, now)
            refusals, self.wall.refusals = self.wall.refusals, []
            for client in list(self.walls):
                client.send(board)
                for refusal in refusals:
                    client.send(refusal)
            self.wall.dirty = False
            return now, True
        if now - last_push >= 1.0:
            # Nobody watching: the stuck gauge (and its alert) stays fresh all the same.
            self.wall.export_stuck(engine, now)
            self.wall.refusals.clear()
            return now, True
        return last_push, True

    def _close_all(self, why: str) -> None:
        for client in [*self.walls, *(c for cs in self.agents.values() for c in cs)]:
            client.send({"type": "error", "error": "not_routing", "detail": why})
            client.close_code = 1012  # service restart: the page reconnects
            with contextlib.suppress(asyncio.QueueFull):
                client.outbox.put_nowait(None)

    # ---- HTTP ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Register the pages, their files and the two WebSockets (each declares its access)."""
        auth.add_routes(
            app,
            [
                # The pages and their scripts hold no data: the WebSockets authenticate.
                (web.get("/desk", _page("desk.html")), "public"),
                (web.get("/wall", _page("wall.html")), "public"),
                (web.get("/static/{name}", _static), "public"),
                (web.get("/v1/desk/ws", self.desk_ws), "self"),
                (web.get("/v1/wall/ws", self.wall_ws), "self"),
            ],
        )
        app.on_shutdown.append(self._going_away)
        openapi.document_paths(
            app,
            {
                "/v1/desk/ws": _ws_doc(
                    "The agent desktop's WebSocket (docs/desk.md): the first message is "
                    '{"op": "auth", "token": ...} with an agent token; then the agent contract.',
                    "agent (token in the first message)",
                ),
                "/v1/wall/ws": _ws_doc(
                    "The wallboard's WebSocket (docs/desk.md): the first message is "
                    '{"op": "auth", "token": ...} with a supervisor token; boards are pushed.',
                    "supervisor (token in the first message)",
                ),
            },
        )

    async def _going_away(self, app: web.Application) -> None:
        # The server stops: close the sockets now (1001, the pages reconnect) rather than have
        # the shutdown wait for them.
        clients = [*self.walls, *(c for cs in self.agents.values() for c in cs)]
        for client in clients:
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await client.ws.close(code=1001, message=b"the daemon is stopping")

    async def _open(
        self, request: web.Request, allowed: tuple[auth.Role, ...]
    ) -> tuple[web.WebSocketResponse, Principal | None]:
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_MESSAGE)
        await ws.prepare(request)
        try:
            first = await ws.receive(timeout=AUTH_TIMEOUT)
        except TimeoutError:
            auth.audit_refusal(request, "no_token")
            await _refuse(ws, "unauthorized", 'send {"op": "auth", "token": ...} first')
            return ws, None
        token = None
        if first.type == WSMsgType.TEXT:
            with contextlib.suppress(ValueError, AttributeError):
                body = json.loads(first.data)
                if body.get("op") == "auth" and isinstance(body.get("token"), str):
                    token = body["token"]
        authenticator = request.app[auth.AUTHENTICATOR_KEY]
        principal = authenticator.authenticate(token)
        if principal is None:
            auth.audit_refusal(request, "no_token" if token is None else "bad_token")
            await _refuse(ws, "unauthorized", "a valid token is needed")
            return ws, None
        if not any(principal.may(role) for role in allowed):
            auth.audit_refusal(request, "wrong_role", principal, needs=list(allowed))
            await _refuse(ws, "forbidden", f"this needs role {' or '.join(allowed)}")
            return ws, None
        return ws, principal

    async def desk_ws(self, request: web.Request) -> web.StreamResponse:
        """The agent's WebSocket (see the module docstring)."""
        ws, principal = await self._open(request, ("agent",))
        if principal is None or principal.agent_id is None:
            return ws
        agent_id = principal.agent_id
        engine = self._routing()
        if engine is None:
            await _refuse(ws, "not_routing", "this daemon does not route now; retrying")
            return ws
        client = _Client(ws, principal)
        file = engine.table.file
        agent_cfg = next((a for a in file.agents if a.id == agent_id), None)
        if agent_cfg is None:
            await _refuse(ws, "unknown_agent", f"no agent {agent_id!r} in the routing file")
            return ws
        client.send(
            {
                "type": "hello",
                "agent_id": agent_id,
                "name": agent_cfg.name,
                "away_reasons": dict(file.away_reasons),
                "dispositions": dict(file.dispositions),
                # the contact sources the agent can answer from the desk (none: no reply box)
                "replies": self.outbound.answerable() if self.outbound is not None else [],
                "server_time": time.time(),
            }
        )
        # Registered and snapshotted in one step (no await between): whatever the router
        # submits from now on comes after the snapshot in this client's outbox.
        self.agents.setdefault(agent_id, set()).add(client)
        self._send_snapshot(client, engine)
        log.info("desk.connected", agent_id=agent_id, principal=principal.name)
        writer = asyncio.create_task(self._writer(client), name=f"desk-writer-{agent_id}")
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                await self._desk_command(client, agent_id, msg.data)
        finally:
            self.agents.get(agent_id, set()).discard(client)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            log.info("desk.disconnected", agent_id=agent_id)
        return ws

    def _send_snapshot(self, client: _Client, engine: Engine) -> None:
        agent_id = client.principal.agent_id
        work = engine.agent_work(agent_id or "")
        if work is None:
            return
        offers = [wire(o) for o in work["offers"]]
        contacts = msgspec.to_builtins(work["contacts"])
        client.send(
            {
                "type": "snapshot",
                "agent_id": agent_id,
                "state": work["state"],
                "reason": work["reason"],
                "offers": offers,
                "contacts": contacts,
                "server_time": time.time(),
            }
        )
        for item in [*offers, *contacts]:
            client.send({"type": "_transcript", "contact_id": item["contact_id"]})

    def _holds(self, agent_id: str, contact_id: str) -> bool:
        engine = self._routing()
        if engine is None:
            return False
        info = engine.contact_info(contact_id)
        return (
            info is not None
            and info.get("agent_id") == agent_id
            and info.get("state") in ("offered", "assigned", "wrap_up")
        )

    async def _desk_command(self, client: _Client, agent_id: str, data: str) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            client.refuse("not_json", "send JSON")
            return
        if not isinstance(body, dict):
            client.refuse("bad_command", "send an object")
            return
        op, ref = body.get("op"), body.get("ref")
        if not client.allow():
            client.refuse("rate_limited", "too many commands", ref=ref)
            return
        if op == "transcript":
            contact_id = str(body.get("contact_id", ""))
            if self._holds(agent_id, contact_id):
                client.send({"type": "_transcript", "contact_id": contact_id})
            else:
                client.refuse("not_your_contact", contact_id, ref=ref)
            return
        try:
            # The agent id is the authenticated one; intake ignores any in the payload.
            result = await self.intake.accept_agent_command(agent_id, data.encode())
        except JournalUnavailable:
            client.journal_unavailable(ref)
            return
        if result.reason is not None:
            client.refuse(result.reason, result.detail[:300], ref=ref)
            return
        client.send({"type": "ack", "ref": ref, "op": op})

    async def wall_ws(self, request: web.Request) -> web.StreamResponse:
        """The wallboard's WebSocket (see the module docstring)."""
        ws, principal = await self._open(request, ("supervisor",))
        if principal is None:
            return ws
        engine = self._routing()
        if engine is None:
            await _refuse(ws, "not_routing", "this daemon does not route now; retrying")
            return ws
        client = _Client(ws, principal)
        client.send({"type": "hello", "principal": principal.name, "server_time": time.time()})
        client.send(self.wall.board(engine, time.time()))
        self.walls.add(client)
        log.info("wall.connected", principal=principal.name)
        writer = asyncio.create_task(self._writer(client), name="wall-writer")
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._wall_command(request, client, msg.data)
        finally:
            self.walls.discard(client)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    async def _wall_command(self, request: web.Request, client: _Client, data: str) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("op") != "release":
            client.refuse("bad_command", 'only {"op": "release", "contact_id": ...}')
            return
        contact_id = body.get("contact_id")
        ref = body.get("ref")
        if not isinstance(contact_id, str) or not contact_id:
            client.refuse("bad_command", "contact_id missing", ref=ref)
            return
        if not client.allow():
            client.refuse("rate_limited", "too many commands", ref=ref)
            return
        cmd = ReleaseContact(contact_id=contact_id, by=client.principal.name)
        try:
            entry_id = await self.intake.accept_admin(cmd)
        except JournalUnavailable:
            client.journal_unavailable(ref)
            return
        log.info(
            "admin.change",
            op="release_contact",
            journal_id=entry_id,
            contact_id=contact_id,
            principal=client.principal.name,
            role=client.principal.role,
            remote=request.remote,
        )
        self.metrics.observe_admin_change("release_contact")
        client.send({"type": "ack", "ref": ref, "op": "release", "contact_id": contact_id})

    async def _writer(self, client: _Client) -> None:
        ws = client.ws
        try:
            while True:
                item = await client.outbox.get()
                if item is None:
                    await ws.close(code=client.close_code)
                    return
                if item.get("type") == "snapshot":
                    await self._with_events(item)
                elif item.get("type") == "_transcript":
                    contact_id = str(item["contact_id"])
                    messages = await self.transcripts.read(contact_id)
                    item = {
                        "type": "transcript",
                        "contact_id": contact_id,
                        "messages": to_builtins(messages),
                    }
                await ws.send_str(_json.encode(item).decode())
        except (ConnectionResetError, RuntimeError):
            return  # the client went away; its handler cleans up

    async def _with_events(self, snapshot: dict[str, Any]) -> None:
        """Put the stored events into a snapshot's offers and contacts (the engine gives only
        their stubs); with Redis away they keep the stubs (id, channel, source)."""
        rows = [*snapshot["offers"], *snapshot["contacts"]]
        if not rows:
            return
        try:
            found = await self.payloads.events([str(r["contact_id"]) for r in rows])
        except JournalUnavailable as exc:
            log.warning("desk.snapshot_events_unavailable", error=str(exc))
            return
        for row in rows:
            event = found.get(str(row["contact_id"]))
            if event is not None:
                row["contact"] = msgspec.to_builtins(event)


async def _refuse(ws: web.WebSocketResponse, error: str, detail: str) -> None:
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await ws.send_str(json.dumps({"type": "error", "error": error, "detail": detail}))
        await ws.close(
            code=4401 if error == "unauthorized" else 4403 if error == "forbidden" else 1013
        )


def _ws_doc(description: str, access: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": description.split(" (")[0],
            "description": description,
            "x-stellwerk-access": access,
            "responses": {"101": {"description": "switching to the WebSocket protocol"}},
        }
    }


def _file(name: str) -> bytes:
    return resources.files("router.daemon").joinpath("static", name).read_bytes()


def _page(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return _static_response(name)

    return handler


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound(text=f"no file {name!r}")
    return _static_response(name)


def _static_response(name: str) -> web.Response:
    response = web.Response(body=_file(name), content_type=_STATIC[name])
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


def register(app: web.Application, state: AppState) -> None:
    """Add the desk's routes when the daemon built a :class:`DeskService` (``state.desk``)."""
    service = getattr(state, "desk", None)
    if isinstance(service, DeskService):
        service.add_routes(app)
