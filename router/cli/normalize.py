"""``stellwerk normalize``: one native payload in, its ContactEvent(s) out as JSON.

Reads FILE (or standard input when FILE is absent or ``-``), decodes it with the decoder of
``--source`` and prints the result with the field names of ``channels.contact_event.ContactEvent``:
one JSON object for one event, a JSON list when the delivery holds several, ``[]`` when it
holds none (a valid delivery such as a receipt or an ignored event type). Exit 0 on success.
Bad input exits 2 with one line ``stellwerk normalize: <source>: <reason>: <detail>``
on standard error.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from channels.base import DecodeConfig, Rejected
from channels.contact_event import SOURCES, ContactEvent

PROG = "stellwerk normalize"
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

_ENCODER = msgspec.json.Encoder()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``normalize`` options on its sub-parser."""
    parser.add_argument(
        "--source",
        required=True,
        metavar="SOURCE",
        help="the payload's source: " + ", ".join(SOURCES),
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a transport header, e.g. 'X-Discourse-Event: post_created' (repeatable)",
    )
    parser.add_argument(
        "--secret", help="the source's signing secret; when given, the signature is checked"
    )
    parser.add_argument("--url", help="the public URL the sender signed (Twilio)")
    parser.add_argument(
        "--region", default="DE", help="region for national phone numbers (default: DE)"
    )
    parser.add_argument(
        "--max-text",
        type=int,
        default=DecodeConfig().max_text,
        metavar="N",
        help="cut text to N characters (default: %(default)s)",
    )
    parser.add_argument("file", nargs="?", default="-", metavar="FILE", help="payload (default: -)")


class _BadInput(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _parse_headers(raw: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in raw:
        name, colon, value = item.partition(":")
        name = name.strip()
        if not colon or not name or any(c.isspace() for c in name):
            raise _BadInput("bad_header", f"expected 'Name: value', got {item!r}")
        # Transports hand decoders lower-cased header names (channels.base).
        headers[name.lower()] = value.strip()
    return headers


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise _BadInput("unreadable", f"{path}: {exc.strerror or exc}") from None


def _render(events: list[ContactEvent]) -> bytes:
    value: ContactEvent | list[ContactEvent] = events[0] if len(events) == 1 else events
    return msgspec.json.format(_ENCODER.encode(value), indent=2)


def run(args: argparse.Namespace) -> int:
    """Decode the payload and print it; exit 0, or 2 with one line on stderr for bad input."""
    source: str = args.source
    try:
        if args.max_text < 1:
            raise _BadInput("bad_option", f"--max-text must be at least 1, got {args.max_text}")
        headers = _parse_headers(args.header)
        config = DecodeConfig(
            default_region=args.region.upper(),
            max_text=args.max_text,
            secrets={source: args.secret} if args.secret is not None else {},
            public_urls={source: args.url} if args.url is not None else {},
        )
        # Imported here so that a broken decoder module is reported, not raised.
        from channels.registry import decoder_for

        # Looked up before reading, so a mistyped source does not wait for standard input.
        decoder = decoder_for(source)
        events = decoder(_read(args.file), headers, config)
    except Rejected as exc:
        return _fail(source, exc.reason, exc.detail, EXIT_BAD_INPUT)
    except _BadInput as exc:
        return _fail(source, exc.reason, exc.detail, EXIT_BAD_INPUT)
    except Exception as exc:  # a decoder bug must still not show a traceback
        return _fail(source, "internal_error", f"{type(exc).__name__}: {exc}", EXIT_INTERNAL)
    out = sys.stdout.buffer
    out.write(_render(events) + b"\n")
    out.flush()
    return 0


def _fail(source: str, reason: str, detail: str, code: int) -> int:
    line = f"{PROG}: {source}: {reason}: {detail}" if detail else f"{PROG}: {source}: {reason}"
    # One line, whatever the detail held (msgspec and e-mail errors can span lines).
    print(" ".join(line.split()), file=sys.stderr)
    return code
