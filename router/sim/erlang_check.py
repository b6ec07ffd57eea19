"""The Erlang C check: the M/M/c queue of Erlang C played on the real engine.

:func:`simulate_erlang` builds one phone queue with N identical agents (capacity 1, no wrap-up,
offers accepted at once, nobody hangs up), runs Poisson arrivals with exponential handle times
through :func:`router.sim.simulation.simulate`, and puts the measured figures next to the
formulas of :mod:`router.sim.erlang`. ``stellwerk simulate erlang`` prints the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec

from router.sim import erlang
from router.sim.simulation import (
    AgentBehaviour,
    Distribution,
    HandleTimes,
    Scenario,
    Stream,
    simulate,
)
from rules.load import parse_routing

ERLANG_QUEUE = "erlang"


class ErlangResult(msgspec.Struct, frozen=True, kw_only=True):
    """Measured figures of the simulated M/M/c queue next to Erlang C's predictions."""

    agents: int
    calls_per_interval: float
    interval_seconds: float
    aht_seconds: float
    target_seconds: float
    hours: float
    seed: int
    traffic_erlang: float
    offered: int
    answered: int
    waiting_at_end: int
    service_level: float | None
    asa_seconds: float | None
    p_wait: float | None
    occupancy: float
    erlang_service_level: float
    erlang_asa_seconds: float | None
    erlang_p_wait: float
    erlang_occupancy: float


def erlang_routing_yaml(agents: int, target_seconds: float) -> str:
    """A routing file with one phone queue and ``agents`` identical single-call agents.

    No wrap-up; offers are accepted at once, so the (long) offer timeout never fires.
    """
    lines = [
        "version: 1",
        "timezone: UTC",
        "defaults: {offer_timeout: 3600, wrap_up: 0}",
        "skills: [general]",
        "queues:",
        f"  {ERLANG_QUEUE}:",
        "    skills: {general: 1}",
        "    channels: [phone]",
        f"    sla: {{seconds: {target_seconds!r}, percent: 80}}",
        "agents:",
    ]
    lines += [
        f"  - {{id: a{i:04d}, skills: {{general: 1}},"
        " capacity: {phone: 1, chat: 0, email: 0, social: 0}}"
        for i in range(1, agents + 1)
    ]
    lines += ["rules:", f"  - {{name: everything, queue: {ERLANG_QUEUE}, default: true}}"]
    return "\n".join(lines) + "\n"


def erlang_scenario(
    calls_per_interval: float,
    interval_seconds: float,
    aht_seconds: float,
    hours: float,
    seed: int,
) -> Scenario:
    """Poisson arrivals, exponential handle times, nobody hangs up, offers accepted at once."""
    return Scenario(
        hours=hours,
        seed=seed,
        streams=(
            Stream(
                name="calls",
                channel="phone",
                rate_per_hour=calls_per_interval * 3600.0 / interval_seconds,
            ),
        ),
        handle_time=HandleTimes(default=Distribution(mean=aht_seconds)),
        agents=AgentBehaviour(accept_delay=0.0),
    )


def simulate_erlang(
    *,
    agents: int,
    calls_per_interval: float,
    aht_seconds: float,
    interval_seconds: float = 1800.0,
    target_seconds: float = 20.0,
    hours: float = 8.0,
    seed: int = 1,
    progress: Callable[[float], None] | None = None,
) -> ErlangResult:
    """Simulate the M/M/c queue on the real engine and compare it with Erlang C."""
    table = parse_routing(erlang_routing_yaml(agents, target_seconds), "<erlang>")
    scenario = erlang_scenario(calls_per_interval, interval_seconds, aht_seconds, hours, seed)
    report = simulate(table, scenario, progress)
    (queue,) = report.queues
    predicted = erlang.predict(
        agents, calls_per_interval, interval_seconds, aht_seconds, target_seconds
    )
    return ErlangResult(
        agents=agents,
        calls_per_interval=calls_per_interval,
        interval_seconds=interval_seconds,
        aht_seconds=aht_seconds,
        target_seconds=target_seconds,
        hours=hours,
        seed=seed,
        traffic_erlang=predicted.traffic,
        offered=queue.offered,
        answered=queue.answered,
        waiting_at_end=queue.waiting_at_end,
        service_level=queue.service_level,
        asa_seconds=queue.asa_seconds,
        p_wait=queue.p_wait,
        occupancy=report.occupancy,
        erlang_service_level=predicted.service_level,
        # JSON has no infinity: an unstable queue's ASA is reported as null.
        erlang_asa_seconds=None if math.isinf(predicted.asa_seconds) else predicted.asa_seconds,
        erlang_p_wait=predicted.p_wait,
        erlang_occupancy=predicted.occupancy,
    )
