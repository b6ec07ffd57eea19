"""A simulated Asterisk speaking ARI: REST, the events WebSocket and the outbound WebSocket.

This is a protocol peer for tests and the phone example, not a mock: it keeps real state
(channels, bridges, ringing agent legs that time out, hang-ups from either side), checks every
request against its own description of ARI (:data:`OPERATIONS`, written from the published
resource listings channels.json / bridges.json: method, path, required and known parameters,
and the error statuses Asterisk answers) and speaks the events WebSocket with the event shapes
of events.json. A request outside the description is answered as Asterisk would (404 unknown
resource, 405 wrong method, 400 missing or unknown parameter) and recorded in
:attr:`AriPeer.violations`, so a test can insist there were none.

Behaviour modelled (from Asterisk's own test suite, see the reference notes):

- a caller enters ``Stasis(app,args)``: ``StasisStart`` with ``args``;
- ``POST /channels?endpoint=..&app=..`` originates: the channel rings (``ChannelStateChange``
  ``Ringing``) and, when answered, enters the app (``StasisStart`` with ``appArgs`` split at
  commas); busy / declined / unreachable endpoints are destroyed with Q.850 causes 17 / 21 /
  20; an unanswered one is destroyed after ``timeout`` seconds with cause 19;
- an originated, not answered, channel is not in Stasis yet: it answers 409 to Stasis-only
  operations (``answer``, ``moh``, ``play``); a channel made with ``POST /channels/create`` is in
  Stasis at once (``StasisStart``) but not dialled (state ``Down``) and answers those 412
  (Asterisk's testsuite, ``channels/create/off-nominal``); adding a channel that is not in
  Stasis to a bridge answers 422; unknown channel 400 (in a bridge's list) or 404; a taken
  ``channelId`` / ``bridgeId`` 409;
- hanging up: ``ChannelLeftBridge`` (if bridged), ``StasisEnd`` (if in the app),
  ``ChannelDestroyed``; deleting a bridge lets its channels go (``ChannelLeftBridge``) and
  ``BridgeDestroyed``.

Test controls: :meth:`AriPeer.place_call`, :meth:`AriPeer.set_endpoint` (``ring`` — rings until
told, ``answer`` after a delay, ``busy``, ``decline``, ``unreachable``), :meth:`AriPeer.answer`,
:meth:`AriPeer.hangup`, :meth:`AriPeer.drop` / :meth:`AriPeer.restore` (the connection
to Asterisk goes away: sockets closed, requests cut off), and
:meth:`AriPeer.connect_outbound` (Asterisk dials out to the app server, REST over the socket).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

ASTERISK_ID = "00:11:22:33:44:55"


@dataclass(frozen=True)
class Op:
    """One ARI operation as Stellwerk relies on it."""

    method: str
    path: str
    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    errors: frozenset[int] = frozenset()
    body: bool = False  # takes a JSON body (``variables``)

    @property
    def known(self) -> frozenset[str]:
        return self.required | self.optional


def _op(
    method: str, path: str, req: str = "", opt: str = "", errors: str = "", body: bool = False
) -> Op:
    return Op(
        method,
        path,
        frozenset(req.split()),
        frozenset(opt.split()),
        frozenset(int(e) for e in errors.split()),
        body,
    )


_ORIGINATE = (
    "extension context priority label app appArgs callerId timeout channelId otherChannelId "
    "originator formats"
)
OPERATIONS: tuple[Op, ...] = (
    _op("GET", "/channels"),
    _op("POST", "/channels", "endpoint", _ORIGINATE, "400 409", body=True),
    # Not used by Stellwerk (it originates); here for the 412 of a channel not dialled yet.
    _op(
        "POST",
        "/channels/create",
        "endpoint app",
        "appArgs channelId otherChannelId originator formats",
        "409",
        body=True,
    ),
    _op("GET", "/channels/{channelId}", errors="404"),
    _op("DELETE", "/channels/{channelId}", opt="reason_code reason", errors="400 404"),
    _op("POST", "/channels/{channelId}/answer", errors="404 409 412"),
    _op("POST", "/channels/{channelId}/moh", opt="mohClass", errors="404 409 412"),
    _op("DELETE", "/channels/{channelId}/moh", errors="404 409 412"),
    _op(
        "POST",
        "/channels/{channelId}/play",
        "media",
        "lang offsetms skipms playbackId",
        "404 409 412",
    ),
    _op("GET", "/bridges"),
    _op("POST", "/bridges", opt="type bridgeId name", errors="409", body=True),
    _op("POST", "/bridges/{bridgeId}", opt="type name", errors="409", body=True),
    _op("GET", "/bridges/{bridgeId}", errors="404"),
    _op("DELETE", "/bridges/{bridgeId}", errors="404"),
    _op(
        "POST",
        "/bridges/{bridgeId}/addChannel",
        "channel",
        "role absorbDTMF mute inhibitConnectedLineUpdates",
        "400 404 409 422",
    ),
    _op("POST", "/bridges/{bridgeId}/removeChannel", "channel", errors="400 404 409 422"),
    _op("POST", "/bridges/{bridgeId}/moh", opt="mohClass", errors="404 409"),
    _op("DELETE", "/bridges/{bridgeId}/moh", errors="404 409"),
    _op(
        "POST",
        "/bridges/{bridgeId}/play",
        "media",
        "announcer_format lang offsetms skipms playbackId",
        "404 409 422",
    ),
)

HANGUP_REASONS = frozenset(
    [
        "normal",
        "busy",
        "congestion",
        "no_answer",
        "timeout",
        "rejected",
        "unallocated",
        "normal_unspecified",
        "number_incomplete",
        "codec_mismatch",
        "interworking",
        "failure",
        "answered_elsewhere",
    ]
)
BRIDGE_TYPES = frozenset(
    ["mixing", "holding", "dtmf_events", "proxy_media", "video_sfu", "video_single", "sdp_label"]
)
CAUSES = {
    16: "Normal Clearing",
    17: "User busy",
    19: "No answer",
    20: "Subscriber absent",
    21: "Call Rejected",
}
_REASON_CAUSE = {"normal": 16, "busy": 17, "no_answer": 19, "rejected": 21}


def _compile(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")


_ROUTES = [(op, _compile(op.path)) for op in OPERATIONS]


def _ts() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}+0000"


class AriFault(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


@dataclass
class Channel:
    id: str
    name: str
    state: str
    caller: dict[str, str]
    dialplan: dict[str, Any]
    endpoint: str = ""
    app: str | None = None  # the Stasis app it is in (None: not in Stasis)
    subscribed: str | None = None  # the app that gets its events
    args: list[str] = field(default_factory=list)
    app_args: list[str] = field(default_factory=list)  # for an originated channel, on answer
    bridge: str | None = None
    moh: str | None = None
    created: str = field(default_factory=_ts)
    timer: asyncio.TimerHandle | None = None

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "protocol_id": "",
            "name": self.name,
            "state": self.state,
            "caller": dict(self.caller),
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": dict(self.dialplan),
            "creationtime": self.created,
            "language": "en",
        }


@dataclass
class Bridge:
    id: str
    bridge_type: str
    name: str = ""
    channels: list[str] = field(default_factory=list)
    moh: str | None = None
    plays: list[str] = field(default_factory=list)
    created: str = field(default_factory=_ts)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "technology": "holding_bridge" if self.bridge_type == "holding" else "simple_bridge",
            "bridge_type": self.bridge_type,
            "bridge_class": "stasis",
            "creator": "Stasis",
            "name": self.name,
            "channels": list(self.channels),
            "creationtime": self.created,
            "video_mode": "none",
        }


class AriPeer:
    """The simulated Asterisk. ``async with AriPeer(...) as peer``; ``peer.url`` is ARI's base."""

    def __init__(
        self,
        username: str = "stellwerk",
        password: str = "secret",
        *,
        answer_delay: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.username = username
        self.password = password
        self.answer_delay = answer_delay
        self.clock = clock
        self.channels: dict[str, Channel] = {}
        self.bridges: dict[str, Bridge] = {}
        self.endpoints: dict[str, str] = {}  # endpoint -> behaviour
        self.sockets: dict[str, list[Any]] = {}  # app -> sockets (server or client side)
        self.violations: list[str] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.history: list[tuple[float, str, str]] = []  # (time, channel id, what happened)
        self.down = False
        self.changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._outbound: list[asyncio.Task[None]] = []
        self._outboxes: dict[int, asyncio.Queue[str]] = {}
        self._writers: dict[int, asyncio.Task[None]] = {}
        self.url = ""
        self.port = 0

    # ---- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> AriPeer:
        app = web.Application(middlewares=[self._gate])
        app.router.add_get("/ari/events", self._events_socket)
        app.router.add_route("*", "/ari/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._outbound:
            task.cancel()
        await asyncio.gather(*self._outbound, return_exceptions=True)
        for channel in self.channels.values():
            if channel.timer is not None:
                channel.timer.cancel()
        await self._close_sockets()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- test controls ----------------------------------------------------------------------

    def place_call(
        self, number: str, *args: str, app: str = "stellwerk", exten: str = "1000", name: str = ""
    ) -> str:
        """A caller dials in and the dialplan runs ``Stasis(app,args...)``; the channel id."""
        n = next(self._ids)
        cid = f"{int(time.time())}.{n}"
        channel = Channel(
            id=cid,
            name=f"PJSIP/{number.lstrip('+')}-{n:08x}",
            state="Ring",
            caller={"name": name, "number": number},
            dialplan={
                "context": "from-external",
                "exten": exten,
                "priority": 2,
                "app_name": "Stasis",
                "app_data": ",".join([app, *args]),
            },
            app=app,
            subscribed=app,
            args=list(args),
        )
        self.channels[cid] = channel
        self._note(cid, f"call from {number} enters Stasis({channel.dialplan['app_data']})")
        self._emit(channel, "StasisStart", args=list(args))
        return cid

    def set_endpoint(self, endpoint: str, behaviour: str) -> None:
        """How ``endpoint`` reacts when rung: ring (until answered), answer, busy, decline,
        unreachable."""
        assert behaviour in ("ring", "answer", "busy", "decline", "unreachable")
        self.endpoints[endpoint] = behaviour

    def answer(self, channel_or_endpoint: str) -> str:
        """The agent picks up: an originated, ringing channel (by id or endpoint) answers."""
        channel = self._ringing(channel_or_endpoint)
        self._answer(channel)
        return channel.id

    def ringing(self, endpoint: str) -> list[str]:
        """Ids of the originated channels ringing at ``endpoint``."""
        return [
            c.id for c in self.channels.values() if c.endpoint == endpoint and c.state == "Ringing"
        ]

    def hangup(self, channel_id: str, cause: int = 16) -> None:
        """Either side hangs up (a caller, an agent)."""
        channel = self.channels.get(channel_id)
        if channel is not None:
            self._destroy(channel, cause)

    async def drop(self) -> None:
        """The connection to Asterisk goes away: sockets closed, every request cut off."""
        self.down = True
        await self._close_sockets()
        self._note("", "connection to Stellwerk dropped")

    def restore(self) -> None:
        """The connection is back."""
        self.down = False
        self._note("", "connection restored")

    def connect_outbound(
        self,
        url: str,
        username: str,
        password: str,
        app: str = "stellwerk",
        reconnect_interval: float = 0.2,
    ) -> None:
        """Asterisk's persistent outbound WebSocket to ``url`` (websocket_client.conf)."""
        self._outbound.append(
            asyncio.create_task(
                self._outbound_loop(url, username, password, app, reconnect_interval)
            )
        )

    def in_app(self, app: str = "stellwerk") -> list[str]:
        """Callers (not originated legs) in the app."""
        return [c.id for c in self.channels.values() if c.app == app and not c.endpoint]

    def connected(self, app: str = "stellwerk") -> bool:
        """Whether an application socket is open for ``app``."""
        return bool(self.sockets.get(app))

    # ---- state machine ----------------------------------------------------------------------

    def _note(self, cid: str, what: str) -> None:
        self.history.append((time.time(), cid, what))
        self.changed.set()

    def _ringing(self, key: str) -> Channel:
        channel = self.channels.get(key)
        if channel is None:
            ids = self.ringing(key)
            if not ids:
                raise KeyError(f"nothing rings at {key}")
            channel = self.channels[ids[0]]
        return channel

    def _answer(self, channel: Channel) -> None:
        if channel.id not in self.channels or channel.state != "Ringing":
            return
        if channel.timer is not None:
            channel.timer.cancel()
            channel.timer = None
        channel.state = "Up"
        self._emit(channel, "ChannelStateChange")
        app = channel.subscribed
        channel.app = app
        channel.dialplan.update(
            app_name="Stasis", app_data=",".join([app or "", *channel.app_args])
        )
        self._note(channel.id, f"{channel.endpoint} answers")
        self._emit(channel, "StasisStart", args=list(channel.app_args))

    def _destroy(self, channel: Channel, cause: int) -> None:
        if channel.id not in self.channels:
            return
        if channel.timer is not None:
            channel.timer.cancel()
        if channel.bridge is not None:
            bridge = self.bridges.get(channel.bridge)
            if bridge is not None and channel.id in bridge.channels:
                bridge.channels.remove(channel.id)
                self._emit(channel, "ChannelLeftBridge", bridge=bridge.json())
            channel.bridge = None
        self._emit(channel, "ChannelHangupRequest", cause=cause)
        if channel.app is not None:
            self._emit(channel, "StasisEnd")
            channel.app = None
        del self.channels[channel.id]
        self._note(
            channel.id,
            f"{channel.endpoint or channel.caller['number']} hung up ({CAUSES.get(cause, cause)})",
        )
        self._emit(channel, "ChannelDestroyed", cause=cause, cause_txt=CAUSES.get(cause, "Unknown"))

    def _emit(self, channel: Channel, kind: str, **extra: Any) -> None:
        app = channel.subscribed
        if app is None:
            return
        event = {
            "type": kind,
            "application": app,
            "timestamp": _ts(),
            "asterisk_id": ASTERISK_ID,
            "channel": channel.json(),
            **extra,
        }
        self._send(app, event)

    def _send(self, app: str, event: dict[str, Any]) -> None:
        if self.down:
            return  # events of a disconnected app are lost, as on a real Asterisk
        text = json.dumps(event)
        for ws in list(self.sockets.get(app, [])):
            outbox = self._outboxes.get(id(ws))
            if outbox is not None and not ws.closed:
                outbox.put_nowait(text)

    async def _writer(self, ws: Any, outbox: asyncio.Queue[str]) -> None:
        # One writer per socket keeps the events in order.
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            while True:
                await ws.send_str(await outbox.get())

    def _unregister(self, ws: Any) -> None:
        for group in self.sockets.values():
            with contextlib.suppress(ValueError):
                group.remove(ws)
        self._outboxes.pop(id(ws), None)
        writer = self._writers.pop(id(ws), None)
        if writer is not None:
            writer.cancel()

    async def _close_sockets(self) -> None:
        sockets = [ws for group in self.sockets.values() for ws in group]
        for ws in sockets:
            self._unregister(ws)
            with contextlib.suppress(Exception):
                await ws.close()

    # ---- HTTP ---------------------------------------------------------------------------------

    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.down:
            # A network that is gone: the connection just ends.
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()
        if not self._authorised(request):
            return web.json_response(
                {"message": "Authentication required"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="Asterisk REST Interface"'},
            )
        resp: web.StreamResponse = await handler(request)
        return resp

    def _authorised(self, request: web.Request) -> bool:
        key = request.query.get("api_key")
        if key is not None:
            return key == f"{self.username}:{self.password}"
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value).decode()
        except ValueError:
            return False
        return decoded == f"{self.username}:{self.password}"

    async def _events_socket(self, request: web.Request) -> web.StreamResponse:
        apps = [a for a in request.query.get("app", "").split(",") if a]
        unknown = set(request.query) - {"app", "api_key", "subscribeAll"}
        if not apps or unknown:
            self.violations.append(f"GET /ari/events {dict(request.query)}")
            return web.json_response({"message": "app parameter is required"}, status=400)
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        await self._register(apps, ws)
        try:
            async for _ in ws:
                pass  # REST over this socket is not used by Stellwerk's inbound mode
        finally:
            self._unregister(ws)
        return ws

    async def _register(self, apps: list[str], ws: Any) -> None:
        for app in apps:
            # One socket per application: a new one replaces the old (ApplicationReplaced).
            for old in list(self.sockets.get(app, [])):
                self._unregister(old)
                with contextlib.suppress(Exception):
                    await old.send_str(json.dumps(self._app_event("ApplicationReplaced", app)))
                    await old.close()
            self.sockets[app] = [ws]
            await ws.send_str(json.dumps(self._app_event("ApplicationRegistered", app)))
        outbox: asyncio.Queue[str] = asyncio.Queue()
        self._outboxes[id(ws)] = outbox
        self._writers[id(ws)] = asyncio.get_running_loop().create_task(self._writer(ws, outbox))
        self._note("", f"application {','.join(apps)} connected")

    def _app_event(self, kind: str, app: str) -> dict[str, Any]:
        return {"type": kind, "application": app, "timestamp": _ts(), "asterisk_id": ASTERISK_ID}

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError:
                    return web.json_response({"message": "Invalid JSON body"}, status=400)
        status, data = self.handle(
            request.method, "/" + request.match_info["tail"], dict(request.query), body
        )
        if data is None:
            return web.Response(status=status)
        return web.json_response(data, status=status)

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """One REST request (over HTTP or the WebSocket): ``(status, JSON or None)``."""
        query = {k: v for k, v in query.items() if k != "api_key"}
        self.requests.append((method, path, query))
        matched = [(op, m) for op, rx in _ROUTES if (m := rx.match(path))]
        if not matched:
            self.violations.append(f"{method} {path}: unknown resource")
            return 404, {"message": "Resource not found"}
        found = next(((op, m) for op, m in matched if op.method == method), None)
        if found is None:
            self.violations.append(f"{method} {path}: method not allowed")
            return 405, {"message": "Method not allowed"}
        op, m = found
        if isinstance(body, dict) and op.body:
            # Other keys of a JSON body count as query parameters (ARI's rule).
            query.update({k: str(v) for k, v in body.items() if k != "variables"})
        elif body is not None and not op.body:
            self.violations.append(f"{method} {op.path}: unexpected body")
        missing = op.required - set(query)
        unknown = set(query) - op.known
        if missing or unknown:
            self.violations.append(
                f"{method} {op.path}: missing {sorted(missing)} unknown {sorted(unknown)}"
            )
            return 400, {"message": f"missing {sorted(missing)} unknown {sorted(unknown)}"}
        try:
            handler = getattr(self, "_" + _name(op))
            status, data = handler(query, body, **m.groupdict())
        except AriFault as fault:
            status, data = fault.status, {"message": fault.message}
        if status >= 400 and status not in op.errors:
            self.violations.append(f"peer answered {status} undocumented for {method} {op.path}")
        return status, data

    # ---- the operations ----------------------------------------------------------------------

    def _channel(self, channel_id: str) -> Channel:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise AriFault(404, "Channel not found")
        return channel

    def _in_stasis(self, channel_id: str) -> Channel:
        channel = self._channel(channel_id)
        if channel.app is None:
            raise AriFault(409, "Channel not in Stasis application")
        return channel

    def _dialled(self, channel_id: str) -> Channel:
        """A channel in Stasis that media can be played to: not created-and-never-dialled."""
        channel = self._in_stasis(channel_id)
        if channel.state == "Down":
            raise AriFault(412, "Channel in invalid state")
        return channel

    def _bridge(self, bridge_id: str) -> Bridge:
        bridge = self.bridges.get(bridge_id)
        if bridge is None:
            raise AriFault(404, "Bridge not found")
        return bridge

    def _get_channels(self, q: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, [c.json() for c in self.channels.values()]

    def _post_channels(self, q: dict[str, str], body: Any) -> tuple[int, Any]:
        endpoint = q["endpoint"]
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*/\S+", endpoint):
            raise AriFault(400, "Endpoint parameter is invalid")
        if "app" in q and any(k in q for k in ("extension", "context", "priority", "label")):
            raise AriFault(400, "Application and dialplan location are mutually exclusive")
        if "app" not in q:
            raise AriFault(400, "this simulated Asterisk only originates into an application")
        cid = q.get("channelId") or f"{int(time.time())}.{next(self._ids)}"
        if cid in self.channels:
            raise AriFault(409, "Channel with given unique ID already exists")
        try:
            timeout = int(q.get("timeout", "30"))
        except ValueError:
            raise AriFault(400, "timeout must be an integer") from None
        if body is not None and not (
            isinstance(body, dict) and isinstance(body.get("variables", {}), dict)
        ):
            raise AriFault(400, "variables must be an object")
        caller_id = q.get("callerId", "")
        m = re.fullmatch(r'"?([^"<]*)"?\s*<([^>]*)>', caller_id)
        name, number = (m.group(1).strip(), m.group(2)) if m else ("", caller_id)
        channel = Channel(
            id=cid,
            name=f"{endpoint}-{next(self._ids):08x}",
            state="Down",
            caller={"name": name, "number": number},
            dialplan={"context": "", "exten": "", "priority": 1, "app_name": "", "app_data": ""},
            endpoint=endpoint,
            subscribed=q["app"],
            app_args=[a for a in q.get("appArgs", "").split(",") if a],
        )
        self.channels[cid] = channel
        self._note(cid, f"rings {endpoint}")
        loop = asyncio.get_running_loop()
        loop.call_soon(self._start_ringing, channel, timeout)
        return 200, channel.json()

    def _post_channel_create(self, q: dict[str, str], body: Any) -> tuple[int, Any]:
        cid = q.get("channelId") or f"{int(time.time())}.{next(self._ids)}"
        if cid in self.channels:
            raise AriFault(409, "Channel with given unique ID already exists")
        app_args = [a for a in q.get("appArgs", "").split(",") if a]
        channel = Channel(
            id=cid,
            name=f"{q['endpoint']}-{next(self._ids):08x}",
            state="Down",
            caller={"name": "", "number": ""},
            dialplan={"context": "", "exten": "", "priority": 1, "app_name": "", "app_data": ""},
            endpoint=q["endpoint"],
            app=q["app"],
            subscribed=q["app"],
            args=app_args,
        )
        self.channels[cid] = channel
        self._note(cid, f"created for {q['endpoint']} (not dialled)")
        self._emit(channel, "StasisStart", args=app_args)
        return 200, channel.json()

    def _start_ringing(self, channel: Channel, timeout: int) -> None:
        if channel.id not in self.channels:
            return
        behaviour = self.endpoints.get(channel.endpoint, "ring")
        loop = asyncio.get_running_loop()
        if behaviour == "unreachable":
            self._destroy(channel, 20)
            return
        channel.state = "Ringing"
        self._emit(channel, "ChannelStateChange")
        if behaviour == "busy":
            channel.timer = loop.call_later(0.02, self._destroy, channel, 17)
        elif behaviour == "decline":
            channel.timer = loop.call_later(0.02, self._destroy, channel, 21)
        elif behaviour == "answer":
            channel.timer = loop.call_later(self.answer_delay, self._answer, channel)
        elif timeout > 0:
            channel.timer = loop.call_later(timeout, self._destroy, channel, 19)

    def _get_channel(self, q: dict[str, str], body: Any, channelId: str) -> tuple[int, Any]:
        return 200, self._channel(channelId).json()

    def _delete_channel(self, q: dict[str, str], body: Any, channelId: str) -> tuple[int, Any]:
        reason = q.get("reason")
        if reason is not None and reason not in HANGUP_REASONS:
            raise AriFault(400, "Invalid reason for hangup provided")
        channel = self._channel(channelId)
        self._destroy(channel, _REASON_CAUSE.get(reason or "normal", 16))
        return 204, None

    def _post_channel_answer(self, q: dict[str, str], body: Any, channelId: str) -> tuple[int, Any]:
        channel = self._dialled(channelId)
        if channel.state != "Up":
            channel.state = "Up"
            self._emit(channel, "ChannelStateChange")
            self._note(channel.id, "answered")
        return 204, None

    def _post_channel_moh(self, q: dict[str, str], body: Any, channelId: str) -> tuple[int, Any]:
        self._dialled(channelId).moh = q.get("mohClass", "default")
        return 204, None

    def _delete_channel_moh(self, q: dict[str, str], body: Any, channelId: str) -> tuple[int, Any]:
        self._dialled(channelId).moh = None
        return 204, None

    def _post_channel_play(self, q: dict[str, str], body: Any, channelId: str) -> tuple[int, Any]:
        channel = self._dialled(channelId)
        return 201, self._playback(q, f"channel:{channel.id}")

    def _playback(self, q: dict[str, str], target: str) -> dict[str, Any]:
        return {
            "id": q.get("playbackId") or f"pb-{next(self._ids)}",
            "media_uri": q["media"],
            "target_uri": target,
            "language": q.get("lang", "en"),
            "state": "queued",
        }

    def _get_bridges(self, q: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, [b.json() for b in self.bridges.values()]

    def _make_bridge(self, bridge_id: str, q: dict[str, str]) -> tuple[int, Any]:
        types = [t for t in q.get("type", "mixing").split(",") if t]
        if any(t not in BRIDGE_TYPES for t in types):
            raise AriFault(400, "Invalid bridge type")
        if bridge_id in self.bridges:
            raise AriFault(409, "Bridge with the same id already exists")
        bridge = Bridge(
            id=bridge_id,
            bridge_type="holding" if "holding" in types else "mixing",
            name=q.get("name", ""),
        )
        self.bridges[bridge_id] = bridge
        return 200, bridge.json()

    def _post_bridges(self, q: dict[str, str], body: Any) -> tuple[int, Any]:
        return self._make_bridge(q.get("bridgeId") or f"br-{next(self._ids)}", q)

    def _post_bridge(self, q: dict[str, str], body: Any, bridgeId: str) -> tuple[int, Any]:
        return self._make_bridge(bridgeId, q)

    def _get_bridge(self, q: dict[str, str], body: Any, bridgeId: str) -> tuple[int, Any]:
        return 200, self._bridge(bridgeId).json()

    def _delete_bridge(self, q: dict[str, str], body: Any, bridgeId: str) -> tuple[int, Any]:
        bridge = self._bridge(bridgeId)
        for cid in list(bridge.channels):
            channel = self.channels.get(cid)
            bridge.channels.remove(cid)
            if channel is not None:
                channel.bridge = None
                self._emit(channel, "ChannelLeftBridge", bridge=bridge.json())
        del self.bridges[bridgeId]
        self._send_bridge_destroyed(bridge)
        return 204, None

    def _send_bridge_destroyed(self, bridge: Bridge) -> None:
        for app in list(self.sockets):
            self._send(app, {**self._app_event("BridgeDestroyed", app), "bridge": bridge.json()})

    def _post_bridge_addchannel(
        self, q: dict[str, str], body: Any, bridgeId: str
    ) -> tuple[int, Any]:
        bridge = self._bridge(bridgeId)
        ids = [c for c in q["channel"].split(",") if c]
        for cid in ids:
            if cid not in self.channels:
                raise AriFault(400, "Channel not found")
        for cid in ids:
            if self.channels[cid].app is None:
                raise AriFault(422, "Channel not in Stasis application")
        for cid in ids:
            channel = self.channels[cid]
            if channel.bridge == bridge.id:
                continue
            if channel.bridge is not None and channel.bridge in self.bridges:
                old = self.bridges[channel.bridge]
                old.channels.remove(cid)
                self._emit(channel, "ChannelLeftBridge", bridge=old.json())
            bridge.channels.append(cid)
            channel.bridge = bridge.id
            self._note(cid, f"enters {bridge.bridge_type} bridge {bridge.id}")
            self._emit(channel, "ChannelEnteredBridge", bridge=bridge.json())
        return 204, None

    def _post_bridge_removechannel(
        self, q: dict[str, str], body: Any, bridgeId: str
    ) -> tuple[int, Any]:
        bridge = self._bridge(bridgeId)
        for cid in [c for c in q["channel"].split(",") if c]:
            if cid not in self.channels:
                raise AriFault(400, "Channel not found")
            if cid not in bridge.channels:
                raise AriFault(422, "Channel not in this bridge")
            bridge.channels.remove(cid)
            channel = self.channels[cid]
            channel.bridge = None
            self._emit(channel, "ChannelLeftBridge", bridge=bridge.json())
        return 204, None

    def _post_bridge_moh(self, q: dict[str, str], body: Any, bridgeId: str) -> tuple[int, Any]:
        bridge = self._bridge(bridgeId)
        bridge.moh = q.get("mohClass", "default")
        for cid in bridge.channels:
            self._note(cid, f"hears music on hold ({bridge.moh})")
        return 204, None

    def _delete_bridge_moh(self, q: dict[str, str], body: Any, bridgeId: str) -> tuple[int, Any]:
        self._bridge(bridgeId).moh = None
        return 204, None

    def _post_bridge_play(self, q: dict[str, str], body: Any, bridgeId: str) -> tuple[int, Any]:
        bridge = self._bridge(bridgeId)
        bridge.plays.append(q["media"])
        for cid in bridge.channels:
            self._note(cid, f"hears {q['media']}")
        return 201, self._playback(q, f"bridge:{bridge.id}")

    # ---- outbound WebSocket: Asterisk connects to the application server ---------------------

    async def _outbound_loop(
        self, url: str, username: str, password: str, app: str, interval: float
    ) -> None:
        auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        async with aiohttp.ClientSession(headers={"Authorization": auth}) as session:
            while True:
                if not self.down:
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        async with session.ws_connect(url, protocols=("ari",)) as ws:
                            await self._register([app], ws)
                            try:
                                async for msg in ws:
                                    if msg.type != aiohttp.WSMsgType.TEXT:
                                        break
                                    await self._rest_over_socket(ws, msg.data)
                            finally:
                                self._unregister(ws)
                await asyncio.sleep(interval)

    async def _rest_over_socket(self, ws: Any, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            await ws.send_str(
                json.dumps(
                    {
                        "type": "RESTResponse",
                        "status_code": 400,
                        "reason_phrase": "Failed to parse request message JSON",
                        "request_id": "",
                        "transaction_id": "",
                        "uri": "",
                    }
                )
            )
            return
        if req.get("type") != "RESTRequest":
            return
        uri = str(req.get("uri", ""))
        query = {q["name"]: q["value"] for q in req.get("query_strings", [])}
        body: Any = None
        if "message_body" in req:
            if req.get("content_type") != "application/json":
                self.violations.append(f"RESTRequest {uri}: message_body without content_type")
            body = json.loads(req["message_body"])
        status, data = self.handle(str(req.get("method", "")), "/" + uri.lstrip("/"), query, body)
        resp: dict[str, Any] = {
            "type": "RESTResponse",
            "transaction_id": req.get("transaction_id", ""),
            "request_id": req.get("request_id", ""),
            "status_code": status,
            "reason_phrase": "OK" if status < 400 else "Error",
            "uri": uri,
            "application": "",
        }
        if data is not None:
            resp["content_type"] = "application/json"
            resp["message_body"] = json.dumps(data)
        await ws.send_str(json.dumps(resp))


def _name(op: Op) -> str:
    """The handler's name: ``POST /bridges/{bridgeId}/addChannel`` -> post_bridge_addchannel,
    ``POST /channels/create`` -> post_channel_create."""
    parts = [p for p in op.path.split("/") if p]
    words = [op.method.lower()]
    if len(parts) == 1:
        words.append(parts[0])
    else:
        words.append(parts[0].rstrip("s"))
        words.extend(p.lower() for p in parts[1:] if not p.startswith("{"))
    return "_".join(words)
