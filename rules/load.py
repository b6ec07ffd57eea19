"""Loading a routing file: YAML with positions, schema conversion, semantic checks, experts.

Every problem is collected (not just the first) and reported with the file, line and column of
the YAML node it is about; errors inside a rule's ``when`` point at the offending token inside
the expression. Conversion walks the composed YAML node tree alongside the schema types and
converts field by field with msgspec, so an unknown field in one queue does not hide a wrong
type in another.
"""

from __future__ import annotations

import bisect
import csv
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

from channels.contact_event import CHANNELS
from rules.endpoints import SYSTEMS, endpoint_problem
from rules.expr import Condition, ExprError, compile_condition
from rules.identity import normalize_email, normalize_handle, normalize_phone
from rules.schema import RELEASED_BY_SUPERVISOR, Agent, Expert, RoutingFile
from rules.table import RoutingTable, make_local_time

MIN_PROFICIENCY, MAX_PROFICIENCY = 1, 5
CSV_COLUMNS = ("id", "name", "level", "skills", "phones", "emails", "handles")


class Problem(msgspec.Struct, frozen=True):
    """One located problem in a routing or experts file (line and column are 1-based)."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class RoutingFileError(Exception):
    """A routing file (or its experts file) that does not validate; ``problems`` says where."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column))
        super().__init__("\n".join(str(p) for p in self.problems))


class _Source:
    """A text with a name, turning character indexes into 1-based line and column."""

    def __init__(self, filename: str, text: str) -> None:
        self.filename = filename
        self.text = text
        self.line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(i + 1)

    def problem(self, index: int, message: str) -> Problem:
        line = bisect.bisect_right(self.line_starts, index) - 1
        return Problem(self.filename, line + 1, index - self.line_starts[line] + 1, message)


_Where = tuple[_Source, int]


class _Locator:
    """Where each converted object, and each of its fields, keys and items, came from.

    Keyed by ``id()`` of the converted containers, which the routing file keeps alive.
    """

    def __init__(self, root: _Source) -> None:
        self.root = root
        self.own: dict[int, _Where] = {}
        self.keys: dict[tuple[int, object], _Where] = {}
        self.values: dict[tuple[int, object], _Where] = {}
        self.scalars: dict[tuple[int, object], tuple[_Source, yaml.ScalarNode]] = {}

    def at(self, obj: object, key: object = None, *, on_key: bool = False) -> _Where:
        table = self.keys if on_key else self.values
        if key is not None:
            found = table.get((id(obj), key)) or self.values.get((id(obj), key))
            if found is not None:
                return found
        return self.own.get(id(obj), (self.root, 0))

    def alias(self, new: object, old: object, fields: Iterable[str]) -> None:
        if id(old) in self.own:
            self.own[id(new)] = self.own[id(old)]
        for name in fields:
            for table in (self.keys, self.values):
                if (id(old), name) in table:
                    table[(id(new), name)] = table[(id(old), name)]


