"""The FreeSWITCH driver: Stellwerk as an event-socket client (inbound mode).

Implements :class:`~router.daemon.telephony.connector.PbxDriver` over
:mod:`router.daemon.telephony.esl`. See docs/telephony.md ("Connect FreeSWITCH") for the
FreeSWITCH side. In short:

- A call is Stellwerk's when the dialplan set the channel variable ``stellwerk=true`` on an
  inbound channel and parked it. Its ``CHANNEL_PARK`` event (JSON) is the native payload the
  connector journals before anything is done to the call; variables ``stellwerk_<name>``
  become the contact's attributes (channels/phone.py).
- Held calls hear ``uuid_broadcast <uuid> local_stream://<class> aleg``; an announcement
  breaks in every so often (``uuid_break``, the recording, the music again).
- An offer rings the agent with ``bgapi originate {stellwerk_offer_id=...,origination_uuid=...}
  <endpoint> &park()``; never ``api originate``, which would hold the socket (and every event
  behind it) until the phone answers. The leg's uuid is chosen here, so the ringing can be
  stopped (``uuid_kill``) before the background job reports back.
- The leg's ``CHANNEL_ANSWER`` is the accept; ``uuid_bridge`` joins caller and agent.
- After every (re)connect the driver rebuilds its picture of the switch from
  ``show channels as json`` and ``uuid_dump <uuid> json`` (the calls parked for Stellwerk and
  the agent legs carrying ``stellwerk_offer_id``, whoever rang them) before it tells the
  connector, which reconciles that picture with the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid as uuidlib
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from router.daemon.config import Settings
from router.daemon.mqtt import backoff
from router.daemon.telephony.connector import (
    HoldSpec,
    LegFailure,
    PbxCall,
    PbxEvents,
    PbxLeg,
    PbxView,
)
from router.daemon.telephony.esl import (
    EslClient,
    EslConnectionLost,
    EslError,
    parse_plain_event,
)

log = structlog.get_logger("stellwerk.telephony.freeswitch")
T = TypeVar("T")

SOURCE = "freeswitch"
MARKER = "stellwerk"
"""The channel variable (``true``) by which the dialplan hands a call to Stellwerk."""
OFFER_VARIABLE = "stellwerk_offer_id"
"""The channel variable that carries the offer id on an agent leg."""
CALL_VARIABLE = "stellwerk_call"
"""The channel variable that names the caller's uuid on an agent leg."""
EVENTS = (
    "CHANNEL_CREATE",
    "CHANNEL_PARK",
    "CHANNEL_ANSWER",
    "CHANNEL_BRIDGE",
    "CHANNEL_HANGUP_COMPLETE",
    "BACKGROUND_JOB",
)
RING_BACKSTOP = 2.0
"""FreeSWITCH gives up ringing this long after the connector's ring timeout, in case the
connector's own stop never arrives (the socket was down at the time)."""

_TRUE = frozenset({"true", "yes", "on", "1"})
# Ids and numbers that go into a command line or a {var=value} list unquoted.
_SAFE = re.compile(r"[A-Za-z0-9_.:@+\-]+")
_ENCODE = msgspec.json.Encoder()
_DECODE = msgspec.json.Decoder()
# Causes of a phone that rang out or was stopped: the offer's own expiry (RONA) decides.
_NO_ANSWER_CAUSES = frozenset(
    {"NO_ANSWER", "NO_USER_RESPONSE", "ALLOTTED_TIMEOUT", "ORIGINATOR_CANCEL", "LOSE_RACE"}
)
# Replies that mean "that channel is not there (any more)": the action is already done.
_GONE = ("-ERR No such channel", "-ERR No Such Channel", "-ERR invalid uuid", "-ERR Invalid uuid")


class FreeswitchError(Exception):
    """FreeSWITCH refused an action, or could not be reached to carry it out."""


def music_source(music_class: str) -> str:
    """The playable source of a queue's music class (``default`` is the vanilla ``moh``)."""
    return "local_stream://moh" if music_class == "default" else f"local_stream://{music_class}"


