"""The routing file's telephony fields: agents' endpoints per system and the queue's phone
settings, validated with located errors by ``stellwerk check``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.endpoints import endpoint_problem
from rules.load import RoutingFileError, parse_routing

BASE = """\
skills: [de]
queues:
  general:
    skills: {{de: 1}}
{queue}
agents:
  - id: anna
    endpoints: {endpoints}
rules:
  - {{name: d, default: true, queue: general}}
"""


def problems(endpoints: str = "{}", queue: str = "") -> list[str]:
    try:
        parse_routing(BASE.format(endpoints=endpoints, queue=queue), "r.yaml")
    except RoutingFileError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_valid_endpoints_and_queue_settings_load() -> None:
    table = parse_routing(
        BASE.format(
            endpoints='{asterisk: PJSIP/1001, freeswitch: "user/1001@default", '
            'twilio: "client:anna"}',
            queue="    phone_offer: desktop\n    music_class: jazz\n"
            "    announcement: {media: 'sound:queue-periodic-announce', every: 45}",
        ),
        "r.yaml",
    )
    agent = table.file.agents[0]
    assert agent.endpoints.asterisk == "PJSIP/1001"
    assert agent.endpoints.freeswitch == "user/1001@default"
    queue = table.file.queues["general"]
    assert (queue.phone_offer, queue.music_class) == ("desktop", "jazz")
    assert queue.announcement is not None and queue.announcement.every == 45


def test_queue_defaults_ring_the_phone_with_default_music() -> None:
    queue = parse_routing(BASE.format(endpoints="{}", queue=""), "r.yaml").file.queues["general"]
    assert (queue.phone_offer, queue.music_class, queue.announcement) == ("phone", "default", None)


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ("{asterisk: 1001}", "r.yaml:8:27: agents[0].endpoints.asterisk: Expected `str`"),
        ('{asterisk: "PJSIP/"}', "r.yaml:8:27: asterisk endpoint 'PJSIP/' must be TECH/resource"),
        ('{freeswitch: "user/1001"}', "r.yaml:8:29: freeswitch endpoint 'user/1001' must be"),
        ('{freeswitch: "{a=b"}', "r.yaml:8:29: freeswitch endpoint '{a=b': unclosed"),
        ('{twilio: "anna"}', "r.yaml:8:25: twilio endpoint 'anna' must be client:NAME"),
        ('{twilio: "+49 30 1234"}', "r.yaml:8:25: twilio endpoint '+49 30 1234' must be"),
        ("{skype: x}", "r.yaml:8:17: agents[0].endpoints: unknown field 'skype'"),
    ],
)
def test_bad_endpoints_are_located(endpoints: str, expected: str) -> None:
    (problem,) = problems(endpoints)
    assert problem.startswith(expected), problem


def test_bad_queue_phone_settings_are_located() -> None:
    assert problems(queue="    phone_offer: ring") == [
        "r.yaml:5:18: queues.general.phone_offer: Invalid enum value 'ring'"
    ]
    assert problems(queue="    music_class: ''\n    announcement: {media: x, every: -5}") == [
        "r.yaml:5:18: music_class must not be empty",
        "r.yaml:6:37: announcement every must be positive seconds",
    ]


@pytest.mark.parametrize(
    ("system", "value"),
    [
        ("asterisk", "PJSIP/1001"),
        ("asterisk", "Local/1001@agents"),
        ("asterisk", "SIP/trunk/0301234"),
        ("freeswitch", "user/1001@default"),
        ("freeswitch", "sofia/internal/1001@pbx.example.com"),
        ("freeswitch", "sofia/gateway/carrier/+4930123456"),
        ("freeswitch", "{origination_caller_id_number=100}user/1001@default"),
        ("freeswitch", "loopback/1001"),
        ("twilio", "client:anna"),
        ("twilio", "+4930123456"),
        ("twilio", "sip:anna@example.com"),
    ],
)
def test_real_endpoint_shapes_are_accepted(system: str, value: str) -> None:
    assert endpoint_problem(system, value) is None


@given(st.text(min_size=1, max_size=30))
def test_an_endpoint_with_whitespace_is_never_accepted(text: str) -> None:
    value = f"PJSIP/{text} x"
    for system in ("asterisk", "freeswitch", "twilio"):
        assert endpoint_problem(system, value) is not None
