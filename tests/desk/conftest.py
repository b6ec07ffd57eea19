"""Fixtures of the browser tests: the daemon fixtures, headless Debian Chromium, artifacts.

Chromium comes from the Debian packages ``chromium`` and ``chromium-driver`` (``make test``
installs them when it runs as root); Playwright drives it through ``executable_path`` and never
downloads a browser of its own. Without it the tests skip, saying so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tests.daemon.conftest import (  # noqa: F401 (fixtures used by the tests here)
    REPO,
    daemon_env,
    mqtt_probe,
    names,
    redis_client,
    start_daemon,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "artifacts"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install the Debian packages chromium and chromium-driver "
            "(make test does that when it runs as root)"
        )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
