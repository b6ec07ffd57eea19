"""The crowd admin API for real: aiohttp on 127.0.0.1, the real Intake and a real Redis journal;
the router's view is a real Engine, fed with what the API journaled (as the router would)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import test_utils

from channels.contact_event import ContactEvent, Sender
from router.daemon.http import AppState, make_app
from router.daemon.intake import Intake
from router.daemon.journal import AdminEntry, Journal
from router.daemon.metrics import Metrics
from router.engine import Engine
from router.messages import LinkKeys, RemoveExpert, UpsertExpert
from rules.load import load_routing
from tests.daemon.conftest import write_routing
from tests.daemon.test_http import ADMIN_TOKEN, settings

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class CrowdApi:
    """The app with an Engine as its view; ``apply`` feeds journaled admin entries to it."""

    def __init__(
        self,
        client: test_utils.TestClient,
        journal: Journal,
        engine: Engine,
        state: AppState,
        metrics: Metrics,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.state = state
        self.journal = journal
        self.engine = engine
        self.applied = "0-0"

    async def call(
        self, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        async with self.client.request(method, path, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    async def apply(self) -> list[AdminEntry]:
        """What the router would do: apply the new journal entries to the engine."""
        rows = await self.journal.read_after(self.applied, None, 100)
        entries = []
        for entry_id, entry in rows:
            assert isinstance(entry, AdminEntry)
            self.engine.handle(entry.cmd, entry.at)
            entries.append(entry)
            self.applied = entry_id
        return entries


@pytest.fixture
async def crowd(journal: Journal, tmp_path: Path) -> AsyncIterator[CrowdApi]:
    engine = Engine(load_routing(write_routing(tmp_path / "r.yaml")))
    state = AppState(view=engine, lease_held=True)
    metrics = Metrics()
    cfg = settings()
    app = make_app(Intake(journal, cfg.decode_config(), metrics=metrics), state, cfg, metrics)
    async with test_utils.TestClient(test_utils.TestServer(app)) as client:
        yield CrowdApi(client, journal, engine, state, metrics)


async def test_put_expert_is_journaled_and_then_listed_in_the_report(crowd: CrowdApi) -> None:
    body = {
        "name": "Claudia Sommer",
        "level": 3,
        "skills": ["tv"],
        "phones": ["0152 33445566"],
        "handles": ["discourse:claudia_s"],
    }
    status, reply = await crowd.call("PUT", "/v1/experts/x-csommer", body, **AUTH)
    assert status == 202 and reply["op"] == "upsert_expert"
    (entry,) = await crowd.apply()
    assert isinstance(entry.cmd, UpsertExpert)
    assert entry.cmd.expert.id == "x-csommer" and entry.cmd.expert.level == 3
    status, report = await crowd.call("GET", "/v1/experts", **AUTH)
    assert status == 200
    row = next(r for r in report["experts"] if r["id"] == "x-csommer")
    assert (row["name"], row["level"], row["activity"], row["answers"]) == (
        "Claudia Sommer",
        3,
        "never_seen",
        0,
    )
    assert report["summary"]["experts"] == 2  # x-heinz from the routing file, and her
    # Her number is recognised from now on: a call from it is an expert's contact.
    call = ContactEvent(
        kind="new",
        contact_id="asterisk-ari:1",
        channel="phone",
        source="asterisk-ari",
        external_id="1",
        sender=Sender(phone="+4915233445566"),
    )
    cmds = crowd.engine.handle(call, time.time())
    queued = [c for c in cmds if getattr(c, "type", "") == "contact.queued"]
    assert queued[0].event.expert_id == "x-csommer"  # type: ignore[attr-defined]


async def test_bad_expert_bodies_are_400_with_the_reason_and_not_journaled(
    crowd: CrowdApi,
) -> None:
    cases: list[tuple[Any, str]] = [
        (b"{not json", "bad_expert"),
        ({"name": "X", "level": 0}, "bad_expert"),
        ({"name": "X", "colour": "red"}, "bad_expert"),
        ({"emails": ["no-at-sign"]}, "bad_expert"),
        ({"handles": ["nosource"]}, "bad_expert"),
        ({"phones": ["call me"]}, "bad_expert"),
    ]
    for body, error in cases:
        status, reply = await crowd.call("PUT", "/v1/experts/x-new", body, **AUTH)
        assert (status, reply["error"]) == (400, error), body
        assert reply["detail"]
    assert await crowd.apply() == []


async def test_changes_need_the_bearer_token(crowd: CrowdApi) -> None:
    expert = {"name": "X"}
    link = {"keys": ["phone:+4930123456", "email:a@example.org"]}
    for method, path, body in (
        ("PUT", "/v1/experts/x-new", expert),
        ("DELETE", "/v1/experts/x-heinz", None),
        ("POST", "/v1/customers/link", link),
        ("GET", "/v1/customers/c1", None),
        ("GET", "/v1/experts", None),
    ):
        status, reply = await crowd.call(method, path, body)
        assert (status, reply["error"]) == (401, "unauthorized"), path
        status, _ = await crowd.call(method, path, body, Authorization="Bearer wrong")
        assert status == 401
    assert await crowd.apply() == []


async def test_delete_removes_an_expert_and_an_unknown_one_is_404(crowd: CrowdApi) -> None:
    status, reply = await crowd.call("DELETE", "/v1/experts/x-nobody", **AUTH)
    assert (status, reply["error"]) == (404, "unknown_expert")
    status, reply = await crowd.call("DELETE", "/v1/experts/x-heinz", **AUTH)
    assert status == 202
    (entry,) = await crowd.apply()
    assert entry.cmd == RemoveExpert(expert_id="x-heinz")
    _, report = await crowd.call("GET", "/v1/experts", **AUTH)
    assert [r["id"] for r in report["experts"]] == []


async def test_link_keys_then_look_the_customer_up_by_either_key(crowd: CrowdApi) -> None:
    for bad in (b"[]", b'{"keys": "phone:+49301"}', {"keys": ["phone:+4930123456"]}):
        status, reply = await crowd.call("POST", "/v1/customers/link", bad, **AUTH)
        assert status == 400, bad
        assert reply["error"] == "bad_link"
    status, reply = await crowd.call(
        "POST", "/v1/customers/link", {"keys": ["phone:+4930123456", "fax:123"]}, **AUTH
    )
    assert (status, reply["error"]) == (400, "bad_identity_key")
    keys = ["phone:030 123456", "email:Anna@Example.org"]
    status, _ = await crowd.call("POST", "/v1/customers/link", {"keys": keys}, **AUTH)
    assert status == 202
    (entry,) = await crowd.apply()
    assert entry.cmd == LinkKeys(keys=tuple(keys))
    by_phone = await crowd.call("GET", "/v1/customers/" + quote("phone:+4930123456"), **AUTH)
    by_mail = await crowd.call("GET", "/v1/customers/" + quote("email:anna@example.org"), **AUTH)
    assert by_phone[0] == by_mail[0] == 200
    assert by_phone[1] == by_mail[1]
    assert set(by_phone[1]["keys"]) == {"phone:+4930123456", "email:anna@example.org"}
    by_id = await crowd.call("GET", "/v1/customers/" + by_phone[1]["customer_id"], **AUTH)
    assert by_id == by_phone
    status, reply = await crowd.call("GET", "/v1/customers/" + quote("email:x@y.z"), **AUTH)
    assert (status, reply["error"]) == (404, "unknown_customer")


async def test_reads_are_503_on_a_standby_while_changes_are_still_journaled(
    crowd: CrowdApi,
) -> None:
    crowd.state.view = None  # a standby: the router runs elsewhere
    status, reply = await crowd.call("GET", "/v1/experts", **AUTH)
    assert (status, reply["error"]) == (503, "not_routing")
    status, reply = await crowd.call("GET", "/v1/customers/c1", **AUTH)
    assert (status, reply["error"]) == (503, "not_routing")
    # Changes go into the shared journal; the routing daemon applies them.
    status, _ = await crowd.call("PUT", "/v1/experts/x-new", {"name": "New"}, **AUTH)
    assert status == 202
    assert len(await crowd.apply()) == 1


async def test_an_admin_change_is_audited_once_with_who_and_from_where(
    crowd: CrowdApi, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    status, _ = await crowd.call("PUT", "/v1/experts/x-audit", {"name": "A"}, **AUTH)
    assert status == 202
    status, _ = await crowd.call("DELETE", "/v1/experts/x-heinz", None, Authorization="Bearer no")
    assert status == 401
    out = capsys.readouterr().out
    changes = [line for line in out.splitlines() if "admin.change" in line]
    assert len(changes) == 1
    assert all(f in changes[0] for f in ("op=upsert_expert", "principal=admin_token", "remote="))
    refusals = [line for line in out.splitlines() if "auth.refused" in line]
    assert len(refusals) == 1 and "reason=bad_token" in refusals[0]
    assert ADMIN_TOKEN not in out
    assert crowd.metrics.admin_changes.labels("upsert_expert")._value.get() == 1
    assert crowd.metrics.admin_changes.labels("remove_expert")._value.get() == 0
