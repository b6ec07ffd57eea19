"""End-to-end throughput of the daemon: MQTT ARI ingress -> journal -> routing -> offer delivery.

Starts ``stellwerk run`` as a subprocess against the local Redis and Mosquitto (its own key and
topic prefix, a generated routing file with ``--agents`` phone agents, wrap-up 0), or uses a
running daemon (``--use-running`` with ``--topic-prefix`` and ``--routing``). Then, for each rate
in ``--rates``, it drives the daemon for ``--duration`` seconds with Asterisk StasisStart events
over MQTT; simulated agents accept each offer at once and the caller hangs up at once (so every
contact costs the daemon three journal entries: the call, the accept, the hang-up, and about
seven MQTT messages out). Per rate it reports contacts/s sent and offered, ingress->offer latency
percentiles (send time to the offer arriving at the agent, matched by contact id), the contacts
``lost`` (accepted by the broker, never seen by the router although its backlog drained) and
``unconsumed`` (never seen, but the daemon still had a backlog when ``--drain`` ran out). The
``--json`` output has, per rate, ``rate``, the offered rate (``contacts_per_second``), the
latency percentiles in ms, ``lost`` and ``unconsumed``.

    .venv/bin/python benchmarks/e2e.py                       # 200,500,1000,2000,5000 /s, 10 s each
    .venv/bin/python benchmarks/e2e.py --rates 1000 --duration 30 --json

The target is >= 5,000 contacts/s with p99 < 50 ms and zero loss; the figures measured on
the 2-core development box are in docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.cli.loadgen import LoadGen, Profile, Report, Target  # noqa: E402


def routing_file(agents: int) -> str:
    """One phone queue, ``agents`` agents, no wrap-up: the daemon, not the staffing, limits."""
    lines = [
        "version: 1",
        "defaults: {offer_timeout: 30, wrap_up: 0}",
        "skills: [de]",
        "queues:",
        "  hotline: {skills: {de: 1}, channels: [phone], sla: {seconds: 20, percent: 80}}",
        "agents:",
    ]
    lines += [
        f"  - {{id: e{i:04d}, skills: {{de: 3}}, capacity: {{phone: 1}}}}" for i in range(agents)
    ]
    lines += ["rules:", "  - {name: default, default: true, queue: hotline}"]
    return "\n".join(lines) + "\n"


BROKER_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages 1000000
set_tcp_nodelay true
"""


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"e2e: nothing listens on 127.0.0.1:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"e2e: the daemon did not become ready at {url} within {timeout:.0f} s")


