"""The Twilio peer and the library-built TwiML and REST client, without the daemon.

A small aiohttp app stands in for Stellwerk's webhooks (answering with the TwiML builders of
``router.daemon.telephony.twilio_api``), so these tests pin what the peer does for each verb and
REST call, and that it agrees with the reference material where that is present.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from router.daemon.telephony.twilio_api import (
    TwilioException,
    TwilioRest,
    TwilioRestException,
    basic_auth,
    dial_twiml,
    enqueue_twiml,
    hangup_twiml,
    signature_valid,
    twilio_queue_name,
    wait_twiml,
)
from tests.peers.twilio import TwilioPeer, TwimlError, check_twiml, wait_for

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "twilio"


@dataclass
class Webhooks:
    """Stellwerk's side, scripted: path -> function of the form fields -> TwiML."""

    answers: dict[str, Callable[[dict[str, str]], str]]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    bad_signatures: int = 0
    token: str = ""
    base: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        url = f"{self.base}{request.path_qs}"
        if not signature_valid(self.token, url, form, request.headers.get("X-Twilio-Signature")):
            self.bad_signatures += 1
            return web.Response(status=403)
        self.seen.append((request.path, form))
        answer = self.answers.get(request.path)
        text = answer(form) if answer else "<Response/>"
        return web.Response(text=text, content_type="text/xml")

    def fields(self, path: str) -> list[dict[str, str]]:
        return [f for p, f in self.seen if p == path]


