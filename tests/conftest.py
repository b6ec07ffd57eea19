"""The whole suite: a check at the end of the run that the tests left nothing behind.

Every test cleans up its Redis keys and retained MQTT messages in its fixtures' teardown, which
runs on failure too. This check makes a leak a failure instead of a pile-up: after the last
test it looks for keys under this run's prefix (``tests.servers.KEY_ROOT``) and for retained
messages under its topic root, deletes what it finds, and fails the run naming them. Runs
without a reachable Redis or broker (unit tests only) skip that part of the check.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from hypothesis import settings

from tests import servers

# Hypothesis' default 200 ms deadline per example is a wall-clock bound: on a machine busy with
# other work it fails correct code. Properties are checked, not speed (that is benchmarks/).
settings.register_profile("stellwerk", deadline=None)
settings.load_profile("stellwerk")

LEFTOVERS: list[str] = []


def _redis_leftovers() -> list[str]:
    import redis

    client = redis.Redis.from_url(servers.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{servers.KEY_ROOT}*", count=1000))
        if keys:
            client.delete(*keys)
        names = [k.decode(errors="replace") for k in keys]
        return [f"redis key {n}{servers.owner(n)}" for n in names]
    except redis.ConnectionError:
        return []
    finally:
        client.close()


async def _retained_leftovers() -> list[str]:
    import aiomqtt

    found: list[str] = []
    sentinel = f"{servers.TOPIC_ROOT}/_end_of_run_check"
    try:
        async with aiomqtt.Client(
            servers.MQTT_HOST,
            servers.MQTT_PORT,
            username=servers.MQTT_USER,
            password=servers.MQTT_PASSWORD,
            identifier=f"stwtest-{servers.RUN}-check",
            clean_session=True,
            timeout=5,
        ) as client:
            await client.subscribe(f"{servers.TOPIC_ROOT}/#", qos=1)
            # Retained messages come right after the subscription is granted; a message
            # published after that arrives after them, so it marks the end of the list.
            await client.publish(sentinel, b"end", qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    topic = str(message.topic)
                    if topic == sentinel:
                        break
                    if message.retain:
                        found.append(topic)
            for topic in found:
                await client.publish(topic, b"", qos=1, retain=True)
    except (aiomqtt.MqttError, OSError):
        return []
    return [f"retained message on {t}{servers.owner(t)}" for t in found]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when it left keys or retained messages behind (after removing them)."""
    with contextlib.suppress(ImportError):
        LEFTOVERS.extend(_redis_leftovers())
        LEFTOVERS.extend(asyncio.run(_retained_leftovers()))
    if LEFTOVERS and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Name what was left behind, so the leaking test can be found."""
    if LEFTOVERS:
        terminalreporter.section("left behind by the tests (now removed)", red=True)
        for item in LEFTOVERS[:50]:
            terminalreporter.line(item)
        terminalreporter.line(f"{len(LEFTOVERS)} in all: every test must clean up what it made")
