"""How fast ``RoutingTable.decide`` is: ``.venv/bin/python benchmarks/decide.py``.

Two tables: the example ``config/routing.yaml`` and a synthetic one with 1,000 rules (hotline
numbers, mailboxes, keyword rules per channel, time-of-day rules, expert rules), each fed a mix
of phone, e-mail, chat and social events. Prints decisions per second with and without the
index (``decide`` against ``decide_linear``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import yaml

from channels.contact_event import CHANNELS, ContactEvent, Sender
from rules.decision import CustomerView
from rules.load import load_routing, parse_routing
from rules.table import RoutingTable

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["rechnung", "router", "vertrag", "sim", "tv", "störung", "hallo", "danke", "iban"]
SOURCES = {
    "phone": ["asterisk-ari", "twilio-voice"],
    "email": ["email"],
    "chat": ["rocketchat", "whatsapp"],
    "social": ["discourse", "x"],
}


def synthetic(n: int = 1000, keyword_share: float = 0.05) -> RoutingTable:
    """``n`` rules, like a large centre's: mostly routes by dialled number, mailbox or inbox.

    ``keyword_share`` of them are keyword, tag, time or customer rules guarded only by channel
    or source; those are the ones an event of that channel cannot skip.
    """
    rng = random.Random(1)
    rules = [{"name": "expert", "when": "customer.expert", "queue": "q"}]
    keyword_rules = int(n * keyword_share)
    for i in range(keyword_rules):
        kind = i % 3
        if kind == 0:
            channel = rng.choice(["chat", "email", "social"])
            when = f'channel == "{channel}" and text ~ "(?i){rng.choice(WORDS)}{i}"'
        elif kind == 1:
            when = f'source == "{rng.choice(SOURCES["chat"])}" and "tag{i}" in tags'
        else:
            channels = ", ".join(f'"{c}"' for c in rng.sample(CHANNELS, 2))
            when = f"channel in [{channels}] and hour >= {i % 24} and customer.contacts > {i}"
        rules.append({"name": f"k{i}", "when": when, "queue": "q"})
    for i in range(n - 2 - keyword_rules):
        if i % 2 == 0:
            when = f'channel == "phone" and to == "+49800{i:06d}"'
        else:
            channel = rng.choice(["email", "chat", "social"])
            when = f'channel == "{channel}" and to in ["box{i}@example.de", "inbox-{i}"]'
        rules.append({"name": f"r{i}", "when": when, "queue": "q"})
    rules.append({"name": "default", "default": True, "queue": "q"})
    doc = {"timezone": "Europe/Berlin", "queues": {"q": {}}, "rules": rules}
    return parse_routing(yaml.safe_dump(doc, allow_unicode=True), "<synthetic>")


def events(n: int, tos: list[str]) -> list[ContactEvent]:
    rng = random.Random(2)
    out = []
    for i in range(n):
        channel = rng.choice(CHANNELS)
        out.append(
            ContactEvent(
                kind="new",
                contact_id=f"generic:{i}",
                channel=channel,
                source=rng.choice(SOURCES[channel]),
                external_id=str(i),
                sender=Sender(phone=f"+4915{rng.randrange(10**8):08d}"),
                to=rng.choice(tos),
                subject="Frage",
                text=" ".join(rng.choices(WORDS, k=12)),
                tags=("vip",) if i % 7 == 0 else (),
            )
        )
    return out


def rate(table: RoutingTable, evs: list[ContactEvent], linear: bool = False) -> float:
    decide = table.decide_linear if linear else table.decide
    customer = CustomerView(contacts=2)
    now = 1_795_435_200.0
    for ev in evs[:200]:  # warm the candidate cache
        decide(ev, customer, now)
    start = time.perf_counter()
    for i, ev in enumerate(evs):
        decide(ev, customer, now + i * 0.01)
    return len(evs) / (time.perf_counter() - start)


def main() -> None:
    example = load_routing(ROOT / "config" / "routing.yaml")
    tos = ["+498003322001", "+498003322002", "rechnung@beispiel-telekom.de", "", "other"]
    evs = events(100_000, tos)
    print(f"example config ({len(example.rules)} rules): {rate(example, evs):,.0f} decisions/s")
    tos = ["+49800000000", "+49800000500", "box1@example.de", "inbox-601", "", "other"]
    evs = events(100_000, tos)
    for share in (0.05, 0.25):
        big = synthetic(1000, share)
        indexed = rate(big, evs)
        linear = rate(big, evs[:5_000], linear=True)
        print(
            f"1,000 rules, {share:.0%} keyword rules: indexed {indexed:,.0f} decisions/s"
            f" ({1e6 / indexed:.1f} us), linear scan {linear:,.0f}/s ({1e6 / linear:.1f} us)"
        )


if __name__ == "__main__":
    main()
