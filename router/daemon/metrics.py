"""Prometheus metrics of the daemon (docs/operations.md), all prefixed ``stellwerk_``.

One :class:`Metrics` object owns its own :class:`~prometheus_client.CollectorRegistry` (never the
process-wide default one), so every daemon, and every test, has metrics of its own. The router
feeds it the engine's commands (:meth:`Metrics.observe_commands`) and refreshes the queue and
agent gauges from the engine's read-only views (:meth:`Metrics.refresh`); the transports count
rejected inputs (:meth:`Metrics.observe_rejected`). Nothing here touches the engine's state.

Label values come from the routing file (queues, rules), from fixed sets (channels, sources,
states, outcomes) or from the decoders' reason slugs, so cardinality stays bounded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.utils import floatToGoString

from channels.contact_event import CHANNELS, ContactEvent
from router.events import (
    ContactAbandoned,
    ContactAnsweredByCrowd,
    ContactAssigned,
    ContactCompleted,
    ContactCrowdWindow,
    ContactEscalated,
    ContactEventBase,
    ContactOfferExpired,
    ContactOfferRejected,
    ContactOverflowed,
    ContactQueued,
    ContactRejected,
    EngineEvent,
    ExpertAnswered,
)
from router.messages import CancelOfferCmd, Command, EventCmd, OfferCmd, RefusedCmd

if TYPE_CHECKING:
    from rules.table import RoutingTable

__all__ = ["CONTENT_TYPE_LATEST", "EngineView", "Metrics"]

#: A queue's gauges: name, waiting, oldest wait, agents ready, service level, SLA seconds and
#: SLA percent (the last three None when unknown); ``router.views.QueueGauges`` is one.
QueueGauges = tuple[str, float, float, float, float | None, float | None, float | None]

# Contact-centre waits: seconds to an hour; the SLA thresholds people use (10, 20, 30, 60 s)
# are bucket edges so a service level can also be read off the histogram.
WAIT_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)
# A routing decision is microseconds of CPU when all is well; the top buckets catch GC pauses.
DECISION_BUCKETS = (
    0.00002,
    0.00005,
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)
AGENT_STATES = ("offline", "available", "away", "wrap_up", "not_responding")
# The label values known before anything happens, so that every series exists at 0 from the
# start: Prometheus' rate() and increase() cannot see the first event of a series that appears
# at 1 (a first spam mail, a first expert call, a first forged webhook would stay invisible).
# The channels each source's decoder produces (generic carries any channel).
SOURCE_CHANNELS: dict[str, tuple[str, ...]] = {
    "asterisk-ari": ("phone",),
    "freeswitch": ("phone",),
    "twilio-voice": ("phone",),
    "email": ("email",),
    "rocketchat": ("chat",),
    "chatwoot": ("chat",),
    "whatsapp": ("chat",),
    "messenger": ("chat",),
    "discourse": ("social",),
    "x": ("social",),
    "generic": CHANNELS,
}
KINDS = ("new", "update", "end")
WAIT_OUTCOMES = ("assigned", "abandoned")
CROWD_OUTCOMES = ("answered_by_crowd", "assigned", "abandoned")
OFFER_OUTCOMES = ("offered", "accepted", "rejected", "expired")
# router.engine's reasons: why an offer is withdrawn, why an agent or admin command is refused.
CANCEL_REASONS = (
    "answered_by_crowd",
    "contact_ended",
    "rejected",
    "expired",
    "agent_not_responding",
    "agent_away",
    "agent_logout",
)
AGENT_REFUSALS = ("unknown_agent", "unknown_offer", "not_your_offer", "not_your_contact")
ADMIN_REFUSALS = ("unknown_expert", "bad_identity_key")
# Why a restore could not read the snapshot (router.daemon.router_loop).
SNAPSHOT_UNREADABLE_REASONS = ("missing", "damaged")
# The decoders' and the intake's reasons for refusing an input (channels.base.Rejected).
INPUT_REASONS = (
    "bad_signature",
    "bad_shape",
    "bad_timestamp",
    "missing_field",
    "not_json",
    "not_email",
    "unsupported_event",
)
AGENT_COMMAND_SOURCE = "agent-cmd"  # router.daemon.intake's name for agent commands
AGENT_COMMAND_REASONS = ("bad_command", "not_json")
TRANSPORTS = ("mqtt", "http", "smtp")
INGRESS_OUTCOMES = ("accepted", "rejected", "unavailable")
EXPERT_ACTIVITY = ("active_day", "active_week", "inactive", "never_seen")
UNKNOWN = "unknown"
ADMIN_OPS = ("reload", "upsert_expert", "remove_expert", "link_keys")
AUTH_REFUSALS = ("no_token", "bad_token", "wrong_role")


class EngineView(Protocol):
    """What :meth:`Metrics.refresh` reads of the engine (``router.engine.Engine`` has it).

    A view that also has ``queue_gauges(now)`` and ``agent_counts()`` (the engine does) is read
    through those, which count without building a record per agent."""

    def queue_stats(self, now: float) -> list[dict[str, Any]]:
        """Per queue: ``name``, ``waiting``, ``oldest_wait``, ``agents_ready`` ..."""
        ...

    def agent_list(self) -> list[dict[str, Any]]:
        """Per agent: ``id``, ``state`` ..."""
        ...


def _label(value: str | None) -> str:
    if value is None or value == "":
        return UNKNOWN
    return str(value)


class _Children:
    """A labelled metric's children, each looked up once: ``labels()`` checks its arguments,
    converts them and takes the metric's lock on every call, which on the per-call paths cost
    more than the increment itself. Series are never removed behind its back: every
    ``remove`` of a cached metric goes through :meth:`remove`."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        try:
            return self._cache[values]
        except KeyError:
            child = self._cache[values] = self._metric.labels(*values)
            return child

    def remove(self, *values: str) -> None:
        """Drop the series (and forget its child); nothing when it does not exist."""
        self._cache.pop(values, None)
        with contextlib.suppress(KeyError):
            self._metric.remove(*values)


