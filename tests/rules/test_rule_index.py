"""The rule index never changes a decision: ``decide`` equals a linear scan of all rules."""

from __future__ import annotations

import msgspec
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.contact_event import ContactEvent
from rules.decision import CustomerView
from rules.load import parse_routing
from rules.table import RoutingTable

CHANNELS = ["phone", "email", "chat", "social"]
SOURCES = ["asterisk-ari", "email", "discourse", "whatsapp", "other"]
TOS = ["", "+4930111", "+4930222", "support@x.de", "elsewhere"]


def q(value: str) -> str:
    return '"' + value + '"'


def guard(field: str, values: list[str]) -> st.SearchStrategy[str]:
    eq = st.sampled_from(values).map(lambda v: f"{field} == {q(v)}")
    rev = st.sampled_from(values).map(lambda v: f"{q(v)} == {field}")
    member = st.lists(st.sampled_from(values), min_size=1, max_size=3).map(
        lambda vs: f"{field} in [{', '.join(q(v) for v in vs)}]"
    )
    # Not guards (the index must leave them alone): negations and disjunctions.
    neq = st.sampled_from(values).map(lambda v: f"{field} != {q(v)}")
    either = st.tuples(st.sampled_from(values), st.sampled_from(values)).map(
        lambda ab: f"({field} == {q(ab[0])} or {field} == {q(ab[1])})"
    )
    return eq | rev | member | neq | either


extra = st.sampled_from(
    [
        "customer.expert",
        "not customer.vip",
        "hour >= 12",
        'text ~ "(?i)rechnung"',
        'text ~ "(?i)k\\u00fcndig"',
        'text ~ "(?i)\\bstorno\\b"',
        'subject ~ "Re: "',
        'text ~ "hallo|storno"',
        '"urgent" in tags',
        '"billing" in tags',
        'not "billing" in tags',
        '"billing" in tags and "urgent" in tags',
        "customer.contacts > 1",
        # No literal to pre-check: pooled into one search per field with their neighbours.
        'text ~ "(?i)^m.*g$"',
        'text ~ "[kK]\\w+"',
        'text ~ "(?s)r.c"',
        'subject ~ "^[Rr]e:"',
        'text ~ "(.)\\1"',
        'text ~ "(?i)[äöü]"',
    ]
)

condition = st.lists(
    guard("channel", CHANNELS) | guard("source", SOURCES) | guard("to", TOS) | extra,
    min_size=1,
    max_size=3,
).map(" and ".join)


def table_for(conditions: list[str]) -> RoutingTable:
    rules = [{"name": f"r{i}", "when": c, "queue": "q"} for i, c in enumerate(conditions)]
    rules.append({"name": "default", "default": True, "queue": "q"})
    doc = {"queues": {"q": {}}, "rules": rules}
    return parse_routing(yaml.safe_dump(doc), "<test>")


events = st.builds(
    ContactEvent,
    kind=st.just("new"),
    contact_id=st.just("generic:1"),
    channel=st.sampled_from(CHANNELS),
    source=st.sampled_from(SOURCES),
    external_id=st.just("1"),
    to=st.none() | st.sampled_from(TOS),
    text=st.sampled_from(
        [
            None,
            "Meine Rechnung",
            "hallo",
            "MEINE RECHNUNG",
            "ſtorno bitte",
            "KÜNDIGUNG",
            "Storno",
            "mein Vertrag",
            "kein Netz",
        ]
    ),
    subject=st.sampled_from([None, "Re: Anfrage", "re: anfrage"]),
    tags=st.sampled_from([(), ("urgent",), ("billing", "x"), ("billing", "urgent")]),
)
customers = st.builds(
    CustomerView,
    expert=st.booleans(),
    vip=st.booleans(),
    contacts=st.integers(0, 3),
)


@settings(max_examples=150, deadline=None)
@given(
    conditions=st.lists(condition, min_size=1, max_size=12),
    samples=st.lists(
        st.tuples(events, customers, st.floats(1.7e9, 1.8e9)), min_size=1, max_size=20
    ),
)
def test_index_agrees_with_linear_scan(
    conditions: list[str], samples: list[tuple[ContactEvent, CustomerView, float]]
) -> None:
    table = table_for(conditions)
    for event, customer, now in samples:
        assert table.decide(event, customer, now) is table.decide_linear(event, customer, now)


def test_index_skips_rules_guarded_on_other_channels() -> None:
    table = table_for(['channel == "phone" and to == "+4930111"', 'channel in ["chat", "email"]'])
    chat = ContactEvent(
        kind="new", contact_id="x:1", channel="chat", source="other", external_id="1"
    )
    phone = ContactEvent(
        kind="new",
        contact_id="x:2",
        channel="phone",
        source="other",
        external_id="2",
        to="+4930111",
    )
    assert table.decide(chat, CustomerView(), 0).rule == "r1"
    assert table.decide(phone, CustomerView(), 0).rule == "r0"
    # The chat event's candidates exclude the phone rule: the index really narrows the scan
    # (and ends at r1, which holds for every chat: the default after it never decides).
    candidates = table._cache[("chat", None, None, frozenset())]
    assert [d.rule for _, d in candidates.plain] == ["r1"]


def test_pooled_regular_expressions_keep_the_first_matching_rule() -> None:
    # Both patterns have no literal to pre-check, so one search pools them; the later rule's
    # pattern matches earlier in the text, and still the earlier rule decides.
    table = table_for(['text ~ "[Vv]ertrag$"', 'text ~ "^[Mm]ein"', 'text ~ "[0-9]{5}"'])
    event = ContactEvent(
        kind="new",
        contact_id="x:1",
        channel="chat",
        source="other",
        external_id="1",
        text="Mein Vertrag",
    )
    assert table.decide(event, CustomerView(), 0).rule == "r0"
    other = msgspec.structs.replace(event, text="PLZ 10115")
    assert table.decide(other, CustomerView(), 0).rule == "r2"
    nothing = msgspec.structs.replace(event, text="Hallo")
    assert table.decide(nothing, CustomerView(), 0).rule == "default"
    # The three rules are pooled into one search per contact: without a hit, only the default.
    candidates = table._cache[(None, None, None, frozenset())]
    assert len(candidates.checks) == 1
    assert [d.rule for _, d in candidates.plain] == ["default"]
