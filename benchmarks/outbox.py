"""Outbox throughput against the real Redis: durable appends per second, and messages per
second one destination's worker confirms when the platform answers at once.

    .venv/bin/python benchmarks/outbox.py [--messages N] [--redis URL] [--json]

Appends N messages one by one (each one Lua script: status record, stream entry, contact
index), as N agents pressing "send" would; then starts the outbox and times until the last is
confirmed by a destination that answers at once (so the figure is the outbox's own cost:
the state writes before and after each attempt, acknowledgement, deletion). Everything is
under a throw-away key prefix, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

import structlog  # noqa: E402

from router.daemon.journal import connect_redis  # noqa: E402
from router.daemon.outbox import OutboundMessage, Outbox  # noqa: E402


class Instant:
    """A platform that takes every message at once."""

    def __init__(self) -> None:
        self.count = 0

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        self.count += 1
        return msg.key


async def main(messages: int, url: str) -> dict[str, float]:
    redis = connect_redis(url)
    prefix = f"stwbench:{uuid.uuid4().hex[:8]}:"
    platform = Instant()
    outbox = Outbox(redis, prefix, destinations={"chatwoot": platform})
    try:
        started = time.perf_counter()
        for n in range(messages):
            await outbox.append(
                OutboundMessage(
                    key=f"reply:chatwoot:{n % 500}:anna:{n}",
                    destination="chatwoot",
                    action="message",
                    contact_id=f"chatwoot:{n % 500}",
                    agent_id="anna",
                    body="Bitte starten Sie den Router einmal neu.",
                    params={"conversation_id": str(n % 500)},
                )
            )
        appended = time.perf_counter() - started
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(outbox.run(stop))
        while platform.count < messages or await outbox.depth("chatwoot"):
            await asyncio.sleep(0.01)
        sent = time.perf_counter() - started
        stop.set()
        await task
        return {
            "messages": messages,
            "appends_per_s": round(messages / appended),
            "sent_per_s": round(messages / sent),
        }
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # One log line per message is the daemon's business; here it would be what is measured.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = asyncio.run(main(args.messages, args.redis))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['messages']} messages: {result['appends_per_s']} appends/s, "
            f"{result['sent_per_s']} sent and confirmed/s (one destination)"
        )
