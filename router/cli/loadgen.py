"""``stellwerk loadgen``: drive a running daemon the way real systems do, and measure it.

Traffic, at ``--rate`` contacts per second for ``--duration`` seconds, mixed by ``--mix``:

- **phone** — Asterisk ARI ``StasisStart`` over MQTT (``{prefix}/in/phone/asterisk-ari``); the
  caller hangs up (``StasisEnd``) when the agent's talk time is over, or gives up after a random
  patience while still waiting (an abandon).
- **email** — RFC 5322 messages over SMTP to the daemon's listener.
- **chat** — Rocket.Chat omnichannel and WhatsApp Cloud API webhooks over HTTP, signed when the
  settings hold their secrets.
- **social** — Discourse ``post_created`` webhooks over HTTP (signed). Most community posts ask
  about a bill (straight to the community desk); the rest wait for the crowd, and some of those
  get a crowd answer (a reply by another user), which withdraws them.

Simulated agents (``--agents N``, ids from the routing file) log in over MQTT, accept each offer
after a short think time, work a random (exponential) handle time, complete (phone: the caller
hangs up), and end their wrap-up after a short after-call work time. They handle every offer they
get, also for contacts loadgen did not create (a daemon that already had work): ignored, those
would be offered and time out again and again and keep the agents from loadgen's own contacts.
Such contacts are completed by the agent (their caller is not ours to hang up), counted apart
in the report (``other_contacts``, ``other_offers``) and kept out of its figures, and the report
warns that they were there: the service the run measured was shared with them.

The report: sent, accepted at ingress, offered, ended, still waiting, lost (accepted but never
seen by the router in any event within the grace period), contacts/s, and the ingress→offer
latency (send timestamp to first offer, matched by contact id) p50/p90/p99/max.
A live progress line goes to stderr; ``--json`` prints the report as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import random
import smtplib
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import msgspec
import yaml

from router.events import EVENT_DECODER, ContactAssigned, ContactEventBase

PROG = "stellwerk loadgen"
CHANNELS = ("phone", "email", "chat", "social")
DEFAULT_MIX = "phone=50,email=20,chat=20,social=10"
ASSIGN_TIMEOUT = 30.0
ROUTED = frozenset({"contact.queued", "contact.crowd_window", "contact.rejected"})
ENDED = frozenset(
    {"contact.completed", "contact.abandoned", "contact.rejected", "contact.answered_by_crowd"}
)
HOTLINES = ("+498003322001", "+498003322002", "+498003322003", "+498003322004")
EMAIL_SUBJECTS = (
    "Frage zu meiner Rechnung",
    "DSL Störung seit gestern",
    "SIM-Karte gesperrt",
    "TV Receiver startet nicht",
    "Umzug: neuer Anschluss",
)
CHAT_TEXTS = (
    "Mein Internet ist ganz langsam, der Router blinkt rot",
    "Ich habe eine Frage zu meiner Rechnung",
    "Roaming im Urlaub funktioniert nicht",
    "Hallo, ich brauche Hilfe",
)
_decode_json = msgspec.json.Decoder().decode


class LoadgenError(Exception):
    """A problem with the options or the daemon's address; printed as one line."""


