"""The routing engine: sans-I/O, synchronous, deterministic.

``Engine.handle(message, now)`` takes one input (a
:class:`~channels.contact_event.ContactEvent`, an agent command, an admin command or a
:class:`~router.messages.Tick`) and the current time, and returns the commands the caller must
carry out. This module holds every state transition; what it consults lives beside it:
customers in :mod:`router.customers`, crowd experts in
:mod:`router.experts`, capacity, eligibility and agent order in :mod:`router.agent_index`, the
waiting contacts in :mod:`router.contact_queues`, timers in :mod:`router.timers` and the
read-only views in :mod:`router.views`. The engine never reads the clock, never draws
random numbers and never does I/O, so the daemon, the simulator and journal replay all run the
same code and a replay of the same inputs with the same times yields the same state.

Semantics, with the decisions taken:

* **Queue order.** Each waiting contact has the time-invariant key
  ``arrived_at - priority * queue.weight``; the smallest key is served first, which is the same
  as the largest ``priority * weight + seconds waited``. Contacts keep ``arrived_at`` when they
  are re-queued, escalated or overflowed, so nobody goes to the back of a line.
* **Agent choice.** Among agents that are ``available``, have the queue's skills (and the
  contact's extra skills) and free capacity for the channel: the customer's preferred agent
  first (the last one who served them, within ``preferred_agent_seconds``), then per queue
  strategy: ``longest_idle`` (free agents before partly busy ones, then longest idle),
  ``most_skilled`` (highest summed proficiency over the queue's skills), ``least_occupied``
  (smallest share of the capacity budget in use) or ``round_robin`` (least recently offered).
* **Capacity** is reserved when an offer is made and released when it expires, is rejected, or
  the contact's wrap-up ends: per-channel limits and the shared budget are never exceeded.
* **Offers** expire after ``offer_timeout``: the contact is re-queued with its original key and
  not offered to the same agent for one more timeout; a reject excludes the agent for
  ``reject_cooldown``. ``max_missed_offers`` expiries in a row put the agent in
  ``not_responding`` (its other offers are withdrawn) until it sets itself available again.
* **Wrap-up.** Completing a contact holds its capacity for the queue's wrap-up seconds; an agent
  with no other open work is in state ``wrap_up`` meanwhile and returns to ``available`` when it
  ends (or when the agent sets itself available earlier).
* **Ends.** An ``end`` event abandons a queued or offered contact (its offer is withdrawn); for
  an assigned contact it completes it, so an agent is never left holding a call that hung up.
* **Logout** withdraws the agent's offers and re-queues its open contacts with their original
  wait, so nothing stays with an absent agent. ``away`` keeps assigned work, withdraws offers.
* **Overflow.** A contact that waited ``max_wait`` in a queue moves to its ``overflow`` queue;
  a contact arriving at a queue holding ``max_length`` contacts goes to the overflow queue, or,
  without one, is rejected with reason ``queue_full`` (an event, never a silent drop).
* **Crowd first.** A rule's ``crowd_first: S`` holds the contact in ``crowd_window`` for S seconds;
  a reply in its thread from someone other than the asker (and not from staff) ends it as
  ``answered_by_crowd`` (also while queued or offered, which withdraws the offer); otherwise it
  is queued with its wait counted from the original post.
* **Coming back.** A chat or mail thread whose contact finished reopens when the *customer*
  writes again; late events of a finished call and further crowd replies do not.
* **Follow-ups.** An ``update`` of a live contact that is not the crowd's answer (the customer
  writing again, a staff reply, a call's DTMF) emits ``contact.updated`` with who holds it
  (``agent_id``, ``offer_id``); its body is not kept here (the daemon keeps transcripts).
* **Away reasons and dispositions.** With ``away_reasons`` in the routing file, ``away`` needs
  one of them; a ``complete`` may carry one of the ``dispositions`` (``unknown_...`` refusals
  otherwise). A supervisor's :class:`~router.messages.ReleaseContact` completes an assigned
  contact as ``released_by_supervisor`` without wrap-up, so a lost hang-up strands nobody.
* **At least once.** MQTT QoS 1 can deliver an agent's command twice: a repeated accept, or a
  complete after the caller hung up, is a no-op, not a refusal.
* **Backlog.** Whenever capacity frees up (login, available, complete, wrap-up end, expiry,
  reject) the freed agent is given the best waiting contact at once; no polling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from channels.contact_event import ContactEvent
from router import views
from router.agent_index import AgentIndex
from router.contact_queues import ContactQueues
from router.customers import CustomerDirectory
from router.events import (
    AgentStateChanged,
    ContactAbandoned,
    ContactAnsweredByCrowd,
    ContactAssigned,
    ContactCompleted,
    ContactCrowdWindow,
    ContactCrowdWindowEnded,
    ContactEscalated,
    ContactFields,
    ContactOffered,
    ContactOfferExpired,
    ContactOfferRejected,
    ContactOverflowed,
    ContactQueued,
    ContactRejected,
    ContactUpdated,
    ContactWrapUpDone,
    ExpertAnswered,
)
from router.experts import ExpertRegistry
from router.lifecycle import (
    FINAL_CONTACT_STATES,
    AgentState,
    agent_transition,
    contact_transition,
)
from router.messages import (
    Accept,
    CancelOfferCmd,
    Command,
    Complete,
    EngineInput,
    EventCmd,
    LinkKeys,
    Login,
    Logout,
    OfferCmd,
    RefusedCmd,
    Reject,
    ReleaseContact,
    RemoveExpert,
    SetState,
    Tick,
    UpsertExpert,
)
from router.state import (
    NO_EXCLUSIONS,
    STATE_DECODER,
    STATE_ENCODER,
    AgentRec,
    Changes,
    ContactRec,
    CustomerRec,
    EngineState,
    ExpertRec,
    OfferRec,
    QueueCounters,
    contact_stub,
    moved,
)
from router.timers import Timer, TimerKind, Timers, is_live
from rules.decision import CustomerView
from rules.schema import RELEASED_BY_SUPERVISOR
from rules.schema import Queue as QueueCfg
from rules.table import RoutingTable

#: how many finished contacts are remembered for status look-ups.
FINISHED_LIMIT = 10_000


class Engine:
    """The routing core. See the module docstring for the semantics."""

    def __init__(self, table: RoutingTable, state: EngineState | None = None) -> None:
        self._state = state if state is not None else EngineState()
        # What changed since the last delta cut (see take_changes); forgotten after every
        # input until someone asks for them.
        self._changes = Changes()
        self._tracking = False
        self._experts = ExpertRegistry(self._state)
        self._customers = CustomerDirectory(self._state, self._changes)
        self._index = AgentIndex(self._state.agents)
        self._contact_queues = ContactQueues(self._state.contacts)
        self._configure(table)
        self._rebuild_indexes()

    # ---- construction and indexes -----------------------------------------------------------

    def _configure(self, table: RoutingTable) -> None:
        self.table = table
        cfg = table.file
        self._defaults = cfg.defaults
        self._queues: dict[str, QueueCfg] = dict(cfg.queues)
        st = self._state
        for agent in cfg.agents:
            st.agents.setdefault(agent.id, AgentRec(id=agent.id))
        for name in self._queues:
            st.counters.setdefault(name, QueueCounters())
        self._experts.sync_file(table)
        self._index.configure(cfg, self._queues)

    def _rebuild_indexes(self) -> None:
        st = self._state
        self._timers = Timers()
        self._contact_queues.rebuild(self._queues)
        self._timers.load(self._restored_timers())
        self._index.rebuild(st.agents.values())

    def _restored_timers(self) -> list[Timer]:
        """Every timer the records imply (after a restore or reload), as one list.

        The same timers the transitions schedule (see ``_schedule_step``, ``_schedule_max_wait``
        and the crowd, wrap-up, offer and exclusion timers), collected in one pass over the
        contacts rather than pushed one by one: this runs for each of a million contacts.
        """
        timers: list[Timer] = []
        add = timers.append
        max_wait = {
            name: q.max_wait
            for name, q in self._queues.items()
            if q.max_wait is not None and q.overflow is not None
        }
        step, wait, crowd, wrap, retry = (
            TimerKind.STEP,
            TimerKind.MAX_WAIT,
            TimerKind.CROWD,
            TimerKind.WRAP,
            TimerKind.RETRY,
        )
        for c in self._state.contacts.values():
            state = c.state
            if state == "queued" or state == "offered":
                if c.next_step < len(c.escalate):
                    add((c.arrived_at + c.escalate[c.next_step].after, step, c.id))
                limit = max_wait.get(c.queue)
                if limit is not None:
                    add((c.queue_entered_at + limit, wait, c.id))
            elif state == "crowd_window":
                add((c.crowd_until, crowd, c.id))
            elif state == "wrap_up":
                add((c.wrap_until, wrap, c.id))
            if c.excluded:
                for until in c.excluded.values():
                    add((until, retry, c.id))
        for offer in self._state.offers.values():
            add((offer.expires_at, TimerKind.OFFER, offer.id))
        return timers

    # ---- public API ---------------------------------------------------------------------------

    def handle(self, message: EngineInput, now: float) -> list[Command]:
        """Apply one input at time ``now``; return the commands to carry out.

        Timers due at or before ``now`` fire first, in time order, and those the input itself
        schedules at or before ``now`` fire after it, so the result does not depend on how
        often the caller ticks.
        """
        out: list[Command] = []
        self._fire_timers(now, out)
        self._state.clock = max(self._state.clock, now)
        if isinstance(message, ContactEvent):
            self._on_contact_event(message, now, out)
        elif isinstance(message, Tick):
            pass
        elif isinstance(message, LinkKeys):
            out.append(self._customers.link(message.keys, now, self._defaults.history_length))
        elif isinstance(message, UpsertExpert):
            out.append(self._experts.upsert(message.expert, now))
        elif isinstance(message, RemoveExpert):
            out.append(self._experts.remove(message.expert_id, now))
        elif isinstance(message, ReleaseContact):
            self._on_release(message, now, out)
        else:
            agent = self._state.agents.get(message.agent_id)
            if agent is None or message.agent_id not in self._index.agent_cfg:
                out.append(
                    RefusedCmd(
                        agent_id=message.agent_id,
                        reason="unknown_agent",
                        detail=f"no agent {message.agent_id!r} in the routing file",
                    )
                )
            elif isinstance(message, Accept):
                self._on_accept(agent, message, now, out)
            elif isinstance(message, Reject):
                self._on_reject(agent, message, now, out)
            elif isinstance(message, Complete):
                self._on_complete(agent, message, now, out)
            elif isinstance(message, Login | SetState):
                self._on_set_state(agent, message.state, message.reason, now, out)
            elif isinstance(message, Logout):
                self._on_logout(agent, now, out)
        # A timer the input scheduled at or before ``now`` (an escalation step that came due
        # while the contact was offered, then re-queued) fires now, not with the next input.
        self._fire_timers(now, out)
        if not self._tracking:
            self._changes.clear()
        return out

    def next_deadline(self) -> float | None:
        """The earliest time at which a timer is due, or None when nothing is pending."""
        return self._timers.next_live(self._state, self._queues)

    def rerouted_by(self, table: RoutingTable) -> list[str]:
        """The contacts :meth:`reload` with ``table`` may route again (their queue is gone): the
        caller fetches their events for it, since the engine does not keep bodies."""
        queues = table.file.queues
        return [c.id for c in self._state.contacts.values() if c.queue not in queues]

    def reload(
        self,
        table: RoutingTable,
        now: float,
        events: Mapping[str, ContactEvent] | None = None,
    ) -> list[Command]:
        """Swap the routing table. Queued contacts stay; those whose queue vanished are routed
        again by the new rules, on their whole event from ``events`` (by contact id; see
        :meth:`rerouted_by`) or, without it, on what the engine keeps (no body); agents get
        their new skills and capacities."""
        self._configure(table)
        out: list[Command] = []
        for agent in self._state.agents.values():
            if agent.id not in self._index.agent_cfg and agent.state != "offline":
                self._on_logout(agent, now, out)
        for contact in list(self._state.contacts.values()):
            if contact.queue not in self._queues and contact.state in ("queued", "crowd_window"):
                event = (events or {}).get(contact.id) or contact_stub(contact)
                decision = table.decide(event, self._customer_view(contact), now)
                contact.queue = decision.queue or next(iter(self._queues))
                contact.token += 1
                self._changes.contacts.setdefault(contact.id, False)
        self._rebuild_indexes()
        for agent in self._state.agents.values():
            self._drain_agent(agent, now, out)
        return out

    def snapshot(self) -> bytes:
        """The whole state as JSON bytes; :meth:`restore` rebuilds an engine from it."""
        return STATE_ENCODER.encode(self._state)

    @classmethod
    def restore(cls, table: RoutingTable, data: bytes) -> Engine:
        """An engine with the state of a :meth:`snapshot` and the given routing table."""
        return cls(table, STATE_DECODER.decode(data))

    def track_changes(self) -> None:
        """Record which records change from now on, for :meth:`take_changes`."""
        self._changes.clear()
        self._tracking = True

    def changed(self) -> int:
        """How many records changed since the last :meth:`take_changes` (a delta's size)."""
        return len(self._changes)

    def take_changes(self) -> Changes:
        """The records changed since :meth:`track_changes` or the last call (a delta
        snapshot's cut, see :func:`router.snapshot.encode_changes`); the next start empty."""
        return self._changes.take()

    def put_back_changes(self, changes: Changes) -> None:
        """Mark again what a :meth:`take_changes` took, for a delta that was not written."""
        self._changes.put_back(changes)

    @property
    def state(self) -> EngineState:
        """The live state (read it, do not change it)."""
        return self._state

    def queue_stats(self, now: float) -> list[dict[str, Any]]:
        """Per queue: waiting, oldest wait, agents ready, totals and service level so far."""
        return views.queue_stats(
            self._state, self._queues, self._index, self._contact_queues.waiting, now
        )

    def agent_list(self) -> list[dict[str, Any]]:
        """Every agent with state, reason, load per channel and open work."""
        return views.agent_list(self._state, self._index)

    def outstanding_offers(self) -> list[OfferCmd]:
        """Every pending offer as the command that made it (history included), for a daemon
        that restarted and must make sure each agent has seen its offers."""
        return views.outstanding_offers(self._state)

    def agent_work(self, agent_id: str) -> dict[str, Any] | None:
        """One agent's open work, for a desktop that (re)connects: see
        :func:`router.views.agent_work`; None for an agent not in the routing file."""
        return views.agent_work(self._state, self._index, agent_id)

    def floor_view(self) -> dict[str, Any]:
        """What a wallboard needs beyond :meth:`queue_stats`: see
        :func:`router.views.floor_view`."""
        return views.floor_view(self._state, self._queues, self._index)

    def contact_info(self, contact_id: str) -> dict[str, Any] | None:
        """A contact's state, queue, agent, wait and the customer's history; None if unknown."""
        return views.contact_info(self._state, contact_id)

    def experts_report(self, now: float) -> dict[str, Any]:
        """The crowd's health: see :meth:`router.experts.ExpertRegistry.report`."""
        return self._experts.report(now)

    def customer_info(self, ref: str) -> dict[str, Any] | None:
        """A customer by id or identity key, with keys, expert id and recent contacts."""
        return self._customers.info(ref, self._experts.find)

    def agent_counts(self) -> tuple[dict[str, int], int]:
        """Agents by state and how many are busy: see :func:`router.views.agent_counts`."""
        return views.agent_counts(self._state)

    def queue_gauges(self, now: float) -> list[views.QueueGauges]:
        """What the queue gauges show: see :func:`router.views.queue_gauges`."""
        return views.queue_gauges(
            self._state, self._queues, self._index, self._contact_queues.waiting, now
        )

    # ---- contact events ---------------------------------------------------------------------

    def _on_contact_event(self, event: ContactEvent, now: float, out: list[Command]) -> None:
        contact = self._state.contacts.get(event.contact_id)
        keys = self.table.identity_keys(event)
        expert = self._experts.find(keys)
        if expert is not None:
            expert.last_seen = now
            if (
                event.channel == "social"
                and event.kind == "update"
                and self._experts.is_answer(expert, event)
            ):
                expert.answers += 1
                expert.last_answer = now
                out.append(
                    EventCmd(
                        event=ExpertAnswered(
                            at=now, expert_id=expert.id, contact_id=event.contact_id
                        )
                    )
                )
                if contact is None:
                    return  # an expert's reply in a thread we are not handling: not a question
        if contact is None:
            if event.kind == "end" or not self._reopens(event, keys):
                # The end of something never routed, or a late event of a finished contact.
                return
            self._on_new(event, keys, expert, now, out)
        elif event.kind == "end":
            self._on_end(contact, event.end_reason or "ended", now, out)
        else:
            self._on_update(contact, event, keys, now, out)

    def _reopens(self, event: ContactEvent, keys: tuple[str, ...]) -> bool:
        """Does an event about a finished contact start it again?

        Chat conversations (a WhatsApp number, a Messenger user) and mail threads keep their id
        for ever, so the customer writing again after the contact was completed is new work.
        A call id is never reused, so late call events are dropped; in a community thread only
        the asker reopens it, so more crowd replies after the answer stay with the crowd.
        """
        done = self._state.finished.get(event.contact_id)
        if done is None:
            return True
        if event.channel == "phone":
            return False
        return bool(keys) and any(self._state.keys.get(k) == done[3] for k in keys)

    def _on_new(
        self,
        event: ContactEvent,
        keys: tuple[str, ...],
        sender_expert: ExpertRec | None,
        now: float,
        out: list[Command],
    ) -> None:
        st = self._state
        customer = self._customers.resolve(
            event.contact_id, keys, sender_expert, now, self._defaults.customer_retention
        )
        expert = self._experts.find(customer.keys)
        if expert is not None:
            expert.contacts += 1
        view = self._view(customer, expert)
        decision = self.table.decide(event, view, now)
        arrived = now
        st.seq += 1
        contact = ContactRec(
            id=event.contact_id,
            channel=event.channel,
            source=event.source,
            customer_id=customer.id,
            expert=view.expert,
            expert_id=expert.id if expert is not None else None,
            state="received",
            rule=decision.rule,
            queue=decision.queue or "",
            priority=decision.priority,
            arrived_at=arrived,
            # The rule's own dict, shared: a contact's extra skills are replaced, never changed.
            extra_skills=decision.skills,
            excluded=NO_EXCLUSIONS,
            escalate=(
                tuple(sorted(decision.escalate, key=lambda s: s.after)) if decision.escalate else ()
            ),
            seq=st.seq,
        )
        if decision.reject is not None or decision.queue is None:
            contact.state = contact_transition(contact.id, "received", "rejected")
            out.append(
                EventCmd(
                    event=ContactRejected(
                        **self._fields(contact, now), reason=decision.reject or "no_queue"
                    )
                )
            )
            self._finish(contact, "rejected", now)
            return
        st.contacts[contact.id] = contact
        moved(self._changes.contacts, contact.id)
        self._customers.remember(contact, event.subject, now, self._defaults.history_length)
        if decision.crowd_first:
            contact.state = contact_transition(contact.id, "received", "crowd_window")
            contact.crowd = True
            contact.crowd_until = now + decision.crowd_first
            self._timer(contact.crowd_until, TimerKind.CROWD, contact.id)
            out.append(
                EventCmd(
                    event=ContactCrowdWindow(
                        **self._fields(contact, now), until=contact.crowd_until
                    )
                )
            )
            return
        self._enter_queue(contact, contact.queue, now, out, first=True)

    def _on_update(
        self,
        contact: ContactRec,
        event: ContactEvent,
        keys: tuple[str, ...],
        now: float,
        out: list[Command],
    ) -> None:
        if (
            contact.crowd
            and contact.state in ("crowd_window", "queued", "offered")
            and keys
            and not set(self._state.customers[contact.customer_id].keys).intersection(keys)
            # the company's own staff in the thread is not the crowd
            and event.attributes.get("staff") != "true"
        ):
            self._answered_by_crowd(contact, event, keys, now, out)
            return
        # The asker writing again, a staff reply, a call's DTMF: still the same contact. Its
        # body stays at the edge (the transcript); whoever holds the contact is told.
        out.append(
            EventCmd(
                event=ContactUpdated(
                    **self._fields(contact, now),
                    state=contact.state,
                    agent_id=contact.agent_id,
                    offer_id=contact.offer_id,
                )
            )
        )

    def _answered_by_crowd(
        self,
        contact: ContactRec,
        event: ContactEvent,
        keys: tuple[str, ...],
        now: float,
        out: list[Command],
    ) -> None:
        freed = None
        if contact.state == "offered":
            freed = self._withdraw_offer(contact, "answered_by_crowd", now, out, requeue=False)
        elif contact.state == "queued":
            self._contact_queues.leave(contact)
        contact.state = contact_transition(contact.id, contact.state, "answered_by_crowd")
        out.append(
            EventCmd(
                event=ContactAnsweredByCrowd(
                    **self._fields(contact, now),
                    by=event.sender.handle or event.sender.email or event.sender.phone,
                    by_expert=getattr(self._experts.find(keys), "id", None),
                    waited=now - contact.arrived_at,
                )
            )
        )
        self._finish(contact, "answered_by_crowd", now)
        if freed is not None:
            self._drain_agent(freed, now, out)

    def _on_end(self, contact: ContactRec, reason: str, now: float, out: list[Command]) -> None:
        state = contact.state
        if state == "assigned":
            agent = self._state.agents[contact.agent_id or ""]
            self._complete(agent, contact, f"ended:{reason}", now, out)
            return
        if state == "wrap_up":
            return
        freed = None
        if state == "offered":
            freed = self._withdraw_offer(contact, "contact_ended", now, out, requeue=False)
        elif state == "queued":
            self._contact_queues.leave(contact)
        contact.state = contact_transition(contact.id, contact.state, "abandoned")
        expert = self._state.experts.get(contact.expert_id or "")
        if expert is not None:
            expert.abandoned += 1
        if contact.queue in self._state.counters and state != "crowd_window":
            self._state.counters[contact.queue].abandoned += 1
        out.append(
            EventCmd(
                event=ContactAbandoned(
                    **self._fields(contact, now),
                    reason=reason,
                    waited=now - contact.arrived_at,
                    from_state=state,
                )
            )
        )
        self._finish(contact, "abandoned", now)
        if freed is not None:
            self._drain_agent(freed, now, out)

    # ---- queueing ---------------------------------------------------------------------------

    def _enter_queue(
        self, contact: ContactRec, qname: str, now: float, out: list[Command], first: bool = False
    ) -> None:
        """Put a contact (received, crowd_window or being moved) into ``qname`` and dispatch."""
        moving = contact.state == "queued"
        if moving:
            self._contact_queues.leave(contact)
        seen: set[str] | None = None
        queue = self._queues[qname]
        waiting = self._contact_queues.waiting
        while queue.max_length is not None and waiting[qname] >= queue.max_length:
            seen = seen or set()
            seen.add(qname)
            if queue.overflow is None or queue.overflow in seen:
                contact.state = contact_transition(contact.id, contact.state, "rejected")
                out.append(
                    EventCmd(
                        event=ContactRejected(**self._fields(contact, now), reason="queue_full")
                    )
                )
                self._finish(contact, "rejected", now)
                return
            self._state.counters[qname].overflowed += 1
            out.append(
                EventCmd(
                    event=ContactOverflowed(
                        **self._fields(contact, now), reason="max_length", to=queue.overflow
                    )
                )
            )
            qname = queue.overflow
            queue = self._queues[qname]
        if not moving:
            contact.state = contact_transition(contact.id, contact.state, "queued")
        contact.queue = qname
        contact.queue_entered_at = now
        self._state.counters[qname].entered += 1
        self._customers.update_history(contact, queue=qname)
        # Spelled out rather than ``**self._fields(...)``: a Struct built from a dict of
        # keywords costs several times more, and this is on every contact's path.
        self._changes.contacts.setdefault(contact.id, False)  # as _fields does
        out.append(
            EventCmd(
                event=ContactQueued(
                    at=now,
                    contact_id=contact.id,
                    channel=contact.channel,
                    source=contact.source,
                    queue=contact.queue or None,
                    priority=contact.priority,
                    expert=contact.expert,
                    expert_id=contact.expert_id,
                    crowd=contact.crowd,
                    customer_id=contact.customer_id,
                    rule=contact.rule,
                    first=first,
                )
            )
        )
        self._schedule_max_wait(contact)
        if first:
            self._schedule_step(contact)
        # An agent is looked for before the contact goes into the heap: most new contacts are
        # offered at once, and a heap entry made stale straight away is only work for later.
        chosen = self._choose_agent(contact, now)
        if chosen is None:
            self._contact_queues.push(contact)
        else:
            self._offer(contact, chosen, now, out, dequeued=True)

    def _requeue(self, contact: ContactRec, now: float, out: list[Command]) -> None:
        """Back into its queue with its original key (after expiry, reject, logout)."""
        contact.state = contact_transition(contact.id, contact.state, "queued")
        contact.offer_id = None
        contact.agent_id = None
        self._contact_queues.push(contact)
        out.append(
            EventCmd(
                event=ContactQueued(
                    **self._fields(contact, now), rule=contact.rule, first=False, requeued=True
                )
            )
        )
        # Timers pruned while it was with an agent are wanted again; its escalation steps
        # count from its arrival, whichever queue it waits in next (so before the overflow).
        self._schedule_step(contact)
        queue = self._queues[contact.queue]
        if (
            queue.max_wait is not None
            and queue.overflow is not None
            and now >= contact.queue_entered_at + queue.max_wait
        ):
            # Its max wait ran out while it was offered: overflow now.
            self._overflow_max_wait(contact, now, out)
            return
        self._schedule_max_wait(contact)

    # ---- matching ---------------------------------------------------------------------------

    def _dispatch_contact(self, contact: ContactRec, now: float, out: list[Command]) -> None:
        """Offer a queued contact to the best ready agent, if there is one."""
        if contact.state != "queued":
            return
        chosen = self._choose_agent(contact, now)
        if chosen is not None:
            self._offer(contact, chosen, now, out)

    def _choose_agent(self, contact: ContactRec, now: float) -> AgentRec | None:
        """The customer's preferred agent if it can take the contact, else the queue's best."""
        customer = self._state.customers.get(contact.customer_id)
        if (
            customer is not None
            and customer.last_agent is not None
            and now - customer.last_agent_at <= self._defaults.preferred_agent_seconds
        ):
            preferred = self._state.agents.get(customer.last_agent)
            if (
                preferred is not None
                and preferred.state == "available"
                and self._index.serves(preferred.id, (contact.queue, contact.channel))
                and self._index.can_take(preferred, contact.channel)
                and self._index.suits(preferred.id, contact, now)
            ):
                return preferred
        return self._index.best_agent(contact, now)

    def _drain_agent(self, agent: AgentRec, now: float, out: list[Command]) -> None:
        """Give a newly free agent waiting work until it is full or nothing fits; re-index."""
        while agent.state == "available":
            contact = self._contact_queues.best_for(agent, self._index, now)
            if contact is None:
                break
            self._contact_queues.leave(contact)
            self._offer(contact, agent, now, out, dequeued=True)
        self._index.refresh(agent)

    # ---- offers -----------------------------------------------------------------------------

    def _offer(
        self,
        contact: ContactRec,
        agent: AgentRec,
        now: float,
        out: list[Command],
        dequeued: bool = False,
    ) -> None:
        st = self._state
        if not dequeued:
            self._contact_queues.leave(contact)
        contact.state = contact_transition(contact.id, contact.state, "offered")
        st.seq += 1
        offer_id = f"o{st.seq}"
        expires = now + self._offer_timeout(contact.queue)
        st.offers[offer_id] = OfferRec(
            id=offer_id, contact_id=contact.id, agent_id=agent.id, expires_at=expires
        )
        contact.offer_id = offer_id
        contact.agent_id = agent.id
        agent.offers.append(offer_id)
        agent.last_offer_seq = st.seq
        self._index.reserve(agent, contact.channel, +1)
        self._timer(expires, TimerKind.OFFER, offer_id)
        out.append(views.offer_command(st, st.offers[offer_id], contact))
        self._changes.contacts.setdefault(contact.id, False)  # as _fields does
        out.append(
            EventCmd(
                event=ContactOffered(  # spelled out: see _enter_queue
                    at=now,
                    contact_id=contact.id,
                    channel=contact.channel,
                    source=contact.source,
                    queue=contact.queue or None,
                    priority=contact.priority,
                    expert=contact.expert,
                    expert_id=contact.expert_id,
                    crowd=contact.crowd,
                    customer_id=contact.customer_id,
                    agent_id=agent.id,
                    offer_id=offer_id,
                    waited=now - contact.arrived_at,
                )
            )
        )
        self._index.refresh(agent)

    def _offer_timeout(self, qname: str) -> float:
        timeout = self._queues[qname].offer_timeout
        return timeout if timeout is not None else self._defaults.offer_timeout

    def _withdraw_offer(
        self, contact: ContactRec, reason: str, now: float, out: list[Command], requeue: bool
    ) -> AgentRec:
        """Cancel a contact's pending offer and free the agent's reserved capacity."""
        offer = self._state.offers.pop(contact.offer_id or "")
        agent = self._state.agents[offer.agent_id]
        agent.offers.remove(offer.id)
        self._index.reserve(agent, contact.channel, -1)
        out.append(
            CancelOfferCmd(
                offer_id=offer.id, agent_id=agent.id, contact_id=contact.id, reason=reason
            )
        )
        if requeue:
            self._requeue(contact, now, out)
        else:
            contact.offer_id = None
            contact.agent_id = None
        return agent

    def _own_offer(
        self, agent: AgentRec, offer_id: str, out: list[Command]
    ) -> tuple[OfferRec, ContactRec] | None:
        offer = self._state.offers.get(offer_id)
        if offer is None:
            if not any(self._state.contacts[c].accepted_offer == offer_id for c in agent.contacts):
                out.append(RefusedCmd(agent_id=agent.id, reason="unknown_offer", detail=offer_id))
            # else: the agent's own accept, delivered twice (MQTT QoS 1 is at least once)
            return None
        if offer.agent_id != agent.id:
            out.append(RefusedCmd(agent_id=agent.id, reason="not_your_offer", detail=offer_id))
            return None
        return offer, self._state.contacts[offer.contact_id]

    def _on_accept(self, agent: AgentRec, msg: Accept, now: float, out: list[Command]) -> None:
        found = self._own_offer(agent, msg.offer_id, out)
        if found is None:
            return
        offer, contact = found
        del self._state.offers[offer.id]
        agent.offers.remove(offer.id)
        agent.contacts.append(contact.id)
        agent.missed = 0
        contact.state = contact_transition(contact.id, contact.state, "assigned")
        contact.offer_id = None
        contact.assigned_at = now
        contact.accepted_offer = offer.id
        waited = now - contact.arrived_at
        counters = self._state.counters[contact.queue]
        counters.answered += 1
        expert = self._state.experts.get(contact.expert_id or "")
        if expert is not None:
            expert.answered += 1
            expert.wait_total += waited
            expert.wait_max = max(expert.wait_max, waited)
        if waited <= self._queues[contact.queue].sla.seconds:
            counters.answered_in_sla += 1
        self._customers.update_history(contact, agent_id=agent.id, outcome="assigned")
        self._changes.contacts.setdefault(contact.id, False)  # as _fields does
        out.append(
            EventCmd(
                event=ContactAssigned(  # spelled out: see _enter_queue
                    at=now,
                    contact_id=contact.id,
                    channel=contact.channel,
                    source=contact.source,
                    queue=contact.queue or None,
                    priority=contact.priority,
                    expert=contact.expert,
                    expert_id=contact.expert_id,
                    crowd=contact.crowd,
                    customer_id=contact.customer_id,
                    agent_id=agent.id,
                    waited=waited,
                )
            )
        )

    def _on_reject(self, agent: AgentRec, msg: Reject, now: float, out: list[Command]) -> None:
        found = self._own_offer(agent, msg.offer_id, out)
        if found is None:
            return
        _, contact = found
        # Excluded before it is re-queued: a re-queue can dispatch at once (an overflow).
        contact.excluded = {**contact.excluded, agent.id: now + self._defaults.reject_cooldown}
        self._timer(now + self._defaults.reject_cooldown, TimerKind.RETRY, contact.id)
        self._withdraw_offer(contact, "rejected", now, out, requeue=True)
        out.append(
            EventCmd(
                event=ContactOfferRejected(
                    **self._fields(contact, now), agent_id=agent.id, reason=msg.reason
                )
            )
        )
        self._dispatch_contact(contact, now, out)
        self._drain_agent(agent, now, out)

    def _expire_offer(self, offer: OfferRec, now: float, out: list[Command]) -> None:
        contact = self._state.contacts[offer.contact_id]
        agent = self._state.agents[offer.agent_id]
        # Not straight back to the agent who just missed it: give it to someone else first.
        # Exclusion and state change come before the re-queue, which can dispatch at once.
        until = now + self._offer_timeout(contact.queue)
        contact.excluded = {**contact.excluded, agent.id: until}
        self._timer(until, TimerKind.RETRY, contact.id)
        agent.missed += 1
        stop = agent.missed >= self._defaults.max_missed_offers and agent.state == "available"
        if stop:
            self._set_agent_state(agent, "not_responding", "missed_offers", now, out)
        self._withdraw_offer(contact, "expired", now, out, requeue=True)
        out.append(
            EventCmd(
                event=ContactOfferExpired(
                    **self._fields(contact, now), agent_id=agent.id, missed=agent.missed
                )
            )
        )
        if stop:
            for other in list(agent.offers):
                other_contact = self._state.contacts[self._state.offers[other].contact_id]
                self._withdraw_offer(other_contact, "agent_not_responding", now, out, requeue=True)
                self._dispatch_contact(other_contact, now, out)
        self._dispatch_contact(contact, now, out)
        self._drain_agent(agent, now, out)

    # ---- completion, wrap-up, agent state ---------------------------------------------------

    def _on_complete(self, agent: AgentRec, msg: Complete, now: float, out: list[Command]) -> None:
        contact = self._state.contacts.get(msg.contact_id)
        if contact is None or contact.agent_id != agent.id or contact.state != "assigned":
            if self._completed_by(msg.contact_id, agent.id):
                return  # a repeated complete, or one after the caller hung up: already done
            out.append(
                RefusedCmd(agent_id=agent.id, reason="not_your_contact", detail=msg.contact_id)
            )
            return
        codes = self.table.file.dispositions
        if msg.disposition is not None and msg.disposition not in codes:
            known = ", ".join(codes) or "none are defined in the routing file"
            out.append(
                RefusedCmd(
                    agent_id=agent.id,
                    reason="unknown_disposition",
                    detail=f"{msg.disposition!r} is not a disposition (known: {known})",
                )
            )
            return
        self._complete(
            agent, contact, msg.outcome or "completed", now, out, disposition=msg.disposition
        )

    def _on_release(self, msg: ReleaseContact, now: float, out: list[Command]) -> None:
        contact = self._state.contacts.get(msg.contact_id)
        if contact is None or contact.state != "assigned" or contact.agent_id is None:
            out.append(
                RefusedCmd(
                    agent_id=None,
                    reason="not_assigned",
                    detail=f"contact {msg.contact_id!r} is not held by an agent",
                )
            )
            return
        self._complete(
            self._state.agents[contact.agent_id],
            contact,
            RELEASED_BY_SUPERVISOR,
            now,
            out,
            disposition=RELEASED_BY_SUPERVISOR,
            released_by=msg.by,
        )

    def _completed_by(self, contact_id: str, agent_id: str) -> bool:
        contact = self._state.contacts.get(contact_id)
        if contact is not None:
            return contact.state == "wrap_up" and contact.agent_id == agent_id
        done = self._state.finished.get(contact_id)
        return done is not None and done[0] == "done" and done[2] == agent_id

    def _complete(
        self,
        agent: AgentRec,
        contact: ContactRec,
        outcome: str,
        now: float,
        out: list[Command],
        *,
        disposition: str | None = None,
        released_by: str | None = None,
    ) -> None:
        queue = self._queues.get(contact.queue)
        wrap = self._defaults.wrap_up
        if queue is not None and queue.wrap_up is not None:
            wrap = queue.wrap_up
        if released_by is not None:
            # Released by a supervisor: the agent did not work it to the end, so no wrap-up.
            wrap = 0.0
        self._changes.contacts.setdefault(contact.id, False)  # as _fields does
        out.append(
            EventCmd(
                event=ContactCompleted(  # spelled out: see _enter_queue
                    at=now,
                    contact_id=contact.id,
                    channel=contact.channel,
                    source=contact.source,
                    queue=contact.queue or None,
                    priority=contact.priority,
                    expert=contact.expert,
                    expert_id=contact.expert_id,
                    crowd=contact.crowd,
                    customer_id=contact.customer_id,
                    agent_id=agent.id,
                    handled=now - contact.assigned_at,
                    outcome=outcome,
                    disposition=disposition,
                    wrap_up=wrap,
                    released_by=released_by,
                )
            )
        )
        customer = self._state.customers.get(contact.customer_id)
        if customer is not None:
            customer.last_agent = agent.id
            customer.last_agent_at = now
        self._customers.update_history(contact, outcome=disposition or outcome)
        if wrap > 0:
            contact.state = contact_transition(contact.id, contact.state, "wrap_up")
            contact.wrap_until = now + wrap
            self._timer(contact.wrap_until, TimerKind.WRAP, contact.id)
            if agent.state == "available" and not self._has_open_work(agent):
                self._set_agent_state(agent, "wrap_up", None, now, out)
            return
        self._release(agent, contact, now, out)

    def _has_open_work(self, agent: AgentRec) -> bool:
        return bool(agent.offers) or any(
            self._state.contacts[c].state == "assigned" for c in agent.contacts
        )

    def _release(
        self, agent: AgentRec, contact: ContactRec, now: float, out: list[Command]
    ) -> None:
        """The contact's work (and wrap-up) is over: free the capacity, finish, drain."""
        agent.contacts.remove(contact.id)
        self._index.reserve(agent, contact.channel, -1)
        if not agent.contacts and not agent.offers:
            agent.idle_since = now
        if contact.state == "wrap_up":
            out.append(
                EventCmd(event=ContactWrapUpDone(**self._fields(contact, now), agent_id=agent.id))
            )
        contact.state = contact_transition(contact.id, contact.state, "done")
        self._finish(contact, "done", now)
        if agent.state == "wrap_up" and not any(
            self._state.contacts[c].state == "wrap_up" for c in agent.contacts
        ):
            self._set_agent_state(agent, "available", None, now, out)
        self._drain_agent(agent, now, out)

    def _set_agent_state(
        self, agent: AgentRec, new: AgentState, reason: str | None, now: float, out: list[Command]
    ) -> None:
        old = agent.state
        agent.state = agent_transition(agent.id, old, new)
        agent.reason = reason
        if new == "available" and old != "wrap_up":
            agent.missed = 0
        if new == "available" and not agent.contacts and not agent.offers:
            agent.idle_since = now
        # Out of (or back into) the agent order at once, so the ready counts stay exact.
        self._index.refresh(agent)
        out.append(
            EventCmd(
                event=AgentStateChanged(
                    at=now, agent_id=agent.id, state=new, previous=old, reason=reason
                )
            )
        )

    def _on_set_state(
        self, agent: AgentRec, new: AgentState, reason: str | None, now: float, out: list[Command]
    ) -> None:
        if agent.state == new == "available":
            return  # a repeated login or "available": nothing changes
        reasons = self.table.file.away_reasons
        if new == "away" and reasons and reason not in reasons:
            out.append(
                RefusedCmd(
                    agent_id=agent.id,
                    reason="unknown_away_reason",
                    detail=f"away needs one of the reasons {', '.join(reasons)}; got {reason!r}",
                )
            )
            return
        if agent.state == "wrap_up":
            # Ending wrap-up early ("ready"), or going away from it: the held slots end now.
            self._end_wrap_ups(agent, now, out)
            if agent.state == new:
                return
        self._set_agent_state(agent, new, reason, now, out)
        if new == "away":
            for offer_id in list(agent.offers):
                contact = self._state.contacts[self._state.offers[offer_id].contact_id]
                self._withdraw_offer(contact, "agent_away", now, out, requeue=True)
                self._dispatch_contact(contact, now, out)
        self._drain_agent(agent, now, out)

    def _end_wrap_ups(self, agent: AgentRec, now: float, out: list[Command]) -> None:
        for contact_id in list(agent.contacts):
            contact = self._state.contacts[contact_id]
            if contact.state == "wrap_up":
                self._release(agent, contact, now, out)

    def _on_logout(self, agent: AgentRec, now: float, out: list[Command]) -> None:
        if agent.state == "offline":
            return
        # Offline first: a contact re-queued below may overflow and be dispatched at once,
        # and must not come straight back to the agent who is leaving.
        self._set_agent_state(agent, "offline", None, now, out)
        requeued = []
        for offer_id in list(agent.offers):
            contact = self._state.contacts[self._state.offers[offer_id].contact_id]
            self._withdraw_offer(contact, "agent_logout", now, out, requeue=True)
            requeued.append(contact)
        for contact_id in list(agent.contacts):
            contact = self._state.contacts[contact_id]
            agent.contacts.remove(contact_id)
            self._index.reserve(agent, contact.channel, -1)
            if contact.state == "wrap_up":
                contact.state = contact_transition(contact.id, contact.state, "done")
                self._finish(contact, "done", now)
            else:
                # Nothing stays with an absent agent: open work goes back, keeping its wait.
                self._customers.update_history(contact, outcome="requeued")
                self._requeue(contact, now, out)
                requeued.append(contact)
        for contact in requeued:
            if contact.state == "queued":
                self._dispatch_contact(contact, now, out)

    # ---- timers -----------------------------------------------------------------------------

    def _timer(self, at: float, kind: TimerKind, ref: str) -> None:
        self._timers.add(at, kind, ref)

    def _schedule_step(self, contact: ContactRec) -> None:
        if contact.next_step < len(contact.escalate):
            step = contact.escalate[contact.next_step]
            self._timer(contact.arrived_at + step.after, TimerKind.STEP, contact.id)

    def _schedule_max_wait(self, contact: ContactRec) -> None:
        queue = self._queues.get(contact.queue)
        if queue is not None and queue.max_wait is not None and queue.overflow is not None:
            self._timer(contact.queue_entered_at + queue.max_wait, TimerKind.MAX_WAIT, contact.id)

    def _fire_timers(self, now: float, out: list[Command]) -> None:
        st = self._state
        while (timer := self._timers.pop_due(now)) is not None:
            due, kind, ref = timer
            if not is_live(st, self._queues, due, kind, ref):
                continue
            # A timer that came due while its contact was with an agent fires now, not in the past.
            at = max(due, st.clock)
            if kind == TimerKind.OFFER:
                self._expire_offer(st.offers[ref], at, out)
                continue
            contact = st.contacts[ref]
            if kind == TimerKind.WRAP:
                self._release(st.agents[contact.agent_id or ""], contact, at, out)
            elif kind == TimerKind.CROWD:
                out.append(EventCmd(event=ContactCrowdWindowEnded(**self._fields(contact, at))))
                self._enter_queue(contact, contact.queue, at, out, first=True)
            elif kind == TimerKind.STEP:
                self._escalate(contact, at, out)
            elif kind == TimerKind.MAX_WAIT:
                self._overflow_max_wait(contact, at, out)
            else:  # TimerKind.RETRY: an exclusion ended, the agent may take it now
                contact.excluded = {a: u for a, u in contact.excluded.items() if u > at}
                self._changes.contacts.setdefault(contact.id, False)
                if contact.state == "queued":
                    self._dispatch_contact(contact, at, out)

    def _overflow_max_wait(self, contact: ContactRec, now: float, out: list[Command]) -> None:
        overflow = self._queues[contact.queue].overflow
        assert overflow is not None
        self._state.counters[contact.queue].overflowed += 1
        out.append(
            EventCmd(
                event=ContactOverflowed(
                    **self._fields(contact, now), reason="max_wait", to=overflow
                )
            )
        )
        self._enter_queue(contact, overflow, now, out)

    def _escalate(self, contact: ContactRec, now: float, out: list[Command]) -> None:
        step = contact.escalate[contact.next_step]
        contact.next_step += 1
        self._schedule_step(contact)
        if step.skills is not None:
            contact.extra_skills = dict(step.skills)
        if step.priority is not None:
            contact.priority = step.priority
        out.append(
            EventCmd(
                event=ContactEscalated(
                    **self._fields(contact, now),
                    step=contact.next_step,
                    to=step.queue or contact.queue,
                )
            )
        )
        if contact.state != "queued":
            # An offer is out: the new requirements and queue apply if it comes back.
            if step.queue is not None:
                contact.queue = step.queue
            return
        if step.queue is not None and step.queue != contact.queue:
            self._enter_queue(contact, step.queue, now, out)
        else:
            self._contact_queues.leave(contact)
            self._contact_queues.push(contact)
            self._dispatch_contact(contact, now, out)

    def _view(self, customer: CustomerRec, expert: ExpertRec | None) -> CustomerView:
        return CustomerView(
            id=customer.id,
            known=bool(customer.history) or expert is not None,
            expert=expert is not None,
            expert_level=expert.level if expert is not None else 0,
            vip=customer.vip,
            contacts=len(customer.history),
        )

    def _customer_view(self, contact: ContactRec) -> CustomerView:
        customer = self._state.customers[contact.customer_id]
        return self._view(customer, self._experts.find(customer.keys))

    def _finish(self, contact: ContactRec, outcome: str, now: float) -> None:
        st = self._state
        assert contact.state in FINAL_CONTACT_STATES
        st.contacts.pop(contact.id, None)
        changes = self._changes
        moved(changes.contacts, contact.id)
        if outcome != "done":
            self._customers.update_history(contact, outcome=outcome)
        self._customers.closed(contact)
        st.finished.pop(contact.id, None)  # a reopened contact moves to the newest end
        st.finished[contact.id] = [
            contact.state,
            contact.queue or None,
            contact.agent_id,
            contact.customer_id,
        ]
        moved(changes.finished, contact.id)
        if len(st.finished) > FINISHED_LIMIT:
            oldest = next(iter(st.finished))
            del st.finished[oldest]
            moved(changes.finished, oldest)

    def _fields(self, contact: ContactRec, now: float) -> ContactFields:
        """The contact's fields every ``contact.*`` event carries, as they are at ``now``.

        Every transition of a contact emits an event, so this is where a contact is marked
        changed for the next delta snapshot (the few changes without an event, and the events
        spelled out on the decision path, mark it themselves).
        """
        self._changes.contacts.setdefault(contact.id, False)
        return {
            "at": now,
            "contact_id": contact.id,
            "channel": contact.channel,
            "source": contact.source,
            "queue": contact.queue or None,
            "priority": contact.priority,
            "expert": contact.expert,
            "expert_id": contact.expert_id,
            "crowd": contact.crowd,
            "customer_id": contact.customer_id,
        }
