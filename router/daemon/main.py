"""``stellwerk run``: the routing daemon (docs/architecture.md, docs/daemon.md).

One asyncio process, one supervising TaskGroup in which every long-running task runs under a
name, started and stopped in the order documented in docs/daemon.md ("Supervision"):
mqtt-publisher, lease, router, ingest-lease, redis-watch, sighup-reload, desk, outbound,
telephony-<system>, mqtt-agents and mqtt-ingress (the agent-command and the contact session; in
leader mode both follow the ingest lease), http, smtp. ``--role`` (``Settings.role``) picks which
of them run: ``all`` every one (ingest-lease in leader mode, held only while routing);
``ingest`` mqtt-publisher (refusals only), ingest-lease (leader mode), redis-watch,
mqtt-agents, mqtt-ingress, http (webhooks and monitoring), smtp; ``router`` everything else,
with no MQTT ingress, webhooks or SMTP. Signal handlers only set flags.
SIGTERM/SIGINT: stop intake (MQTT, HTTP, SMTP), let the router apply, publish and snapshot what
is in the journal, release the lease (bounded by a timeout), cancel the rest, close
connections; a second SIGINT exits at once (130). SIGHUP reloads the routing file (a file that
fails validation is refused with its problems; the running rules stay).

Exit codes: 0 after a graceful shutdown, 1 when the routing file does not validate at start,
2 for bad settings, 130 after a second SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from router.daemon import openapi
from router.daemon.auth import Authenticator, add_routes
from router.daemon.config import LoadedSettings, LogSettings, Settings, SettingsError, load_settings
from router.daemon.desk import DeskService
from router.daemon.forward import ForwardAnswers, ForwardTokens, MailForward
from router.daemon.http import AppState, make_app, server_tls, start_http
from router.daemon.intake import Intake
from router.daemon.journal import Journal, connect_redis
from router.daemon.lease import Lease, LeaseKeeper
from router.daemon.metrics import Metrics
from router.daemon.mqtt import Ingress, Publisher
from router.daemon.outbox import OutboundMetrics, Outbox
from router.daemon.platforms import destinations
from router.daemon.replies import OUTBOUND, ConversationFacts, Outbound
from router.daemon.router_loop import Router, RouterOptions
from router.daemon.sinks import CommandSink
from router.daemon.smtp import start_smtp
from router.daemon.telephony import build_connectors
from router.daemon.telephony.connector import TelephonyConnector
from router.daemon.transcripts import TranscriptStore
from rules.load import load_routing_or_problems
from rules.table import RoutingTable

log = structlog.get_logger("stellwerk.daemon")

DEFAULT_CONFIG = "config/stellwerk.yaml"
SHUTDOWN_TIMEOUT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` sub-command's options."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("STELLWERK_CONFIG"),
        help="settings file (default: $STELLWERK_CONFIG, else config/stellwerk.yaml when it "
        "exists, else built-in defaults); STELLWERK_* variables override it",
    )
    parser.add_argument(
        "--role",
        choices=("all", "ingest", "router"),
        default=None,
        help="what this process does (default: the role setting, all): all = ingest and "
        "route; ingest = MQTT ingress, webhooks, SMTP into the journal; router = routing, "
        "offers, desk, read and admin API (docs/daemon.md, Roles)",
    )
    parser.add_argument(
        "--http-addr",
        metavar="HOST:PORT",
        default=None,
        help="listen here for HTTP instead of http.addr ('' = no HTTP); two roles on one host "
        "need two addresses",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the settings and the routing file, print the effective settings, exit",
    )


def configure_logging(settings: LogSettings) -> None:
    """Configure structlog once: JSON lines (production) or a readable console format."""
    level = getattr(logging, settings.level.upper())
    renderer: Any = (
        # msgspec encodes a log line several times faster than json.dumps.
        structlog.processors.JSONRenderer(serializer=_json_line)
        if settings.format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if settings.format == "json":
        # Without locals: a frame's variables may hold secrets (tokens, passwords).
        processors.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (paho, aiohttp, aiosmtpd) log through the standard library; keep their warnings.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr)


_LOG_ENCODER = msgspec.json.Encoder(enc_hook=str)


def _json_line(obj: Any, **_: Any) -> str:
    return _LOG_ENCODER.encode(obj).decode()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``stellwerk run``."""
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    # The flags win over the settings file and the environment: applied as the variables they
    # stand for, so they are validated like them.
    env = dict(os.environ)
    flags = {"STELLWERK_ROLE": ("--role", args.role)}
    flags["STELLWERK_HTTP_ADDR"] = ("--http-addr", args.http_addr)
    for variable, (_, value) in flags.items():
        if value is not None:
            env[variable] = value
    try:
        loaded = load_settings(path, env=env)
        unfit = role_problems(loaded.settings)
        if unfit:
            raise SettingsError(unfit)
    except SettingsError as exc:
        for problem in exc.problems:
            for variable, (flag, value) in flags.items():
                if value is not None and problem.startswith(f"{variable}:"):
                    problem = flag + problem[len(variable) :]  # name what the user typed
            print(f"stellwerk run: {problem}", file=sys.stderr)
        return 2
    settings = loaded.settings
    try:
        Authenticator(settings)  # a broken tokens file is bad settings: refuse to start
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"stellwerk run: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log)
    table, problems = load_routing_or_problems(settings.routing)
    if table is None:
        for routing_problem in problems:
            print(f"stellwerk run: {routing_problem}", file=sys.stderr)
        return 1
    if args.check_config:
        print(msgspec.json.format(msgspec.json.encode(settings.redacted())).decode())
        return 0
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings)) as runner:
            try:
                runner.run(Daemon(loaded, table).run())
            finally:
                # What comes after the daemon's own bounded shutdown (the runner cancelling
                # leftover tasks and joining executor threads, the interpreter's exit) is
                # bounded too: a hang there would outlive a supervisor's stop timeout unseen.
                # Past the grace every thread's stack goes to stderr and the process exits 1.
                faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return 130
    except Exception:
        # A bug, not bad input (that never gets this far): log it as one JSON line, exit 1.
        log.exception("daemon.crashed")
        return 1
    return 0


