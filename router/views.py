"""The engine's read-only views: what the HTTP API, the desk, the wallboard and metrics show.

Every function here reads the state records and the indexes and changes nothing; the engine's
public methods of the same names (``Engine.queue_stats`` ...) call them.
"""

from __future__ import annotations

from collections import Counter
from math import inf
from typing import Any

from router.agent_index import AgentIndex
from router.customers import history
from router.messages import OfferCmd
from router.state import ContactRec, EngineState, OfferRec, contact_stub
from rules.schema import Queue as QueueCfg


def queue_stats(
    state: EngineState,
    queues: dict[str, QueueCfg],
    index: AgentIndex,
    waiting: dict[str, int],
    now: float,
) -> list[dict[str, Any]]:
    """Per queue: waiting, oldest wait, agents ready, totals and service level so far."""
    oldest: dict[str, float] = {}
    for contact in state.contacts.values():
        if contact.state == "queued":
            waited = now - contact.arrived_at
            if waited > oldest.get(contact.queue, -1.0):
                oldest[contact.queue] = waited
    ready: dict[str, set[str]] = {q: set() for q in queues}
    for agent in state.agents.values():
        if agent.state == "available":
            for qname, channel in index.eligible.get(agent.id, ()):
                if index.can_take(agent, channel):
                    ready[qname].add(agent.id)
    rows = []
    for name, queue in queues.items():
        c = state.counters[name]
        closed = c.answered + c.abandoned
        rows.append(
            {
                "name": name,
                "waiting": waiting.get(name, 0),
                "oldest_wait": round(oldest.get(name, 0.0), 3),
                "agents_ready": len(ready[name]),
                "entered": c.entered,
                "answered": c.answered,
                "abandoned": c.abandoned,
                "overflowed": c.overflowed,
                "service_level": (c.answered_in_sla / closed) if closed else None,
                "sla_seconds": queue.sla.seconds,
                "sla_percent": queue.sla.percent,
            }
        )
    return rows


def agent_list(state: EngineState, index: AgentIndex) -> list[dict[str, Any]]:
    """Every agent with state, reason, load per channel and open work."""
    cfg = index.agent_cfg
    return [
        {
            "id": a.id,
            "name": cfg[a.id].name if a.id in cfg else "",
            "state": a.state,
            "reason": a.reason,
            "busy": bool(a.contacts or a.offers),
            "load": dict(a.load),
            "budget_used": a.budget_used,
            "offers": list(a.offers),
            "contacts": list(a.contacts),
            "missed": a.missed,
        }
        for a in state.agents.values()
    ]


def offer_command(state: EngineState, offer: OfferRec, contact: ContactRec) -> OfferCmd:
    """The command that makes (or re-publishes) an offer, with the customer's history."""
    customer = state.customers.get(contact.customer_id)
    expert = state.experts.get(contact.expert_id or "")
    return OfferCmd(
        offer_id=offer.id,
        agent_id=offer.agent_id,
        contact_id=contact.id,
        queue=contact.queue,
        expires_at=offer.expires_at,
        contact=contact_stub(contact),
        customer_id=contact.customer_id,
        history=tuple(history(customer, contact.id)) if customer else (),
        rule=contact.rule,
        priority=contact.priority,
        expert_id=contact.expert_id,
        expert_level=expert.level if expert is not None else 0,
    )


def outstanding_offers(state: EngineState) -> list[OfferCmd]:
    """Every pending offer as the command that made it (history included), for a daemon
    that restarted and must make sure each agent has seen its offers."""
    return [
        offer_command(state, offer, state.contacts[offer.contact_id])
        for offer in state.offers.values()
    ]


def agent_work(state: EngineState, index: AgentIndex, agent_id: str) -> dict[str, Any] | None:
    """One agent's open work, for a desktop that (re)connects: its state, its pending
    offers (as the commands that made them) and the contacts it holds (assigned or in
    wrap-up) with what an offer carries; None for an agent not in the routing file."""
    agent = state.agents.get(agent_id)
    if agent is None or agent_id not in index.agent_cfg:
        return None
    contacts = []
    for contact_id in agent.contacts:
        contact = state.contacts[contact_id]
        customer = state.customers.get(contact.customer_id)
        expert = state.experts.get(contact.expert_id or "")
        contacts.append(
            {
                "contact_id": contact.id,
                "state": contact.state,
                "queue": contact.queue,
                "rule": contact.rule,
                "priority": contact.priority,
                "channel": contact.channel,
                "contact": contact_stub(contact),
                "customer_id": contact.customer_id,
                "history": history(customer, contact.id) if customer else [],
                "expert_id": contact.expert_id,
                "expert_level": expert.level if expert is not None else 0,
                "assigned_at": contact.assigned_at,
                "wrap_until": contact.wrap_until if contact.state == "wrap_up" else None,
            }
        )
    return {
        "agent_id": agent.id,
        "name": index.agent_cfg[agent.id].name,
        "state": agent.state,
        "reason": agent.reason,
        "offers": [
            offer_command(state, state.offers[o], state.contacts[state.offers[o].contact_id])
            for o in agent.offers
        ],
        "contacts": contacts,
    }


