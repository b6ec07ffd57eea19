"""Today's counters of the wallboard: what they count and where a day ends."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from router.daemon.config import DeskSettings
from router.daemon.wall import DayCounters, count_events, day_of
from router.engine import Engine
from router.messages import Accept, Complete, Login, ReleaseContact
from tests.router.enginekit import call, engine, offers

BERLIN = ZoneInfo("Europe/Berlin")
ROUTING = """
timezone: Europe/Berlin
skills: [s]
defaults: {offer_timeout: 10, wrap_up: 0}
queues: {q: {skills: {s: 1}, sla: {seconds: 20}}, r: {skills: {s: 1}}}
agents: [{id: a1, skills: {s: 1}}]
rules: [{name: default, default: true, queue: q}]
"""


def epoch(*args: int) -> float:
    return dt.datetime(*args, tzinfo=BERLIN).timestamp()


def test_a_day_ends_at_midnight_in_the_routing_files_timezone() -> None:
    assert day_of(epoch(2026, 3, 29, 23, 59, 59), BERLIN) == "2026-03-29"
    assert day_of(epoch(2026, 3, 30, 0, 0, 1), BERLIN) == "2026-03-30"
    # 23:30 UTC is already tomorrow in Berlin (winter time, UTC+1)
    late = dt.datetime(2026, 12, 1, 23, 30, tzinfo=dt.UTC).timestamp()
    assert day_of(late, BERLIN) == "2026-12-02"


def run(eng: Engine, cmds: list, days: dict[str, DayCounters]) -> None:  # type: ignore[type-arg]
    for day, field, delta in count_events(cmds, {"q": 20.0, "r": 20.0}, BERLIN):
        days.setdefault(day, DayCounters()).add(field, delta)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["new", "end", "login", "accept", "complete", "release"]),
            st.integers(0, 4),
            st.floats(1, 4000),
        ),
        max_size=40,
    )
)
def test_within_one_day_the_counters_equal_the_engines_running_totals(steps: list) -> None:  # type: ignore[type-arg]
    eng = engine(ROUTING)
    days: dict[str, DayCounters] = {}
    now = epoch(2026, 12, 1, 8, 0, 0)
    for op, n, dt_ in steps:
        now += dt_ / 1000  # all within a few minutes of one morning
        if op == "new":
            cmds = eng.handle(call(f"c{n}"), now)
        elif op == "end":
            cmds = eng.handle(call(f"c{n}", kind="end", end_reason="hangup"), now)
        elif op == "login":
            cmds = eng.handle(Login(agent_id="a1"), now)
        elif op == "accept":
            found = eng.state.agents["a1"].offers
            cmds = eng.handle(Accept(agent_id="a1", offer_id=found[0]), now) if found else []
        elif op == "complete":
            held = eng.state.agents["a1"].contacts
            cmds = eng.handle(Complete(agent_id="a1", contact_id=held[0]), now) if held else []
        else:
            held = eng.state.agents["a1"].contacts
            cmds = eng.handle(ReleaseContact(contact_id=held[0]), now) if held else []
        run(eng, cmds, days)
    today = days.get("2026-12-01", DayCounters())
    for name, totals in eng.state.counters.items():
        row = today.queues.get(name) or dict.fromkeys(
            ("entered", "answered", "answered_in_sla", "abandoned"), 0
        )
        assert (row["entered"], row["answered"], row["answered_in_sla"], row["abandoned"]) == (
            totals.entered,
            totals.answered,
            totals.answered_in_sla,
            totals.abandoned,
        )


def test_usual_handle_time_is_todays_mean_once_there_are_enough_samples() -> None:
    settings = DeskSettings(default_handle_seconds=300, min_samples=2)
    eng = engine(ROUTING)
    days: dict[str, DayCounters] = {}
    now = epoch(2026, 12, 1, 9, 0, 0)
    eng.handle(Login(agent_id="a1"), now)
    for i, handled in enumerate((60.0, 120.0)):
        (offer,) = offers(eng.handle(call(f"h{i}"), now))
        eng.handle(Accept(agent_id="a1", offer_id=offer.offer_id), now)
        cmds = eng.handle(Complete(agent_id="a1", contact_id=offer.contact_id), now + handled)
        run(eng, cmds, days)
        now += handled
        if i == 0:
            assert days["2026-12-01"].usual_handle("q", settings) == 300  # one sample: default
    assert days["2026-12-01"].usual_handle("q", settings) == 90.0