#: Seconds the process may take to exit once the daemon has stopped (see :func:`run`).
EXIT_GRACE_S = 5.0


def role_problems(settings: Settings) -> list[str]:
    """What the settings ask of a role that it does not run (empty when they fit)."""
    mail = settings.outbound.mail
    if settings.role != "all" and mail is not None and mail.forward is not None:
        # The answers arrive by SMTP (ingest) and go to the outbox with the engine's view of
        # who holds the contact (router): one process has to do both.
        return [
            f"role: {settings.role}: outbound.mail.forward needs role all (forwarded answers "
            "come in by SMTP and are checked against the router's contacts)"
        ]
    return []


def _loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop unless the settings ask for the standard one."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


class Daemon:
    """Everything ``stellwerk run`` starts, wired together."""

    def __init__(
        self, loaded: LoadedSettings, table: RoutingTable, *, handle_signals: bool = True
    ) -> None:
        self.loaded = loaded
        self.settings: Settings = loaded.settings
        self.table = table
        self.handle_signals = handle_signals
        self.stopping = asyncio.Event()
        self.reload_requested = asyncio.Event()
        # Set by run(); tests and tools look at them.
        self.state = AppState()
        self.metrics = Metrics()
        self.metrics.prime(table)
        self.router: Router | None = None
        # I/O-edge actors besides MQTT that carry out the engine's commands (telephony
        # connectors, the desk's live feed); see router.daemon.sinks.
        self.sinks: list[CommandSink] = []
        # One per configured telephony system (set by run(); also in ``sinks``).
        self.telephony: list[TelephonyConnector] = []
        # Replies and platform actions (router.daemon.replies), when a platform is configured;
        # the desk registers on ``outbound.watchers`` for the status of its agents' messages.
        self.outbound: Outbound | None = None
        # Forward mode's side of the SMTP listener (router.daemon.forward), when it is on.
        self._forward: ForwardAnswers | None = None
        # The HTTP app as served, every module's routes included (None without a listener).
        self.app: web.Application | None = None

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then shut down gracefully."""
        s = self.settings
        # Every log line of this daemon names it (several may log into one place).
        structlog.contextvars.bind_contextvars(node=s.node_id())
        log.info(
            "daemon.starting",
            config=str(self.loaded.path) if self.loaded.path else None,
            env_overrides=list(self.loaded.env_overrides),
            routing=s.routing,
            node=s.node_id(),
            topic_prefix=s.topic_prefix,
            key_prefix=s.key_prefix,
            role=s.role,
            pid=os.getpid(),
        )
        for name in self.loaded.unknown_env:
            log.warning("config.unknown_env", name=name)
        for source in s.sources.unsigned:
            # Explicitly allowed, but anyone who can reach the port can inject such contacts.
            log.warning("webhook.unsigned_source", source=source)
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
            # Only a process that routes has rules to reload; an ingest node says so instead
            # of ignoring the signal silently.
            on_hup = self.reload_requested.set if s.role != "ingest" else self._hup_ignored
            loop.add_signal_handler(signal.SIGHUP, on_hup)

        redis = connect_redis(s.redis.url)
        metrics = self.metrics
        state = self.state
        role = s.role
        ingests = role in ("all", "ingest")
        routes = role in ("all", "router")
        state.role = role
        journal = Journal(redis, s.key_prefix)
        intake = Intake(journal, s.decode_config(), metrics=metrics)
        # The agent desktop and the wallboard: transcripts at intake, live feeds as sinks. Its
        # own Redis connections: its writes never queue behind, or take a connection from, the
        # router's journal and published-mark writes.
        desk_redis = connect_redis(s.redis.url)
        desk: DeskService | None = None
        if routes:
            desk = DeskService(s, intake, desk_redis, metrics, state)
            state.desk = desk
            self.sinks.extend(desk.sinks)
        else:
            # No desk here, but the router's desk reads the transcripts kept at intake.
            intake.observers.append(TranscriptStore(desk_redis, s.key_prefix, s.desk).record)

        leader = s.mqtt.ingress == "leader"
        if routes:
            # Before the router is built: it takes its sinks when it is made.
            self.telephony = build_connectors(
                s, intake, self.table, leading=lambda: state.lease_held
            )
            self.sinks.extend(self.telephony)

        def mqtt_status(_: bool) -> None:
            consuming = all(i.connected for i in ingresses)
            if leader and not follows.held:
                # Not consuming here, and not expected to: a standby (its publisher is what
                # matters). A routing all node is expected to, unless another daemon holds the
                # ingest lease; until it knows that (the first poll of its tenure) it does not
                # claim MQTT ingress.
                consuming = ingest_lease is None or not keeper.held or ingest_lease.elsewhere
            state.mqtt_ok = publisher.connected and consuming
            metrics.set_status(redis=state.redis_ok, mqtt=state.mqtt_ok, lease=state.lease_held)

        # In the ingest role the publisher sends only refusals of agent commands.
        publisher = Publisher(s, on_status=mqtt_status)
        # Two persistent sessions: contacts, and agents' commands (which must not queue in
        # the broker behind a backlog of contacts; router.daemon.mqtt). None without ingest.
        ingresses: tuple[Ingress, ...] = ()
        if ingests:
            ingresses = (
                Ingress(
                    s, intake, publisher, kind="agents", metrics=metrics, on_status=mqtt_status
                ),
                Ingress(s, intake, publisher, metrics=metrics, on_status=mqtt_status),
            )
        lease = Lease(redis, journal.keys.lease, s.node_id(), s.router.lease_ttl)
        keeper = LeaseKeeper(lease)
        # What the leader-mode ingress follows: the ingest lease, one for every daemon that
        # consumes the installation's two sessions, of role ingest or all, so exactly one of
        # them connects them (the broker throws out a second connection under a client id).
        # Role all competes for it only while it routes, and gives it up with the routing
        # lease: alone it consumes while it routes, as ever; beside an ingest node that holds
        # the ingest lease it routes without consuming. In shared mode every ingest node
        # consumes: no lease (follows is then only the routing keeper, for the status).
        follows = keeper
        # Role all in leader mode: the ingest lease held only within routing tenures.
        ingest_lease: Lease | None = None
        if ingests and leader:
            lease_of_ingest = Lease(
                redis,
                journal.keys.lease + ":ingest",
                s.node_id(),
                s.router.lease_ttl,
                name="ingest",
            )
            follows = LeaseKeeper(lease_of_ingest, within=keeper if routes else None)
            if routes:
                ingest_lease = lease_of_ingest
                ingest_lease.on_elsewhere = mqtt_status
        else:
            state.ingest_lease_held = None  # nothing to hold: in shared mode, or role router

        def lease_changed(held: bool) -> None:
            state.lease_held = held
            mqtt_status(held)

        def follow_changed(held: bool) -> None:
            if follows is not keeper:
                state.ingest_lease_held = held
            if not held and leader:
                for each in ingresses:  # the leader-mode ingress follows its lease
                    each.stop()  # (_ingress_follows)
            mqtt_status(held)

        if routes:
            keeper.on_change(lease_changed)
        follows.on_change(follow_changed)
        outbound_metrics = OutboundMetrics(metrics.registry)
        session = aiohttp.ClientSession()
        # Replies and platform actions go out where the engine runs.
        platforms = destinations(s.outbound, session) if routes else {}
        outbound: Outbound | None = None
        if platforms and desk is not None:

            async def notify(record: dict[str, Any]) -> None:
                # The agent's desk hears how its message fares: in-process watchers (the web
                # desk), and MQTT desktops on the agent's own topic (the one its broker account
                # may read), as a message of type "outbound".
                if outbound is not None:
                    await outbound.notify(record)
                if record.get("agent_id"):
                    topic = f"{s.topic_prefix}/agents/{record['agent_id']}/offers"
                    body = msgspec.json.encode({"type": "outbound", **record})
                    await publisher.publish_many([(topic, body)])

            outbox = Outbox(
                redis,
                s.key_prefix,
                destinations=platforms,
                metrics=outbound_metrics,
                node_id=s.node_id(),
                lease_ttl=s.router.lease_ttl,
                on_status=notify,
            )
            outbound = Outbound(outbox, ConversationFacts(journal), s.outbound)
            self.sinks.append(outbound.sink)
            desk.attach(outbound)
            mail = s.outbound.mail
            if mail is not None and mail.forward is not None:
                tokens = ForwardTokens(redis, s.key_prefix, mail)
                self.sinks.append(
                    MailForward(outbox, outbound.facts, desk.transcripts, tokens, mail)
                )
                self._forward = ForwardAnswers(tokens, outbound, state, s.decode_config())
        self.outbound = outbound
        router: Router | None = None
        if routes:
            router = Router(
                RouterOptions(
                    topic_prefix=s.topic_prefix,
                    routing_path=s.routing,
                    batch=s.router.batch,
                    snapshot_every=s.router.snapshot_every,
                    snapshot_interval=s.router.snapshot_interval,
                    snapshot_chunk_bytes=s.router.snapshot_chunk_bytes,
                    snapshot_delta_records=s.router.snapshot_delta_records,
                    snapshot_full_every=s.router.snapshot_full_every,
                    journal_retention=s.router.journal_retention,
                    compact_redis_url=s.redis.url,
                ),
                journal,
                lease,
                publisher,
                self.table,
                metrics=metrics,
                state=state,
                sinks=self.sinks,
            )
        self.router = router
        app: web.Application | None = None
        if s.http.addr:
            app = make_app(intake, state, s, metrics, Authenticator(s, metrics=metrics), role=role)
            if routes:
                for connector in self.telephony:
                    # They check their callers themselves: Twilio's request signature,
                    # the credentials of Asterisk's outbound WebSocket.
                    add_routes(app, [(r, "signed") for r in connector.http_routes()])
                    openapi.document_paths(app, dict(connector.openapi_paths()))
            if outbound is not None:
                app[OUTBOUND] = outbound
        self.app = app
        # One stop event per stage of the shutdown (see docs/daemon.md, "Supervision").
        intake_stop = asyncio.Event()
        router_stop = asyncio.Event()
        lease_stop = asyncio.Event()
        outbound_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                # Start order: what others wait for first (publisher, lease), intake last.
                # A role starts only its own tasks (docs/daemon.md, "Roles").
                task = tg.create_task
                tasks: list[asyncio.Task[Any]] = []

                def start(coro: Any, name: str) -> asyncio.Task[Any]:
                    t = task(coro, name=name)
                    tasks.append(t)
                    return t

                start(publisher.run(), "mqtt-publisher")
                lease_task = router_task = outbound_task = ingest_lease_task = None
                if routes and router is not None:
                    lease_task = start(keeper.run(lease_stop), "lease")
                    router_task = start(router.run(router_stop, keeper), "router")
                if follows is not keeper:
                    ingest_lease_task = start(follows.run(lease_stop), "ingest-lease")
                start(self._watch_redis(journal, state, metrics), "redis-watch")
                if router is not None and desk is not None:
                    start(self._reloads(router), "sighup-reload")
                    start(desk.run(), "desk")
                if outbound is not None:
                    outbound_task = start(outbound.run(outbound_stop), "outbound")
                phone_tasks = [start(c.run(), c.name) for c in self.telephony]
                # Agents' commands first: an accept must not wait for a backlog of contacts.
                ingress_tasks = [
                    start(
                        self._ingress_follows(follows, each, intake_stop)
                        if leader
                        else self._ingress_always(each, intake_stop),
                        "mqtt-agents" if each.kind == "agents" else "mqtt-ingress",
                    )
                    for each in ingresses
                ]
                http_ready = asyncio.Event()
                http_task = start(self._http(app, intake_stop, http_ready), "http")
                smtp_ready = asyncio.Event()
                smtp_task = start(
                    self._smtp(intake, intake_stop, smtp_ready) if ingests else _ready(smtp_ready),
                    "smtp",
                )
                # Listening before "started" (a server that fails to start ends the group).
                await http_ready.wait()
                await smtp_ready.wait()
                log.info("daemon.started", role=role)

                await self.stopping.wait()
                log.info("daemon.stopping")
                started = time.monotonic()
                # 1. Stop intake (both MQTT sessions, HTTP, SMTP): nothing new is acknowledged.
                intake_stop.set()
                for each in ingresses:
                    each.stop()
                await _settle([*ingress_tasks, http_task, smtp_task], 3.0)
                # 2. The router drains the journal, publishes and snapshots.
                router_stop.set()
                remaining = max(0.5, SHUTDOWN_TIMEOUT - (time.monotonic() - started))
                await _settle([router_task], remaining)
                # 3. Release the leases: a standby takes over at once.
                lease_stop.set()
                await _settle([lease_task, ingest_lease_task], 2.0)
                # 4. The telephony connectors carry out what the router handed them, briefly.
                for connector in self.telephony:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(connector.drain(), 2.0)
                # 5. Stop sending (what is in flight stays in the outbox).
                outbound_stop.set()
                await _settle([outbound_task], 2.0)
                # 6. Cancel the rest, the publisher (started first) last of all.
                for t in (*phone_tasks, *reversed(tasks)):
                    t.cancel()
        finally:
            await session.close()
            await redis.aclose()
            await desk_redis.aclose()
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            log.info("daemon.stopped")

    def _hup_ignored(self) -> None:
        """SIGHUP in the ingest role: nothing to reload here (the router process routes)."""
        log.warning("rules.reload_ignored", trigger="SIGHUP", role="ingest")

    def _on_sigint(self) -> None:
        """First SIGINT: graceful stop. A second one while stopping: exit at once (130), as
        uvicorn does: whoever presses Ctrl-C twice does not want to wait for the hand-over.
        Nothing acknowledged is lost (the journal is in Redis); what was not acknowledged is
        redelivered by the broker or retried by the sender."""
        if self.stopping.is_set():
            log.warning("daemon.forced_exit", signal="SIGINT")
            sys.stderr.flush()
            os._exit(130)
        self.stopping.set()

    async def _ingress_always(self, ingress: Ingress, stop: asyncio.Event) -> None:
        """Shared mode: every daemon consumes its share, from start to shutdown."""
        await ingress.run()

    async def _ingress_follows(
        self, keeper: LeaseKeeper, ingress: Ingress, stop: asyncio.Event
    ) -> None:
        """Leader mode: consume while this daemon holds the lease, under the installation's one
        persistent session; stop (the batch in hand is journaled and acknowledged) when the
        lease is lost, and resume that session on the next tenure."""
        while not stop.is_set():
            if await keeper.tenure(stop) is None:
                return
            if not keeper.held or stop.is_set():
                continue  # lost again before this task ran
            # No await between the check above and run() clearing the stop flag: a loss
            # from here on calls ingress.stop() and ends this run.
            log.info("mqtt.ingress.following", kind=ingress.kind, held=True)
            await ingress.run()
            log.info("mqtt.ingress.following", kind=ingress.kind, held=False)
            if keeper.held and not stop.is_set():
                await asyncio.sleep(0.1)  # run() returned while still held: do not spin

    async def _http(
        self, app: web.Application | None, stop: asyncio.Event, ready: asyncio.Event
    ) -> None:
        """Serve HTTP until intake stops (webhooks, API, metrics, health)."""
        s = self.settings
        if app is None:
            ready.set()
            return
        tls = (
            server_tls(s.http.tls_cert, s.http.tls_key)
            if s.http.tls_cert and s.http.tls_key
            else None
        )
        runner = await start_http(app, s.http.addr, tls=tls)
        log.info("http.listening", addr=s.http.addr, https=tls is not None)
        ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    async def _smtp(self, intake: Intake, stop: asyncio.Event, ready: asyncio.Event) -> None:
        """Take mail until intake stops."""
        s = self.settings
        if not s.smtp.addr:
            ready.set()
            return
        server = await start_smtp(
            intake,
            self.metrics,
            s.smtp.addr,
            max_message_size=s.smtp.max_message_size,
            forward=self._forward,
        )
        log.info("smtp.listening", addr=s.smtp.addr)
        ready.set()
        try:
            await stop.wait()
        finally:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _watch_redis(self, journal: Journal, state: AppState, metrics: Metrics) -> None:
        was: bool | None = None
        while True:
            ok = await journal.ping()
            state.redis_ok = ok
            metrics.set_status(redis=ok, mqtt=state.mqtt_ok, lease=state.lease_held)
            if ok != was:
                (log.info if ok else log.error)("redis.status", up=ok)
                was = ok
            await asyncio.sleep(1.0)

    async def _reloads(self, router: Router) -> None:
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            log.info("rules.reload_requested", trigger="SIGHUP")
            await router.reload()


async def _ready(ready: asyncio.Event) -> None:
    """The task of a server this role does not run: ready at once."""
    ready.set()


async def _settle(tasks: list[asyncio.Task[Any] | None], timeout: float) -> None:
    """Wait (at most ``timeout`` s) for the tasks this role has to finish by themselves."""
    present = [asyncio.shield(t) for t in tasks if t is not None]
    if present:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*present), timeout)
