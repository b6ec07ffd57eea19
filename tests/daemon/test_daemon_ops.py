"""Operating the daemon: start-up refusals, rules reload (SIGHUP), graceful SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.daemon.journal import Journal
from tests.daemon.conftest import REPO, MqttProbe, ari, wait_until, write_routing

pytestmark = pytest.mark.integration


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "router.cli", "run", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_bad_settings_refuse_to_start_with_a_located_error(tmp_path: Path) -> None:
    config = tmp_path / "stellwerk.yaml"
    config.write_text("mqtt:\n  url: mqtt://127.0.0.1:1883\n  keepalive: soon\n")
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    assert f"{config}:3:14: mqtt.keepalive: Expected `int`" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_routing_file_that_fails_check_refuses_to_start(tmp_path: Path) -> None:
    routing = tmp_path / "r.yaml"
    routing.write_text("queues:\n  support: {}\nrules:\n  - {name: x, queue: nowhere}\n")
    result = run_cli(env={"STELLWERK_ROUTING": str(routing)})
    assert result.returncode == 1
    assert f"{routing}:" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


async def test_reload_refuses_a_broken_file_and_applies_a_good_one(
    tmp_path: Path, mqtt_probe: MqttProbe, start_daemon: Callable[..., Any]
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",))
    daemon = await start_daemon(routing)
    good = routing.read_text()
    routing.write_text(good.replace("queue: support", "queue: no_such_queue"))
    assert daemon.state.reload is not None
    problems = await daemon.state.reload()
    assert problems and all(p.startswith(f"{routing}:") for p in problems)
    assert any("no_such_queue" in p for p in problems)
    # The running rules stay: calls still go to support.
    await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "r-1"))
    (queued,) = await mqtt_probe.wait_for("events/contact.queued")
    assert queued["queue"] == "support"

    # A good file: a new queue and a rule for it; SIGHUP's path (the flag) applies it.
    routing.write_text(
        good.replace(
            "  - name: default\n",
            "  - name: vip\n    when: 'to == \"2000\"'\n    queue: vip\n  - name: default\n",
        ).replace("queues:\n", "queues:\n  vip:\n    skills: {support: 1}\n")
    )
    daemon.reload_requested.set()
    await wait_until(
        lambda: daemon.metrics.registry.get_sample_value(
            "stellwerk_rules_reloads_total", {"result": "ok"}
        ),
        5,
        "the reload",
    )
    await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "r-2", exten="2000"))
    (vip,) = await mqtt_probe.wait_for("events/contact.queued", contact_id="asterisk-ari:r-2")
    assert (vip["queue"], vip["rule"]) == ("vip", "vip")
    refused = daemon.metrics.registry.get_sample_value(
        "stellwerk_rules_reloads_total", {"result": "refused"}
    )
    assert refused == 1.0


async def test_an_entry_the_engine_fails_on_is_set_aside_and_routing_goes_on(
    tmp_path: Path,
    mqtt_probe: MqttProbe,
    start_daemon: Callable[..., Any],
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from router.engine import Engine

    real_handle = Engine.handle

    def buggy(self: Engine, message: Any, now: float) -> Any:
        if getattr(message, "contact_id", "") == "asterisk-ari:boom":
            raise RuntimeError("engine bug")
        return real_handle(self, message, now)

    monkeypatch.setattr(Engine, "handle", buggy)
    daemon = await start_daemon(write_routing(tmp_path / "r.yaml", ("anna",)))
    await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "before"))
    await mqtt_probe.wait_for("events/contact.queued", contact_id="asterisk-ari:before")
    await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "boom"))
    await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", "after"))
    await mqtt_probe.wait_for("events/contact.queued", contact_id="asterisk-ari:after")
    # (Waited for: on a busy box the dead letter can land after "after" was published.)
    dead = await wait_until(journal.dead_letters, 10, "the dead letter")
    assert [(d["source"], d["reason"]) for d in dead] == [("journal", "engine_error")]
    assert b"asterisk-ari:boom" in dead[0]["body"]
    assert len(await journal.redis.smembers(journal.keys.poison)) == 1
    # Nothing was routed twice by the restart from the snapshot, and "before" is still queued.
    assert len(mqtt_probe.seen("events/contact.queued", contact_id="asterisk-ari:before")) == 1
    # The restart from the snapshot may still be under way (no view meanwhile) on a busy box.
    await wait_until(lambda: daemon.state.view is not None, 10, "routing again")
    info = daemon.state.view.contact_info("asterisk-ari:before")
    assert info is not None and info["state"] == "queued"
    assert daemon.state.view.contact_info("asterisk-ari:boom") is None


@pytest.mark.parametrize(
    ("peer", "override"),
    [
        ("redis", {"redis_url": "redis://127.0.0.1:1/0"}),
        ("mqtt", {"mqtt_url": "mqtt://127.0.0.1:1"}),
    ],
)
async def test_the_daemon_waits_for_an_unreachable_peer_instead_of_crashing(
    tmp_path: Path,
    daemon_env: Callable[..., dict[str, str]],
    peer: str,
    override: dict[str, str],
) -> None:
    import asyncio

    from router.daemon.config import load_settings
    from router.daemon.main import Daemon
    from rules.load import load_routing

    routing = write_routing(tmp_path / "r.yaml")
    env = daemon_env(routing, **override)
    daemon = Daemon(load_settings(None, env=env), load_routing(routing), handle_signals=False)
    task = asyncio.create_task(daemon.run())
    await asyncio.sleep(1.5)
    assert not task.done(), task.result()
    if peer == "redis":
        assert not daemon.state.redis_ok and not daemon.state.lease_held
    else:
        assert daemon.state.redis_ok and not daemon.state.mqtt_ok
    daemon.stopping.set()
    await asyncio.wait_for(task, 15)