class Metrics:
    """Every metric of the daemon, registered in :attr:`registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # ---- contacts ----
        self.contacts_received = Counter(
            "stellwerk_contacts_received",
            "Contact events accepted into the journal, by channel, source and kind.",
            ["channel", "source", "kind"],
            registry=r,
        )
        self.contacts_routed = Counter(
            "stellwerk_contacts_routed",
            "Contacts a routing decision put into a queue.",
            ["queue", "channel", "source"],
            registry=r,
        )
        self.contacts_assigned = Counter(
            "stellwerk_contacts_assigned",
            "Contacts an agent accepted.",
            ["queue", "channel"],
            registry=r,
        )
        self.contacts_completed = Counter(
            "stellwerk_contacts_completed",
            "Assigned contacts an agent completed.",
            ["queue"],
            registry=r,
        )
        self.contacts_abandoned = Counter(
            "stellwerk_contacts_abandoned",
            "Contacts that ended upstream while queued or offered (caller hung up, chat closed).",
            ["queue", "channel", "source"],
            registry=r,
        )
        self.contacts_answered_by_crowd = Counter(
            "stellwerk_contacts_answered_by_crowd",
            "Community contacts withdrawn because a crowd member answered first.",
            ["queue", "channel", "source"],
            registry=r,
        )
        self.contacts_rejected = Counter(
            "stellwerk_contacts_rejected",
            "Contacts the router refused: a rule's reject reason (spam ...) or queue_full.",
            ["reason"],
            registry=r,
        )
        self.contacts_crowd_first = Counter(
            "stellwerk_contacts_crowd_first",
            "Contacts that first wait for the crowd (community) before they are queued.",
            ["channel"],
            registry=r,
        )
        self.contacts_escalated = Counter(
            "stellwerk_contacts_escalated",
            "Escalation steps taken (skills widened, priority raised or queue changed).",
            ["queue"],
            registry=r,
        )
        self.contacts_overflowed = Counter(
            "stellwerk_contacts_overflowed",
            "Contacts moved to an overflow queue (max wait or max length reached).",
            ["queue"],
            registry=r,
        )
        self.rule_hits = Counter(
            "stellwerk_rule_hits",
            "Routing decisions per rule that decided them.",
            ["rule"],
            registry=r,
        )
        self.wait_seconds = Histogram(
            "stellwerk_wait_seconds",
            "Time from arrival to the end of waiting: outcome=assigned (answered) or abandoned.",
            ["queue", "channel", "outcome"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.handle_seconds = Histogram(
            "stellwerk_handle_seconds",
            "Time an agent held a contact, from accept to complete.",
            ["queue"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        # ---- experts ----
        self.expert_contacts = Counter(
            "stellwerk_expert_contacts",
            "Contacts from recognised crowd experts, by how they ended their wait.",
            ["channel", "outcome"],
            registry=r,
        )
        self.expert_wait_seconds = Histogram(
            "stellwerk_expert_wait_seconds",
            "Wait of crowd experts' contacts until answered or abandoned.",
            ["channel", "outcome"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        # ---- the crowd: backstop outcomes, answers, the experts' activity ----
        self.crowd_outcomes = Counter(
            "stellwerk_crowd_outcomes",
            "How crowd-first (community) contacts ended: answered_by_crowd, assigned (an agent "
            "took it after the crowd window) or abandoned (the asker closed or deleted it).",
            ["channel", "source", "outcome"],
            registry=r,
        )
        self.crowd_answers = Counter(
            "stellwerk_crowd_answers",
            "Crowd-first contacts answered by the crowd, by who answered: a registered expert "
            "or another community member.",
            ["by"],
            registry=r,
        )
        self.expert_answers = Counter(
            "stellwerk_expert_answers",
            "Answers by registered experts in community threads not their own (also in threads "
            "the router never routed).",
            registry=r,
        )
        self.experts = Gauge(
            "stellwerk_experts",
            "Registered crowd experts by activity: active_day, active_week (but not the last "
            "day), inactive (longer) and never_seen (from the experts report).",
            ["activity"],
            registry=r,
        )
        self.experts_never_answered = Gauge(
            "stellwerk_experts_never_answered",
            "Registered crowd experts who never answered a community question.",
            registry=r,
        )
        self.admin_commands_refused = Counter(
            "stellwerk_admin_commands_refused",
            "Admin API commands the engine refused (unknown_expert, bad_identity_key).",
            ["reason"],
            registry=r,
        )
        # ---- queues (gauges, refreshed from engine.queue_stats) ----
        self.queue_waiting = Gauge(
            "stellwerk_queue_waiting", "Contacts waiting in the queue.", ["queue"], registry=r
        )
        self.queue_oldest_wait = Gauge(
            "stellwerk_queue_oldest_wait_seconds",
            "Wait of the longest-waiting contact in the queue (0 when empty).",
            ["queue"],
            registry=r,
        )
        self.queue_agents_ready = Gauge(
            "stellwerk_queue_agents_ready",
            "Agents who could take a contact of the queue right now.",
            ["queue"],
            registry=r,
        )
        self.service_level = Gauge(
            "stellwerk_service_level_ratio",
            "Share of the queue's contacts answered within its SLA seconds, as the engine counts "
            "it (answered within / (answered + abandoned)); absent until a contact closed.",
            ["queue"],
            registry=r,
        )
        self.sla_seconds = Gauge(
            "stellwerk_queue_sla_seconds",
            "The queue's SLA threshold in seconds (from the routing file).",
            ["queue"],
            registry=r,
        )
        self.sla_target = Gauge(
            "stellwerk_queue_sla_target_ratio",
            "The queue's SLA target share (from the routing file), for alerting.",
            ["queue"],
            registry=r,
        )
        # ---- offers and agents ----
        self.offers = Counter(
            "stellwerk_offers",
            "Offers made and how they ended: offered, accepted, rejected, expired.",
            ["outcome"],
            registry=r,
        )
        self.offers_cancelled = Counter(
            "stellwerk_offers_cancelled",
            "Offers withdrawn from an agent, by reason.",
            ["reason"],
            registry=r,
        )
        self.agents = Gauge(
            "stellwerk_agents",
            "Agents by state (from the engine's agent list).",
            ["state"],
            registry=r,
        )
        self.agents_busy = Gauge(
            "stellwerk_agents_busy",
            "Agents holding an offer or a contact (busy is derived from capacity in use).",
            registry=r,
        )
        self.agent_commands_refused = Counter(
            "stellwerk_agent_commands_refused",
            "Agent commands the engine refused (not your offer, unknown agent ...).",
            ["reason"],
            registry=r,
        )
        # ---- the daemon itself ----
        self.decision_seconds = Histogram(
            "stellwerk_routing_decision_seconds",
            "Time the engine took to handle one journal entry (CPU time of the decision).",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.rejected_inputs = Counter(
            "stellwerk_rejected_inputs",
            "Inputs refused at ingress and kept in the dead-letter stream.",
            ["source", "reason"],
            registry=r,
        )
        self.ingress = Counter(
            "stellwerk_ingress_deliveries",
            "Deliveries per transport and outcome (accepted, rejected, unavailable).",
            ["transport", "outcome"],
            registry=r,
        )
        self.journal_lag_entries = Gauge(
            "stellwerk_journal_lag_entries",
            "Journal entries appended but not yet applied by the router.",
            registry=r,
        )
        self.journal_lag_seconds = Gauge(
            "stellwerk_journal_lag_seconds",
            "Age of the oldest journal entry not yet applied by the router (0 when caught up).",
            registry=r,
        )
        self.up = Gauge(
            "stellwerk_connected",
            "1 when the daemon's connection to the peer (redis, mqtt) is up.",
            ["peer"],
            registry=r,
        )
        self.lease_held = Gauge(
            "stellwerk_routing_lease_held",
            "1 while this daemon holds the routing lease and routes.",
            registry=r,
        )
        self.snapshot_unreadable = Counter(
            "stellwerk_snapshot_unreadable",
            "Restores that found the snapshot in Redis unreadable (a chunk missing or damaged) "
            "and did not route.",
            ["reason"],
            registry=r,
        )
        for reason in SNAPSHOT_UNREADABLE_REASONS:
            self.snapshot_unreadable.labels(reason)
        self.rules_reloads = Counter(
            "stellwerk_rules_reloads",
            "Routing-file reloads by result (ok, refused).",
            ["result"],
            registry=r,
        )
        # ---- security: refused authorisations and admin changes (audit) ----
        self.auth_refused = Counter(
            "stellwerk_auth_refused",
            "Requests refused for authentication or authorisation, by reason (no_token, "
            "bad_token, wrong_role, not_your_contact, unsigned_source, rate_limited, ...) and "
            "route template.",
            ["reason", "route"],
            registry=r,
        )
        self.admin_changes = Counter(
            "stellwerk_admin_changes",
            "Admin changes accepted (reload, upsert_expert, remove_expert, link_keys).",
            ["op"],
            registry=r,
        )
        for op in ADMIN_OPS:
            self.admin_changes.labels(op)
        # ---- the desk and the wallboard ----
        self.dispositions = Counter(
            "stellwerk_contacts_dispositions",
            "Completed contacts by queue and disposition (none: completed without one; "
            "released_by_supervisor: a stuck contact a supervisor released).",
            ["queue", "disposition"],
            registry=r,
        )
        self.contacts_stuck = Gauge(
            "stellwerk_contacts_stuck",
            "Contacts an agent has held far longer than the queue's usual handle time.",
            ["queue"],
            registry=r,
        )
        self._queues: set[str] = set()
        # Each series' "name{labels} " as the exposition writes it (see _text).
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        # Children of the metrics set per call or per refresh (see _Children).
        self._received = _Children(self.contacts_received)
        self._rejected_inputs = _Children(self.rejected_inputs)
        self._ingress = _Children(self.ingress)
        self._routed = _Children(self.contacts_routed)
        self._rule_hits = _Children(self.rule_hits)
        self._assigned = _Children(self.contacts_assigned)
        self._abandoned = _Children(self.contacts_abandoned)
        self._completed = _Children(self.contacts_completed)
        self._dispositions = _Children(self.dispositions)
        self._handle = _Children(self.handle_seconds)
        self._by_crowd = _Children(self.contacts_answered_by_crowd)
        self._crowd_outcomes = _Children(self.crowd_outcomes)
        self._crowd_answers = _Children(self.crowd_answers)
        self._rejected = _Children(self.contacts_rejected)
        self._crowd_first = _Children(self.contacts_crowd_first)
        self._escalated = _Children(self.contacts_escalated)
        self._overflowed = _Children(self.contacts_overflowed)
        self._offers = _Children(self.offers)
        self._cancelled = _Children(self.offers_cancelled)
        self._agent_refused = _Children(self.agent_commands_refused)
        self._admin_refused = _Children(self.admin_commands_refused)
        self._wait = _Children(self.wait_seconds)
        self._expert_contacts = _Children(self.expert_contacts)
        self._expert_wait = _Children(self.expert_wait_seconds)
        self._queue_waiting = _Children(self.queue_waiting)
        self._queue_oldest = _Children(self.queue_oldest_wait)
        self._queue_ready = _Children(self.queue_agents_ready)
        self._service_level = _Children(self.service_level)
        self._sla_seconds = _Children(self.sla_seconds)
        self._sla_target = _Children(self.sla_target)
        self._agents = _Children(self.agents)
        self._queue_gauges = (
            self._queue_waiting,
            self._queue_oldest,
            self._queue_ready,
            self._service_level,
            self._sla_seconds,
            self._sla_target,
        )
        # Which counters an event moves, by its class (one dict look-up instead of a chain of
        # isinstance checks per event).
        self._on_event: dict[type, Callable[[Any, str, str, str], None]] = {
            ContactQueued: self._on_queued,
            ContactAssigned: self._on_assigned,
            ContactAbandoned: self._on_abandoned,
            ContactCompleted: self._on_completed,
            ContactAnsweredByCrowd: self._on_answered_by_crowd,
            ContactRejected: self._on_rejected,
            ContactCrowdWindow: self._on_crowd_window,
            ContactEscalated: self._on_escalated,
            ContactOverflowed: self._on_overflowed,
            ContactOfferExpired: self._on_offer_expired,
            ContactOfferRejected: self._on_offer_rejected,
        }

    # ---- series at zero ------------------------------------------------------------------

    def prime(self, table: RoutingTable) -> None:
        """Create every series whose labels are known (queues, rules and reject reasons of
        ``table``, channels, sources, outcomes, reasons) at 0, so the first event of each is a
        visible step. Call at start and after every reload: new queues and rules get theirs;
        existing series keep their counts (``labels()`` of an existing series is a look-up)."""
        pairs = [(ch, src) for src, chans in SOURCE_CHANNELS.items() for ch in chans]
        queues = list(table.file.queues)
        for channel, source in pairs:
            for kind in KINDS:
                self.contacts_received.labels(channel, source, kind)
            for outcome in CROWD_OUTCOMES:
                self.crowd_outcomes.labels(channel, source, outcome)
            for queue in queues:
                self.contacts_routed.labels(queue, channel, source)
                self.contacts_abandoned.labels(queue, channel, source)
                self.contacts_answered_by_crowd.labels(queue, channel, source)
        for queue in queues:
            self.contacts_completed.labels(queue)
            self.contacts_escalated.labels(queue)
            self.contacts_overflowed.labels(queue)
            self.handle_seconds.labels(queue)
            for channel in CHANNELS:
                self.contacts_assigned.labels(queue, channel)
                for outcome in WAIT_OUTCOMES:
                    self.wait_seconds.labels(queue, channel, outcome)
        for channel in CHANNELS:
            self.contacts_crowd_first.labels(channel)
            for outcome in WAIT_OUTCOMES:
                self.expert_contacts.labels(channel, outcome)
                self.expert_wait_seconds.labels(channel, outcome)
        rejects = {"queue_full", "no_queue"}
        for rule in table.file.rules:
            self.rule_hits.labels(rule.name)
            if rule.reject is not None:
                rejects.add(rule.reject)
        for reason in sorted(rejects):
            self.contacts_rejected.labels(reason)
        for by in ("expert", "member"):
            self.crowd_answers.labels(by)
        for outcome in OFFER_OUTCOMES:
            self.offers.labels(outcome)
        for reason in CANCEL_REASONS:
            self.offers_cancelled.labels(reason)
        for reason in AGENT_REFUSALS:
            self.agent_commands_refused.labels(reason)
        for reason in ADMIN_REFUSALS:
            self.admin_commands_refused.labels(reason)
        for source in SOURCE_CHANNELS:
            for reason in INPUT_REASONS:
                self.rejected_inputs.labels(source, reason)
        for reason in AGENT_COMMAND_REASONS:
            self.rejected_inputs.labels(AGENT_COMMAND_SOURCE, reason)
        for transport in TRANSPORTS:
            for outcome in INGRESS_OUTCOMES:
                self.ingress.labels(transport, outcome)
        for result in ("ok", "refused"):
            self.rules_reloads.labels(result)

    # ---- updates -----------------------------------------------------------------------

    def observe_received(self, event: ContactEvent) -> None:
        """Count one contact event accepted into the journal."""
        self._received(event.channel, event.source, event.kind).inc()

    def observe_rejected(self, source: str, reason: str) -> None:
        """Count one input refused at ingress (it went to the dead-letter stream)."""
        self._rejected_inputs(source or UNKNOWN, reason or UNKNOWN).inc()

    def observe_ingress(self, transport: str, outcome: str) -> None:
        """Count one delivery on ``transport`` (mqtt, http, smtp): accepted/rejected/unavailable."""
        self._ingress(transport, outcome).inc()

    def observe_decision(self, seconds: float) -> None:
        """Record how long one ``engine.handle`` call took."""
        self.decision_seconds.observe(seconds)

    def set_journal_lag(self, entries: int, seconds: float) -> None:
        """Set how far the router is behind the journal."""
        self.journal_lag_entries.set(max(0, entries))
        self.journal_lag_seconds.set(max(0.0, seconds))

    def set_status(self, *, redis: bool, mqtt: bool, lease: bool) -> None:
        """Set the connection and lease gauges."""
        self.up.labels("redis").set(1 if redis else 0)
        self.up.labels("mqtt").set(1 if mqtt else 0)
        self.lease_held.set(1 if lease else 0)

    def observe_auth_refused(self, reason: str, route: str) -> None:
        """Count one refused request (``route`` is the route's template, bounded)."""
        self.auth_refused.labels(reason or UNKNOWN, route or UNKNOWN).inc()

    def precreate_auth(self, routes: Iterable[str]) -> None:
        """Show the refusal counters of these routes at zero before anything was refused."""
        for route in routes:
            for reason in AUTH_REFUSALS:
                self.auth_refused.labels(reason, route)

    def observe_admin_change(self, op: str) -> None:
        """Count one accepted admin change."""
        self.admin_changes.labels(op).inc()

    def observe_snapshot_unreadable(self, reason: str) -> None:
        """Count one restore that found the snapshot ``missing`` or ``damaged``."""
        self.snapshot_unreadable.labels(reason).inc()

    def observe_reload(self, ok: bool) -> None:
        """Count one routing-file reload attempt."""
        self.rules_reloads.labels("ok" if ok else "refused").inc()

    def observe_commands(self, cmds: Iterable[Command]) -> None:
        """Update the counters from the engine's output for one input."""
        for cmd in cmds:
            if isinstance(cmd, EventCmd):
                self._observe_event(cmd.event)
            elif isinstance(cmd, OfferCmd):
                self._offers("offered").inc()
            elif isinstance(cmd, CancelOfferCmd):
                self._cancelled(cmd.reason or UNKNOWN).inc()
            elif isinstance(cmd, RefusedCmd):
                refused = self._admin_refused if cmd.agent_id is None else self._agent_refused
                refused(cmd.reason or UNKNOWN).inc()

    def _observe_event(self, event: EngineEvent) -> None:
        if isinstance(event, ExpertAnswered):
            self.expert_answers.inc()
        if not isinstance(event, ContactEventBase):
            return
        on_event = self._on_event.get(type(event))
        if on_event is not None:
            on_event(event, _label(event.queue), _label(event.channel), _label(event.source))

    def _on_queued(self, event: ContactQueued, queue: str, channel: str, source: str) -> None:
        # A contact re-queued after a rejected or expired offer was routed once already.
        if event.first:
            self._routed(queue, channel, source).inc()
            if event.rule:
                self._rule_hits(event.rule).inc()

    def _on_assigned(self, event: ContactAssigned, queue: str, channel: str, source: str) -> None:
        self._assigned(queue, channel).inc()
        self._offers("accepted").inc()
        self._observe_wait(event, event.waited, queue, channel, "assigned")
        if event.crowd:
            self._crowd_outcomes(channel, source, "assigned").inc()

    def _on_abandoned(self, event: ContactAbandoned, queue: str, channel: str, source: str) -> None:
        self._abandoned(queue, channel, source).inc()
        self._observe_wait(event, event.waited, queue, channel, "abandoned")
        if event.crowd:
            self._crowd_outcomes(channel, source, "abandoned").inc()

    def _on_completed(self, event: ContactCompleted, queue: str, channel: str, source: str) -> None:
        self._completed(queue).inc()
        self._dispositions(queue, event.disposition or "none").inc()
        self._handle(queue).observe(max(0.0, event.handled))

    def _on_answered_by_crowd(
        self, event: ContactAnsweredByCrowd, queue: str, channel: str, source: str
    ) -> None:
        self._by_crowd(queue, channel, source).inc()
        self._crowd_outcomes(channel, source, "answered_by_crowd").inc()
        self._crowd_answers("expert" if event.by_expert else "member").inc()

    def _on_rejected(self, event: ContactRejected, queue: str, channel: str, source: str) -> None:
        self._rejected(_label(event.reason)).inc()

    def _on_crowd_window(
        self, event: ContactCrowdWindow, queue: str, channel: str, source: str
    ) -> None:
        self._crowd_first(channel).inc()

    def _on_escalated(self, event: ContactEscalated, queue: str, channel: str, source: str) -> None:
        self._escalated(queue).inc()

    def _on_overflowed(
        self, event: ContactOverflowed, queue: str, channel: str, source: str
    ) -> None:
        self._overflowed(queue).inc()

    def _on_offer_expired(
        self, event: ContactOfferExpired, queue: str, channel: str, source: str
    ) -> None:
        self._offers("expired").inc()

    def _on_offer_rejected(
        self, event: ContactOfferRejected, queue: str, channel: str, source: str
    ) -> None:
        self._offers("rejected").inc()

    def _observe_wait(
        self, event: ContactEventBase, waited: float, queue: str, channel: str, outcome: str
    ) -> None:
        waited = max(0.0, waited)
        self._wait(queue, channel, outcome).observe(waited)
        if event.expert:
            self._expert_contacts(channel, outcome).inc()
            self._expert_wait(channel, outcome).observe(waited)

    def refresh(self, engine: EngineView, now: float) -> None:
        """Refresh the queue and agent gauges from the engine's read-only views."""
        gauges = getattr(engine, "queue_gauges", None)
        if gauges is not None:
            rows: Iterable[QueueGauges] = gauges(now)
        else:  # a view without the lean accessors (a test double): the same from queue_stats
            rows = [_gauges_of(stats) for stats in engine.queue_stats(now)]
        seen: set[str] = set()
        for name, waiting, oldest, ready, level, sla_seconds, sla_percent in rows:
            seen.add(name)
            self._queue_waiting(name).set(waiting)
            self._queue_oldest(name).set(oldest)
            self._queue_ready(name).set(ready)
            if level is not None:
                self._service_level(name).set(level)
            else:
                self._service_level.remove(name)
            if sla_seconds is not None:
                self._sla_seconds(name).set(sla_seconds)
            if sla_percent is not None:
                self._sla_target(name).set(sla_percent / 100.0)
        # Queues dropped by a reload must not keep exporting their last value for ever.
        for gone in self._queues - seen:
            for gauge in self._queue_gauges:
                gauge.remove(gone)
        self._queues = seen
        counts = getattr(engine, "agent_counts", None)
        if counts is not None:
            by_state, busy = counts()
        else:
            by_state, busy = _count_agents(engine.agent_list())
        for state in AGENT_STATES:
            self._agents(state).set(by_state.get(state, 0))
        for state, count in by_state.items():
            if state not in AGENT_STATES:
                self._agents(state).set(count)
        self.agents_busy.set(busy)
        # Optional in the protocol: views without a crowd (test doubles) leave the gauges alone.
        report = getattr(engine, "experts_report", None)
        if report is not None:
            summary = report(now).get("summary", {})
            for activity in EXPERT_ACTIVITY:
                self.experts.labels(activity).set(_number(summary, activity))
            self.experts_never_answered.set(_number(summary, "never_answered"))

    def precreate_dispositions(self, queues: Iterable[str], codes: Iterable[str]) -> None:
        """Export every (queue, disposition) pair at zero, so a rate over them is defined from
        the start (``none`` and ``released_by_supervisor`` included)."""
        codes = [*codes, "none", "released_by_supervisor"]
        for queue in queues:
            self.contacts_stuck.labels(queue)
            for code in codes:
                self.dispositions.labels(queue, code)

    # ---- exposition ----------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE_LATEST``), byte for byte
        what ``prometheus_client.generate_latest`` writes."""
        return _text(self.registry, self._prefixes)


# Sample values as the text format writes them, for the values seen most.
_GO_FLOATS: dict[float, str] = {}


def _text(registry: CollectorRegistry, prefixes: dict[tuple[Any, ...], str]) -> bytes:
    """``generate_latest(registry)``, with each series' name and labels escaped and formatted
    once and kept in ``prefixes``: a thousand series are a thousand label sets to validate,
    sort and escape on every scrape otherwise, which was two thirds of the page's cost. (The
    prefixes of series removed later stay: as many as label sets ever seen, which is bounded.)"""
    out: list[str] = []
    for metric in registry.collect():
        mname, mtype = metric.name, metric.type
        # The OpenMetrics types as the Prometheus text format names them (as generate_latest).
        if mtype == "counter":
            mname += "_total"
        elif mtype == "info":
            mname, mtype = mname + "_info", "gauge"
        elif mtype == "stateset":
            mtype = "gauge"
        elif mtype == "gaugehistogram":
            mtype = "histogram"
        elif mtype == "unknown":
            mtype = "untyped"
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        name = escape_metric_name(mname)
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
        # _created (and gauge histograms' _gsum, _gcount) go in a gauge family of their own.
        apart = {metric.name + suffix: suffix for suffix in ("_created", "_gsum", "_gcount")}
        extra: dict[str, list[str]] = {}
        for s in metric.samples:
            key = (s.name, tuple(s.labels.items()))
            prefix = prefixes.get(key)
            if prefix is None:
                prefix = prefixes[key] = _series(s.name, s.labels)
            value = _GO_FLOATS.get(s.value)
            # (-0.0 finds 0.0's entry: equal floats, but written "-0.0")
            if value is None or (value == "0.0" and math.copysign(1.0, s.value) < 0):
                value = floatToGoString(s.value)
                if len(_GO_FLOATS) < 4096 and value != "-0.0":  # most are 0.0 and small counts
                    _GO_FLOATS[s.value] = value
            if s.timestamp is None:
                line = f"{prefix}{value}\n"
            else:
                line = f"{prefix}{value} {int(float(s.timestamp) * 1000):d}\n"
            suffix = apart.get(s.name)
            if suffix is None:
                out.append(line)
            else:
                extra.setdefault(suffix, []).append(line)
        for suffix, lines in sorted(extra.items()):
            name = escape_metric_name(metric.name + suffix)
            out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


def _series(name: str, labels: Mapping[str, str]) -> str:
    """A sample line up to its value: ``name{label="value",...} `` (labels sorted)."""
    if not labels:
        return f"{escape_metric_name(name)} "
    pairs = ",".join(
        '{}="{}"'.format(
            escape_label_name(k), v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
        )
        for k, v in sorted(labels.items())
    )
    return f"{escape_metric_name(name)}{{{pairs}}} "


def _gauges_of(stats: Mapping[str, Any]) -> QueueGauges:
    """A :func:`~router.engine.Engine.queue_stats` row as the gauges' tuple (SLA fields None
    when the row lacks them: their gauges are then left alone)."""
    level = stats.get("service_level")
    return (
        str(stats.get("name", UNKNOWN)),
        _number(stats, "waiting"),
        _number(stats, "oldest_wait"),
        _number(stats, "agents_ready"),
        float(level) if isinstance(level, int | float) and not isinstance(level, bool) else None,
        _number(stats, "sla_seconds") if "sla_seconds" in stats else None,
        _number(stats, "sla_percent") if "sla_percent" in stats else None,
    )


def _count_agents(agents: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], int]:
    by_state: dict[str, int] = {}
    busy = 0
    for agent in agents:
        state = str(agent.get("state", UNKNOWN))
        by_state[state] = by_state.get(state, 0) + 1
        busy += 1 if agent.get("busy") else 0
    return by_state, busy


def _number(stats: Mapping[str, Any], key: str) -> float:
    value = stats.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)
