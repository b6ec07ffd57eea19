"""Crowd experts from the routing file and an experts file, recognised on every channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from channels.base import DecodeConfig
from channels.common import to_e164
from channels.contact_event import ContactEvent, Sender
from rules.decision import CustomerView
from rules.identity import normalize_handle, normalize_phone, phone_key, sender_keys
from rules.load import RoutingFileError, load_routing

ROOT = Path(__file__).resolve().parents[2]

ROUTING = """\
skills: [dsl, tv]
queues:
  general: {}
  expert_desk: {}
experts:
  - {id: inline, phones: ["030 1234567"], emails: [Inline@Example.ORG], handles: ["x:@Inline"]}
experts_file: experts.csv
rules:
  - {name: expert, when: customer.expert, queue: expert_desk}
  - {name: default, default: true, queue: general}
"""

CSV = """\
id,name,level,skills,phones,emails,handles
x-bvogel,Bernd Vogel,2,dsl,+49 89 1234567;0160 9988776,Bernd.Vogel@example.com,discourse:BVogel
x-csommer,Claudia Sommer,3,tv,,c.sommer@example.org,discourse:claudia_s;whatsapp:+491701112233
"""


def event(channel: str = "phone", **sender: str) -> ContactEvent:
    return ContactEvent(
        kind="new",
        contact_id="generic:1",
        channel=channel,  # type: ignore[arg-type]
        source="generic",
        external_id="1",
        sender=Sender(**sender),
    )


@pytest.fixture
def table_dir(tmp_path: Path) -> Path:
    (tmp_path / "routing.yaml").write_text(ROUTING, encoding="utf-8")
    (tmp_path / "experts.csv").write_text(CSV, encoding="utf-8")
    return tmp_path


def test_experts_from_the_file_and_the_csv_with_normalised_keys(table_dir: Path) -> None:
    table = load_routing(table_dir / "routing.yaml")
    by_id = {e.id: e for e in table.experts}
    assert sorted(by_id) == ["inline", "x-bvogel", "x-csommer"]
    assert by_id["inline"].phones == ("+49301234567",)
    assert by_id["inline"].emails == ("inline@example.org",)
    assert by_id["inline"].handles == ("x:inline",)
    bernd = by_id["x-bvogel"]
    assert (bernd.name, bernd.level, bernd.skills) == ("Bernd Vogel", 2, ("dsl",))
    assert bernd.phones == ("+49891234567", "+491609988776")
    assert bernd.handles == ("discourse:bvogel",)
    assert by_id["x-csommer"].phones == ()


@pytest.mark.parametrize(
    ("channel", "sender", "expert"),
    [
        ("phone", {"phone": "+491609988776"}, "x-bvogel"),  # second number in the CSV cell
        ("phone", {"phone": "0049 30 1234567"}, "inline"),  # written differently
        ("email", {"email": "bernd.vogel@EXAMPLE.com"}, "x-bvogel"),
        ("social", {"handle": "discourse:claudia_S"}, "x-csommer"),
        ("chat", {"handle": "whatsapp:+491701112233"}, "x-csommer"),
        ("social", {"handle": "x:inline", "name": "Someone"}, "inline"),
        ("chat", {"email": "stranger@example.com", "handle": "discourse:bvogel"}, "x-bvogel"),
    ],
)
def test_experts_are_recognised_on_every_channel(
    table_dir: Path, channel: str, sender: dict[str, str], expert: str
) -> None:
    table = load_routing(table_dir / "routing.yaml")
    ev = event(channel, **sender)
    found = table.expert_for(table.identity_keys(ev))
    assert found is not None and found.id == expert
    view = table.customer_view(ev)
    assert (view.expert, view.known, view.id) == (True, True, expert)
    assert table.decide(ev, view, 0).queue == "expert_desk"


def test_strangers_are_not_experts(table_dir: Path) -> None:
    table = load_routing(table_dir / "routing.yaml")
    ev = event("phone", phone="+49891234568", handle="rocketchat:bvogel")
    assert table.expert_for(table.identity_keys(ev)) is None
    assert table.customer_view(ev) == CustomerView()
    assert table.decide(ev, CustomerView(), 0).queue == "general"


def test_csv_problems_are_located_in_the_csv(table_dir: Path) -> None:
    (table_dir / "experts.csv").write_text(
        "id,name,level,skills,phones,emails,handles,notes\n"
        "x-a,A,two,dsl,,,\n"
        "x-b,B,1,fibre,,,alice\n"
        "x-b,B again,1,,,,\n",
        encoding="utf-8",
    )
    with pytest.raises(RoutingFileError) as info:
        load_routing(table_dir / "routing.yaml")
    csv = str(table_dir / "experts.csv")
    assert [str(p) for p in info.value.problems] == [
        f"{csv}:1:44: unknown column 'notes' (known: id, name, level, skills, phones, emails,"
        " handles)",
        f"{csv}:2:7: level: expected an integer, got 'two'",
        f"{csv}:3:9: unknown skill 'fibre'",
        f"{csv}:3:17: handle 'alice' must be written source:user",
        f"{csv}:4:1: duplicate expert id 'x-b'",
    ]


def test_a_yaml_experts_file_is_validated_like_the_routing_file(table_dir: Path) -> None:
    routing = (table_dir / "routing.yaml").read_text().replace("experts.csv", "experts.yaml")
    (table_dir / "routing.yaml").write_text(routing)
    (table_dir / "experts.yaml").write_text(
        "- {id: y1, phones: ['+4930999']}\n- {id: y2, level: high}\n- {name: nobody}\n"
    )
    with pytest.raises(RoutingFileError) as info:
        load_routing(table_dir / "routing.yaml")
    yml = str(table_dir / "experts.yaml")
    assert [str(p) for p in info.value.problems] == [
        f"{yml}:2:19: experts[1].level: Expected `int`, got `str`",
        f"{yml}:3:3: experts[2]: missing required field 'id'",
    ]


def test_a_missing_experts_file_is_reported_at_its_reference(table_dir: Path) -> None:
    (table_dir / "experts.csv").unlink()
    with pytest.raises(RoutingFileError) as info:
        load_routing(table_dir / "routing.yaml")
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (7, 15)
    assert problem.message.startswith("cannot read experts file")


def test_example_config_recognises_its_csv_experts() -> None:
    table = load_routing(ROOT / "config" / "routing.yaml")
    ev = event("chat", handle="messenger:Hakan.Roth")
    assert table.customer_view(ev).id == "x-hroth"


def test_identity_normalisation() -> None:
    assert normalize_phone("030 1234567") == "+49301234567"
    assert normalize_phone("+43 1 2345678") == "+4312345678"
    assert normalize_phone("anonymous") == "anonymous"  # kept as given
    assert normalize_handle("Discourse:@Alice") == "discourse:alice"
    assert normalize_handle("alice") is None
    assert sender_keys(Sender(phone="0171 2345678", email="A@B.DE", handle="x:Bob")) == (
        "phone:+491712345678",
        "email:a@b.de",
        "handle:x:bob",
    )


def test_an_extension_in_the_experts_file_matches_the_extension_a_pbx_sends() -> None:
    # The adapters keep "1001" as given; the experts file must not turn it into +491001.
    assert phone_key("1001") == "phone:" + (to_e164("1001", DecodeConfig().default_region) or "")
    assert phone_key("030 1234567") == "phone:+49301234567"
