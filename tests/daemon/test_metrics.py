"""The daemon's metrics: what an operator sees on /metrics after the engine did things."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from channels.contact_event import ContactEvent, Sender
from router.daemon.metrics import Metrics
from router.engine import Engine
from router.messages import (
    Accept,
    CancelOfferCmd,
    Command,
    Login,
    OfferCmd,
    RefusedCmd,
    Tick,
)
from rules.load import parse_routing
from tests.eventkit import event_cmd

ROUTING = """
version: 1
defaults: {offer_timeout: 10, wrap_up: 5}
skills: [de]
queues:
  support: {skills: {de: 1}, channels: [phone, chat], sla: {seconds: 20, percent: 80}}
agents:
  - {id: a1, skills: {de: 3}}
  - {id: a2, skills: {de: 3}}
experts:
  - {id: x1, phones: ["+491711111111"]}
rules:
  - {name: expert, when: customer.expert, queue: support, priority: 100}
  - {name: default, default: true, queue: support}
"""


def _promtool() -> str | None:
    """promtool on PATH, or the one ``make alerts`` unpacked into .venv/bin."""
    local = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "promtool"
    return shutil.which("promtool") or (str(local) if local.is_file() else None)


PROMTOOL = _promtool()
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of one sample in the text exposition (what Prometheus would scrape)."""
    text = metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def contact(cid: str = "asterisk-ari:1", channel: Any = "phone") -> ContactEvent:
    return ContactEvent(
        kind="new", contact_id=cid, channel=channel, source="asterisk-ari", external_id=cid
    )


def offer(n: int) -> OfferCmd:
    return OfferCmd(
        offer_id=f"o{n}",
        agent_id="a1",
        contact_id="asterisk-ari:1",
        queue="support",
        expires_at=100.0,
        contact=contact(),
        customer_id="c1",
    )


def test_a_call_lifecycle_shows_up_in_counters_and_histograms() -> None:
    m = Metrics()
    m.observe_received(contact())
    cmds: list[Command] = [
        event_cmd(
            "contact.queued",
            at=1.0,
            queue="support",
            channel="phone",
            rule="phone-default",
            contact_id="x",
        ),
        offer(1),
        event_cmd("contact.offer_expired", at=21.0, contact_id="x"),
        CancelOfferCmd(offer_id="o1", agent_id="a1", contact_id="x", reason="expired"),
        offer(2),
        event_cmd(
            "contact.assigned",
            at=25.0,
            queue="support",
            channel="phone",
            waited=24.0,
            expert=False,
            priority=0,
        ),
        event_cmd("contact.completed", at=85.0, queue="support", handled=60.0, agent_id="a1"),
    ]
    m.observe_commands(cmds)
    assert (
        sample(
            m,
            "stellwerk_contacts_received_total",
            channel="phone",
            source="asterisk-ari",
            kind="new",
        )
        == 1
    )
    assert sample(m, "stellwerk_contacts_routed_total", queue="support", channel="phone") == 1
    assert sample(m, "stellwerk_rule_hits_total", rule="phone-default") == 1
    assert sample(m, "stellwerk_offers_total", outcome="offered") == 2
    assert sample(m, "stellwerk_offers_total", outcome="expired") == 1
    assert sample(m, "stellwerk_offers_total", outcome="accepted") == 1
    assert sample(m, "stellwerk_offers_cancelled_total", reason="expired") == 1
    assert sample(m, "stellwerk_contacts_assigned_total", queue="support", channel="phone") == 1
    assert sample(m, "stellwerk_contacts_completed_total", queue="support") == 1
    # 24 s lands in the 30 s bucket, not in the 20 s one
    assert (
        sample(
            m,
            "stellwerk_wait_seconds_bucket",
            queue="support",
            channel="phone",
            outcome="assigned",
            le="20.0",
        )
        == 0
    )
    assert (
        sample(
            m,
            "stellwerk_wait_seconds_bucket",
            queue="support",
            channel="phone",
            outcome="assigned",
            le="30.0",
        )
        == 1
    )
    assert sample(m, "stellwerk_handle_seconds_sum", queue="support") == 60.0