# ---- options -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``loadgen`` sub-command's options."""
    env = os.environ.get
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=env("STELLWERK_CONFIG"),
        help="the daemon's settings file (addresses, topic prefix, routing file, secrets); "
        "STELLWERK_* variables override it as for `stellwerk run`",
    )
    parser.add_argument("--mqtt-url", help="broker URL (default: from the settings)")
    parser.add_argument("--http-url", help="daemon HTTP base URL (default: http://{http.addr})")
    parser.add_argument("--smtp-addr", help="daemon SMTP host:port (default: smtp.addr)")
    parser.add_argument("--topic-prefix", help="MQTT topic prefix (default: from the settings)")
    parser.add_argument("--routing", help="routing file for the agent ids (default: settings)")
    parser.add_argument("--rate", type=float, default=5.0, help="contacts per second (5)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (60)")
    parser.add_argument(
        "--agents", type=int, default=None, help="simulated agents (default: all in the file)"
    )
    parser.add_argument(
        "--mix", default=DEFAULT_MIX, help=f"share per channel (default: {DEFAULT_MIX})"
    )
    parser.add_argument(
        "--handle-time", type=float, default=4.0, help="mean handle time in seconds (4)"
    )
    parser.add_argument(
        "--think-time", type=float, default=0.3, help="max seconds before accepting (0.3)"
    )
    parser.add_argument(
        "--after-call-work", type=float, default=1.0, help="seconds of wrap-up kept (1)"
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=120.0,
        help="mean seconds a caller waits before hanging up (120; 0: never)",
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds to wait for stragglers (10)"
    )
    parser.add_argument(
        "--credentials",
        metavar="FILE",
        default=env("STELLWERK_LOADGEN_CREDENTIALS"),
        help="credentials.yaml of `stellwerk broker-config`: connect as the identities a real "
        "site has (the asterisk-ari bridge, each agent with its own account, a read-only "
        "wallboard) instead of one account for everything",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")


@dataclass
class Target:
    """Where the daemon is and what it expects."""

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_user: str | None = None
    mqtt_password: str | None = None
    http_url: str = "http://127.0.0.1:8080"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    prefix: str = "stellwerk"
    secrets: dict[str, str] = field(default_factory=dict)
    agents: list[str] = field(default_factory=list)
    accounts: dict[str, str] = field(default_factory=dict)
    """MQTT user -> password from broker-config's credentials file; empty: one account."""


@dataclass
class Profile:
    """What traffic to make."""

    rate: float = 5.0
    duration: float = 60.0
    mix: dict[str, float] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    handle_time: float = 4.0
    think_time: float = 0.3
    after_call_work: float = 1.0
    patience: float = 120.0
    grace: float = 10.0
    seed: int | None = None
    progress: bool = True
    crowd_share: float = 0.3
    """Share of community posts that do not need personal data (they wait for the crowd)."""
    crowd_answer_share: float = 0.5
    """Share of those that the crowd answers (a reply from another user)."""
    drained: Callable[[], Awaitable[bool]] | None = None
    """Asks the daemon whether its backlog is empty (journal applied, ingress idle); with it,
    the run waits after the grace period until it is (at most ``drain`` s more) before it
    counts a contact nobody saw as lost rather than as not yet consumed."""
    drain: float = 60.0
    hang_up: bool = True
    """Phone calls end with StasisEnd after the talk time (else the agent completes)."""
    ready_after_wrap_up: bool = True
    """Agents end their wrap-up ("ready") after ``after_call_work`` seconds."""
    max_in_flight: int = 2000
    event_types: tuple[str, ...] | None = None
    """Event topics to follow (None: all); the benchmark follows fewer to stay light."""


def parse_mix(text: str) -> dict[str, float]:
    """``"phone=50,email=20"`` -> shares per channel that sum to 1."""
    shares: dict[str, float] = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or name not in CHANNELS:
            raise LoadgenError(f"--mix: expected channel=weight with channel in {CHANNELS}")
        try:
            shares[name] = float(value)
        except ValueError:
            raise LoadgenError(f"--mix: {value!r} is not a number") from None
        if shares[name] < 0 or math.isnan(shares[name]):
            raise LoadgenError(f"--mix: {name} must be >= 0")
    total = sum(shares.values())
    if total <= 0:
        raise LoadgenError("--mix: the weights must add up to more than 0")
    return {name: weight / total for name, weight in shares.items() if weight > 0}


def agent_ids(routing: Path) -> list[str]:
    """The agent ids of a routing file, in file order (the daemon validates the rest)."""
    try:
        data = yaml.safe_load(routing.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise LoadgenError(f"cannot read routing file {routing}: {exc}") from None
    agents = data.get("agents") if isinstance(data, dict) else None
    ids = [a["id"] for a in agents or () if isinstance(a, dict) and isinstance(a.get("id"), str)]
    if not ids:
        raise LoadgenError(f"{routing} declares no agents to simulate")
    return ids


def target_from_args(args: argparse.Namespace) -> Target:
    """The daemon's addresses from its settings (file + env), overridden by the options."""
    from router.daemon.config import SettingsError, load_settings, parse_addr

    config = args.config
    if config is None and Path("config/stellwerk.yaml").exists():
        config = "config/stellwerk.yaml"
    try:
        settings = load_settings(config).settings
    except SettingsError as exc:
        raise LoadgenError(str(exc).replace("\n", "; ")) from None
    mqtt_url = args.mqtt_url or settings.mqtt.url
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(mqtt_url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise LoadgenError(f"--mqtt-url: {mqtt_url!r} is not mqtt://host[:port]")
    target = Target(
        mqtt_host=parts.hostname,
        mqtt_port=parts.port or 1883,
        mqtt_user=unquote(parts.username) if parts.username else settings.mqtt.username,
        mqtt_password=unquote(parts.password) if parts.password else settings.mqtt.password,
        prefix=args.topic_prefix or settings.topic_prefix,
        secrets=dict(settings.sources.secrets),
    )
    if args.http_url:
        target.http_url = args.http_url.rstrip("/")
    elif settings.http.addr:
        host, port = parse_addr(settings.http.addr)
        target.http_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    smtp = args.smtp_addr or settings.smtp.addr
    if smtp:
        try:
            target.smtp_host, target.smtp_port = parse_addr(smtp)
        except ValueError as exc:
            raise LoadgenError(f"--smtp-addr: {exc}") from None
        if target.smtp_host == "0.0.0.0":
            target.smtp_host = "127.0.0.1"
    ids = agent_ids(Path(args.routing or settings.routing))
    if args.agents is not None:
        if args.agents < 0:
            raise LoadgenError("--agents must be >= 0")
        ids = ids[: args.agents]
    target.agents = ids
    if args.credentials:
        target.accounts = mqtt_accounts(Path(args.credentials))
        missing = [a for a in ids if f"agent-{a}" not in target.accounts]
        if missing or "source-asterisk-ari" not in target.accounts:
            raise LoadgenError(
                f"{args.credentials} has no account for the asterisk-ari bridge or agents "
                f"{missing[:5]}; re-run stellwerk broker-config with this routing file"
            )
    return target


def mqtt_accounts(path: Path) -> dict[str, str]:
    """The ``mqtt`` section of a broker-config credentials file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise LoadgenError(f"cannot read credentials {path}: {exc}") from None
    accounts = data.get("mqtt") if isinstance(data, dict) else None
    if not isinstance(accounts, dict):
        raise LoadgenError(f"{path} has no mqtt section (is it broker-config's credentials.yaml?)")
    return {str(k): str(v) for k, v in accounts.items()}


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The traffic profile from the options, checked."""
    if args.rate <= 0 or args.duration <= 0:
        raise LoadgenError("--rate and --duration must be > 0")
    for name in ("handle_time", "think_time", "after_call_work", "patience", "grace"):
        if getattr(args, name) < 0:
            raise LoadgenError(f"--{name.replace('_', '-')} must be >= 0")
    return Profile(
        rate=args.rate,
        duration=args.duration,
        mix=parse_mix(args.mix),
        handle_time=args.handle_time,
        think_time=args.think_time,
        after_call_work=args.after_call_work,
        patience=args.patience,
        grace=args.grace,
        seed=args.seed,
        progress=not args.no_progress,
    )


# ---- bookkeeping ---------------------------------------------------------------------------


@dataclass
class Track:
    """One contact the load generator started."""

    channel: str
    sent_at: float
    accepted: bool = False
    seen: bool = False
    routed_at: float | None = None
    offered_at: float | None = None
    ended: str | None = None
    crowd: bool = False
    agent: str | None = None
    hangup: asyncio.TimerHandle | None = None


@dataclass
class Report:
    """The outcome of one run."""

    duration: float
    sent: int
    accepted: int
    refused: int
    offered: int
    ended: int
    still_waiting: int
    lost: int
    contacts_per_second: float
    offers_per_second: float
    """Offers over the time from the first send to the last offer (at least the duration)."""
    latency_ms: dict[str, float]
    routing_latency_ms: dict[str, float]
    by_channel: dict[str, dict[str, int]]
    ends: dict[str, int]
    refused_by: dict[str, int]
    agent_refusals: int
    agents: int
    other_contacts: int = 0
    """Contacts offered to the simulated agents that loadgen did not create."""
    other_offers: int = 0
    """Offers of those contacts (their figures are not in the ones above)."""
    unconsumed: int = 0
    """Accepted at ingress, never seen by the router, while the daemon still had a backlog
    when the drain bound ran out (``Profile.drained``): not yet consumed, not lost. Without a
    ``drained`` check every such contact counts as ``lost``."""
    drained: bool | None = None
    """Whether the daemon reported its backlog drained before the report (None: not asked)."""

    def text(self) -> str:
        """The human-readable report."""
        lat = self.latency_ms
        lines = [
            f"loadgen: {self.sent} contacts in {self.duration:.1f} s "
            f"({self.contacts_per_second:.1f}/s) with {self.agents} simulated agents",
            f"  accepted at ingress {self.accepted}, refused {self.refused}"
            + (f" {dict(self.refused_by)}" if self.refused_by else ""),
            f"  offered {self.offered} ({self.offers_per_second:.1f}/s), ended {self.ended} "
            f"{dict(self.ends)}",
            f"  still waiting {self.still_waiting} (queued or waiting for the crowd), "
            f"LOST {self.lost}",
        ]
        if self.routing_latency_ms:
            lines.append(
                "  ingress->routed latency ms (decision published): "
                + ", ".join(f"{k} {v:.1f}" for k, v in self.routing_latency_ms.items())
            )
        if lat:
            lines.append(
                "  ingress->offer latency ms (includes waiting for a free agent): "
                + ", ".join(f"{k} {v:.1f}" for k, v in lat.items())
            )
        for channel, counts in sorted(self.by_channel.items()):
            lines.append(
                f"  {channel:<7} sent {counts['sent']:>6}  offered {counts['offered']:>6}  "
                f"ended {counts['ended']:>6}  lost {counts['lost']:>4}"
            )
        if self.agent_refusals:
            lines.append(f"  agent commands refused by the daemon: {self.agent_refusals}")
        if self.other_contacts:
            lines.append(
                f"  WARNING: the agents also got {self.other_offers} offers of "
                f"{self.other_contacts} contacts loadgen did not create (the daemon already had "
                "work); they were handled, and are not in the figures above, but they took "
                "agent time from loadgen's contacts"
            )
        return "\n".join(lines)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``values`` (nearest rank), empty for no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1]}


# ---- payloads ------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def ari_event(kind: str, channel_id: str, caller: str, exten: str, ts: float) -> bytes:
    """An Asterisk ARI StasisStart/StasisEnd event as the ARI websocket sends it."""
    return json.dumps(
        {
            "type": kind,
            "application": "stellwerk",
            "timestamp": _iso(ts),
            "channel": {
                "id": channel_id,
                "name": f"PJSIP/trunk-{channel_id[-8:]}",
                "state": "Ring" if kind == "StasisStart" else "Up",
                "caller": {"name": "", "number": caller},
                "connected": {"name": "", "number": ""},
                "accountcode": "",
                "dialplan": {"context": "from-trunk", "exten": exten, "priority": 1},
                "creationtime": _iso(ts),
                "language": "de",
            },
        }
    ).encode()


def email_message(message_id: str, sender: str, subject: str, ts: float) -> bytes:
    """A plain customer email."""
    msg = EmailMessage()
    msg["From"] = f"Kunde <{sender}>"
    msg["To"] = "kundenservice@beispiel-telekom.de"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.fromtimestamp(ts, UTC))
    msg["Message-ID"] = f"<{message_id}>"
    msg.set_content(f"Guten Tag,\n\n{subject}. Bitte um Rückruf.\n\nViele Grüße\n")
    return msg.as_bytes()


