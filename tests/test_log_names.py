"""Log event names: one dotted name per event, the same wherever it is logged.

The names are collected from the source (an AST walk over every call of a structlog logger's
``debug``/``info``/``warning``/``error``/``exception``/``critical`` with a literal first
argument), so a new log line is checked without anybody listing it here.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path
from typing import get_args

from router.events import EngineEvent

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("router", "channels", "rules")
LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
# area.event or area.sub.event: lower case, words joined by "_", parts by ".".
CONVENTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


def _loggers(tree: ast.Module) -> set[str]:
    """Names bound to ``structlog.get_logger(...)`` in a module (``log`` by convention)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and func.attr == "get_logger":
                found.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return found


def log_event_names() -> dict[str, list[str]]:
    """Every literal log event name in the packages -> where it is logged."""
    names: dict[str, list[str]] = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            loggers = _loggers(tree)
            for node in ast.walk(tree):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in loggers
                    and node.args
                ):
                    continue
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    names[first.value].append(where)
    return dict(names)


def test_the_walk_finds_the_daemons_log_lines() -> None:
    names = log_event_names()
    assert {"daemon.starting", "rules.reloaded", "input.rejected"} <= set(names)


def test_every_log_event_name_is_dotted_lower_case() -> None:
    bad = {n: w for n, w in log_event_names().items() if not CONVENTION.fullmatch(n)}
    assert bad == {}


def test_no_event_has_two_spellings() -> None:
    by_words: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for name in log_event_names():
        by_words[tuple(re.split(r"[._]", name))].add(name)
    assert {k: v for k, v in by_words.items() if len(v) > 1} == {}


def test_a_reload_is_logged_once_by_the_router_whatever_asked_for_it() -> None:
    """The router logs the outcome; SIGHUP and HTTP only say who asked (rules.reload_requested)."""
    names = log_event_names()
    for outcome in ("rules.reloaded", "rules.reload_refused"):
        assert [w.split(":")[0] for w in names[outcome]] == ["router/daemon/router_loop.py"]
    assert {w.split(":")[0] for w in names["rules.reload_requested"]} == {
        "router/daemon/main.py",
        "router/daemon/http.py",
    }


def test_engine_event_types_logged_as_names_follow_the_convention_too() -> None:
    """The router logs each engine event under its type (``log.info(cmd.type, ...)``)."""
    types = {cls.__struct_config__.tag for cls in get_args(EngineEvent)}
    assert "contact.queued" in types
    assert {t for t in types if not CONVENTION.fullmatch(t)} == set()