def fail_reason(cause: str) -> LegFailure:
    """An unanswered leg's hang-up cause as the connector sees it.

    Busy is busy and a declined call declined; a phone that rang out (or was stopped) is no
    answer, left to the offer's expiry; anything else (not registered, unreachable, a gateway
    failure) cannot be answered: failed, so that the call moves on at once.
    """
    if cause == "USER_BUSY":
        return "busy"
    if cause == "CALL_REJECTED":
        return "declined"
    if cause in _NO_ANSWER_CAUSES:
        return "noanswer"
    return "failed"


def dial_string(endpoint: str, variables: dict[str, str]) -> str:
    """``endpoint`` with ``variables`` in its leading ``{...}`` block (merged with the
    routing file's own variables there, which come last and so win)."""
    ours = ",".join(f"{k}={v}" for k, v in variables.items())
    if endpoint.startswith("{"):
        end = endpoint.index("}")
        theirs = endpoint[1:end]
        return "{" + ours + ("," + theirs if theirs else "") + "}" + endpoint[end + 1 :]
    return "{" + ours + "}" + endpoint


@dataclass
class _Call:
    """A caller's channel handed to Stellwerk, as last seen."""

    uuid: str
    payload: bytes
    number: str | None = None
    answered: bool = True
    announce: asyncio.Task[None] | None = None


@dataclass
class _Leg:
    """An agent leg carrying ``stellwerk_offer_id``."""

    offer_id: str
    uuid: str
    call_id: str
    answered: bool = False
    bridged: bool = False
    cancelled: bool = False  # Stellwerk hung it up: its end reports nothing
    finished: bool = False


