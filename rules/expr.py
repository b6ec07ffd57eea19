"""The condition language of routing rules: lexer, parser, type checker and compiler.

A rule's ``when`` is parsed once at load time into a small syntax tree, type-checked, and
compiled into nested Python closures. User text is never handed to ``eval``/``exec``/``compile``;
the only things built from it are literals, frozensets and ``re`` patterns.

Grammar (lowest precedence first)::

    expr       := and ("or" and)*
    and        := unary ("and" unary)*
    unary      := "not" unary | comparison
    comparison := primary [("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in" | "~") primary]
    primary    := "(" expr ")" | FIELD | STRING | INT | "true" | "false" | "[" literals "]"

Every node keeps its start and end offset in the expression text, so errors point at the
offending token and ``explain`` can quote the sub-condition it is talking about.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import msgspec

from channels.contact_event import CHANNELS, ContactEvent
from rules.decision import CustomerView

# A compiled predicate or value getter: (event, customer, now) -> value.
Getter = Callable[[ContactEvent, CustomerView, float], Any]

WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
KINDS: tuple[str, ...] = ("new", "update", "end")

STR, INT, BOOL, TAGS = "str", "int", "bool", "tags (list of str)"
LIST_STR, LIST_INT, LIST_EMPTY = "list of str", "list of int", "empty list"

# Field name -> type. ``attributes.NAME`` is handled apart (any NAME, type str).
FIELD_TYPES: dict[str, str] = {
    "kind": STR,
    "channel": STR,
    "source": STR,
    "to": STR,
    "subject": STR,
    "text": STR,
    "language": STR,
    "tags": TAGS,
    "sender.phone": STR,
    "sender.email": STR,
    "sender.handle": STR,
    "sender.name": STR,
    "customer.id": STR,
    "customer.known": BOOL,
    "customer.expert": BOOL,
    "customer.vip": BOOL,
    "customer.expert_level": INT,
    "customer.contacts": INT,
    "hour": INT,
    "minute": INT,
    "weekday": STR,
}

# Fields whose possible values are known: comparing them with anything else is a typo.
FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "channel": CHANNELS,
    "weekday": WEEKDAYS,
}


class ExprError(Exception):
    """A syntax or type error at ``offset`` (0-based) in the expression text."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