def rocketchat_message(room_id: str, visitor: str, text: str, ts: float) -> bytes:
    """A Rocket.Chat omnichannel ``Message`` webhook from a visitor."""
    return json.dumps(
        {
            "_id": room_id,
            "type": "Message",
            "visitor": {"_id": f"v-{visitor}", "username": visitor, "name": "Besucher"},
            "messages": [
                {
                    "_id": f"m-{room_id}",
                    "username": visitor,
                    "msg": text,
                    "u": {"_id": f"v-{visitor}", "username": visitor},
                    "ts": _iso(ts),
                }
            ],
        }
    ).encode()


def whatsapp_message(wa_id: str, text: str, ts: float) -> bytes:
    """A WhatsApp Cloud API webhook with one text message."""
    return json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "102290129340398",
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": {
                                    "display_phone_number": "4930123456",
                                    "phone_number_id": "106540352242922",
                                },
                                "contacts": [{"wa_id": wa_id, "profile": {"name": "Kunde"}}],
                                "messages": [
                                    {
                                        "from": wa_id,
                                        "id": f"wamid.{wa_id}",
                                        "timestamp": str(int(ts)),
                                        "type": "text",
                                        "text": {"body": text},
                                    }
                                ],
                            },
                        }
                    ],
                }
            ],
        }
    ).encode()


