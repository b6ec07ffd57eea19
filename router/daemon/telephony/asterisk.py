"""The Asterisk adapter: Stellwerk as an ARI Stasis application (docs/telephony.md).

Two ways to reach Asterisk, the same behaviour:

- **ARI over HTTP** (``telephony.asterisk.url``): Stellwerk opens the events WebSocket
  ``/ari/events?app=APP`` and calls the REST API, both with HTTP basic auth; it reconnects with
  the capped, jittered back-off of :func:`router.daemon.mqtt.backoff`.
- **Asterisk's outbound WebSocket** (ari.conf ``type=outbound_websocket``, Asterisk 20.15 /
  21.10 / 22.5 and later, persistent connection): Asterisk connects to the daemon's HTTP
  listener at :data:`OUTBOUND_PATH` (subprotocol ``ari``, basic auth), sends the events there,
  and the REST requests travel back over the same socket as ``RESTRequest`` messages.

What the driver does with a call (the connector decides when):

- a channel entering ``Stasis(APP[,args])`` is reported (``StasisStart``, native payload) and
  journaled before anything is done to it;
- hold: answer, a holding bridge of its own (``stw-hold-<channel>``) with music on hold of the
  queue's class, and the announcement played into that bridge every so often;
- ring: ``POST /channels`` originates the agent's endpoint into the application, with the offer
  id in the channel id (``stw~<offer>~<call>~<nonce>``, so a ringing leg is recognised in
  ``GET /channels`` after a restart, before it ever reaches the application) and in ``appArgs``;
- bridge: the holding bridge goes, a mixing bridge ``stw-call-<channel>`` takes caller and
  agent;
- the leg's ``StasisStart`` is the answer; a leg destroyed before it answered reports busy
  (cause 17), declined (21), no answer (18, 19) or failed; an answered leg's ``StasisEnd`` is
  the agent hanging up; the caller's ``StasisEnd`` is the caller hanging up;
- after every connect the driver rebuilds its view from ``GET /channels`` and ``GET /bridges``
  (callers are channels whose dialplan application is ``Stasis`` with this app), then the
  connector reconciles.

Library choice (docs/telephony.md, "Libraries"): aiohttp's own client (already a dependency)
for the WebSocket and REST. ``asyncari`` downloads Asterisk's swagger at connect and drives
it through asyncswagger11, anyio, httpx and asyncwebsockets, has its own reconnect and
state-machine model and no outbound-WebSocket mode; ``ari-client`` (ari-py) is synchronous
and unmaintained. The handful of REST calls used here are plain requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp import web

from router.daemon.config import AsteriskSettings, Settings
from router.daemon.mqtt import backoff
from router.daemon.telephony.connector import (
    HoldSpec,
    LegFailure,
    PbxCall,
    PbxEvents,
    PbxLeg,
    PbxView,
)

log = structlog.get_logger("stellwerk.telephony.asterisk")

SOURCE = "asterisk-ari"
OUTBOUND_PATH = "/v1/telephony/asterisk/ws"
OPENAPI_PATHS: dict[str, Any] = {
    OUTBOUND_PATH: {
        "get": {
            "summary": "Asterisk's outbound ARI WebSocket (subprotocol ari)",
            "description": "Asterisk (ari.conf type=outbound_websocket) connects here with the "
            "basic credentials of telephony.asterisk.outbound_username/_password, sends the "
            "ARI events and gets REST requests back over the same socket.",
            "x-stellwerk-access": "signed",
            "security": [{"basic": []}],
            "responses": {
                "101": {"description": "switching to the WebSocket protocol"},
                "401": {"description": "no or wrong basic credentials"},
                "503": {"description": "not routing (a standby, or still restoring): retry"},
            },
        }
    }
}
"""The path item of :meth:`AsteriskDriver.http_routes` in ``/v1/openapi.json``."""
LEG_PREFIX = "stw~"
HOLD_PREFIX = "stw-hold-"
CALL_PREFIX = "stw-call-"
REQUEST_TIMEOUT = 10.0
EVENT_QUEUE = 10_000

# Q.850 causes of an agent leg that ended before it answered.
_FAILURES: dict[int, LegFailure] = {17: "busy", 21: "declined", 18: "noanswer", 19: "noanswer"}


class AriError(Exception):
    """ARI answered a request with an error status."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        self.status = status
        super().__init__(f"{method} {path}: {status} {message}")


