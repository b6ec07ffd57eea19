"""Every problem in a routing file is reported, each at the line and column it is about."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rules.load import Problem, RoutingFileError, load_routing, parse_routing

HEAD = """\
skills: [dsl, de]
queues:
  general: {skills: {de: 1}}
  dsl: {skills: {dsl: 2}, max_wait: 300, overflow: general}
rules:
"""
TAIL = """\
  - name: default
    default: true
    queue: general
"""


def problems(text: str) -> list[str]:
    with pytest.raises(RoutingFileError) as info:
        parse_routing(text, "r.yaml")
    return [str(p) for p in info.value.problems]


def with_rule(rule: str) -> str:
    return HEAD + textwrap.indent(textwrap.dedent(rule), "  ") + TAIL


def test_valid_minimal_file_loads() -> None:
    table = parse_routing(with_rule('- {name: a, when: channel == "phone", queue: dsl}\n'))
    assert [r.name for r in table.file.rules] == ["a", "default"]


# --- positions inside expressions: line 6 is the rule's `when` -------------------------------


@pytest.mark.parametrize(
    ("when_line", "token", "message"),
    [
        # plain scalars
        ('when: hour == "x"', '"x"', 'type mismatch: hour (int) == "x" (str)'),
        ("when: chanel == 'phone'", "chanel", "unknown field 'chanel' (did you mean channel?)"),
        ("when: tags == 3", "tags", "cannot compare a list with '==' (use \"x\" in tags)"),
        ("when: customer.expert > 2", "2", "type mismatch: customer.expert (bool) > 2 (int)"),
        ("when: channel == 'phone' and", None, "expected a field, a literal or '(', found end"),
        ("when: text ~ '(a'", "(a", "bad regular expression: missing ), unterminated subpattern"),
        ("when: channel = 'phone'", "=", "unexpected '=' (use '==' to compare)"),
        ("when: channel == 'fax'", "'fax'", "channel is never 'fax' (one of: phone, email,"),
        ("when: subject", "subject", "expected a condition, got subject (str); compare it"),
        ("when: hour < 8 < 9", "< 9", "chained comparison; combine comparisons with 'and'"),
        ("when: weekday in ['sat', 'sonntag']", "'sonntag'", "weekday is never 'sonntag'"),
        (
            "when: " + "(" * 70 + "customer.vip" + ")" * 70,
            "((((((customer",
            "condition nested more",
        ),
        # a single-quoted YAML scalar (the quote shifts everything by one)
        ('when: \'"a" in tags and hour == "x"\'', '"x"', "type mismatch"),
        # a double-quoted YAML scalar with escaped quotes inside
        ('when: "text ~ \\"x\\" and to == 3"', "3", "type mismatch: to (str) == 3 (int)"),
    ],
)
def test_expression_errors_point_at_the_token(
    when_line: str, token: str | None, message: str
) -> None:
    text = with_rule(f"- name: a\n  {when_line}\n  queue: dsl\n")
    line = text.splitlines()[6]
    assert line.strip() == when_line
    column = len(line) + 1 if token is None else line.rindex(token) + 1
    (problem,) = problems(text)
    assert problem.startswith(f"r.yaml:7:{column}: {message}"), problem


def test_error_in_a_folded_block_scalar_points_at_its_line() -> None:
    text = with_rule(
        """\
        - name: a
          when: >-
            channel == "phone"
            and hour == "x"
          queue: dsl
        """
    )
    (problem,) = problems(text)
    assert problem.startswith('r.yaml:9:19: type mismatch: hour (int) == "x"'), problem


# --- structure -------------------------------------------------------------------------------


def test_all_problems_are_collected_and_located() -> None:
    text = """\
skills: [dsl, de]
capacity: {budget: 60, cost: {phone: 60}}
queues:
  general: {skills: {de: 1}, colour: blue}
  dsl: {skills: {dsl: 7, fibre: 2}, channels: [], weight: heavy}
  a: {max_wait: 10, overflow: b}
  b: {max_length: 3, overflow: a}
agents:
  - {id: a1, skills: {dsl: 2}}
  - {id: a1, skills: {de: 0}}
rules:
  - {name: r1, when: customer.expert, queue: nowhere}
  - {name: r1, when: channel == "chat", queue: dsl, escalate: [{after: 60, queue: gone}]}
  - {name: default, default: true, queue: general}
