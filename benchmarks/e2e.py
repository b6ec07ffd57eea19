"""End-to-end throughput of the daemon: MQTT ARI ingress -> journal -> routing -> offer delivery.

Starts ``stellwerk run`` as a subprocess against the local Redis and Mosquitto (its own key and
topic prefix, a generated routing file with ``--agents`` phone agents, wrap-up 0), or uses a
running daemon (``--use-running`` with ``--topic-prefix`` and ``--routing``). Then, for each rate
in ``--rates``, it drives the daemon for ``--duration`` seconds with Asterisk StasisStart events
over MQTT; simulated agents accept each offer at once and the caller hangs up at once (so every
contact costs the daemon three journal entries: the call, the accept, the hang-up, and five
MQTT messages out). Per rate it reports contacts/s sent and offered, ingress->offer latency
percentiles (send time to the offer arriving at the agent, matched by contact id), the contacts
``lost`` (accepted by the broker, never seen by the router although its backlog drained) and
``unconsumed`` (never seen, but the daemon still had a backlog when ``--drain`` ran out). The
``--json`` output has, per rate, ``rate``, the offered rate (``contacts_per_second``), the
latency percentiles in ms, ``lost`` and ``unconsumed``.

    .venv/bin/python benchmarks/e2e.py                       # 200,500,1000,2000,5000 /s, 10 s each
    .venv/bin/python benchmarks/e2e.py --rates 1000 --duration 30 --json
    .venv/bin/python benchmarks/e2e.py --own-broker --generator-procs 3 --rates 1000,3000 --json

``--generator-procs N`` runs the bridge and the agents in N processes of their own
(``benchmarks/e2e_gen.py``) instead of the in-process loadgen, and adds per rate the CPU per
call of the daemon, the broker, Redis and the generator, how busy the daemon was while the
calls were sent, where a backlog built up (broker or journal) and the load average.
``--py-spy FILE`` samples the daemon and prints each stage's share of its busy time.

The target is 3,000 contacts/s sustained with zero loss and p99 ingress->offer < 50 ms at
2,000/s; the figures measured on the 2-core development box are in docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
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


Urls = str | Sequence[str]
"""The daemon's HTTP base URL, or (``--split``) those of its ingest and router processes: a
figure is the sum over their /metrics pages (each counts what its own process did)."""


def metric_lines(urls: Urls) -> Iterator[str]:
    """The lines of every /metrics page of the daemon's processes."""
    for url in [urls] if isinstance(urls, str) else urls:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            yield from resp.read().decode().splitlines()


def metric(urls: Urls, name: str) -> float | None:
    """One unlabelled sample from the daemon's /metrics (summed over its processes)."""
    values = [float(line.split()[1]) for line in metric_lines(urls) if line.startswith(name + " ")]
    return sum(values) if values else None


def ingress_and_lag(urls: Urls) -> tuple[float, float]:
    """(MQTT deliveries the daemon accepted so far, journal entries it has not applied)."""
    accepted = lag = 0.0
    for line in metric_lines(urls):
        if line.startswith("stellwerk_ingress_deliveries_total{") and (
            'transport="mqtt"' in line and 'outcome="accepted"' in line
        ):
            accepted += float(line.split()[-1])
        elif line.startswith("stellwerk_journal_lag_entries "):
            lag += float(line.split()[1])
    return accepted, lag


def received_new(urls: Urls) -> float:
    """New contacts the daemon journaled so far (``stellwerk_contacts_received_total``)."""
    return received_and_lag(urls)[0]


def received_and_lag(urls: Urls) -> tuple[float, float]:
    """(new contacts journaled so far, journal entries not applied yet): one /metrics page
    per process."""
    received = lag = 0.0
    for line in metric_lines(urls):
        if line.startswith("stellwerk_contacts_received_total{") and 'kind="new"' in line:
            received += float(line.split()[-1])
        elif line.startswith("stellwerk_journal_lag_entries "):
            lag += float(line.split()[1])
    return received, lag


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds the process used so far (Linux /proc), None elsewhere."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain_check(url: Urls) -> Callable[[], Awaitable[bool]]:
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
    target: Target, rate: float, duration: float, grace: float, drain: float, urls: Urls
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
        drained=drain_check(urls) if drain > 0 else None,
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


def metric_sum(urls: Urls, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) on the daemon's /metrics."""
    total = 0.0
    for line in metric_lines(urls):
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
    return total


