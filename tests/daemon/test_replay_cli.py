"""`stellwerk replay`: a recorded journal run against a routing file, from a file or Redis."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from channels.contact_event import ContactEvent, Sender
from router.daemon.journal import AgentEntry, ContactEntry, Keys, encode_entry
from router.messages import Accept, Login
from tests.daemon.conftest import REDIS_URL, Names

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


def replay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STELLWERK, "replay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        # Away from the checkout, whose config/stellwerk.yaml would be the default settings.
        cwd=tempfile.gettempdir(),
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
    client = redis.Redis.from_url(REDIS_URL)
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


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
    env.update({f"STELLWERK_{k.upper()}": v for k, v in settings.items()})
    return env


def _other_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.mark.integration
def test_replay_takes_redis_and_key_prefix_from_the_environment_like_run(
    tmp_path: Path, names: Names
) -> None:
    url = _other_db(REDIS_URL, 9)
    client = redis.Redis.from_url(url)
    key = Keys(names.key_prefix).journal
    try:
        for raw in journal():
            client.xadd(key, {b"e": raw})
        r = str(routing(tmp_path / "r.yaml", queue_for_vip="vip"))
        env = _env(redis_url=url, key_prefix=names.key_prefix)
        result = replay(r, "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["events"]["contact.queued"] == 2
        # A settings file works the same way, and the routing file can come from it too.
        config = tmp_path / "stellwerk.yaml"
        config.write_text(
            f"routing: r.yaml\nkey_prefix: '{names.key_prefix}'\nredis: {{url: '{url}'}}\n"
        )
        result = replay("--config", str(config), "--json", env=_env())
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["entries"] == 4
    finally:
        client.delete(key)
        client.close()


@pytest.mark.integration
def test_an_empty_or_missing_journal_is_an_error(tmp_path: Path, names: Names) -> None:
    r = str(routing(tmp_path / "r.yaml", queue_for_vip="vip"))
    result = replay(r, "--key-prefix", f"{names.key_prefix}nothing:", env=_env(redis_url=REDIS_URL))
    assert result.returncode == 1
    assert "no journal entries" in result.stderr and f"{names.key_prefix}nothing:" in result.stderr
    assert result.stdout == ""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = replay(r, "--file", str(empty))
    assert result.returncode == 1 and "no journal entries" in result.stderr
    result = replay(r, "--file", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 1 and "cannot read the journal" in result.stderr


def test_bad_settings_are_reported_like_run(tmp_path: Path) -> None:
    r = str(routing(tmp_path / "r.yaml", queue_for_vip="vip"))
    result = replay(r, "--key-prefix", "x:", env=_env(redis_url="http://nowhere"))
    assert result.returncode == 2 and "STELLWERK_REDIS_URL" in result.stderr
