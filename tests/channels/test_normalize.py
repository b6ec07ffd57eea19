"""``stellwerk normalize`` through the real console script, on real samples and bad input."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from channels import registry
from channels.base import DecodeConfig
from channels.contact_event import CONTACT_EVENT_DECODER, CONTACT_EVENTS_DECODER
from router.cli import normalize as cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLES = FIXTURES / "samples"
STELLWERK = Path(sys.executable).with_name("stellwerk")
DISCOURSE_EVENT = "X-Discourse-Event: post_created"


def normalize(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(STELLWERK), "normalize", *args], input=stdin, capture_output=True, timeout=30
    )


def _ok(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    return json.loads(result.stdout)


def _bad(result: subprocess.CompletedProcess[bytes], source: str, reason: str) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 2, (result.stdout, stderr)
    assert result.stdout == b""
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"stellwerk normalize: {source}: {reason}: "), stderr
    return stderr


def test_discourse_sample_from_a_file() -> None:
    result = normalize(
        "--source",
        "discourse",
        "--header",
        DISCOURSE_EVENT,
        str(SAMPLES / "social" / "discourse-post-created.json"),
    )
    event = _ok(result)
    assert event["kind"] == "update"
    assert event["contact_id"] == "discourse:46582"
    assert event["sender"] == {"handle": "discourse:darknao", "name": "Francois Andrieu"}
    assert event["attributes"]["post_number"] == "3"
    # The output is the wire form the rest of Stellwerk reads (explain, replay).
    assert CONTACT_EVENT_DECODER.decode(result.stdout).thread_id == "46582"


@pytest.mark.parametrize("file_arg", [None, "-"])
def test_x_sample_from_stdin(file_arg: str | None) -> None:
    args = ["--source", "x"] + ([file_arg] if file_arg else [])
    event = _ok(normalize(*args, stdin=(SAMPLES / "social" / "x-v2-tweet.json").read_bytes()))
    assert event["contact_id"] == "x:1304102743196356610"
    assert event["sender"]["handle"] == "x:2244994945"
    assert event["language"] == "en"
    assert event["occurred_at"] == 1600454175.0


def test_a_batch_prints_a_list() -> None:
    result = normalize("--source", "generic", str(FIXTURES / "generic" / "chat-batch.json"))
    events = _ok(result)
    assert [e["kind"] for e in events] == ["new", "end"]
    assert len(CONTACT_EVENTS_DECODER.decode(result.stdout)) == 2


def test_an_empty_delivery_prints_an_empty_list() -> None:
    result = normalize(
        "--source", "discourse", "--header", "X-Discourse-Event: ping", stdin=b'{"ping": "OK"}'
    )
    assert _ok(result) == []


def test_region_and_max_text_options() -> None:
    payload = {"kind": "new", "channel": "phone", "id": "c1", "from": "(415) 555-2671"}
    payload["text"] = "Grüße aus München"
    result = normalize(
        "--source",
        "generic",
        "--region",
        "us",
        "--max-text",
        "5",
        stdin=json.dumps(payload).encode(),
    )
    event = _ok(result)
    assert event["sender"]["phone"] == "+14155552671"
    assert event["text"] == "Grüße"
    assert "München" not in result.stdout.decode()


def test_umlauts_are_printed_as_utf8() -> None:
    payload = {"kind": "new", "channel": "chat", "id": "c", "text": "Kündigung"}
    result = normalize("--source", "generic", stdin=json.dumps(payload).encode())
    assert "Kündigung".encode() in result.stdout


def test_signature_checked_with_secret() -> None:
    body = json.dumps({"post": {"id": 1, "topic_id": 2, "post_number": 1, "raw": "hi"}}).encode()
    signature = "sha256=" + hmac.new(b"topsecret", body, hashlib.sha256).hexdigest()
    args = ["--source", "discourse", "--header", DISCOURSE_EVENT, "--secret", "topsecret"]
    good = normalize(*args, "--header", f"X-Discourse-Event-Signature: {signature}", stdin=body)
    assert _ok(good)["contact_id"] == "discourse:2"
    bad = normalize(*args, "--header", "X-Discourse-Event-Signature: sha256=00", stdin=body)
    _bad(bad, "discourse", "bad_signature")


def test_twilio_sample_with_its_published_signature() -> None:
    params = json.loads((SAMPLES / "phone" / "twilio-voice-incoming.signature.json").read_text())
    form = SAMPLES / "phone" / "twilio-voice-incoming.form"
    base = ["--source", "twilio-voice", "--secret", params["auth_token"], "--url", params["url"]]
    good = normalize(
        *base, "--header", f"X-Twilio-Signature: {params['x_twilio_signature']}", str(form)
    )
    assert _ok(good)["source"] == "twilio-voice"
    wrong = normalize(*base, "--header", "X-Twilio-Signature: AAAA", str(form))
    _bad(wrong, "twilio-voice", "bad_signature")


@pytest.mark.parametrize(
    ("args", "stdin", "source", "reason", "detail"),
    [
        (["--source", "x"], b"not json", "x", "not_json", "malformed"),
        (["--source", "x"], b"[]", "x", "bad_shape", "object"),
        (["--source", "x"], b'{"data": [{"text": "t"}]}', "x", "missing_field", "data[0].id"),
        (["--source", "generic"], b'{"kind": "new"}', "generic", "bad_shape", "`channel`"),
        (["--source", "discourse"], b"{}", "discourse", "missing_field", "X-Discourse-Event"),
        (["--source", "telex"], b"", "telex", "unknown_source", "known: asterisk-ari"),
        (["--source", "x", "--header", "no colon"], b"{}", "x", "bad_header", "no colon"),
        (["--source", "x", "--header", ": v"], b"{}", "x", "bad_header", "Name: value"),
        (["--source", "x", "/nonexistent/p.json"], b"", "x", "unreadable", "No such file"),
        (["--source", "x", "--max-text", "0"], b"{}", "x", "bad_option", "--max-text"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], stdin: bytes, source: str, reason: str, detail: str
) -> None:
    stderr = _bad(normalize(*args, stdin=stdin), source, reason)
    assert detail in stderr


def test_a_directory_is_unreadable_not_a_traceback() -> None:
    _bad(normalize("--source", "x", str(FIXTURES)), "x", "unreadable")


def test_multiline_decoder_message_still_gives_one_line() -> None:
    # msgspec's message for a deeply wrong shape, and anything else, is flattened to one line.
    body = b'{"kind": "new", "channel": "chat", "id": "a", "text": 5}'
    stderr = _bad(normalize("--source", "generic", stdin=body), "generic", "bad_shape")
    assert "`$.text`" in stderr


def test_a_decoder_bug_is_one_line_and_exit_1_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(body: bytes, headers: object, config: DecodeConfig) -> list[object]:
        raise KeyError("oops")

    monkeypatch.setitem(registry.SOURCES, "x", broken)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--source", "x", str(SAMPLES / "social" / "x-v2-tweet.json")])
    assert cli.run(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "stellwerk normalize: x: internal_error: KeyError: 'oops'\n"