class AriDown(Exception):
    """No connection to Asterisk right now."""


def make_driver(settings: Settings) -> AsteriskDriver:
    """The driver for ``telephony.asterisk`` (the factory :mod:`router.daemon.telephony` uses)."""
    return AsteriskDriver(settings.telephony.asterisk)


def leg_channel_id(offer_id: str, call_id: str) -> str:
    """The channel id of an agent leg: offer and call recoverable from ``GET /channels``."""
    return f"{LEG_PREFIX}{offer_id}~{call_id}~{secrets.token_hex(3)}"


def parse_leg_id(channel_id: str) -> tuple[str, str] | None:
    """(offer id, call id) of a leg's channel id, or None for any other channel."""
    if not channel_id.startswith(LEG_PREFIX):
        return None
    parts = channel_id[len(LEG_PREFIX) :].rsplit("~", 2)
    if len(parts) != 3:
        return None
    return parts[0], parts[1]


def basic_auth(user: str, password: str) -> str:
    """An HTTP basic ``Authorization`` header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ---- transports: REST over HTTP, or over Asterisk's outbound WebSocket ----------------------


class _HttpRest:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base.rstrip("/") + "/ari/"

    async def request(
        self, method: str, path: str, params: Mapping[str, str] | None, body: Any
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            self.base + path,
            params=dict(params or {}),
            json=body,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        ) as resp:
            text = await resp.text()
            data = json.loads(text) if text.strip() else None
            return resp.status, data


class _WsRest:
    """REST requests as ``RESTRequest`` messages on the outbound socket, answered by
    ``RESTResponse`` with the same ``request_id`` (``message_body`` is a JSON string)."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.pending: dict[str, asyncio.Future[tuple[int, Any]]] = {}

    async def request(
        self, method: str, path: str, params: Mapping[str, str] | None, body: Any
    ) -> tuple[int, Any]:
        request_id = uuid.uuid4().hex
        msg: dict[str, Any] = {
            "type": "RESTRequest",
            "request_id": request_id,
            "transaction_id": request_id,
            "method": method,
            "uri": path,
        }
        if params:
            msg["query_strings"] = [{"name": k, "value": v} for k, v in params.items()]
        if body is not None:
            msg["content_type"] = "application/json"
            msg["message_body"] = json.dumps(body)
        fut: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = fut
        try:
            await self.ws.send_str(json.dumps(msg))
            return await asyncio.wait_for(fut, REQUEST_TIMEOUT)
        finally:
            self.pending.pop(request_id, None)

    def answered(self, msg: Mapping[str, Any]) -> None:
        fut = self.pending.get(str(msg.get("request_id", "")))
        if fut is None or fut.done():
            return
        raw = msg.get("message_body")
        data = json.loads(raw) if isinstance(raw, str) and raw.strip() else None
        fut.set_result((int(msg.get("status_code", 500)), data))

    def close(self) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(AriDown("the outbound WebSocket closed"))


# ---- the driver -------------------------------------------------------------------------------


@dataclass
class _Caller:
    channel: dict[str, Any]
    args: list[str]
    answered: bool = False
    held: HoldSpec | None = None
    announcer: asyncio.Task[None] | None = None


@dataclass
class _Leg:
    channel_id: str
    offer_id: str
    call_id: str
    answered: bool = False
    ending: bool = False


@dataclass
class _State:
    callers: dict[str, _Caller] = field(default_factory=dict)
    legs: dict[str, _Leg] = field(default_factory=dict)  # by offer id
    bridges: set[str] = field(default_factory=set)