class FreeswitchDriver:
    """One event-socket connection to one FreeSWITCH (see the module docstring)."""

    source = SOURCE

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
        keepalive: float = 15.0,
    ) -> None:
        self.host = host
        self.port = port
        self._password = password
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._keepalive = keepalive
        self._client: EslClient | None = None
        self._events: PbxEvents | None = None
        self._calls: dict[str, _Call] = {}
        self._legs: dict[str, _Leg] = {}  # by offer id
        self._leg_uuids: dict[str, str] = {}  # leg uuid -> offer id
        self._tasks: set[asyncio.Task[Any]] = set()
        # True from the end of a synchronisation to the next disconnect: only then is the
        # picture complete (a half-built one would make the connector end calls that are up).
        self._synced = False
        self.connects = 0
        """How many times the driver has connected and synchronised (for tests and logs)."""

    # ------------------------------------------------------------------ running

    async def run(self, events: PbxEvents) -> None:
        """Connect, synchronise, report, consume events; reconnect with capped jittered
        back-off (reset after each successful connect). Runs until cancelled."""
        self._events = events
        delays = backoff()
        failures = 0
        try:
            while True:
                client: EslClient | None = None
                try:
                    client = await EslClient.connect(
                        self.host, self.port, self._password, timeout=self._connect_timeout
                    )
                    await self._within(client.subscribe(EVENTS), "event json")
                    self._client = client
                    await self._synchronise(client)
                    self._synced = True
                    failures = 0
                    self.connects += 1
                    log.info("freeswitch.connected", host=self.host, port=self.port)
                    watchdog = self._spawn(self._watch(client), "freeswitch-keepalive")
                    try:
                        await events.connected()
                        await self._consume(client)
                    finally:
                        watchdog.cancel()
                except EslError as exc:
                    log.warning(
                        "freeswitch.disconnected",
                        host=self.host,
                        error=str(exc),
                        kind=type(exc).__name__,
                    )
                finally:
                    self._synced = False
                    self._client = None
                    if client is not None:
                        await client.close()
                failures += 1
                await asyncio.sleep(delays.compute(failures))
        finally:
            for task in list(self._tasks):
                task.cancel()
            for call in self._calls.values():
                if call.announce is not None:
                    call.announce.cancel()

    async def _within(self, step: Awaitable[T], what: str) -> T:
        """A step of connecting: a switch that does not answer in time is a lost connection."""
        try:
            return await asyncio.wait_for(step, self._command_timeout)
        except TimeoutError:
            raise EslConnectionLost(f"no answer to {what}") from None

    async def _consume(self, client: EslClient) -> None:
        async for event in client.events():
            try:
                await self._on_event(event)
            except FreeswitchError as exc:
                log.warning("freeswitch.action_failed", error=str(exc))
            except Exception:
                # A bug must not take the switch's other calls down with it.
                log.exception("freeswitch.event_failed", event=event.get("Event-Name"))

    async def _watch(self, client: EslClient) -> None:
        """Close a connection that stops answering (a silent network partition gives no
        reset): ``api status`` every ``keepalive`` seconds must come back in time."""
        while True:
            await asyncio.sleep(self._keepalive)
            try:
                await asyncio.wait_for(client.api("status"), self._command_timeout)
            except (EslError, TimeoutError):
                log.warning("freeswitch.unresponsive", host=self.host)
                await client.close()
                return

    def view(self) -> PbxView | None:
        """The Stellwerk calls on the switch and the agent legs; None while disconnected or
        still synchronising after a connect."""
        if self._client is None or not self._synced:
            return None
        return PbxView(
            calls={uid: PbxCall(call_id=uid, payload=c.payload) for uid, c in self._calls.items()},
            legs={
                offer_id: PbxLeg(offer_id=offer_id, call_id=leg.call_id, answered=leg.answered)
                for offer_id, leg in self._legs.items()
                if not leg.finished and not leg.cancelled
            },
        )

    def http_routes(self) -> Sequence[web.RouteDef]:
        """None: the event socket is a connection Stellwerk opens."""
        return ()

    def openapi_paths(self) -> Mapping[str, Any]:
        """None (no routes)."""
        return {}

    def ended_payload(self, call_id: str) -> bytes:
        """A CHANNEL_HANGUP_COMPLETE for a call that vanished while the socket was down."""
        return _ENCODE.encode(
            {
                "Event-Name": "CHANNEL_HANGUP_COMPLETE",
                "Unique-ID": call_id,
                "Call-Direction": "inbound",
                "Answer-State": "hangup",
                "Event-Date-Timestamp": str(int(time.time() * 1_000_000)),
            }
        )

    # ------------------------------------------------------------------ actions

    async def _api(self, cmd: str) -> str:
        client = self._client
        if client is None:
            raise FreeswitchError(f"not connected to FreeSWITCH ({cmd.split(' ', 1)[0]})")
        try:
            # A late reply is still matched to its (abandoned) command: the stream stays in step.
            return await asyncio.wait_for(client.api(cmd), self._command_timeout)
        except (EslError, TimeoutError) as exc:
            raise FreeswitchError(f"{cmd.split(' ', 1)[0]}: {exc or 'no answer'}") from exc

    async def _kill(self, uid: str, cause: str = "NORMAL_CLEARING") -> None:
        out = await self._api(f"uuid_kill {uid} {cause}")
        if not out.startswith("+OK") and not out.startswith(_GONE):
            raise FreeswitchError(f"uuid_kill {uid}: {out.strip()}")

    async def hold(self, call_id: str, spec: HoldSpec) -> None:
        """Answer the caller if the dialplan parked it unanswered, play the queue's music
        (what played before is stopped first, so a repeated hold is still one stream) and
        start its periodic announcement."""
        _check_id(call_id)
        music = music_source(spec.music_class)
        call = self._calls.get(call_id)
        if call is not None and not call.answered:
            out = await self._api(f"uuid_answer {call_id}")
            if out.startswith(_GONE):
                return
            if not out.startswith("+OK"):
                raise FreeswitchError(f"uuid_answer {call_id}: {out.strip()}")
            call.answered = True
        out = await self._api(f"uuid_break {call_id} all")
        if out.startswith(_GONE):
            return  # hung up meanwhile: its end is on the way
        out = await self._api(f"uuid_broadcast {call_id} {music} aleg")
        if not out.startswith("+OK") and not out.startswith(_GONE):
            raise FreeswitchError(f"uuid_broadcast {call_id}: {out.strip()}")
        if call is not None:
            if call.announce is not None:
                call.announce.cancel()
                call.announce = None
            ann = spec.announcement
            if ann is not None and ann.every > 0:
                call.announce = self._spawn(
                    self._announce(call_id, ann.media, ann.every, music),
                    f"freeswitch-announce-{call_id}",
                )

    async def _announce(self, call_id: str, media: str, every: float, music: str) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(FreeswitchError):
                # Broadcasts queue up on the channel: the recording, then the music again.
                await self._api(f"uuid_break {call_id} all")
                await self._api(f"uuid_broadcast {call_id} {media} aleg")
                await self._api(f"uuid_broadcast {call_id} {music} aleg")

    async def ring(self, offer_id: str, call_id: str, endpoint: str, timeout: float) -> None:
        """Originate the agent's leg for ``offer_id`` with ``bgapi`` into ``&park()``."""
        _check_id(offer_id)
        _check_id(call_id)
        if not endpoint or any(c.isspace() for c in endpoint):
            raise FreeswitchError(f"endpoint {endpoint!r} is not a dial string")
        existing = self._legs.get(offer_id)
        if existing is not None and not existing.finished and not existing.cancelled:
            return  # already ringing: a repeated command is not a second phone call
        client = self._client
        if client is None:
            raise FreeswitchError("not connected to FreeSWITCH (originate)")
        leg = _Leg(offer_id=offer_id, uuid=str(uuidlib.uuid4()), call_id=call_id)
        variables = {
            OFFER_VARIABLE: offer_id,
            CALL_VARIABLE: call_id,
            "origination_uuid": leg.uuid,
            "originate_timeout": str(max(1, math.ceil(timeout + RING_BACKSTOP))),
        }
        call = self._calls.get(call_id)
        if call is not None and call.number and _SAFE.fullmatch(call.number):
            variables["origination_caller_id_number"] = call.number
        # Known before the command goes out, so the leg's first event is never a stranger's.
        self._legs[offer_id] = leg
        self._leg_uuids[leg.uuid] = offer_id
        try:
            job = await client.bgapi(f"originate {dial_string(endpoint, variables)} &park()")
        except EslError as exc:
            self._forget(leg)
            raise FreeswitchError(f"originate for {offer_id}: {exc}") from exc
        self._spawn(self._job_result(leg, job), f"freeswitch-originate-{offer_id}")
        log.info("freeswitch.ringing", offer_id=offer_id, endpoint=endpoint, leg=leg.uuid)

    async def _job_result(self, leg: _Leg, job: asyncio.Future[str]) -> None:
        with contextlib.suppress(EslConnectionLost):
            out = await job
            if out.startswith("-ERR") and not leg.finished:
                # No channel was ever made (USER_NOT_REGISTERED ...), or its hang-up event was
                # already handled: either way the offer hears about it once.
                await self._leg_gone(leg, out[4:].strip() or "NORMAL_TEMPORARY_FAILURE")

    async def stop_ring(self, offer_id: str) -> None:
        """Hang up the agent leg of ``offer_id`` (ringing, answered or an earlier run's)."""
        leg = self._legs.get(offer_id)
        if leg is None or leg.finished:
            return
        leg.cancelled = True
        await self._kill(leg.uuid, "ORIGINATOR_CANCEL")

    async def bridge(self, call_id: str, offer_id: str) -> None:
        """``uuid_bridge`` the caller with the answered leg of ``offer_id``."""
        leg = self._legs.get(offer_id)
        if leg is None or leg.finished:
            raise FreeswitchError(f"no agent leg for {offer_id}")
        if leg.bridged:
            return
        out = await self._api(f"uuid_bridge {call_id} {leg.uuid}")
        if not out.startswith("+OK"):
            raise FreeswitchError(f"uuid_bridge {call_id} {leg.uuid}: {out.strip()}")
        leg.bridged = True
        call = self._calls.get(call_id)
        if call is not None and call.announce is not None:
            call.announce.cancel()
            call.announce = None

    async def hangup(self, call_id: str) -> None:
        """Hang up the caller and every agent leg placed for it."""
        _check_id(call_id)
        for leg in [leg for leg in self._legs.values() if leg.call_id == call_id]:
            if not leg.finished:
                leg.cancelled = True
                await self._kill(leg.uuid)
        await self._kill(call_id)

    # ------------------------------------------------------------------ events

    async def _on_event(self, event: dict[str, Any]) -> None:
        name = event.get("Event-Name")
        uid = str(event.get("Unique-ID", ""))
        if not uid or name == "BACKGROUND_JOB":
            return  # jobs are awaited through their futures
        offer_id = self._leg_uuids.get(uid)
        if offer_id is None:
            offer_id = _text(event, f"variable_{OFFER_VARIABLE}")
            if offer_id and name != "CHANNEL_HANGUP_COMPLETE" and offer_id not in self._legs:
                # A leg this run did not ring (an earlier run's, still on its way up): known
                # from now on, so that the connector can decide on it.
                self._adopt(offer_id, uid, event)
        if offer_id is not None and offer_id in self._legs:
            await self._on_leg_event(self._legs[offer_id], str(name), event)
            return
        if not _is_stellwerk_call(event):
            return
        events = self._events
        if name == "CHANNEL_PARK" and uid not in self._calls:
            payload = _ENCODE.encode(event)
            self._calls[uid] = _Call(
                uuid=uid, payload=payload, number=_caller(event), answered=_answered(event)
            )
            if events is not None:
                await events.call_arrived(uid, payload)
        elif name == "CHANNEL_ANSWER" and uid in self._calls:
            self._calls[uid].answered = True
        elif name == "CHANNEL_HANGUP_COMPLETE" and uid in self._calls:
            await self._call_gone(uid)
            if events is not None:
                await events.call_ended(uid, _ENCODE.encode(event))

    async def _on_leg_event(self, leg: _Leg, name: str, event: dict[str, Any]) -> None:
        if name == "CHANNEL_ANSWER" and not leg.answered:
            leg.answered = True
            if leg.cancelled:
                # Picked up in the instant it was stopped: the kill is on its way or failed.
                with contextlib.suppress(FreeswitchError):
                    await self._kill(leg.uuid, "ORIGINATOR_CANCEL")
                return
            if self._events is not None:
                await self._events.leg_answered(leg.offer_id)
        elif name == "CHANNEL_CREATE" and leg.cancelled:
            with contextlib.suppress(FreeswitchError):
                await self._kill(leg.uuid, "ORIGINATOR_CANCEL")
        elif name == "CHANNEL_HANGUP_COMPLETE":
            await self._leg_gone(leg, _text(event, "Hangup-Cause") or "NORMAL_CLEARING")

    async def _leg_gone(self, leg: _Leg, cause: str) -> None:
        if leg.finished:
            return
        leg.finished = True
        self._forget(leg)
        events = self._events
        if leg.cancelled or events is None:
            return
        if leg.answered:
            log.info("freeswitch.agent_hung_up", offer_id=leg.offer_id, cause=cause)
            await events.leg_hung_up(leg.offer_id)
            if leg.bridged and leg.call_id in self._calls:
                # Nobody is left on the line with the caller (FreeSWITCH would leave them
                # parked in silence): end the call for them too.
                with contextlib.suppress(FreeswitchError):
                    await self._kill(leg.call_id)
        else:
            await events.leg_failed(leg.offer_id, fail_reason(cause))

    async def _call_gone(self, uid: str) -> None:
        call = self._calls.pop(uid, None)
        if call is None:
            return
        if call.announce is not None:
            call.announce.cancel()
        for leg in [leg for leg in self._legs.values() if leg.call_id == uid]:
            # The caller is gone: a ringing phone stops, an agent on the line is freed.
            if not leg.finished and not leg.cancelled:
                leg.cancelled = True
                with contextlib.suppress(FreeswitchError):
                    await self._kill(leg.uuid, "ORIGINATOR_CANCEL")

    def _adopt(self, offer_id: str, uid: str, event: dict[str, Any]) -> _Leg:
        leg = _Leg(
            offer_id=offer_id,
            uuid=uid,
            call_id=_text(event, f"variable_{CALL_VARIABLE}") or "",
            answered=_text(event, "Answer-State") == "answered",
        )
        self._legs[offer_id] = leg
        self._leg_uuids[uid] = offer_id
        return leg

    def _forget(self, leg: _Leg) -> None:
        if self._legs.get(leg.offer_id) is leg:
            del self._legs[leg.offer_id]
        self._leg_uuids.pop(leg.uuid, None)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ synchronising

    async def _synchronise(self, client: EslClient) -> None:
        """Rebuild the picture of the switch after a (re)connect (events were missed).

        Channels it did not know are looked at with ``uuid_dump``: a parked Stellwerk call
        joins the calls (its dump is the native payload the connector journals if the engine
        does not know it), a leg carrying ``stellwerk_offer_id`` joins the legs (the connector
        hangs it up if its offer is gone). What it knew and the switch no longer has is
        dropped; an answered leg of ours that vanished is reported as hung up by the agent.
        """
        out = await self._within(client.api("show channels as json"), "show channels")
        try:
            listing = _DECODE.decode(out.encode())
        except msgspec.DecodeError as exc:
            raise EslConnectionLost(f"show channels answered {out[:80]!r}") from exc
        rows = listing.get("rows") or [] if isinstance(listing, dict) else []
        alive = {str(r.get("uuid")) for r in rows if isinstance(r, dict) and r.get("uuid")}
        for uid in sorted(alive - set(self._calls) - set(self._leg_uuids)):
            dump = await self._within(client.api(f"uuid_dump {uid} json"), "uuid_dump")
            data = _dump_fields(dump)
            if data is None:
                continue  # gone in the meantime (-ERR No Such Channel!)
            offer_id = _text(data, f"variable_{OFFER_VARIABLE}")
            if offer_id:
                self._adopt(offer_id, uid, data)
            elif _is_stellwerk_call(data) and _text(data, "Answer-State") != "hangup":
                self._calls[uid] = _Call(
                    uuid=uid, payload=dump.encode(), number=_caller(data), answered=_answered(data)
                )
        for uid in [u for u in self._calls if u not in alive]:
            await self._call_gone(uid)  # the connector journals its end from the engine's side
        for leg in [leg for leg in self._legs.values() if leg.uuid not in alive]:
            if leg.answered:
                await self._leg_gone(leg, "NORMAL_CLEARING")
            elif leg.cancelled:
                self._forget(leg)
            # An unanswered leg not listed may still be on its way (its originate job has not
            # made the channel yet); its events or its job's answer settle it.


