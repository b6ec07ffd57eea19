"""``stellwerk loadgen``: its payloads are what the real platforms send, its options are checked,
and a short run against a real daemon (real Redis, Mosquitto, HTTP and SMTP) loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from aiohttp import test_utils
from hypothesis import given
from hypothesis import strategies as st

from channels.base import DecodeConfig
from channels.registry import decode
from router.cli.loadgen import (
    LoadGen,
    LoadgenError,
    Profile,
    Target,
    Track,
    agent_ids,
    ari_event,
    discourse_post,
    email_message,
    parse_mix,
    percentiles,
    rocketchat_message,
    webhook_headers,
    whatsapp_message,
)
from tests.daemon.conftest import REPO, Names, write_routing
from tests.servers import MQTT_HOST, MQTT_PASSWORD, MQTT_PORT, MQTT_USER

SECRETS = {"rocketchat": "rc-token", "whatsapp": "meta-app-secret", "discourse": "disc-secret"}
CONFIG = DecodeConfig(secrets=SECRETS)


async def daemon_for_loadgen(
    start_daemon: Callable[..., Any],
    routing: Path,
    names: Names,
    agents: tuple[str, ...],
    **settings: str,
) -> tuple[Any, Target]:
    """A daemon (``settings`` on top) with HTTP and SMTP on free ports and the webhook secrets
    loadgen signs with, and the :class:`Target` that points loadgen's traffic and ``agents``
    at it over the test broker."""
    http_port, smtp_port = test_utils.unused_port(), test_utils.unused_port()
    daemon = await start_daemon(
        routing,
        http_addr=f"127.0.0.1:{http_port}",
        smtp_addr=f"127.0.0.1:{smtp_port}",
        sources_secrets=json.dumps(SECRETS),
        **settings,
    )
    target = Target(
        mqtt_host=MQTT_HOST,
        mqtt_port=MQTT_PORT,
        mqtt_user=MQTT_USER,
        mqtt_password=MQTT_PASSWORD,
        http_url=f"http://127.0.0.1:{http_port}",
        smtp_port=smtp_port,
        prefix=names.topic_prefix,
        secrets=SECRETS,
        agents=list(agents),
    )
    return daemon, target


def decoded(source: str, body: bytes) -> list[Any]:
    return decode(
        source,
        body,
        {k.lower(): v for k, v in webhook_headers(source, body, SECRETS).items()},
        CONFIG,
    )


def test_ari_calls_start_and_end_the_same_contact() -> None:
    start = decode(
        "asterisk-ari",
        ari_event("StasisStart", "lg1.7", "+4915112345678", "+498003322002", 1.7e9),
        {},
        CONFIG,
    )
    end = decode("asterisk-ari", ari_event("StasisEnd", "lg1.7", "", "", 1.7e9 + 60), {}, CONFIG)
    assert [(e.kind, e.contact_id) for e in start + end] == [
        ("new", "asterisk-ari:lg1.7"),
        ("end", "asterisk-ari:lg1.7"),
    ]
    assert start[0].to == "+498003322002"  # the hotline number the routing rules match
    assert start[0].sender.phone == "+4915112345678"


def test_signed_webhooks_pass_the_real_signature_checks() -> None:
    [chat] = decoded("rocketchat", rocketchat_message("room9", "gast-9", "Hallo", 1.7e9))
    assert (chat.contact_id, chat.text) == ("rocketchat:room9", "Hallo")
    [wa] = decoded("whatsapp", whatsapp_message("4916012345", "Rechnung?", 1.7e9))
    assert (wa.contact_id, wa.channel) == ("whatsapp:4916012345", "chat")
    [post] = decoded("discourse", discourse_post(4711, 1, "kunde1", "Meine Rechnung", 1.7e9))
    assert (post.kind, post.contact_id, post.channel) == ("new", "discourse:4711", "social")
    # the crowd's answer is an update of the same thread by someone else
    [reply] = decoded("discourse", discourse_post(4711, 2, "pate_heinz", "So geht's", 1.7e9))
    assert (reply.kind, reply.contact_id) == ("update", "discourse:4711")
    assert reply.sender.handle != post.sender.handle


def test_emails_are_threads_keyed_by_their_message_id() -> None:
    raw = email_message("lg-1-5@loadgen.test", "kunde5@example.de", "DSL Störung", 1.7e9)
    [mail] = decode("email", raw, {}, CONFIG)
    assert mail.contact_id == "email:lg-1-5@loadgen.test"
    assert (mail.subject, mail.sender.email) == ("DSL Störung", "kunde5@example.de")


def test_mix_is_normalised_and_checked() -> None:
    assert parse_mix("phone=3,chat=1") == {"phone": 0.75, "chat": 0.25}
    assert parse_mix("phone=1,email=0") == {"phone": 1.0}
    for bad in ("fax=1", "phone", "phone=x", "phone=0", "phone=-1"):
        with pytest.raises(LoadgenError):
            parse_mix(bad)


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1))
def test_percentiles_are_ordered_members_of_the_sample(values: list[float]) -> None:
    p = percentiles(values)
    assert p["p50"] <= p["p90"] <= p["p99"] <= p["max"] == max(values)
    assert all(v in values for v in p.values())


def test_percentiles_use_the_nearest_rank() -> None:
    p = percentiles([float(v) for v in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["max"]) == (50.0, 90.0, 99.0, 100.0)
    assert percentiles([]) == {}


def test_agent_ids_come_from_the_routing_file(tmp_path: Path) -> None:
    assert agent_ids(write_routing(tmp_path / "r.yaml", ("anna", "ben"))) == ["anna", "ben"]
    assert agent_ids(REPO / "config" / "routing.yaml")[:2] == ["a01", "a02"]
    (tmp_path / "none.yaml").write_text("queues: {}\n")
    with pytest.raises(LoadgenError, match="no agents"):
        agent_ids(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "--rate and --duration must be > 0"),
        (["--mix", "fax=1"], "--mix"),
        (["--routing", "/nonexistent/routing.yaml"], "cannot read routing file"),
        (["--smtp-addr", "nowhere"], "--smtp-addr"),
        (["--mqtt-url", "mqtt://127.0.0.1:1", "--duration", "1"], "cannot reach the MQTT broker"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "loadgen",
            "--config",
            str(REPO / "config" / "stellwerk.yaml"),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.integration
async def test_a_short_run_against_a_real_daemon_loses_nothing(
    tmp_path: Path, names: Names, start_daemon: Callable[..., Any]
) -> None:
    agents = ("anna", "ben", "cem", "doris", "emil", "fatma")
    routing = write_routing(tmp_path / "routing.yaml", agents, offer_timeout=5.0, wrap_up=5.0)
    daemon, target = await daemon_for_loadgen(start_daemon, routing, names, agents)
    profile = Profile(
        rate=15.0,
        duration=2.0,
        mix=parse_mix("phone=40,email=20,chat=25,social=15"),
        handle_time=0.2,
        think_time=0.05,
        after_call_work=0.05,
        patience=0.0,
        grace=8.0,
        seed=7,
        progress=False,
        crowd_share=0.0,
    )
    report = await LoadGen(target, profile).run()
    assert report.sent == 30  # 2 s at 15/s
    assert report.refused == 0 and report.accepted == report.sent
    assert report.lost == 0
    # every contact reached an agent: the write_routing file has no crowd-first rule
    assert report.offered == report.sent
    # the seed fixes the traffic, whatever order the network answers in
    sent = {channel: counts["sent"] for channel, counts in report.by_channel.items()}
    assert sent == {"chat": 12, "email": 9, "phone": 7, "social": 2}
    assert report.latency_ms["p99"] >= report.latency_ms["p50"] > 0
    assert report.routing_latency_ms["p50"] > 0
    assert report.agent_refusals == 0
    assert "LOST 0" in report.text()
    assert "ingress->routed latency" in report.text()
    as_json = json.loads(json.dumps(asdict(report)))  # what --json prints
    assert as_json["lost"] == 0 and as_json["latency_ms"]["p50"] > 0

    # the run wound down: every simulated agent logged out again
    async def all_offline() -> bool:
        return all(a["state"] == "offline" for a in daemon.state.view.agent_list())

    from tests.daemon.conftest import wait_until

    await wait_until(all_offline, 5, "the agents to log out")


def test_offers_for_an_agent_loadgen_does_not_simulate_are_left_to_that_agent() -> None:
    # During `make demo` a person at the desk gets some of loadgen's contacts: loadgen counts
    # them as offered but never accepts (or completes) them on that person's behalf.
    gen = LoadGen(Target(agents=["a01"]), Profile(think_time=0.0))
    scheduled: list[tuple[Any, ...]] = []
    gen._later = lambda delay, fn, *args: scheduled.append(args)  # type: ignore[method-assign]
    gen.tracks["c-1"] = Track(channel="chat", sent_at=0.0)
    gen.tracks["c-2"] = Track(channel="chat", sent_at=0.0)
    gen._on_offer({"contact_id": "c-1", "agent_id": "demo", "offer_id": "o1"})
    gen._on_offer({"contact_id": "c-2", "agent_id": "a01", "offer_id": "o2"})
    assert scheduled == [("a01", "o2", "c-2")]
    assert gen.offered == 2


async def test_offers_for_contacts_loadgen_did_not_create_are_handled_and_reported_apart(
    tmp_path: Path, names: Names, start_daemon: Callable[..., Any], mqtt_probe: Any
) -> None:
    """A daemon that already has work: its waiting contacts are offered to the simulated agents
    too. They are handled (not left to time out again and again), and the report keeps them out
    of loadgen's own figures and says they were there."""
    from tests.daemon.conftest import ari, wait_until

    agents = ("anna", "ben")
    routing = write_routing(tmp_path / "routing.yaml", agents, offer_timeout=2.0, wrap_up=0.1)
    _, target = await daemon_for_loadgen(start_daemon, routing, names, agents)
    # Work the daemon had before loadgen came: three calls waiting, nobody logged in.
    for n in range(3):
        await mqtt_probe.publish("in/phone/asterisk-ari", ari("StasisStart", f"old-{n}"))
    await mqtt_probe.wait_for("events/contact.queued", count=3)
    profile = Profile(
        rate=4.0,
        duration=1.0,
        mix=parse_mix("chat=100"),
        handle_time=0.05,
        think_time=0.0,
        after_call_work=0.0,
        patience=0.0,
        grace=8.0,
        seed=3,
        progress=False,
        crowd_share=0.0,
    )
    report = await LoadGen(target, profile).run()
    # Every old call was accepted and completed by a simulated agent, none expired.
    for n in range(3):
        cid = f"asterisk-ari:old-{n}"
        await wait_until(
            lambda cid=cid: mqtt_probe.seen("events/contact.completed", contact_id=cid),
            10,
            f"{cid} completed",
        )
    assert mqtt_probe.seen("events/contact.offer_expired") == []
    # loadgen's own figures are its own contacts only; the others are counted apart.
    assert report.sent == 4 and report.offered == 4 and report.lost == 0
    assert report.other_contacts == 3 and report.other_offers >= 3
    assert "WARNING" in report.text() and "3 contacts loadgen did not create" in report.text()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Any]:
    """A private Mosquitto (started by the test with its auth conf), stopped after the daemon."""
    from tests.daemon.private_servers import PrivateMosquitto

    brokers: list[PrivateMosquitto] = []

    def start(auth_conf: str) -> PrivateMosquitto:
        broker = PrivateMosquitto(dir=tmp_path / "mq", auth_conf=auth_conf)
        broker.dir.mkdir()
        broker.start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.mark.integration
