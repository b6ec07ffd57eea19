"""Properties of the ESL client's framing and its bounded event queue."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from router.daemon.telephony.esl import EslClient, Frame, parse_plain_event, read_frame
from tests.peers.esl import EslPeer, _event_frame

_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True)
_values = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=40
).map(str.strip)


@st.composite
def frames(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    headers = draw(st.dictionaries(_names, _values.filter(bool), max_size=5))
    headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
    headers["Content-Type"] = draw(st.sampled_from(["command/reply", "api/response", "x/y"]))
    body = draw(st.binary(max_size=200))
    return headers, body


def _wire(headers: dict[str, str], body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in headers.items())
    if body:
        head += f"Content-Length: {len(body)}\n"
    return head.encode() + b"\n" + body


@settings(max_examples=30, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=6), st.integers(1, 50))
def test_frames_survive_any_split_of_the_stream(
    items: list[tuple[dict[str, str], bytes]], chunk: int
) -> None:
    stream = b"".join(_wire(h, b) for h, b in items)

    async def read_all() -> list[Frame]:
        reader = asyncio.StreamReader()
        for i in range(0, len(stream), chunk):  # the bytes arrive in arbitrary pieces
            reader.feed_data(stream[i : i + chunk])
        reader.feed_eof()
        return [await read_frame(reader) for _ in items]

    got = asyncio.run(read_all())
    for (headers, body), frame in zip(items, got, strict=True):
        assert frame.body == body
        for name, value in headers.items():
            assert frame.headers[name] == value


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(_names, _values, min_size=1, max_size=8), st.none() | st.text(max_size=50))
def test_plain_and_json_events_carry_the_same_headers(
    headers: dict[str, str], body: str | None
) -> None:
    headers = {"Event-Name": "CUSTOM", **headers}
    headers.pop("Content-Length", None)
    headers.pop("_body", None)
    plain = _event_frame(headers, body, "plain")
    as_json = _event_frame(headers, body, "json")
    plain_body = plain.split(b"\n\n", 1)[1]
    json_body = json.loads(as_json.split(b"\n\n", 1)[1])
    assert parse_plain_event(plain_body) == json_body


async def test_a_consumer_that_falls_behind_gets_the_connection_closed() -> None:
    peer = EslPeer(password="pw")
    await peer.start()
    try:
        client = await EslClient.connect("127.0.0.1", peer.port, "pw", max_events=4)
        await client.subscribe(["ALL"])
        for i in range(3):  # three events each: more than the queue holds
            peer.place_call(f"+49305550{i:02d}")
        await peer.wait_for(lambda: client.closed, 5, "the client to give up")
        received = []
        try:
            async for event in client.events():
                received.append(event)
        except Exception as exc:
            assert "fell behind" in str(exc)
        assert len(received) <= 4
        await client.close()
    finally:
        await peer.stop()
