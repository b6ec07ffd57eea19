"""The wallboard in a real browser: its numbers are the daemon's, during and after a loadgen
run; a new waiting contact shows within a second; a supervisor releases a stuck contact."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import test_utils

from router.cli.loadgen import LoadGen, Profile, parse_mix
from router.daemon.auth import hash_token
from tests.daemon.conftest import MqttProbe, Names, write_routing
from tests.daemon.test_loadgen import daemon_for_loadgen

pytestmark = pytest.mark.integration

WALL_TOKEN = "wall-secret-token"
COLUMNS = ("waiting", "offered", "answered", "abandoned", "ready")
API_FIELDS = {
    "waiting": "waiting",
    "offered": "entered",
    "answered": "answered",
    "abandoned": "abandoned",
    "ready": "agents_ready",
}


def supervisor_tokens() -> str:
    return json.dumps([{"name": "wall-1", "role": "supervisor", "sha256": hash_token(WALL_TOKEN)}])


async def wall_page(browser: Any, base: str) -> Any:
    page = await (await browser.new_context(viewport={"width": 1600, "height": 900})).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(f"{base}/wall")
    await page.fill("#token", WALL_TOKEN)
    await page.click("#signin-form button")
    await page.wait_for_selector("#queues tbody tr")
    return page


async def page_numbers(page: Any) -> dict[str, dict[str, int]]:
    rows = await page.eval_on_selector_all(
        "#queues tbody tr",
        """rows => rows.map(r => [r.dataset.queue, Object.fromEntries(
            ["waiting", "offered", "answered", "abandoned", "ready"].map(
                c => [c, Number(r.querySelector("td." + c).textContent)]))])""",
    )
    return dict(rows)


async def api_numbers(base: str) -> dict[str, dict[str, int]]:
    headers = {"Authorization": f"Bearer {WALL_TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}/v1/queues", headers=headers) as r,
    ):
        assert r.status == 200
        body = await r.json()
    return {q["name"]: {col: q[field] for col, field in API_FIELDS.items()} for q in body["queues"]}


async def test_the_wallboard_shows_the_daemons_numbers_during_a_loadgen_run(
    tmp_path: Path,
    names: Names,
    start_daemon: Any,
    mqtt_probe: MqttProbe,
    browser: Any,
    artifacts: Path,
) -> None:
    agents = ("anna", "ben", "cem", "doris")
    routing = write_routing(tmp_path / "r.yaml", agents, offer_timeout=5.0, wrap_up=0.5)
    _, target = await daemon_for_loadgen(
        start_daemon, routing, names, agents, auth_tokens=supervisor_tokens()
    )
    base = target.http_url
    page = await wall_page(browser, base)
    profile = Profile(
        rate=12.0,
        duration=3.0,
        mix=parse_mix("phone=40,email=20,chat=30,social=10"),
        handle_time=0.6,
        think_time=0.05,
        after_call_work=0.2,
        grace=8.0,
        seed=11,
        progress=False,
        crowd_share=0.0,
    )
    run = asyncio.create_task(LoadGen(target, profile).run())
    # During the run: the page keeps up with the daemon's counters (it is pushed at least once
    # a second; the bound here is looser, since this checks that it keeps up, not how fast).
    samples = 0
    while not run.done():
        api = await api_numbers(base)
        deadline = time.monotonic() + 3.0
        while True:
            shown = await page_numbers(page)
            caught_up = all(
                shown[q][c] >= api[q][c] for q in api for c in ("offered", "answered", "abandoned")
            )
            if caught_up or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert caught_up, (shown, api)
        samples += 1
        await asyncio.sleep(0.4)
    report = run.result()
    assert report.lost == 0 and samples >= 3
    # Quiet again: every number on the board is the daemon's (read again until they agree: the
    # simulated agents' last logouts may still be on their way when the run returns).
    deadline = time.monotonic() + 5.0
    while True:
        api = await api_numbers(base)
        shown = await page_numbers(page)
        if shown == api or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert shown == api
    assert sum(q["offered"] for q in api.values()) == report.sent
    assert api["support"]["answered"] > 0

    # A new contact waiting (nobody is logged in now) shows without a reload (pushed within a
    # second; the bound is looser so that a busy machine does not fail it).
    before = (await page_numbers(page))["support"]["waiting"]
    await mqtt_probe.publish(
        "in/chat/generic",
        {"kind": "new", "channel": "chat", "id": "late-1", "text": "Is anyone there?"},
    )
    await page.wait_for_function(
        f"""() => Number(document.querySelector("tr[data-queue=support] td.waiting")
            .textContent) === {before + 1}""",
        timeout=3000,
    )
    await page.wait_for_selector("tr[data-queue=support] td.waiting.warn, td.waiting.breach")
    await page.screenshot(path=str(artifacts / "wall-after-loadgen.png"))
    assert page.errors == []


async def test_a_supervisor_releases_a_stuck_contact_from_the_wallboard(
    tmp_path: Path,
    start_daemon: Any,
    mqtt_probe: MqttProbe,
    browser: Any,
    artifacts: Path,
) -> None:
    http_port = test_utils.unused_port()
    await start_daemon(
        write_routing(tmp_path / "r.yaml", ("anna",), offer_timeout=30, wrap_up=5),
        http_addr=f"127.0.0.1:{http_port}",
        auth_tokens=supervisor_tokens(),
        # Held longer than 2 x 0.5 s, and at least 1 s: stuck (the defaults are 3 x AHT, 10 min).
        desk_stuck_min_seconds="1",
        desk_stuck_factor="2",
        desk_default_handle_seconds="0.5",
    )
    base = f"http://127.0.0.1:{http_port}"
    await mqtt_probe.agent("anna", op="login")
    await mqtt_probe.publish(
        "in/phone/generic",
        {"kind": "new", "channel": "phone", "id": "dead-call", "from": "+4930123456"},
    )
    (offer,) = await mqtt_probe.wait_for("agents/anna/offers", type="offer")
    await mqtt_probe.agent("anna", op="accept", offer_id=offer["offer_id"])
    await mqtt_probe.wait_for("events/contact.assigned", contact_id="generic:dead-call")
    # The hang-up is lost: without a supervisor, anna would hold this call for ever.
    page = await wall_page(browser, base)
    row = await page.wait_for_selector("#stuck tr[data-contact='generic:dead-call']", timeout=5000)
    assert "anna" in await row.inner_text()
    await page.wait_for_selector("tr[data-queue=support].has-stuck")
    metrics = await metrics_text(base)
    assert 'stellwerk_contacts_stuck{queue="support"} 1.0' in metrics
    await page.screenshot(path=str(artifacts / "wall-stuck.png"))
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await row.eval_on_selector("button.release", "b => b.click()")
    done = await mqtt_probe.wait_for("events/contact.completed", contact_id="generic:dead-call")
    assert done[0]["disposition"] == "released_by_supervisor"
    assert done[0]["released_by"] == "wall-1" and done[0]["agent_id"] == "anna"
    await page.wait_for_selector("#stuck tr[data-contact]", state="detached", timeout=3000)
    # Anna is free at once (no wrap-up after a release) and takes the next call.
    await mqtt_probe.publish(
        "in/phone/generic", {"kind": "new", "channel": "phone", "id": "next-call"}
    )
    await mqtt_probe.wait_for("agents/anna/offers", type="offer", contact_id="generic:next-call")
    metrics = await metrics_text(base)
    assert (
        'stellwerk_contacts_dispositions_total{disposition="released_by_supervisor",'
        'queue="support"} 1.0' in metrics
    )
    assert 'stellwerk_admin_changes_total{op="release_contact"} 1.0' in metrics
    assert page.errors == []


async def metrics_text(base: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
        return await r.text()
