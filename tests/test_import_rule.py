"""The routing core is sans-I/O: router/ (but for router/daemon/, the I/O edge) and rules/
import no I/O library, and their pure modules not even the clock or randomness.

The pure modules are found by walking the two packages, so a new module is held to the rule
the moment it exists; the only ones let off are named below, each with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_PACKAGES = ("router", "rules")
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
#: Subpackages of the core packages that are the I/O edge (and tested as such elsewhere).
EDGE_PACKAGES = {
    "router.daemon": "the daemon: Redis, MQTT, HTTP, metrics and logs live here",
    "router.cli": "the command-line front ends: argv, printing, the wall clock, loadgen's I/O",
}
FRONT_ENDS: dict[str, str] = {}
#: Imports a pure module needs although they are on the forbidden list, and why.
ALLOWED = {
    # Only seeded generators (random.Random(seed)); test_randomness_is_only_seeded holds it.
    "router.sim.simulation": {"random"},
    # The routing and experts files are read here, at start and on reload, never per contact.
    "rules.load": {"os"},
}
#: Not in a pure module: the clock, randomness, identifiers made up on the spot, the process.
NOT_PURE = IO_LIBRARIES | {"time", "random", "secrets", "uuid", "os", "sys"}
#: Methods that read the clock although ``datetime`` itself (converting a given time) is fine.
CLOCK_READS = {"now", "utcnow", "today"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, Path]:
    """Every module of the core packages that is not in an edge subpackage."""
    found: dict[str, Path] = {}
    for package in CORE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            if not any(name == e or name.startswith(e + ".") for e in EDGE_PACKAGES):
                found[name] = path
    return found


def pure_modules() -> dict[str, Path]:
    """The core modules but the command-line front ends: these must not touch the clock."""
    return {name: path for name, path in core_modules().items() if name not in FRONT_ENDS}


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def clock_reads(path: Path) -> list[str]:
    """Calls such as ``datetime.now()``, ``datetime.datetime.utcnow()`` or ``date.today()``."""
    reads = []
    for node in ast.walk(parse(path)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CLOCK_READS
            and _names_a_date_type(node.func.value)
        ):
            reads.append(f"line {node.lineno}: {ast.unparse(node)}")
    return reads


def _names_a_date_type(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in {"datetime", "date"}
    return isinstance(node, ast.Attribute) and node.attr in {"datetime", "date"}


@pytest.mark.parametrize("path", core_modules().values(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_io_library(path: Path) -> None:
    assert not imported_roots(path) & IO_LIBRARIES


@pytest.mark.parametrize("name", pure_modules())
def test_pure_modules_read_no_clock_and_draw_no_random_numbers(name: str) -> None:
    path = pure_modules()[name]
    assert not (imported_roots(path) & NOT_PURE) - ALLOWED.get(name, set())
    assert clock_reads(path) == []


def test_randomness_is_only_seeded() -> None:
    # The simulator may use the random module, but only through generators it seeds itself:
    # a module-level draw (random.random(), random.choice(...)) would differ on every run.
    path = pure_modules()["router.sim.simulation"]
    calls = {
        node.func.attr
        for node in ast.walk(parse(path))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "random"
    }
    assert calls == {"Random"}
    seeded = [
        node
        for node in ast.walk(parse(path))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "Random"
    ]
    assert seeded and all(node.args for node in seeded), "every random.Random(...) gets a seed"


def test_the_walk_finds_the_engine_and_every_exception_still_exists() -> None:
    pure = pure_modules()
    # The modules a replay depends on are held to the rule (the walk did not miss them).
    for name in ("router.engine", "router.lifecycle", "router.state", "router.messages"):
        assert name in pure
    for name in ("router.customers", "router.experts", "rules.table", "rules.expr"):
        assert name in pure
    assert not any(name.startswith("router.daemon") for name in pure)
    # An exception for a module that was renamed or removed would silently cover nothing.
    core = core_modules()
    for name in (*FRONT_ENDS, *ALLOWED):
        assert name in core, f"{name} is listed as an exception but does not exist"
    for edge in EDGE_PACKAGES:
        assert (ROOT / edge.replace(".", "/")).is_dir()


def test_the_rule_catches_an_io_import_and_a_clock_read(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import asyncio\nfrom redis.asyncio import Redis\nimport datetime as dt\n"
        "from datetime import date, datetime\n"
        "a = datetime.now()\nb = dt.datetime.utcnow()\nc = date.today()\n"
        "d = datetime.fromtimestamp(0.0)\n",
        encoding="utf-8",
    )
    assert imported_roots(bad) & IO_LIBRARIES == {"asyncio", "redis"}
    assert [r.split(":")[0] for r in clock_reads(bad)] == ["line 5", "line 6", "line 7"]
    timed = tmp_path / "timed.py"
    timed.write_text("import time\nnow = time.time()\n", encoding="utf-8")
    assert imported_roots(timed) & NOT_PURE == {"time"}
