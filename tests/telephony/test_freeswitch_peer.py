"""The ESL peer and the ESL client, against each other and against the reference captures.

The reference material (captures of real FreeSWITCH byte streams, the derived event-json frames
and the hand-assembled inbound session) is read at test time from ``../shared/reference``
beside the checkout; those tests skip with a clear message where it is absent. Nothing from it
is copied into the repository.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from channels.base import DecodeConfig
from channels.phone import decode_freeswitch
from router.daemon.telephony.esl import (
    EslAuthError,
    EslClient,
    EslConnectionLost,
    EslProtocolError,
    Frame,
    parse_plain_event,
    read_frame,
)
from tests.peers.esl import DISCONNECT_TEXT, EslPeer

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "freeswitch"
CAPTURES = ("fsock-inbound-event-plain-park-hangup.esl", "neventsocket-outbound-bridged-call.esl")


def _reference(name: str) -> bytes:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"FreeSWITCH reference material not found at {path} (../shared/reference)")
    return path.read_bytes()


def _stream(name: str) -> bytes:
    """The original bytes after the ``BEGIN CAPTURE``/``BEGIN FRAMES`` marker line."""
    data = _reference(name)
    marker = re.search(rb"# ----- BEGIN (CAPTURE|FRAMES)[^\n]*\n", data)
    assert marker, f"{name} has no BEGIN marker"
    return data[marker.end() :]


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def _frames(data: bytes) -> tuple[list[Frame], list[int]]:
    """Every frame of a byte stream; where a frame is corrupt, note it and resynchronise at the
    next ``Content-Length`` line (as a client must after reconnecting)."""
    frames: list[Frame] = []
    corrupt: list[int] = []
    rest = data
    while rest.strip():
        reader = _reader(rest)
        try:
            while True:
                frames.append(await read_frame(reader))
        except EslConnectionLost:
            break
        except EslProtocolError:
            corrupt.append(len(frames))
            consumed = len(rest) - len(reader._buffer)  # type: ignore[attr-defined]
            nxt = rest.find(b"\nContent-Length:", consumed)
            assert nxt > 0
            rest = rest[nxt + 1 :]
    return frames, corrupt


async def _captured_events() -> dict[str, list[dict[str, str]]]:
    events: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for name in CAPTURES:
        frames, _ = await _frames(_stream(f"captures/{name}"))
        for frame in frames:
            if frame.content_type == "text/event-plain":
                event = parse_plain_event(frame.body)
                events[event["Event-Name"]].append(event)
    return events


# ---------------------------------------------------------------- the client's framing


async def test_client_framing_reads_the_real_capture_and_rejects_its_corrupt_frame() -> None:
    frames, corrupt = await _frames(_stream(f"captures/{CAPTURES[0]}"))
    # 45 frames were recorded; one has the header line 'uuid_transfer Content-Length: 720'.
    assert len(corrupt) == 1
    assert len(frames) == 44
    assert all(f.content_type == "text/event-plain" for f in frames)
    for frame in frames:
        assert len(frame.body) == int(frame.headers["Content-Length"])
    names = [parse_plain_event(f.body)["Event-Name"] for f in frames]
    assert "CHANNEL_PARK" in names and names[-1] == "CHANNEL_STATE"


async def test_client_framing_reads_replies_and_both_disconnect_notices() -> None:
    frames, corrupt = await _frames(_stream(f"captures/{CAPTURES[1]}"))
    assert corrupt == []
    kinds = collections.Counter(f.content_type for f in frames)
    assert kinds["api/response"] == 2 and kinds["text/disconnect-notice"] == 2
    notices = [f for f in frames if f.content_type == "text/disconnect-notice"]
    assert notices[0].headers["Content-Disposition"] == "linger" and notices[0].body == b""
    assert notices[1].body == DISCONNECT_TEXT  # the peer says goodbye in the same 67 bytes


async def test_derived_json_frames_decode_to_calls() -> None:
    frames, corrupt = await _frames(_stream("examples/event-json-frames.derived.esl"))
    assert corrupt == [] and len(frames) == 4
    config = DecodeConfig()
    for frame in frames:
        assert frame.content_type == "text/event-json"
        event = json.loads(frame.body)
        # Every value a string, except array headers, which become arrays of strings.
        for value in event.values():
            assert isinstance(value, str) or all(isinstance(v, str) for v in value)
        decoded = decode_freeswitch(frame.body, {}, config)
        if event["Event-Name"] == "CHANNEL_BRIDGE":
            assert decoded == []  # nothing for the router in a bridge
            continue
        assert [d.external_id for d in decoded] == [event["Unique-ID"]]


# ---------------------------------------------------------------- the peer against the captures


@pytest.fixture
async def peer() -> AsyncIterator[EslPeer]:
    server = EslPeer(password="s3cret")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _client(peer: EslPeer, *events: str) -> EslClient:
    client = await EslClient.connect("127.0.0.1", peer.port, "s3cret")
    if events:
        await client.subscribe(events)
    return client


async def _collect(client: EslClient, into: list[dict[str, Any]]) -> None:
    async for event in client.events():
        into.append(event)


async def test_peer_events_carry_the_captured_headers(peer: EslPeer) -> None:
    captured = await _captured_events()
    client = await _client(peer, "ALL")
    seen: list[dict[str, Any]] = []
    pump = asyncio.create_task(_collect(client, seen))
    peer.register("user/1001@default")
    caller = peer.place_call("+4930555010", variables={"stellwerk": "true"})
    job = await client.bgapi("originate {origination_uuid=leg-1}user/1001@default &park()")
    await peer.wait_for(lambda: peer.ringing())
    peer.pick_up("leg-1")
    assert await asyncio.wait_for(job, 5) == "+OK leg-1\n"
    assert await client.api(f"uuid_bridge {caller} leg-1") == "+OK leg-1\n"
    peer.hang_up(caller)
    await peer.wait_for(lambda: any(e["Event-Name"] == "CHANNEL_HANGUP_COMPLETE" for e in seen))
    await client.close()
    pump.cancel()

    by_name: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for event in seen:
        assert all(isinstance(v, str) for v in event.values()), event["Event-Name"]
        by_name[event["Event-Name"]].append(event)
    for name in (
        "CHANNEL_CREATE",
        "CHANNEL_PARK",
        "CHANNEL_ANSWER",
        "CHANNEL_BRIDGE",
        "CHANNEL_UNBRIDGE",
        "CHANNEL_HANGUP",
        "CHANNEL_HANGUP_COMPLETE",
    ):
        real = captured[name]
        assert real, f"{name} is in the captures"
        # The headers every real instance has (channel variables depend on the SIP profile).
        common = set.intersection(*(set(e) for e in real))
        wanted = {k for k in common if not k.startswith("variable_")}
        assert by_name[name], f"the peer emitted no {name}"
        for event in by_name[name]:
            missing = wanted - set(event)
            assert not missing, f"{name} lacks {sorted(missing)}"
    bridge = by_name["CHANNEL_BRIDGE"][0]
    assert (bridge["Unique-ID"], bridge["Other-Leg-Unique-ID"]) == (caller, "leg-1")
    [job_event] = by_name["BACKGROUND_JOB"]
    assert job_event["_body"] == "+OK leg-1\n"
    assert job_event["Content-Length"] == str(len("+OK leg-1\n"))


async def test_peer_plain_and_json_events_say_the_same(peer: EslPeer) -> None:
    plain = await EslClient.connect("127.0.0.1", peer.port, "s3cret")
    await plain.subscribe(["CHANNEL_PARK"], fmt="plain")
    js = await _client(peer, "CHANNEL_PARK")
    uid = peer.place_call("+4930555011", name="Anna Example & Co", variables={"stellwerk": "1"})
    a = await anext(aiter(plain.events()))
    b = await anext(aiter(js.events()))
    assert a == b and a["Unique-ID"] == uid and a["Caller-Caller-ID-Name"] == "Anna Example & Co"
    await plain.close()
    await js.close()


# ---------------------------------------------------------------- the wire protocol


async def _raw(peer: EslPeer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    greeting = await read_frame(reader)
    assert greeting.content_type == "auth/request" and greeting.body == b""
    return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, text: str) -> None:
    writer.write(text.encode())
    await writer.drain()


async def test_nothing_is_answered_before_auth(peer: EslPeer) -> None:
    reader, writer = await _raw(peer)
    await _send(writer, "api status\n\nevent json ALL\n\nauth s3cret\n\n")
    reply = await read_frame(reader)  # the first answer is to auth: the rest were ignored
    assert reply.headers["Reply-Text"] == "+OK accepted"
    assert peer.commands == []
    await _close(writer)


async def test_wrong_password_is_refused_and_disconnected(peer: EslPeer) -> None:
    reader, writer = await _raw(peer)
    await _send(writer, "auth ClueCon\n\n")
    reply = await read_frame(reader)
    assert reply.headers == {"Content-Type": "command/reply", "Reply-Text": "-ERR invalid"}
    notice = await read_frame(reader)
    assert notice.content_type == "text/disconnect-notice" and notice.body == DISCONNECT_TEXT
    assert await reader.read() == b""
    await _close(writer)
    with pytest.raises(EslAuthError):
        await EslClient.connect("127.0.0.1", peer.port, "wrong")


async def test_errors_as_freeswitch_words_them(peer: EslPeer) -> None:
    client = await _client(peer)
    reply = await client.command("sendmsgx foo")
    assert reply.headers["Reply-Text"] == "-ERR command not found"
    assert await client.api("no_such_api x") == "-ERR no_such_api Command not found!\n"
    assert await client.api("uuid_kill 00000000-dead") == "-ERR No such channel!\n"
    assert await client.api("uuid_bridge a b") == "-ERR Invalid uuid\n"
    assert await client.api("uuid_broadcast a local_stream://moh aleg") == "-ERR invalid uuid\n"
    assert (await client.api("uuid_kill")).startswith("-USAGE: ")
    reply = await client.command("event json")
    assert reply.headers["Reply-Text"] == "-ERR no keywords supplied"
    assert await client.api("show channels as json") == '{"row_count": 0}\n'
    await client.close()


async def test_bgapi_originate_reports_each_outcome(peer: EslPeer) -> None:
    client = await _client(peer, "BACKGROUND_JOB", "CHANNEL_HANGUP_COMPLETE")
    peer.register("user/1002@default", "busy")
    peer.register("user/1003@default")
    peer.register("user/1004@default", "reject")
    busy = await client.bgapi("originate user/1002@default &park()")
    assert await asyncio.wait_for(busy, 5) == "-ERR USER_BUSY\n"
    absent = await client.bgapi("originate user/1999@default &park()")
    assert await asyncio.wait_for(absent, 5) == "-ERR USER_NOT_REGISTERED\n"
    rejected = await client.bgapi("originate user/1004@default &park()")
    assert await asyncio.wait_for(rejected, 5) == "-ERR CALL_REJECTED\n"
    unanswered = await client.bgapi(
        "originate {origination_uuid=leg-2,originate_timeout=1}user/1003@default &park()"
    )
    assert [c.uuid for c in peer.ringing()] == ["leg-2"]
    assert await asyncio.wait_for(unanswered, 5) == "-ERR NO_ANSWER\n"
    assert peer.channels["leg-2"].hangup_cause == "NO_ANSWER"
    cancelled = await client.bgapi("originate {origination_uuid=leg-3}user/1003@default &park()")
    assert await client.api("uuid_kill leg-3 ORIGINATOR_CANCEL") == "+OK\n"
    assert await asyncio.wait_for(cancelled, 5) == "-ERR ORIGINATOR_CANCEL\n"
    await client.close()


async def test_api_originate_holds_the_socket_until_the_phone_answers(peer: EslPeer) -> None:
    peer.register("user/1005@default")
    reader, writer = await _raw(peer)
    await _send(writer, "auth s3cret\n\nevent json CHANNEL_CREATE\n\n")
    await read_frame(reader)
    await read_frame(reader)
    await _send(writer, "api originate {origination_uuid=leg-4}user/1005@default &park()\n\n")
    await peer.wait_for(lambda: peer.ringing())
    with pytest.raises(TimeoutError):  # CHANNEL_CREATE happened, but the socket is held
        await asyncio.wait_for(read_frame(reader), 0.3)
    peer.pick_up("leg-4")
    first = await read_frame(reader)
    assert first.content_type == "api/response" and first.body == b"+OK leg-4\n"
    event = await read_frame(reader)
    assert json.loads(event.body)["Event-Name"] == "CHANNEL_CREATE"
    await _close(writer)


async def test_hold_bridge_and_channels_list(peer: EslPeer) -> None:
    client = await _client(peer, "BACKGROUND_JOB")
    peer.register("user/1006@default", "answer")
    caller = peer.place_call("+4930555012", variables={"stellwerk": "true"})
    assert await client.api(f"uuid_broadcast {caller} local_stream://moh aleg") == (
        "+OK Message sent\n"
    )
    assert peer.channels[caller].playing == ["local_stream://moh"]
    listing = json.loads(await client.api("show channels as json"))
    assert listing["row_count"] == 1
    assert listing["rows"][0]["uuid"] == caller
    assert listing["rows"][0]["application"] == "park"
    dump = json.loads(await client.api(f"uuid_dump {caller} json"))
    assert dump["variable_stellwerk"] == "true" and dump["Event-Name"] == "CHANNEL_DATA"
    job = await client.bgapi("originate {origination_uuid=leg-5}user/1006@default &park()")
    assert await asyncio.wait_for(job, 5) == "+OK leg-5\n"
    assert await client.api(f"uuid_bridge {caller} leg-5") == "+OK leg-5\n"
    assert peer.channels[caller].playing == [] and peer.channels[caller].other == "leg-5"
    # The agent hangs up: the caller is left parked (the adapter must hang up the survivor).
    peer.hang_up("leg-5")
    assert peer.channels[caller].alive and peer.channels[caller].other is None
    assert await client.api(f"uuid_kill {caller}") == "+OK\n"
    assert peer.alive() == []
    await client.close()


async def test_exit_and_severed_connections(peer: EslPeer) -> None:
    client = await _client(peer, "ALL")
    pending = asyncio.create_task(client.api("status"))
    await pending
    await client.close()
    assert client.closed
    client = await _client(peer, "ALL")
    events = aiter(client.events())
    sever = asyncio.create_task(peer.sever(0.5))
    with pytest.raises(EslConnectionLost):
        await asyncio.wait_for(anext(events), 5)
    with pytest.raises(EslConnectionLost):
        await client.api("status")
    with pytest.raises(EslConnectionLost):
        await EslClient.connect("127.0.0.1", peer.port, "s3cret", timeout=0.2)
    await sever
    again = await _client(peer)
    assert (await again.api("status")).startswith("UP ")
    await again.close()


async def test_peer_answers_the_example_session_as_written(peer: EslPeer) -> None:
    """The hand-assembled inbound session's reply texts, sent through the peer."""
    text = _reference("examples/inbound-session.example.md").decode()
    session = text.split("```text", 1)[1].split("```", 1)[0]
    expected = re.findall(r"Reply-Text: ([^⏎]+)⏎", session)
    peer.register("user/1001")
    reader, writer = await _raw(peer)
    caller = peer.place_call()
    script = [
        "auth s3cret",
        "event json CHANNEL_PARK CHANNEL_ANSWER CHANNEL_BRIDGE CHANNEL_HANGUP_COMPLETE "
        "BACKGROUND_JOB",
        "bgapi originate {origination_uuid=leg-6}user/1001 &park()\nJob-UUID: job-6",
        "exit",
    ]
    got: list[str] = []
    for line in script:
        await _send(writer, line + "\n\n")
        while True:
            frame = await read_frame(reader)
            if frame.content_type == "command/reply":
                got.append(frame.headers["Reply-Text"])
                break
    assert got == [t.replace("<J>", "job-6") for t in expected]
    assert caller in peer.channels
    await _close(writer)
