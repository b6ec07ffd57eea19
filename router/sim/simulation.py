"""The real engine on virtual time: arrivals, simulated agents, statistics per queue.

:func:`simulate` drives :class:`router.engine.Engine` exactly as the daemon does — through
``handle(message, now)`` and ``next_deadline()`` — and learns what happened only from the
commands the engine returns. Nothing here routes, queues or picks agents; the simulator plays
the world around the engine: customers who arrive (Poisson streams of ContactEvents built from
templates) and hang up when their patience runs out, and agents who log in at the start, accept
every offer after a fixed delay and complete each contact after a sampled handle time.

Everything is deterministic for a given seed: the engine never reads the clock, and every random
draw comes from :class:`random.Random` instances seeded from the scenario's seed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgspec

from channels.contact_event import Channel, ContactEvent, Sender
from router.engine import Engine
from router.events import (
    ContactAbandoned,
    ContactAnsweredByCrowd,
    ContactAssigned,
    ContactCompleted,
    ContactEventBase,
    ContactQueued,
    ContactRejected,
    ContactWrapUpDone,
    EngineEvent,
)
from router.messages import (
    Accept,
    CancelOfferCmd,
    Command,
    Complete,
    EngineInput,
    EventCmd,
    Login,
    OfferCmd,
    RefusedCmd,
    Tick,
)
from rules.schema import AgentAccounts, Endpoints, RoutingFile
from rules.table import RoutingTable

# ---- scenario ------------------------------------------------------------------------------


class Distribution(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A positive random duration in seconds with mean ``mean``.

    ``exponential`` is the textbook (and Erlang C's) assumption; ``lognormal`` with ``sigma``
    (the standard deviation of the underlying normal) is closer to measured handle times;
    ``fixed`` always returns ``mean``.
    """

    distribution: Literal["exponential", "lognormal", "fixed"] = "exponential"
    mean: float
    sigma: float = 0.6

    def __post_init__(self) -> None:
        if not self.mean > 0:
            raise ValueError("mean must be positive")
        if self.sigma < 0:
            raise ValueError("sigma must not be negative")

    def sample(self, rng: random.Random) -> float:
        """One draw."""
        if self.distribution == "fixed":
            return self.mean
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean)
        # E[lognormal(mu, s)] = exp(mu + s^2 / 2): pick mu so that the mean is ``mean``.
        mu = math.log(self.mean) - self.sigma**2 / 2
        return rng.lognormvariate(mu, self.sigma)


class Template(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One kind of contact a stream produces, picked with probability proportional to weight.

    ``sender`` fixes who writes; without it every contact gets a fresh, unknown customer
    (a generated phone number, address or handle fitting the channel). ``expert: true`` makes
    the sender one of the routing file's crowd experts (picked at random among those with an
    identity key for the channel), so the expert rules see real expert traffic.
    """

    weight: float = 1.0
    to: str | None = None
    subject: str | None = None
    text: str | None = None
    language: str | None = None
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    sender: Sender | None = None
    expert: bool = False


class Stream(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Poisson arrival stream of contacts on one channel and source.

    ``at`` adds scripted arrivals at these offsets (seconds from the start), for what-if
    questions such as "an expert calls while the DSL queue is long".

    ``patience`` (exponential, mean seconds) makes a waiting contact give up: a ContactEvent
    kind ``end`` with ``end_reason: abandoned``. Absent, nobody gives up (email, typically).
    ``handle`` overrides the scenario's handle time for this stream's contacts.
    ``crowd_answers`` is the share of contacts a community member answers (an ``update`` from
    another handle) after ``crowd_delay``; it matters only where a rule has ``crowd_first``.
    """

    name: str
    channel: Channel
    source: str = "generic"
    rate_per_hour: float = 0.0
    at: tuple[float, ...] = ()
    contacts: tuple[Template, ...] = (Template(),)
    patience: float | None = None
    handle: Distribution | None = None
    crowd_answers: float = 0.0
    crowd_delay: Distribution = msgspec.field(default_factory=lambda: Distribution(mean=1200.0))

    def __post_init__(self) -> None:
        if self.rate_per_hour < 0:
            raise ValueError(f"stream {self.name}: rate_per_hour must not be negative")
        if any(not 0 <= t < math.inf for t in self.at):
            raise ValueError(f"stream {self.name}: 'at' offsets must be finite and >= 0")
        if not self.contacts:
            raise ValueError(f"stream {self.name}: needs at least one contact template")
        if sum(t.weight for t in self.contacts) <= 0:
            raise ValueError(f"stream {self.name}: template weights must add up to > 0")
        if self.patience is not None and not self.patience > 0:
            raise ValueError(f"stream {self.name}: patience must be positive")
        if not 0 <= self.crowd_answers <= 1:
            raise ValueError(f"stream {self.name}: crowd_answers must be in 0-1")


