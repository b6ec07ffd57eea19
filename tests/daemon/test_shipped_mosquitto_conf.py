"""The shipped config/mosquitto.conf is a working broker configuration: run as is (only paths and
ports moved into the test's tmp dir), with broker-config's files and a throw-away CA, it refuses
anonymous clients, lets the generated accounts in on both listeners, and persists."""

from __future__ import annotations

import getpass
import os
import re
import ssl
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from router.daemon.broker_config import generate
from tests.daemon.conftest import REPO, write_routing
from tests.daemon.private_servers import HOST, MOSQUITTO, _wait_listening, free_port
from tests.daemon.test_tls import make_pki

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs /usr/sbin/mosquitto"),
]


async def test_the_shipped_broker_config_runs_and_refuses_anonymous(tmp_path: Path) -> None:
    text = (REPO / "config" / "mosquitto.conf").read_text()
    for needed in ("allow_anonymous false", "persistence true", "autosave_interval 1"):
        assert re.search(rf"^{needed}$", text, re.M), needed
    gen = generate(write_routing(tmp_path / "routing.yaml", ("a01",)), tmp_path / "stellwerk")
    (tmp_path / "certs").mkdir()
    pki = make_pki(tmp_path / "certs")
    plain, tls = free_port(), free_port()
    (tmp_path / "data").mkdir()
    text = (
        text.replace("/etc/mosquitto/stellwerk/", f"{gen.out}/")
        .replace("/etc/mosquitto/certs/ca.pem", str(pki.ca))
        .replace("/etc/mosquitto/certs/broker.pem", str(pki.server_cert))
        .replace("/etc/mosquitto/certs/broker.key", str(pki.server_key))
        .replace("/var/lib/mosquitto/", f"{tmp_path / 'data'}/")
        .replace("listener 1883 127.0.0.1", f"listener {plain} {HOST}")
        .replace("listener 8883", f"listener {tls} {HOST}")
        .replace("log_dest syslog", "log_dest stdout")
    )
    if os.geteuid() == 0:
        text = f"user {getpass.getuser()}\n" + text
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    log = tmp_path / "broker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdout=out, stderr=out)
    try:
        _wait_listening(proc, [plain, tls], log)
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(HOST, plain, identifier="anon"):
                pass
        async with aiomqtt.Client(
            HOST, plain, username="stellwerk", password=gen.mqtt["stellwerk"]
        ):
            pass
        context = ssl.create_default_context(cafile=str(pki.ca))
        async with aiomqtt.Client(
            HOST,
            tls,
            username="agent-a01",
            password=gen.mqtt["agent-a01"],
            tls_context=context,
        ):
            pass
    finally:
        proc.terminate()
        proc.wait(10)
    # A clean stop wrote the persistence file where the config says.
    assert (tmp_path / "data" / "mosquitto.db").exists(), log.read_text()