class AsteriskDriver:
    """The :class:`~router.daemon.telephony.connector.PbxDriver` for Asterisk's ARI."""

    source = SOURCE

    def __init__(self, settings: AsteriskSettings) -> None:
        self.settings = settings
        self.app = settings.app
        self._rest: _HttpRest | _WsRest | None = None
        self._state = _State()
        self._connected = False
        self._events: PbxEvents | None = None
        self._inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(EVENT_QUEUE)
        self._outbound_lock = asyncio.Lock()
        self._outbound_ws: web.WebSocketResponse | None = None
        self.connects = 0

    # ---- running ----------------------------------------------------------------------------

    async def run(self, events: PbxEvents) -> None:
        """Keep the connection (or wait for Asterisk's), process events, until cancelled."""
        self._events = events
        processor = asyncio.create_task(self._process(), name="telephony-asterisk.events")
        try:
            if self.settings.url and not self.settings.outbound_username:
                await self._connect_forever()
            else:
                await asyncio.Event().wait()  # the outbound route brings the connection
        finally:
            # Not routing any more: Asterisk's outbound socket is turned away until next time.
            self._events = None
            ws = self._outbound_ws
            if ws is not None:
                await ws.close()
            processor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await processor

    async def _connect_forever(self) -> None:
        s = self.settings
        parts = urlsplit(s.url)
        user = s.username or (parts.username or "")
        password = s.password or (parts.password or "")
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        base = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        ws_url = urlunsplit(
            (
                "wss" if parts.scheme == "https" else "ws",
                netloc,
                parts.path.rstrip("/") + "/ari/events",
                "",
                "",
            )
        )
        delays = backoff()
        failures = 0
        async with aiohttp.ClientSession(
            headers={"Authorization": basic_auth(user, password)}
        ) as session:
            while True:
                try:
                    async with session.ws_connect(
                        ws_url, params={"app": self.app}, heartbeat=20.0
                    ) as ws:
                        failures = 0
                        self._rest = _HttpRest(session, base)
                        await self._on_connect()
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                await self._receive(msg.data)
                            elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                                break
                        log.info(
                            "asterisk.socket_closed",
                            code=ws.close_code,
                            error=str(ws.exception() or ""),
                        )
                except (aiohttp.ClientError, OSError, TimeoutError, AriError, AriDown) as exc:
                    log.warning("asterisk.connect_failed", url=base, error=str(exc))
                finally:
                    self._on_disconnect()
                failures += 1
                await asyncio.sleep(delays.compute(failures))

    async def _on_connect(self) -> None:
        await self._rebuild()
        self._connected = True
        self.connects += 1
        log.info(
            "asterisk.connected",
            app=self.app,
            calls=len(self._state.callers),
            legs=len(self._state.legs),
        )
        # Through the event queue: the connector reconciles after the events received
        # before this point were handled.
        await self._inbox.put(None)

    def _on_disconnect(self) -> None:
        if self._connected:
            log.warning("asterisk.disconnected", app=self.app)
        self._connected = False
        self._rest = None
        for caller in self._state.callers.values():
            if caller.announcer is not None:
                caller.announcer.cancel()
                caller.announcer = None

    async def _receive(self, raw: str) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            log.warning("asterisk.bad_message", size=len(raw))
            return
        if not isinstance(msg, dict):
            return
        if msg.get("type") == "RESTResponse":
            if isinstance(self._rest, _WsRest):
                self._rest.answered(msg)
            return
        await self._inbox.put(msg)

    async def _process(self) -> None:
        while True:
            msg = await self._inbox.get()
            try:
                if msg is None:
                    if self._events is not None:
                        await self._events.connected()
                else:
                    await self._event(msg)
            except Exception:
                log.exception("asterisk.event_failed", type=(msg or {}).get("type"))

    # ---- outbound WebSocket ------------------------------------------------------------------

    def http_routes(self) -> Sequence[web.RouteDef]:
        """The route of Asterisk's outbound WebSocket (only when configured)."""
        if not self.settings.outbound_username:
            return []
        return [web.get(OUTBOUND_PATH, self._outbound)]

    def openapi_paths(self) -> Mapping[str, Any]:
        """How ``/v1/openapi.json`` describes :meth:`http_routes`."""
        return OPENAPI_PATHS if self.settings.outbound_username else {}

    def _outbound_authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).partition(b":")
        except binascii.Error:
            return False
        # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError,
        # a 500 for whoever sent them), and the client chooses what the header holds.
        want_user = (self.settings.outbound_username or "").encode()
        want_password = (self.settings.outbound_password or "").encode()
        return hmac.compare_digest(user, want_user) and hmac.compare_digest(password, want_password)

    async def _outbound(self, request: web.Request) -> web.StreamResponse:
        if not self._outbound_authorised(request):
            return web.json_response(
                {"error": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="stellwerk"'},
            )
        if self._events is None:
            # Not routing (a standby, or still restoring): Asterisk retries.
            return web.json_response({"error": "not routing"}, status=503)
        ws = web.WebSocketResponse(protocols=("ari",), heartbeat=20.0)
        await ws.prepare(request)
        async with self._outbound_lock:
            old = self._outbound_ws
            if old is not None:
                await old.close()
            self._outbound_ws = ws
        rest = _WsRest(ws)
        self._rest = rest
        reader = asyncio.create_task(self._read_outbound(ws), name="asterisk.outbound")
        try:
            await self._on_connect()
            await reader
        except (AriError, AriDown, TimeoutError) as exc:
            log.warning("asterisk.outbound_failed", error=str(exc))
        finally:
            reader.cancel()
            rest.close()
            if self._outbound_ws is ws:
                self._outbound_ws = None
                self._on_disconnect()
            await ws.close()
        return ws

    async def _read_outbound(self, ws: web.WebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self._receive(msg.data)

    # ---- REST ------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        ok_missing: bool = False,
    ) -> Any:
        rest = self._rest
        if rest is None:
            raise AriDown("not connected to Asterisk")
        try:
            status, data = await rest.request(method, path, params, body)
        except (aiohttp.ClientError, OSError) as exc:
            raise AriDown(str(exc)) from exc
        if status == 404 and ok_missing:
            return None
        if status >= 400:
            message = data.get("message", "") if isinstance(data, dict) else ""
            raise AriError(status, method, path, str(message))
        return data

    async def _rebuild(self) -> None:
        """The view from ``GET /channels`` and ``GET /bridges`` (after every connect)."""
        channels = await self._call("GET", "channels") or []
        bridges = await self._call("GET", "bridges") or []
        old = self._state
        state = _State()
        in_bridge: dict[str, str] = {}
        for bridge in bridges:
            bid = str(bridge.get("id", ""))
            if bid.startswith((HOLD_PREFIX, CALL_PREFIX)):
                state.bridges.add(bid)
                for cid in bridge.get("channels", []):
                    in_bridge[str(cid)] = bid
        for channel in channels:
            cid = str(channel.get("id", ""))
            leg = parse_leg_id(cid)
            if leg is not None:
                offer_id, call_id = leg
                state.legs[offer_id] = _Leg(
                    channel_id=cid,
                    offer_id=offer_id,
                    call_id=call_id,
                    answered=channel.get("state") == "Up",
                )
                continue
            dialplan = channel.get("dialplan") or {}
            app_data = str(dialplan.get("app_data", ""))
            in_app = (
                str(dialplan.get("app_name", "")).lower() == "stasis"
                and app_data.split(",", 1)[0].strip() == self.app
            )
            if not in_app and not in_bridge.get(cid, "").startswith(HOLD_PREFIX):
                continue
            args = app_data.split(",")[1:] if in_app else []
            prev = old.callers.get(cid)
            state.callers[cid] = _Caller(
                channel=channel,
                args=prev.args if prev is not None and not args else args,
                answered=channel.get("state") == "Up",
            )
        self._state = state

    # ---- events ----------------------------------------------------------------------------

    async def _event(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        channel = msg.get("channel")
        if not isinstance(channel, dict):
            return
        cid = str(channel.get("id", ""))
        st = self._state
        events = self._events
        assert events is not None
        leg_ref = parse_leg_id(cid)
        if leg_ref is not None:
            offer_id, call_id = leg_ref
            leg = st.legs.get(offer_id)
            if kind == "StasisStart":
                if leg is None or leg.channel_id != cid:
                    leg = _Leg(channel_id=cid, offer_id=offer_id, call_id=call_id)
                    st.legs[offer_id] = leg
                leg.answered = True
                if not leg.ending:
                    await events.leg_answered(offer_id)
            elif kind in ("StasisEnd", "ChannelDestroyed"):
                if leg is None or leg.channel_id != cid:
                    return
                del st.legs[offer_id]
                if leg.ending:
                    return
                if leg.answered:
                    await events.leg_hung_up(offer_id)
                else:
                    cause = msg.get("cause")
                    reason = _FAILURES.get(cause if isinstance(cause, int) else -1, "failed")
                    await events.leg_failed(offer_id, reason)
            return
        if kind == "StasisStart":
            if msg.get("application") != self.app or cid in st.callers:
                return
            args = [str(a) for a in msg.get("args") or []]
            st.callers[cid] = _Caller(
                channel=channel, args=args, answered=channel.get("state") == "Up"
            )
            await events.call_arrived(cid, json.dumps(msg).encode())
        elif kind in ("StasisEnd", "ChannelDestroyed"):
            caller = st.callers.pop(cid, None)
            if caller is None:
                return
            if caller.announcer is not None:
                caller.announcer.cancel()
            await events.call_ended(cid, json.dumps(msg).encode())
        elif kind == "ChannelStateChange":
            caller = st.callers.get(cid)
            if caller is not None:
                caller.channel = channel
                caller.answered = channel.get("state") == "Up"

    # ---- the view ----------------------------------------------------------------------------

    def view(self) -> PbxView | None:
        """The PBX's callers in the app and Stellwerk's legs; None while disconnected."""
        if not self._connected:
            return None
        st = self._state
        return PbxView(
            calls={
                cid: PbxCall(call_id=cid, payload=self._start_payload(cid, c))
                for cid, c in st.callers.items()
            },
            legs={
                o: PbxLeg(offer_id=o, call_id=leg.call_id, answered=leg.answered)
                for o, leg in st.legs.items()
                if not leg.ending
            },
        )

    def _start_payload(self, cid: str, caller: _Caller) -> bytes:
        return json.dumps(
            {
                "type": "StasisStart",
                "application": self.app,
                "timestamp": _now_iso(),
                "args": caller.args,
                "channel": caller.channel,
            }
        ).encode()

    def ended_payload(self, call_id: str) -> bytes:
        """A ``ChannelDestroyed`` for a call that vanished while Stellwerk was away."""
        caller = self._state.callers.get(call_id)
        channel = caller.channel if caller is not None else {"id": call_id}
        return json.dumps(
            {
                "type": "ChannelDestroyed",
                "application": self.app,
                "timestamp": _now_iso(),
                "cause": 16,
                "cause_txt": "Normal Clearing",
                "channel": channel,
            }
        ).encode()

    # ---- actions -----------------------------------------------------------------------------

    async def hold(self, call_id: str, spec: HoldSpec) -> None:
        """Answer, holding bridge of its own, music of the queue's class, announcements."""
        caller = self._state.callers.get(call_id)
        if caller is None:
            return  # gone already
        if not caller.answered:
            await self._call("POST", f"channels/{call_id}/answer")
            caller.answered = True
        bridge = HOLD_PREFIX + call_id
        if bridge not in self._state.bridges:
            await self._call("POST", f"bridges/{bridge}", {"type": "holding"})
            self._state.bridges.add(bridge)
        await self._call("POST", f"bridges/{bridge}/addChannel", {"channel": call_id})
        await self._call("POST", f"bridges/{bridge}/moh", {"mohClass": spec.music_class})
        caller.held = spec
        if caller.announcer is not None:
            caller.announcer.cancel()
            caller.announcer = None
        if spec.announcement is not None:
            caller.announcer = asyncio.create_task(
                self._announce(bridge, spec.announcement.media, spec.announcement.every),
                name=f"asterisk.announce.{call_id}",
            )

    async def _announce(self, bridge: str, media: str, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self._call("POST", f"bridges/{bridge}/play", {"media": media})
            except (AriError, AriDown) as exc:
                log.info("asterisk.announce_failed", bridge=bridge, error=str(exc))
                return

    async def ring(self, offer_id: str, call_id: str, endpoint: str, timeout: float) -> None:
        """Originate ``endpoint`` into the app, the offer id in channel id and appArgs."""
        old = self._state.legs.get(offer_id)
        if old is not None and not old.ending:
            return  # already ringing for this offer
        caller = self._state.callers.get(call_id)
        leg_id = leg_channel_id(offer_id, call_id)
        params = {
            "endpoint": endpoint,
            "app": self.app,
            "appArgs": f"stellwerk-leg,{offer_id}",
            "channelId": leg_id,
            "timeout": str(max(1, int(timeout + 0.999))),
        }
        if caller is not None:
            number = str((caller.channel.get("caller") or {}).get("number") or "")
            name = str((caller.channel.get("caller") or {}).get("name") or "")
            if number:
                params["callerId"] = f'"{name}" <{number}>' if name else number
        self._state.legs[offer_id] = _Leg(channel_id=leg_id, offer_id=offer_id, call_id=call_id)
        try:
            await self._call(
                "POST", "channels", params, body={"variables": {"STELLWERK_OFFER": offer_id}}
            )
        except Exception:
            self._state.legs.pop(offer_id, None)
            raise

    async def stop_ring(self, offer_id: str) -> None:
        """Hang up the leg of ``offer_id``."""
        leg = self._state.legs.get(offer_id)
        if leg is None or leg.ending:
            return
        leg.ending = True
        await self._call("DELETE", f"channels/{leg.channel_id}", ok_missing=True)

    async def bridge(self, call_id: str, offer_id: str) -> None:
        """Caller out of the holding bridge, caller and agent into one mixing bridge."""
        leg = self._state.legs.get(offer_id)
        caller = self._state.callers.get(call_id)
        if leg is None or caller is None:
            raise AriDown(f"cannot bridge {call_id}: caller or leg {offer_id} is gone")
        if caller.announcer is not None:
            caller.announcer.cancel()
            caller.announcer = None
        hold = HOLD_PREFIX + call_id
        if hold in self._state.bridges:
            self._state.bridges.discard(hold)
            await self._call("DELETE", f"bridges/{hold}", ok_missing=True)
        mix = CALL_PREFIX + call_id
        if mix not in self._state.bridges:
            await self._call("POST", f"bridges/{mix}", {"type": "mixing"})
            self._state.bridges.add(mix)
        await self._call(
            "POST", f"bridges/{mix}/addChannel", {"channel": f"{call_id},{leg.channel_id}"}
        )
        caller.held = None

    async def hangup(self, call_id: str) -> None:
        """Caller, its legs and its bridges go."""
        st = self._state
        # Forgotten first: its StasisEnd is then ours, not a caller hanging up.
        caller = st.callers.pop(call_id, None)
        if caller is not None and caller.announcer is not None:
            caller.announcer.cancel()
            caller.announcer = None
        for leg in [leg for leg in st.legs.values() if leg.call_id == call_id]:
            if not leg.ending:
                leg.ending = True
                await self._call("DELETE", f"channels/{leg.channel_id}", ok_missing=True)
        if caller is not None:
            await self._call("DELETE", f"channels/{call_id}", ok_missing=True)
        for bridge in (HOLD_PREFIX + call_id, CALL_PREFIX + call_id):
            if bridge in st.bridges:
                st.bridges.discard(bridge)
                await self._call("DELETE", f"bridges/{bridge}", ok_missing=True)

    @property
    def connected(self) -> bool:
        """Whether the driver talks to Asterisk right now."""
        return self._connected

    def stats(self) -> dict[str, int]:
        """Counts for logs and tests: callers, legs, bridges, connects."""
        st = self._state
        return {
            "callers": len(st.callers),
            "legs": len(st.legs),
            "bridges": len(st.bridges),
            "connects": self.connects,
        }
