"""Erlang C against published figures, closed forms and the factorial definition."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.sim import erlang


def _erlang_c_by_definition(agents: int, traffic: float) -> float:
    """The textbook formula with factorials; fine for the small c the properties use."""
    waiting = traffic**agents / math.factorial(agents) * agents / (agents - traffic)
    below = sum(traffic**k / math.factorial(k) for k in range(agents))
    return waiting / (below + waiting)


@pytest.mark.parametrize(
    ("agents", "p_wait", "sl", "asa"),
    [
        # The widely published worked example: 100 calls per 30 min, AHT 180 s (A = 10 Erlang),
        # target 20 s. 11 agents: P_wait 68.2 %, SL 39.0 %; 14 agents: 17.4 %, 88.8 %, ASA 7.8 s.
        (11, 0.6821, 0.3896, 122.78),
        (12, 0.4494, 0.6402, 40.44),
        (13, 0.2853, 0.7956, 17.12),
        (14, 0.1741, 0.8884, 7.84),
    ],
)
def test_published_worked_example(agents: int, p_wait: float, sl: float, asa: float) -> None:
    traffic = erlang.traffic_intensity(100, 1800, 180)
    assert traffic == pytest.approx(10.0)
    assert erlang.erlang_c(agents, traffic) == pytest.approx(p_wait, abs=5e-5)
    assert erlang.service_level(agents, traffic, 180, 20) == pytest.approx(sl, abs=5e-5)
    assert erlang.average_speed_of_answer(agents, traffic, 180) == pytest.approx(asa, abs=5e-3)


def test_staffing_for_80_20_on_the_worked_example() -> None:
    assert erlang.agents_for_service_level(10.0, 180, 20, 0.8) == 14


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.8, 0.95])
def test_single_agent_is_m_m_1(rho: float) -> None:
    # M/M/1: P_wait = rho, mean wait = rho / (1 - rho) * AHT, P(W > t) = rho * e^(-(1-rho) t/AHT)
    assert erlang.erlang_c(1, rho) == pytest.approx(rho)
    assert erlang.average_speed_of_answer(1, rho, 60) == pytest.approx(rho / (1 - rho) * 60)
    assert erlang.service_level(1, rho, 60, 30) == pytest.approx(
        1 - rho * math.exp(-(1 - rho) * 0.5)
    )


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.9])
def test_two_agents_match_the_m_m_2_closed_form(rho: float) -> None:
    assert erlang.erlang_c(2, 2 * rho) == pytest.approx(2 * rho**2 / (1 + rho))


def test_unstable_queue_everyone_waits_forever() -> None:
    assert erlang.erlang_c(10, 10.0) == 1.0
    assert erlang.erlang_c(10, 12.0) == 1.0
    assert erlang.service_level(10, 12.0, 180, 20) == 0.0
    assert erlang.average_speed_of_answer(10, 10.0, 180) == math.inf
    assert erlang.occupancy(10, 12.0) == 1.0


def test_no_traffic_nobody_waits() -> None:
    assert erlang.erlang_c(3, 0.0) == 0.0
    assert erlang.service_level(3, 0.0, 180, 0) == 1.0
    assert erlang.average_speed_of_answer(3, 0.0, 180) == 0.0


def test_large_centres_do_not_overflow() -> None:
    # 1,000 agents at 95 % load: A^c and c! are far beyond float range, the recursion is not.
    p = erlang.erlang_c(1000, 950.0)
    assert 0.0 < p < 0.2
    assert erlang.erlang_b(5000, 4500.0) < 1e-10


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        erlang.erlang_c(-1, 1.0)
    with pytest.raises(ValueError):
        erlang.erlang_c(3, -1.0)
    with pytest.raises(ValueError):
        erlang.traffic_intensity(10, 0, 180)
    with pytest.raises(ValueError):
        erlang.service_level(3, 1.0, 0, 20)


def test_predict_bundles_the_figures() -> None:
    p = erlang.predict(14, 100, 1800, 180, 20)
    assert p.traffic == pytest.approx(10.0)
    assert p.p_wait == pytest.approx(0.1741, abs=5e-5)
    assert p.occupancy == pytest.approx(10 / 14)


@given(
    agents=st.integers(min_value=1, max_value=40),
    load=st.floats(min_value=0.01, max_value=0.99),
)
def test_recursion_equals_the_factorial_definition(agents: int, load: float) -> None:
    traffic = agents * load
    assert erlang.erlang_c(agents, traffic) == pytest.approx(
        _erlang_c_by_definition(agents, traffic), rel=1e-9
    )


@given(
    agents=st.integers(min_value=1, max_value=200),
    load=st.floats(min_value=0.01, max_value=0.99),
    target=st.floats(min_value=0, max_value=600),
)
def test_more_agents_never_hurt(agents: int, load: float, target: float) -> None:
    traffic = agents * load
    p = erlang.erlang_c(agents, traffic)
    assert erlang.erlang_b(agents, traffic) <= p <= 1.0
    assert erlang.erlang_c(agents + 1, traffic) <= p
    sl = erlang.service_level(agents, traffic, 180, target)
    assert 1 - p - 1e-12 <= sl <= 1.0
    assert erlang.service_level(agents + 1, traffic, 180, target) >= sl - 1e-12
