"""Intake: the one path every transport (MQTT, HTTP, SMTP) takes into the journal.

``accept(source, body, headers)`` decodes the native payload with the source's decoder. A payload
the decoder rejects goes to the dead-letter stream with its reason, is counted and logged once,
and the result says ``rejected`` (the transport still acknowledges it: redelivering bad bytes
helps nobody). Decoded events are appended to the journal; only then does the result say
``accepted`` and the transport may acknowledge. :class:`~router.daemon.journal.JournalUnavailable`
propagates: Redis is down, nothing was kept, the transport must NOT acknowledge (HTTP 503,
SMTP 451, no PUBACK).

Agent commands from MQTT take the same route (:meth:`Intake.accept_agent_command`), so the
router replays them like everything else; the agent id always comes from the topic. Admin
API changes (experts, identity links; :meth:`Intake.accept_admin`) are journaled too.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from channels.base import DecodeConfig, Rejected
from channels.contact_event import ContactEvent
from router.daemon.journal import AdminEntry, AgentEntry, ContactEntry, Journal, JournalEntry
from router.daemon.metrics import Metrics
from router.messages import AGENT_COMMAND_DECODER, AdminCommand

log = structlog.get_logger("stellwerk.intake")

DecodeFn = Callable[[str, bytes, Mapping[str, str], DecodeConfig], list[ContactEvent]]
EventObserver = Callable[[Sequence[ContactEvent]], Awaitable[None]]
OBSERVE_TIMEOUT = 0.5
"""Seconds the event observers (transcripts) may take per delivery before intake goes on."""
AGENT_COMMAND_SOURCE = "agent-cmd"
"""The dead-letter/metric ``source`` of agent commands that do not decode."""


@dataclass(frozen=True)
class IntakeResult:
    """What became of one delivery: ``accepted`` events journaled, or ``reason`` it was refused.

    ``accepted == 0`` with no reason is a valid delivery that carried nothing for the router
    (a delivery receipt, an agent's own chat message): acknowledge it as a success.
    """

    accepted: int = 0
    reason: str | None = None
    detail: str = ""
    ids: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True unless the payload was rejected."""
        return self.reason is None


def _registry_decode() -> DecodeFn:
    # Imported late: channels.registry pulls in every decoder, which tests of the journal do
    # not need.
    module = importlib.import_module("channels.registry")
    decode: DecodeFn = module.decode
    return decode


class Intake:
    """Decode, dead-letter or journal; shared by every transport."""

    def __init__(
        self,
        journal: Journal,
        config: DecodeConfig,
        *,
        metrics: Metrics | None = None,
        decode: DecodeFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.journal = journal
        self.config = config
        self.metrics = metrics
        self._decode = decode or _registry_decode()
        self._clock = clock
        #: called with the decoded events of each delivery while they are journaled (the
        #: desk's transcript store keeps the message bodies there); they must not raise.
        self.observers: list[EventObserver] = []

    async def accept(
        self, source: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> IntakeResult:
        """Decode one delivery from ``source`` and journal its events (see module docstring)."""
        hdrs: Mapping[str, str] = headers or {}
        try:
            events = self._decode(source, body, hdrs, self.config)
        except Rejected as exc:
            return await self._reject(source, exc.reason, exc.detail, body, hdrs)
        at = self._clock()
        entries: list[JournalEntry] = [ContactEntry(event=e, at=at) for e in events]
        ids = await self._append(entries, events)
        self._count(events)
        return IntakeResult(accepted=len(ids), ids=tuple(ids))

    async def accept_many(
        self, deliveries: Sequence[tuple[str, bytes, Mapping[str, str]]]
    ) -> list[IntakeResult]:
        """Like :meth:`accept` for several deliveries, journaled in one round trip, in order.

        All or nothing: JournalUnavailable means none of them may be acknowledged.
        """
        results: list[IntakeResult | None] = []
        entries: list[JournalEntry] = []
        spans: list[tuple[int, int]] = []
        accepted_events: list[ContactEvent] = []
        at = self._clock()
        for source, body, hdrs in deliveries:
            try:
                events = self._decode(source, body, hdrs, self.config)
            except Rejected as exc:
                results.append(await self._reject(source, exc.reason, exc.detail, body, hdrs))
                spans.append((0, 0))
                continue
            results.append(None)
            spans.append((len(entries), len(events)))
            entries.extend(ContactEntry(event=e, at=at) for e in events)
            accepted_events.extend(events)
        ids = await self._append(entries, accepted_events)
        self._count(accepted_events)
        out: list[IntakeResult] = []
        for result, (start, n) in zip(results, spans, strict=True):
            out.append(result or IntakeResult(accepted=n, ids=tuple(ids[start : start + n])))
        return out

    async def accept_agent_command(self, agent_id: str, body: bytes) -> IntakeResult:
        """Journal one agent command from ``{prefix}/agents/{agent_id}/cmd``.

        The payload's own ``agent_id`` (if any) is ignored: the topic says who is speaking.
        """
        return (await self.accept_agent_commands([(agent_id, body)]))[0]

    async def accept_agent_commands(
        self, commands: Sequence[tuple[str, bytes]]
    ) -> list[IntakeResult]:
        """Several agent commands in one round trip (see :meth:`accept_agent_command`)."""
        results: list[IntakeResult | None] = []
        entries: list[JournalEntry] = []
        at = self._clock()
        for agent_id, body in commands:
            try:
                cmd = AGENT_COMMAND_DECODER.decode(body)
            except msgspec.DecodeError as exc:
                # ValidationError: JSON, but not a command we know (wrong op, missing field).
                reason = "bad_command" if isinstance(exc, msgspec.ValidationError) else "not_json"
                results.append(
                    await self._reject(
                        AGENT_COMMAND_SOURCE, reason, str(exc), body, {"agent_id": agent_id}
                    )
                )
                continue
            results.append(None)
            entries.append(AgentEntry(cmd=msgspec.structs.replace(cmd, agent_id=agent_id), at=at))
        ids = iter(await self.journal.append_many(entries))
        return [r or IntakeResult(accepted=1, ids=(next(ids),)) for r in results]

    async def accept_admin(self, cmd: AdminCommand) -> str:
        """Journal one admin command (already validated by the HTTP API); its journal id.

        Raises JournalUnavailable like every other intake path: the API then answers 503.
        """
        return await self.journal.append(AdminEntry(cmd=cmd, at=self._clock()))

    async def _reject(
        self, source: str, reason: str, detail: str, body: bytes, headers: Mapping[str, str]
    ) -> IntakeResult:
        # Kept before it is counted: if Redis is down this raises and the sender retries.
        await self.journal.dead_letter(source, reason, detail, body, headers)
        if self.metrics is not None:
            self.metrics.observe_rejected(source, reason)
        log.warning(
            "input.rejected", source=source, reason=reason, detail=detail[:300], size=len(body)
        )
        return IntakeResult(reason=reason, detail=detail)

    async def _append(
        self, entries: list[JournalEntry], events: Sequence[ContactEvent]
    ) -> list[str]:
        if not events or not self.observers:
            return await self.journal.append_many(entries)
        # The observers' writes go out first and side by side with the journal's: whoever
        # reads a body when the router announces its event (contact.updated) finds it there,
        # and a slow or hung Redis costs one timeout, not two. Bounded: an observer is a
        # nicety, the journal write is what the sender waits for.
        journaled = self.journal.append_many(entries)
        results = await asyncio.gather(
            *(self._observe(o, events) for o in self.observers), journaled
        )
        ids: list[str] = results[-1]  # type: ignore[assignment]
        return ids

    async def _observe(self, observer: EventObserver, events: Sequence[ContactEvent]) -> None:
        try:
            async with asyncio.timeout(OBSERVE_TIMEOUT):
                await observer(events)
        except TimeoutError:
            log.warning("intake.observer_timed_out", events=len(events), after=OBSERVE_TIMEOUT)

    def _count(self, events: Sequence[ContactEvent]) -> None:
        if self.metrics is not None:
            for event in events:
                self.metrics.observe_received(event)


def headers_of(items: Mapping[str, Any]) -> dict[str, str]:
    """Lower-cased string headers, as the decoders expect them."""
    return {str(k).lower(): str(v) for k, v in items.items()}