def discourse_post(topic_id: int, post_number: int, username: str, raw: str, ts: float) -> bytes:
    """A Discourse ``post_created`` webhook body."""
    return json.dumps(
        {
            "post": {
                "id": topic_id * 100 + post_number,
                "topic_id": topic_id,
                "post_number": post_number,
                "post_type": 1,
                "username": username,
                "name": username.title(),
                "raw": raw,
                "cooked": f"<p>{raw}</p>",
                "created_at": _iso(ts),
                "category_slug": "hilfe",
                "topic_title": raw[:40],
                "topic_archetype": "regular",
            }
        }
    ).encode()


def _hmac_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_headers(source: str, body: bytes, secrets: dict[str, str]) -> dict[str, str]:
    """The headers the real platform sends with ``body``, signed where a secret is set."""
    headers = {"Content-Type": "application/json"}
    secret = secrets.get(source)
    if source == "rocketchat" and secret:
        headers["X-RocketChat-Livechat-Token"] = secret
    elif source == "whatsapp" and secret:
        headers["X-Hub-Signature-256"] = "sha256=" + _hmac_hex(secret, body)
    elif source == "discourse":
        headers["X-Discourse-Event"] = "post_created"
        headers["X-Discourse-Event-Type"] = "post"
        headers["X-Discourse-Instance"] = "https://community.beispiel-telekom.de"
        if secret:
            headers["X-Discourse-Event-Signature"] = "sha256=" + _hmac_hex(secret, body)
    return headers


# ---- the run -------------------------------------------------------------------------------