def test_expert_contacts_and_their_waits_are_counted_apart() -> None:
    m = Metrics()
    m.observe_commands(
        [
            event_cmd(
                "contact.assigned", queue="second-level", channel="phone", waited=3.0, expert=True
            ),
            event_cmd(
                "contact.assigned", queue="support", channel="phone", waited=300.0, expert=False
            ),
            event_cmd(
                "contact.abandoned", queue="second-level", channel="email", waited=50.0, expert=True
            ),
        ]
    )
    assert sample(m, "stellwerk_expert_contacts_total", channel="phone", outcome="assigned") == 1
    assert sample(m, "stellwerk_expert_contacts_total", channel="email", outcome="abandoned") == 1
    assert sample(m, "stellwerk_expert_wait_seconds_sum", channel="phone", outcome="assigned") == 3
    assert (
        sample(m, "stellwerk_contacts_abandoned_total", queue="second-level", channel="email") == 1
    )


def test_refused_agent_commands_and_rejected_inputs_are_counted_by_reason() -> None:
    m = Metrics()
    m.observe_commands(
        [
            RefusedCmd(agent_id="a2", reason="not_your_offer", detail="o1 belongs to a1"),
            RefusedCmd(agent_id="zz", reason="unknown_agent"),
            RefusedCmd(agent_id="a2", reason="not_your_offer"),
        ]
    )
    m.observe_rejected("discourse", "bad_signature")
    m.observe_rejected("discourse", "bad_signature")
    m.observe_rejected("asterisk-ari", "not_json")
    assert sample(m, "stellwerk_agent_commands_refused_total", reason="not_your_offer") == 2
    assert sample(m, "stellwerk_agent_commands_refused_total", reason="unknown_agent") == 1
    assert (
        sample(m, "stellwerk_rejected_inputs_total", source="discourse", reason="bad_signature")
        == 2
    )
    assert (
        sample(m, "stellwerk_rejected_inputs_total", source="asterisk-ari", reason="not_json") == 1
    )


TWO_QUEUES = ROUTING.replace(
    "queues:\n", "queues:\n  billing: {skills: {de: 1}, channels: [chat]}\n"
).replace("agents:\n", "agents:\n  - {id: a3, skills: {de: 1}}\n")


def test_refresh_follows_the_engine_and_forgets_queues_dropped_by_a_reload() -> None:
    engine = Engine(parse_routing(TWO_QUEUES))
    m = Metrics()
    engine.handle(Login(agent_id="a1"), 0.0)
    engine.handle(Login(agent_id="a2", state="away", reason="break"), 0.0)
    m.refresh(engine, 1.0)
    assert sample(m, "stellwerk_queue_agents_ready", queue="billing") == 1
    assert sample(m, "stellwerk_queue_sla_seconds", queue="billing") == 20  # the default SLA
    assert sample(m, "stellwerk_agents", state="available") == 1
    assert sample(m, "stellwerk_agents", state="away") == 1
    assert sample(m, "stellwerk_agents", state="offline") == 1
    assert sample(m, "stellwerk_agents", state="not_responding") == 0
    engine.reload(parse_routing(ROUTING), 2.0)
    m.refresh(engine, 2.0)
    assert sample(m, "stellwerk_queue_agents_ready", queue="billing") is None
    assert sample(m, "stellwerk_queue_sla_seconds", queue="billing") is None
    assert sample(m, "stellwerk_queue_agents_ready", queue="support") == 1


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe_rejected("x", "not_json")
    assert sample(a, "stellwerk_rejected_inputs_total", source="x", reason="not_json") == 1
    assert sample(b, "stellwerk_rejected_inputs_total", source="x", reason="not_json") is None


def _busy_metrics() -> Metrics:
    m = Metrics()
    m.observe_received(contact("email:1", "email"))
    m.observe_commands(
        [
            event_cmd("contact.queued", queue="support", channel="email", rule="r"),
            event_cmd(
                "contact.assigned", queue="support", channel="email", waited=12.0, expert=True
            ),
            RefusedCmd(agent_id="a", reason="not_your_offer"),
        ]
    )
    m.observe_rejected("discourse", "bad_signature")
    m.observe_decision(0.00012)
    m.set_journal_lag(3, 0.25)
    m.set_status(redis=True, mqtt=False, lease=True)
    engine = Engine(parse_routing(ROUTING))
    for cmds in (engine.handle(call("1"), 0.0), engine.handle(call("1", "end"), 4.0)):
        m.observe_commands(cmds)
    m.refresh(engine, 5.0)
    return m


