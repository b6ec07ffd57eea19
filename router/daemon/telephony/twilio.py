"""The Twilio Voice driver: TwiML answered by the daemon, REST calls through the ``twilio`` library.

How a call goes (docs/telephony.md has the whole story):

1. Twilio requests the number's voice URL, ``POST /v1/webhooks/twilio-voice`` (this driver's
   route; the signature is checked with ``telephony.twilio.auth_token`` against
   ``telephony.twilio.public_url``). The delivery is journaled first; then the answer waits a
   moment (:data:`DECIDE_WAIT`) for the engine's decision, which normally takes milliseconds,
   and is TwiML: ``<Enqueue>`` into the Twilio queue named after the Stellwerk queue with the
   daemon's ``waitUrl``, or at once the ``<Dial>`` of an agent the engine already offered the
   call to. Without a decision in time (a slow journal) the caller hears the hold music and
   then a ``<Redirect>`` to ``/v1/telephony/twilio/route``, which asks again; the decision,
   when it comes, redirects the call at once. Status callbacks to the same URL
   (``CallStatus=completed`` ...) journal the end of the call.
2. ``waitUrl`` (``/v1/telephony/twilio/wait?queue=...``): the queue's music, looping; with an
   announcement, the announcement when due (from ``QueueTime``) and the music once, so that
   Twilio asks again after it.
3. An offer rings the agent: the queued call is dequeued (Queue Member update, or Call update
   when the queue's sid is not known yet) to ``route``, which answers the ``<Dial>`` of the
   agent's endpoint with a ``timeout`` and an ``action``. The dialled noun reports to
   ``/v1/telephony/twilio/leg`` (``in-progress``: the agent answered, journaled as the Accept;
   Twilio has bridged them already) and the ``<Dial action>`` (``/v1/telephony/twilio/dialled``)
   reports how the dial ended: ``busy``/``failed`` is a Reject, ``no-answer`` is left to the
   engine's offer expiry (RONA), ``completed`` with the caller still there means the agent hung
   up (Complete, and the call ends). Those URLs carry the offer id and the agent, under
   Twilio's signature.
4. A withdrawn offer (``stop_ring``) redirects the caller to ``route`` again: Twilio ends the
   dial (the agent's phone stops ringing) and the caller is enqueued again; their place is the
   engine's, which keeps the original wait.

REST actions run in the background, retried with the capped, jittered back-off until they
succeed or a newer action for the same call supersedes them; a connection failure also makes
the driver re-read Twilio's view (queues, members, live calls) until the API answers again, and
then the connector reconciles.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import aiohttp
import structlog
from aiohttp import web

from router.daemon import openapi
from router.daemon.config import Settings, TwilioSettings
from router.daemon.mqtt import backoff
from router.daemon.telephony.connector import (
    HoldSpec,
    LegFailure,
    PbxCall,
    PbxEvents,
    PbxLeg,
    PbxView,
)
from router.daemon.telephony.twilio_api import (
    TwilioException,
    TwilioRest,
    TwilioRestException,
    absolute,
    dial_twiml,
    empty_twiml,
    enqueue_twiml,
    hangup_twiml,
    hold_twiml,
    refusal_twiml,
    signature_valid,
    twilio_queue_name,
    wait_twiml,
)

log = structlog.get_logger("stellwerk.telephony.twilio")

SOURCE = "twilio-voice"
WEBHOOK = "/v1/webhooks/twilio-voice"
PREFIX = "/v1/telephony/twilio"
DECIDE_WAIT = 2.0
"""How long the voice webhook waits for the engine's decision before answering a short hold."""
DEFAULT_MUSIC = "http://com.twilio.music.classical.s3.amazonaws.com/BusyStrings.mp3"
"""Twilio's own published hold music, for the ``default`` music class."""
ORPHAN = "twilio-leg:"
"""View key of an agent leg whose offer this process does not know (rung before a restart)."""
VIEW_MAX_AGE = 5.0
"""A view older than this is read again before the connector reconciles with it."""
_ENDED = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
_REST_DOWN = (TwilioException, aiohttp.ClientError, TimeoutError, OSError)
_MAX_ENDED = 10_000
_FAILURES: dict[str, LegFailure] = {"busy": "busy", "failed": "failed", "no-answer": "noanswer"}
_OFFER = (("offer", "the offer the dial rings for"),)
OPENAPI_PATHS: dict[str, Any] = {
    WEBHOOK: openapi.form_callback(
        "Twilio's voice webhook and status callback: journaled, answered with <Enqueue> "
        "(or the <Dial> of an agent already chosen)",
        standby=True,
    ),
    f"{PREFIX}/route": openapi.form_callback("A redirect target: what the call does now"),
    f"{PREFIX}/wait": openapi.form_callback(
        "The queue's waitUrl: hold music, and the announcement when due",
        (("queue", "the Stellwerk queue"),),
    ),
    f"{PREFIX}/leg": openapi.form_callback(
        "The dialled agent's status callback; in-progress is the agent answering", _OFFER
    ),
    f"{PREFIX}/dialled": openapi.form_callback(
        "The <Dial action>: how the dial ended, and the caller's next TwiML", _OFFER
    ),
}
"""The path items of :meth:`TwilioDriver.http_routes` in ``/v1/openapi.json``."""