class LoadGen:
    """One load run against one daemon."""

    def __init__(self, target: Target, profile: Profile) -> None:
        self.t = target
        self.p = profile
        # Traffic (channels, callers, texts) is drawn per contact from its own generator, so
        # a seed gives the same contacts whatever order the network answers in; the agents'
        # think and handle times come from another.
        self.traffic = random.Random(profile.seed)
        self.rng = random.Random(None if profile.seed is None else profile.seed + 1)
        self.run_id = uuid.uuid4().hex[:8]
        self.tracks: dict[str, Track] = {}
        self.latencies: list[float] = []
        self.routing_latencies: list[float] = []
        self.refused: Counter[str] = Counter()
        self.ends: Counter[str] = Counter()
        self.agent_refusals = 0
        self.offered = 0
        self.ended = 0
        self.sent = 0
        self.seq = 0
        self._sending = 0
        self._assigned: dict[str, asyncio.Future[str | None]] = {}
        # Contacts offered to our agents that we did not create -> the agent holding one.
        self.others: dict[str, str | None] = {}
        self.other_offers = 0
        self._winding_down = False
        self._drained: bool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gate = asyncio.Semaphore(profile.max_in_flight)
        self._smtp_pool: asyncio.Queue[smtplib.SMTP | None] = asyncio.Queue()
        self._pub: aiomqtt.Client | None = None
        # With broker-config accounts: each agent speaks over its own connection.
        self._agent_clients: dict[str, aiomqtt.Client] = {}
        self._http: aiohttp.ClientSession | None = None
        self._started = 0.0
        self._last_offer = 0.0
        self._stop_sending = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- helpers

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _later(self, delay: float, coro_fn: Any, *args: Any) -> asyncio.TimerHandle:
        assert self._loop is not None

        def fire() -> None:
            # Scheduled before the wind-down, due after it: the wind-down has ended that work
            # itself (a late accept or "available" would bring a logged-out agent back).
            if not self._winding_down:
                self._spawn(coro_fn(*args))

        return self._loop.call_later(max(0.0, delay), fire)

    async def _publish(
        self, topic: str, payload: bytes, client: aiomqtt.Client | None = None
    ) -> bool:
        client = client or self._pub
        assert client is not None
        async with self._gate:
            try:
                await client.publish(topic, payload, qos=1)
                return True
            except aiomqtt.MqttError:
                self.refused["mqtt_error"] += 1
                return False

    async def _agent_cmd(self, agent_id: str, body: dict[str, Any]) -> None:
        await self._publish(
            f"{self.t.prefix}/agents/{agent_id}/cmd",
            json.dumps(body).encode(),
            self._agent_clients.get(agent_id),
        )

    def _mqtt_client(self, suffix: str, user: str | None = None) -> aiomqtt.Client:
        username, password = self.t.mqtt_user, self.t.mqtt_password
        if user is not None:
            username, password = user, self.t.accounts[user]
        client = aiomqtt.Client(
            self.t.mqtt_host,
            self.t.mqtt_port,
            username=username,
            password=password,
            identifier=f"stellwerk-loadgen-{self.run_id}-{suffix}",
            max_inflight_messages=self.p.max_in_flight,
            # Real telephony bridges and desktops should not wait ~40 ms for Nagle either.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            timeout=10.0,
        )
        # Many publishes in flight is the point of a load generator, not a warning sign.
        client.pending_calls_threshold = self.p.max_in_flight + 10
        return client

    # -- contacts

    def _start_contact(self) -> None:
        self.seq += 1
        n = self.seq
        plan = random.Random(self.traffic.getrandbits(64))
        r = plan.random()
        acc = 0.0
        channel = next(iter(self.p.mix))
        for name, share in self.p.mix.items():
            acc += share
            if r < acc:
                channel = name
                break
        self.sent += 1
        self._sending += 1  # until the send is answered (counted here: the task starts later)
        self._spawn(self._send_contact(channel, n, plan))

    async def _send_contact(self, channel: str, n: int, plan: random.Random) -> None:
        try:
            await self._send(channel, n, plan)
        finally:
            self._sending -= 1

    async def _send(self, channel: str, n: int, plan: random.Random) -> None:
        now = time.time()
        sent_at = time.perf_counter()
        if channel == "phone":
            channel_id = f"lg{self.run_id}.{n}"
            cid = f"asterisk-ari:{channel_id}"
            track = self.tracks[cid] = Track(channel, sent_at)
            caller = f"+49151{plan.randrange(10**7, 10**8)}"
            exten = plan.choice(HOTLINES)
            ok = await self._publish(
                f"{self.t.prefix}/in/phone/asterisk-ari",
                ari_event("StasisStart", channel_id, caller, exten, now),
            )
            track.accepted = ok
            if ok and self.p.patience > 0:
                patience = plan.expovariate(1.0 / self.p.patience)
                track.hangup = self._later(patience, self._hang_up, cid, channel_id, False)
        elif channel == "email":
            message_id = f"lg-{self.run_id}-{n}@loadgen.stellwerk.test"
            cid = f"email:{message_id}"
            track = self.tracks[cid] = Track(channel, sent_at)
            raw = email_message(
                message_id,
                f"kunde{n}@example.de",
                plan.choice(EMAIL_SUBJECTS),
                now,
            )
            track.accepted = await self._send_mail(raw)
        elif channel == "chat":
            if plan.random() < 0.5:
                room = f"lg{self.run_id}r{n}"
                cid = f"rocketchat:{room}"
                track = self.tracks[cid] = Track(channel, sent_at)
                body = rocketchat_message(room, f"gast-{n}", plan.choice(CHAT_TEXTS), now)
                track.accepted = await self._webhook("rocketchat", body)
            else:
                wa_id = f"49160{int(self.run_id, 16) % 10**6:06d}{n:07d}"
                cid = f"whatsapp:{wa_id}"
                track = self.tracks[cid] = Track(channel, sent_at)
                body = whatsapp_message(wa_id, plan.choice(CHAT_TEXTS), now)
                track.accepted = await self._webhook("whatsapp", body)
        else:
            topic_id = (int(self.run_id, 16) % 10**5) * 10**6 + n
            cid = f"discourse:{topic_id}"
            track = self.tracks[cid] = Track(channel, sent_at)
            crowd = plan.random() < self.p.crowd_share
            track.crowd = crowd
            question = (
                "Wie richte ich das WLAN am neuen Router ein?"
                if crowd
                else "Meine Rechnung ist doppelt abgebucht worden, IBAN stimmt nicht"
            )
            track.accepted = await self._discourse(topic_id, 1, f"kunde{n}", question)
            if track.accepted and crowd and plan.random() < self.p.crowd_answer_share:
                self._later(
                    plan.uniform(1.0, 5.0),
                    self._discourse,
                    topic_id,
                    2,
                    "pate_heinz",
                    "Das geht unter Heimnetz > WLAN, Schritt für Schritt hier erklärt.",
                )

    async def _hang_up(self, cid: str, channel_id: str, talked: bool) -> None:
        track = self.tracks.get(cid)
        if track is None or track.ended is not None:
            return
        if not talked and track.offered_at is not None:
            return  # the call was answered (or is being offered): the caller stays
        await self._publish(
            f"{self.t.prefix}/in/phone/asterisk-ari",
            ari_event("StasisEnd", channel_id, "", "", time.time()),
        )

    async def _send_mail(self, raw: bytes) -> bool:
        conn = await self._smtp_pool.get()
        try:
            if conn is None:
                conn = await asyncio.to_thread(
                    smtplib.SMTP, self.t.smtp_host, self.t.smtp_port, "loadgen.test", 10
                )
            for attempt in range(5):
                try:
                    await asyncio.to_thread(
                        conn.sendmail,
                        "kunde@example.de",
                        ["kundenservice@beispiel-telekom.de"],
                        raw,
                    )
                    return True
                except smtplib.SMTPResponseException as exc:
                    if exc.smtp_code // 100 == 4 and attempt < 4:
                        await asyncio.sleep(0.5 * 2**attempt)  # what an MTA does on 451
                        continue
                    self.refused[f"smtp_{exc.smtp_code}"] += 1
                    return False
            return False
        except (OSError, smtplib.SMTPException):
            self.refused["smtp_error"] += 1
            conn = None
            return False
        finally:
            self._smtp_pool.put_nowait(conn)

    async def _webhook(self, source: str, body: bytes) -> bool:
        assert self._http is not None
        headers = webhook_headers(source, body, self.t.secrets)
        url = f"{self.t.http_url}/v1/webhooks/{source}"
        for attempt in range(5):
            try:
                async with self._http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 202:
                        return True
                    if resp.status == 503 and attempt < 4:
                        await asyncio.sleep(0.5 * 2**attempt)  # a webhook sender retries
                        continue
                    self.refused[f"http_{resp.status}"] += 1
                    return False
            except (aiohttp.ClientError, TimeoutError):
                if attempt < 4:
                    await asyncio.sleep(0.5 * 2**attempt)
                    continue
                self.refused["http_error"] += 1
                return False
        return False

    async def _discourse(self, topic_id: int, number: int, user: str, raw: str) -> bool:
        return await self._webhook(
            "discourse", discourse_post(topic_id, number, user, raw, time.time())
        )

    # -- what the daemon says

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/offers"):
            try:
                body = _decode_json(payload)
            except msgspec.DecodeError:
                return
            if not isinstance(body, dict):
                return
            kind = body.get("type")
            if kind == "offer":
                self._on_offer(body)
            elif kind == "refused":
                self.agent_refusals += 1
            return
        try:
            event = EVENT_DECODER.decode(payload)
        except msgspec.DecodeError:
            return  # not an engine event (admin.refused, agent.refused)
        if not isinstance(event, ContactEventBase):
            return
        cid, kind = event.contact_id, event.type
        assigned = event.agent_id if isinstance(event, ContactAssigned) else None
        track = self.tracks.get(cid)
        if track is None:
            if cid in self.others:
                # Another's contact our agent works on: only its assignment and end matter.
                if assigned is not None:
                    self.others[cid] = assigned
                    self._resolve(cid, assigned)
                elif kind in ENDED:
                    self.others[cid] = None
                    self._resolve(cid, None)
            return
        track.seen = True
        if kind in ROUTED and track.routed_at is None:
            track.routed_at = time.perf_counter()
            self.routing_latencies.append((track.routed_at - track.sent_at) * 1000.0)
        if assigned is not None:
            track.agent = assigned
            self._resolve(cid, track.agent)
        if kind in ENDED and track.ended is None:
            self._resolve(cid, None)
            track.ended = kind
            self.ended += 1
            self.ends[kind.removeprefix("contact.")] += 1
            if track.hangup is not None:
                track.hangup.cancel()

    def _on_offer(self, body: dict[str, Any]) -> None:
        cid, agent_id, offer_id = body.get("contact_id"), body.get("agent_id"), body.get("offer_id")
        if not (isinstance(cid, str) and isinstance(agent_id, str) and isinstance(offer_id, str)):
            return
        if self._winding_down:
            return
        track = self.tracks.get(cid)
        if track is None:
            # Work the daemon had before us (or another run's leftovers): handle it like any
            # offer, so it neither expires over and over nor blocks our contacts; count it apart.
            self.others.setdefault(cid, None)
            self.other_offers += 1
            think = self.rng.uniform(0.0, self.p.think_time) if self.p.think_time else 0.0
            self._later(think, self._work, agent_id, offer_id, cid)
            return
        track.seen = True
        if track.offered_at is None:
            track.offered_at = time.perf_counter()
            self._last_offer = track.offered_at
            self.offered += 1
            self.latencies.append((track.offered_at - track.sent_at) * 1000.0)
        if agent_id not in self.t.agents:
            # Offered to an agent this run does not simulate (a person at the desk during
            # `make demo`): theirs to accept, never ours to answer for them.
            return
        think = self.rng.uniform(0.0, self.p.think_time) if self.p.think_time else 0.0
        self._later(think, self._work, agent_id, offer_id, cid)

    def _resolve(self, cid: str, agent_id: str | None) -> None:
        waiter = self._assigned.pop(cid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(agent_id)

    async def _work(self, agent_id: str, offer_id: str, cid: str) -> None:
        assert self._loop is not None
        waiter: asyncio.Future[str | None] = self._loop.create_future()
        self._assigned[cid] = waiter
        await self._agent_cmd(agent_id, {"op": "accept", "offer_id": offer_id})
        # The talk starts when the daemon confirms the assignment (MQTT orders messages per
        # topic only, so hanging up right after "accept" could overtake it).
        try:
            if await asyncio.wait_for(waiter, ASSIGN_TIMEOUT) != agent_id:
                return
        except TimeoutError:
            self._assigned.pop(cid, None)
            return  # the offer expired or was withdrawn meanwhile
        handle = self.rng.expovariate(1.0 / self.p.handle_time) if self.p.handle_time else 0.0
        if handle:
            await asyncio.sleep(handle)
        track = self.tracks.get(cid)
        if track is not None and track.channel == "phone" and self.p.hang_up:
            # The conversation is over: the caller hangs up, which completes the call.
            await self._hang_up(cid, cid.partition(":")[2], True)
        else:
            await self._agent_cmd(agent_id, {"op": "complete", "contact_id": cid})
        if not self.p.ready_after_wrap_up:
            return
        if self.p.after_call_work:
            await asyncio.sleep(self.p.after_call_work)
        # "Ready" ends the wrap-up the queue would otherwise hold.
        await self._agent_cmd(agent_id, {"op": "state", "state": "available"})

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                self._on_message(message.topic.value, bytes(payload))

    # -- progress and report

    def _outstanding(self) -> int:
        """Accepted contacts not offered or ended yet (posts waiting for the crowd aside)."""
        return sum(
            1
            for t in self.tracks.values()
            if t.accepted and t.offered_at is None and not t.ended and not (t.crowd and t.seen)
        )

    def _progress(self, final: bool = False) -> None:
        if not self.p.progress:
            return
        elapsed = time.perf_counter() - self._started
        lat = percentiles(self.latencies[-2000:])
        # A rate over the first few milliseconds says nothing (1 sent in 45 µs is 22,000/s).
        rate = f" ({self.sent / elapsed:.1f}/s)" if elapsed >= 1.0 else ""
        line = (
            f"\r[{elapsed:6.1f}s] sent {self.sent}{rate} "
            f"offered {self.offered} ended {self.ended} waiting {self._outstanding()} "
            f"refused {sum(self.refused.values())}"
        )
        if lat:
            line += f" | offer latency p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms"
        sys.stderr.write(line.ljust(110) + ("\n" if final else ""))
        sys.stderr.flush()

    def report(self) -> Report:
        """The report of the run (call after :meth:`run`)."""
        by_channel: dict[str, dict[str, int]] = {}
        still, lost, unconsumed = 0, 0, 0
        for track in self.tracks.values():
            counts = by_channel.setdefault(
                track.channel, {"sent": 0, "offered": 0, "ended": 0, "lost": 0}
            )
            counts["sent"] += 1
            counts["offered"] += track.offered_at is not None
            counts["ended"] += track.ended is not None
            if track.accepted and track.offered_at is None and track.ended is None:
                if track.seen:
                    still += 1
                elif self._drained is False:
                    unconsumed += 1
                else:
                    lost += 1
                    counts["lost"] += 1
        duration = max(self._stop_sending - self._started, 1e-9)
        return Report(
            duration=duration,
            sent=self.sent,
            accepted=sum(1 for t in self.tracks.values() if t.accepted),
            refused=sum(self.refused.values()),
            offered=self.offered,
            ended=self.ended,
            still_waiting=still,
            lost=lost,
            contacts_per_second=self.sent / duration,
            # Over the time offers actually took: a backlog keeps offering after sending stopped.
            offers_per_second=self.offered / max(duration, self._last_offer - self._started),
            latency_ms=percentiles(self.latencies),
            routing_latency_ms=percentiles(self.routing_latencies),
            by_channel=by_channel,
            ends=dict(self.ends),
            refused_by=dict(self.refused),
            agent_refusals=self.agent_refusals,
            agents=len(self.t.agents),
            other_contacts=len(self.others),
            other_offers=self.other_offers,
            unconsumed=unconsumed,
            drained=self._drained,
        )

    # -- main

    async def run(self) -> Report:
        """Log the agents in, send the traffic, wait for stragglers, log out, report."""
        self._loop = asyncio.get_running_loop()
        for _ in range(4):
            self._smtp_pool.put_nowait(None)
        timeout = aiohttp.ClientTimeout(total=30)
        accounts = self.t.accounts
        reader = next((u for u in accounts if u.startswith("reader-")), None)
        async with contextlib.AsyncExitStack() as stack:
            if accounts:
                sub = await stack.enter_async_context(self._mqtt_client("sub", reader))
                pub = await stack.enter_async_context(
                    self._mqtt_client("pub", "source-asterisk-ari")
                )
            else:
                sub = await stack.enter_async_context(self._mqtt_client("sub"))
                pub = await stack.enter_async_context(self._mqtt_client("pub"))
            http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
            self._pub, self._http = pub, http
            listeners = []
            if accounts:
                # Each agent reads its own offers over its own account, as a desktop does.
                for agent_id in self.t.agents:
                    client = await stack.enter_async_context(
                        self._mqtt_client(f"agent-{agent_id}", f"agent-{agent_id}")
                    )
                    await client.subscribe(f"{self.t.prefix}/agents/{agent_id}/offers", qos=1)
                    self._agent_clients[agent_id] = client
                    listeners.append(asyncio.create_task(self._listen(client)))
            else:
                await sub.subscribe(f"{self.t.prefix}/agents/+/offers", qos=1)
            if self.p.event_types is None:
                await sub.subscribe(f"{self.t.prefix}/events/#", qos=1)
            else:
                for kind in self.p.event_types:
                    await sub.subscribe(f"{self.t.prefix}/events/{kind}", qos=1)
            listeners.append(asyncio.create_task(self._listen(sub), name="loadgen-listen"))
            try:
                for agent_id in self.t.agents:
                    await self._agent_cmd(agent_id, {"op": "login"})
                await self._drive()
                await self._settle()
                report = self.report()
                await self._wind_down()
            finally:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                for listener in listeners:
                    listener.cancel()
                for listener in listeners:
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await listener
                await self._close_smtp()
        return report

    async def _wind_down(self) -> None:
        """End the run cleanly: callers still waiting hang up, agents finish and log out.

        Without this the daemon would keep the run's open contacts (logging out re-queues an
        agent's open work), and the next run's agents would be offered them.
        """
        self._winding_down = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        ends = []
        for cid, track in self.tracks.items():
            if not track.accepted or track.ended is not None:
                continue
            if track.hangup is not None:
                track.hangup.cancel()
            if track.channel == "phone":
                ends.append(self._hang_up(cid, cid.partition(":")[2], True))
            elif track.agent is not None:
                ends.append(self._agent_cmd(track.agent, {"op": "complete", "contact_id": cid}))
        # Others' contacts our agents still hold: complete them rather than hand them back.
        for cid, agent in self.others.items():
            if agent is not None:
                ends.append(self._agent_cmd(agent, {"op": "complete", "contact_id": cid}))
        await asyncio.gather(*ends)
        for agent_id in self.t.agents:
            await self._agent_cmd(agent_id, {"op": "logout"})

    async def _drive(self) -> None:
        self._started = time.perf_counter()
        total = math.ceil(self.p.duration * self.p.rate - 1e-9)
        end = self._started + self.p.duration
        next_progress = self._started + 1.0
        while True:
            now = time.perf_counter()
            # Contact k is due at k / rate; catch up on whatever is due (the loop ticks at 5 ms).
            due = min(total, int((now - self._started) * self.p.rate) + 1)
            while self.sent < due:
                self._start_contact()
            if now >= end or self.sent >= total:
                break
            if now >= next_progress:
                self._progress()
                next_progress = now + 1.0
            await asyncio.sleep(min(0.005, max(0.0, self._started + self.sent / self.p.rate - now)))
        self._stop_sending = max(time.perf_counter(), self._started + self.p.duration)

    async def _settle(self) -> None:
        """Wait (up to the grace period) until every contact was offered or ended."""
        deadline = time.perf_counter() + self.p.grace
        next_progress = 0.0
        while time.perf_counter() < deadline:
            if self._outstanding() == 0 and self._sending == 0:
                break
            if time.perf_counter() >= next_progress:
                self._progress()
                next_progress = time.perf_counter() + 1.0
            await asyncio.sleep(0.05)
        if self.p.drained is not None:
            # Past the grace period: let the daemon's backlog drain (bounded) before anything
            # unseen counts as lost. Drained twice in a row: nothing was in flight between.
            deadline = time.perf_counter() + self.p.drain
            quiet = 0
            while quiet < 2:
                if self._outstanding() == 0 and self._sending == 0:
                    break
                quiet = quiet + 1 if await self.p.drained() else 0
                if time.perf_counter() >= deadline:
                    break
                await asyncio.sleep(0.5)
            self._drained = quiet >= 2 or (self._outstanding() == 0 and self._sending == 0)
        self._progress(final=True)

    async def _close_smtp(self) -> None:
        while not self._smtp_pool.empty():
            conn = self._smtp_pool.get_nowait()
            if conn is not None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    await asyncio.to_thread(conn.quit)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``stellwerk loadgen``: 0 when every contact got in and none was lost."""
    try:
        target = target_from_args(args)
        profile = profile_from_args(args)
        report = asyncio.run(LoadGen(target, profile).run())
    except LoadgenError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except aiomqtt.MqttError as exc:
        print(f"{PROG}: cannot reach the MQTT broker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(report.text())
    # Success means every contact got in and none was lost on the way to the router.
    return 0 if report.lost == 0 and report.accepted == report.sent else 1