class HandleTimes(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Handle time (talk or work time, without wrap-up) by queue, else by channel, else default.

    A stream's own ``handle`` wins over all three.
    """

    default: Distribution = msgspec.field(default_factory=lambda: Distribution(mean=300.0))
    channels: dict[Channel, Distribution] = msgspec.field(default_factory=dict)
    queues: dict[str, Distribution] = msgspec.field(default_factory=dict)


class AgentBehaviour(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How simulated agents behave. ``count`` keeps only the first N agents of the routing file
    (or, if larger, adds copies of its agents, cycling through them, as ``{id}~2``, ``{id}~3``).
    """

    count: int | None = None
    accept_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 0:
            raise ValueError("agents.count must not be negative")
        if self.accept_delay < 0:
            raise ValueError("agents.accept_delay must not be negative")


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the simulator plays: streams of contacts, handle times, agent behaviour.

    ``start`` is local time in ``timezone`` (a Monday 08:00 by default, so office-hours rules
    behave as on a working day).
    """

    hours: float = 8.0
    seed: int = 1
    start: str = "2026-01-05T08:00:00"
    timezone: str = "Europe/Berlin"
    streams: tuple[Stream, ...] = ()
    handle_time: HandleTimes = msgspec.field(default_factory=HandleTimes)
    agents: AgentBehaviour = msgspec.field(default_factory=AgentBehaviour)

    def __post_init__(self) -> None:
        if not self.hours > 0:
            raise ValueError("hours must be positive")
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ValueError("stream names must be unique")

    def start_epoch(self) -> float:
        """``start`` in ``timezone`` as UTC epoch seconds."""
        moment = datetime.fromisoformat(self.start)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=ZoneInfo(self.timezone))
        return moment.timestamp()


class ScenarioError(Exception):
    """A scenario file that cannot be read or does not validate."""


class SimulationError(Exception):
    """The engine broke its contract (a timer that never fires): a bug, not bad input."""


def parse_scenario(text: str | bytes, name: str = "<scenario>") -> Scenario:
    """Decode a scenario from YAML; raise :class:`ScenarioError` with a readable reason."""
    try:
        scenario = msgspec.yaml.decode(text, type=Scenario)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ScenarioError(f"{name}: {exc}") from None
    try:
        scenario.start_epoch()
    except (ValueError, KeyError) as exc:
        raise ScenarioError(f"{name}: bad start or timezone: {exc}") from None
    return scenario


# ---- report --------------------------------------------------------------------------------


class WaitStats(msgspec.Struct, kw_only=True):
    """Answered / abandoned contacts and their waits against one SLA target."""

    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    answered_in_sla: int = 0
    waited: int = 0
    wait_sum: float = 0.0
    wait_max: float = 0.0


class QueueReport(msgspec.Struct, frozen=True, kw_only=True):
    """One queue's figures. Rates are ``None`` when no contact ended in the queue.

    service_level = answered within ``sla_seconds`` / (answered + abandoned): every abandon counts
    against the queue, however short its wait. asa = mean wait of the answered. p_wait = share
    of answered and abandoned contacts that waited at all (longer than the agents' accept delay).
    occupancy = agent time spent on this queue's contacts (handle time plus wrap-up, weighted by
    the channel's share of the agent's capacity budget) / all agents' logged-in time.
    """

    queue: str
    sla_seconds: float
    sla_target: float
    offered: int
    answered: int
    abandoned: int
    waiting_at_end: int
    service_level: float | None
    asa_seconds: float | None
    max_wait_seconds: float
    p_wait: float | None
    abandon_rate: float | None
    occupancy: float


class ExpertReport(msgspec.Struct, frozen=True, kw_only=True):
    """The crowd experts' own contacts, whatever queue they went to."""

    contacts: int
    answered: int
    abandoned: int
    mean_wait_seconds: float | None
    max_wait_seconds: float
    service_level: float | None


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one simulation run."""

    seed: int
    hours: float
    agents: int
    arrivals: int
    queues: tuple[QueueReport, ...]
    experts: ExpertReport
    occupancy: float
    rejected: int
    answered_by_crowd: int
    abandoned_before_queue: int
    refused: int
    events: dict[str, int]
    waited_mismatches: int


# ---- the world around the engine -----------------------------------------------------------

#: What the world does when one of its own moments comes: called with the payload and the time.
_Due = Callable[[Any, float], None]
#: The engine's events the statistics look at; the others are only counted.
_WATCHED_EVENTS = frozenset(
    {
        "contact.queued",
        "contact.assigned",
        "contact.abandoned",
        "contact.rejected",
        "contact.answered_by_crowd",
        "contact.completed",
        "contact.wrap_up_done",
    }
)
_TICK = Tick()


@dataclass(slots=True)
class _Contact:
    arrived: float
    channel: Channel
    stream: Stream
    expert: bool = False
    queue: str | None = None  # the queue it is in (or was answered in)
    ended: bool = False  # answered, abandoned or rejected: no longer waiting


@dataclass(slots=True)
class _Busy:
    """Capacity-weighted agent time per queue: sum of (end - start) * weight."""

    started: dict[str, tuple[float, str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def begin(self, key: str, now: float, queue: str, weight: float) -> None:
        self.started[key] = (now, queue, weight)

    def end(self, key: str, now: float) -> None:
        start = self.started.pop(key, None)
        if start is not None:
            began, queue, weight = start
            self.seconds[queue] = self.seconds.get(queue, 0.0) + (now - began) * weight

    def close(self, now: float) -> None:
        for key in list(self.started):
            self.end(key, now)


# Waits are float sums of virtual times; allow for rounding when comparing.
_EPS = 1e-6


def _routing_file(table: RoutingTable) -> RoutingFile:
    return table.file


def with_agent_count(routing: RoutingFile, count: int) -> RoutingFile:
    """The routing file with exactly ``count`` agents: the first ``count``, or copies added.

    A copy has the original's skills and capacity but none of its platform accounts or phone
    endpoints: those belong to one person, and the routing file refuses them twice.
    """
    agents = list(routing.agents)
    if count <= len(agents) or not agents:
        return msgspec.structs.replace(routing, agents=tuple(agents[:count]))
    base = list(agents)
    copy = 2
    while len(agents) < count:
        for agent in base:
            if len(agents) == count:
                break
            agents.append(
                msgspec.structs.replace(
                    agent, id=f"{agent.id}~{copy}", accounts=AgentAccounts(), endpoints=Endpoints()
                )
            )
        copy += 1
    return msgspec.structs.replace(routing, agents=tuple(agents))


def scaled(scenario: Scenario, factor: float, agents: int) -> Scenario:
    """The same centre ``factor`` times as big: every stream's Poisson rate and the number of
    agents multiplied by ``factor`` (``agents`` is the count to scale when the scenario sets
    none: the routing file's). Scripted arrivals (``at``) stay: they are moments, not traffic.
    """
    if not factor > 0:
        raise ValueError("the scale factor must be positive")
    count = scenario.agents.count if scenario.agents.count is not None else agents
    streams = tuple(
        msgspec.structs.replace(stream, rate_per_hour=stream.rate_per_hour * factor)
        for stream in scenario.streams
    )
    behaviour = msgspec.structs.replace(scenario.agents, count=round(count * factor))
    return msgspec.structs.replace(scenario, streams=streams, agents=behaviour)


class _Sim:
    def __init__(
        self,
        table: RoutingTable,
        scenario: Scenario,
        progress: Callable[[float], None] | None,
        observe: Callable[[float, Command], None] | None = None,
    ) -> None:
        self.table = table
        self.routing = _routing_file(table)
        self.scenario = scenario
        self.engine = Engine(table)
        self.t0 = scenario.start_epoch()
        self.end = self.t0 + scenario.hours * 3600.0
        self.progress = progress
        self.observe = observe
        seed = scenario.seed
        # Separate generators, so that e.g. a different accept delay or handle time does not
        # change who arrives when: comparisons between scenarios stay paired.
        self.rng_arrivals = random.Random(f"{seed}:arrivals")
        self.rng_contacts = random.Random(f"{seed}:contacts")
        self.rng_handle = random.Random(f"{seed}:handle")
        self.rng_patience = random.Random(f"{seed}:patience")
        self.rng_crowd = random.Random(f"{seed}:crowd")
        # (time, sequence, what happens, its payload): the sequence keeps ties in push order
        # and spares the heap comparing the rest.
        self.heap: list[tuple[float, int, _Due, Any]] = []
        self.seq = 0
        self.contacts: dict[str, _Contact] = {}
        self.arrivals = 0
        self.pending_offers: set[str] = set()
        self.stats: dict[str, WaitStats] = {q: WaitStats() for q in self.routing.queues}
        self.expert_stats = WaitStats()
        self.busy = _Busy()
        self.rejected = 0
        self.answered_by_crowd = 0
        self.abandoned_before_queue = 0
        self.refused = 0
        self.events: dict[str, int] = {}
        self.waited_mismatches = 0
        self.sla = {name: q.sla for name, q in self.routing.queues.items()}
        # Only a handle() changes the engine's next deadline, so it is asked once per handle().
        self.deadline: float | None = None
        self.accept_delay = scenario.agents.accept_delay
        # Picking a template: choices() with cumulative weights made once, not per arrival.
        self.template_weights = {
            stream.name: list(itertools.accumulate(t.weight for t in stream.contacts))
            for stream in scenario.streams
        }
        self.handle_dists: dict[tuple[str, str], Distribution] = {}
        cap = self.routing.capacity
        self.weight: dict[tuple[str, str], float] = {}
        for agent in self.routing.agents:
            budget = agent.budget if agent.budget is not None else cap.budget
            for channel, cost in cap.cost.items():
                self.weight[agent.id, channel] = min(1.0, cost / budget) if budget > 0 else 1.0
        # The experts file's experts too, with their keys normalised by the loader.
        experts = table.experts
        self.expert_keys: dict[str, list[Sender]] = {
            "phone": [Sender(phone=p, name=e.name) for e in experts for p in e.phones],
            "email": [Sender(email=m, name=e.name) for e in experts for m in e.emails],
            "handle": [Sender(handle=h, name=e.name) for e in experts for h in e.handles],
        }
        # Checked now rather than at the first expert's arrival, hours into the run.
        self.experts_for = {
            stream.name: self.expert_candidates(stream)
            for stream in scenario.streams
            if any(t.expert for t in stream.contacts)
        }

    # -- plumbing

    def push(self, when: float, due: _Due, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, due, payload))

    def feed(self, message: EngineInput, now: float) -> None:
        engine = self.engine
        commands = engine.handle(message, now)
        self.deadline = engine.next_deadline()
        self.apply(commands, now)

    def run(self) -> Report:
        for agent in self.routing.agents:
            self.feed(Login(agent_id=agent.id), self.t0)
        for stream in self.scenario.streams:
            self.schedule_arrival(stream, self.t0)
            for offset in stream.at:
                self.push(self.t0 + offset, self.arrival_due, (stream, False))
        span = self.end - self.t0
        next_report = 0.0
        now = self.t0
        # Locals: this loop runs once per input the engine gets, hundreds of thousands of times.
        heap, end, progress, pop = self.heap, self.end, self.progress, heapq.heappop
        while True:
            due = heap[0][0] if heap else math.inf
            deadline = self.deadline
            if deadline is not None and deadline <= due and deadline <= end:
                # The engine fires due timers inside every handle(), so a deadline in the past,
                # or one a tick does not move on, breaks its contract: say so, do not spin.
                if deadline < now:
                    raise SimulationError(f"engine deadline {deadline} is before now {now}")
                now = deadline
                self.feed(_TICK, now)
                after = self.deadline
                if after is not None and after <= now:
                    raise SimulationError(f"engine deadline {after} did not advance after a tick")
                continue
            if due > end:
                break
            now, _, happen, payload = pop(heap)
            happen(payload, now)
            if progress is not None and now - self.t0 >= next_report:
                progress((now - self.t0) / span)
                next_report += span / 100
        self.busy.close(self.end)
        if self.progress is not None:
            self.progress(1.0)
        return self.report()

    # -- the world's own moments, as pushed on the heap

    def arrival_due(self, payload: tuple[Stream, bool], now: float) -> None:
        stream, poisson = payload
        if poisson:
            self.schedule_arrival(stream, now)
        self.arrive(stream, now)

    def accept_due(self, payload: tuple[str, str], now: float) -> None:
        agent_id, offer_id = payload
        if offer_id in self.pending_offers:
            self.pending_offers.discard(offer_id)
            self.feed(Accept(agent_id=agent_id, offer_id=offer_id), now)

    def complete_due(self, payload: tuple[str, str], now: float) -> None:
        agent_id, contact_id = payload
        self.feed(Complete(agent_id=agent_id, contact_id=contact_id), now)

    def abandon_due(self, contact_id: str, now: float) -> None:
        contact = self.contacts.get(contact_id)
        if contact is not None and not contact.ended:
            self.feed(self.follow_up(contact_id, contact, now, kind="end"), now)

    def crowd_due(self, contact_id: str, now: float) -> None:
        contact = self.contacts.get(contact_id)
        if contact is not None and not contact.ended:
            helper = Sender(handle=f"{contact.stream.source}:helper-{self.seq}")
            self.feed(self.follow_up(contact_id, contact, now, sender=helper), now)

    def follow_up(
        self,
        contact_id: str,
        contact: _Contact,
        now: float,
        kind: Literal["update", "end"] = "update",
        sender: Sender | None = None,
    ) -> ContactEvent:
        """A later event of a contact: the caller hanging up, or someone else replying."""
        external_id = contact_id.split(":", 1)[1]
        return ContactEvent(
            kind=kind,
            contact_id=contact_id,
            channel=contact.channel,
            source=contact.stream.source,
            external_id=external_id,
            thread_id=external_id,
            sender=sender or Sender(),
            end_reason="abandoned" if kind == "end" else None,
            text="Probier mal, den Router neu zu starten." if kind == "update" else None,
            occurred_at=now,
        )

    # -- customers

    def schedule_arrival(self, stream: Stream, now: float) -> None:
        if stream.rate_per_hour > 0:
            gap = self.rng_arrivals.expovariate(stream.rate_per_hour / 3600.0)
            self.push(now + gap, self.arrival_due, (stream, True))

    def arrive(self, stream: Stream, now: float) -> None:
        self.arrivals += 1
        rng = self.rng_contacts
        cum_weights = self.template_weights[stream.name]
        template = rng.choices(stream.contacts, cum_weights=cum_weights)[0]
        external_id = f"sim-{self.arrivals}"
        contact_id = f"{stream.source}:{external_id}"
        sender = template.sender
        if template.expert:
            sender = rng.choice(self.experts_for[stream.name])
        if sender is None:
            sender = _fresh_sender(stream, self.arrivals)
        event = ContactEvent(
            kind="new",
            contact_id=contact_id,
            channel=stream.channel,
            source=stream.source,
            external_id=external_id,
            thread_id=external_id,
            sender=sender,
            to=template.to,
            subject=template.subject,
            text=template.text,
            language=template.language,
            tags=template.tags,
            attributes=dict(template.attributes),
            occurred_at=now,
        )
        self.contacts[contact_id] = _Contact(arrived=now, channel=stream.channel, stream=stream)
        if stream.patience is not None:
            patience = self.rng_patience.expovariate(1.0 / stream.patience)
            self.push(now + patience, self.abandon_due, contact_id)
        if stream.crowd_answers and self.rng_crowd.random() < stream.crowd_answers:
            self.push(now + stream.crowd_delay.sample(self.rng_crowd), self.crowd_due, contact_id)
        self.feed(event, now)

    def expert_candidates(self, stream: Stream) -> list[Sender]:
        """Experts with an identity key fitting the stream (for chat/social: its source)."""
        if stream.channel in ("phone", "email"):
            candidates = self.expert_keys[stream.channel]
        else:
            prefix = f"{stream.source}:"
            candidates = [
                s for s in self.expert_keys["handle"] if s.handle and s.handle.startswith(prefix)
            ]
        if not candidates:
            raise ScenarioError(
                f"stream {stream.name}: expert contacts, but no crowd expert has an identity"
                f" key for {stream.channel} from {stream.source}"
            )
        return candidates

    # -- agents and statistics, from the engine's commands

    def apply(self, commands: Iterable[Command], now: float) -> None:
        observe, events = self.observe, self.events
        for cmd in commands:
            if observe is not None:
                observe(now, cmd)
            # Most commands are events: test for them first.
            if isinstance(cmd, EventCmd):
                kind = cmd.type
                events[kind] = events.get(kind, 0) + 1
                if kind in _WATCHED_EVENTS:
                    self.on_event(cmd.event, now)
            elif isinstance(cmd, OfferCmd):
                self.pending_offers.add(cmd.offer_id)
                self.push(now + self.accept_delay, self.accept_due, (cmd.agent_id, cmd.offer_id))
            elif isinstance(cmd, CancelOfferCmd):
                self.pending_offers.discard(cmd.offer_id)
            elif isinstance(cmd, RefusedCmd):
                self.refused += 1

    def on_event(self, event: EngineEvent, now: float) -> None:
        if not isinstance(event, ContactEventBase):
            return
        contact_id = event.contact_id
        contact = self.contacts.get(contact_id)
        if contact is None:
            return
        if event.expert and not contact.expert:
            contact.expert = True
            self.expert_stats.offered += 1
        if isinstance(event, ContactQueued):
            # Also sent when an expired or rejected offer puts it back: count a queue once.
            self.entered(contact, event.queue)
        elif isinstance(event, ContactAssigned):
            self.finish_wait(contact, event.waited, event.queue, now, answered=True)
            queue = str(event.queue)
            agent_id = event.agent_id
            weight = self.weight.get((agent_id, contact.channel), 1.0)
            self.busy.begin(contact_id, now, queue, weight)
            handle = self.handle_time(contact, queue)
            self.push(now + handle, self.complete_due, (agent_id, contact_id))
        elif isinstance(event, ContactAbandoned):
            self.finish_wait(contact, event.waited, event.queue, now, answered=False)
        elif isinstance(event, ContactRejected):
            contact.ended = True
            self.rejected += 1
        elif isinstance(event, ContactAnsweredByCrowd):
            contact.ended = True
            self.answered_by_crowd += 1
        elif isinstance(event, ContactCompleted):
            # Wrap-up (if the queue has one) keeps the agent's share busy until wrap_up_done.
            if not self.wrap_up(contact.queue):
                self.busy.end(contact_id, now)
        elif isinstance(event, ContactWrapUpDone):
            self.busy.end(contact_id, now)

    def entered(self, contact: _Contact, queue: object) -> None:
        if isinstance(queue, str) and queue != contact.queue and queue in self.stats:
            contact.queue = queue
            self.stats[queue].offered += 1

    def wrap_up(self, queue: str | None) -> float:
        if queue is None:
            return 0.0
        configured = self.routing.queues[queue].wrap_up
        return self.routing.defaults.wrap_up if configured is None else configured

    def finish_wait(
        self,
        contact: _Contact,
        waited: float,
        queue: str | None,
        now: float,
        *,
        answered: bool,
    ) -> None:
        if contact.ended:
            return
        contact.ended = True

        if abs(waited - (now - contact.arrived)) > _EPS:
            self.waited_mismatches += 1
        # An escalation step can move a contact while it is offered (no contact.queued then).
        self.entered(contact, queue)
        if contact.queue is None:
            # Ended before entering any queue (in the crowd window): no queue's figure.
            self.abandoned_before_queue += 1
            return
        sla = self.sla[contact.queue].seconds
        bins = [self.stats[contact.queue]]
        if contact.expert:
            bins.append(self.expert_stats)
        for stats in bins:
            if answered:
                stats.answered += 1
                stats.answered_in_sla += waited <= sla + _EPS
            else:
                stats.abandoned += 1
            stats.waited += waited > self.scenario.agents.accept_delay + _EPS
            stats.wait_sum += waited if answered else 0.0
            stats.wait_max = max(stats.wait_max, waited)

    def handle_time(self, contact: _Contact, queue: str) -> float:
        key = (contact.stream.name, queue)
        dist = self.handle_dists.get(key)
        if dist is None:
            times = self.scenario.handle_time
            dist = self.handle_dists[key] = (
                contact.stream.handle
                or times.queues.get(queue)
                or times.channels.get(contact.channel)
                or times.default
            )
        return dist.sample(self.rng_handle)

    # -- report

    def report(self) -> Report:
        logged_in = len(self.routing.agents) * (self.end - self.t0)
        waiting: dict[str, int] = {}
        for contact in self.contacts.values():
            if not contact.ended and contact.queue is not None:
                waiting[contact.queue] = waiting.get(contact.queue, 0) + 1
        queues = []
        for name, stats in self.stats.items():
            sla = self.sla[name]
            ended = stats.answered + stats.abandoned
            busy = self.busy.seconds.get(name, 0.0)
            queues.append(
                QueueReport(
                    queue=name,
                    sla_seconds=sla.seconds,
                    sla_target=sla.percent / 100.0,
                    offered=stats.offered,
                    answered=stats.answered,
                    abandoned=stats.abandoned,
                    waiting_at_end=waiting.get(name, 0),
                    service_level=_ratio(stats.answered_in_sla, ended),
                    asa_seconds=_ratio(stats.wait_sum, stats.answered),
                    max_wait_seconds=stats.wait_max,
                    p_wait=_ratio(stats.waited, ended),
                    abandon_rate=_ratio(stats.abandoned, ended),
                    occupancy=busy / logged_in if logged_in > 0 else 0.0,
                )
            )
        ex = self.expert_stats
        experts = ExpertReport(
            contacts=ex.offered,
            answered=ex.answered,
            abandoned=ex.abandoned,
            mean_wait_seconds=_ratio(ex.wait_sum, ex.answered),
            max_wait_seconds=ex.wait_max,
            service_level=_ratio(ex.answered_in_sla, ex.answered + ex.abandoned),
        )
        total_busy = sum(self.busy.seconds.values())
        return Report(
            seed=self.scenario.seed,
            hours=self.scenario.hours,
            agents=len(self.routing.agents),
            arrivals=self.arrivals,
            queues=tuple(queues),
            experts=experts,
            occupancy=total_busy / logged_in if logged_in > 0 else 0.0,
            rejected=self.rejected,
            answered_by_crowd=self.answered_by_crowd,
            abandoned_before_queue=self.abandoned_before_queue,
            refused=self.refused,
            events=dict(sorted(self.events.items())),
            waited_mismatches=self.waited_mismatches,
        )


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _fresh_sender(stream: Stream, n: int) -> Sender:
    """A new, unknown customer fitting the stream's channel."""
    if stream.channel == "phone":
        return Sender(phone=f"+49301{n:08d}")
    if stream.channel == "email":
        return Sender(email=f"kunde{n}@example.org")
    return Sender(handle=f"{stream.source}:kunde{n}")


def simulate(
    table: RoutingTable,
    scenario: Scenario,
    progress: Callable[[float], None] | None = None,
    observe: Callable[[float, Command], None] | None = None,
) -> Report:
    """Run ``scenario`` against the engine built from ``table``.

    ``progress`` is called with the share of virtual time done (0.0 … 1.0), about a hundred
    times; ``observe`` sees every command the engine returns, with its virtual time.
    """
    return _Sim(table, scenario, progress, observe).run()
