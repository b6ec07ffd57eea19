"""The wallboard's data: today's counters per queue, the crowd, stuck work (docs/desk.md).

:class:`WallBoard` is a :class:`~router.daemon.sinks.CommandSink`. It counts the engine's events
into per-day counters and computes the board from the engine's read-only views
(``queue_stats``, ``floor_view``, ``experts_report``) plus those counters; the desk service
pushes the board to every open wallboard when something changed.

**Today.** A day runs from midnight to midnight in the routing file's ``timezone``, in the
engine's time (each event's ``at``), so a replay or a standby that takes over files every event
under the same day. The counters are kept per day in Redis (``{key_prefix}wall:day:{date}``, a
hash, kept eight days), saved at most a quarter of a second after the events, so a restart or
a lease take-over keeps today's figures (after a crash, all but that last quarter second).
They count exactly what the engine's running totals count (``entered``, ``answered``,
``answered_in_sla``, ``abandoned`` of ``/v1/queues``), only from midnight on.

**Stuck work.** An agent holding a contact (assigned) longer than ``stuck_factor`` times its
queue's usual handle time (today's mean, or ``default_handle_seconds`` until ``min_samples``
contacts were completed today), and at least ``stuck_min_seconds``, is flagged. The count per
queue is exported as ``stellwerk_contacts_stuck`` (the ``StellwerkStuckContact`` alert).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from router.daemon.config import DeskSettings
from router.daemon.metrics import Metrics
from router.events import (
    ContactAbandoned,
    ContactAnsweredByCrowd,
    ContactAssigned,
    ContactCompleted,
    ContactEventBase,
    ContactQueued,
)
from router.messages import Command, EventCmd, RefusedCmd

if TYPE_CHECKING:
    from router.engine import Engine

log = structlog.get_logger("stellwerk.wall")

DAY_KEEP_SECONDS = 8 * 86_400
COUNTERS = ("entered", "answered", "answered_in_sla", "abandoned", "completed", "handle_sum")
CROWD_COUNTERS = ("answered_by_crowd", "answered_by_agents")


def day_of(at: float, tz: ZoneInfo) -> str:
    """The calendar day (``YYYY-MM-DD``) of engine time ``at`` in ``tz``."""
    return dt.datetime.fromtimestamp(at, tz).date().isoformat()


class DayCounters:
    """One day's counters: ``(queue, counter) -> value`` and the crowd's."""

    def __init__(self) -> None:
        self.queues: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
        self.crowd: dict[str, float] = dict.fromkeys(CROWD_COUNTERS, 0)

    def add(self, field: str, value: float) -> None:
        """Add to ``queue|counter`` or ``crowd|counter``."""
        scope, _, name = field.partition("|")
        if scope == "crowd":
            self.crowd[name] = self.crowd.get(name, 0) + value
        else:
            row = self.queues[scope]
            row[name] = row.get(name, 0) + value

    def usual_handle(self, queue: str, settings: DeskSettings) -> float:
        """The queue's usual handle time today (mean), or the default with too few samples."""
        row = self.queues.get(queue)
        if row is None or row["completed"] < settings.min_samples:
            return settings.default_handle_seconds
        return row["handle_sum"] / row["completed"]


def count_events(
    cmds: Iterable[Command], sla: dict[str, float], tz: ZoneInfo
) -> list[tuple[str, str, float]]:
    """``(day, field, delta)`` for each counter the commands move (pure; see the module doc)."""
    out: list[tuple[str, str, float]] = []
    for cmd in cmds:
        if not isinstance(cmd, EventCmd):
            continue
        event = cmd.event
        if not isinstance(event, ContactEventBase) or not event.queue:
            continue
        queue = event.queue
        day = day_of(event.at, tz)
        if isinstance(event, ContactQueued) and not event.requeued:
            out.append((day, f"{queue}|entered", 1))
        elif isinstance(event, ContactAssigned):
            out.append((day, f"{queue}|answered", 1))
            if event.waited <= sla.get(queue, 0.0):
                out.append((day, f"{queue}|answered_in_sla", 1))
            if event.crowd:
                out.append((day, "crowd|answered_by_agents", 1))
        elif isinstance(event, ContactAbandoned) and event.from_state != "crowd_window":
            out.append((day, f"{queue}|abandoned", 1))
        elif isinstance(event, ContactCompleted):
            out.append((day, f"{queue}|completed", 1))
            out.append((day, f"{queue}|handle_sum", event.handled))
        elif isinstance(event, ContactAnsweredByCrowd):
            out.append((day, "crowd|answered_by_crowd", 1))
    return out