def loadavg() -> str:
    """The machine's load average (1, 5, 15 min), to print beside every figure."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def redis_pid() -> int | None:
    """The local Redis server's pid (INFO server), for its CPU share; None if unknown."""
    import redis

    client = redis.Redis.from_url(os.environ.get("STELLWERK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None
    finally:
        client.close()


class Worker:
    """One ``benchmarks/e2e_gen.py`` process: request/response over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.cpu = 0.0  # its CPU seconds at the last report

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"e2e: generator process {self.proc.pid} ended")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.read()


async def start_workers(
    procs: int, agents: list[str], prefix: str, mqtt_port: int, run: str
) -> list[Worker]:
    """``procs`` generator processes, each simulating every ``procs``-th agent; ready when
    their agents' logins are PUBACKed."""
    workers = []
    for k in range(procs):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "benchmarks" / "e2e_gen.py"),
            "--port",
            str(mqtt_port),
            "--prefix",
            prefix,
            "--run",
            run,
            "--index",
            str(k),
            "--agents",
            ",".join(agents[k::procs]),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # a report line holds every offered contact id
        )
        workers.append(Worker(proc))
    for worker in workers:
        ready = await worker.read()  # {"ready": true, "cpu_seconds": its start-up's}
        worker.cpu = float(ready.get("cpu_seconds", 0.0))
    return workers


