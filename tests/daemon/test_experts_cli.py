"""``stellwerk experts report`` against the daemon's real HTTP app (a real Engine as its view):
what a community manager reads, the JSON for scripts, and one clean line when it fails."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from channels.contact_event import ContactEvent, Sender
from router.cli.experts import ago, duration
from router.daemon.auth import hash_token
from router.daemon.config import AuthSettings, Settings, TokenSettings
from router.daemon.http import AppState, make_app, start_http
from router.daemon.intake import Intake
from router.daemon.journal import Journal, connect_redis
from router.daemon.metrics import Metrics
from router.engine import Engine
from router.messages import Accept, Login, OfferCmd
from rules.load import parse_routing
from tests.servers import REDIS_URL, key_prefix

REPO = Path(__file__).resolve().parents[2]
TOKEN = "community-manager-token"
DAY = 86_400.0
ROUTING = """
version: 1
defaults: {offer_timeout: 30, wrap_up: 0}
skills: [l2]
queues:
  expert_desk: {skills: {l2: 1}, weight: 10}
agents:
  - {id: x1, skills: {l2: 3}}
experts:
  - {id: x-anna, name: Anna Aktiv, level: 3, handles: ["discourse:anna"]}
  - {id: x-bernd, name: Bernd Ruhig, level: 2, handles: ["discourse:bernd"]}
  - {id: x-carl, name: Carl Caller, level: 1, phones: ["+4930222222"]}
  - {id: x-dora, name: Dora Nie, level: 1, handles: ["discourse:dora"]}
rules:
  - {name: expert, when: customer.expert, queue: expert_desk, priority: 100}
  - {name: default, default: true, queue: expert_desk}
"""


def reply(topic: int, user: str) -> ContactEvent:
    return ContactEvent(
        kind="update",
        contact_id=f"discourse:{topic}",
        channel="social",
        source="discourse",
        external_id=str(topic),
        sender=Sender(handle=f"discourse:{user}"),
    )


def crowd_engine(now: float) -> Engine:
    """Anna answered twice two hours ago, Bernd once three days ago, Carl called 40 days ago
    and waited 12 s, Dora was never seen."""
    engine = Engine(parse_routing(ROUTING, "r.yaml"))
    engine.handle(Login(agent_id="x1"), now - 50 * DAY)
    call = ContactEvent(
        kind="new",
        contact_id="asterisk-ari:c1",
        channel="phone",
        source="asterisk-ari",
        external_id="c1",
        sender=Sender(phone="+4930222222"),
    )
    t = now - 40 * DAY
    (offer,) = [c for c in engine.handle(call, t) if isinstance(c, OfferCmd)]
    engine.handle(Accept(agent_id="x1", offer_id=offer.offer_id), t + 12)
    engine.handle(reply(1, "bernd"), now - 3 * DAY)
    engine.handle(reply(2, "anna"), now - 2.5 * 3600)
    engine.handle(reply(3, "anna"), now - 2 * 3600)
    return engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def daemon_url() -> AsyncIterator[tuple[str, AppState]]:
    """The daemon's HTTP app on a real port; its journal is never touched by a report."""
    settings = Settings(
        auth=AuthSettings(
            tokens=(TokenSettings(name="cm", role="supervisor", sha256=hash_token(TOKEN)),)
        )
    )
    metrics = Metrics()
    redis = connect_redis(REDIS_URL)
    state = AppState(view=crowd_engine(time.time()), lease_held=True)
    app = make_app(
        Intake(Journal(redis, key_prefix("unused")), settings.decode_config()),
        state,
        settings,
        metrics,
    )
    port = free_port()
    runner: web.AppRunner = await start_http(app, f"127.0.0.1:{port}")
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()
        await redis.aclose()


async def stellwerk(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "router.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


async def test_the_report_reads_like_a_community_managers_overview(
    daemon_url: tuple[str, AppState],
) -> None:
    url, _ = daemon_url
    done = await stellwerk("experts", "report", "--url", url, "--token", TOKEN)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    counts = {
        m["label"]: (int(m["n"]), m["pct"])
        for m in re.finditer(
            r"^  (?P<label>[a-z ]+?) +(?P<n>\d+)(?:  \((?P<pct>\d+) %\))?", out, re.M
        )
    }
    assert counts == {
        "experts": (4, None),
        "active in the last day": (1, "25"),
        "active in the last week": (1, "25"),
        "inactive for longer": (1, "25"),
        "never seen": (1, "25"),
        "never answered": (2, "50"),
    }
    rows = [
        line.split()
        for line in out.splitlines()
        if line.startswith(("Anna", "Bernd", "Carl", "Dora"))
    ]
    # Most active first; each row says when the expert was last seen, in words.
    assert [r[0] for r in rows] == ["Anna", "Bernd", "Carl", "Dora"]
    anna, bernd, carl, dora = (" ".join(r) for r in rows)
    assert "today 2 h ago 2" in anna
    assert "this week 3 d ago 1" in bernd
    # Carl's own call: one contact, answered after 12 s, none abandoned.
    assert carl.endswith("inactive 40 d ago 0 1 1 0 12 s 12 s")
    assert dora.endswith("never seen never 0 0 0 0 - -")


async def test_json_is_the_daemons_report(daemon_url: tuple[str, AppState]) -> None:
    url, _ = daemon_url
    env = {"PATH": "/usr/bin:/bin", "STELLWERK_TOKEN": TOKEN}
    done = await stellwerk("experts", "report", "--json", "--url", url, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["summary"]["experts"] == 4
    assert {r["id"]: r["answers"] for r in report["experts"]} == {
        "x-anna": 2,
        "x-bernd": 1,
        "x-carl": 0,
        "x-dora": 0,
    }


async def test_the_address_comes_from_the_environment(daemon_url: tuple[str, AppState]) -> None:
    url, _ = daemon_url
    env = {
        "PATH": "/usr/bin:/bin",
        "STELLWERK_HTTP_ADDR": url.removeprefix("http://"),
        "STELLWERK_ADMIN_TOKEN": TOKEN,  # operators' one variable; here a supervisor token
    }
    done = await stellwerk("experts", "report", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["experts"] == 4


async def test_a_standby_or_an_unreachable_daemon_is_one_line_and_exit_1(
    daemon_url: tuple[str, AppState],
) -> None:
    url, state = daemon_url
    done = await stellwerk("experts", "report", "--url", url)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "HTTP 401" in done.stderr and "--token" in done.stderr
    state.view = None  # a standby
    done = await stellwerk("experts", "report", "--url", url, "--token", TOKEN)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "does not route" in done.stderr
    gone = f"http://127.0.0.1:{free_port()}"
    done = await stellwerk("experts", "report", "--url", gone)
    assert done.returncode == 1
    assert done.stderr.startswith(f"stellwerk experts: cannot reach the daemon at {gone}")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_relative_times_and_waits_for_people() -> None:
    now = 1_000_000.0
    assert ago(None, now) == "never"
    assert ago(now - 5, now) == "just now"
    assert ago(now - 125, now) == "2 min ago"
    assert ago(now - 5 * 3600 - 1, now) == "5 h ago"
    assert ago(now - 3 * DAY - 10, now) == "3 d ago"
    assert duration(None) == "-"
    assert duration(8.4) == "8 s"
    assert duration(150) == "2.5 min"
    assert duration(4320) == "1.2 h"
