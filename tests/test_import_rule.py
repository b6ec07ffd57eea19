"""The routing core is sans-I/O: router/ (but for its two edges, router/daemon/ and
router/cli/), rules/ and channels/ import no I/O library, read neither the clock nor unseeded
randomness, print nothing and import no command-line code; the daemon imports none either.

The pure modules are found by walking the three packages, so a new module is held to the rule
the moment it exists; the only ones let off are named below, each with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_PACKAGES = ("router", "rules", "channels")
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
#: The command-line package: only the ``stellwerk`` command itself imports it.
CLI_PACKAGE = "router.cli"
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
    """The core modules: they must not touch the clock either."""
    return core_modules()


def non_cli_modules() -> dict[str, Path]:
    """Every module of the three packages outside the command-line package, the daemon's too."""
    found: dict[str, Path] = {}
    for package in CORE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            if name != CLI_PACKAGE and not name.startswith(CLI_PACKAGE + "."):
                found[name] = path
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports by its full name (``from a import b`` counts as ``a.b``,
    since ``b`` may be a module)."""
    names: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def prints(path: Path) -> list[str]:
    """Calls of ``print``, and any mention of ``stdout``/``stderr`` (``sys.stdout.write``, a
    ``file=`` argument): a pure module hands its text to the caller instead."""
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "print":
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr in {"stdout", "stderr"}:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


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


@pytest.mark.parametrize("name", pure_modules())
def test_pure_modules_print_nothing(name: str) -> None:
    assert prints(pure_modules()[name]) == []


@pytest.mark.parametrize("name", non_cli_modules())
def test_only_the_command_line_imports_the_command_line_package(name: str) -> None:
    imported = imported_modules(non_cli_modules()[name])
    assert not {m for m in imported if m == CLI_PACKAGE or m.startswith(CLI_PACKAGE + ".")}


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
    for name in ("router.sim.simulation", "router.sim.erlang", "channels.contact_event"):
        assert name in pure
    assert "channels.registry" in pure and "rules.load" in pure
    assert not any(name.startswith(("router.daemon", "router.cli")) for name in pure)
    # The daemon is held to "imports no command-line code", the command line is not.
    others = non_cli_modules()
    assert "router.daemon.main" in others and "router.cli.check" not in others
    # An exception for a module that was renamed or removed would silently cover nothing.
    for name in ALLOWED:
        assert name in pure, f"{name} is listed as an exception but does not exist"
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
    loud = tmp_path / "loud.py"
    loud.write_text(
        "import sys\nfrom router.cli import check\nimport router.cli.simulate\n"
        "print('x')\nsys.stderr.write('y')\nprint('z', file=sys.stdout)\n",
        encoding="utf-8",
    )
    assert sorted(p.split(":")[0] for p in prints(loud)) == ["line 4", "line 5", "line 6", "line 6"]
    assert {"router.cli.check", "router.cli.simulate"} <= imported_modules(loud)
    timed = tmp_path / "timed.py"
    timed.write_text("import time\nnow = time.time()\n", encoding="utf-8")
    assert imported_roots(timed) & NOT_PURE == {"time"}
