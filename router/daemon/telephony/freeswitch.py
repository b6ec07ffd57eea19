"""The FreeSWITCH driver: Stellwerk as an event-socket client (inbound mode).

See docs/telephony.md ("Connect FreeSWITCH") for the FreeSWITCH side. In short:

- A call is Stellwerk's when the dialplan set the channel variable ``stellwerk=true`` and
  parked it; its ``CHANNEL_PARK`` is reported (and journaled by the connector) before anything
  is done to it. Variables ``stellwerk_<name>`` become the contact's attributes (the decoder in
  channels/phone.py does that).
- Held calls hear ``uuid_broadcast <uuid> local_stream://<class> aleg``.
- An offer rings the agent with ``bgapi originate {stellwerk_offer_id=...,origination_uuid=...}
  <endpoint> &park()``; never ``api originate``, which would hold the socket until the phone
  answers. The leg's uuid is chosen here, so the ringing can be stopped (``uuid_kill``) before
  the background job reports back.
- The leg's ``CHANNEL_ANSWER`` is the accept; ``uuid_bridge`` joins caller and agent.
- After every (re)connect the driver compares its view with ``show channels as json``
  (and ``uuid_dump <uuid> json`` for channels it does not know).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec
import structlog

from router.daemon.mqtt import backoff
from router.daemon.telephony.esl import EslClient, EslError

log = structlog.get_logger("stellwerk.telephony.freeswitch")

SOURCE = "freeswitch"
MARKER = "variable_stellwerk"
OFFER_VARIABLE = "stellwerk_offer_id"
CALL_VARIABLE = "stellwerk_call"
EVENTS = (
    "CHANNEL_CREATE",
    "CHANNEL_PARK",
    "CHANNEL_ANSWER",
    "CHANNEL_BRIDGE",
    "CHANNEL_HANGUP_COMPLETE",
    "BACKGROUND_JOB",
)
_TRUE = frozenset({"true", "yes", "on", "1"})
# What may go into a dial string or a {var=value} list without breaking the command line.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:@+\-/=]+$")
_ENCODE = msgspec.json.Encoder()

FailReason = Literal["busy", "declined", "noanswer"]


class FreeSwitchEvents(Protocol):
    """What the driver reports to the connector."""

    async def call_arrived(self, call_id: str, body: bytes) -> None:
        """A call parked for Stellwerk; ``body`` is its native event (JSON)."""
        ...

    async def leg_answered(self, offer_id: str) -> None:
        """The agent picked up the phone rung for ``offer_id``."""
        ...

    async def leg_failed(self, offer_id: str, reason: FailReason) -> None:
        """The phone rung for ``offer_id`` gave up without being answered."""
        ...

    async def call_ended(self, call_id: str, body: bytes | None) -> None:
        """The caller's channel is gone; ``body`` its hang-up event, None if it vanished
        while the socket was down (found by reconciliation)."""
        ...

    async def leg_ended(self, offer_id: str) -> None:
        """The agent hung up an answered leg."""
        ...


@dataclass
class _Leg:
    offer_id: str
    uuid: str
    call_id: str
    answered: bool = False
    bridged: bool = False
    cancelled: bool = False
    finished: bool = False


@dataclass
class _Call:
    uuid: str
    music: str | None = None
    announce: asyncio.Task[None] | None = None
    legs: set[str] = field(default_factory=set)


def music_source(music_class: str) -> str:
    """The playable source of a queue's music class (``default`` is the vanilla ``moh``)."""
    return "local_stream://moh" if music_class == "default" else f"local_stream://{music_class}"


# Causes of a phone that rang out or was stopped: the offer's own expiry (RONA) decides.
_NO_ANSWER_CAUSES = frozenset(
    {"NO_ANSWER", "NO_USER_RESPONSE", "ALLOTTED_TIMEOUT", "ORIGINATOR_CANCEL", "LOSE_RACE"}
)


def fail_reason(cause: str) -> FailReason:
    """An unanswered leg's hang-up cause as the engine sees it.

    Busy is busy; a phone that rang out is no answer; anything else (declined, not
    registered, unreachable) cannot be answered and counts as declined, so the call moves on
    at once instead of waiting for the offer to expire.
    """
    if cause == "USER_BUSY":
        return "busy"
    if cause in _NO_ANSWER_CAUSES:
        return "noanswer"
    return "declined"