@pytest.fixture
async def world() -> AsyncIterator[tuple[TwilioPeer, Webhooks, TwilioRest]]:
    hooks = Webhooks(answers={})
    app = web.Application()
    app.router.add_post("/{tail:.*}", hooks.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hooks.base = f"http://127.0.0.1:{port}"
    peer = TwilioPeer(
        voice_url=f"{hooks.base}/voice", status_callback=f"{hooks.base}/status", play_seconds=0.05
    )
    hooks.token = peer.auth_token
    await peer.start()
    rest = TwilioRest(peer.account_sid, peer.auth_token, peer.api_base)
    try:
        yield peer, hooks, rest
    finally:
        await rest.close()
        await peer.close()
        await runner.cleanup()


async def test_a_call_is_queued_dequeued_to_an_agent_bridged_and_ended(
    world: tuple[TwilioPeer, Webhooks, TwilioRest],
) -> None:
    peer, hooks, rest = world
    b = hooks.base
    hooks.answers["/voice"] = lambda f: enqueue_twiml("support", f"{b}/wait")
    hooks.answers["/wait"] = lambda f: wait_twiml("https://example.com/moh.mp3", None)
    hooks.answers["/dial"] = lambda f: dial_twiml(
        "client:anna", timeout=5, action=f"{b}/dialled", status_callback=f"{b}/leg"
    )
    hooks.answers["/dialled"] = lambda f: hangup_twiml()
    peer.agent("client:anna", "answer", after=0.05)

    sid = peer.incoming("+4930123456")
    await wait_for(lambda: peer.member_of(sid) == "support", 5, "the caller in the queue")
    wait = await wait_for(lambda: hooks.fields("/wait"), 5, "the wait document request")
    queues = await rest.queue_sids()
    assert wait[0]["QueueSid"] == queues["support"]
    assert wait[0]["QueuePosition"] == "1"
    assert await rest.members(queues["support"]) == [sid]

    await rest.dequeue(queues["support"], sid, f"{b}/dial")
    answered = await wait_for(
        lambda: [f for f in hooks.fields("/leg") if f["CallStatus"] == "in-progress"], 5, "answer"
    )
    leg = peer.calls[answered[0]["CallSid"]]
    assert answered[0]["ParentCallSid"] == sid
    assert leg.to == "client:anna" and peer.member_of(sid) is None
    live = {c.sid: c for c in await rest.live_calls()}
    assert live[sid].status == "in-progress" and live[leg.sid].parent_sid == sid

    await peer.hangup(leg.sid)  # the agent hangs up: the dial's action decides what follows
    status = await wait_for(lambda: hooks.fields("/status"), 5, "the status callback")
    dialled = hooks.fields("/dialled")
    assert dialled[0]["DialCallStatus"] == "completed"
    assert dialled[0]["CallStatus"] == "in-progress"
    assert status[0]["CallStatus"] == "completed"
    assert peer.calls[sid].status == "completed"
    assert peer.errors == [] and hooks.bad_signatures == 0
    for doc in peer.documents:  # every document the peer ran came from the library
        assert doc.text.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')


async def test_busy_and_silent_agents_end_the_dial_with_their_status(
    world: tuple[TwilioPeer, Webhooks, TwilioRest],
) -> None:
    peer, hooks, _ = world
    b = hooks.base
    endpoints = iter(["+4930999", "sip:bob@pbx.example.com"])
    hooks.answers["/voice"] = lambda f: dial_twiml(
        next(endpoints), timeout=1, action=f"{b}/dialled", status_callback=f"{b}/leg"
    )
    hooks.answers["/dialled"] = lambda f: hangup_twiml()
    peer.agent("+4930999", "busy", after=0.05)
    first = peer.incoming("+4930111")
    second = peer.incoming("+4930222")
    await wait_for(lambda: len(hooks.fields("/dialled")) == 2, 5, "both dials to end")
    outcome = {f["CallSid"]: f["DialCallStatus"] for f in hooks.fields("/dialled")}
    assert outcome == {first: "busy", second: "no-answer"}
    legs = {leg.to: leg.status for leg in peer.legs()}
    assert legs == {"+4930999": "busy", "sip:bob@pbx.example.com": "no-answer"}


async def test_caller_hanging_up_while_the_agent_rings_cancels_the_leg(
    world: tuple[TwilioPeer, Webhooks, TwilioRest],
) -> None:
    peer, hooks, _ = world
    b = hooks.base
    hooks.answers["/voice"] = lambda f: dial_twiml(
        "client:anna", timeout=10, action=f"{b}/dialled", status_callback=f"{b}/leg"
    )
    sid = peer.incoming("+4930111")
    await wait_for(lambda: peer.ringing(), 5, "the agent to ring")
    await peer.hangup(sid)
    await wait_for(lambda: hooks.fields("/leg"), 5, "the leg's completed callback")
    assert hooks.fields("/leg")[0]["CallStatus"] == "canceled"
    assert peer.ringing() == []
    dialled = await wait_for(lambda: hooks.fields("/dialled"), 5, "the dial action")
    assert dialled[0]["CallStatus"] == "completed"


async def test_call_update_redirects_and_hangs_up(
    world: tuple[TwilioPeer, Webhooks, TwilioRest],
) -> None:
    peer, hooks, rest = world
    b = hooks.base
    hooks.answers["/voice"] = lambda f: enqueue_twiml("billing", f"{b}/wait")
    hooks.answers["/wait"] = lambda f: wait_twiml("https://example.com/moh.mp3", "Please hold.")
    hooks.answers["/elsewhere"] = lambda f: enqueue_twiml("support", f"{b}/wait")
    sid = peer.incoming("+4930111")
    # with an announcement the document ends and Twilio asks again
    await wait_for(lambda: len(hooks.fields("/wait")) >= 2, 5, "the wait document twice")
    await rest.redirect(sid, f"{b}/elsewhere")
    await wait_for(lambda: peer.member_of(sid) == "support", 5, "the move to support")
    await rest.end(sid)
    assert peer.calls[sid].status == "completed"
    with pytest.raises(TwilioRestException) as err:
        await rest.redirect(sid, f"{b}/elsewhere")
    assert err.value.status == 400 and err.value.code == 21220


async def test_rest_refuses_what_twilio_refuses(
    world: tuple[TwilioPeer, Webhooks, TwilioRest],
) -> None:
    peer, hooks, rest = world
    with pytest.raises(TwilioRestException) as err:
        await rest.redirect("CA" + "0" * 32, "https://example.com/x")
    assert (err.value.status, err.value.code) == (404, 20404)
    with pytest.raises(TwilioRestException) as err:
        await rest.dequeue("QU" + "0" * 32, "CA" + "0" * 32, "https://example.com/x")
    assert err.value.status == 404
    wrong = TwilioRest(peer.account_sid, "not-the-token", peer.api_base)
    try:
        with pytest.raises(TwilioException) as listing:  # a list's page raises the base class
            await wrong.queue_sids()
        assert "20003" in str(listing.value)
    finally:
        await wrong.close()
    # the library's own calls, with parameters the peer does not know or lacks
    with pytest.raises(TwilioRestException) as err:
        await rest.client.calls("CA" + "1" * 32).update_async(url="not a url")
    assert err.value.status in (400, 404)
    hooks.answers["/voice"] = lambda f: "<Response><Conference>x</Conference></Response>"
    sid = peer.incoming("+4930111")  # TwiML Twilio cannot run: an application error
    await wait_for(lambda: not peer.calls[sid].live, 5, "the failed call to end")
    assert "12200" in peer.errors[0]
    peer.errors.clear()
    with pytest.raises(TwilioRestException) as err:
        await rest.client.calls(sid).update_async(url="ftp://example.com/x")
    assert err.value.status == 400


async def test_unreachable_rest_api_refuses_connections(
    world: tuple[TwilioPeer, Webhooks, TwilioRest],
) -> None:
    peer, _, rest = world
    assert await rest.queue_sids() == {}
    await peer.set_reachable(False)
    with pytest.raises(Exception) as err:
        await rest.queue_sids()
    assert not isinstance(err.value, TwilioRestException)
    await peer.set_reachable(True)
    assert await rest.queue_sids() == {}


def test_the_checker_refuses_what_twilio_refuses() -> None:
    for bad in (
        "<Response><Enqueue waitUrl='/w'></Enqueue></Response>",
        "<Response><Dial><Conference>x</Conference></Dial></Response>",
        "<Response><Dial timeout='soon'><Client>a</Client></Dial></Response>",
        "<Response><Play loop='0' volume='3'>x</Play></Response>",
        "<Response><Leave/></Response>",
        "<Response><Enqueue>x</Enqueue>",
        "<Reply/>",
    ):
        with pytest.raises(TwimlError):
            check_twiml(bad)
    with pytest.raises(TwimlError):
        check_twiml("<Response><Dial><Client>a</Client></Dial></Response>", wait_document=True)
    check_twiml("<Response><Leave/></Response>", wait_document=True)


# ---- against the reference (read at test time; copied nowhere) -------------------------------


def _reference(name: str) -> str:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the Twilio reference is not beside this checkout")
    return path.read_text(encoding="utf-8")


def test_every_twiml_example_passes_the_peers_checker() -> None:
    text = _reference("twiml-examples.md")
    blocks = re.findall(r"```xml\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) > 10
    for block in blocks:
        # <Leave/> is the one verb that only works in a waitUrl document
        check_twiml(block, wait_document="<Leave" in block)


def test_library_twiml_matches_the_examples_for_the_constructs_stellwerk_uses() -> None:
    text = _reference("twiml-examples.md")
    lines = set(re.findall(r"^<\?xml.*$", text, flags=re.M))
    # the examples' own calls, made with the library Stellwerk uses, give their documents
    assert wait_twiml("https://example.com/moh.mp3", None) in {
        line.replace("<Say>All agents are busy. Please hold.</Say>", "") for line in lines
    }
    assert hangup_twiml() in lines
    dial = dial_twiml(
        "client:agent_42", timeout=20, action="/twilio/dial-done", status_callback="/cb"
    )
    root = check_twiml(dial)
    example = check_twiml(next(line for line in lines if "agent_42" in line))
    ours, theirs = root.find("Dial"), example.find("Dial")
    assert ours is not None and theirs is not None
    assert set(theirs.attrib) <= set(ours.attrib)
    assert ours.find("Client") is not None and ours.find("Client").text == "agent_42"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("reference", "make"),
    [
        ("member-update-response.json", "member"),
        ("call-update-response.json", "call"),
        ("member-list-response.json", "members"),
    ],
)
async def test_rest_answers_have_the_api_definitions_fields(
    world: tuple[TwilioPeer, Webhooks, TwilioRest], reference: str, make: str
) -> None:
    example: dict[str, Any] = json.loads(_reference(reference))
    peer, hooks, rest = world
    b = hooks.base
    hooks.answers["/voice"] = lambda f: enqueue_twiml("support", f"{b}/wait")
    hooks.answers["/wait"] = lambda f: wait_twiml("https://example.com/moh.mp3", None)
    sid = peer.incoming("+4930111")
    await wait_for(lambda: peer.member_of(sid), 5, "the caller in the queue")
    queue_sid = (await rest.queue_sids())["support"]
    path = {
        "member": f"Queues/{queue_sid}/Members/{sid}.json",
        "call": f"Calls/{sid}.json",
        "members": f"Queues/{queue_sid}/Members.json",
    }[make]
    resp = await rest.http.session.get(
        f"{peer.api_base}/2010-04-01/Accounts/{peer.account_sid}/{path}",
        headers={"Authorization": basic_auth(peer.account_sid, peer.auth_token)},
    )
    ours = await resp.json()
    assert set(ours) == set(example)
    if make == "members":
        assert set(ours["queue_members"][0]) == set(example["queue_members"][0])
    if make == "call":
        assert set(ours["subresource_uris"]) == set(example["subresource_uris"])
        assert isinstance(ours["queue_time"], str)
        assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000", ours["date_created"])
    await asyncio.sleep(0)


# ---- properties of the library-built documents ------------------------------------------------

# what a YAML routing file can name a queue: printable characters (no U+FFFE/U+FFFF), any length
_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
    min_size=1,
    max_size=100,
).filter(lambda name: name.strip() == name)
_endpoints = st.one_of(
    st.from_regex(r"client:[A-Za-z0-9_.\-]{1,40}", fullmatch=True),
    st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True),
    st.from_regex(r"sip:[a-z0-9]{1,12}@[a-z]{1,12}\.example\.com", fullmatch=True),
)


