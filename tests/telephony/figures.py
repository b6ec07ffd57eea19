"""What a supervisor reads about abandoned calls: ``/v1/queues`` and ``/metrics`` over HTTP."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import wait_until

TOKEN = "t-phones-admin"
"""The admin token of the daemons these tests start (``admin_token`` in their settings)."""


async def abandoned_figures(base: str, queue: str) -> tuple[int, float]:
    """(``abandoned`` of ``queue`` in ``/v1/queues``, ``stellwerk_contacts_abandoned_total`` of
    ``queue`` summed over its channel/source series) as the daemon at ``base`` serves them."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v1/queues", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            queues = {q["name"]: q for q in (await resp.json())["queues"]}
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    total = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "stellwerk_contacts_abandoned_total"
        and sample.labels.get("queue") == queue
    )
    return int(queues[queue]["abandoned"]), total


async def assert_abandoned(base: str, queue: str, expected: int) -> None:
    """``expected`` abandoned calls in ``queue``, in both figures (waits for the count)."""

    async def counted() -> tuple[int, float] | None:
        figures = await abandoned_figures(base, queue)
        return figures if min(figures) >= expected else None

    got = await wait_until(counted, 5, f"{expected} abandoned calls counted in {queue}")
    assert got == (expected, float(expected))
