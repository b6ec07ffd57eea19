"""``stellwerk run``: the routing daemon (DESIGN.md sections 2, 5 and 6).

One asyncio process, one supervising TaskGroup with named tasks: MQTT publisher, MQTT ingress,
router (lease -> restore -> route), Redis watch, signals; plus the HTTP and SMTP servers. Signal
handlers only set flags. SIGTERM/SIGINT: stop intake (MQTT, HTTP, SMTP), let the router apply,
publish and snapshot what is in the journal and release the lease (bounded by a timeout), cancel
the rest, close connections. SIGHUP reloads the routing file (a file that fails validation is
refused with its problems; the running rules stay).

Exit codes: 0 after a graceful shutdown, 1 when the routing file does not validate at start,
2 for bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiohttp import web

from router.daemon.auth import Authenticator
from router.daemon.config import LoadedSettings, LogSettings, Settings, SettingsError, load_settings
from router.daemon.desk import DeskService
from router.daemon.http import AppState, make_app, server_tls, start_http
from router.daemon.intake import Intake
from router.daemon.journal import Journal, connect_redis
from router.daemon.lease import Lease
from router.daemon.metrics import Metrics
from router.daemon.mqtt import Ingress, Publisher
from router.daemon.router_loop import Router, RouterOptions
from router.daemon.sinks import CommandSink
from router.daemon.smtp import start_smtp
from rules.check import load_or_report
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
    try:
        loaded = load_settings(path)
    except SettingsError as exc:
        for problem in exc.problems:
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
    table = load_or_report(settings.routing, prefix="stellwerk run: ")
    if table is None:
        return 1
    if args.check_config:
        print(msgspec.json.format(msgspec.json.encode(settings.redacted())).decode())
        return 0
    try:
        asyncio.run(Daemon(loaded, table).run())
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return 130
    except Exception:
        # A bug, not bad input (that never gets this far): log it as one JSON line, exit 1.
        log.exception("daemon.crashed")
        return 1
    return 0


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
        self.router: Router | None = None
        # I/O-edge actors besides MQTT that carry out the engine's commands (telephony
        # connectors, the desk's live feed); see router.daemon.sinks.
        self.sinks: list[CommandSink] = []

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
            loop.add_signal_handler(signal.SIGINT, self.stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

        redis = connect_redis(s.redis.url)
        metrics = self.metrics
        state = self.state
        journal = Journal(redis, s.key_prefix)
        intake = Intake(journal, s.decode_config(), metrics=metrics)
        # The agent desktop and the wallboard: transcripts at intake, live feeds as sinks. Its
        # own Redis connections: its writes never queue behind, or take a connection from, the
        # router's journal and published-mark writes.
        desk_redis = connect_redis(s.redis.url)
        desk = DeskService(s, intake, desk_redis, metrics, state)
        state.desk = desk
        self.sinks.extend(desk.sinks)

        leader = s.mqtt.ingress == "leader"

        def mqtt_status(_: bool) -> None:
            # A leader-mode standby does not consume ingress; its publisher is what matters.
            consuming = ingress.connected or (leader and not state.lease_held)
            state.mqtt_ok = publisher.connected and consuming
            metrics.set_status(redis=state.redis_ok, mqtt=state.mqtt_ok, lease=state.lease_held)

        publisher = Publisher(s, on_status=mqtt_status)
        ingress = Ingress(s, intake, publisher, metrics=metrics, on_status=mqtt_status)
        lease = Lease(redis, journal.keys.lease, s.node_id(), s.router.lease_ttl)
        router = Router(
            RouterOptions(
                topic_prefix=s.topic_prefix,
                routing_path=s.routing,
                batch=s.router.batch,
                snapshot_every=s.router.snapshot_every,
                snapshot_interval=s.router.snapshot_interval,
                journal_retention=s.router.journal_retention,
            ),
            journal,
            lease,
            publisher,
            self.table,
            metrics=metrics,
            state=state,
            ingress=ingress if leader else None,
            on_lease=mqtt_status,
            sinks=self.sinks,
        )
        self.router = router
        runner: web.AppRunner | None = None
        smtp: asyncio.Server | None = None
        router_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                pub_task = tg.create_task(publisher.run(), name="mqtt-publisher")
                ingress_task = tg.create_task(
                    ingress.run() if not leader else asyncio.sleep(0), name="mqtt-ingress"
                )
                router_task = tg.create_task(router.run(router_stop), name="router")
                watch_task = tg.create_task(
                    self._watch_redis(journal, state, metrics), name="redis-watch"
                )
                reload_task = tg.create_task(self._reloads(router), name="sighup-reload")
                desk_task = tg.create_task(desk.run(), name="desk")
                if s.http.addr:
                    app = make_app(intake, state, s, metrics, Authenticator(s, metrics=metrics))
                    tls = (
                        server_tls(s.http.tls_cert, s.http.tls_key)
                        if s.http.tls_cert and s.http.tls_key
                        else None
                    )
                    runner = await start_http(app, s.http.addr, tls=tls)
                    log.info("http.listening", addr=s.http.addr, https=tls is not None)
                if s.smtp.addr:
                    smtp = await start_smtp(
                        intake, metrics, s.smtp.addr, max_message_size=s.smtp.max_message_size
                    )
                    log.info("smtp.listening", addr=s.smtp.addr)
                log.info("daemon.started")

                await self.stopping.wait()
                log.info("daemon.stopping")
                started = time.monotonic()
                # 1. Stop intake: nothing new is accepted (and so nothing new acknowledged).
                ingress.stop()
                if runner is not None:
                    await runner.cleanup()
                    runner = None
                if smtp is not None:
                    smtp.close()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(smtp.wait_closed(), 2.0)
                    smtp = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(ingress_task), 2.0)
                # 2. The router drains the journal, snapshots, releases the lease.
                router_stop.set()
                remaining = max(0.5, SHUTDOWN_TIMEOUT - (time.monotonic() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(router_task), remaining)
                # 3. Cancel the rest.
                for task in (
                    ingress_task,
                    router_task,
                    pub_task,
                    watch_task,
                    reload_task,
                    desk_task,
                ):
                    task.cancel()
        finally:
            if runner is not None:
                await runner.cleanup()
            if smtp is not None:
                smtp.close()
            await redis.aclose()
            await desk_redis.aclose()
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            log.info("daemon.stopped")

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
