"""``/readyz`` of a routing daemon follows the router, not just the lease (real daemon, real
Redis and Mosquitto).

A daemon that takes the lease first restores the snapshot and replays the journal (seconds with
a large backlog), and until then its read API and desk answer ``not_routing``: a load balancer
trusting ``/readyz`` must not send supervisors and agents to it yet. The restore is held open by
a proxy in front of Redis that keeps back the reply to the first call on the snapshot's
generation until the test lets it through, so "while it restores" is a state the test waits in,
not a race against a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from router.daemon.http import RESTORING
from router.daemon.journal import Journal
from tests.daemon.conftest import REDIS_URL, DaemonProcess, wait_until, write_routing
from tests.daemon.private_servers import free_port
from tests.daemon.test_daemon_recovery import wait_log
from tests.daemon.test_snapshot_restore_faults import MAILS, seeded

pytestmark = pytest.mark.integration


class ReplyHolder:
    """A TCP proxy to Redis that forwards every byte both ways, except: once armed, the reply
    to the first call carrying ``marker`` is held back (``held`` is set) until ``release`` is
    set. The call itself reaches Redis at once; only its answer waits."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.marker = b""
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def close(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        hold = asyncio.Event()

        async def up() -> None:
            while data := await client_r.read(1 << 16):
                # Set before the call goes on, so its reply cannot overtake the flag.
                if self.marker and not self.held.is_set() and self.marker in data:
                    hold.set()
                server_w.write(data)
                await server_w.drain()

        async def down() -> None:
            while data := await server_r.read(1 << 16):
                if hold.is_set():
                    hold.clear()
                    self.held.set()
                    await self.release.wait()
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


@pytest.fixture
async def holder() -> AsyncIterator[ReplyHolder]:
    client = aioredis.Redis.from_url(REDIS_URL)
    kwargs = client.connection_pool.connection_kwargs
    proxy = ReplyHolder(kwargs.get("host", "127.0.0.1"), int(kwargs.get("port", 6379)))
    await client.aclose()
    yield proxy
    await proxy.close()


async def readyz(http: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, Any]] | None:
    """The answer of ``/readyz``; None while nothing listens yet."""
    try:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientConnectionError:
        return None


async def test_a_daemon_is_ready_only_once_it_restored_and_routes(
    tmp_path: Path,
    holder: ReplyHolder,
    start_daemon: Callable[..., Any],
    daemon_env: Callable[..., dict[str, str]],
    daemons: Callable[..., DaemonProcess],
    journal: Journal,
) -> None:
    routing = write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=60)
    snap = await seeded(start_daemon, journal, routing)
    # Another daemon holds the lease: the one under test starts as a standby, connects to
    # Redis and the broker (shared ingress: its sessions do not wait for the lease), and takes
    # over when the test frees the lease.
    lease_key = journal.keys.lease
    await journal.redis.set(lease_key, "elsewhere:token", px=60_000)
    url = await holder.start()
    port = free_port()
    env = daemon_env(
        routing, "b", http_addr=f"127.0.0.1:{port}", redis_url=url, mqtt_ingress="shared"
    )
    d = daemons(env, "b")
    async with aiohttp.ClientSession() as http:

        async def connected() -> tuple[int, dict[str, Any]] | None:
            assert d.proc is not None and d.proc.poll() is None, d.log()
            answer = await readyz(http, port)
            if answer is None or not (answer[1]["redis"] and answer[1]["mqtt"]):
                return None
            return answer

        status, body = await wait_until(connected, 30, "the standby to connect")
        assert status == 503
        assert (body["lease"], body["routing"], "detail" in body) == (False, False, False)

        # The lease is free: the daemon takes it and restores, and the restore's first read of
        # the snapshot's generation gets no answer until the test lets it through.
        holder.marker = journal.keys.snapshot_gen(snap.gen).encode()
        await journal.redis.delete(lease_key)
        await asyncio.wait_for(holder.held.wait(), 30)
        answer = await readyz(http, port)
        assert answer is not None
        status, body = answer
        assert status == 503, body
        assert body == {
            "ready": False,
            "role": "all",
            "redis": True,
            "mqtt": True,
            "lease": True,
            "routing": False,
            "journal_lag": None,
            "detail": RESTORING,
            "ingest_lease": None,  # shared mode: no ingest lease
        }
        assert not any(line.get("event") == "router.routing" for line in d.log_lines())

        holder.release.set()
        await wait_log(d, "router.routing")
        answer = await readyz(http, port)
        assert answer is not None
        status, body = answer
        assert status == 200, body
        assert (body["ready"], body["lease"], body["routing"], "detail" in body) == (
            True,
            True,
            True,
            False,
        )
        assert (await wait_log(d, "router.restored"))["contacts"] == MAILS

        # The tenure ends (another daemon's token in the lease key: the next renewal, or a
        # fenced write, finds it): not ready any more. router.stopped is logged once the
        # tenure's state is cleared.
        await journal.redis.set(lease_key, "elsewhere:token", px=60_000)
        stopped = await wait_log(d, "router.stopped")
        assert stopped["reason"] in ("lease_lost", "lease_taken_over")
        answer = await readyz(http, port)
        assert answer is not None
        status, body = answer
        assert status == 503, body
        assert (body["ready"], body["routing"], body["journal_lag"]) == (False, False, None)
    assert d.stop() == 0