def metric(url: str, name: str) -> float | None:
    """One unlabelled sample from the daemon's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def ingress_and_lag(url: str) -> tuple[float, float]:
    """(MQTT deliveries the daemon accepted so far, journal entries it has not applied)."""
    accepted = lag = 0.0
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("stellwerk_ingress_deliveries_total{") and (
                'transport="mqtt"' in line and 'outcome="accepted"' in line
            ):
                accepted = float(line.split()[-1])
            elif line.startswith("stellwerk_journal_lag_entries "):
                lag = float(line.split()[1])
    return accepted, lag


def received_new(url: str) -> float:
    """New contacts the daemon journaled so far (``stellwerk_contacts_received_total``)."""
    total = 0.0
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("stellwerk_contacts_received_total{") and 'kind="new"' in line:
                total += float(line.split()[-1])
    return total


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds the process used so far (Linux /proc), None elsewhere."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain_check(url: str) -> Callable[[], Awaitable[bool]]:
    """Drained: nothing left in the journal to apply and no MQTT delivery since the last look
    (so nothing is waiting in the broker session either)."""
    last: list[float] = [-1.0]

    async def drained() -> bool:
        accepted, lag = await asyncio.to_thread(ingress_and_lag, url)
        quiet = accepted == last[0]
        last[0] = accepted
        return quiet and lag == 0

    return drained


async def one_rate(
    target: Target, rate: float, duration: float, grace: float, drain: float
) -> Report:
    profile = Profile(
        rate=rate,
        duration=duration,
        mix={"phone": 1.0},
        handle_time=0.0,
        think_time=0.0,
        after_call_work=0.0,
        ready_after_wrap_up=False,
        patience=0.0,
        grace=grace,
        drained=drain_check(target.http_url) if drain > 0 else None,
        drain=drain,
        progress=sys.stderr.isatty(),
        max_in_flight=5000,
        # Offers carry the latency; agents start on contact.assigned; the others tell "still
        # queued" from "lost".
        event_types=(
            "contact.queued",
            "contact.assigned",
            "contact.abandoned",
            "contact.rejected",
        ),
    )
    return await LoadGen(target, profile).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="200,500,1000,2000,5000", help="contacts/s, comma list")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--agents", type=int, default=1000, help="phone agents")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds for stragglers")
    parser.add_argument(
        "--drain",
        type=float,
        default=60.0,
        help="after the grace period, up to this many seconds more for the daemon's backlog "
        "to drain before an unseen contact counts as lost (0: count at once)",
    )
    parser.add_argument("--use-running", action="store_true", help="do not start a daemon")
    parser.add_argument(
        "--own-broker",
        action="store_true",
        help="start a Mosquitto of its own with production settings (no 20-message in-flight "
        "window, no 1000-message queue cap, TCP_NODELAY) instead of using 127.0.0.1:1883",
    )
    parser.add_argument("--http-url", default=None, help="with --use-running: its HTTP URL")
    parser.add_argument("--topic-prefix", default=None, help="with --use-running")
    parser.add_argument("--routing", default=None, help="with --use-running: its routing file")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep-log", action="store_true", help="keep the daemon's log file")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        default=None,
        help="run the daemon under cProfile, write the stats to FILE and print the cost per "
        "contact of each stage (decode, journal append and read, engine, publishing, acks)",
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="stellwerk-e2e-"))
    run = uuid.uuid4().hex[:8]
    daemon: subprocess.Popen[bytes] | None = None
    broker: subprocess.Popen[bytes] | None = None
    mqtt_port = 1883
    if args.own_broker:
        mqtt_port = free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(BROKER_CONF.format(port=mqtt_port))
        broker = subprocess.Popen(
            ["mosquitto", "-c", str(conf)],
            stdout=(tmp / "mosquitto.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_port(mqtt_port)
    if args.use_running:
        if not (args.topic_prefix and args.routing and args.http_url):
            parser.error("--use-running needs --topic-prefix, --routing and --http-url")
        from router.cli.loadgen import agent_ids

        prefix, http_url = args.topic_prefix, args.http_url.rstrip("/")
        agents = agent_ids(Path(args.routing))
    else:
        routing = tmp / "routing.yaml"
        routing.write_text(routing_file(args.agents))
        prefix = f"e2e-{run}"
        port = free_port()
        http_url = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ,
            STELLWERK_ROUTING=str(routing),
            STELLWERK_KEY_PREFIX=f"{prefix}:",
            STELLWERK_TOPIC_PREFIX=prefix,
            STELLWERK_HTTP_ADDR=f"127.0.0.1:{port}",
            STELLWERK_SMTP_ADDR="",
            STELLWERK_MQTT_CLIENT_ID=f"{prefix}-daemon",
            STELLWERK_MQTT_URL=f"mqtt://127.0.0.1:{mqtt_port}",
            STELLWERK_LOG_FORMAT="json",
        )
        log_path = tmp / "daemon.log"
        profile = (
            ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
        )
        daemon = subprocess.Popen(
            [sys.executable, *profile, "-m", "router.cli", "run"],
            cwd=ROOT,
            env=env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        agents = [f"e{i:04d}" for i in range(args.agents)]
    results = []
    try:
        wait_ready(http_url)
        target = Target(prefix=prefix, agents=agents, http_url=http_url, mqtt_port=mqtt_port)
        for rate in rates:
            before = received_new(http_url)
            cpu_before = cpu_seconds(daemon.pid if daemon is not None else None)
            report = asyncio.run(one_rate(target, rate, args.duration, args.grace, args.drain))
            lag = metric(http_url, "stellwerk_journal_lag_entries")
            # The daemon's own count: tells a generator that fell behind from a daemon that did.
            journaled = received_new(http_url) - before
            cpu_after = cpu_seconds(daemon.pid if daemon is not None else None)
            cpu_ms = (
                (cpu_after - cpu_before) * 1000 / max(journaled, 1)
                if cpu_after is not None and cpu_before is not None
                else None
            )
            results.append(
                {
                    "rate": rate,
                    **asdict(report),
                    "journal_lag_after": lag,
                    "daemon_journaled_calls": journaled,
                    # The whole run of this rate (sending, grace, drain, wind-down).
                    "daemon_cpu_ms_per_call": cpu_ms,
                }
            )
            if not args.json:
                lat = report.latency_ms
                print(
                    f"rate {rate:>6.0f}/s: sent {report.sent} ({report.contacts_per_second:.0f}/s)"
                    f", offered {report.offered} ({report.offers_per_second:.0f}/s)"
                    f", lost {report.lost}, unconsumed {report.unconsumed}"
                    f", journaled by the daemon {journaled:.0f}"
                    + (f" ({cpu_ms:.2f} ms daemon CPU per call)" if cpu_ms is not None else "")
                    + f", still waiting {report.still_waiting}"
                    + (
                        f", offer latency p50 {lat['p50']:.1f} ms p90 {lat['p90']:.1f} ms"
                        f" p99 {lat['p99']:.1f} ms max {lat['max']:.1f} ms"
                        if lat
                        else ""
                    )
                    + (
                        f" (ingress->queued p50 {report.routing_latency_ms['p50']:.1f} ms"
                        f" p99 {report.routing_latency_ms['p99']:.1f} ms)"
                        if report.routing_latency_ms
                        else ""
                    ),
                    flush=True,
                )
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            if args.keep_log:
                print(f"daemon log: {tmp / 'daemon.log'}", file=sys.stderr)
            _cleanup_redis(prefix)
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    if args.json:
        print(json.dumps(results, indent=2))
    if args.profile and daemon is not None:
        contacts = sum(int(r["sent"]) for r in results)
        print(f"per-stage cost per contact ({contacts} contacts, cProfile):", file=sys.stderr)
        for label, micros, share in stage_costs(Path(args.profile), contacts):
            print(f"  {label:<44} {micros:8.1f} us  {share:6.1%}", file=sys.stderr)
    return 0


# (label, module file suffix, function name): the stages of one contact's way through the daemon.
STAGES = (
    ("decode (ARI JSON -> contact event)", "channels/registry.py", "decode"),
    ("journal append (XADD in MULTI, encode)", "router/daemon/journal.py", "append_many"),
    ("journal read (XREAD, decode entries)", "router/daemon/journal.py", "read_after"),
    ("engine (Engine.handle)", "router/engine.py", "handle"),
    ("commands -> MQTT messages (encode)", "router/daemon/mqtt.py", "command_messages"),
    ("publishing (publish_many, QoS 1 PUBACKs)", "router/daemon/mqtt.py", "publish_many"),
    ("published mark (fenced SET)", "router/daemon/journal.py", "set_published"),
    ("ingress PUBACKs (paho ack)", "router/daemon/mqtt.py", "ack"),
    ("paho socket reads (all connections)", "paho/mqtt/client.py", "loop_read"),
    ("paho socket writes (all connections)", "paho/mqtt/client.py", "loop_write"),
    ("metrics (observe_*)", "router/daemon/metrics.py", "observe_commands"),
    ("decision log lines", "router/daemon/router_loop.py", "_log_command"),
)


def stage_costs(path: Path, contacts: int) -> list[tuple[str, float, float]]:
    """(stage, CPU microseconds per contact, share of the daemon's profiled time) from a
    cProfile dump. Coroutine frames count only while they run, not while they wait."""
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    # Without the time the loop sat in select() waiting for something to do.
    idle = sum(
        v[3] for (file, _, func), v in raw.items() if func == "select" and "selectors" in file
    )
    total = float(stats.total_tt) - idle  # type: ignore[attr-defined]
    out = []
    for label, suffix, name in STAGES:
        cum = sum(
            v[3] for (file, _, func), v in raw.items() if func == name and file.endswith(suffix)
        )
        out.append((label, cum / max(contacts, 1) * 1e6, cum / total if total else 0.0))
    out.append(
        ("all of the daemon's busy time (not in select)", total / max(contacts, 1) * 1e6, 1.0)
    )
    return out


def _cleanup_redis(prefix: str) -> None:
    """Drop the run's keys (journal, snapshot, dead letters, lease) from the shared Redis."""
    import redis

    client = redis.Redis.from_url(os.environ.get("STELLWERK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