# --- syntax tree ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """A field reference such as ``customer.expert`` or ``attributes.plan``."""

    name: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Literal:
    """A string, integer or boolean literal."""

    value: str | int | bool
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ListLit:
    """A list literal; only allowed on the right of ``in``."""

    items: tuple[Literal, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Compare:
    """A binary comparison; ``op`` is one of ``== != < <= > >= in notin ~``."""

    op: str
    left: Node
    right: Node
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Not:
    """Logical negation."""

    operand: Node
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class BoolOp:
    """An n-ary ``and`` / ``or``."""

    op: str
    items: tuple[Node, ...]
    start: int
    end: int


Node = Field | Literal | ListLit | Compare | Not | BoolOp


# --- lexer ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<int>-?[0-9]+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)
  | (?P<op>==|!=|<=|>=|<|>|~|\(|\)|\[|\]|,)
    """,
    re.VERBOSE | re.DOTALL,
)
_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


@dataclass(frozen=True, slots=True)
class Token:
    """One token: ``kind`` is str, int, name, kw, op or end."""

    kind: str
    text: str
    start: int
    end: int


def _unescape(body: str) -> str:
    # Unknown escapes keep their backslash so that regular expressions such as "\d{5}" read
    # naturally; the known ones are the usual C escapes.
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens, ending with an ``end`` token; raise :class:`ExprError`."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "\"'":
                raise ExprError("unterminated string", pos)
            if ch == "=":
                raise ExprError("unexpected '=' (use '==' to compare)", pos)
            if ch in "&|!":
                raise ExprError(f"unexpected {ch!r} (use and, or, not)", pos)
            raise ExprError(f"unexpected character {ch!r}", pos)
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            word = m.group()
            if kind == "name" and word in _KEYWORDS:
                kind = "kw"
            tokens.append(Token(kind, word, m.start(), m.end()))
        pos = m.end()
    tokens.append(Token("end", "", len(text), len(text)))
    return tokens


# --- parser --------------------------------------------------------------------------------

MAX_NESTING = 64
_CMP_OPS = frozenset({"==", "!=", "<", "<=", ">", ">=", "~"})


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def _next(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def _is(self, kind: str, text: str | None = None) -> bool:
        tok = self.tok
        return tok.kind == kind and (text is None or tok.text == text)

    def _unexpected(self, expected: str) -> ExprError:
        tok = self.tok
        found = "end of expression" if tok.kind == "end" else repr(tok.text)
        return ExprError(f"expected {expected}, found {found}", tok.start)

    def parse(self) -> Node:
        if self._is("end"):
            raise ExprError("empty condition", 0)
        node = self._or()
        if not self._is("end"):
            if (self.tok.kind == "op" and self.tok.text in _CMP_OPS) or self._is("kw", "in"):
                raise ExprError(
                    "chained comparison; combine comparisons with 'and'", self.tok.start
                )
            raise self._unexpected("'and', 'or' or end of expression")
        return node

    def _or(self) -> Node:
        items = [self._and()]
        while self._is("kw", "or"):
            self._next()
            items.append(self._and())
        if len(items) == 1:
            return items[0]
        return BoolOp("or", tuple(items), items[0].start, items[-1].end)

    def _and(self) -> Node:
        items = [self._unary()]
        while self._is("kw", "and"):
            self._next()
            items.append(self._unary())
        if len(items) == 1:
            return items[0]
        return BoolOp("and", tuple(items), items[0].start, items[-1].end)

    def _nest(self, start: int) -> None:
        # Bounded nesting keeps the recursive parser, checker and compiler off Python's
        # recursion limit whatever the file says.
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ExprError(f"condition nested more than {MAX_NESTING} levels deep", start)

    def _unary(self) -> Node:
        if self._is("kw", "not"):
            start = self._next().start
            self._nest(start)
            operand = self._unary()
            self.depth -= 1
            return Not(operand, start, operand.end)
        return self._comparison()

    def _comparison(self) -> Node:
        left = self._primary()
        tok = self.tok
        if tok.kind == "op" and tok.text in _CMP_OPS:
            op = self._next().text
        elif self._is("kw", "in"):
            self._next()
            op = "in"
        elif (
            self._is("kw", "not")
            and self.tokens[self.i + 1].kind == "kw"
            and self.tokens[self.i + 1].text == "in"
        ):
            self.i += 2
            op = "notin"
        else:
            return left
        right = self._primary()
        return Compare(op, left, right, left.start, right.end)

    def _primary(self) -> Node:
        tok = self.tok
        if tok.kind == "op" and tok.text == "(":
            self._nest(self._next().start)
            inner = self._or()
            self.depth -= 1
            if not self._is("op", ")"):
                raise self._unexpected("')'")
            self._next()
            return inner
        if tok.kind == "op" and tok.text == "[":
            return self._list()
        if tok.kind == "name":
            self._next()
            return Field(tok.text, tok.start, tok.end)
        literal = self._literal()
        if literal is not None:
            return literal
        raise self._unexpected("a field, a literal or '('")

    def _literal(self) -> Literal | None:
        tok = self.tok
        if tok.kind == "str":
            self._next()
            return Literal(_unescape(tok.text[1:-1]), tok.start, tok.end)
        if tok.kind == "int":
            self._next()
            return Literal(int(tok.text), tok.start, tok.end)
        if tok.kind == "kw" and tok.text in ("true", "false"):
            self._next()
            return Literal(tok.text == "true", tok.start, tok.end)
        return None

    def _list(self) -> ListLit:
        start = self._next().start
        items: list[Literal] = []
        while not self._is("op", "]"):
            literal = self._literal()
            if literal is None:
                raise self._unexpected("a literal or ']'")
            items.append(literal)
            if self._is("op", ","):
                self._next()
            elif not self._is("op", "]"):
                raise self._unexpected("',' or ']'")
        end = self._next().end
        return ListLit(tuple(items), start, end)


def parse(text: str) -> Node:
    """Parse ``text`` into a syntax tree; raise :class:`ExprError` on bad syntax."""
    return _Parser(text).parse()


# --- type checker --------------------------------------------------------------------------


def _field_type(node: Field) -> str:
    if node.name.startswith("attributes."):
        return STR
    found = FIELD_TYPES.get(node.name)
    if found is None:
        known = [*FIELD_TYPES, "attributes.NAME"]
        close = difflib.get_close_matches(node.name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ExprError(f"unknown field {node.name!r}{hint}", node.start)
    return found


def _literal_type(value: object) -> str:
    if isinstance(value, bool):
        return BOOL
    return INT if isinstance(value, int) else STR


def _describe(node: Node, text: str) -> str:
    return f"{text[node.start : node.end]} ({_type_of(node, text)})"


def _type_of(node: Node, text: str) -> str:
    """The type of ``node``; raises :class:`ExprError` at the first offending token."""
    if isinstance(node, Field):
        return _field_type(node)
    if isinstance(node, Literal):
        return _literal_type(node.value)
    if isinstance(node, ListLit):
        if not node.items:
            return LIST_EMPTY
        first = _literal_type(node.items[0].value)
        for element in node.items[1:]:
            if _literal_type(element.value) != first:
                raise ExprError("list literal mixes types", element.start)
        if first == BOOL:
            raise ExprError("lists of booleans are not supported", node.start)
        return LIST_STR if first == STR else LIST_INT
    if isinstance(node, Not):
        _expect_bool(node.operand, text)
        return BOOL
    if isinstance(node, BoolOp):
        for item in node.items:
            _expect_bool(item, text)
        return BOOL
    return _check_compare(node, text)


def _expect_bool(node: Node, text: str) -> None:
    found = _type_of(node, text)
    if found != BOOL:
        raise ExprError(
            f"expected a condition, got {text[node.start : node.end]} ({found});"
            " compare it with something",
            node.start,
        )


def _is_list(kind: str) -> bool:
    return kind in (TAGS, LIST_STR, LIST_INT, LIST_EMPTY)


def _check_compare(node: Compare, text: str) -> str:
    left, right = node.left, node.right
    lt, rt = _type_of(left, text), _type_of(right, text)
    op = node.op
    if op in ("in", "notin"):
        if isinstance(right, ListLit):
            if _is_list(lt):
                raise ExprError(f"{_describe(left, text)} cannot be in a list", left.start)
            if rt != LIST_EMPTY and rt != ("list of " + lt):
                raise ExprError(
                    f"type mismatch: {_describe(left, text)} in {_describe(right, text)}",
                    right.start,
                )
            _check_known_values(left, [i for i in right.items], text)
            return BOOL
        if rt == TAGS:
            if lt != STR:
                raise ExprError(f"only strings can be in tags, not {lt}", left.start)
            return BOOL
        raise ExprError("'in' needs a list literal or tags on the right", right.start)
    if _is_list(lt) or isinstance(left, ListLit):
        hint = ' (use "x" in tags)' if lt == TAGS else ""
        raise ExprError(f"cannot compare a list with {op!r}{hint}", left.start)
    if _is_list(rt) or isinstance(right, ListLit):
        raise ExprError(f"cannot compare a list with {op!r}", right.start)
    if op == "~":
        if lt != STR:
            raise ExprError(f"'~' needs a string on the left, got {lt}", left.start)
        if not isinstance(right, Literal) or not isinstance(right.value, str):
            raise ExprError("'~' needs a string literal (a regular expression)", right.start)
        try:
            re.compile(right.value)
        except re.error as exc:
            # re.error knows where in the pattern; the literal's opening quote comes first.
            where = right.start + 1 + exc.pos if exc.pos is not None else right.start
            raise ExprError(f"bad regular expression: {exc.msg}", where) from None
        return BOOL
    if lt != rt:
        raise ExprError(
            f"type mismatch: {_describe(left, text)} {op} {_describe(right, text)}", right.start
        )
    if op not in ("==", "!=") and lt == BOOL:
        raise ExprError(f"cannot order booleans with {op!r}", left.start)
    if op in ("==", "!="):
        if isinstance(right, Literal):
            _check_known_values(left, [right], text)
        if isinstance(left, Literal):
            _check_known_values(right, [left], text)
    return BOOL


def _check_known_values(field: Node, literals: list[Literal], text: str) -> None:
    if not isinstance(field, Field) or field.name not in FIELD_VALUES:
        return
    allowed = FIELD_VALUES[field.name]
    for lit in literals:
        if lit.value not in allowed:
            raise ExprError(
                f"{field.name} is never {lit.value!r} (one of: {', '.join(allowed)})", lit.start
            )


def check(node: Node, text: str) -> None:
    """Type-check a whole condition: it must be a boolean; raise :class:`ExprError`."""
    _expect_bool(node, text)


# --- compiler ------------------------------------------------------------------------------


def _kind(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.kind


def _channel(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.channel


def _source(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.source


def _to(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.to or ""


def _subject(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.subject or ""


def _text(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.text or ""


def _language(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.language or ""


def _tags(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.tags


def _sender_phone(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.sender.phone or ""


def _sender_email(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.sender.email or ""


def _sender_handle(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.sender.handle or ""


def _sender_name(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return e.sender.name or ""


def _customer_id(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return c.id


def _customer_known(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return c.known


def _customer_expert(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return c.expert


def _customer_vip(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return c.vip


def _customer_expert_level(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return c.expert_level


def _customer_contacts(e: ContactEvent, c: CustomerView, n: float) -> Any:
    return c.contacts


_GETTERS: dict[str, Getter] = {
    "kind": _kind,
    "channel": _channel,
    "source": _source,
    "to": _to,
    "subject": _subject,
    "text": _text,
    "language": _language,
    "tags": _tags,
    "sender.phone": _sender_phone,
    "sender.email": _sender_email,
    "sender.handle": _sender_handle,
    "sender.name": _sender_name,
    "customer.id": _customer_id,
    "customer.known": _customer_known,
    "customer.expert": _customer_expert,
    "customer.vip": _customer_vip,
    "customer.expert_level": _customer_expert_level,
    "customer.contacts": _customer_contacts,
}


class LocalClock:
    """Local time of an epoch in one timezone: ``clock(now) -> (hour, minute, weekday)``.

    Remembers the last second asked for: the engine asks about the same second many times in
    a row, and a zoneinfo conversion costs more than the rest of a decision. ``hour``,
    ``minute`` and ``weekday`` are field getters with the predicate signature, so a condition
    on the clock costs one call.
    """

    __slots__ = ("_last", "_second", "tz")

    def __init__(self, tz: tzinfo) -> None:
        self.tz = tz
        self._second: int | None = None
        self._last: tuple[int, int, str] = (0, 0, "mon")

    def __call__(self, now: float) -> tuple[int, int, str]:
        second = int(now // 1)
        if second != self._second:
            dt = datetime.fromtimestamp(second, self.tz)
            self._last = (dt.hour, dt.minute, WEEKDAYS[dt.weekday()])
            self._second = second
        return self._last

    def hour(self, e: ContactEvent, c: CustomerView, n: float) -> Any:
        """The local hour (0-23)."""
        return (self._last if int(n // 1) == self._second else self(n))[0]

    def minute(self, e: ContactEvent, c: CustomerView, n: float) -> Any:
        """The local minute (0-59)."""
        return (self._last if int(n // 1) == self._second else self(n))[1]

    def weekday(self, e: ContactEvent, c: CustomerView, n: float) -> Any:
        """The local weekday, ``mon`` .. ``sun``."""
        return (self._last if int(n // 1) == self._second else self(n))[2]


LocalTime = LocalClock


def field_getter(name: str, local_time: LocalTime) -> Getter:
    """The getter of a (type-checked) field name."""
    if name.startswith("attributes."):
        key = name[len("attributes.") :]

        def attribute(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return e.attributes.get(key, "")

        return attribute
    if name == "hour":
        return local_time.hour
    if name == "minute":
        return local_time.minute
    if name == "weekday":
        return local_time.weekday
    return _GETTERS[name]


_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _const(value: object) -> Getter:
    def constant(e: ContactEvent, c: CustomerView, n: float) -> Any:
        return value

    return constant


def _compile(node: Node, local_time: LocalTime) -> Getter:
    if isinstance(node, Field):
        return field_getter(node.name, local_time)
    if isinstance(node, Literal):
        return _const(node.value)
    if isinstance(node, Not):
        inner = _compile(node.operand, local_time)

        def negate(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return not inner(e, c, n)

        return negate
    if isinstance(node, BoolOp):
        return _compile_boolop(node, local_time)
    if isinstance(node, Compare):
        return _compile_compare(node, local_time)
    raise TypeError(f"cannot compile {node!r}")  # lists only appear inside 'in'


def _compile_boolop(node: BoolOp, local_time: LocalTime) -> Getter:
    parts = tuple(_compile(item, local_time) for item in node.items)
    # Two-operand forms are by far the most common; spelling them out saves a loop per call.
    if node.op == "and":
        if len(parts) == 2:
            a, b = parts

            def and2(e: ContactEvent, c: CustomerView, n: float) -> Any:
                return a(e, c, n) and b(e, c, n)

            return and2

        def and_n(e: ContactEvent, c: CustomerView, n: float) -> Any:
            # A plain loop: all() over a generator costs a frame per call on the hot path.
            for part in parts:  # noqa: SIM110
                if not part(e, c, n):
                    return False
            return True

        return and_n
    if len(parts) == 2:
        a, b = parts

        def or2(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return a(e, c, n) or b(e, c, n)

        return or2

    def or_n(e: ContactEvent, c: CustomerView, n: float) -> Any:
        for part in parts:  # noqa: SIM110
            if part(e, c, n):
                return True
        return False

    return or_n


def _compile_compare(node: Compare, local_time: LocalTime) -> Getter:
    op = node.op
    left = _compile(node.left, local_time)
    right_node = node.right
    if op in ("in", "notin"):
        if isinstance(right_node, ListLit):
            members = frozenset(item.value for item in right_node.items)
            if op == "in":

                def in_list(e: ContactEvent, c: CustomerView, n: float) -> Any:
                    return left(e, c, n) in members

                return in_list

            def not_in_list(e: ContactEvent, c: CustomerView, n: float) -> Any:
                return left(e, c, n) not in members

            return not_in_list
        container = _compile(right_node, local_time)
        if op == "in":

            def in_tags(e: ContactEvent, c: CustomerView, n: float) -> Any:
                return left(e, c, n) in container(e, c, n)

            return in_tags

        def not_in_tags(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return left(e, c, n) not in container(e, c, n)

        return not_in_tags
    if op == "~":
        assert isinstance(right_node, Literal) and isinstance(right_node.value, str)
        search = re.compile(right_node.value).search

        def matches(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return search(left(e, c, n)) is not None

        return matches
    compare = _OPERATORS[op]
    if isinstance(right_node, Literal):
        return _compare_const(op, left, right_node.value)
    right = _compile(right_node, local_time)

    def cmp(e: ContactEvent, c: CustomerView, n: float) -> Any:
        return compare(left(e, c, n), right(e, c, n))

    return cmp


def _compare_const(op: str, left: Getter, value: Any) -> Getter:
    # One closure per operator: calling operator.xx from a generic closure costs a call more.
    if op == "==":

        def eq(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return left(e, c, n) == value

        return eq
    if op == "!=":

        def ne(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return left(e, c, n) != value

        return ne
    if op == "<":

        def lt(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return left(e, c, n) < value

        return lt
    if op == "<=":

        def le(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return left(e, c, n) <= value

        return le
    if op == ">":

        def gt(e: ContactEvent, c: CustomerView, n: float) -> Any:
            return left(e, c, n) > value

        return gt

    def ge(e: ContactEvent, c: CustomerView, n: float) -> Any:
        return left(e, c, n) >= value

    return ge


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed, type-checked and compiled condition."""

    text: str
    tree: Node
    predicate: Getter


def compile_condition(text: str, local_time: LocalTime) -> Condition:
    """Parse, type-check and compile ``text``; raise :class:`ExprError` with the offset."""
    tree = parse(text)
    check(tree, text)
    return Condition(text, tree, _compile(tree, local_time))


# --- guards for the rule index ------------------------------------------------------------

INDEXED_FIELDS: tuple[str, ...] = ("channel", "source", "to")


def _guard(node: Node) -> tuple[str, frozenset[str]] | None:
    if not isinstance(node, Compare):
        return None
    if node.op == "==":
        for a, b in ((node.left, node.right), (node.right, node.left)):
            if (
                isinstance(a, Field)
                and a.name in INDEXED_FIELDS
                and isinstance(b, Literal)
                and isinstance(b.value, str)
            ):
                return a.name, frozenset({b.value})
    elif (
        node.op == "in"
        and isinstance(node.left, Field)
        and node.left.name in INDEXED_FIELDS
        and isinstance(node.right, ListLit)
    ):
        return node.left.name, frozenset(str(item.value) for item in node.right.items)
    elif (
        node.op == "in"
        and isinstance(node.left, Literal)
        and isinstance(node.left.value, str)
        and isinstance(node.right, Field)
        and node.right.name == "tags"
    ):
        return "tags", frozenset({node.left.value})
    return None


def _conjuncts(tree: Node) -> tuple[Node, ...]:
    return tree.items if isinstance(tree, BoolOp) and tree.op == "and" else (tree,)


def guards(tree: Node) -> dict[str, frozenset[str]]:
    """Equality/membership guards on indexed fields among the top-level ``and`` conjuncts.

    A rule with guard ``{"channel": {"chat", "email"}}`` cannot match an event whose channel is
    anything else; two guards on the same field intersect. ``tags`` is different: its set
    holds the tags an event must *all* carry (from conjuncts like ``"billing" in tags``).
    """
    found: dict[str, frozenset[str]] = {}
    for node in _conjuncts(tree):
        guard = _guard(node)
        if guard is not None:
            field, values = guard
            if field not in found:
                found[field] = values
            elif field == "tags":
                found[field] = found[field] | values
            else:
                found[field] = found[field] & values
    return found


def regex_conjuncts(tree: Node) -> list[tuple[str, str]]:
    """``(field, pattern)`` of each top-level ``and`` conjunct of the form ``field ~ "re"``:
    the rule cannot hold unless each of these patterns matches its field."""
    found = []
    for node in _conjuncts(tree):
        if (
            isinstance(node, Compare)
            and node.op == "~"
            and isinstance(node.left, Field)
            and isinstance(node.right, Literal)
            and isinstance(node.right.value, str)
        ):
            found.append((node.left.name, node.right.value))
    return found


def residual_predicate(tree: Node, local_time: LocalTime) -> Getter | None:
    """The predicate without its guards (None: nothing left), for rules the index selected.

    The index only offers a rule for events that satisfy all its guards, so evaluating them
    again would be wasted work on the hot path.
    """
    rest = [node for node in _conjuncts(tree) if _guard(node) is None]
    if not rest:
        return None
    if len(rest) == 1:
        return _compile(rest[0], local_time)
    return _compile(BoolOp("and", tuple(rest), rest[0].start, rest[-1].end), local_time)


# --- tracing for explain -------------------------------------------------------------------


class Seen(msgspec.Struct, frozen=True, kw_only=True):
    """One leaf condition as evaluated: its text, its result, and the field values it saw."""

    condition: str
    result: bool
    values: dict[str, Any] = msgspec.field(default_factory=dict)


def _fields_in(node: Node) -> list[Field]:
    if isinstance(node, Field):
        return [node]
    if isinstance(node, Compare):
        return _fields_in(node.left) + _fields_in(node.right)
    if isinstance(node, Not):
        return _fields_in(node.operand)
    if isinstance(node, BoolOp):
        return [f for item in node.items for f in _fields_in(item)]
    return []


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def explain_tree(
    cond: Condition,
    local_time: LocalTime,
    event: ContactEvent,
    customer: CustomerView,
    now: float,
) -> tuple[bool, list[Seen]]:
    """Evaluate ``cond`` and say why: the leaves that decided the result, with their values.

    For a true ``and`` every conjunct is decisive, for a false one the first false conjunct;
    for ``or`` the reverse. ``not`` passes its operand's reasons through.
    """
    text = cond.text

    def value(node: Node) -> Any:
        return _compile(node, local_time)(event, customer, now)

    def why(node: Node) -> tuple[bool, list[Seen]]:
        if isinstance(node, BoolOp):
            results = []
            for item in node.items:
                result, seen = why(item)
                results.append((result, seen))
                # Short-circuit exactly like the compiled predicate.
                if result != (node.op == "and"):
                    return result, seen
            return node.op == "and", [s for _, seen in results for s in seen]
        if isinstance(node, Not):
            result, seen = why(node.operand)
            return not result, seen
        result = bool(value(node))
        values = {f.name: _shown(value(f)) for f in _fields_in(node)}
        if result and isinstance(node, Compare) and node.op == "~":
            # Show what the pattern found: that is usually the whole reason.
            assert isinstance(node.right, Literal) and isinstance(node.right.value, str)
            found = re.search(node.right.value, value(node.left))
            if found is not None:
                values["matched"] = found.group()
        return result, [Seen(condition=text[node.start : node.end], result=result, values=values)]

    return why(cond.tree)
