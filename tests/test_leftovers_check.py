"""The end-of-run check (tests/conftest.py) fails a run that leaves keys or retained messages."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from tests.servers import REDIS_URL

ROOT = Path(__file__).resolve().parents[1]

LEAKY = """
import aiomqtt
import redis

from tests import servers


def test_leaks_a_key() -> None:
    redis.Redis.from_url(servers.REDIS_URL).set(servers.key_prefix("leak") + "snapshot", b"x")


async def test_leaks_a_retained_message() -> None:
    async with aiomqtt.Client(servers.MQTT_HOST, servers.MQTT_PORT) as client:
        await client.publish(servers.topic_prefix("leak") + "/in/x", b"x", qos=1, retain=True)
"""

CLEAN = """
import redis

from tests import servers


def test_cleans_up() -> None:
    client = redis.Redis.from_url(servers.REDIS_URL)
    key = servers.key_prefix("tidy") + "snapshot"
    try:
        client.set(key, b"x")
    finally:
        client.delete(key)
"""


def run_suite(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            "-p",
            "no:cacheprovider",
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.integration
def test_a_run_that_leaves_a_key_or_a_retained_message_fails_and_is_cleaned(
    tmp_path: Path,
) -> None:
    leaky = tmp_path / "test_leaky.py"
    leaky.write_text(textwrap.dedent(LEAKY))
    result = run_suite(leaky)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "2 passed" in out
    assert "left behind by the tests" in out
    assert "leak:snapshot" in out and "leak/in/x" in out
    # The check removed what it found.
    (key,) = re.findall(r"redis key (\S+)", out)
    assert redis.Redis.from_url(REDIS_URL).exists(key) == 0


@pytest.mark.integration
def test_a_run_that_cleans_up_passes(tmp_path: Path) -> None:
    clean = tmp_path / "test_clean.py"
    clean.write_text(textwrap.dedent(CLEAN))
    result = run_suite(clean)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left behind" not in result.stdout