async def test_with_broker_config_accounts_every_party_uses_its_own(
    tmp_path: Path,
    names: Names,
    private_broker: Callable[[str], Any],
    start_daemon: Callable[..., Any],
) -> None:
    """loadgen --credentials against a broker with accounts and ACLs only: calls via the
    bridge account, each agent over its own, events via a reader; nothing lost."""
    from router.cli.loadgen import mqtt_accounts
    from router.daemon.broker_config import generate

    agents = ("anna", "ben", "cem")
    routing = write_routing(tmp_path / "routing.yaml", agents, offer_timeout=5.0, wrap_up=5.0)
    gen = generate(routing, tmp_path / "broker", prefix=names.topic_prefix)
    broker = private_broker((gen.out / "mosquitto-auth.conf").read_text())
    await start_daemon(
        routing,
        mqtt_url=broker.url,
        mqtt_username="stellwerk",
        mqtt_password=gen.mqtt["stellwerk"],
    )
    target = Target(
        mqtt_port=broker.peer_port,
        prefix=names.topic_prefix,
        agents=list(agents),
        accounts=mqtt_accounts(gen.out / "credentials.yaml"),
    )
    profile = Profile(
        rate=10.0,
        duration=1.0,
        mix=parse_mix("phone=100"),
        handle_time=0.1,
        think_time=0.02,
        after_call_work=0.05,
        patience=0.0,
        grace=8.0,
        seed=3,
        progress=False,
    )
    report = await LoadGen(target, profile).run()
    assert report.sent == 10 and report.accepted == 10
    assert report.lost == 0 and report.offered == 10 and report.agent_refusals == 0


def test_the_first_progress_line_shows_no_rate_from_a_few_microseconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import re
    import time

    gen = LoadGen(Target(), Profile(rate=5.0, duration=10.0))
    gen._started = time.perf_counter()
    gen.sent = 1
    gen._progress()
    line = capsys.readouterr().err
    assert "sent 1" in line
    assert all(float(r) <= 5.0 for r in re.findall(r"sent \d+ \(([\d.]+)/s\)", line)), line
    gen._started -= 2.0
    gen.sent = 10
    gen._progress()
    assert re.search(r"sent 10 \(5\.0/s\)", capsys.readouterr().err)
