"""The telephony connector: engine commands become PBX actions, PBX happenings journal entries.

One :class:`TelephonyConnector` per telephony system, each with its :class:`PbxDriver` (the
one port a system's adapter implements). The connector is a
:class:`~router.daemon.sinks.CommandSink`; what the engine's commands mean for a call:

- A call that arrives (the driver's :meth:`PbxEvents.call_arrived`) is journaled first, with
  the source's native payload, through :meth:`Intake.accept` (decoded by ``channels/phone``);
  only then is it answered and held with music: the class of the queue once ``contact.queued``
  (or ``contact.overflowed``/``contact.escalated``) names it, ``default`` until then.
- An :class:`OfferCmd` for a phone contact of this system in a ``phone_offer: phone`` queue
  rings the agent's endpoint for this system (``agents[].endpoints``); the offer id travels
  with the leg. The leg answering journals ``Accept`` for the offer's agent (the PBX is a
  trusted identity for its agents' phones) and ``contact.assigned`` then bridges caller and
  agent. Busy, declined or failed journals ``Reject``. No answer is left to the engine's offer
  expiry (RONA), whose :class:`CancelOfferCmd` stops the ringing; every ``CancelOfferCmd``
  hangs the leg up. An agent without an endpoint for this system gets the offer on the desktop
  only, as in a ``phone_offer: desktop`` queue.
- In a ``phone_offer: desktop`` queue the agent accepts on the desktop; ``contact.assigned``
  makes the connector ring the agent and bridge on answer.
- The caller hanging up is journaled (a ContactEvent ``end``); the engine abandons or
  completes the contact and withdraws its offer, which stops any ringing. ``contact.completed``
  / ``abandoned`` / ``rejected`` hang up whatever is left of the call (caller, agent leg,
  bridges). The agent hanging up journals ``Complete``.
- After the driver (re)connects and after every :meth:`restored`, the connector reconciles the
  PBX's view (:meth:`PbxDriver.view`) with the engine's: calls the PBX has that the journal
  does not are journaled (and so routed); calls the engine has that the PBX no longer has are
  journaled as ended; agent legs ringing for offers that no longer exist are hung up; offers
  whose leg is missing ring again; held calls are held again (nobody is left in silence).
  A call journaled twice is routed once: the engine ignores a second ``new`` of a contact.

Commands are carried out by one worker task in journal order, through a bounded queue (so a
slow PBX applies back-pressure to routing instead of growing memory). A failing PBX action is
logged and never raised into the router; reconciliation after the reconnect repairs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog
from aiohttp import web

from router.daemon.intake import Intake
from router.daemon.journal import JournalUnavailable
from router.daemon.mqtt import backoff
from router.events import (
    ContactAbandoned,
    ContactAssigned,
    ContactCompleted,
    ContactEscalated,
    ContactEventBase,
    ContactOverflowed,
    ContactQueued,
    ContactRejected,
)
from router.messages import CancelOfferCmd, Command, EventCmd, OfferCmd, RefusedCmd
from rules.schema import Announcement
from rules.table import RoutingTable

if TYPE_CHECKING:
    from router.engine import Engine

log = structlog.get_logger("stellwerk.telephony")

LegFailure = Literal["busy", "declined", "noanswer", "failed"]
"""Why an agent leg ended before it was answered."""

#: seconds a leg may ring beyond the offer's expiry: the engine's RONA decides, not the PBX.
RING_GRACE = 5.0
QUEUE_SIZE = 10_000
#: seconds between looks at arrivals the journal could not take.
RETRY_INTERVAL = 0.5
#: seconds between looks at whether this daemon still holds the routing lease.
LEASE_CHECK = 0.25

_HELD_STATES = frozenset({"received", "crowd_window", "queued", "offered"})
_ACTIVE_STATES = _HELD_STATES | {"assigned"}
_QUEUE_EVENTS = (ContactQueued, ContactOverflowed, ContactEscalated)
_END_EVENTS = (ContactCompleted, ContactAbandoned, ContactRejected)


@dataclass(frozen=True)
class HoldSpec:
    """What a held caller hears: a music-on-hold class and an optional announcement."""

    music_class: str = "default"
    announcement: Announcement | None = None
    #: the Stellwerk queue the caller waits in (None until routed; Twilio enqueues by name)
    queue: str | None = None


@dataclass(frozen=True)
class PbxCall:
    """A caller's call as the PBX has it; ``payload`` is the native payload (e.g. an ARI
    StasisStart) that journals it as a new call, for calls the journal has not seen."""

    call_id: str
    payload: bytes


@dataclass(frozen=True)
class PbxLeg:
    """An agent leg Stellwerk placed for ``offer_id`` to connect ``call_id``."""

    offer_id: str
    call_id: str
    answered: bool


@dataclass(frozen=True)
class PbxView:
    """What the PBX has right now: callers (by call id) and agent legs (by offer id)."""

    calls: Mapping[str, PbxCall] = field(default_factory=dict)
    legs: Mapping[str, PbxLeg] = field(default_factory=dict)


class PbxEvents(Protocol):
    """What a driver reports to its connector (the connector implements it)."""

    async def call_arrived(self, call_id: str, payload: bytes) -> bool:
        """A caller's call is there (native payload); True once it is journaled."""
        ...

    async def call_ended(self, call_id: str, payload: bytes) -> None:
        """The caller hung up (native payload of the hang-up)."""
        ...

    async def leg_answered(self, offer_id: str) -> None:
        """The agent leg placed for ``offer_id`` was answered."""
        ...

    async def leg_failed(self, offer_id: str, reason: LegFailure) -> None:
        """The agent leg for ``offer_id`` ended unanswered."""
        ...

    async def leg_hung_up(self, offer_id: str) -> None:
        """The agent hung up the answered leg for ``offer_id``."""
        ...

    async def connected(self) -> None:
        """The driver (re)connected and :meth:`PbxDriver.view` is current: reconcile."""
        ...


