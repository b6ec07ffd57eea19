"""The routing core is sans-I/O: router/ (but for router/daemon/, the I/O edge) and rules/
import no I/O library, and the engine's own modules not even the clock or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IO_LIBRARIES = {
    "asyncio",
    "aiomqtt",
    "paho",
    "redis",
    "prometheus_client",
    "aiohttp",
    "aiosmtpd",
    "structlog",
    "socket",
    "logging",
    "threading",
    "subprocess",
}
# The engine and its data: time comes in as an argument, and a replay must be deterministic.
ENGINE_MODULES = [
    "engine.py",
    "lifecycle.py",
    "state.py",
    "messages.py",
    "model.py",
    "customers.py",
    "experts.py",
]
NOT_IN_ENGINE = IO_LIBRARIES | {"time", "random", "datetime", "uuid", "os"}
EDGE = {"daemon"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def core_files() -> list[Path]:
    files = sorted((ROOT / "rules").rglob("*.py"))
    for path in sorted((ROOT / "router").rglob("*.py")):
        if path.relative_to(ROOT / "router").parts[0] not in EDGE:
            files.append(path)
    return files


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_io_library(path: Path) -> None:
    assert not imported_roots(path) & IO_LIBRARIES


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_engine_reads_no_clock_and_draws_no_random_numbers(name: str) -> None:
    assert not imported_roots(ROOT / "router" / name) & NOT_IN_ENGINE


def test_the_rule_catches_an_io_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom redis.asyncio import Redis\n", encoding="utf-8")
    assert imported_roots(bad) & IO_LIBRARIES == {"asyncio", "redis"}
