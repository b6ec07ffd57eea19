"""What ``make demo`` leaves behind: nothing. Its cleanup (scripts/lib/daemon.sh, run from the
demo's EXIT trap) removes the key prefix and the broker session the daemon's ingress keeps."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
import redis.asyncio as aioredis

from router.daemon.config import load_settings
from router.daemon.mqtt import make_client
from tests.daemon.conftest import REPO, Names
from tests.servers import MQTT_URL, REDIS_URL

pytestmark = pytest.mark.integration


def env_for(names: Names) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
    env.update(
        BIN=str(Path(sys.executable).parent),
        STELLWERK_CONFIG=str(REPO / "config" / "stellwerk.yaml"),
        STELLWERK_REDIS_URL=REDIS_URL,
        STELLWERK_MQTT_URL=MQTT_URL,
        STELLWERK_KEY_PREFIX=names.key_prefix,
        STELLWERK_TOPIC_PREFIX=names.topic_prefix,
        STELLWERK_MQTT_CLIENT_ID=f"stw-{names.tag}",
    )
    return env


async def first_message_after_resuming(names: Names, topic: str) -> bytes:
    """Resume the daemon's session: a queued message comes first if the session survived."""
    settings = load_settings(None, env=env_for(names)).settings
    client = make_client(settings.mqtt, f"stw-{names.tag}", persistent=True)
    async with client:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"sentinel", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("no message")


async def test_the_demo_cleanup_removes_its_keys_and_its_broker_session(
    names: Names, redis_client: aioredis.Redis
) -> None:
    topic = f"{names.topic_prefix}/in/phone/asterisk-ari"
    settings = load_settings(None, env=env_for(names)).settings
    # What a demo run leaves: journal keys, and a persistent session with a message queued.
    await redis_client.set(f"{names.key_prefix}snapshot", b"x")
    async with make_client(settings.mqtt, f"stw-{names.tag}", persistent=True) as session:
        await session.subscribe(topic, qos=1)
    async with aiomqtt.Client(settings.mqtt.host, settings.mqtt.port) as peer:
        await peer.publish(topic, b"queued while nobody was connected", qos=1)

    def cleanup() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "bash",
                "-c",
                "set -e; source scripts/lib/daemon.sh; wipe_key_prefix; drop_broker_session",
            ],
            cwd=REPO,
            env=env_for(names),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = await asyncio.to_thread(cleanup)
    assert result.returncode == 0, result.stderr
    assert [k async for k in redis_client.scan_iter(match=f"{names.key_prefix}*")] == []
    try:
        assert await first_message_after_resuming(names, topic) == b"sentinel"
    finally:
        async with make_client(settings.mqtt, f"stw-{names.tag}", persistent=False):
            pass


def test_the_demo_runs_its_cleanup_on_every_exit() -> None:
    script = (REPO / "scripts" / "demo.sh").read_text()
    body = script[script.index("demo_cleanup() {") : script.index("trap demo_cleanup EXIT")]
    # The demo's broker is a private one in the run's own temp dir: stopping it ends its sessions
    # (a second run starts another in a new dir); the shared broker holds no demo session.
    assert "stop_daemon" in body and "wipe_key_prefix" in body and 'kill -TERM "$BROKER"' in body
    # Set before the daemon starts, so a failed start is cleaned up too.
    assert script.index("trap demo_cleanup EXIT") < script.index("start_daemon demo")