"""
    assert problems(text) == [
        "r.yaml:2:30: capacity cost missing for channel 'email'",
        "r.yaml:2:30: capacity cost missing for channel 'chat'",
        "r.yaml:2:30: capacity cost missing for channel 'social'",
        "r.yaml:4:30: queues.general: unknown field 'colour' (known: skills, channels, weight,"
        " sla, max_wait, max_length, overflow, wrap_up, offer_timeout, strategy, description,"
        " phone_offer, music_class, announcement)",
        "r.yaml:5:23: proficiency 7 of 'dsl' is outside 1-5",
        "r.yaml:5:26: unknown skill 'fibre'",
        "r.yaml:5:47: queue 'dsl' serves no channel",
        "r.yaml:5:59: queues.dsl.weight: Expected `float`, got `str`",
        "r.yaml:6:31: overflow loop: a -> b -> a",
        "r.yaml:7:32: overflow loop: b -> a -> b",
        "r.yaml:10:10: duplicate agent id 'a1'",
        "r.yaml:10:27: proficiency 0 of 'de' is outside 1-5",
        "r.yaml:12:46: rules[0] (r1): unknown queue 'nowhere'",
        "r.yaml:13:12: duplicate rule name 'r1'",
        "r.yaml:13:83: rules[1] (r1).escalate[0]: unknown queue 'gone'",
    ]


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            "  - {name: a, when: customer.vip, queue: general}\n",
            ["r.yaml:5:3: no default rule (the last rule needs 'default: true')"],
        ),
        (
            "  - {name: d, default: true, queue: general}\n"
            "  - {name: a, when: customer.vip, queue: general}\n",
            ["r.yaml:5:24: the default rule must be the last rule"],
        ),
        (
            "  - {name: d, default: true, queue: general}\n"
            "  - {name: e, default: true, queue: general}\n",
            [
                "r.yaml:5:24: the default rule must be the last rule",
                "r.yaml:6:24: more than one default rule",
            ],
        ),
        (
            "  - {name: a, queue: general}\n  - {name: d, default: true, queue: general}\n",
            ["r.yaml:5:12: a rule without 'when' must be the default rule (default: true)"],
        ),
        (
            "  - {name: a, when: customer.vip}\n  - {name: d, default: true, queue: general}\n",
            ["r.yaml:5:12: a rule needs a queue (or reject)"],
        ),
        (
            "  - {name: a, when: customer.vip, queue: general, skills: {wifi: 2}}\n"
            "  - {name: d, default: true, queue: general, escalate: [{after: 60}]}\n",
            [
                "r.yaml:5:60: unknown skill 'wifi'",
                "r.yaml:6:65: an escalation step changes skills, queue or priority",
            ],
        ),
    ],
)
def test_rule_list_problems(rules: str, expected: list[str]) -> None:
    text = "skills: [de]\nqueues:\n  general: {}\nrules:\n" + rules
    assert problems(text) == expected


def test_bad_yaml_is_located_at_the_parser_mark() -> None:
    text = "queues:\n  general: {skills: {de: 1}\nrules: []\n"
    (problem,) = problems(text)
    assert problem.startswith("r.yaml:3:1: bad YAML:"), problem


def test_empty_file_and_wrong_top_level_shape() -> None:
    assert problems("") == ["r.yaml:1:1: empty file"]
    assert problems("- a\n- b\n") == ["r.yaml:1:1: expected a mapping"]


def test_duplicate_yaml_keys_are_refused() -> None:
    text = "queues:\n  general: {}\n  general: {weight: 2}\nrules:\n" + TAIL
    assert problems(text) == ["r.yaml:3:3: queues: duplicate key 'general'"]


def test_unknown_timezone() -> None:
    text = "timezone: Europe/Bonn\nqueues:\n  general: {}\nrules:\n" + TAIL
    assert problems(text) == ["r.yaml:1:11: unknown timezone 'Europe/Bonn'"]


def test_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(RoutingFileError) as info:
        load_routing(tmp_path / "nope.yaml")
    (problem,) = info.value.problems
    assert problem == Problem(
        str(tmp_path / "nope.yaml"), 1, 1, "cannot read: No such file or directory"
    )


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_error_in_a_multiline_plain_scalar(newline: str) -> None:
    text = with_rule(
        '- name: a\n  when: channel == "phone"\n    and  hour == "x"\n  queue: dsl\n'
    ).replace("\n", newline)
    (problem,) = problems(text)
    assert problem.startswith('r.yaml:8:20: type mismatch: hour (int) == "x"'), problem


def test_away_reasons_and_dispositions_are_checked_where_they_are_written() -> None:
    text = (
        HEAD.replace(
            "rules:\n",
            "away_reasons: {break: Break, Lunch Time: Lunch}\n"
            "dispositions: {solved: '', released_by_supervisor: Released}\n"
            "rules:\n",
        )
        + "  - {name: default, default: true, queue: general}\n"
    )
    found = problems(text)
    assert any(p.startswith("r.yaml:5:30: away_reasons: code 'Lunch Time'") for p in found), found
    assert "r.yaml:6:24: dispositions: 'solved' needs a label" in found, found
    assert any(
        p.startswith("r.yaml:6:28: dispositions: 'released_by_supervisor' is built in")
        for p in found
    ), found


def test_away_reasons_and_dispositions_load() -> None:
    text = (
        HEAD.replace(
            "rules:\n", "away_reasons: {break: Break}\ndispositions: {solved: Solved}\nrules:\n"
        )
        + "  - {name: default, default: true, queue: general}\n"
    )
    table = parse_routing(text, "r.yaml")
    assert table.file.away_reasons == {"break": "Break"}
    assert table.file.dispositions == {"solved": "Solved"}


# --- hints for what people get wrong first ---------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        '- name: vip\n  when: "vip" in tags\n  queue: dsl\n',
        '- {name: vip, when: "vip" in tags, queue: dsl}\n',
    ],
)
def test_an_expression_that_starts_with_a_quote_gets_a_hint(rule: str) -> None:
    (problem,) = problems(with_rule(rule))
    assert problem.startswith("r.yaml:"), problem
    assert "quote the whole expression" in problem
    assert "when: '\"vip\" in tags'" in problem


def test_an_unknown_field_names_the_rule_and_the_closest_field() -> None:
    (problem,) = problems(
        with_rule("- {name: vip, when: '\"x\" in tags', queue: dsl, priorty: 3}\n")
    )
    assert "rules[0] (vip): unknown field 'priorty' (did you mean 'priority'?" in problem


def test_an_unknown_queue_names_the_rule_and_the_closest_queue() -> None:
    text = with_rule(
        "- {name: vip, when: '\"x\" in tags', queue: generl, escalate: [{after: 60, queue: dls}]}\n"
    )
    assert problems(text) == [
        "r.yaml:6:45: rules[0] (vip): unknown queue 'generl' (did you mean 'general'?)",
        "r.yaml:6:83: rules[0] (vip).escalate[0]: unknown queue 'dls' (did you mean 'dsl'?)",
    ]


def test_an_unknown_overflow_queue_gets_the_closest_queue() -> None:
    text = HEAD.replace("overflow: general", "overflow: genral") + TAIL
    (problem,) = problems(text)
    assert problem.endswith("queues.dsl: unknown queue 'genral' (did you mean 'general'?)")


# --- agents' platform accounts ------------------------------------------------------------------


def with_agents(agents: str) -> str:
    return HEAD.replace("rules:\n", "agents:\n" + agents + "rules:\n") + TAIL


def test_agent_accounts_load() -> None:
    table = parse_routing(
        with_agents(
            "  - {id: anna, skills: {de: 3}, accounts: {chatwoot: 12, rocketchat: u1,"
            " discourse: anna_s}}\n"
        )
    )
    accounts = table.file.agents[0].accounts
    assert (accounts.chatwoot, accounts.rocketchat, accounts.discourse) == (12, "u1", "anna_s")


def test_agent_account_problems_are_located() -> None:
    found = problems(
        with_agents(
            "  - {id: anna, skills: {de: 3}, accounts: {chatwoot: 12}}\n"
            "  - {id: bert, skills: {de: 3}, accounts: {chatwoot: 12, rocketchat: ' '}}\n"
            "  - {id: carl, skills: {de: 3}, accounts: {chatwoot: -1}}\n"
            "  - {id: dora, skills: {de: 3}, accounts: {chatwot: 3}}\n"
        )
    )
    assert any(p.startswith("r.yaml:7:") and "already agent 'anna''s" in p for p in found)
    assert any(
        p.startswith("r.yaml:7:") and "rocketchat account must not be empty" in p for p in found
    )
    assert any(p.startswith("r.yaml:8:") and "positive number" in p for p in found)
    assert any(p.startswith("r.yaml:9:") and "unknown field 'chatwot'" in p for p in found)


def test_the_loader_for_the_daemon_returns_the_problems_and_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rules.load import load_routing_or_problems

    bad = tmp_path / "r.yaml"
    bad.write_text(with_rule("- {name: a, queue: nowhere}\n"), encoding="utf-8")
    table, found = load_routing_or_problems(bad)
    assert table is None
    # All of them, located, as ``stellwerk check`` reports them.
    expected = problems(bad.read_text(encoding="utf-8"))
    assert [str(p) for p in found] == [f"{tmp_path}/{line}" for line in expected]
    assert any(p.line == 6 and "nowhere" in p.message for p in found)
    good = tmp_path / "good.yaml"
    good.write_text(with_rule(""), encoding="utf-8")
    table, found = load_routing_or_problems(good)
    assert table is not None and found == ()
    assert capsys.readouterr() == ("", "")