@dataclass(frozen=True)
class Ring:
    """An offer ringing (or about to ring) an agent's endpoint from one call."""

    offer_id: str
    endpoint: str
    timeout: int


@dataclass
class CallState:
    """What the driver knows about one caller's call (learnt again after a restart)."""

    sid: str
    queue: str | None = None
    in_queue: str | None = None
    queue_sid: str | None = None
    ring: Ring | None = None
    hangup: bool = False
    answering: int = 0
    announced: float = 0.0
    webhook_at: float = 0.0
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0


Action = Callable[[CallState], Awaitable[None]]


def make_driver(settings: Settings) -> TwilioDriver:
    """The driver for ``settings.telephony.twilio`` (the connector's factory)."""
    return TwilioDriver(settings.telephony.twilio)


class TwilioDriver:
    """:class:`~router.daemon.telephony.connector.PbxDriver` for Twilio Voice."""

    source = SOURCE

    def __init__(self, settings: TwilioSettings) -> None:
        self.settings = settings
        self.account_sid = settings.account_sid
        self.auth_token = settings.auth_token or ""
        self.public_url = settings.public_url.rstrip("/")
        self.calls: dict[str, CallState] = {}
        self.rest: TwilioRest | None = None
        self.events: PbxEvents | None = None
        self._sounds: dict[str, HoldSpec] = {}
        self._offer_call: dict[str, str] = {}
        self._leg_offer: dict[str, tuple[str, str]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._view: PbxView | None = None
        self._view_at = 0.0
        self._refresh = asyncio.Event()
        self._api_back = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- PbxDriver: connection and view ------------------------------------------------------

    async def run(self, events: PbxEvents) -> None:
        """Read Twilio's view whenever it is wanted (start, restore, after an outage) and tell
        the connector; REST actions run beside it. Until cancelled."""
        self.events = events
        self.rest = TwilioRest(self.account_sid, self.auth_token, self.settings.api_base)
        policy = backoff()
        failures = 0
        self._refresh.set()
        try:
            while True:
                await self._refresh.wait()
                self._refresh.clear()
                try:
                    await self._read_view()
                except _REST_DOWN as exc:
                    failures += 1
                    delay = policy.compute(failures)
                    # once per outage at warning level: the retries would flood the log
                    (log.warning if failures == 1 else log.debug)(
                        "twilio.api_unreachable", error=repr(exc), retry_in=round(delay, 2)
                    )
                    self._api_back.clear()
                    with contextlib.suppress(TimeoutError):
                        # a REST action that gets through again cuts the wait short
                        await asyncio.wait_for(self._api_back.wait(), delay)
                    self._refresh.set()
                    continue
                if failures:
                    log.info("twilio.api_back", after_failures=failures)
                failures = 0
                await events.connected()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.rest.close()
            self.events = None

    async def _read_view(self) -> None:
        assert self.rest is not None
        started = time.monotonic()
        live = await self.rest.live_calls()
        members: dict[str, tuple[str, str]] = {}
        for name, queue_sid in (await self.rest.queue_sids()).items():
            for sid in await self.rest.members(queue_sid):
                members[sid] = (name, queue_sid)
        calls: dict[str, PbxCall] = {}
        legs: dict[str, PbxLeg] = {}
        for call in live:
            if call.parent_sid is None:
                if call.direction == "inbound":
                    calls[call.sid] = PbxCall(
                        call.sid, self._arrival(call.sid, call.from_, call.to)
                    )
                continue
            known = self._leg_offer.get(call.sid)
            offer_id = known[0] if known else ORPHAN + call.sid
            if not known:
                self._leg_offer[call.sid] = (offer_id, call.parent_sid)
            legs[offer_id] = PbxLeg(offer_id, call.parent_sid, call.status == "in-progress")
        for sid, (name, queue_sid) in members.items():
            state = self.calls.get(sid) or self._state(sid)
            state.in_queue, state.queue_sid = name, queue_sid
        # Calls that announced themselves while the lists were read are there too.
        for sid, state in self.calls.items():
            if sid not in calls and state.webhook_at >= started and sid not in self._ended:
                calls[sid] = PbxCall(sid, self._arrival(sid, "", ""))
        self._view = PbxView(calls=calls, legs=legs)
        self._view_at = time.monotonic()

    def view(self) -> PbxView | None:
        """Twilio's calls and Stellwerk's agent legs; None (and a fresh read is on its way)
        while it is unknown or old, so that the connector reconciles with a current one."""
        if self._view is None or time.monotonic() - self._view_at > VIEW_MAX_AGE:
            self._refresh.set()
            return None
        return self._view

    def ended_payload(self, call_id: str) -> bytes:
        """A status-callback body that journals the call as ended (reconciliation found it
        gone from Twilio: the driver forgets it too)."""
        self._over(call_id)
        return urlencode(
            {
                "AccountSid": self.account_sid,
                "ApiVersion": "2010-04-01",
                "CallSid": call_id,
                "CallStatus": "completed",
                "Direction": "inbound",
            }
        ).encode()

    def _arrival(self, sid: str, from_: str, to: str) -> bytes:
        return urlencode(
            {
                "AccountSid": self.account_sid,
                "ApiVersion": "2010-04-01",
                "CallSid": sid,
                "CallStatus": "ringing",
                "Direction": "inbound",
                "From": from_,
                "To": to,
            }
        ).encode()

    # ---- PbxDriver: actions ------------------------------------------------------------------

    async def hold(self, call_id: str, spec: HoldSpec) -> None:
        """The call waits in the Twilio queue named after ``spec.queue`` with its music."""
        if spec.queue is None:
            return  # not routed yet: the voice webhook's answer holds it meanwhile
        self._sounds[spec.queue] = spec
        state = self._state(call_id)
        state.queue = spec.queue
        state.decided.set()
        if state.answering or state.ring is not None or state.hangup:
            return  # an answer on its way says it; a ringing agent is stop_ring's business
        if state.in_queue == twilio_queue_name(spec.queue):
            return
        if call_id in self._legged_calls():
            return  # in a dial Stellwerk placed before a restart: reconciliation decides
        self._act(state, self._redirect, "hold")

    async def ring(self, offer_id: str, call_id: str, endpoint: str, timeout: float) -> None:
        """Dial the agent from the caller's call (dequeue it to ``route``)."""
        state = self._state(call_id)
        state.ring = Ring(offer_id=offer_id, endpoint=endpoint, timeout=max(5, math.ceil(timeout)))
        self._offer_call[offer_id] = call_id
        state.decided.set()
        if state.answering:
            return  # a TwiML request of this call is being answered: the answer is the dial
        self._act(state, self._dial_now, "ring")

    async def stop_ring(self, offer_id: str) -> None:
        """End the offer's dial: the caller goes back to ``route`` (and so to the queue)."""
        if offer_id.startswith(ORPHAN):
            known = self._leg_offer.get(offer_id.removeprefix(ORPHAN))
            call_id = known[1] if known else None
        else:
            call_id = self._offer_call.pop(offer_id, None)
        if call_id is None or call_id in self._ended:
            return
        state = self._state(call_id)
        if state.ring is not None and state.ring.offer_id != offer_id:
            return  # the call rings someone else by now
        state.ring = None
        if not state.answering and not state.hangup:
            self._act(state, self._redirect, "stop_ring")

    async def bridge(self, call_id: str, offer_id: str) -> None:
        """Nothing to do: Twilio bridged caller and agent when the agent answered the dial."""

    async def hangup(self, call_id: str) -> None:
        """End the call (a rejected contact, or what is left of a finished one)."""
        if call_id in self._ended:
            return
        state = self._state(call_id)
        if state.hangup:
            return
        state.hangup = True
        state.ring = None
        state.decided.set()
        if not state.answering:
            self._act(state, self._end, "hangup")

    def http_routes(self) -> Sequence[web.RouteDef]:
        """The voice webhook (TwiML, not the generic 202) and the driver's TwiML routes."""
        return [
            web.post(WEBHOOK, self.voice),
            web.post(f"{PREFIX}/route", self.route),
            web.post(f"{PREFIX}/wait", self.wait),
            web.post(f"{PREFIX}/leg", self.leg),
            web.post(f"{PREFIX}/dialled", self.dialled),
        ]

    def openapi_paths(self) -> Mapping[str, Any]:
        """How ``/v1/openapi.json`` describes :meth:`http_routes`."""
        return OPENAPI_PATHS

    # ---- state -------------------------------------------------------------------------------

    def _state(self, sid: str) -> CallState:
        state = self.calls.get(sid)
        if state is None:
            state = self.calls[sid] = CallState(sid=sid)
        return state

    def _over(self, sid: str) -> None:
        """Twilio says the call is over: forget it (and remember that, for late commands)."""
        state = self.calls.pop(sid, None)
        if state is not None:
            state.generation += 1  # pending REST actions for it stop
            state.decided.set()
        self._ended[sid] = None
        while len(self._ended) > _MAX_ENDED:
            self._ended.popitem(last=False)
        for offer_id in [o for o, c in self._offer_call.items() if c == sid]:
            del self._offer_call[offer_id]
        for leg in [leg for leg, (_, parent) in self._leg_offer.items() if parent == sid]:
            del self._leg_offer[leg]

    def _legged_calls(self) -> set[str]:
        return {parent for _, parent in self._leg_offer.values()}

    def url(self, name: str, **query: str) -> str:
        """The public URL of one of the driver's TwiML routes."""
        path = f"{PREFIX}/{name}"
        if query:
            path += "?" + urlencode(query, quote_via=quote)
        return absolute(self.public_url, path)

    # ---- REST, in the background, retried until done or superseded ---------------------------

    def _act(self, state: CallState, action: Action, what: str) -> None:
        state.generation += 1
        retry = self._retry(state, state.generation, action, what)
        task = asyncio.create_task(retry, name=f"twilio-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, state: CallState, generation: int, action: Action, what: str) -> None:
        policy = backoff()
        failures = 0
        while state.generation == generation and state.sid not in self._ended:
            if self.rest is None:
                return
            try:
                await action(state)
                self._api_back.set()  # the API answers: an outage's view refresh goes now
                return
            except TwilioRestException as exc:
                # Twilio refused (the call is over: 400 21220; gone: 404): nothing to retry.
                log.info(
                    "twilio.rest_refused",
                    call=state.sid,
                    action=what,
                    status=exc.status,
                    code=exc.code,
                )
                return
            except _REST_DOWN as exc:
                failures += 1
                delay = policy.compute(failures)
                (log.warning if failures == 1 else log.debug)(
                    "twilio.rest_failed",
                    call=state.sid,
                    action=what,
                    error=repr(exc),
                    retry_in=round(delay, 2),
                )
                self._refresh.set()  # and reconcile once the API answers again
                await asyncio.sleep(delay)

    async def _dial_now(self, state: CallState) -> None:
        assert self.rest is not None
        route = self.url("route")
        if state.queue_sid is not None and state.in_queue is not None:
            try:
                await self.rest.dequeue(state.queue_sid, state.sid, route)
                return
            except TwilioRestException as exc:
                if exc.status != 404:
                    raise
                # no longer a member of that queue (in a dial, say): redirect the call itself
        await self.rest.redirect(state.sid, route)

    async def _redirect(self, state: CallState) -> None:
        assert self.rest is not None
        await self.rest.redirect(state.sid, self.url("route"))

    async def _end(self, state: CallState) -> None:
        assert self.rest is not None
        await self.rest.end(state.sid)

    # ---- TwiML -------------------------------------------------------------------------------

    def _music(self, spec: HoldSpec | None) -> str:
        music_class = spec.music_class if spec is not None else "default"
        if music_class.startswith(("http://", "https://")):
            return music_class
        return self.settings.music.get(music_class, DEFAULT_MUSIC)

    def next_twiml(self, state: CallState) -> str:
        """What the call should do now."""
        if state.hangup:
            return hangup_twiml()
        ring = state.ring
        if ring is not None:
            state.in_queue = None
            return dial_twiml(
                ring.endpoint,
                timeout=ring.timeout,
                action=self.url("dialled", offer=ring.offer_id),
                status_callback=self.url("leg", offer=ring.offer_id),
                caller_id=self.settings.caller_id,
            )
        if state.queue is not None:
            state.in_queue = twilio_queue_name(state.queue)
            return enqueue_twiml(state.queue, self.url("wait", queue=state.queue))
        return hold_twiml(self._music(None), self.url("route"))

    async def _decide(self, state: CallState) -> str:
        """Wait (bounded) for the engine's decision about the call; then its TwiML."""
        if state.queue is None and state.ring is None and not state.hangup:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.decided.wait(), DECIDE_WAIT)
        return self.next_twiml(state)

    # ---- HTTP --------------------------------------------------------------------------------

    async def _form(self, request: web.Request) -> tuple[dict[str, str], bytes] | web.Response:
        """The request's form, if Twilio signed it for our account; else the refusal."""
        body = await request.read()
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000)
        except ValueError:
            return _xml(refusal_twiml(), 400)
        form = dict(pairs)
        url = absolute(self.public_url, request.path_qs)
        signature = request.headers.get("X-Twilio-Signature")
        if not signature_valid(self.auth_token, url, form, signature):
            log.warning("twilio.bad_signature", path=request.path)
            return _xml(refusal_twiml(), 401)
        if form.get("AccountSid") != self.account_sid or not form.get("CallSid"):
            log.warning("twilio.foreign_request", path=request.path)
            return _xml(refusal_twiml(), 403)
        return form, body

    async def voice(self, request: web.Request) -> web.Response:
        """The number's voice URL and status callback: journal, then TwiML."""
        got = await self._form(request)
        if isinstance(got, web.Response):
            return got
        form, body = got
        events = self.events
        if events is None:
            # Not the routing daemon (a standby, or starting): Twilio tries its fallback URL.
            return _xml(empty_twiml(), 503)
        sid = form["CallSid"]
        status = form.get("CallStatus", "")
        if status in _ENDED:
            self._over(sid)
            await events.call_ended(sid, body)
            return _xml(empty_twiml())
        if "CallbackSource" in form or status not in ("ringing", "queued"):
            # A progress status callback (initiated, ringing, answered): Twilio runs nothing
            # it is answered with, so it must not stand in for the call's TwiML answer.
            await events.call_arrived(sid, body)
            return _xml(empty_twiml())
        state = self._state(sid)
        state.webhook_at = time.monotonic()
        state.answering += 1
        try:
            if not await events.call_arrived(sid, body):
                if state.hangup:
                    return _xml(hangup_twiml())  # refused (bad payload): hung up
                return _xml(empty_twiml(), 503)  # not journaled: not answered either
            return _xml(await self._decide(state))
        finally:
            state.answering -= 1

    async def route(self, request: web.Request) -> web.Response:
        """``route``: a redirect target; what the call should do now."""
        got = await self._form(request)
        if isinstance(got, web.Response):
            return got
        state = self._state(got[0]["CallSid"])
        state.answering += 1
        try:
            return _xml(await self._decide(state))
        finally:
            state.answering -= 1

    async def wait(self, request: web.Request) -> web.Response:
        """``wait``: the hold document of a queue (music, announcements)."""
        got = await self._form(request)
        if isinstance(got, web.Response):
            return got
        form = got[0]
        queue = request.query.get("queue", "")
        state = self._state(form["CallSid"])
        state.in_queue = twilio_queue_name(queue)
        state.queue_sid = form.get("QueueSid") or state.queue_sid
        spec = self._sounds.get(queue)
        music = self._music(spec)
        announcement = spec.announcement if spec is not None else None
        if announcement is None or announcement.every <= 0:
            return _xml(wait_twiml(music))
        waited = _number(form.get("QueueTime"))
        due = waited >= state.announced + announcement.every
        if due:
            state.announced = waited
        return _xml(wait_twiml(music, announcement.media if due else None, again=True))

    async def leg(self, request: web.Request) -> web.Response:
        """``leg``: the dialled agent's progress; ``in-progress`` is the agent answering."""
        got = await self._form(request)
        if isinstance(got, web.Response):
            return got
        form = got[0]
        offer_id = request.query.get("offer", "")
        leg_sid, parent = form["CallSid"], form.get("ParentCallSid", "")
        status = form.get("CallStatus", "")
        if status in _ENDED:
            self._leg_offer.pop(leg_sid, None)
        else:
            self._leg_offer[leg_sid] = (offer_id, parent)
        if status == "in-progress" and self.events is not None:
            await self.events.leg_answered(offer_id)
        return _xml(empty_twiml())

    async def dialled(self, request: web.Request) -> web.Response:
        """``dialled``: how the dial of an offer ended, and what the caller does next."""
        got = await self._form(request)
        if isinstance(got, web.Response):
            return got
        form = got[0]
        offer_id = request.query.get("offer", "")
        sid = form["CallSid"]
        outcome = form.get("DialCallStatus", "")
        caller_gone = form.get("CallStatus") in _ENDED
        self._leg_offer.pop(form.get("DialCallSid", ""), None)
        state = self._state(sid)
        mine = state.ring is not None and state.ring.offer_id == offer_id
        events = self.events
        state.answering += 1
        try:
            if mine:
                state.ring = None
                self._offer_call.pop(offer_id, None)
            if outcome == "completed":
                # the agent answered and the bridge is over; a caller still there means the
                # agent hung up: the work is complete, and the call ends
                if not caller_gone and events is not None:
                    await events.leg_hung_up(offer_id)
                    state.hangup = True
            elif mine and events is not None and outcome in _FAILURES:
                await events.leg_failed(offer_id, _FAILURES[outcome])
            if caller_gone:
                return _xml(empty_twiml())
            return _xml(self.next_twiml(state))
        finally:
            state.answering -= 1


def _number(value: str | None) -> float:
    try:
        number = float(value or 0)
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def _xml(text: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/xml")


__all__ = ["SOURCE", "TwilioDriver", "make_driver"]