class WallBoard:
    """Counts the engine's events per day and computes the wallboard (a CommandSink)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key_prefix: str,
        settings: DeskSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}wall:day:"
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.days: dict[str, DayCounters] = {}
        self.tz = ZoneInfo("UTC")
        self.sla: dict[str, float] = {}
        self._table: object = None
        self._unsaved: list[tuple[str, str, float]] = []
        #: set on every change; the pusher clears it when it sent the board.
        self.dirty = True
        #: admin refusals (a release of a contact nobody held) to tell the wallboards.
        self.refusals: list[dict[str, Any]] = []

    def _configure(self, engine: Engine) -> None:
        self._table = engine.table
        file = engine.table.file
        self.tz = ZoneInfo(file.timezone)
        self.sla = {name: q.sla.seconds for name, q in file.queues.items()}
        if self.metrics is not None:
            self.metrics.precreate_dispositions(file.queues, file.dispositions)

    def day(self, day: str) -> DayCounters:
        """The counters of ``day``, created empty."""
        found = self.days.get(day)
        if found is None:
            found = self.days[day] = DayCounters()
            # Keep the days a board may still show (today, and yesterday around midnight).
            for old in sorted(self.days)[:-2]:
                del self.days[old]
        return found

    # ---- CommandSink ------------------------------------------------------------------------

    async def restored(self, engine: Engine) -> None:
        """A lease tenure began: load today's counters from Redis."""
        self.engine = engine
        self._configure(engine)
        today = day_of(max(engine.state.clock, 0.0) or dt.datetime.now(dt.UTC).timestamp(), self.tz)
        self.days = {}
        self._unsaved = []  # counted by the previous tenure's flushes, or lost with it
        counters = self.day(today)
        try:
            raw = await self.redis.hgetall(self.prefix + today)  # type: ignore[misc]
        except RedisError as exc:
            log.warning("wall.counters_unreadable", error=str(exc))
            raw = {}
        for field, value in raw.items():
            counters.add(field.decode(), float(value))
        self.dirty = True

    async def submit(self, cmds: Sequence[Command]) -> None:
        """Count the commands' events into today's counters, in Redis and here."""
        if self.engine is not None and self.engine.table is not self._table:
            self._configure(self.engine)  # the rules were reloaded
        for cmd in cmds:
            if isinstance(cmd, RefusedCmd) and cmd.agent_id is None:
                self.refusals.append(
                    {"type": "refused", "reason": cmd.reason, "detail": cmd.detail}
                )
        deltas = count_events(cmds, self.sla, self.tz)
        self.dirty = True
        for day, field, delta in deltas:
            self.day(day).add(field, delta)
        # Saved by flush(), off the routing path: a Redis round trip here would hold up every
        # batch (and widen the window in which a crash makes the next router redo it).
        self._unsaved.extend(deltas)

    async def flush(self) -> None:
        """Save the counts since the last flush to Redis (the desk service calls it often)."""
        if not self._unsaved:
            return
        deltas, self._unsaved = self._unsaved, []
        pipe = self.redis.pipeline(transaction=False)
        summed: dict[tuple[str, str], float] = defaultdict(float)
        for day, field, delta in deltas:
            summed[(self.prefix + day, field)] += delta
        for (key, field), delta in summed.items():
            pipe.hincrbyfloat(key, field, delta)
        for key in {key for key, _ in summed}:
            pipe.expire(key, DAY_KEEP_SECONDS)
        try:
            await pipe.execute()
        except RedisError as exc:
            # Kept for the next flush; the figures shown here are right meanwhile.
            self._unsaved[:0] = deltas
            log.warning("wall.counters_not_saved", error=str(exc), pending=len(self._unsaved))

    # ---- the board --------------------------------------------------------------------------

    def stuck(self, engine: Engine, now: float) -> list[dict[str, Any]]:
        """Contacts held far longer than their queue's usual handle time, longest first."""
        counters = self.day(day_of(now, self.tz))
        names = {a.id: a.name for a in engine.table.file.agents}
        s = self.settings
        found = []
        for held in engine.floor_view()["held"]:
            usual = counters.usual_handle(held["queue"], s)
            limit = max(s.stuck_min_seconds, s.stuck_factor * usual)
            seconds = now - held["assigned_at"]
            if seconds > limit:
                found.append(
                    {
                        **held,
                        "agent_name": names.get(held["agent_id"], ""),
                        "held": round(seconds, 1),
                        "usual": round(usual, 1),
                        "limit": round(limit, 1),
                    }
                )
        found.sort(key=lambda h: -h["held"])
        return found

    def export_stuck(self, engine: Engine, now: float) -> list[dict[str, Any]]:
        """Compute the stuck contacts and set ``stellwerk_contacts_stuck`` per queue."""
        stuck = self.stuck(engine, now)
        if self.metrics is not None:
            per_queue = dict.fromkeys(engine.table.file.queues, 0)
            for item in stuck:
                per_queue[item["queue"]] = per_queue.get(item["queue"], 0) + 1
            for queue, n in per_queue.items():
                self.metrics.contacts_stuck.labels(queue).set(n)
        return stuck

    def board(self, engine: Engine, now: float) -> dict[str, Any]:
        """The whole wallboard as JSON-ready data (what ``/v1/wall/ws`` pushes)."""
        today = day_of(now, self.tz)
        counters = self.day(today)
        floor = engine.floor_view()
        stuck = self.export_stuck(engine, now)
        stuck_per_queue: dict[str, int] = defaultdict(int)
        for item in stuck:
            stuck_per_queue[item["queue"]] += 1
        file = engine.table.file
        queues = []
        for stats in engine.queue_stats(now):
            name = stats["name"]
            row = counters.queues.get(name) or dict.fromkeys(COUNTERS, 0)
            closed = row["answered"] + row["abandoned"]
            agents = floor["agents"].get(name, {})
            queues.append(
                {
                    "name": name,
                    "description": file.queues[name].description if name in file.queues else "",
                    "waiting": stats["waiting"],
                    "oldest_wait": stats["oldest_wait"],
                    "sla_seconds": stats["sla_seconds"],
                    "sla_percent": stats["sla_percent"],
                    "service_level": (row["answered_in_sla"] / closed) if closed else None,
                    "offered": int(row["entered"]),
                    "answered": int(row["answered"]),
                    "abandoned": int(row["abandoned"]),
                    "usual_handle": round(counters.usual_handle(name, self.settings), 1),
                    "agents_ready": stats["agents_ready"],
                    "agents_busy": agents.get("busy", 0),
                    "agents_away": agents.get("away", 0),
                    "agents_not_responding": agents.get("not_responding", 0),
                    "agents_wrap_up": agents.get("wrap_up", 0),
                    "agents_logged_in": agents.get("logged_in", 0),
                    "stuck": stuck_per_queue.get(name, 0),
                }
            )
        summary = engine.experts_report(now).get("summary", {})
        return {
            "type": "board",
            "at": now,
            "day": today,
            "timezone": file.timezone,
            "queues": queues,
            "crowd": {
                "in_crowd_window": floor["crowd_window"],
                "answered_by_crowd": int(counters.crowd.get("answered_by_crowd", 0)),
                "answered_by_agents": int(counters.crowd.get("answered_by_agents", 0)),
                "experts_active_day": summary.get("active_day", 0),
                "experts_active_week": summary.get("active_day", 0) + summary.get("active_week", 0),
                "experts": summary.get("experts", 0),
                "experts_waiting": floor["experts_waiting"],
            },
            "stuck": stuck,
        }
