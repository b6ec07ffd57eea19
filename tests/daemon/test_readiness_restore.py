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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon.http import RESTORING
from router.daemon.journal import Journal
from tests.daemon.conftest import REDIS_URL, DaemonProcess, wait_until, write_routing
from tests.daemon.private_servers import RedisProxy, free_port
from tests.daemon.test_daemon_recovery import wait_log
from tests.daemon.test_snapshot_restore_faults import MAILS, seeded

pytestmark = pytest.mark.integration


class ReplyHolder(RedisProxy):
    """Once armed, the reply to the first call carrying ``marker`` is held back (``held`` is
    set) until ``release`` is set. The call itself reaches Redis at once; only its answer
    waits."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self.marker = b""
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def close(self) -> None:
        self.release.set()
        await super().close()

    def call(self, data: bytes, flag: asyncio.Event) -> None:
        if self.marker and not self.held.is_set() and self.marker in data:
            flag.set()

    async def reply(self, data: bytes, flag: asyncio.Event) -> bool:
        if flag.is_set():
            flag.clear()
            self.held.set()
            await self.release.wait()
        return True


@pytest.fixture
async def holder() -> AsyncIterator[ReplyHolder]:
    proxy: ReplyHolder = await ReplyHolder.before(REDIS_URL)
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
