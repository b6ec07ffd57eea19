"""The simulator: the real engine on virtual time, checked against Erlang C and for sanity."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from router import cli
from router.messages import Command, EventCmd
from router.sim.erlang_check import simulate_erlang
from router.sim.simulation import (
    Distribution,
    HandleTimes,
    Report,
    Scenario,
    ScenarioError,
    Stream,
    Template,
    parse_scenario,
    scaled,
    simulate,
    with_agent_count,
)
from rules.load import build_table, load_routing
from rules.table import RoutingTable

ROOT = Path(__file__).resolve().parents[2]
ROUTING = ROOT / "config" / "routing.yaml"
SCENARIO = ROOT / "config" / "scenario.yaml"


@pytest.fixture(scope="module")
def table() -> RoutingTable:
    return load_routing(ROUTING)


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return parse_scenario(SCENARIO.read_bytes(), str(SCENARIO))


def _with(scenario: Scenario, **changes: object) -> Scenario:
    return msgspec.structs.replace(scenario, **changes)


def _agents(table: RoutingTable, count: int) -> RoutingTable:
    return build_table(with_agent_count(table.file, count), ROUTING.parent)


# ---- Erlang C ------------------------------------------------------------------------------


def test_erlang_mode_converges_to_erlang_c() -> None:
    # 10 agents, 480 calls/h at 60 s AHT: A = 8 Erlang, 80 % load; 200 h = 96,000 calls.
    # Across seeds 1-6 the deviations were at most 0.017 (SL), 0.022 (P_wait), 8 % (ASA) and
    # 0.007 (occupancy); queue statistics are autocorrelated, so the tolerances leave room.
    r = simulate_erlang(
        agents=10, calls_per_interval=240, aht_seconds=60, target_seconds=20, hours=200, seed=11
    )
    assert r.traffic_erlang == pytest.approx(8.0)
    assert r.offered > 90_000
    assert r.answered + r.waiting_at_end == r.offered
    assert r.service_level is not None and r.p_wait is not None and r.asa_seconds is not None
    assert r.erlang_asa_seconds is not None
    assert r.service_level == pytest.approx(r.erlang_service_level, abs=0.03)
    assert r.p_wait == pytest.approx(r.erlang_p_wait, abs=0.035)
    assert r.asa_seconds == pytest.approx(r.erlang_asa_seconds, rel=0.15)
    assert r.occupancy == pytest.approx(r.erlang_occupancy, abs=0.015)


def test_erlang_mode_sees_an_understaffed_queue_fail() -> None:
    # Same traffic, 9 agents: Erlang C predicts SL 61 %; the simulation must drop too.
    r = simulate_erlang(agents=9, calls_per_interval=240, aht_seconds=60, hours=20, seed=2)
    assert r.service_level is not None
    assert r.erlang_service_level < 0.7
    assert r.service_level < 0.75


# ---- the example routing -------------------------------------------------------------------


def test_example_scenario_reports_every_queue_with_sane_figures(
    table: RoutingTable, scenario: Scenario
) -> None:
    report = simulate(table, _with(scenario, hours=4.0))
    assert [q.queue for q in report.queues] == list(table.file.queues)
    assert report.arrivals > 400
    assert report.refused == 0
    assert report.waited_mismatches == 0
    for q in report.queues:
        assert q.answered + q.abandoned + q.waiting_at_end <= q.offered
        for rate in (q.service_level, q.p_wait, q.abandon_rate):
            assert rate is None or 0.0 <= rate <= 1.0
        assert 0.0 <= q.occupancy <= 1.0
        if q.asa_seconds is not None:
            assert 0.0 <= q.asa_seconds <= q.max_wait_seconds
    assert 0.0 < report.occupancy <= 1.0
    assert report.occupancy == pytest.approx(sum(q.occupancy for q in report.queues))
    by_name = {q.queue: q for q in report.queues}
    # The streams reach the queues the rules name: hotlines, mailboxes, the expert desk.
    for name in ("dsl", "mobile", "tv", "billing", "dsl_email", "billing_email", "expert_desk"):
        assert by_name[name].answered > 0, name
    assert report.experts.contacts > 0
    assert report.experts.contacts == by_name["expert_desk"].offered
    # Community posts: some answered by the crowd in its window, the rest by agents.
    assert report.answered_by_crowd > 0
    assert by_name["community_desk"].answered > 0


def test_same_seed_same_report_other_seed_other_report(
    table: RoutingTable, scenario: Scenario
) -> None:
    short = _with(scenario, hours=1.0, seed=5)
    first = msgspec.json.encode(simulate(table, short))
    assert msgspec.json.encode(simulate(load_routing(ROUTING), short)) == first
    assert msgspec.json.encode(simulate(table, _with(short, seed=6))) != first


def _dsl_flood(expert_calls: tuple[float, ...]) -> Scenario:
    """The DSL hotline floods (400 calls/h onto 8 DSL agents); experts dial the same number."""
    return Scenario(
        hours=0.25,
        seed=3,
        streams=(
            Stream(
                name="flood",
                channel="phone",
                source="asterisk-ari",
                rate_per_hour=400,
                contacts=(Template(to="+498003322002"),),
            ),
            Stream(
                name="experts",
                channel="phone",
                source="asterisk-ari",
                at=expert_calls,
                contacts=(Template(to="+498003322002", expert=True),),
            ),
        ),
        handle_time=HandleTimes(default=Distribution(mean=300)),
    )


def test_an_expert_bypasses_a_long_first_level_queue(table: RoutingTable) -> None:
    # After 5 minutes of the flood some 25 callers wait for DSL; the expert goes past them all.
    report = simulate(table, _dsl_flood((300.0,)))
    dsl = next(q for q in report.queues if q.queue == "dsl")
    desk = next(q for q in report.queues if q.queue == "expert_desk")
    assert dsl.waiting_at_end > 30
    assert dsl.asa_seconds is not None and dsl.asa_seconds > 60
    assert report.experts.contacts == 1 == report.experts.answered
    assert report.experts.max_wait_seconds < desk.sla_seconds


def test_experts_wait_only_for_an_expert_desk_agent(table: RoutingTable) -> None:
    # Three experts within six minutes of a DSL flood. Three of the desk's agents also take
    # DSL calls and are busy with the flood; two only serve the desk, so the experts are
    # answered within the desk's target - and never behind the DSL backlog: while an expert
    # waits, no desk agent takes other work.
    desk_agents = {a.id for a in table.file.agents if a.skills.get("second_level", 0) >= 3}
    calls = (120.0, 300.0, 480.0)
    scenario = _dsl_flood(calls)
    t0 = scenario.start_epoch()
    assignments: list[tuple[float, str, bool]] = []

    def observe(now: float, cmd: Command) -> None:
        if isinstance(cmd, EventCmd) and cmd.type == "contact.assigned":
            assignments.append((now - t0, cmd.event.agent_id, cmd.event.expert))

    report = simulate(table, scenario, observe=observe)
    answered = [t for t, _, expert in assignments if expert]
    assert len(answered) == report.experts.answered == 3
    desk = next(q for q in report.queues if q.queue == "expert_desk")
    assert report.experts.max_wait_seconds < desk.sla_seconds
    for arrived, taken in zip(calls, answered, strict=True):
        meanwhile = [
            (t, agent)
            for t, agent, expert in assignments
            if not expert and agent in desk_agents and arrived <= t < taken
        ]
        assert meanwhile == [], (arrived, taken)


# ---- scenario mechanics --------------------------------------------------------------------


def test_without_agents_every_caller_gives_up(table: RoutingTable) -> None:
    calls = Scenario(
        hours=1.0,
        streams=(
            Stream(
                name="calls",
                channel="phone",
                rate_per_hour=60,
                patience=120,
                contacts=(Template(to="+498003322003"),),
            ),
        ),
    )
    report = simulate(_agents(table, 0), calls)
    mobile = next(q for q in report.queues if q.queue == "mobile")
    assert report.agents == 0
    assert mobile.answered == 0
    assert mobile.abandoned > 40
    assert mobile.abandoned + mobile.waiting_at_end == mobile.offered
    assert mobile.service_level == 0.0
    assert mobile.abandon_rate == 1.0


def test_agent_count_adds_copies_of_the_routing_file_agents(table: RoutingTable) -> None:
    more = with_agent_count(table.file, 45)
    ids = [a.id for a in more.agents]
    assert len(ids) == len(set(ids)) == 45
    n = len(table.file.agents)
    assert ids[:n] == [a.id for a in table.file.agents]
    assert more.agents[n].skills == table.file.agents[0].skills
    assert len(with_agent_count(table.file, 5).agents) == 5
    # The copies make a valid routing file: a platform account or phone endpoint is one
    # person's, so a copy does not carry the original's (a01 has Chatwoot and Rocket.Chat ones).
    assert table.file.agents[0].accounts.chatwoot is not None
    copied = build_table(more, ROUTING.parent)
    assert len(copied.file.agents) == 45
    assert copied.file.agents[n].accounts.chatwoot is None


def test_scale_multiplies_every_stream_and_the_agents(scenario: Scenario) -> None:
    # Judged against the scenario file itself, read without the simulator's parser.
    raw = yaml.safe_load(SCENARIO.read_text(encoding="utf-8"))
    bigger = scaled(scenario, 2.5, agents=22)
    assert [s.rate_per_hour for s in bigger.streams] == [
        2.5 * s.get("rate_per_hour", 0.0) for s in raw["streams"]
    ]
    assert [s.at for s in bigger.streams] == [tuple(s.get("at", ())) for s in raw["streams"]]
    assert bigger.agents.count == 55
    assert bigger.agents.accept_delay == raw["agents"]["accept_delay"]
    fixed = _with(scenario, agents=msgspec.structs.replace(scenario.agents, count=10))
    assert scaled(fixed, 2.5, agents=22).agents.count == 25
    with pytest.raises(ValueError, match="positive"):
        scaled(scenario, 0.0, agents=22)


def test_cli_scale_runs_a_bigger_copy_of_the_centre(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--routing", str(ROUTING), "--scenario", str(SCENARIO), "--json"]
    assert cli.main([*argv, "--scale", "3", "--hours", "1", "--seed", "2"]) == 0
    report = msgspec.json.decode(capsys.readouterr().out, type=Report)
    raw = yaml.safe_load(SCENARIO.read_text(encoding="utf-8"))
    assert report.agents == 3 * len(yaml.safe_load(ROUTING.read_text("utf-8"))["agents"])
    # Poisson arrivals: the count is within five standard deviations of 3 x the hourly rates.
    expected = 3 * sum(s.get("rate_per_hour", 0.0) for s in raw["streams"])
    assert abs(report.arrivals - expected) < 5 * expected**0.5
    assert report.waited_mismatches == 0
    assert sum(q.offered for q in report.queues) > 0.9 * report.arrivals
    # An explicit --agents sets the count of the scaled centre.
    assert cli.main([*argv, "--scale", "3", "--agents", "30", "--hours", "0.1"]) == 0
    assert msgspec.json.decode(capsys.readouterr().out, type=Report).agents == 30


def test_crowd_answers_keep_posts_away_from_agents(table: RoutingTable) -> None:
    posts = Scenario(
        hours=2.0,
        streams=(
            Stream(
                name="community",
                channel="social",
                source="discourse",
                rate_per_hour=30,
                crowd_answers=1.0,
                crowd_delay=Distribution(distribution="fixed", mean=60),
                contacts=(Template(to="hilfe/internet", subject="WLAN", text="WLAN bricht ab"),),
            ),
        ),
    )
    report = simulate(table, posts)
    desk = next(q for q in report.queues if q.queue == "community_desk")
    assert report.arrivals > 30
    # Every post that arrived at least a minute before the end was answered by the crowd.
    assert report.answered_by_crowd >= report.arrivals - 3
    assert desk.offered == desk.answered == 0


def test_expert_contacts_use_the_experts_identity_for_the_channel(table: RoutingTable) -> None:
    # Thomas Graf is known by his Rocket.Chat handle: an expert chat from Rocket.Chat is his.
    chats = Scenario(
        hours=1.0,
        streams=(
            Stream(
                name="expert_chats",
                channel="chat",
                source="rocketchat",
                rate_per_hour=10,
                contacts=(Template(to="webchat", text="Frage zu DSL", expert=True),),
            ),
        ),
    )
    report = simulate(table, chats)
    assert report.arrivals > 3
    assert report.experts.contacts == report.arrivals
    # Nobody in the crowd is known on Chatwoot: refused before the run, with the reason.
    chatwoot = _with(chats, streams=(msgspec.structs.replace(chats.streams[0], source="chatwoot"),))
    with pytest.raises(ScenarioError, match="no crowd expert has an identity key for chat"):
        simulate(table, chatwoot)


def test_lognormal_handle_times_have_the_configured_mean() -> None:
    import random

    rng = random.Random(1)
    dist = Distribution(distribution="lognormal", mean=300, sigma=0.8)
    samples = [dist.sample(rng) for _ in range(40_000)]
    assert sum(samples) / len(samples) == pytest.approx(300, rel=0.03)
    assert min(samples) > 0


def test_progress_runs_from_zero_to_one(table: RoutingTable, scenario: Scenario) -> None:
    seen: list[float] = []
    simulate(table, _with(scenario, hours=0.5), seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    assert len(seen) > 10


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("hours: 8\nstreamz: []\n", "streamz"),
        ("streams:\n  - {name: a, channel: fax, rate_per_hour: 1}\n", "fax"),
        ("hours: -1\n", "hours"),
        ("start: yesterday\n", "start"),
        ("timezone: Mars/Olympus\n", "timezone"),
        ("streams: [{name: a, channel: phone, rate_per_hour: 1, contacts: []}]\n", "template"),
    ],
)
def test_bad_scenarios_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ScenarioError, match=reason):
        parse_scenario(text, "bad.yaml")


# ---- the command line ----------------------------------------------------------------------


def test_cli_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "simulate",
            "--routing",
            str(ROUTING),
            "--scenario",
            str(SCENARIO),
            "--hours",
            "1",
            "--seed",
            "2",
            "--json",
        ]
    )
    assert code == 0
    report = msgspec.json.decode(capsys.readouterr().out, type=Report)
    assert report.seed == 2 and report.hours == 1.0


def test_cli_table_has_aligned_columns(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["simulate", "--routing", str(ROUTING), "--scenario", str(SCENARIO), "--hours", "1"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("queue "))
    rows = lines[header : header + 14]
    assert {len(row) for row in rows[1:]} <= {len(rows[0])}
    assert rows[-1].startswith("community_desk")


def test_cli_erlang_form(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "simulate",
            "erlang",
            "--agents",
            "12",
            "--calls-per-interval",
            "100",
            "--aht-seconds",
            "180",
            "--target-seconds",
            "20",
            "--hours",
            "2",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("service_level", "asa_seconds", "p_wait", "occupancy", "offered", "answered"):
        assert key in result
    assert result["erlang_p_wait"] == pytest.approx(0.4494, abs=1e-4)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["simulate", "erlang", "--agents", "3"], 2, "--calls-per-interval"),
        (["simulate", "--aht-seconds", "30"], 2, "only apply to"),
        (
            [
                "simulate",
                "erlang",
                "--agents",
                "3",
                "--calls-per-interval",
                "9",
                "--aht-seconds",
                "60",
                "--scale",
                "2",
            ],
            2,
            "--scale applies to a scenario",
        ),
        (["simulate", "--scenario", "/nonexistent.yaml"], 1, "nonexistent"),
        (["simulate", "--routing", "/nonexistent.yaml"], 1, "nonexistent"),
    ],
)
def test_cli_errors_are_one_clear_line(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--scenario" not in argv:
        argv = [*argv, "--scenario", str(SCENARIO)]
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_hot_path_benchmark_still_drives_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small centre, so the benchmark cannot rot unnoticed when the engine's API moves on.
    spec = importlib.util.spec_from_file_location("hot_path", ROOT / "benchmarks" / "hot_path.py")
    assert spec is not None and spec.loader is not None
    hot_path = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "hot_path", hot_path)  # dataclasses look their module up
    spec.loader.exec_module(hot_path)
    size = hot_path.Size(agents=200, queues=10, rules=60)
    result = hot_path.run(None, 300, 0.5, 1, None, size)
    assert result["decisions"] == 300
    assert result["offered_at_once"] > 0.5
    assert result["decisions_per_s"] > 0 and result["p50_us"] <= result["p99_us"]
