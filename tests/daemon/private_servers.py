"""Private Redis and Mosquitto servers on free loopback ports, for tests that stop and kill them.

The shared servers on 6379/1883 serve every other test (and maybe a demo): they must never be
stopped. A fault test starts its own ``redis-server`` and ``mosquitto`` in its tmp dir instead,
restarts them on the same port and data dir (so what they persisted comes back), and kills them
in the fixture's finalizer even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

REDIS_SERVER = Path("/usr/bin/redis-server")
MOSQUITTO = Path("/usr/sbin/mosquitto")
HOST = "127.0.0.1"
START_TIMEOUT = 10.0


# Ports Chromium refuses to load pages from (net::ERR_UNSAFE_PORT; its "restricted ports"
# list): a desk or wallboard test on one of them fails in the browser, not in the daemon.
BROWSER_UNSAFE_PORTS = frozenset(
    {1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6679, 6697, 10080}
    | set(range(6665, 6670))
)


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range, and one a
    browser may load pages from.

    Below it, because the server is restarted on the same port: an ephemeral port can meanwhile
    become the local end of some other test's outgoing connection (making the restart fail with
    EADDRINUSE), or a client retrying against the stopped server can connect to itself.
    """
    low = 20000
    with contextlib.suppress(OSError, ValueError):
        low = min(low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    for _ in range(200):
        port = random.randrange(low - 10000, low)
        if port in BROWSER_UNSAFE_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found")


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        try:
            sock.connect((HOST, port))
        except OSError:
            return False
        return True


def _wait_listening(proc: subprocess.Popen[bytes], ports: list[int], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not all(_accepts(p) for p in ports):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} not listening on {ports}: {_tail(log)}")
        time.sleep(0.02)


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-2000:]
    return ""


@dataclass
class _Server:
    """A server process in ``dir``: start, stop (SIGTERM, graceful), kill (SIGKILL)."""

    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, args: list[str], ports: list[int]) -> None:
        assert not self.running, "already running"
        log = self.dir / "server.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        _wait_listening(self.proc, ports, log)

    def stop(self) -> None:
        """Graceful stop (SIGTERM): the server saves what it persists, then exits."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no chance to save anything beyond what is already on disk."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server hangs; its connections stay open and nothing answers."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.send_signal(signal.SIGCONT)  # a paused server must see the SIGTERM
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return _tail(self.dir / "server.log")


@dataclass
class PrivateRedis(_Server):
    """``redis-server`` with an append-only file fsynced on every write.

    Durability of the journal is an operator setting of Redis, not something Stellwerk can
    enforce: with ``appendonly yes`` and ``appendfsync always`` a Redis killed with SIGKILL comes
    back with every write it acknowledged. (``everysec`` could lose the last second; without AOF
    the journal would be gone.) The tests kill Redis, so they need the strict setting.
    """

    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Start (or restart: same port and dir, so the AOF is loaded) and wait until it listens."""
        self._spawn(
            [
                str(REDIS_SERVER),
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
            ],
            [self.port],
        )
        # A restart loads the AOF before it accepts commands; PING answers only after that.
        deadline = time.monotonic() + START_TIMEOUT
        while not self._pong():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis on {self.port} does not answer PING: {self.log()}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            try:
                return sock.recv(64).startswith(b"+PONG")
            except OSError:
                return False


@dataclass
class PrivateMosquitto(_Server):
    """``mosquitto`` with persistence, so sessions and queued QoS 1 messages survive a restart.

    Two listeners: ``port`` for the daemon and ``peer_port`` for the test's own clients (the
    telephony system and the agents). Starting with ``daemon=False`` opens only the peer
    listener: the broker is up, but the daemon cannot reach it, which is how a test publishes
    "while the daemon is disconnected" without racing the daemon's reconnect.
    """

    port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    auth_conf: str = ""
    """Extra configuration (``stellwerk broker-config``'s mosquitto-auth.conf): with it, no
    anonymous access on any listener."""
    tls_listener: str = ""
    """A whole TLS ``listener`` block (port, cafile, certfile, keyfile ...), when wanted."""
    tls_port: int = 0

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def start(self, *, daemon: bool = True) -> None:
        """Start (or restart: same dir, so the persistence file is loaded) and wait for it."""
        ports = [self.port, self.peer_port] if daemon else [self.peer_port]
        listeners = "".join(f"listener {p} {HOST}\n" for p in ports)
        if self.tls_listener:
            listeners += self.tls_listener.rstrip("\n") + "\n"
            ports.append(self.tls_port)
        anonymous = "false" if self.auth_conf else "true"
        # The auth conf carries allow_anonymous false itself; drop it so it is not doubled.
        auth = "".join(
            line + "\n"
            for line in self.auth_conf.splitlines()
            if not line.startswith("allow_anonymous")
        )
        # Run as root, mosquitto drops to user "mosquitto", who may not write to the tmp dir.
        user = f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"""{user}allow_anonymous {anonymous}
{auth}{listeners}set_tcp_nodelay true
# The default (1000) would make the broker drop QoS 1 messages queued for an offline session.
max_queued_messages 1000000
max_queued_bytes 0
persistence true
persistence_location {self.dir}/
autosave_interval 1
log_dest stdout
log_type error
log_type warning
log_type notice
""",
            encoding="utf-8",
        )
        self._spawn([str(MOSQUITTO), "-c", str(conf)], ports)


class RedisProxy:
    """A TCP proxy in front of a Redis server that forwards every byte both ways, for tests
    that must lose or delay one answer at a chosen moment. Subclasses look at what passes:
    :meth:`call` sees each chunk a client sends before it goes on, :meth:`reply` each chunk
    the server answers before it goes back; ``flag`` is one per connection, for a call to mark
    the reply that follows it."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def before(cls, url: str) -> Any:
        """A proxy (of this class) in front of the Redis server at ``url``, not started."""
        client = aioredis.Redis.from_url(url)
        kwargs = client.connection_pool.connection_kwargs
        await client.aclose()
        return cls(kwargs.get("host", "127.0.0.1"), int(kwargs.get("port", 6379)))

    async def start(self) -> str:
        """Listen on a free port; the URL to give the client instead of the server's."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def call(self, data: bytes, flag: asyncio.Event) -> None:
        """A chunk from the client, before it reaches the server."""

    async def reply(self, data: bytes, flag: asyncio.Event) -> bool:
        """A chunk from the server, before it reaches the client; False cuts the connection
        instead."""
        return True

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        flag = asyncio.Event()

        async def up() -> None:
            while data := await client_r.read(1 << 16):
                self.call(data, flag)  # before the call goes on: its reply cannot overtake
                server_w.write(data)
                await server_w.drain()

        async def down() -> None:
            while data := await server_r.read(1 << 16):
                if not await self.reply(data, flag):
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(up()), asyncio.create_task(down())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (client_w, server_w):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.discard(task)
