"""The broker ``scripts/services.sh`` starts where none runs: the suite's clients must work with it.

The shared broker on 1883 cannot be replaced in a test, so this starts ``mosquitto`` with the
script's own configuration file on a free port (the listener, the persistence directory and, as
root, the user are the only lines changed) and talks to it the way the suite and the examples
do: anonymously, over loopback, QoS 1 to a persistent session.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import uuid
from pathlib import Path

import aiomqtt
import pytest

from tests.daemon.private_servers import HOST, MOSQUITTO, _Server, free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "services.sh"


def _started_conf() -> Path:
    """The configuration file ``services.sh`` passes to ``mosquitto -c``."""
    match = re.search(r'mosquitto -d -c "\$\(pwd\)/([^"]+)"', SCRIPT.read_text(encoding="utf-8"))
    assert match, "services.sh no longer starts mosquitto with a file of the repository"
    return REPO / match.group(1)


def test_the_script_starts_the_loopback_broker_not_the_production_example() -> None:
    conf = _started_conf().read_text(encoding="utf-8")
    assert re.search(r"^listener 1883 127\.0\.0\.1$", conf, re.M), "must bind loopback only"
    assert "password_file" not in conf and "acl_file" not in conf
    assert re.search(r"^autosave_interval 1$", conf, re.M)


async def test_an_anonymous_client_of_the_suite_gets_its_queued_messages(tmp_path: Path) -> None:
    if not MOSQUITTO.exists():
        pytest.skip(f"{MOSQUITTO} is not installed")
    port = free_port()
    conf = _started_conf().read_text(encoding="utf-8")
    conf = conf.replace("listener 1883 127.0.0.1", f"listener {port} {HOST}")
    conf = conf.replace("/tmp/stellwerk-mosquitto/", f"{tmp_path}/")
    if os.geteuid() == 0:  # mosquitto would drop to its own user, who cannot write tmp_path
        conf = f"user {getpass.getuser()}\n" + conf
    (tmp_path / "mosquitto.conf").write_text(conf, encoding="utf-8")
    server = _Server(tmp_path)
    server._spawn([str(MOSQUITTO), "-c", str(tmp_path / "mosquitto.conf")], [port])
    topic = f"stwtest/local-broker/{uuid.uuid4().hex}"
    try:
        # A persistent session subscribes and goes away; what is published meanwhile waits.
        async with aiomqtt.Client(
            HOST, port, identifier=f"sub-{uuid.uuid4().hex[:8]}", clean_session=False
        ) as sub:
            await sub.subscribe(topic, qos=1)
            ident = sub.identifier
        async with aiomqtt.Client(HOST, port) as pub:
            for i in range(3):
                await pub.publish(topic, f"m{i}", qos=1)
        async with aiomqtt.Client(HOST, port, identifier=ident, clean_session=False) as sub:
            got = []
            async with asyncio.timeout(10):
                async for message in sub.messages:
                    got.append(bytes(message.payload).decode())
                    if len(got) == 3:
                        break
        assert got == ["m0", "m1", "m2"]
    finally:
        server.kill()