@given(queue=_names, music=st.sampled_from(["https://example.com/a.mp3", "http://x/y?a=1&b=2"]))
def test_any_queue_name_survives_enqueue_and_wait_documents(queue: str, music: str) -> None:
    root = check_twiml(enqueue_twiml(queue, "https://acd.example.com/wait?queue=" + queue))
    enqueue = root.find("Enqueue")
    assert enqueue is not None and enqueue.text == twilio_queue_name(queue)
    assert len(enqueue.text) <= 64 and (len(queue) > 64 or enqueue.text == queue)
    wait = check_twiml(wait_twiml(music, queue, again=True), wait_document=True)
    assert [v.tag for v in wait] == ["Say", "Play"] and wait[1].text == music


@given(endpoint=_endpoints, timeout=st.integers(min_value=1, max_value=600))
def test_any_endpoint_is_dialled_with_the_right_noun(endpoint: str, timeout: int) -> None:
    dial = check_twiml(
        dial_twiml(
            endpoint, timeout=timeout, action="https://a/d?offer=o1", status_callback="https://a/l"
        )
    ).find("Dial")
    assert dial is not None and dial.attrib["timeout"] == str(timeout)
    (noun,) = list(dial)
    expected = {"client": "Client", "sip": "Sip"}.get(endpoint.split(":")[0], "Number")
    assert noun.tag == expected
    assert (noun.text or "") == endpoint.removeprefix("client:")