class FreeSwitchDriver:
    """One event-socket connection to one FreeSWITCH, kept up with back-off."""

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        events: FreeSwitchEvents,
        *,
        connect_timeout: float = 5.0,
        on_connected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._password = password
        self._events = events
        self._connect_timeout = connect_timeout
        self._on_connected = on_connected
        self._client: EslClient | None = None
        self._calls: dict[str, _Call] = {}
        self._legs: dict[str, _Leg] = {}  # by offer id
        self._leg_uuids: dict[str, str] = {}  # leg uuid -> offer id
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Connect, reconcile, consume events; reconnect with capped jittered back-off."""
        delays = backoff()
        failures = 0
        while not self._stopping.is_set():
            client: EslClient | None = None
            try:
                client = await EslClient.connect(
                    self.host, self.port, self._password, timeout=self._connect_timeout
                )
                await client.subscribe(EVENTS)
                self._client = client
                failures = 0
                log.info("freeswitch.connected", host=self.host, port=self.port)
                await self.reconcile_channels()
                self.connected.set()
                if self._on_connected is not None:
                    await self._on_connected()
                async for event in client.events():
                    await self._on_event(event)
            except EslError as exc:
                log.warning("freeswitch.disconnected", host=self.host, error=str(exc))
            finally:
                self.connected.clear()
                self._client = None
                if client is not None:
                    await client.close()
            if self._stopping.is_set():
                break
            failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delays.compute(failures))

    async def stop(self) -> None:
        """Stop reconnecting and close the connection (calls stay as they are)."""
        self._stopping.set()
        client = self._client
        if client is not None:
            await client.close()
        for call in self._calls.values():
            if call.announce is not None:
                call.announce.cancel()

    # ------------------------------------------------------------------ commands

    async def _api(self, cmd: str) -> str | None:
        """Run an api command; None when the switch cannot be reached (reconciliation after
        the reconnect repairs what this command would have done)."""
        client = self._client
        if client is None:
            log.warning("freeswitch.offline", command=cmd.split(" ", 1)[0])
            return None
        try:
            out = await client.api(cmd)
        except EslError as exc:
            log.warning("freeswitch.command_lost", command=cmd.split(" ", 1)[0], error=str(exc))
            return None
        if out.startswith("-"):
            log.info("freeswitch.command_refused", command=cmd.split(" ", 1)[0], reply=out.strip())
        return out

    async def hold(self, call_id: str, music_class: str = "default") -> None:
        """Play the queue's music to a waiting caller (again: what played before is stopped)."""
        call = self._calls.setdefault(call_id, _Call(uuid=call_id))
        call.music = music_source(music_class)
        await self._api(f"uuid_break {call_id} all")
        await self._api(f"uuid_broadcast {call_id} {call.music} aleg")

    async def ring(
        self,
        offer_id: str,
        call_id: str,
        endpoint: str,
        timeout: float,
        caller_number: str | None = None,
    ) -> bool:
        """Originate the agent's leg for ``offer_id``; False if it could not be started."""
        if not _SAFE_VALUE.match(endpoint) or not _SAFE_VALUE.match(offer_id):
            log.error("freeswitch.bad_endpoint", offer_id=offer_id, endpoint=endpoint)
            return False
        if offer_id in self._legs:
            return True  # already ringing: a repeated command is not a second phone call
        leg = _Leg(offer_id=offer_id, uuid=str(uuidlib.uuid4()), call_id=call_id)
        self._legs[offer_id] = leg
        self._leg_uuids[leg.uuid] = offer_id
        self._calls.setdefault(call_id, _Call(uuid=call_id)).legs.add(offer_id)
        # The engine's offer expiry decides RONA; FreeSWITCH's own timeout is only a backstop.
        variables = {
            OFFER_VARIABLE: offer_id,
            CALL_VARIABLE: call_id,
            "origination_uuid": leg.uuid,
            "originate_timeout": str(max(1, math.ceil(timeout)) + 2),
        }
        if caller_number and _SAFE_VALUE.match(caller_number):
            variables["origination_caller_id_number"] = caller_number
        url = "{" + ",".join(f"{k}={v}" for k, v in variables.items()) + "}" + endpoint
        client = self._client
        if client is None:
            self._forget_leg(leg)
            log.warning("freeswitch.offline", command="originate", offer_id=offer_id)
            return False
        try:
            job = await client.bgapi(f"originate {url} &park()")
        except EslError as exc:
            self._forget_leg(leg)
            log.warning("freeswitch.originate_failed", offer_id=offer_id, error=str(exc))
            return False
        asyncio.get_running_loop().create_task(
            self._job_result(leg, job), name=f"freeswitch-originate-{offer_id}"
        )
        log.info("freeswitch.ringing", offer_id=offer_id, endpoint=endpoint, leg=leg.uuid)
        return True

    async def _job_result(self, leg: _Leg, job: asyncio.Future[str]) -> None:
        try:
            out = await job
        except EslError:
            return  # connection gone: reconciliation decides what becomes of the leg
        if out.startswith("-ERR") and not leg.finished and not leg.answered:
            # No channel was ever created (USER_NOT_REGISTERED, ...) or its hang-up event is
            # already handled; either way the offer gets its answer exactly once.
            cause = out[4:].strip() or "NORMAL_TEMPORARY_FAILURE"
            await self._leg_gone(leg, cause)

    async def stop_ring(self, offer_id: str) -> None:
        """Stop the phone rung for ``offer_id`` (no-op once bridged or gone)."""
        leg = self._legs.get(offer_id)
        if leg is None or leg.bridged:
            return
        leg.cancelled = True
        await self._api(f"uuid_kill {leg.uuid} ORIGINATOR_CANCEL")

    async def bridge(self, call_id: str, offer_id: str) -> bool:
        """Join caller and the answered agent leg; False if either is gone."""
        leg = self._legs.get(offer_id)
        if leg is None or not leg.answered or leg.finished:
            return False
        out = await self._api(f"uuid_bridge {call_id} {leg.uuid}")
        if out is None or not out.startswith("+OK"):
            return False
        leg.bridged = True
        call = self._calls.get(call_id)
        if call is not None and call.announce is not None:
            call.announce.cancel()
        return True

    async def hangup(self, call_id: str) -> None:
        """Hang up a caller (and so end what is bridged to it)."""
        await self._api(f"uuid_kill {call_id}")

    # ------------------------------------------------------------------ events

    async def _on_event(self, event: dict[str, Any]) -> None:
        name = event.get("Event-Name")
        uid = str(event.get("Unique-ID", ""))
        if name == "BACKGROUND_JOB" or not uid:
            return
        offer_id = self._leg_uuids.get(uid)
        if offer_id is not None:
            await self._on_leg_event(self._legs[offer_id], name, event)
            return
        if str(event.get(f"variable_{OFFER_VARIABLE}", "")):
            # A leg rung by an earlier run of Stellwerk: reconciliation owns those.
            if name == "CHANNEL_CREATE" or name == "CHANNEL_ANSWER":
                await self._api(f"uuid_kill {uid} ORIGINATOR_CANCEL")
            return
        if not _is_stellwerk_call(event):
            return
        if name == "CHANNEL_PARK" and uid not in self._calls:
            self._calls[uid] = _Call(uuid=uid)
            await self._events.call_arrived(uid, _ENCODE.encode(event))
        elif name == "CHANNEL_HANGUP_COMPLETE" and uid in self._calls:
            await self._call_gone(uid, _ENCODE.encode(event))

    async def _on_leg_event(self, leg: _Leg, name: Any, event: dict[str, Any]) -> None:
        if name == "CHANNEL_CREATE" and leg.cancelled:
            await self._api(f"uuid_kill {leg.uuid} ORIGINATOR_CANCEL")
        elif name == "CHANNEL_ANSWER" and not leg.answered:
            leg.answered = True
            if leg.cancelled:
                await self._api(f"uuid_kill {leg.uuid} ORIGINATOR_CANCEL")
                return
            await self._events.leg_answered(leg.offer_id)
        elif name == "CHANNEL_HANGUP_COMPLETE":
            await self._leg_gone(leg, str(event.get("Hangup-Cause", "NORMAL_CLEARING")))

    async def _leg_gone(self, leg: _Leg, cause: str) -> None:
        if leg.finished:
            return
        leg.finished = True
        self._forget_leg(leg)
        if leg.bridged or (leg.answered and not leg.cancelled):
            log.info("freeswitch.agent_hung_up", offer_id=leg.offer_id, cause=cause)
            await self._events.leg_ended(leg.offer_id)
            if leg.bridged and leg.call_id in self._calls:
                # Nobody is left on the line with the caller: end the call for them too.
                await self.hangup(leg.call_id)
        elif not leg.cancelled:
            await self._events.leg_failed(leg.offer_id, fail_reason(cause))

    def _forget_leg(self, leg: _Leg) -> None:
        self._legs.pop(leg.offer_id, None)
        self._leg_uuids.pop(leg.uuid, None)
        call = self._calls.get(leg.call_id)
        if call is not None:
            call.legs.discard(leg.offer_id)

    async def _call_gone(self, uid: str, body: bytes | None) -> None:
        call = self._calls.pop(uid, None)
        if call is None:
            return
        if call.announce is not None:
            call.announce.cancel()
        for offer_id in list(call.legs):
            leg = self._legs.get(offer_id)
            if leg is not None and not leg.bridged:
                leg.cancelled = True
                await self._api(f"uuid_kill {leg.uuid} ORIGINATOR_CANCEL")
        await self._events.call_ended(uid, body)

    # ------------------------------------------------------------------ reconciliation

    async def reconcile_channels(self) -> None:
        """Bring the driver's view in line with the switch's after a (re)connect.

        Parked Stellwerk calls it did not know are reported as arrived (their ``uuid_dump``
        is the native payload), calls it knew that are gone are reported as ended, agent legs
        it does not know (an earlier run's) are hung up, its own legs that vanished are
        reported as failed or ended.
        """
        out = await self._api("show channels as json")
        if out is None:
            return
        try:
            listing = msgspec.json.decode(out.encode())
        except msgspec.DecodeError:
            log.error("freeswitch.bad_channel_list", reply=out[:200])
            return
        rows = listing.get("rows") or [] if isinstance(listing, dict) else []
        alive = {str(r.get("uuid")) for r in rows if isinstance(r, dict)}
        for uid in sorted(alive):
            if uid in self._calls or uid in self._leg_uuids:
                continue
            dump = await self._api(f"uuid_dump {uid} json")
            if dump is None or not dump.startswith("{"):
                continue  # gone in the meantime
            try:
                data = msgspec.json.decode(dump.encode())
            except msgspec.DecodeError:
                continue
            if not isinstance(data, dict):
                continue
            if str(data.get(f"variable_{OFFER_VARIABLE}", "")):
                log.info("freeswitch.orphan_leg", leg=uid)
                await self._api(f"uuid_kill {uid} ORIGINATOR_CANCEL")
            elif _is_stellwerk_call(data) and data.get("Answer-State") != "hangup":
                self._calls[uid] = _Call(uuid=uid)
                await self._events.call_arrived(uid, dump.encode())
        for uid in [u for u in self._calls if u not in alive]:
            await self._call_gone(uid, None)
        for leg in [leg for leg in self._legs.values() if leg.uuid not in alive]:
            # Unanswered legs that are not there yet may still be on their way (the originate
            # job has not created the channel): only answered ones can be known to be gone.
            if leg.answered:
                await self._leg_gone(leg, "NORMAL_CLEARING")

    def known_calls(self) -> set[str]:
        """The Stellwerk calls the driver knows to be on the switch."""
        return set(self._calls)

    def ringing_offers(self) -> set[str]:
        """Offers with a leg ringing or answered."""
        return set(self._legs)


def _is_stellwerk_call(event: dict[str, Any]) -> bool:
    return (
        str(event.get("Call-Direction", "")) == "inbound"
        and str(event.get(MARKER, "")).lower() in _TRUE
    )