def test_exposition_is_valid_for_the_prometheus_parser() -> None:
    families = {
        f.name for f in text_string_to_metric_families(_busy_metrics().exposition().decode())
    }
    for name in (
        "stellwerk_contacts_received",
        "stellwerk_wait_seconds",
        "stellwerk_routing_decision_seconds",
        "stellwerk_journal_lag_entries",
        "stellwerk_service_level_ratio",
        "stellwerk_agents",
    ):
        assert name in families


@needs_promtool
def test_exposition_passes_promtool_check_metrics() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=_busy_metrics().exposition(),
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


waits = st.floats(min_value=0, max_value=5000, allow_nan=False)


@given(st.lists(st.tuples(st.sampled_from(["contact.assigned", "contact.abandoned"]), waits)))
def test_every_wait_lands_in_exactly_one_histogram_series(events: list[tuple[str, float]]) -> None:
    m = Metrics()
    m.observe_commands(event_cmd(k, queue="q", channel="chat", waited=w) for k, w in events)
    for outcome, kind in (("assigned", "contact.assigned"), ("abandoned", "contact.abandoned")):
        mine = [w for k, w in events if k == kind]
        count = sample(
            m, "stellwerk_wait_seconds_count", queue="q", channel="chat", outcome=outcome
        )
        assert (count or 0) == len(mine)
        if mine:
            total = sample(
                m, "stellwerk_wait_seconds_sum", queue="q", channel="chat", outcome=outcome
            )
            assert total == pytest.approx(sum(mine))
            # the +Inf bucket holds everything, the 20 s bucket exactly the short waits
            assert sample(
                m,
                "stellwerk_wait_seconds_bucket",
                queue="q",
                channel="chat",
                outcome=outcome,
                le="20.0",
            ) == sum(1 for w in mine if w <= 20)


def call(cid: str, kind: Any = "new", phone: str = "+4930123456") -> ContactEvent:
    return ContactEvent(
        kind=kind,
        contact_id=f"asterisk-ari:{cid}",
        channel="phone",
        source="asterisk-ari",
        external_id=cid,
        sender=Sender(phone=phone),
        end_reason="hangup" if kind == "end" else None,
    )


def test_the_real_engine_feeds_counters_gauges_and_service_level() -> None:
    engine = Engine(parse_routing(ROUTING))
    m = Metrics()

    def feed(message: Any, now: float) -> list[Command]:
        cmds = engine.handle(message, now)
        m.observe_commands(cmds)
        return cmds

    feed(call("1"), 0.0)
    assert (
        sample(
            m,
            "stellwerk_contacts_routed_total",
            queue="support",
            channel="phone",
            source="asterisk-ari",
        )
        == 1
    )
    assert sample(m, "stellwerk_rule_hits_total", rule="default") == 1
    m.refresh(engine, 30.0)
    assert sample(m, "stellwerk_queue_waiting", queue="support") == 1
    assert sample(m, "stellwerk_queue_oldest_wait_seconds", queue="support") == 30
    assert sample(m, "stellwerk_agents", state="offline") == 2
    assert sample(m, "stellwerk_service_level_ratio", queue="support") is None  # nothing closed

    offers = [c for c in feed(Login(agent_id="a1"), 30.0) if isinstance(c, OfferCmd)]
    assert sample(m, "stellwerk_offers_total", outcome="offered") == 1
    feed(Accept(agent_id="a1", offer_id=offers[0].offer_id), 32.0)
    feed(call("1", "end"), 92.0)
    m.refresh(engine, 93.0)
    assert sample(m, "stellwerk_contacts_assigned_total", queue="support", channel="phone") == 1
    assert (
        sample(
            m, "stellwerk_wait_seconds_sum", queue="support", channel="phone", outcome="assigned"
        )
        == 32
    )
    assert sample(m, "stellwerk_contacts_completed_total", queue="support") == 1
    assert sample(m, "stellwerk_handle_seconds_sum", queue="support") == 60
    assert sample(m, "stellwerk_queue_waiting", queue="support") == 0
    # answered after 32 s against a 20 s target
    assert sample(m, "stellwerk_service_level_ratio", queue="support") == 0
    assert sample(m, "stellwerk_queue_sla_target_ratio", queue="support") == 0.8

    # a1 is in wrap-up until 97; an expert calls and a2 logs in and takes it at once
    feed(call("2", phone="+491711111111"), 94.0)
    offers = [c for c in feed(Login(agent_id="a2"), 95.0) if isinstance(c, OfferCmd)]
    assert [o.agent_id for o in offers] == ["a2"]
    # a1 cannot take a2's offer
    feed(Accept(agent_id="a1", offer_id=offers[0].offer_id), 96.0)
    assert sample(m, "stellwerk_agent_commands_refused_total", reason="not_your_offer") == 1
    feed(Accept(agent_id="a2", offer_id=offers[0].offer_id), 96.0)
    assert sample(m, "stellwerk_rule_hits_total", rule="expert") == 1
    assert sample(m, "stellwerk_expert_contacts_total", channel="phone", outcome="assigned") == 1
    assert sample(m, "stellwerk_expert_wait_seconds_sum", channel="phone", outcome="assigned") == 2
    m.refresh(engine, 96.5)
    assert sample(m, "stellwerk_service_level_ratio", queue="support") == 0.5
    assert sample(m, "stellwerk_agents_busy") == 2


