"""Erlang C: the textbook M/M/c model of a single call queue, for staffing and for checking.

The simulator's ``erlang`` mode compares the real engine against these formulas: with Poisson
arrivals, exponential handle times, identical agents, FIFO and nobody hanging up, the engine
*is* an M/M/c queue, so its measured service level, ASA, probability of waiting and occupancy
must converge to the values below.

Notation: ``traffic`` A = arrival rate × mean handle time (in Erlang), ``agents`` c.
P_wait = C(c, A); SL(t) = 1 − P_wait · e^(−(c − A)·t / AHT); ASA = P_wait · AHT / (c − A);
occupancy = A / c. When A ≥ c the queue is unstable: everyone waits, forever on average.
"""

from __future__ import annotations

import math

import msgspec


def traffic_intensity(calls: float, interval_seconds: float, aht_seconds: float) -> float:
    """Offered traffic in Erlang: ``calls`` per ``interval_seconds`` times the mean handle time."""
    if interval_seconds <= 0:
        raise ValueError("interval_seconds must be positive")
    if calls < 0 or aht_seconds < 0:
        raise ValueError("calls and aht_seconds must not be negative")
    return calls / interval_seconds * aht_seconds


def _check(agents: int, traffic: float) -> None:
    if agents < 0:
        raise ValueError("agents must not be negative")
    if traffic < 0 or not math.isfinite(traffic):
        raise ValueError("traffic must be a finite, non-negative number of Erlang")


def erlang_b(agents: int, traffic: float) -> float:
    """Blocking probability of an M/M/c/c loss system (Erlang B).

    Uses the recursion B(0) = 1, B(k) = A·B(k−1) / (k + A·B(k−1)), which never forms A^c or c!
    and so stays accurate for thousands of agents where the factorial formula overflows.
    """
    _check(agents, traffic)
    b = 1.0
    for k in range(1, agents + 1):
        b = traffic * b / (k + traffic * b)
    return b


def erlang_c(agents: int, traffic: float) -> float:
    """Probability that a contact has to wait (Erlang C), P_wait = C(c, A).

    Derived from Erlang B: C = c·B / (c − A·(1 − B)). Returns 1.0 for an unstable queue
    (A ≥ c), where every arrival eventually waits.
    """
    _check(agents, traffic)
    if traffic == 0:
        return 0.0
    if agents <= traffic:
        return 1.0
    b = erlang_b(agents, traffic)
    return agents * b / (agents - traffic * (1.0 - b))


def service_level(agents: int, traffic: float, aht_seconds: float, target_seconds: float) -> float:
    """Share of contacts answered within ``target_seconds``: 1 − P_wait·e^(−(c−A)·t/AHT)."""
    if aht_seconds <= 0:
        raise ValueError("aht_seconds must be positive")
    if target_seconds < 0:
        raise ValueError("target_seconds must not be negative")
    p_wait = erlang_c(agents, traffic)
    if agents <= traffic:
        return 0.0
    return 1.0 - p_wait * math.exp(-(agents - traffic) * target_seconds / aht_seconds)


def average_speed_of_answer(agents: int, traffic: float, aht_seconds: float) -> float:
    """Mean wait over all contacts (ASA): P_wait·AHT / (c − A); infinite when A ≥ c."""
    if aht_seconds <= 0:
        raise ValueError("aht_seconds must be positive")
    p_wait = erlang_c(agents, traffic)
    if agents <= traffic:
        return math.inf
    return p_wait * aht_seconds / (agents - traffic)


def occupancy(agents: int, traffic: float) -> float:
    """Share of logged-in agent time spent handling contacts: A / c, at most 1."""
    _check(agents, traffic)
    if agents == 0:
        return 0.0
    return min(1.0, traffic / agents)


def agents_for_service_level(
    traffic: float, aht_seconds: float, target_seconds: float, goal: float
) -> int:
    """The fewest agents whose service level reaches ``goal`` (e.g. 0.8 for 80/20)."""
    if not 0 <= goal < 1:
        raise ValueError("goal must be in [0, 1)")
    agents = max(1, math.floor(traffic) + 1)
    while service_level(agents, traffic, aht_seconds, target_seconds) < goal:
        agents += 1
    return agents


class Prediction(msgspec.Struct, frozen=True, kw_only=True):
    """Erlang C's figures for one queue; ``asa_seconds`` is ``inf`` for an unstable queue."""

    agents: int
    traffic: float
    p_wait: float
    service_level: float
    asa_seconds: float
    occupancy: float


def predict(
    agents: int,
    calls_per_interval: float,
    interval_seconds: float,
    aht_seconds: float,
    target_seconds: float,
) -> Prediction:
    """All of Erlang C's figures for a queue fed ``calls_per_interval`` every interval."""
    traffic = traffic_intensity(calls_per_interval, interval_seconds, aht_seconds)
    return Prediction(
        agents=agents,
        traffic=traffic,
        p_wait=erlang_c(agents, traffic),
        service_level=service_level(agents, traffic, aht_seconds, target_seconds),
        asa_seconds=average_speed_of_answer(agents, traffic, aht_seconds),
        occupancy=occupancy(agents, traffic),
    )
