"""`stellwerk replay`: a recorded journal run against a routing file, from a file or Redis."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis

from router.daemon.journal import AgentEntry, ContactEntry, Keys, encode_entry
from router.messages import Accept, Login
from router.model import ContactEvent, Sender
from tests.daemon.conftest import Names

STELLWERK = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "stellwerk")


def routing(path: Path, *, queue_for_vip: str) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            skills: [s]
            queues:
              main: {{skills: {{s: 1}}}}
              vip: {{skills: {{s: 1}}}}
            agents: [{{id: a1, skills: {{s: 1}}}}]
            rules:
              - {{name: vip, when: '"vip" in tags', queue: {queue_for_vip}}}
              - {{name: default, default: true, queue: main}}
            """
        ),
        encoding="utf-8",
    )
    return path


def journal() -> list[bytes]:
    def call(n: int, tags: tuple[str, ...] = ()) -> ContactEvent:
        return ContactEvent(
            kind="new",
            contact_id=f"generic:c{n}",
            channel="phone",
            source="generic",
            external_id=f"c{n}",
            sender=Sender(phone=f"+4930{n:06d}"),
            tags=tags,
        )

    entries = [
        AgentEntry(cmd=Login(agent_id="a1"), at=100.0),
        ContactEntry(event=call(1, ("vip",)), at=101.0),
        AgentEntry(cmd=Accept(agent_id="a1", offer_id="o3"), at=102.0),
        ContactEntry(event=call(2), at=103.0),
    ]
    return [encode_entry(e) for e in entries]


def entered(report: dict[str, Any]) -> dict[str, int]:
    return {q["name"]: q["entered"] for q in report["queues"]}


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STELLWERK, "replay", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_same_journal_against_two_routing_files(tmp_path: Path) -> None:
    recorded = tmp_path / "journal.jsonl"
    recorded.write_bytes(b"\n".join(journal()) + b"\n")
    before = replay(
        str(routing(tmp_path / "a.yaml", queue_for_vip="vip")), "--file", str(recorded), "--json"
    )
    after = replay(
        str(routing(tmp_path / "b.yaml", queue_for_vip="main")), "--file", str(recorded), "--json"
    )
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    a, b = json.loads(before.stdout), json.loads(after.stdout)
    assert entered(a) == {"main": 1, "vip": 1}
    assert entered(b) == {"main": 2, "vip": 0}
    assert a["events"]["contact.assigned"] == 1 and a["refused"] == {}
    text = replay(str(tmp_path / "a.yaml"), "--file", str(recorded))
    assert "replayed 4 entries" in text.stdout and "vip" in text.stdout


def test_a_bad_line_or_routing_file_is_one_located_error(tmp_path: Path) -> None:
    bad = tmp_path / "journal.jsonl"
    bad.write_bytes(journal()[0] + b"\n{not json\n")
    result = replay(str(routing(tmp_path / "r.yaml", queue_for_vip="vip")), "--file", str(bad))
    assert result.returncode == 1
    assert f"{bad}:2: not a journal entry" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("queues: {q: {weight: -1}}\n", encoding="utf-8")
    result = replay(str(broken), "--file", str(bad))
    assert result.returncode == 1 and f"{broken}:" in result.stderr


@pytest.mark.integration
def test_the_journal_is_read_from_redis(tmp_path: Path, names: Names) -> None:
    client = redis.Redis()
    key = Keys(names.key_prefix).journal
    try:
        for raw in journal():
            client.xadd(key, {b"e": raw})
        result = replay(
            str(routing(tmp_path / "r.yaml", queue_for_vip="vip")),
            "--key-prefix",
            names.key_prefix,
            "--json",
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["events"]["contact.queued"] == 2
    finally:
        client.delete(key)