_BAD = object()
_NULL_TAG = "tag:yaml.org,2002:null"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _closest(word: object, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to ``word``, or ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _clean(message: str) -> str:
    # msgspec appends " - at `$...`"; the position we report says that better.
    return message.split(" - at `", 1)[0]


class _Converter:
    """Converts a YAML node tree to schema objects, one field at a time, collecting problems."""

    def __init__(self, src: _Source, loc: _Locator, problems: list[Problem]) -> None:
        self.src = src
        self.loc = loc
        self.problems = problems
        self.loader = yaml.SafeLoader("")

    def problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(self.src.problem(node.start_mark.index, message.lstrip(": ")))

    def where(self, node: yaml.Node) -> _Where:
        return (self.src, node.start_mark.index)

    def convert(self, node: yaml.Node, tp: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG and type(None) in args:
                return None
            others = [a for a in args if a is not type(None)]
            if len(others) == 1:
                return self.convert(node, others[0], path)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return self._struct(node, tp, path)
        if origin is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is ...:
            return self._sequence(node, typing.get_args(tp)[0], path)
        if origin is dict:
            key_type, value_type = typing.get_args(tp)
            return self._mapping(node, key_type, value_type, path)
        return self._leaf(node, tp, path)

    def _leaf(self, node: yaml.Node, tp: Any, path: str) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
            return msgspec.convert(value, tp)
        except (yaml.YAMLError, msgspec.ValidationError) as exc:
            self.problem(node, f"{path}: {_clean(str(exc))}")
            return _BAD

    def _pairs(
        self, node: yaml.Node, path: str
    ) -> list[tuple[yaml.Node, object, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{path}: expected a mapping")
            return None
        self.loader.flatten_mapping(node)
        pairs = []
        seen: set[object] = set()
        for key_node, value_node in node.value:
            try:
                key = self.loader.construct_object(key_node, deep=True)
                hash(key)
            except (yaml.YAMLError, TypeError):
                self.problem(key_node, f"{path}: keys must be plain values")
                continue
            if key in seen:
                self.problem(key_node, f"{path}: duplicate key {key!r}")
                continue
            seen.add(key)
            pairs.append((key_node, key, value_node))
        return pairs

    def _struct(self, node: yaml.Node, tp: type[msgspec.Struct], path: str) -> Any:
        pairs = self._pairs(node, path)
        if pairs is None:
            return _BAD
        fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
        # A list item is named by its index; its name (a rule's, an agent's id) says more.
        label = path
        if path.endswith("]"):
            for _, key, value_node in pairs:
                if key in ("name", "id") and isinstance(value_node, yaml.ScalarNode):
                    label = f"{path} ({value_node.value})"
                    break
        out: dict[str, Any] = {}
        keys: dict[str, yaml.Node] = {}
        values: dict[str, yaml.Node] = {}
        bad = False
        for key_node, key, value_node in pairs:
            info = fields.get(key) if isinstance(key, str) else None
            if info is None:
                close = _closest(key, fields)
                hint = f"{close[:-1]}; known: " if close else " (known: "
                self.problem(key_node, f"{label}: unknown field {key!r}{hint}{', '.join(fields)})")
                continue
            value = self.convert(value_node, info.type, _join(path, key))
            if value is _BAD:
                bad = bad or info.required
                continue
            out[info.name] = value
            keys[info.name] = key_node
            values[info.name] = value_node
        present = {key for _, key, _ in pairs}
        for info in fields.values():
            if info.required and info.encode_name not in present:
                self.problem(node, f"{path}: missing required field {info.encode_name!r}")
                bad = True
        if bad:
            return _BAD
        try:
            obj = tp(**out)
        except (TypeError, ValueError) as exc:
            self.problem(node, f"{path}: {exc}")
            return _BAD
        self.loc.own[id(obj)] = self.where(node)
        for name in out:
            self.loc.keys[(id(obj), name)] = self.where(keys[name])
            self.loc.values[(id(obj), name)] = self.where(values[name])
            value_node = values[name]
            if isinstance(value_node, yaml.ScalarNode):
                self.loc.scalars[(id(obj), name)] = (self.src, value_node)
        return obj

    def _sequence(self, node: yaml.Node, item_type: Any, path: str) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"{path}: expected a list")
            return _BAD
        items = []
        wheres = []
        for i, item_node in enumerate(node.value):
            value = self.convert(item_node, item_type, f"{path}[{i}]")
            if value is not _BAD:
                items.append(value)
                wheres.append(self.where(item_node))
        result = tuple(items)
        for i, where in enumerate(wheres):
            self.loc.values[(id(result), i)] = where
        return result

    def _mapping(self, node: yaml.Node, key_type: Any, value_type: Any, path: str) -> Any:
        pairs = self._pairs(node, path)
        if pairs is None:
            return _BAD
        result: dict[Any, Any] = {}
        for key_node, key, value_node in pairs:
            try:
                converted_key = msgspec.convert(key, key_type)
            except msgspec.ValidationError as exc:
                self.problem(key_node, f"{path}: key {key!r}: {_clean(str(exc))}")
                continue
            value = self.convert(value_node, value_type, _join(path, key))
            if value is _BAD:
                continue
            result[converted_key] = value
            self.loc.keys[(id(result), converted_key)] = self.where(key_node)
            self.loc.values[(id(result), converted_key)] = self.where(value_node)
        return result


def _scalar_index(src: _Source, node: yaml.ScalarNode, offset: int) -> int:
    """The index in ``src`` of character ``offset`` of the scalar's value.

    Plain, quoted and block scalars differ from their value by quotes, escapes, indentation
    and folded line breaks; walking the raw text for each value character in turn finds the
    right place in all the ordinary cases (expressions rarely contain escapes).
    """
    start = node.start_mark.index
    raw = src.text[start : node.end_mark.index]
    value = node.value
    j = 0
    if node.style in ('"', "'"):
        j = 1
    elif node.style in ("|", ">"):
        j = raw.find("\n") + 1
    for ch in value[: min(offset, len(value))]:
        k = raw.find(ch, j)
        if k < 0:
            break
        j = k + 1
    if offset < len(value):
        k = raw.find(value[offset], j)
        if k >= 0:
            j = k
    return start + j


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# libyaml's composer when PyYAML was built with it: the same nodes and marks, five times faster
# on a large routing file (the pure-Python scanner is most of the load time).
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# `key: "quoted" more`: YAML reads a scalar that starts with a quote up to its closing quote,
# and anything after it is a syntax error; in a condition that is `when: "vip" in tags`.
_HALF_QUOTED = re.compile(
    r"(?P<key>[A-Za-z_][\w.-]*):[ \t]+"
    r"""(?P<value>(?P<q>["'])[^"'\n]*(?P=q)[ \t]*[^\s,}\]#][^,}\]#\n]*)"""
)


def _quote_hint(text: str, line: int) -> str:
    """A hint for a value that starts with a quote and goes on after it, near ``line``."""
    lines = text.splitlines()
    for n in (line, line - 1):
        if not 0 <= n < len(lines):
            continue
        m = _HALF_QUOTED.search(lines[n])
        if m is None:
            continue
        value = m.group("value").rstrip()
        quoted = "'" + value.replace("'", "''") + "'"
        return (
            f"; the value of {m.group('key')!r} starts with a quote and goes on after it:"
            f" quote the whole expression, e.g. {m.group('key')}: {quoted}"
        )
    return ""


def _compose(src: _Source, problems: list[Problem]) -> yaml.Node | None:
    try:
        node = yaml.compose(src.text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        index = mark.index if mark is not None else 0
        what = exc.problem or "cannot parse"
        if exc.context and exc.context_mark is not None:
            what += f" ({exc.context} at line {exc.context_mark.line + 1})"
        hint = _quote_hint(src.text, mark.line if mark is not None else 0)
        problems.append(src.problem(index, f"bad YAML: {what}{hint}"))
        return None
    except yaml.YAMLError as exc:
        problems.append(src.problem(0, f"bad YAML: {exc}"))
        return None
    if node is None:
        problems.append(src.problem(0, "empty file"))
    return node


# --- experts files -------------------------------------------------------------------------


def _split(cell: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (cell or "").split(";") if part.strip())


def _load_experts_csv(src: _Source, loc: _Locator, problems: list[Problem]) -> list[Expert]:
    # Line by line (experts' cells never span lines), so every row knows its line and columns.
    lines = src.text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None:
        return []
    header = [h.strip() for h in next(csv.reader([lines[header_at]]))]
    header_start = src.line_starts[header_at]
    for i, name in enumerate(header):
        if name not in CSV_COLUMNS:
            index = header_start + _cell_offset(lines[header_at], i)
            known = ", ".join(CSV_COLUMNS)
            problems.append(src.problem(index, f"unknown column {name!r} (known: {known})"))
    if "id" not in header:
        problems.append(src.problem(header_start, "missing column 'id'"))
        return []
    experts: list[Expert] = []
    for n in range(header_at + 1, len(lines)):
        line = lines[n]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        start = src.line_starts[n]
        try:
            row = next(csv.reader([line]))
        except csv.Error as exc:
            problems.append(src.problem(start, f"bad CSV: {exc}"))
            continue
        if len(row) > len(header):
            problems.append(src.problem(start, f"{len(row)} cells but {len(header)} columns"))
            continue
        cells = dict(zip(header, (c.strip() for c in row), strict=False))

        def at(column: str, line: str = line, start: int = start) -> int:
            return start + _cell_offset(line, header.index(column))

        level = 1
        if cells.get("level"):
            try:
                level = int(cells["level"])
            except ValueError:
                message = f"level: expected an integer, got {cells['level']!r}"
                problems.append(src.problem(at("level"), message))
                continue
        if not cells.get("id"):
            problems.append(src.problem(start, "missing expert id"))
            continue
        expert = Expert(
            id=cells["id"],
            name=cells.get("name", ""),
            level=level,
            skills=_split(cells.get("skills")),
            phones=_split(cells.get("phones")),
            emails=_split(cells.get("emails")),
            handles=_split(cells.get("handles")),
        )
        loc.own[id(expert)] = (src, start)
        for name in CSV_COLUMNS:
            if name in header:
                loc.values[(id(expert), name)] = (src, at(name))
        experts.append(expert)
    return experts


def _cell_offset(line: str, column: int) -> int:
    """Where cell ``column`` starts in a CSV line (exact for unquoted cells)."""
    offset = 0
    for _ in range(column):
        comma = line.find(",", offset)
        if comma < 0:
            return 0
        offset = comma + 1
    return offset


def _load_experts_file(
    path: Path, display: str, loc: _Locator, problems: list[Problem]
) -> list[Expert]:
    src = _Source(display, _read(path))
    if path.suffix.lower() == ".csv":
        return _load_experts_csv(src, loc, problems)
    node = _compose(src, problems)
    if node is None:
        return []
    experts = _Converter(src, loc, problems).convert(node, tuple[Expert, ...], "experts")
    return [] if experts is _BAD else list(experts)


# --- semantic checks -----------------------------------------------------------------------


class _Checker:
    def __init__(self, loc: _Locator, problems: list[Problem]) -> None:
        self.loc = loc
        self.problems = problems

    def at(self, obj: object, key: object, message: str, *, on_key: bool = False) -> None:
        src, index = self.loc.at(obj, key, on_key=on_key)
        self.problems.append(src.problem(index, message))

    def skills(self, owner: object, field: str, skills: object, declared: set[str]) -> None:
        """Skill names must be declared; proficiencies (in skill maps) must be 1-5."""
        if isinstance(skills, dict):
            for name, level in skills.items():
                if name not in declared:
                    self.at(skills, name, f"unknown skill {name!r}", on_key=True)
                if not MIN_PROFICIENCY <= level <= MAX_PROFICIENCY:
                    self.at(
                        skills,
                        name,
                        f"proficiency {level} of {name!r} is outside"
                        f" {MIN_PROFICIENCY}-{MAX_PROFICIENCY}",
                    )
        elif isinstance(skills, tuple):
            for i, name in enumerate(skills):
                if name not in declared:
                    where = self.loc.values.get((id(skills), i))
                    if where is not None:
                        self.problems.append(where[0].problem(where[1], f"unknown skill {name!r}"))
                    else:
                        self.at(owner, field, f"unknown skill {name!r}")


def _check(
    file: RoutingFile, experts: list[Expert], loc: _Locator, problems: list[Problem]
) -> None:
    c = _Checker(loc, problems)
    declared: set[str] = set()
    for i, skill in enumerate(file.skills):
        if skill in declared:
            src, index = loc.at(file.skills, i)
            problems.append(src.problem(index, f"skill {skill!r} declared twice"))
        declared.add(skill)

    cap = file.capacity
    if cap.budget <= 0:
        c.at(cap, "budget", "capacity budget must be positive")
    for channel, cost in cap.cost.items():
        if not 0 < cost <= cap.budget:
            c.at(cap.cost, channel, f"cost of {channel} must be between 1 and the budget")
    # A channel that is served or staffed needs a cost; report each missing one once.
    used = {ch for q in file.queues.values() for ch in q.channels}
    used |= {ch for a in file.agents for ch, limit in a.capacity.items() if limit > 0}
    for channel in CHANNELS:
        if channel in used and channel not in cap.cost:
            c.at(cap, "cost", f"capacity cost missing for channel {channel!r}")

    d = file.defaults
    for name in ("offer_timeout",):
        if getattr(d, name) <= 0:
            c.at(d, name, f"{name} must be positive")

    _check_queues(c, file, declared)
    _check_agents(c, file, declared)
    _check_codes(c, file)
    ids: set[str] = set()
    for expert in experts:
        if expert.id in ids:
            c.at(expert, "id", f"duplicate expert id {expert.id!r}")
        ids.add(expert.id)
        c.skills(expert, "skills", expert.skills, declared)
        for i, handle in enumerate(expert.handles):
            if normalize_handle(handle) is None:
                src, index = loc.values.get((id(expert.handles), i), loc.at(expert, "handles"))
                problems.append(
                    src.problem(index, f"handle {handle!r} must be written source:user")
                )
    _check_rules(c, file, declared)


def _check_queues(c: _Checker, file: RoutingFile, declared: set[str]) -> None:
    for name, queue in file.queues.items():
        c.skills(queue, "skills", queue.skills, declared)
        if not queue.channels:
            c.at(queue, "channels", f"queue {name!r} serves no channel")
        if queue.weight <= 0:
            c.at(queue, "weight", "weight must be positive")
        if queue.sla.seconds <= 0:
            c.at(queue.sla, "seconds", "SLA seconds must be positive")
        if not 0 < queue.sla.percent <= 100:
            c.at(queue.sla, "percent", "SLA percent must be in 0-100")
        if queue.max_wait is not None and queue.max_wait <= 0:
            c.at(queue, "max_wait", "max_wait must be positive")
        if queue.max_length is not None and queue.max_length <= 0:
            c.at(queue, "max_length", "max_length must be positive")
        for field in ("wrap_up", "offer_timeout"):
            value = getattr(queue, field)
            if value is not None and value < 0:
                c.at(queue, field, f"{field} must not be negative")
        if not queue.music_class.strip():
            c.at(queue, "music_class", "music_class must not be empty")
        if queue.announcement is not None:
            if queue.announcement.every <= 0:
                c.at(queue.announcement, "every", "announcement every must be positive seconds")
            if not queue.announcement.media.strip():
                c.at(queue.announcement, "media", "announcement media must not be empty")
        if queue.overflow is not None:
            if queue.overflow not in file.queues:
                close = _closest(queue.overflow, file.queues)
                c.at(queue, "overflow", f"queues.{name}: unknown queue {queue.overflow!r}{close}")
            elif queue.max_wait is None and queue.max_length is None:
                c.at(queue, "overflow", "overflow needs max_wait or max_length")
            else:
                seen = [name]
                nxt: str | None = queue.overflow
                while nxt is not None and nxt in file.queues and nxt not in seen:
                    seen.append(nxt)
                    nxt = file.queues[nxt].overflow
                if nxt == name:
                    c.at(queue, "overflow", "overflow loop: " + " -> ".join([*seen, name]))


_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _check_codes(c: _Checker, file: RoutingFile) -> None:
    """Away reasons and dispositions: codes are slugs (they are metric labels), labels set."""
    for section, codes in (
        ("away_reasons", file.away_reasons),
        ("dispositions", file.dispositions),
    ):
        for code, label in codes.items():
            if not _CODE.fullmatch(code):
                c.at(
                    codes,
                    code,
                    f"{section}: code {code!r} must be a lower-case slug (a-z, 0-9, _; "
                    "at most 40 characters)",
                    on_key=True,
                )
            if not label.strip():
                c.at(codes, code, f"{section}: {code!r} needs a label")
    if RELEASED_BY_SUPERVISOR in file.dispositions:
        c.at(
            file.dispositions,
            RELEASED_BY_SUPERVISOR,
            f"dispositions: {RELEASED_BY_SUPERVISOR!r} is built in (a supervisor's release)",
            on_key=True,
        )


def _check_agents(c: _Checker, file: RoutingFile, declared: set[str]) -> None:
    ids: set[str] = set()
    taken: dict[tuple[str, object], str] = {}
    for agent in file.agents:
        if agent.id in ids:
            c.at(agent, "id", f"duplicate agent id {agent.id!r}")
        ids.add(agent.id)
        c.skills(agent, "skills", agent.skills, declared)
        for channel, limit in agent.capacity.items():
            if limit < 0:
                c.at(agent.capacity, channel, "capacity must not be negative")
        if agent.budget is not None and agent.budget <= 0:
            c.at(agent, "budget", "budget must be positive")
        for system in SYSTEMS:
            value = getattr(agent.endpoints, system)
            if value is not None:
                problem = endpoint_problem(system, value)
                if problem is not None:
                    c.at(agent.endpoints, system, problem)
        _check_accounts(c, agent, taken)


def _check_accounts(c: _Checker, agent: Agent, taken: dict[tuple[str, object], str]) -> None:
    """A platform account belongs to one agent; ids are positive, names non-empty."""
    accounts = agent.accounts
    if accounts.chatwoot is not None and accounts.chatwoot <= 0:
        c.at(accounts, "chatwoot", "a Chatwoot user id is a positive number")
    for name in ("rocketchat", "discourse"):
        value = getattr(accounts, name)
        if value is not None and not value.strip():
            c.at(accounts, name, f"the {name} account must not be empty")
    for name in ("chatwoot", "rocketchat", "discourse"):
        value = getattr(accounts, name)
        if value is None:
            continue
        other = taken.setdefault((name, value), agent.id)
        if other != agent.id:
            c.at(accounts, name, f"{name} account {value!r} is already agent {other!r}'s")


def _check_rules(c: _Checker, file: RoutingFile, declared: set[str]) -> None:
    names: set[str] = set()
    defaults = [r for r in file.rules if r.default]
    if not defaults:
        where = c.loc.values.get((id(file), "rules"), (c.loc.root, 0))
        c.problems.append(
            where[0].problem(where[1], "no default rule (the last rule needs 'default: true')")
        )
    for i, rule in enumerate(file.rules):
        if rule.name in names:
            c.at(rule, "name", f"duplicate rule name {rule.name!r}")
        names.add(rule.name)
        if rule.default:
            if rule.when is not None:
                c.at(rule, "when", "the default rule has no 'when'")
            if len(defaults) > 1 and rule is not defaults[0]:
                c.at(rule, "default", "more than one default rule")
            elif i != len(file.rules) - 1:
                c.at(rule, "default", "the default rule must be the last rule")
        elif rule.when is None:
            c.at(rule, "name", "a rule without 'when' must be the default rule (default: true)")
        if rule.reject is None and rule.queue is None:
            c.at(rule, "name", "a rule needs a queue (or reject)")
        if rule.reject is not None and rule.queue is not None:
            c.at(rule, "queue", "a rejecting rule routes to no queue")
        label = f"rules[{i}] ({rule.name})"
        if rule.queue is not None and rule.queue not in file.queues:
            close = _closest(rule.queue, file.queues)
            c.at(rule, "queue", f"{label}: unknown queue {rule.queue!r}{close}")
        c.skills(rule, "skills", rule.skills, declared)
        if rule.crowd_first is not None and rule.crowd_first < 0:
            c.at(rule, "crowd_first", "crowd_first must not be negative")
        previous = 0.0
        for j, step in enumerate(rule.escalate):
            if step.after <= previous:
                c.at(step, "after", "escalation steps need increasing positive 'after' seconds")
            previous = max(previous, step.after)
            if step.queue is not None and step.queue not in file.queues:
                close = _closest(step.queue, file.queues)
                c.at(
                    step,
                    "queue",
                    f"{label}.escalate[{j}]: unknown queue {step.queue!r}{close}",
                )
            if step.skills is not None:
                c.skills(step, "skills", step.skills, declared)
            if step.skills is None and step.queue is None and step.priority is None:
                c.at(step, "after", "an escalation step changes skills, queue or priority")


def _compile_rules(
    file: RoutingFile, loc: _Locator, problems: list[Problem], tz: Any
) -> list[Condition | None]:
    local_time = make_local_time(tz)
    conditions: list[Condition | None] = []
    for rule in file.rules:
        if rule.when is None:
            conditions.append(None)
            continue
        try:
            conditions.append(compile_condition(rule.when, local_time))
        except ExprError as exc:
            conditions.append(None)
            scalar = loc.scalars.get((id(rule), "when"))
            if scalar is not None:
                src, node = scalar
                problems.append(src.problem(_scalar_index(src, node, exc.offset), exc.message))
            else:
                src, index = loc.at(rule, "when")
                problems.append(src.problem(index, exc.message))
    return conditions


def _normalized(expert: Expert, loc: _Locator) -> Expert:
    new = msgspec.structs.replace(
        expert,
        phones=tuple(dict.fromkeys(normalize_phone(p) for p in expert.phones)),
        emails=tuple(dict.fromkeys(normalize_email(e) for e in expert.emails)),
        handles=tuple(dict.fromkeys(h for h in (normalize_handle(x) for x in expert.handles) if h)),
    )
    loc.alias(new, expert, ("id", "name", "level", "skills", "phones", "emails", "handles"))
    return new


def parse_routing(
    text: str, filename: str = "<routing>", base_dir: Path | None = None
) -> RoutingTable:
    """Validate a routing file's text and build its table; raise :class:`RoutingFileError`.

    ``experts_file`` is read relative to ``base_dir`` (default: the current directory).
    """
    problems: list[Problem] = []
    src = _Source(filename, text)
    loc = _Locator(src)
    node = _compose(src, problems)
    if node is None:
        raise RoutingFileError(problems)
    file = _Converter(src, loc, problems).convert(node, RoutingFile, "")
    if file is _BAD:
        raise RoutingFileError(problems)
    assert isinstance(file, RoutingFile)

    experts = list(file.experts)
    if file.experts_file is not None:
        path = (base_dir or Path.cwd()) / file.experts_file
        display = str(Path(os.path.dirname(filename)) / file.experts_file)
        try:
            experts += _load_experts_file(path, display, loc, problems)
        except (OSError, UnicodeDecodeError) as exc:
            where = loc.at(file, "experts_file")
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(
                where[0].problem(where[1], f"cannot read experts file {str(path)!r}: {reason}")
            )

    tz: Any = ZoneInfo("UTC")
    try:
        tz = ZoneInfo(file.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        c = _Checker(loc, problems)
        c.at(file, "timezone", f"unknown timezone {file.timezone!r}")

    _check(file, experts, loc, problems)
    conditions = _compile_rules(file, loc, problems, tz)
    if problems:
        raise RoutingFileError(problems)
    return RoutingTable(file, [_normalized(e, loc) for e in experts], conditions, tz)


def load_routing(path: str | os.PathLike[str]) -> RoutingTable:
    """Read, validate and build a routing file (and its experts file, relative to it)."""
    p = Path(path)
    try:
        text = _read(p)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RoutingFileError([Problem(str(path), 1, 1, f"cannot read: {reason}")]) from None
    return parse_routing(text, str(path), p.parent)


def load_routing_or_problems(
    path: str | os.PathLike[str],
) -> tuple[RoutingTable | None, tuple[Problem, ...]]:
    """The table and no problems, or None and every problem of a file that does not validate.

    Nothing is printed or logged: each caller reports the problems its own way (``stellwerk
    run`` and the other commands print one ``file:line:column: message`` line each).
    """
    try:
        return load_routing(path), ()
    except RoutingFileError as exc:
        return None, tuple(exc.problems)


def build_table(file: RoutingFile, base_dir: Path | None = None) -> RoutingTable:
    """Validate and build a table from a :class:`RoutingFile` made in code (tests, tools).

    Positions in its errors refer to the file's YAML rendering.
    """
    return parse_routing(msgspec.yaml.encode(file).decode(), "<routing>", base_dir)
