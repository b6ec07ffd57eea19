"""``stellwerk check`` and ``stellwerk explain`` through the real console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STELLWERK = str(Path(sys.executable).parent / "stellwerk")
ROUTING = ROOT / "config" / "routing.yaml"
FIXTURES = Path(__file__).parent / "fixtures"


def stellwerk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STELLWERK, *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def test_check_accepts_the_example_routing_file() -> None:
    result = stellwerk("check", ROUTING)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{ROUTING}: ok: 20 rules, 13 queues, 22 agents, 11 experts, 8 skills\n"
    )
    assert result.stderr == ""


def test_check_reports_every_problem_of_a_broken_copy(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config" / "experts.csv", tmp_path / "experts.csv")
    text = ROUTING.read_text(encoding="utf-8")
    edits = [
        ("    weight: 0.5\n", "    weight: 0.5\n    colour: blue\n"),  # unknown field
        ("    queue: international\n", "    queue: internationl\n"),  # unknown queue
        ('to == "+498003322003"', "to == 498003322003"),  # type mismatch
        ("  - name: default\n    default: true\n", "  - name: default\n"),  # no default
    ]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    broken = tmp_path / "routing.yaml"
    broken.write_text(text, encoding="utf-8")
    lines = text.splitlines()

    def at(needle: str, token: str | None = None) -> str:
        n = next(i for i, line in enumerate(lines) if needle in line)
        return f"{broken}:{n + 1}:{lines[n].index(token or needle) + 1}"

    result = stellwerk("check", broken)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{at('colour: blue')}: queues.after_hours: unknown field 'colour' (known: skills,"
        " channels, weight, sla, max_wait, max_length, overflow, wrap_up, offer_timeout,"
        " strategy, description, phone_offer, music_class, announcement)",
        f"{at('- name: spam')}: no default rule (the last rule needs 'default: true')",
        f"{at('queue: internationl', 'internationl')}: unknown queue 'internationl'",
        f"{at('to == 498003322003', '498003322003')}: type mismatch: to (str) =="
        " 498003322003 (int)",
        f"{at('- name: default', 'default')}: a rule without 'when' must be the default rule"
        " (default: true)",
    ]


def test_check_reports_bad_yaml_with_its_position(tmp_path: Path) -> None:
    broken = tmp_path / "routing.yaml"
    broken.write_text("queues:\n  general: {}\n  dsl: weight: 2\n", encoding="utf-8")
    result = stellwerk("check", broken)
    assert result.returncode == 1
    # libyaml says "in this context", PyYAML's own scanner "here": the position is what matters
    assert result.stderr.startswith(f"{broken}:3:14: bad YAML: mapping values are not allowed")
    broken.write_text("queues:\n  general: [\nrules: 1\n", encoding="utf-8")
    result = stellwerk("check", broken)
    assert result.stderr.startswith(f"{broken}:4:1: bad YAML: ")
    assert "',' or ']'" in result.stderr
    assert result.stderr.endswith(" (while parsing a flow sequence at line 2)\n")


def test_check_of_a_missing_file_fails_without_a_traceback(tmp_path: Path) -> None:
    result = stellwerk("check", tmp_path / "missing.yaml")
    assert result.returncode == 1
    assert (
        result.stderr
        == f"{tmp_path / 'missing.yaml'}:1:1: cannot read: No such file or directory\n"
    )


def test_explain_an_expert_call() -> None:
    result = stellwerk("explain", ROUTING, FIXTURES / "expert-call.json")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("rule:        crowd_expert\nqueue:       expert_desk\npriority:    100\n")
    assert "customer:    expert x-fbauer (level 3)" in out
    assert "MATCH crowd_expert\n          true  customer.expert   [customer.expert = true]" in out
    # The rule before it failed, and the explanation says on what.
    assert "  no    spam\n" in out


def test_explain_a_billing_post_in_the_community_as_json() -> None:
    result = stellwerk("explain", ROUTING, FIXTURES / "billing-post.json", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    decision = data["decision"]
    assert decision["rule"] == "community_personal_data"
    assert decision["queue"] == "community_desk"
    assert decision["crowd_first"] is None  # the crowd cannot see bills: no crowd wait
    assert decision["skills"] == {"billing": 2}
    assert [t["rule"] for t in data["trace"]] == [
        "spam",
        "crowd_expert",
        "community_personal_data",
    ]
    assert [t["matched"] for t in data["trace"]] == [False, False, True]
    decisive = data["trace"][-1]["why"]
    assert decisive[0] == {
        "condition": 'channel == "social"',
        "result": True,
        "values": {"channel": "social"},
    }
    assert decisive[1]["condition"].startswith('text ~ "(?i)rechnung|vertrag|iban')
    assert decisive[1]["result"] is True
    assert decisive[1]["values"]["matched"] == "Rechnung"
    assert data["trace"][1]["why"] == [
        {"condition": "customer.expert", "result": False, "values": {"customer.expert": False}}
    ]


def test_explain_other_community_posts_wait_for_the_crowd() -> None:
    result = stellwerk("explain", ROUTING, FIXTURES / "community-post.json", "--json")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)["decision"]
    assert (decision["rule"], decision["crowd_first"]) == ("community_crowd_first", 1800)


def test_explain_uses_the_clock_given_in_local_time(tmp_path: Path) -> None:
    event = json.loads((FIXTURES / "billing-post.json").read_text())
    event.update(channel="chat", source="rocketchat", text="Hallo, ich habe eine Frage")
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(event))
    late = stellwerk("explain", ROUTING, path, "--at", "2026-11-24T21:30:00", "--json")
    day = stellwerk("explain", ROUTING, path, "--at", "2026-11-24T10:30:00+01:00", "--json")
    assert json.loads(late.stdout)["decision"]["rule"] == "after_hours"
    assert json.loads(late.stdout)["hour"] == 21
    assert json.loads(day.stdout)["decision"]["rule"] == "default"


def test_explain_refuses_a_bad_event_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "new", "channel": "fax"}')
    result = stellwerk("explain", ROUTING, bad)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"{bad}: not a ContactEvent:")
    missing = stellwerk("explain", ROUTING, tmp_path / "none.json")
    assert missing.returncode == 2
    assert len(missing.stderr.splitlines()) == 1
    bad_at = stellwerk("explain", ROUTING, FIXTURES / "billing-post.json", "--at", "noon")
    assert (bad_at.returncode, bad_at.stderr) == (2, "--at: not an ISO 8601 time: 'noon'\n")