async def procs_rate(
    workers: list[Worker],
    phase: int,
    rate: float,
    duration: float,
    grace: float,
    drain: float,
    url: Urls,
    pids: dict[str, int | None],
    run: str,
) -> dict[str, Any]:
    """One rate with the generator in its own processes; the result row of ``--json``."""
    from router.cli.loadgen import percentiles

    load_before = loadavg()
    journaled_before = received_new(url)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    share = rate / len(workers)
    send = {"op": "send", "phase": phase, "rate": share, "duration": duration}
    # Where a backlog builds while sending: in the broker (sent, not journaled yet) or in the
    # journal (journaled, not routed yet).
    backlog = {"broker": 0.0, "journal": 0.0}

    async def watch_backlog() -> None:
        while True:
            await asyncio.sleep(0.5)
            journaled, lag = await asyncio.to_thread(received_and_lag, url)
            due = min(rate * (time.monotonic() - started), rate * duration)
            backlog["broker"] = max(backlog["broker"], due - (journaled - journaled_before))
            backlog["journal"] = max(backlog["journal"], lag)

    watcher = asyncio.create_task(watch_backlog())
    try:
        sends = await asyncio.gather(*(w.ask(send) for w in workers))
    finally:
        watcher.cancel()
    send_seconds = max(s["send_seconds"] for s in sends)
    cpu_sending = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall_sending = time.monotonic() - started
    sent = sum(int(s["sent"]) for s in sends)
    acked = sum(int(s["acked"]) for s in sends)

    async def offered() -> int:
        counts = await asyncio.gather(*(w.ask({"op": "count", "phase": phase}) for w in workers))
        return sum(int(c["offered"]) for c in counts)

    deadline = time.monotonic() + grace
    while await offered() < acked and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    drained: bool | None = None
    if await offered() < acked and drain > 0:
        check = drain_check(url)
        deadline = time.monotonic() + drain
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline and await offered() < acked:
            quiet = quiet + 1 if await check() else 0
            await asyncio.sleep(0.5)
        drained = quiet >= 2 or await offered() >= acked
    settled = time.monotonic() - started
    reports = await asyncio.gather(*(w.ask({"op": "report", "phase": phase}) for w in workers))
    first: dict[str, float] = {}
    for rep in reports:
        for cid, ms in rep["offered"].items():
            first[cid] = min(ms, first.get(cid, ms))
    # Lost or unconsumed: PUBACKed by the broker, never offered (by id, not by count).
    seen = {cid.rpartition(".")[0] for cid in first}
    unacked = {u for rep in reports for u in rep["unacked"]}
    missing = 0
    for k, s in enumerate(sends):
        for n in range(int(s["sent"])):
            stem = f"g{run}.{phase}.{k}.{n}"
            if stem not in unacked and f"asterisk-ari:{stem}" not in seen:
                missing += 1
    cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    journaled = received_new(url) - journaled_before

    def per_call(name: str) -> float | None:
        a, b = cpu_after.get(name), cpu_before.get(name)
        return None if a is None or b is None else round((a - b) * 1000 / max(journaled, 1), 3)

    def busy(name: str) -> float | None:
        a, b = cpu_sending.get(name), cpu_before.get(name)
        return None if a is None or b is None else round((a - b) / wall_sending, 3)

    gen_cpu = 0.0
    for worker, rep in zip(workers, reports, strict=True):
        gen_cpu += float(rep["cpu_seconds"]) - worker.cpu
        worker.cpu = float(rep["cpu_seconds"])
    # With --split the daemon is two processes: each one's share, and their sum as the daemon's.
    split = {}
    if "ingest" in pids:
        for part in ("ingest", "router"):
            split[f"{part}_cpu_ms_per_call"] = per_call(part)
            split[f"{part}_cpu_busy_while_sending"] = busy(part)
        parts = [per_call("ingest"), per_call("router")]
        daemon_ms = None if None in parts else round(sum(p or 0.0 for p in parts), 3)
        parts = [busy("ingest"), busy("router")]
        daemon_busy = None if None in parts else round(sum(p or 0.0 for p in parts), 3)
    else:
        daemon_ms, daemon_busy = per_call("daemon"), busy("daemon")
    return {
        "rate": rate,
        "generator_procs": len(workers),
        "sent": sent,
        "accepted": acked,
        "offered": len(first),
        "contacts_per_second": sent / send_seconds if send_seconds else 0.0,
        "offers_per_second": len(first) / max(settled, duration),
        "latency_ms": percentiles(list(first.values())),
        "lost": missing if drained is not False else 0,
        "unconsumed": missing if drained is False else 0,
        "drained": drained,
        "daemon_journaled_calls": journaled,
        "max_calls_waiting_in_broker": round(backlog["broker"]),
        "max_journal_lag_entries": round(backlog["journal"]),
        "daemon_cpu_ms_per_call": daemon_ms,
        "daemon_cpu_busy_while_sending": daemon_busy,
        **split,
        "broker_cpu_ms_per_call": per_call("broker"),
        "redis_cpu_ms_per_call": per_call("redis"),
        "generator_cpu_ms_per_call": round(gen_cpu * 1000 / max(sent, 1), 3),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


async def run_procs(
    args: argparse.Namespace,
    rates: list[float],
    target: Target,
    run: str,
    pids: dict[str, int | None],
    urls: Urls,
) -> list[dict[str, Any]]:
    """Every rate with the generator in ``--generator-procs`` processes of its own."""
    workers = await start_workers(
        args.generator_procs, target.agents, target.prefix, target.mqtt_port, run
    )
    results = []
    try:
        # The logins are PUBACKed; wait until the daemon applied them too.
        check = drain_check(urls)
        while not (await check() and await check()):
            await asyncio.sleep(0.2)
        for phase, rate in enumerate(rates):
            row = await procs_rate(
                workers,
                phase,
                rate,
                args.duration,
                args.grace,
                args.drain,
                urls,
                pids,
                run,
            )
            results.append(row)
            if not args.json:
                print_procs_row(row)
    finally:
        for worker in workers:
            with contextlib.suppress(SystemExit, OSError):
                await asyncio.wait_for(worker.ask({"op": "quit"}), 15)
            if worker.proc.returncode is None:
                worker.proc.kill()
            await worker.proc.wait()
    return results


def print_procs_row(row: dict[str, Any]) -> None:
    """One human-readable line per rate (``--generator-procs``)."""
    lat = row["latency_ms"]
    print(
        f"rate {row['rate']:>6.0f}/s: sent {row['sent']} ({row['contacts_per_second']:.0f}/s)"
        f", offered {row['offered']} ({row['offers_per_second']:.0f}/s)"
        f", lost {row['lost']}, unconsumed {row['unconsumed']}"
        + (
            f", offer latency p50 {lat['p50']:.1f} p90 {lat['p90']:.1f} p99 {lat['p99']:.1f}"
            f" max {lat['max']:.1f} ms"
            if lat
            else ""
        )
        + f"; most waiting: broker {row['max_calls_waiting_in_broker']} calls"
        f", journal {row['max_journal_lag_entries']} entries"
        + f"; CPU ms per call: daemon {row['daemon_cpu_ms_per_call']}"
        f" (busy {row['daemon_cpu_busy_while_sending']} cores while sending)"
        + (
            f" = ingest {row['ingest_cpu_ms_per_call']} + router {row['router_cpu_ms_per_call']}"
            if "ingest_cpu_ms_per_call" in row
            else ""
        )
        + f", broker {row['broker_cpu_ms_per_call']}, redis {row['redis_cpu_ms_per_call']}"
        f", generator {row['generator_cpu_ms_per_call']}"
        f"; load {row['loadavg_before']} -> {row['loadavg_after']}",
        flush=True,
    )


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
        "--generator-procs",
        type=int,
        default=0,
        metavar="N",
        help="run the telephony bridge and the agents in N processes of their own "
        "(benchmarks/e2e_gen.py) instead of the one-process loadgen, and report the CPU per "
        "call of the daemon, the broker, Redis and the generator (0: the in-process loadgen)",
    )
    parser.add_argument(
        "--own-broker",
        action="store_true",
        help="start a Mosquitto of its own with production settings (no 20-message in-flight "
        "window, no 1000-message queue cap, TCP_NODELAY) instead of using 127.0.0.1:1883",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="run the daemon as two processes, `stellwerk run --role ingest` and `--role "
        "router`, and report (with --generator-procs) the CPU per call of each",
    )
    parser.add_argument("--http-url", default=None, help="with --use-running: its HTTP URL")
    parser.add_argument("--topic-prefix", default=None, help="with --use-running")
    parser.add_argument("--routing", default=None, help="with --use-running: its routing file")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep-log", action="store_true", help="keep the daemon's log file")
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        default=None,
        help="sample the daemon with py-spy (raw collapsed stacks into FILE) and print each "
        "stage's share of its busy samples and, with --generator-procs, its CPU per call",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        default=None,
        help="run the daemon under cProfile, write the stats to FILE and print the cost per "
        "contact of each stage (decode, journal append and read, engine, publishing, acks)",
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if args.split and (args.use_running or args.py_spy or args.profile):
        parser.error(
            "--split starts its own two processes: not with --use-running, --py-spy, --profile"
        )

    tmp = Path(tempfile.mkdtemp(prefix="stellwerk-e2e-"))
    run = uuid.uuid4().hex[:8]
    daemon: subprocess.Popen[bytes] | None = None
    # With --split: ``daemon`` is the ingest process, this the router process.
    router_proc: subprocess.Popen[bytes] | None = None
    router_url: str | None = None
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
        if args.split:
            router_port = free_port()
            router_url = f"http://127.0.0.1:{router_port}"
            router_proc = subprocess.Popen(
                [sys.executable, "-m", "router.cli", "run", "--role", "router"],
                cwd=ROOT,
                env=dict(env, STELLWERK_HTTP_ADDR=f"127.0.0.1:{router_port}"),
                stdout=(tmp / "daemon-router.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            env["STELLWERK_ROLE"] = "ingest"
        log_path = tmp / "daemon.log"
        profile = (
            ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
        )
        spy = (
            [
                *(str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw"),
                *(
                    "--rate",
                    "200",
                    "--nonblocking",
                    "--output",
                    str(Path(args.py_spy).resolve()),
                    "--",
                ),
            ]
            if args.py_spy
            else []
        )
        daemon = subprocess.Popen(
            [*spy, sys.executable, *profile, "-m", "router.cli", "run"],
            cwd=ROOT,
            env=env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        agents = [f"e{i:04d}" for i in range(args.agents)]
    results = []
    # Metrics come from every process of the daemon; webhooks go to the ingest one.
    urls: Urls = [http_url, router_url] if router_url is not None else http_url
    procs = [p.pid for p in (daemon, router_proc) if p is not None]

    def daemon_cpu() -> float | None:
        seconds = [cpu_seconds(pid) for pid in procs]
        return None if not seconds or None in seconds else sum(x or 0.0 for x in seconds)

    try:
        for url in [urls] if isinstance(urls, str) else urls:
            wait_ready(url)
        target = Target(prefix=prefix, agents=agents, http_url=http_url, mqtt_port=mqtt_port)
        if args.generator_procs > 0:
            pids = {
                "broker": broker.pid if broker is not None else None,
                "redis": redis_pid(),
            }
            if router_proc is not None and daemon is not None:
                pids.update(ingest=daemon.pid, router=router_proc.pid)
            else:
                pids["daemon"] = daemon_pid(daemon, spied=bool(args.py_spy))
            results = asyncio.run(run_procs(args, rates, target, run, pids, urls))
            rates = []
        for rate in rates:
            before = received_new(urls)
            cpu_before = daemon_cpu()
            report = asyncio.run(
                one_rate(target, rate, args.duration, args.grace, args.drain, urls)
            )
            lag = metric(urls, "stellwerk_journal_lag_entries")
            # The daemon's own count: tells a generator that fell behind from a daemon that did.
            journaled = received_new(urls) - before
            cpu_after = daemon_cpu()
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
            # Under py-spy the daemon is its child; py-spy writes its file when that exits.
            real = daemon_pid(daemon, spied=bool(args.py_spy)) if args.py_spy else None
            if real is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(real, signal.SIGTERM)
            else:
                daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            if router_proc is not None:
                router_proc.send_signal(signal.SIGTERM)
                try:
                    router_proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    router_proc.kill()
                    router_proc.wait()
            if args.keep_log:
                print(f"daemon log: {tmp / 'daemon.log'}", file=sys.stderr)
                if router_proc is not None:
                    print(f"router log: {tmp / 'daemon-router.log'}", file=sys.stderr)
            _cleanup_redis(prefix)
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    if args.json:
        print(json.dumps(results, indent=2))
    if args.py_spy and daemon is not None:
        cpu = [r.get("daemon_cpu_ms_per_call") for r in results]
        per_call = cpu[0] if len(cpu) == 1 else None
        print(f"per-stage share of the daemon's busy samples (py-spy, {args.py_spy}):")
        for label, share in spy_shares(Path(args.py_spy)):
            micros = f" {share * per_call * 1000:8.0f} us/call" if per_call else ""
            print(f"  {label:<52} {share:6.1%}{micros}")
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
    ("decision log lines", "router/daemon/router_loop.py", "_log_commands"),
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


# (label, frames that make it: (qualified-name suffix, file suffix), ...) for py-spy samples.
SPY_STAGES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("MQTT ingress: take messages, split the batch", (("_consume", "router/daemon/mqtt.py"),)),
    ("  decode (ARI JSON -> contact event)", (("decode", "channels/registry.py"),)),
    ("  journal append (encode, XADD in MULTI)", (("append_many", "router/daemon/journal.py"),)),
    ("  ingress PUBACKs (paho ack)", (("ack", "router/daemon/mqtt.py"),)),
    ("router loop (read, engine, publish, mark)", (("_route", "router/daemon/router_loop.py"),)),
    ("  journal read (XREAD, decode entries)", (("read_after", "router/daemon/journal.py"),)),
    ("  engine (Engine.handle)", (("handle", "router/engine.py"),)),
    ("  commands -> MQTT messages (encode)", (("command_messages", "router/daemon/mqtt.py"),)),
    ("  publishing offers and events (QoS 1)", (("publish_many", "router/daemon/mqtt.py"),)),
    ("  published mark (fenced SET)", (("set_published", "router/daemon/journal.py"),)),
    (
        "  metrics (observe_*, refresh)",
        (("observe_", "router/daemon/metrics.py"), ("refresh", "router/daemon/metrics.py")),
    ),
    ("  decision log lines", (("_log_commands", "router/daemon/router_loop.py"),)),
    (
        "  command sinks (desk feed)",
        (("submit", "router/daemon/desk.py"), ("submit", "router/daemon/wall.py")),
    ),
    ("paho socket reads, all connections (packets in)", (("loop_read", "paho/mqtt/client.py"),)),
    ("paho socket writes, all connections (packets out)", (("loop_write", "paho/mqtt/client.py"),)),
    ("redis-py replies (all connections)", (("read_response", "redis/"),)),
    ("/metrics scrapes (this benchmark's polls)", (("metrics_page", "router/daemon/http.py"),)),
)


def spy_shares(path: Path) -> list[tuple[str, float]]:
    """Each stage's share of the daemon's busy samples: its event loop's, not waiting in
    ``select`` (start-up before the loop, such as imports and the routing file, is left out)."""
    total = 0
    counts = dict.fromkeys((label for label, _ in SPY_STAGES), 0)
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(("EpollSelector.select (", "select (")) or not any(
            f.startswith("Runner.run (") for f in frames
        ):
            continue  # idle in select, or not the event loop (start-up imports, idle threads)
        total += int(n)
        names = [f.partition(" (") for f in frames]
        for label, matchers in SPY_STAGES:
            if any(
                _frame_is(qual.rpartition(".")[2], where, name, suffix)
                for qual, _, where in names
                for name, suffix in matchers
            ):
                counts[label] += int(n)
    out = [(label, counts[label] / total if total else 0.0) for label, _ in SPY_STAGES]
    out.append((f"all busy samples ({total})", 1.0))
    return out


def _frame_is(func: str, where: str, name: str, suffix: str) -> bool:
    # A name ending in "_" is a prefix (observe_*); the file is a path fragment.
    named = func.startswith(name) if name.endswith("_") else func == name
    return named and suffix in where


def daemon_pid(daemon: subprocess.Popen[bytes] | None, *, spied: bool) -> int | None:
    """The daemon's pid; under py-spy, that of py-spy's child (py-spy's own CPU aside)."""
    if daemon is None:
        return None
    if not spied:
        return daemon.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children")
        with contextlib.suppress(OSError):
            pids = children.read_text().split()
            if pids:
                return int(pids[0])
        time.sleep(0.1)
    return None


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