def test_a_hang_up_while_queued_counts_as_abandoned_with_its_wait() -> None:
    engine = Engine(parse_routing(ROUTING))
    m = Metrics()
    m.observe_commands(engine.handle(call("9"), 10.0))
    m.observe_commands(engine.handle(call("9", "end"), 55.0))
    assert sample(m, "stellwerk_contacts_abandoned_total", queue="support", channel="phone") == 1
    assert (
        sample(
            m, "stellwerk_wait_seconds_sum", queue="support", channel="phone", outcome="abandoned"
        )
        == 45
    )


CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def _known_series() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in ("_total", "_bucket", "_sum", "_count"))
    return names


def _referenced(text: str) -> set[str]:
    return set(re.findall(r"\bstellwerk_[a-z_]+", text)) - {"stellwerk_"}


def test_dashboard_and_alerts_only_use_metrics_that_exist() -> None:
    dashboard = json.loads((CONFIG_DIR / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    alerts = yaml.safe_load((CONFIG_DIR / "prometheus-alerts.yaml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = set().union(*(_referenced(e) for e in exprs))
    assert used, "no stellwerk_ metric referenced at all"
    assert used - _known_series() == set()
    # every panel has a unique id and a query; every alert has a summary
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p.get("targets") for p in dashboard["panels"] if p["type"] != "row")
    assert all(r["annotations"]["summary"] for g in alerts["groups"] for r in g["rules"])


def assert_promtool_passes(command: str, rules_file: str, timeout: float) -> None:
    """``promtool {command} rules config/{rules_file}`` exits 0 (else its output is shown)."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, command, "rules", str(CONFIG_DIR / rules_file)],
        capture_output=True,
        check=False,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    assert_promtool_passes("check", "prometheus-alerts.yaml", timeout=30)


def test_every_alert_has_a_promtool_unit_test_where_it_fires() -> None:
    alerts = yaml.safe_load((CONFIG_DIR / "prometheus-alerts.yaml").read_text())
    names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    tests = yaml.safe_load((CONFIG_DIR / "prometheus-alerts.test.yaml").read_text())
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", ())
        if case.get("exp_alerts")
    }
    assert names - firing == set()


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    assert_promtool_passes("test", "prometheus-alerts.test.yaml", timeout=60)


CROWD_ROUTING = """
version: 1
defaults: {offer_timeout: 10, wrap_up: 0}
skills: [community]
queues:
  community_desk: {skills: {community: 1}, channels: [social]}
agents:
  - {id: a1, skills: {community: 3}, capacity: {social: 5}}
experts:
  - {id: x-champ, handles: ["discourse:champ"]}
  - {id: x-quiet, handles: ["discourse:quiet"]}
rules:
  - {name: crowd, when: channel == "social", queue: community_desk, crowd_first: 60}
  - {name: default, default: true, queue: community_desk}
"""


def post(topic: int, user: str, kind: Any = "update") -> ContactEvent:
    return ContactEvent(
        kind=kind,
        contact_id=f"discourse:{topic}",
        channel="social",
        source="discourse",
        external_id=str(topic),
        sender=Sender(handle=f"discourse:{user}"),
    )


def test_crowd_outcomes_answers_and_expert_activity_are_exported() -> None:
    engine = Engine(parse_routing(CROWD_ROUTING, "crowd.yaml"))
    metrics = Metrics()
    t = 1_000_000.0

    def feed(message: Any, now: float) -> list[Command]:
        cmds = engine.handle(message, now)
        metrics.observe_commands(cmds)
        return cmds

    feed(Login(agent_id="a1"), t)
    feed(post(1, "asker1", "new"), t)  # answered by the champion
    feed(post(1, "champ"), t + 5)
    feed(post(2, "asker2", "new"), t)  # answered by another member
    feed(post(2, "neighbour"), t + 7)
    feed(post(3, "asker3", "new"), t)  # nobody answers: an agent takes it after the window
    cmds = feed(Tick(), t + 61)
    (offer_cmd,) = [c for c in cmds if isinstance(c, OfferCmd)]
    feed(Accept(agent_id="a1", offer_id=offer_cmd.offer_id), t + 62)
    feed(post(4, "asker4", "new"), t)  # the asker deletes it during the window
    feed(msgspec.structs.replace(post(4, "asker4"), kind="end"), t + 3)
    metrics.refresh(engine, t + 100)
    outcome = "stellwerk_crowd_outcomes_total"
    assert sample(metrics, outcome, outcome="answered_by_crowd", source="discourse") == 2.0
    assert sample(metrics, outcome, outcome="assigned", channel="social") == 1.0
    assert sample(metrics, outcome, outcome="abandoned", channel="social") == 1.0
    assert sample(metrics, "stellwerk_crowd_answers_total", by="expert") == 1.0
    assert sample(metrics, "stellwerk_crowd_answers_total", by="member") == 1.0
    assert sample(metrics, "stellwerk_expert_answers_total") == 1.0
    # The champion was active a moment ago; the other expert was never seen.
    assert sample(metrics, "stellwerk_experts", activity="active_day") == 1.0
    assert sample(metrics, "stellwerk_experts", activity="never_seen") == 1.0
    assert sample(metrics, "stellwerk_experts", activity="inactive") == 0.0
    assert sample(metrics, "stellwerk_experts_never_answered") == 1.0
    # An admin refusal is not an agent's refused command.
    metrics.observe_commands([RefusedCmd(agent_id=None, reason="unknown_expert")])
    assert sample(metrics, "stellwerk_admin_commands_refused_total", reason="unknown_expert")
    assert sample(metrics, "stellwerk_agent_commands_refused_total") is None


# ---- series that exist before their first event ----------------------------------------------

PRIMED_ROUTING = """
version: 1
skills: [de]
queues:
  support: {skills: {de: 1}}
  billing: {skills: {de: 1}, overflow: support, max_wait: 600}
agents:
  - {id: a1, skills: {de: 3}}
rules:
  - {name: spam, when: '"spam" in tags', reject: spam}
  - {name: bills, when: 'text ~ "(?i)rechnung"', queue: billing}
  - {name: default, default: true, queue: support}
"""


def test_every_known_label_set_is_exported_at_zero_before_its_first_event() -> None:
    """rate() and increase() only see a first event when the series existed at 0 before it."""
    m = Metrics()
    m.prime(parse_routing(PRIMED_ROUTING, "routing.yaml"))
    zero: list[tuple[str, dict[str, str]]] = [
        ("stellwerk_contacts_rejected_total", {"reason": "spam"}),
        ("stellwerk_contacts_rejected_total", {"reason": "queue_full"}),
        ("stellwerk_contacts_received_total", {"channel": "email", "source": "email"}),
        ("stellwerk_contacts_routed_total", {"queue": "billing", "source": "discourse"}),
        ("stellwerk_contacts_abandoned_total", {"queue": "support", "channel": "phone"}),
        ("stellwerk_contacts_answered_by_crowd_total", {"queue": "support", "source": "x"}),
        ("stellwerk_rule_hits_total", {"rule": "bills"}),
        ("stellwerk_expert_contacts_total", {"channel": "phone", "outcome": "assigned"}),
        ("stellwerk_expert_wait_seconds_bucket", {"channel": "chat", "outcome": "abandoned"}),
        ("stellwerk_expert_wait_seconds_count", {"channel": "email", "outcome": "assigned"}),
        ("stellwerk_wait_seconds_count", {"queue": "billing", "outcome": "abandoned"}),
        ("stellwerk_crowd_outcomes_total", {"source": "discourse", "outcome": "abandoned"}),
        ("stellwerk_crowd_answers_total", {"by": "member"}),
        ("stellwerk_offers_total", {"outcome": "expired"}),
        ("stellwerk_offers_cancelled_total", {"reason": "agent_logout"}),
        ("stellwerk_agent_commands_refused_total", {"reason": "not_your_offer"}),
        ("stellwerk_rejected_inputs_total", {"source": "discourse", "reason": "bad_signature"}),
        ("stellwerk_ingress_deliveries_total", {"transport": "smtp", "outcome": "unavailable"}),
        ("stellwerk_rules_reloads_total", {"result": "refused"}),
        ("stellwerk_contacts_overflowed_total", {"queue": "billing"}),
        ("stellwerk_snapshot_unreadable_total", {"reason": "missing"}),
        ("stellwerk_snapshot_unreadable_total", {"reason": "damaged"}),
    ]
    for name, labels in zero:
        assert sample(m, name, **labels) == 0.0, (name, labels)
    # Only combinations that can happen: an ARI call is never an e-mail.
    received = "stellwerk_contacts_received_total"
    assert sample(m, received, channel="email", source="asterisk-ari") is None
    # The first event is then a step from 0 to 1.
    m.observe_commands([event_cmd("contact.rejected", reason="spam")])
    assert sample(m, "stellwerk_contacts_rejected_total", reason="spam") == 1.0


def test_priming_again_after_a_reload_adds_the_new_queues_and_keeps_counts() -> None:
    m = Metrics()
    m.prime(parse_routing(PRIMED_ROUTING, "routing.yaml"))
    m.observe_commands([event_cmd("contact.rejected", reason="spam")])
    reloaded = PRIMED_ROUTING.replace("queues:\n", "queues:\n  vip: {skills: {de: 1}}\n")
    m.prime(parse_routing(reloaded, "routing.yaml"))
    assert sample(m, "stellwerk_contacts_routed_total", queue="vip", channel="phone") == 0.0
    assert sample(m, "stellwerk_contacts_rejected_total", reason="spam") == 1.0


@pytest.mark.integration
async def test_the_daemon_primes_its_metrics_at_start_and_on_a_reload(
    tmp_path: Path, start_daemon: Any
) -> None:
    from tests.daemon.conftest import write_routing

    routing = write_routing(tmp_path / "routing.yaml")
    daemon = await start_daemon(routing)
    assert sample(daemon.metrics, "stellwerk_contacts_routed_total", queue="support") == 0.0
    assert sample(daemon.metrics, "stellwerk_rule_hits_total", rule="crowd_expert") == 0.0
    late = "queues:\n  late_shift:\n    skills: {support: 1}\n"
    routing.write_text(routing.read_text().replace("queues:\n", late))
    assert await daemon.router.reload() == []
    assert sample(daemon.metrics, "stellwerk_contacts_routed_total", queue="late_shift") == 0.0


def test_the_source_channel_table_names_every_source() -> None:
    from channels.contact_event import SOURCES
    from router.daemon.intake import AGENT_COMMAND_SOURCE
    from router.daemon.metrics import AGENT_COMMAND_SOURCE as PRIMED
    from router.daemon.metrics import SOURCE_CHANNELS

    assert set(SOURCE_CHANNELS) == set(SOURCES)
    assert PRIMED == AGENT_COMMAND_SOURCE
