"""The /metrics page is exactly what prometheus_client's own exposition writes, scrape after
scrape, while series come, change and go."""

from __future__ import annotations

from prometheus_client import Gauge, Info
from prometheus_client.exposition import generate_latest

from channels.contact_event import ContactEvent
from router.daemon.metrics import Metrics
from router.engine import Engine
from router.messages import Accept, Login, OfferCmd
from rules.load import parse_routing
from tests.eventkit import event_cmd

ROUTING = """
version: 1
skills: [de]
queues:
  support: {skills: {de: 1}, channels: [phone, chat]}
  billing: {skills: {de: 1}, channels: [chat]}
agents:
  - {id: a1, skills: {de: 3}}
rules:
  - {name: default, default: true, queue: support}
"""


def test_the_page_is_byte_for_byte_the_client_librarys_exposition() -> None:
    m = Metrics()
    table = parse_routing(ROUTING)
    m.prime(table)
    # Label values the text format must escape, an info metric and a timestamp-free gauge.
    m.observe_rejected('we"ird\\source\nx', "not_json")
    m.observe_auth_refused("bad_token", "/v1/{odd}")
    Info("stellwerk_build", "Build.\nWith a newline and a \\ backslash.", registry=m.registry).info(
        {"version": "1.2.3"}
    )
    Gauge("stellwerk_plain", "No labels.", registry=m.registry).set(1e-7)
    signed = Gauge("stellwerk_signed", "Signed zero.", ["sign"], registry=m.registry)
    signed.labels("minus").set(-0.0)
    signed.labels("nan").set(float("nan"))
    assert m.exposition() == generate_latest(m.registry)

    engine = Engine(table)
    offers = [c for c in engine.handle(Login(agent_id="a1"), 1.0) if isinstance(c, OfferCmd)]
    cmds = engine.handle(
        ContactEvent(
            kind="new",
            contact_id="asterisk-ari:1",
            channel="phone",
            source="asterisk-ari",
            external_id="1",
        ),
        2.0,
    )
    offers += [c for c in cmds if isinstance(c, OfferCmd)]
    m.observe_commands(cmds)
    m.observe_commands(engine.handle(Accept(agent_id="a1", offer_id=offers[0].offer_id), 9.0))
    m.observe_commands([event_cmd("contact.assigned", queue="support", waited=1234567.5)])
    m.observe_decision(0.00003)
    m.refresh(engine, 10.0)
    assert m.exposition() == generate_latest(m.registry)  # values changed, prefixes cached

    # A reload drops a queue: its gauges go from both.
    engine.reload(
        parse_routing(ROUTING.replace("  billing: {skills: {de: 1}, channels: [chat]}\n", "")), 11.0
    )
    m.refresh(engine, 11.0)
    text = m.exposition()
    assert b'queue="billing"' not in text.split(b"stellwerk_queue_waiting", 1)[1].split(b"#", 1)[0]
    assert text == generate_latest(m.registry)