def floor_view(
    state: EngineState, queues: dict[str, QueueCfg], index: AgentIndex
) -> dict[str, Any]:
    """What a wallboard needs beyond :func:`queue_stats`: per queue the agents who serve it
    by state (``busy``: holding an offer or a contact), the contacts agents hold
    (``assigned_at`` tells how long), contacts in their crowd window and the crowd experts'
    own contacts waiting."""
    agents: dict[str, dict[str, int]] = {
        q: {"busy": 0, "away": 0, "not_responding": 0, "wrap_up": 0, "logged_in": 0} for q in queues
    }
    for agent in state.agents.values():
        if agent.state == "offline":
            continue
        busy = bool(agent.contacts or agent.offers)
        for qname in index.agent_queues.get(agent.id, ()):
            row = agents[qname]
            row["logged_in"] += 1
            if agent.state in ("away", "not_responding", "wrap_up"):
                row[agent.state] += 1
            if busy:
                row["busy"] += 1
    held = []
    crowd_window = 0
    experts_waiting = 0
    for contact in state.contacts.values():
        if contact.state == "assigned":
            held.append(
                {
                    "contact_id": contact.id,
                    "agent_id": contact.agent_id,
                    "queue": contact.queue,
                    "channel": contact.channel,
                    "assigned_at": contact.assigned_at,
                }
            )
        elif contact.state == "crowd_window":
            crowd_window += 1
        elif contact.state == "queued" and contact.expert:
            experts_waiting += 1
    return {
        "agents": agents,
        "held": held,
        "crowd_window": crowd_window,
        "experts_waiting": experts_waiting,
    }


def contact_info(state: EngineState, contact_id: str) -> dict[str, Any] | None:
    """A contact's state, queue, agent, wait and the customer's history; None if unknown."""
    contact = state.contacts.get(contact_id)
    if contact is None:
        done = state.finished.get(contact_id)
        if done is None:
            return None
        return {
            "contact_id": contact_id,
            "state": done[0],
            "queue": done[1],
            "agent_id": done[2],
        }
    customer = state.customers.get(contact.customer_id)
    return {
        "contact_id": contact.id,
        "state": contact.state,
        "channel": contact.channel,
        "queue": contact.queue,
        "rule": contact.rule,
        "priority": contact.priority,
        "agent_id": contact.agent_id,
        "offer_id": contact.offer_id,
        "arrived_at": contact.arrived_at,
        "customer_id": contact.customer_id,
        "expert": contact.expert,
        "history": history(customer, contact.id) if customer else [],
    }


# ---- lean views for the metrics gauges -------------------------------------------------------
# The gauges are refreshed every second and on every scrape: these count without building a
# record per agent or a set of agent ids per queue, and give the same numbers as
# :func:`agent_list` and :func:`queue_stats`.

#: Per queue, what its gauges show: name, waiting, oldest wait (s, rounded as in
#: :func:`queue_stats`), agents ready, service level (None before a contact closed), SLA
#: seconds, SLA percent.
QueueGauges = tuple[str, int, float, int, float | None, float, float]


def agent_counts(state: EngineState) -> tuple[dict[str, int], int]:
    """Agents by state, and how many hold an offer or a contact (``busy`` of
    :func:`agent_list`)."""
    agents = state.agents.values()
    by_state: Counter[str] = Counter(a.state for a in agents)
    busy = sum(1 for a in agents if a.contacts or a.offers)
    return dict(by_state), busy


def queue_gauges(
    state: EngineState,
    queues: dict[str, QueueCfg],
    index: AgentIndex,
    waiting: dict[str, int],
    now: float,
) -> list[QueueGauges]:
    """:func:`queue_stats`' waiting, oldest wait, agents ready and service level per queue,
    as tuples (see :data:`QueueGauges`)."""
    first: dict[str, float] = {}
    for contact in state.contacts.values():
        if contact.state == "queued":
            arrived = contact.arrived_at
            if arrived < first.get(contact.queue, inf):
                first[contact.queue] = arrived
    ready = dict.fromkeys(queues, 0)
    eligible, can_take = index.eligible, index.can_take
    for agent in state.agents.values():
        if agent.state != "available":
            continue
        pairs = eligible.get(agent.id)
        if not pairs:
            continue
        if len(pairs) == 1:  # the usual case: one queue, one channel
            for qname, channel in pairs:
                if can_take(agent, channel):
                    ready[qname] += 1
            continue
        # An agent counts once per queue, however many of its channels have room.
        for qname in {qname for qname, channel in pairs if can_take(agent, channel)}:
            ready[qname] += 1
    rows = []
    for name, queue in queues.items():
        # queue_stats keeps the largest wait above -1 s (a clock a little behind an arrival).
        waited = now - first[name] if name in first else 0.0
        c = state.counters[name]
        closed = c.answered + c.abandoned
        rows.append(
            (
                name,
                waiting.get(name, 0),
                round(waited, 3) if waited > -1.0 else 0.0,
                ready[name],
                (c.answered_in_sla / closed) if closed else None,
                queue.sla.seconds,
                queue.sla.percent,
            )
        )
    return rows
