"""The compiled predicate agrees with a plain reference interpreter, for any expression.

Random expression trees are rendered to text (with only the parentheses precedence needs, and
both quote styles), parsed, type-checked and compiled by ``rules.expr``; the reference below
evaluates the same tree directly over field values computed the obvious way.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from channels.contact_event import ContactEvent, Sender
from rules.decision import CustomerView
from rules.expr import compile_condition
from rules.table import make_local_time

TZ = ZoneInfo("Europe/Berlin")
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
CHANNELS = ["phone", "email", "chat", "social"]
KINDS = ["new", "update", "end"]

# Small alphabets so that equalities and regexes hit often; quotes and backslashes on purpose.
WORDS = ["", "a", "b", "ab", "Ab", "ba", "x", "a'b", 'q"', "back\\slash", "Rechnung", "ü"]
INTS = [-1, 0, 1, 2, 3, 7, 8, 20, 59]
PATTERNS = ["a", "^b", "(?i)ab", "b$", "a|x", "[xy]", "(?i)rechnung", "\\\\"]

FREE_STR_FIELDS = [
    "source",
    "to",
    "subject",
    "text",
    "language",
    "sender.phone",
    "sender.email",
    "sender.handle",
    "sender.name",
    "customer.id",
    "attributes.plan",
    "attributes.x-y",
]
ENUM_FIELDS = {"channel": CHANNELS, "kind": KINDS, "weekday": WEEKDAYS}
INT_FIELDS = ["customer.expert_level", "customer.contacts", "hour", "minute"]
BOOL_FIELDS = ["customer.known", "customer.expert", "customer.vip"]
ORDER_OPS = ["==", "!=", "<", "<=", ">", ">="]


# --- trees -----------------------------------------------------------------------------------

Tree = tuple[Any, ...]


def _str_compare() -> st.SearchStrategy[Tree]:
    free = st.tuples(
        st.just("cmp"),
        st.sampled_from(ORDER_OPS),
        st.sampled_from(FREE_STR_FIELDS),
        st.sampled_from(WORDS),
        st.booleans(),
    )
    enum = st.sampled_from(sorted(ENUM_FIELDS)).flatmap(
        lambda f: st.tuples(
            st.just("cmp"),
            st.sampled_from(ORDER_OPS),
            st.just(f),
            st.sampled_from(ENUM_FIELDS[f]),
            st.booleans(),
        )
    )
    return free | enum


def _int_compare() -> st.SearchStrategy[Tree]:
    return st.tuples(
        st.just("cmp"),
        st.sampled_from(ORDER_OPS),
        st.sampled_from(INT_FIELDS),
        st.sampled_from(INTS),
        st.booleans(),
    )


def _field_vs_field() -> st.SearchStrategy[Tree]:
    strs = st.tuples(
        st.just("ff"),
        st.sampled_from(ORDER_OPS),
        st.sampled_from(FREE_STR_FIELDS),
        st.sampled_from(FREE_STR_FIELDS),
    )
    ints = st.tuples(
        st.just("ff"),
        st.sampled_from(ORDER_OPS),
        st.sampled_from(INT_FIELDS),
        st.sampled_from(INT_FIELDS),
    )
    bools = st.tuples(
        st.just("ff"),
        st.sampled_from(["==", "!="]),
        st.sampled_from(BOOL_FIELDS),
        st.sampled_from(BOOL_FIELDS),
    )
    return strs | ints | bools


def _membership() -> st.SearchStrategy[Tree]:
    neg = st.booleans()
    free = st.tuples(
        st.just("in"),
        neg,
        st.sampled_from(FREE_STR_FIELDS),
        st.lists(st.sampled_from(WORDS), max_size=4),
    )
    enum = st.sampled_from(sorted(ENUM_FIELDS)).flatmap(
        lambda f: st.tuples(
            st.just("in"),
            neg,
            st.just(f),
            st.lists(st.sampled_from(ENUM_FIELDS[f]), max_size=4),
        )
    )
    ints = st.tuples(
        st.just("in"), neg, st.sampled_from(INT_FIELDS), st.lists(st.sampled_from(INTS), max_size=4)
    )
    tags = st.tuples(st.just("intags"), neg, st.sampled_from(WORDS))
    return free | enum | ints | tags


def _leaf() -> st.SearchStrategy[Tree]:
    return (
        st.tuples(st.just("bool"), st.sampled_from(BOOL_FIELDS))
        | st.tuples(st.just("lit"), st.booleans())
        | st.tuples(
            st.just("match"),
            st.sampled_from([*FREE_STR_FIELDS, *ENUM_FIELDS]),
            st.sampled_from(PATTERNS),
        )
        | _str_compare()
        | _int_compare()
        | _field_vs_field()
        | _membership()
    )


trees: st.SearchStrategy[Tree] = st.recursive(
    _leaf(),
    lambda inner: (
        st.tuples(st.just("not"), inner)
        | st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=4))
    ),
    max_leaves=12,
)


# --- rendering -------------------------------------------------------------------------------


def lit(value: Any, double: bool = True) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    quote = '"' if double else "'"
    body = value.replace("\\", "\\\\").replace(quote, "\\" + quote)
    return quote + body + quote


PREC = {"or": 1, "and": 2, "not": 3}


def render(tree: Tree, parent: int = 0) -> str:
    kind = tree[0]
    if kind in ("and", "or"):
        text = f" {kind} ".join(render(t, PREC[kind]) for t in tree[1])
        # A nested and/or of the same kind needs no parentheses, but say them for lower ones.
        return f"({text})" if PREC[kind] < parent else text
    if kind == "not":
        return f"not {render(tree[1], PREC['not'])}"
    if kind == "bool":
        return tree[1]
    if kind == "lit":
        return lit(tree[1])
    if kind == "match":
        return f"{tree[1]} ~ {lit(tree[2])}"
    if kind == "cmp":
        _, op, field, value, swapped = tree
        double = len(field) % 2 == 0
        if swapped:
            return f"{lit(value, double)} {op} {field}"
        return f"{field} {op} {lit(value, double)}"
    if kind == "ff":
        return f"{tree[2]} {tree[1]} {tree[3]}"
    if kind == "in":
        _, neg, field, items = tree
        inner = ", ".join(lit(v, i % 2 == 0) for i, v in enumerate(items))
        return f"{field} {'not in' if neg else 'in'} [{inner}]"
    if kind == "intags":
        return f"{lit(tree[2])} {'not in' if tree[1] else 'in'} tags"
    raise AssertionError(kind)


# --- the reference ---------------------------------------------------------------------------


def environment(event: ContactEvent, customer: CustomerView, now: float) -> dict[str, Any]:
    # Whole seconds: datetime rounds a float to microseconds, which can carry 23:59:59.9999998
    # over to the next day; the clock fields of that instant are those of its whole second.
    local = datetime.fromtimestamp(math.floor(now), TZ)
    env: dict[str, Any] = {
        "kind": event.kind,
        "channel": event.channel,
        "source": event.source,
        "to": event.to or "",
        "subject": event.subject or "",
        "text": event.text or "",
        "language": event.language or "",
        "tags": list(event.tags),
        "sender.phone": event.sender.phone or "",
        "sender.email": event.sender.email or "",
        "sender.handle": event.sender.handle or "",
        "sender.name": event.sender.name or "",
        "customer.id": customer.id,
        "customer.known": customer.known,
        "customer.expert": customer.expert,
        "customer.vip": customer.vip,
        "customer.expert_level": customer.expert_level,
        "customer.contacts": customer.contacts,
        "hour": local.hour,
        "minute": local.minute,
        "weekday": WEEKDAYS[local.weekday()],
    }
    for name in ("plan", "x-y"):
        env[f"attributes.{name}"] = event.attributes.get(name, "")
    return env


OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def reference(tree: Tree, env: dict[str, Any]) -> bool:
    kind = tree[0]
    if kind == "and":
        return all(reference(t, env) for t in tree[1])
    if kind == "or":
        return any(reference(t, env) for t in tree[1])
    if kind == "not":
        return not reference(tree[1], env)
    if kind == "bool":
        return bool(env[tree[1]])
    if kind == "lit":
        return bool(tree[1])
    if kind == "match":
        return re.search(tree[2], env[tree[1]]) is not None
    if kind == "cmp":
        _, op, field, value, swapped = tree
        a, b = (value, env[field]) if swapped else (env[field], value)
        return bool(OPS[op](a, b))
    if kind == "ff":
        return bool(OPS[tree[1]](env[tree[2]], env[tree[3]]))
    if kind == "in":
        _, neg, field, items = tree
        return (env[field] in items) != neg
    if kind == "intags":
        return (tree[2] in env["tags"]) != tree[1]
    raise AssertionError(kind)


# --- contacts --------------------------------------------------------------------------------

text = st.sampled_from(WORDS) | st.text(alphabet="abxyRü\\'\"", max_size=8)
opt_text = st.none() | text
events = st.builds(
    ContactEvent,
    kind=st.sampled_from(KINDS),
    contact_id=st.just("generic:1"),
    channel=st.sampled_from(CHANNELS),
    source=text,
    external_id=st.just("1"),
    sender=st.builds(Sender, phone=opt_text, email=opt_text, handle=opt_text, name=opt_text),
    to=opt_text,
    subject=opt_text,
    text=opt_text,
    language=opt_text,
    tags=st.lists(st.sampled_from(WORDS), max_size=3).map(tuple),
    attributes=st.dictionaries(st.sampled_from(["plan", "x-y", "other"]), text, max_size=2),
)
customers = st.builds(
    CustomerView,
    id=text,
    known=st.booleans(),
    expert=st.booleans(),
    expert_level=st.sampled_from(INTS),
    vip=st.booleans(),
    contacts=st.sampled_from(INTS),
)
# 2026, across the DST switches, so hour/minute/weekday see both offsets.
moments = st.floats(min_value=1767225600, max_value=1798761600, allow_nan=False)


@settings(max_examples=600, deadline=None)
@given(tree=trees, samples=st.lists(st.tuples(events, customers, moments), min_size=1, max_size=5))
def test_compiled_predicate_agrees_with_reference(
    tree: Tree, samples: list[tuple[ContactEvent, CustomerView, float]]
) -> None:
    source = render(tree)
    condition = compile_condition(source, make_local_time(TZ))
    for event, customer, now in samples:
        expected = reference(tree, environment(event, customer, now))
        assert bool(condition.predicate(event, customer, now)) is expected, source


@settings(max_examples=200, deadline=None)
@given(tree=trees, event=events, customer=customers, now=moments)
def test_explain_trace_agrees_with_predicate(
    tree: Tree, event: ContactEvent, customer: CustomerView, now: float
) -> None:
    from rules.expr import explain_tree

    local_time = make_local_time(TZ)
    condition = compile_condition(render(tree), local_time)
    result, why = explain_tree(condition, local_time, event, customer, now)
    assert result is bool(condition.predicate(event, customer, now))
    assert why, "every verdict has at least one reason"


def test_clock_fields_in_the_files_timezone() -> None:
    clock = make_local_time(TZ)
    assert clock(1774747800.0) == (3, 30, "sun")  # 2026-03-29 01:30 UTC: summer time began
    assert clock(1774744200.0) == (1, 30, "sun")  # an hour earlier: still winter time
    # A hair before 00:00 UTC on New Year is still 00:59:59 in Berlin, not 01:00.
    assert clock(1798761599.9999998) == (0, 59, "fri")
