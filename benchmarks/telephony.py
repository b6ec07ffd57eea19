"""From an agent becoming free to their phone ringing, through a real daemon and the ARI peer.

``.venv/bin/python benchmarks/telephony.py [--held 50] [--agents 200] [--json]``

The daemon (``stellwerk run``, a child process on the local Redis and Mosquitto, its own key
and topic prefix) is the Stasis application of the simulated Asterisk (``tests/peers/ari.py``).
All agents are logged in as ``away``; ``--held`` callers wait in their holding bridges with
music. Then, one agent after the other, the benchmark sets the agent ``available`` over MQTT
and measures until the simulated Asterisk receives the ``POST /channels`` that rings that
agent's endpoint (MQTT -> journal -> routing -> offer -> connector -> ARI). The rung agent
answers (the call is bridged) and a new caller arrives, so ``--held`` callers keep waiting.
Both sides read the same monotonic clock (CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers.ari import AriPeer  # noqa: E402

PREFIX = "stellwerk-bench-telephony"


class TimedPeer(AriPeer):
    """The ARI peer, noting when each endpoint was first rung."""

    def __init__(self) -> None:
        super().__init__()
        self.rung_at: dict[str, float] = {}

    def _post_channels(self, q: dict[str, str], body: Any) -> tuple[int, Any]:
        self.rung_at.setdefault(q.get("endpoint", ""), time.monotonic())
        return super()._post_channels(q, body)


def routing(agents: int) -> str:
    lines = "\n".join(
        f"  - {{id: a{i}, skills: {{support: 3}}, endpoints: {{asterisk: PJSIP/a{i}}}}}"
        for i in range(agents)
    )
    return f"""version: 1
defaults: {{offer_timeout: 60, wrap_up: 0}}
skills: [support]
queues:
  support: {{skills: {{support: 1}}}}
agents:
{lines}
rules:
  - {{name: default, default: true, queue: support}}
"""


def wipe() -> None:
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(r.scan_iter(match=f"{PREFIX}:*"))
    if keys:
        r.delete(*keys)


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        await asyncio.sleep(0.001)
    raise SystemExit(f"benchmark: timed out waiting for {what}")


def held(peer: AriPeer) -> int:
    return sum(
        1
        for b in peer.bridges.values()
        if b.bridge_type == "holding" and b.moh is not None and b.channels
    )


async def run(held_calls: int, agents: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="stellwerk-bench-phone."))
    (work / "routing.yaml").write_text(routing(agents), encoding="utf-8")
    wipe()
    async with TimedPeer() as peer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLWERK_")}
        env.update(
            STELLWERK_ROUTING=str(work / "routing.yaml"),
            STELLWERK_KEY_PREFIX=f"{PREFIX}:",
            STELLWERK_TOPIC_PREFIX=PREFIX,
            STELLWERK_MQTT_CLIENT_ID=f"{PREFIX}-daemon",
            STELLWERK_HTTP_ADDR="",
            STELLWERK_SMTP_ADDR="",
            STELLWERK_LOG_FORMAT="json",
            STELLWERK_LOG_LEVEL="warning",
            STELLWERK_ASTERISK_URL=peer.url,
            STELLWERK_ASTERISK_USERNAME=peer.username,
            STELLWERK_ASTERISK_PASSWORD=peer.password,
        )
        log = (work / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await until(peer.connected, 20, "the daemon")
            async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"{PREFIX}-agents") as mqtt:
                states: dict[str, str] = {}

                async def pump() -> None:
                    async for message in mqtt.messages:
                        data = json.loads(message.payload)  # type: ignore[arg-type]
                        states[data["agent_id"]] = data["state"]

                await mqtt.subscribe(f"{PREFIX}/events/agent.state", qos=1)
                pumping = asyncio.create_task(pump())
                # Logins sent before the daemon's ingress subscribed are lost on a first run
                # (the broker has no session for it yet): send again until all are seen.
                body = json.dumps({"op": "login", "state": "away", "reason": "bench"})
                for _ in range(10):
                    for i in range(agents):
                        if f"a{i}" not in states:
                            await mqtt.publish(f"{PREFIX}/agents/a{i}/cmd", body, qos=1)
                    with contextlib.suppress(SystemExit):
                        await until(lambda: len(states) == agents, 3, "all agents logged in")
                    if len(states) == agents:
                        break
                else:
                    raise SystemExit("benchmark: the agents could not log in")
                for i in range(held_calls):
                    peer.place_call(f"+4930{i:07d}")
                await until(lambda: held(peer) == held_calls, 30, "the callers held")
                samples: list[float] = []
                for i in range(agents):
                    endpoint = f"PJSIP/a{i}"
                    started = time.monotonic()
                    body = json.dumps({"op": "state", "state": "available"})
                    await mqtt.publish(f"{PREFIX}/agents/a{i}/cmd", body, qos=1)
                    await until(lambda e=endpoint: e in peer.rung_at, 10, f"{endpoint} rung")
                    samples.append(peer.rung_at[endpoint] - started)
                    # The agent answers; a new caller keeps the queue at --held.
                    leg = await until(lambda e=endpoint: peer.ringing(e), 5, "the leg ringing")
                    peer.answer(leg[0])
                    peer.place_call(f"+4931{i:07d}")
                    await until(lambda: held(peer) == held_calls, 10, "the queue refilled")
                pumping.cancel()
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
            log.close()
            wipe()
        ms = sorted(s * 1000 for s in samples)
        return {
            "held_calls": held_calls,
            "agents": agents,
            "samples": len(ms),
            "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
            "mean_ms": round(statistics.fmean(ms), 2),
            "max_ms": round(ms[-1], 2),
            "invalid_ari_requests": len(peer.violations),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=50, help="callers waiting (default 50)")
    parser.add_argument("--agents", type=int, default=200, help="agents (default 200)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args.held, args.agents))
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"agent free -> phone rung, {result['held_calls']} held calls, {result['agents']} agents,"
        f" {result['samples']} samples: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms,"
        f" mean {result['mean_ms']} ms, max {result['max_ms']} ms;"
        f" invalid ARI requests: {result['invalid_ari_requests']}"
    )


if __name__ == "__main__":
    main()