def _dump_fields(dump: str) -> dict[str, Any] | None:
    """The headers of a ``uuid_dump`` answer: JSON, or the plain ``Name: value`` lines that
    FreeSWITCH versions without the json format write instead; None for an error."""
    if dump.startswith("{"):
        try:
            data = _DECODE.decode(dump.encode())
        except msgspec.DecodeError:
            log.warning("freeswitch.bad_dump", reply=dump[:80])
            return None
        return data if isinstance(data, dict) else None
    if dump.startswith("Event-Name:"):
        return dict(parse_plain_event(dump.encode()))
    return None


def _text(event: dict[str, Any], name: str) -> str | None:
    value = event.get(name)
    return value if isinstance(value, str) and value else None


def _answered(event: dict[str, Any]) -> bool:
    return _text(event, "Answer-State") == "answered"


def _caller(event: dict[str, Any]) -> str | None:
    return _text(event, "Caller-Caller-ID-Number") or _text(event, "Caller-ANI")


def _is_stellwerk_call(event: dict[str, Any]) -> bool:
    return (
        _text(event, "Call-Direction") == "inbound"
        and (_text(event, f"variable_{MARKER}") or "").lower() in _TRUE
    )


def _check_id(value: str) -> None:
    if not _SAFE.fullmatch(value):
        raise FreeswitchError(f"{value!r} cannot go into an event-socket command")


def make_driver(settings: Settings) -> FreeswitchDriver:
    """The driver for ``telephony.freeswitch`` (called by the connector wiring)."""
    fs = settings.telephony.freeswitch
    return FreeswitchDriver(fs.host, fs.port, fs.password or "")