class PbxDriver(Protocol):
    """One telephony system's adapter: the call-control port (docs/telephony.md).

    ``call_id`` is the system's own id of the caller's call, the ContactEvent's
    ``external_id`` (ARI channel id, FreeSWITCH Unique-ID, Twilio CallSid). Actions are
    idempotent (holding a held call, hanging up a gone one are no-ops) and raise on a PBX
    failure; the connector logs it and reconciles after the reconnect.
    """

    source: str
    """The ContactEvent ``source`` of this system's calls (``asterisk-ari`` ...)."""

    async def run(self, events: PbxEvents) -> None:
        """Connect and keep connected (capped jittered back-off), report happenings to
        ``events`` and call ``events.connected()`` after each (re)connect. Runs until
        cancelled."""
        ...

    def view(self) -> PbxView | None:
        """The PBX's calls and Stellwerk's agent legs now; None while not connected."""
        ...

    async def hold(self, call_id: str, spec: HoldSpec) -> None:
        """Answer the caller if need be and hold it with ``spec``'s music (and announcement)."""
        ...

    async def ring(self, offer_id: str, call_id: str, endpoint: str, timeout: float) -> None:
        """Ring ``endpoint`` for ``offer_id`` (the offer id travels with the leg)."""
        ...

    async def stop_ring(self, offer_id: str) -> None:
        """Hang up the agent leg of ``offer_id`` (ringing or not)."""
        ...

    async def bridge(self, call_id: str, offer_id: str) -> None:
        """Connect the caller with the answered agent leg of ``offer_id``."""
        ...

    async def hangup(self, call_id: str) -> None:
        """End the call: the caller, its agent legs and whatever holds or bridges them."""
        ...

    def ended_payload(self, call_id: str) -> bytes:
        """A native payload that journals ``call_id`` as ended (for reconciliation)."""
        ...

    def http_routes(self) -> Sequence[web.RouteDef]:
        """Routes the system needs on the daemon's HTTP listener (webhooks, sockets)."""
        ...

    def openapi_paths(self) -> Mapping[str, Any]:
        """The OpenAPI path items of :meth:`http_routes` (``/v1/openapi.json``)."""
        ...


# The worker's items besides command batches.
@dataclass(frozen=True)
class _Reconcile:
    pass


@dataclass(frozen=True)
class _HoldDefault:
    call_id: str


@dataclass(frozen=True)
class _BridgeNow:
    call_id: str
    offer_id: str


_Item = Sequence[Command] | _Reconcile | _HoldDefault | _BridgeNow


class TelephonyConnector:
    """Carries out the engine's commands on one PBX and journals what happens there."""

    def __init__(
        self,
        system: str,
        driver: PbxDriver,
        intake: Intake,
        table: RoutingTable,
        *,
        clock: Callable[[], float] = time.time,
        queue_size: int = QUEUE_SIZE,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        self.system = system
        self.driver = driver
        self.source = driver.source
        self.name = f"telephony-{system}"
        self._intake = intake
        self._table = table
        self._clock = clock
        self._engine: Engine | None = None
        self._work: asyncio.Queue[_Item] = asyncio.Queue(queue_size)
        self._idle = asyncio.Event()
        self._idle.set()
        # Set by the first restored(): only the lease holder talks to the PBX (a standby on
        # the same Stasis app would take its events away).
        self._tenure = asyncio.Event()
        # Whether this daemon still holds the routing lease (AppState.lease_held); when it is
        # lost the driver lets go of the PBX until the next tenure.
        self._leading = leading
        self._tenures = 0
        # offer id -> (agent id, contact id) of the legs this connector rang.
        self._offers: dict[str, tuple[str, str]] = {}
        # offer id -> contact id: legs rung for an assignment (desktop offers), bridged on answer.
        self._desk_legs: dict[str, tuple[str, str]] = {}
        # contact id -> offer id whose leg answered (bridged on contact.assigned).
        self._answered: dict[str, str] = {}
        # call id -> what it is held with (so the default hold never replaces the queue's).
        self._held: dict[str, HoldSpec] = {}
        # call id -> native payload of arrivals and hang-ups the journal could not take (Redis
        # down): retried until journaled, so no caller waits unanswered for a restart and no
        # hung-up call stays queued.
        self._unjournaled: dict[str, bytes] = {}
        self._unjournaled_ends: dict[str, bytes] = {}

    # ---- CommandSink ----------------------------------------------------------------------

    async def submit(self, cmds: Sequence[Command]) -> None:
        """Queue the commands for the worker (bounded: a full queue holds routing back)."""
        mine = [c for c in cmds if self._concerns(c)]
        if mine:
            self._idle.clear()
            await self._work.put(mine)

    async def restored(self, engine: Engine) -> None:
        """A lease tenure began: keep the engine as a read-only view, reconcile with the PBX."""
        self._engine = engine
        self._tenures += 1
        self._tenure.set()
        await self._enqueue(_Reconcile())

    # ---- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """The driver's connection, the command worker and the retries, until cancelled. They
        run while this daemon holds the routing lease: from each :meth:`restored` until the
        lease is lost (a standby never connects: it would take the PBX's events away)."""
        while True:
            await self._tenure.wait()
            tenure = self._tenures
            log.info("telephony.started", system=self.system)
            tasks = [
                asyncio.create_task(self.driver.run(self), name=f"{self.name}.driver"),
                asyncio.create_task(self._worker(), name=f"{self.name}.worker"),
                asyncio.create_task(self._retry_arrivals(), name=f"{self.name}.retry"),
            ]
            watch = asyncio.create_task(self._lease_lost(), name=f"{self.name}.lease")
            try:
                done, _ = await asyncio.wait([*tasks, watch], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (*tasks, watch):
                    task.cancel()
                await asyncio.gather(*tasks, watch, return_exceptions=True)
            for task in done:
                exc = None if task is watch or task.cancelled() else task.exception()
                if exc is not None:
                    raise exc
            log.warning("telephony.stopped", system=self.system, reason="lease_lost")
            if self._tenures != tenure:
                continue  # a new tenure began meanwhile: carry on with it
            self._tenure.clear()
            self._engine = None
            while not self._work.empty():
                self._work.get_nowait()
                self._work.task_done()
            self._idle.set()

    async def _lease_lost(self) -> None:
        leading = self._leading
        if leading is None:
            await asyncio.Event().wait()
            return
        while leading():
            await asyncio.sleep(LEASE_CHECK)

    async def _retry_arrivals(self) -> None:
        delays = backoff()
        failures = 0
        while True:
            await asyncio.sleep(delays.compute(failures) if failures else RETRY_INTERVAL)
            if not self._unjournaled and not self._unjournaled_ends:
                failures = 0
                continue
            view = self.driver.view()
            ok = True
            for call_id, payload in list(self._unjournaled.items()):
                if view is not None and call_id not in view.calls:
                    # The caller gave up meanwhile: journal the end after the start.
                    self._unjournaled_ends.setdefault(call_id, self.driver.ended_payload(call_id))
                ok = await self.call_arrived(call_id, payload)
                if not ok:
                    break
            for call_id, payload in list(self._unjournaled_ends.items()):
                if not ok or call_id in self._unjournaled:
                    break
                ok = await self._journal_end(call_id, payload)
            failures = 0 if ok else failures + 1

    async def drain(self) -> None:
        """Wait until every queued command was carried out (for a graceful shutdown)."""
        await self._idle.wait()

    def http_routes(self) -> Sequence[web.RouteDef]:
        """The driver's routes for the daemon's HTTP listener."""
        return self.driver.http_routes()

    def openapi_paths(self) -> Mapping[str, Any]:
        """How ``/v1/openapi.json`` describes :meth:`http_routes`."""
        return self.driver.openapi_paths()

    async def _enqueue(self, item: _Item) -> None:
        self._idle.clear()
        await self._work.put(item)

    async def _worker(self) -> None:
        while True:
            item = await self._work.get()
            try:
                if isinstance(item, _Reconcile):
                    await self._reconcile()
                elif isinstance(item, _HoldDefault):
                    if item.call_id not in self._held:
                        await self._hold(item.call_id, HoldSpec())
                elif isinstance(item, _BridgeNow):
                    await self._act("bridge", self.driver.bridge(item.call_id, item.offer_id))
                else:
                    for cmd in item:
                        await self._apply(cmd)
            except Exception:
                # A bug or a PBX failure the driver did not expect: the engine's decision
                # stands; the next reconciliation repairs the PBX's side.
                log.exception("telephony.worker_failed", system=self.system)
            finally:
                self._work.task_done()
                if self._work.empty():
                    self._idle.set()

    # ---- engine commands -> PBX actions ---------------------------------------------------

    def _concerns(self, cmd: Command) -> bool:
        if isinstance(cmd, OfferCmd):
            return cmd.contact.source == self.source
        if isinstance(cmd, CancelOfferCmd):
            return cmd.contact_id.startswith(self.source + ":") or cmd.offer_id in self._offers
        if isinstance(cmd, EventCmd):
            return isinstance(cmd.event, ContactEventBase) and cmd.event.source == self.source
        return isinstance(cmd, RefusedCmd) and cmd.detail in self._offers

    def _tables(self) -> RoutingTable:
        return self._engine.table if self._engine is not None else self._table

    def _call_id(self, contact_id: str) -> str:
        return contact_id[len(self.source) + 1 :]

    def _spec(self, queue: str | None) -> HoldSpec:
        cfg = self._tables().file.queues.get(queue or "")
        if cfg is None:
            return HoldSpec()
        return HoldSpec(music_class=cfg.music_class, announcement=cfg.announcement, queue=queue)

    def _phone_offer(self, queue: str) -> str:
        cfg = self._tables().file.queues.get(queue)
        return cfg.phone_offer if cfg is not None else "phone"

    def _endpoint(self, agent_id: str) -> str | None:
        for agent in self._tables().file.agents:
            if agent.id == agent_id:
                value: str | None = getattr(agent.endpoints, self.system, None)
                return value
        return None

    async def _apply(self, cmd: Command) -> None:
        if isinstance(cmd, OfferCmd):
            if cmd.contact.channel == "phone" and self._phone_offer(cmd.queue) == "phone":
                await self._ring_offer(
                    cmd.offer_id, cmd.agent_id, cmd.contact_id, cmd.expires_at - self._clock()
                )
        elif isinstance(cmd, CancelOfferCmd):
            if self._offers.pop(cmd.offer_id, None) is not None:
                if self._answered.get(cmd.contact_id) == cmd.offer_id:
                    del self._answered[cmd.contact_id]
                await self._act("stop_ring", self.driver.stop_ring(cmd.offer_id))
        elif isinstance(cmd, RefusedCmd):
            # The engine refused the accept of an answered leg (the offer had just expired):
            # that agent must not stay on a line to nobody.
            self._offers.pop(cmd.detail, None)
            await self._act("stop_ring", self.driver.stop_ring(cmd.detail))
        elif isinstance(cmd, EventCmd):
            await self._on_event(cmd)

    async def _on_event(self, cmd: EventCmd) -> None:
        event = cmd.event
        if not isinstance(event, ContactEventBase) or event.channel != "phone":
            return
        contact_id = event.contact_id
        call_id = self._call_id(contact_id)
        if isinstance(event, _QUEUE_EVENTS):
            await self._hold(call_id, self._spec(event.queue))
        elif isinstance(event, ContactAssigned):
            agent_id = event.agent_id
            offer_id = self._answered.pop(contact_id, None)
            if offer_id is not None:
                self._offers.pop(offer_id, None)
                self._held.pop(call_id, None)
                await self._act("bridge", self.driver.bridge(call_id, offer_id))
                return
            # Accepted on the desktop (a desktop queue, or an agent without a phone here):
            # now ring the agent and bridge on answer.
            endpoint = self._endpoint(agent_id)
            engine = self._engine
            contact = engine.state.contacts.get(contact_id) if engine is not None else None
            leg_id = (contact.accepted_offer if contact is not None else None) or f"a{contact_id}"
            if endpoint is not None:
                self._desk_legs[leg_id] = (agent_id, contact_id)
                timeout = self._offer_timeout(event.queue or "")
                await self._act("ring", self.driver.ring(leg_id, call_id, endpoint, timeout))
        elif isinstance(event, _END_EVENTS):
            self._forget_call(contact_id, call_id)
            await self._act("hangup", self.driver.hangup(call_id))

    def _offer_timeout(self, queue: str) -> float:
        file = self._tables().file
        cfg = file.queues.get(queue)
        timeout = cfg.offer_timeout if cfg is not None else None
        return (timeout if timeout is not None else file.defaults.offer_timeout) + RING_GRACE

    def _forget_call(self, contact_id: str, call_id: str) -> None:
        self._held.pop(call_id, None)
        self._answered.pop(contact_id, None)
        for table in (self._offers, self._desk_legs):
            for offer_id in [o for o, (_, c) in table.items() if c == contact_id]:
                del table[offer_id]

    async def _ring_offer(
        self, offer_id: str, agent_id: str, contact_id: str, remaining: float
    ) -> None:
        endpoint = self._endpoint(agent_id)
        if endpoint is None:
            log.info("telephony.no_endpoint", system=self.system, agent_id=agent_id)
            return
        self._offers[offer_id] = (agent_id, contact_id)
        timeout = max(1.0, remaining) + RING_GRACE
        call_id = self._call_id(contact_id)
        await self._act("ring", self.driver.ring(offer_id, call_id, endpoint, timeout))

    async def _hold(self, call_id: str, spec: HoldSpec) -> None:
        if self._held.get(call_id) == spec:
            return
        self._held[call_id] = spec
        await self._act("hold", self.driver.hold(call_id, spec))

    async def _act(self, what: str, action: Awaitable[None]) -> None:
        try:
            await action
        except Exception as exc:
            log.warning("telephony.action_failed", system=self.system, action=what, error=str(exc))

    # ---- PBX happenings -> journal (PbxEvents) ----------------------------------------------

    async def call_arrived(self, call_id: str, payload: bytes) -> bool:
        """Journal the call (native payload), then hold it with the default music."""
        try:
            result = await self._intake.accept(self.source, payload)
        except JournalUnavailable:
            # Not journaled: not answered either; retried until Redis takes it.
            log.error("telephony.call_not_journaled", system=self.system, call_id=call_id)
            self._unjournaled[call_id] = payload
            return False
        self._unjournaled.pop(call_id, None)
        if not result.ok:
            log.warning("telephony.call_refused", system=self.system, reason=result.reason)
            await self._act("hangup", self.driver.hangup(call_id))
            return False
        await self._enqueue(_HoldDefault(call_id))
        return True

    async def call_ended(self, call_id: str, payload: bytes) -> None:
        """Journal the caller's hang-up; the engine's answer cleans up."""
        if call_id in self._unjournaled:
            self._unjournaled_ends[call_id] = payload  # after its start, which is retried
            return
        await self._journal_end(call_id, payload)

    async def _journal_end(self, call_id: str, payload: bytes) -> bool:
        try:
            await self._intake.accept(self.source, payload)
        except JournalUnavailable:
            log.error("telephony.end_not_journaled", system=self.system, call_id=call_id)
            self._unjournaled_ends[call_id] = payload
            return False
        self._unjournaled_ends.pop(call_id, None)
        return True

    async def leg_answered(self, offer_id: str) -> None:
        """Agent answered: accept the offer (or, for a desktop assignment, bridge now)."""
        desk = self._desk_legs.pop(offer_id, None)
        if desk is not None:
            call_id = self._call_id(desk[1])
            self._held.pop(call_id, None)
            self._offers[offer_id] = desk
            await self._enqueue(_BridgeNow(call_id, offer_id))
            return
        who = self._offer_owner(offer_id)
        if who is None:
            log.info("telephony.leg_for_unknown_offer", system=self.system, offer_id=offer_id)
            await self._act("stop_ring", self.driver.stop_ring(offer_id))
            return
        agent_id, contact_id = who
        self._answered[contact_id] = offer_id
        await self._agent_command(agent_id, {"op": "accept", "offer_id": offer_id})

    async def leg_failed(self, offer_id: str, reason: LegFailure) -> None:
        """Busy, declined or failed: reject; no answer: left to the offer's expiry."""
        self._desk_legs.pop(offer_id, None)
        who = self._offers.pop(offer_id, None) or self._offer_owner(offer_id)
        if who is None or reason == "noanswer":
            return
        await self._agent_command(
            who[0], {"op": "reject", "offer_id": offer_id, "reason": f"phone_{reason}"}
        )

    async def leg_hung_up(self, offer_id: str) -> None:
        """The agent hung up: the contact is complete."""
        who = self._offers.pop(offer_id, None) or self._offer_owner(offer_id)
        if who is None:
            return
        agent_id, contact_id = who
        await self._agent_command(agent_id, {"op": "complete", "contact_id": contact_id})

    async def connected(self) -> None:
        """The PBX is (back): reconcile."""
        await self._enqueue(_Reconcile())

    def _offer_owner(self, offer_id: str) -> tuple[str, str] | None:
        known = self._offers.get(offer_id)
        if known is not None:
            return known
        engine = self._engine
        if engine is None:
            return None
        offer = engine.state.offers.get(offer_id)
        if offer is not None:
            return offer.agent_id, offer.contact_id
        for contact in engine.state.contacts.values():
            if contact.accepted_offer == offer_id and contact.agent_id is not None:
                return contact.agent_id, contact.id
        return None

    async def _agent_command(self, agent_id: str, body: dict[str, str]) -> None:
        try:
            result = await self._intake.accept_agent_command(agent_id, json.dumps(body).encode())
        except JournalUnavailable:
            log.error("telephony.command_not_journaled", system=self.system, op=body["op"])
            return
        if not result.ok:
            log.error("telephony.command_refused", system=self.system, reason=result.reason)

    # ---- reconciliation ---------------------------------------------------------------------

    async def _reconcile(self) -> None:
        view = self.driver.view()
        engine = self._engine
        if view is None or engine is None:
            return  # done when both are there: on the next connect or restore
        st = engine.state
        src = self.source + ":"
        # Decide first (the engine does not change while this runs without awaiting), act after.
        journal_new: list[PbxCall] = []
        journal_end: list[str] = []
        hang_up: list[str] = []
        hold: list[tuple[str, HoldSpec]] = []
        stop: list[str] = []
        bridge: list[tuple[str, str]] = []
        ring: list[tuple[str, str, str, float]] = []
        accept: list[tuple[str, str, str]] = []
        for call_id, call in view.calls.items():
            contact = st.contacts.get(src + call_id)
            if contact is None:
                if src + call_id in st.finished:
                    hang_up.append(call_id)
                else:
                    journal_new.append(call)
            elif contact.state in _HELD_STATES:
                hold.append((call_id, self._spec(contact.queue)))
        for contact in st.contacts.values():
            call_id = self._call_id(contact.id)
            if (
                contact.id.startswith(src)
                and contact.state in _ACTIVE_STATES
                and call_id not in view.calls
            ):
                journal_end.append(call_id)
        now = self._clock()
        for offer_id, leg in view.legs.items():
            offer = st.offers.get(offer_id)
            if offer is not None:
                self._offers[offer_id] = (offer.agent_id, offer.contact_id)
                if leg.answered and self._answered.get(offer.contact_id) != offer_id:
                    accept.append((offer.agent_id, offer.contact_id, offer_id))
                continue
            contact = st.contacts.get(src + leg.call_id)
            if (
                contact is not None
                and contact.state == "assigned"
                and contact.accepted_offer == offer_id
                and contact.agent_id is not None
            ):
                self._offers[offer_id] = (contact.agent_id, contact.id)
                if leg.answered and leg.call_id in view.calls:
                    bridge.append((leg.call_id, offer_id))
                continue
            stop.append(offer_id)
        for offer in st.offers.values():
            contact = st.contacts.get(offer.contact_id)
            if (
                contact is None
                or not contact.id.startswith(src)
                or offer.id in view.legs
                or self._call_id(contact.id) not in view.calls
                or self._phone_offer(contact.queue) != "phone"
            ):
                continue
            endpoint = self._endpoint(offer.agent_id)
            if endpoint is not None:
                self._offers[offer.id] = (offer.agent_id, contact.id)
                timeout = max(1.0, offer.expires_at - now) + RING_GRACE
                ring.append((offer.id, self._call_id(contact.id), endpoint, timeout))
        log.info(
            "telephony.reconciled",
            system=self.system,
            pbx_calls=len(view.calls),
            pbx_legs=len(view.legs),
            journaled_new=len(journal_new),
            journaled_end=len(journal_end),
            hung_up=len(hang_up),
            legs_stopped=len(stop),
            rung_again=len(ring),
        )
        for call_id in hang_up:
            await self._act("hangup", self.driver.hangup(call_id))
        for offer_id in stop:
            self._offers.pop(offer_id, None)
            await self._act("stop_ring", self.driver.stop_ring(offer_id))
        for call in journal_new:
            with contextlib.suppress(JournalUnavailable):
                result = await self._intake.accept(self.source, call.payload)
                if result.ok:
                    await self._hold(call.call_id, HoldSpec())
        for call_id in journal_end:
            await self.call_ended(call_id, self.driver.ended_payload(call_id))
        for call_id, spec in hold:
            # Held again even if this connector thinks it is: after a restart or a reconnect
            # nobody knows whether the music survived.
            self._held[call_id] = spec
            await self._act("hold", self.driver.hold(call_id, spec))
        for call_id, offer_id in bridge:
            await self._act("bridge", self.driver.bridge(call_id, offer_id))
        for agent_id, contact_id, offer_id in accept:
            self._answered[contact_id] = offer_id
            await self._agent_command(agent_id, {"op": "accept", "offer_id": offer_id})
        for offer_id, call_id, endpoint, timeout in ring:
            await self._act("ring", self.driver.ring(offer_id, call_id, endpoint, timeout))
