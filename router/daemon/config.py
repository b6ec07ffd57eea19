"""The daemon's settings (``config/stellwerk.yaml``): schema, loading, env overrides.

Every setting can be overridden by an environment variable named after its path in the file:
``mqtt.url`` -> ``STELLWERK_MQTT_URL``, ``topic_prefix`` -> ``STELLWERK_TOPIC_PREFIX``,
``log.format`` -> ``STELLWERK_LOG_FORMAT``. Map-valued settings take JSON
(``STELLWERK_SOURCES_SECRETS='{"twilio-voice": "..."}'``) and a source's secret also has its own
variable (``STELLWERK_SECRET_TWILIO_VOICE``), so secrets never need to be in the file.

Errors are located: ``stellwerk.yaml:12:3: mqtt.url: ...`` for the file and
``STELLWERK_MQTT_URL: ...`` for the environment. Relative paths in the file (the routing file)
are relative to the file's directory; relative paths from the environment to the working
directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import limits
import msgspec
import yaml

from channels.base import DecodeConfig
from channels.contact_event import SOURCES

ENV_PREFIX = "STELLWERK_"
SECRET_ENV_PREFIX = "STELLWERK_SECRET_"


class SettingsError(Exception):
    """The settings are invalid; ``problems`` holds one located message per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:8080"`` for IPv6) -> ``(host, port)``; ValueError if not."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{addr!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _check_listen_addr(addr: str) -> None:
    """A listener's ``addr``: ``""`` (off) or host:port; else a ValueError naming the field."""
    if addr:
        try:
            parse_addr(addr)
        except ValueError as exc:
            raise ValueError(f"addr: {exc}") from None


class MqttSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The MQTT broker connection.

    ``ingress`` says who consumes the ingress and agent-command topics:

    - ``leader`` (default): only the daemon holding the ingest lease (an ``ingest`` node, or
      an ``all`` node, which takes it only while it holds the routing lease), under the
      installation's ``client_id`` (default
      ``stellwerk-router-{topic_prefix}``; agents' commands on a second session,
      ``{client_id}-agents``). The broker keeps those persistent sessions (and every message not
      yet acknowledged) while nobody is connected, and a standby that takes the lease resumes
      them, so nothing waits for a dead daemon. The subscriptions are plain ones, which the
      broker restores after its own restart.
    - ``shared``: every daemon consumes through the shared subscription ``$share/{share_group}``
      with a persistent session of its own (``client_id`` unique per daemon, default
      ``stellwerk-{topic_prefix}-{hostname}``). More ingest capacity, but brokers such as
      Mosquitto keep handing a dead member's share of the messages to its offline session,
      where they wait until a daemon with that ``client_id`` connects again.

    TLS: ``mqtts://`` (port 8883 by default) verifies the broker against ``tls_ca`` (a PEM CA
    bundle; the system's CAs when unset); ``tls_cert`` and ``tls_key`` add a client certificate.

    ``protocol`` is MQTT ``5`` (default) or ``311`` (3.1.1). ``session_expiry`` (seconds, MQTT 5)
    is how long the broker keeps the ingress session, and the messages queued in it, while no
    daemon is connected. ``max_inflight`` bounds unacknowledged messages in each direction.
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ingress: Literal["leader", "shared"] = "leader"
    client_id: str | None = None
    share_group: str = "stellwerk"
    protocol: Literal[5, 311] = 5
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 30
    max_inflight: int = 1000
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: tls_cert and tls_key (the client certificate) go together")
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
            raise ValueError(f"url: {self.url!r} is not mqtt://host[:port] or mqtts://host[:port]")
        if parts.port is None and ":" in parts.netloc.rpartition("@")[2].strip("[]"):
            raise ValueError(f"url: {self.url!r} has a bad port")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.share_group):
            raise ValueError(f"share_group: {self.share_group!r} may hold only A-Z a-z 0-9 _ . -")
        if self.keepalive < 1 or self.max_inflight < 1 or self.session_expiry < 1:
            raise ValueError("keepalive, max_inflight and session_expiry must be at least 1")

    @property
    def host(self) -> str:
        """The broker's host name."""
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        """The broker's port (1883, or 8883 for mqtts, unless the URL says otherwise)."""
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        """Whether the URL asks for TLS (``mqtts://``)."""
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password): the explicit settings win over those in the URL."""
        parts = urlsplit(self.url)
        user = self.username or (unquote(parts.username) if parts.username else None)
        password = self.password or (unquote(parts.password) if parts.password else None)
        return user, password

    def identifier(self, topic_prefix: str = "stellwerk") -> str:
        """The ingress session's MQTT client id (stable across restarts).

        The default names the topic prefix, so two installations on one broker (say the demo
        and a test daemon) never take each other's session over.
        """
        if self.client_id:
            return self.client_id
        scope = re.sub(r"[^A-Za-z0-9_.-]+", "-", topic_prefix).strip("-")
        if self.ingress == "leader":
            return f"stellwerk-router-{scope}"
        return f"stellwerk-{scope}-{socket.gethostname()}"


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Redis server holding the journal, the dead letters, snapshots and the lease."""

    url: str = "redis://127.0.0.1:6379/0"

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"url: {self.url!r} is not redis://, rediss:// or unix://")


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HTTP server (webhooks, metrics, health, admin API). ``addr: ""`` turns it off.

    ``tls_cert`` and ``tls_key`` (PEM files, both or neither) serve HTTPS instead of HTTP.
    ``rate_limit`` is the per-client (remote address) limit on webhooks and the ``/v1`` API, in
    the notation of the ``limits`` library (``"200/second"``, ``"100/second; 3000/minute"``);
    ``""`` turns it off. Beyond it a client gets 429 with ``Retry-After``. Behind a reverse proxy
    every request has the proxy's address: limit there instead.
    """

    addr: str = "127.0.0.1:8080"
    tls_cert: str | None = None
    tls_key: str | None = None
    rate_limit: str = "200/second"

    def __post_init__(self) -> None:
        _check_listen_addr(self.addr)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: tls_cert and tls_key go together")
        if self.rate_limit:
            try:
                limits.parse_many(self.rate_limit)
            except ValueError:
                raise ValueError(
                    f"rate_limit: {self.rate_limit!r} is not like '200/second' or "
                    "'100/second; 3000/minute'"
                ) from None


class SmtpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The inbound SMTP listener. ``addr: ""`` turns it off."""

    addr: str = "127.0.0.1:2525"
    max_message_size: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_listen_addr(self.addr)


class LogSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Logging: ``json`` lines for production, ``console`` for a terminal."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class SourceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the channel decoders need: signing secrets, public URLs, phone region, text bound.

    A webhook (``POST /v1/webhooks/{source}``) must be signed: with the platform's own scheme
    where it has one and ``secrets`` holds its secret, else with ``X-Stellwerk-Signature:
    sha256=<HMAC-SHA256 of the body with the source's secret>``. A source without a secret is
    refused (401) unless it is listed in ``unsigned`` (logged as a warning at start).
    ``max_body`` bounds a webhook body per source in bytes (``max_body_default`` for the rest;
    413 beyond it).
    """

    default_region: str = "DE"
    max_text: int = 4000
    secrets: dict[str, str] = msgspec.field(default_factory=dict)
    public_urls: dict[str, str] = msgspec.field(default_factory=dict)
    unsigned: tuple[str, ...] = ()
    max_body: dict[str, int] = msgspec.field(default_factory=dict)
    max_body_default: int = 1024 * 1024

    def __post_init__(self) -> None:
        unknown = sorted(set(self.unsigned) - set(SOURCES))
        if unknown:
            raise ValueError(f"unsigned: unknown source(s) {unknown}; known: {list(SOURCES)}")
        both = sorted(set(self.unsigned) & set(self.secrets))
        if both:
            raise ValueError(f"unsigned: {both} also have a secret; a source is one or the other")
        if self.max_body_default < 1 or any(v < 1 for v in self.max_body.values()):
            raise ValueError("max_body: limits are at least 1 byte")

    def body_limit(self, source: str) -> int:
        """The largest webhook body ``source`` may send, in bytes."""
        return self.max_body.get(source, self.max_body_default)


Role = Literal["admin", "supervisor", "agent"]
"""An HTTP principal's role (see ``router.daemon.auth``)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


class TokenSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One HTTP bearer token, stored as the SHA-256 of the token (lower-case hex), never in clear.

    ``name`` is who it belongs to, for the audit log (``ops-script``, ``agent:a01``, ``wall-1``);
    ``agent_id`` is required for role ``agent`` (the one agent it may act as and read) and
    refused for the others.
    """

    name: str
    role: Role
    sha256: str
    agent_id: str | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name: must not be empty")
        if not _HEX64.fullmatch(self.sha256):
            raise ValueError("sha256: must be the 64 lower-case hex digits of the token's SHA-256")
        if self.role == "agent" and not self.agent_id:
            raise ValueError("agent_id: a token of role agent needs the agent it speaks for")
        if self.role != "agent" and self.agent_id is not None:
            raise ValueError("agent_id: only tokens of role agent name an agent")


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """HTTP authentication: bearer tokens with roles (docs/security.md).

    ``tokens`` lists tokens inline (hashes only); ``tokens_file`` names a YAML file with the same
    list under ``tokens:`` (what ``stellwerk broker-config`` writes), relative to the settings
    file; it is re-read when it changes, so a rotated token takes effect without a restart.
    ``metrics``: ``open`` (default) serves ``/metrics`` to anyone, ``supervisor`` wants a
    supervisor (or admin) token.
    """

    tokens: tuple[TokenSettings, ...] = ()
    tokens_file: str | None = None
    metrics: Literal["open", "supervisor"] = "open"


class DeskSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The agent desktop (``/desk``) and the wallboard (``/wall``), docs/desk.md.

    Transcripts (every message of a contact, kept at the edge, not in the engine): at most
    ``transcript_messages`` per contact, each text cut at ``transcript_chars``; kept
    ``transcript_ttl`` seconds after the contact finished (``open_ttl`` at most while open).
    Stuck work: an agent holding a contact longer than ``stuck_factor`` times its queue's usual
    handle time today (``default_handle_seconds`` until ``min_samples`` contacts of the queue
    were completed today), and at least ``stuck_min_seconds``, is flagged on the wallboard and
    in ``stellwerk_contacts_stuck``.
    """

    transcript_messages: int = 200
    transcript_chars: int = 20_000
    transcript_ttl: float = 86_400.0
    open_ttl: float = 30 * 86_400.0
    stuck_factor: float = 3.0
    stuck_min_seconds: float = 600.0
    default_handle_seconds: float = 300.0
    min_samples: int = 5

    def __post_init__(self) -> None:
        if self.transcript_messages < 1 or self.transcript_chars < 100:
            raise ValueError("transcript_messages must be >= 1 and transcript_chars >= 100")
        if self.stuck_factor <= 0 or self.stuck_min_seconds < 0 or self.default_handle_seconds <= 0:
            raise ValueError("stuck_factor and default_handle_seconds must be positive")
        if self.transcript_ttl <= 0 or self.open_ttl <= 0 or self.min_samples < 1:
            raise ValueError("transcript_ttl, open_ttl and min_samples must be positive")


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The routing loop: lease, snapshots, journal retention.

    ``node_id`` names this daemon in the lease (default ``{hostname}-{pid}``). A standby takes over
    at most ``lease_ttl`` seconds after the router died. A snapshot is taken every
    ``snapshot_every`` journal entries or ``snapshot_interval`` seconds, whichever comes first;
    journal entries older than ``journal_retention`` seconds and covered by a snapshot are trimmed.
    A snapshot is written in chunks of at most ``snapshot_chunk_bytes`` (one Redis value each).
    Most snapshots are deltas of the changed records, also cut as soon as
    ``snapshot_delta_records`` records changed; every ``snapshot_full_every`` deltas a separate
    compaction process folds them into a new full snapshot (0: compactions back to back).
    """

    node_id: str | None = None
    lease_ttl: float = 5.0
    snapshot_every: int = 5000
    snapshot_interval: float = 10.0
    snapshot_chunk_bytes: int = 4 * 1024 * 1024
    snapshot_delta_records: int = 2000
    snapshot_full_every: int = 360
    journal_retention: float = 3600.0
    batch: int = 512

    def __post_init__(self) -> None:
        if self.lease_ttl < 0.3:
            raise ValueError("lease_ttl must be at least 0.3 seconds")
        if self.snapshot_every < 1 or self.batch < 1:
            raise ValueError("snapshot_every and batch must be at least 1")
        if self.snapshot_delta_records < 1 or self.snapshot_full_every < 0:
            raise ValueError("snapshot_delta_records must be >= 1 and snapshot_full_every >= 0")
        if not 1024 <= self.snapshot_chunk_bytes <= 256 * 1024 * 1024:
            raise ValueError("snapshot_chunk_bytes must be between 1024 and 268435456")
        if self.snapshot_interval <= 0 or self.journal_retention < 0:
            raise ValueError("snapshot_interval must be > 0 and journal_retention >= 0")


def _check_url(url: str, name: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name}: {url!r} is not an http:// or https:// URL")


class _PlatformApi(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What every platform API section has: its base ``url`` (checked) and a request timeout."""

    url: str
    timeout: float = 10.0

    def __post_init__(self) -> None:
        _check_url(self.url, "url")


class ChatwootSettings(_PlatformApi, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Chatwoot's API: base ``url``, the ``account_id`` and a user's or bot's access token."""

    account_id: int
    api_token: str


class RocketchatSettings(_PlatformApi, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rocket.Chat's REST API: base ``url``, the Stellwerk user's id and personal token."""

    user_id: str
    auth_token: str


class DiscourseSettings(_PlatformApi, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Discourse's API: base ``url``, an API key and the staff account answers are posted as.

    ``assign``: also assign the topic to the agent's Discourse user on accept (needs the
    discourse-assign plugin and ``accounts.discourse`` in the routing file).
    """

    api_key: str
    api_username: str
    assign: bool = False


class GraphSettings(_PlatformApi, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Meta's Graph API for WhatsApp or Messenger replies.

    ``access_token``: the system user's (WhatsApp) or the page's (Messenger) token;
    ``window``: seconds after the customer's last message in which free replies are allowed.
    """

    access_token: str
    url: str = "https://graph.facebook.com"
    version: str = "v21.0"
    window: float = 24 * 3600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not re.fullmatch(r"v\d+\.\d+", self.version):
            raise ValueError(f"version: {self.version!r} is not a Graph API version like v21.0")


class MailForwardSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Forward mode: the mail contacts of the agents in ``agents`` (agent id to that agent's
    own mailbox) are forwarded there, with a ``Reply-To`` of ``reply_address`` plus a token
    (``desk+TOKEN@domain``; the domain must deliver to the daemon's SMTP listener). The token is
    signed with ``secret`` (HMAC-SHA256) and valid ``ttl`` seconds; the agent's answer to it goes
    to the customer as the agent's reply.
    """

    secret: str
    reply_address: str
    agents: dict[str, str] = msgspec.field(default_factory=dict)
    ttl: float = 30 * 86400.0

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("secret: at least 16 characters (it signs the reply addresses)")
        local, at, domain = self.reply_address.partition("@")
        if not (local and at and domain) or "+" in local:
            raise ValueError(
                f"reply_address: {self.reply_address!r} is not local@domain without a '+'"
            )
        for agent, mailbox in self.agents.items():
            if "@" not in mailbox:
                raise ValueError(f"agents.{agent}: {mailbox!r} is not a mail address")
        if self.ttl <= 0:
            raise ValueError("ttl: must be positive")


class MailSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The SMTP relay replies go out through.

    ``security``: ``starttls`` (port 587), ``tls`` (implicit TLS, port 465) or ``none`` (a relay
    on the local network). ``mailboxes`` maps a queue to the address its replies come from;
    otherwise the reply comes from the address the customer wrote to, else ``from_address``.
    """

    host: str
    port: int = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: str | None = None
    from_address: str | None = None
    mailboxes: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: float = 30.0
    #: forward mode for the agents who answer from their own mail client (None: off).
    forward: MailForwardSettings | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")


class OutboundSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where Stellwerk acts and answers: one section per platform; absent means not used.

    Each section can come from the environment as JSON, e.g.
    ``STELLWERK_OUTBOUND_CHATWOOT='{"url": "...", "account_id": 1, "api_token": "..."}'``.
    """

    mail: MailSettings | None = None
    chatwoot: ChatwootSettings | None = None
    rocketchat: RocketchatSettings | None = None
    discourse: DiscourseSettings | None = None
    whatsapp: GraphSettings | None = None
    messenger: GraphSettings | None = None

    @property
    def configured(self) -> bool:
        """Whether any platform is set up (else no outbound routes or workers run)."""
        return any(getattr(self, f.name) is not None for f in msgspec.structs.fields(self))


class AsteriskSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Asterisk's ARI: Stellwerk is the Stasis application ``app``.

    ``url`` (``http://127.0.0.1:8088``) is ARI's HTTP base; Stellwerk opens the events WebSocket
    there and uses the REST API, as ``username``/``password`` (an ari.conf user). Asterisk's
    *outbound* WebSocket (ari.conf ``type=outbound_websocket``) connects to the daemon's HTTP
    listener instead, at ``/v1/telephony/asterisk/ws``, authenticated with HTTP basic auth as
    ``outbound_username``/``outbound_password`` (websocket_client.conf ``username``/
    ``password``); REST requests then travel over that socket. Off unless ``url`` or
    ``outbound_username`` is set.
    """

    url: str = ""
    username: str | None = None
    password: str | None = None
    app: str = "stellwerk"
    outbound_username: str | None = None
    outbound_password: str | None = None

    def __post_init__(self) -> None:
        if self.url and urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"url: {self.url!r} is not http://host:port or https://host:port")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.app):
            raise ValueError(f"app: {self.app!r} may hold only A-Z a-z 0-9 _ . -")
        if self.outbound_username and not self.outbound_password:
            raise ValueError("outbound_password: required with outbound_username")

    @property
    def enabled(self) -> bool:
        """Whether Stellwerk talks to an Asterisk at all."""
        return bool(self.url or self.outbound_username)


class FreeswitchSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """FreeSWITCH's event socket (inbound mode): Stellwerk connects to ``host``:``port`` and
    logs in with ``password`` (event_socket.conf.xml). Off unless ``host`` is set."""

    host: str = ""
    port: int = 8021
    password: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")

    @property
    def enabled(self) -> bool:
        """Whether Stellwerk talks to a FreeSWITCH at all."""
        return bool(self.host)


class TwilioSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Twilio Voice: the account, the REST API base (a setting so tests can use a local peer),
    ``public_url``, the base URL at which Twilio reaches this daemon's HTTP listener (webhooks,
    hold music), and ``caller_id`` for calls to agents. Off unless ``account_sid`` is set."""

    account_sid: str = ""
    auth_token: str | None = None
    api_base: str = "https://api.twilio.com"
    public_url: str = ""
    caller_id: str | None = None
    #: music-on-hold class -> audio URL Twilio plays (``default`` is Twilio's own hold music).
    music: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if urlsplit(self.api_base).scheme not in ("http", "https"):
            raise ValueError(f"api_base: {self.api_base!r} is not an http(s) URL")
        if self.public_url and urlsplit(self.public_url).scheme not in ("http", "https"):
            raise ValueError(f"public_url: {self.public_url!r} is not an http(s) URL")
        if self.account_sid and not (self.auth_token and self.public_url):
            # Without the token no signature can be checked; without the public URL Twilio
            # cannot be told where the hold music and the agent dials are.
            raise ValueError("auth_token and public_url are required with account_sid")
        for name, url in self.music.items():
            if urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"music.{name}: {url!r} is not an http(s) URL")

    @property
    def enabled(self) -> bool:
        """Whether Stellwerk talks to Twilio at all."""
        return bool(self.account_sid)


class TelephonySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The telephony systems Stellwerk controls calls on; each is off unless configured."""

    asterisk: AsteriskSettings = msgspec.field(default_factory=AsteriskSettings)
    freeswitch: FreeswitchSettings = msgspec.field(default_factory=FreeswitchSettings)
    twilio: TwilioSettings = msgspec.field(default_factory=TwilioSettings)


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``stellwerk run`` needs; see ``config/stellwerk.yaml`` for a commented copy."""

    routing: str = "routing.yaml"
    topic_prefix: str = "stellwerk"
    key_prefix: str = "stellwerk:"
    admin_token: str | None = None
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The asyncio event loop ``stellwerk run`` runs on: uvloop's (libuv; less CPU per MQTT
    packet and task, see docs/operations.md) or the standard library's."""
    role: Literal["all", "ingest", "router"] = "all"
    """What this process does (docs/daemon.md, "Roles"): ``all`` (one process: ingest and
    route), ``ingest`` (MQTT ingress sessions, webhooks, SMTP into the journal; no routing) or
    ``router`` (the routing lease, the router, offers, snapshots, the desk, the read and admin
    API; no MQTT ingress, no webhooks, no SMTP). The two halves meet only in the journal."""
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    smtp: SmtpSettings = msgspec.field(default_factory=SmtpSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    sources: SourceSettings = msgspec.field(default_factory=SourceSettings)
    router: RouterSettings = msgspec.field(default_factory=RouterSettings)
    desk: DeskSettings = msgspec.field(default_factory=DeskSettings)
    outbound: OutboundSettings = msgspec.field(default_factory=OutboundSettings)
    telephony: TelephonySettings = msgspec.field(default_factory=TelephonySettings)

    def __post_init__(self) -> None:
        if not self.topic_prefix or any(c in self.topic_prefix for c in "#+\0"):
            raise ValueError("topic_prefix: must be non-empty and free of MQTT wildcards")
        if self.topic_prefix.startswith("$") or self.topic_prefix.endswith("/"):
            raise ValueError("topic_prefix: must not start with '$' or end with '/'")

    def decode_config(self) -> DecodeConfig:
        """The channel decoders' settings."""
        return DecodeConfig(
            default_region=self.sources.default_region,
            max_text=self.sources.max_text,
            secrets=dict(self.sources.secrets),
            public_urls=dict(self.sources.public_urls),
        )

    def redacted(self) -> Settings:
        """A copy fit for printing: tokens, passwords and secrets replaced by ``***``."""
        hide = "***"
        return msgspec.structs.replace(
            self,
            admin_token=hide if self.admin_token else None,
            mqtt=msgspec.structs.replace(
                self.mqtt,
                url=_redact_url(self.mqtt.url),
                password=hide if self.mqtt.password else None,
            ),
            redis=msgspec.structs.replace(self.redis, url=_redact_url(self.redis.url)),
            sources=msgspec.structs.replace(
                self.sources, secrets=dict.fromkeys(self.sources.secrets, hide)
            ),
            outbound=_redact_outbound(self.outbound),
            telephony=_redact_telephony(self.telephony),
        )

    def node_id(self) -> str:
        """This daemon's name in the routing lease."""
        return self.router.node_id or f"{socket.gethostname()}-{os.getpid()}"


_SECRET_FIELDS = ("api_token", "auth_token", "api_key", "access_token", "password")


def _redact_outbound(outbound: OutboundSettings) -> OutboundSettings:
    changes: dict[str, Any] = {}
    for f in msgspec.structs.fields(outbound):
        section = getattr(outbound, f.name)
        if section is None:
            continue
        hidden: dict[str, Any] = {
            name: "***" for name in _SECRET_FIELDS if getattr(section, name, None) is not None
        }
        forward = getattr(section, "forward", None)
        if forward is not None:
            # ``replace`` runs the checks: the placeholder has the secret's minimum length.
            hidden["forward"] = msgspec.structs.replace(forward, secret="*" * 16)
        changes[f.name] = msgspec.structs.replace(section, **hidden)
    return msgspec.structs.replace(outbound, **changes)


def _redact_telephony(t: TelephonySettings) -> TelephonySettings:
    hide = "***"
    a, f, w = t.asterisk, t.freeswitch, t.twilio
    return TelephonySettings(
        asterisk=msgspec.structs.replace(
            a,
            url=_redact_url(a.url),
            password=hide if a.password else None,
            outbound_password=hide if a.outbound_password else None,
        ),
        freeswitch=msgspec.structs.replace(f, password=hide if f.password else None),
        twilio=msgspec.structs.replace(w, auth_token=hide if w.auth_token else None),
    )


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class LoadedSettings:
    """The settings plus where they came from (for the start-up log line)."""

    settings: Settings
    path: Path | None
    env_overrides: tuple[str, ...]
    unknown_env: tuple[str, ...]


# ---- loading ---------------------------------------------------------------------------------


def _env_names() -> dict[str, tuple[str, ...]]:
    """Env variable name -> path in the settings tree, for every setting (sections nest:
    ``telephony.asterisk.url`` -> ``STELLWERK_TELEPHONY_ASTERISK_URL``), plus the short
    telephony names (``STELLWERK_ASTERISK_URL``)."""
    names: dict[str, tuple[str, ...]] = {}

    def walk(tp: type[msgspec.Struct], path: tuple[str, ...]) -> None:
        for f in msgspec.structs.fields(tp):
            here = (*path, f.name)
            if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
                walk(f.type, here)
            else:
                names[ENV_PREFIX + "_".join(here).upper()] = here

    walk(Settings, ())
    for path in list(names.values()):
        if path[0] == "telephony":
            names.setdefault(ENV_PREFIX + "_".join(path[1:]).upper(), path)
    return names


ENV_NAMES = _env_names()
_NULLABLE = (
    "admin_token",
    "client_id",
    "username",
    "password",
    "auth_token",
    "caller_id",
    "tokens_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
)
_MAP_SETTINGS = {
    ("sources", "secrets"),
    ("sources", "public_urls"),
    ("sources", "unsigned"),
    ("sources", "max_body"),
    ("auth", "tokens"),
    ("telephony", "twilio", "music"),
}


def load_settings(path: str | Path | None, env: Mapping[str, str] | None = None) -> LoadedSettings:
    """Read the settings file (or only defaults when ``path`` is None), apply env overrides.

    Raises :class:`SettingsError` with located messages; never another exception for bad input.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    root: yaml.Node | None = None
    shown = "<defaults>"
    file_path: Path | None = None
    if path is not None:
        file_path = Path(path)
        shown = str(path)
        try:
            text = file_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
            problem = getattr(exc, "problem", None) or str(exc)
            raise SettingsError([f"{where}: not valid YAML: {problem}"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SettingsError([f"{shown}:1:1: expected a mapping of settings"])
        raw = loaded

    from_env: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for name, value in sorted(env.items()):
        target = ENV_NAMES.get(name)
        if target is None and name.startswith(SECRET_ENV_PREFIX) and name != SECRET_ENV_PREFIX:
            source = name[len(SECRET_ENV_PREFIX) :].lower().replace("_", "-")
            secrets = _section(raw, "sources").setdefault("secrets", {})
            if isinstance(secrets, dict):
                secrets[source] = value
            from_env[("sources", "secrets", source)] = name
            continue
        if target is None:
            continue
        parsed: Any = value
        if target in _MAP_SETTINGS or target[0] == "outbound":
            try:
                parsed = json.loads(value)
            except ValueError:
                shape = (
                    "list" if target in (("auth", "tokens"), ("sources", "unsigned")) else "object"
                )
                problems.append(f"{name}: expected a JSON {shape}")
                continue
        elif value == "" and (
            target[-1] in _NULLABLE or target[-1].endswith(("_password", "_username"))
        ):
            parsed = None
        node = raw
        for step in target[:-1]:
            node = _section(node, step)
        node[target[-1]] = parsed
        from_env[target] = name
    if problems:
        raise SettingsError(problems)

    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError([_locate(str(exc), shown, root, from_env)]) from None

    if file_path is not None and ("routing",) not in from_env:
        routing = Path(settings.routing)
        if not routing.is_absolute():
            settings = msgspec.structs.replace(settings, routing=str(file_path.parent / routing))
    if file_path is not None:
        settings = _relative_to(settings, file_path.parent, from_env)
    unknown = tuple(
        sorted(
            n
            for n in env
            if n.startswith(ENV_PREFIX)
            and n not in ENV_NAMES
            and not n.startswith(SECRET_ENV_PREFIX)
        )
    )
    return LoadedSettings(
        settings=settings,
        path=file_path,
        env_overrides=tuple(sorted(from_env.values())),
        unknown_env=unknown,
    )


_PATH_SETTINGS = (
    ("auth", "tokens_file"),
    ("mqtt", "tls_ca"),
    ("mqtt", "tls_cert"),
    ("mqtt", "tls_key"),
    ("http", "tls_cert"),
    ("http", "tls_key"),
)


def _relative_to(
    settings: Settings, base: Path, from_env: Mapping[tuple[str, ...], str]
) -> Settings:
    """File paths from the settings file, made relative to its directory (not to the cwd)."""
    for section_name, name in _PATH_SETTINGS:
        section = getattr(settings, section_name)
        value = getattr(section, name)
        if not value or (section_name, name) in from_env or Path(value).is_absolute():
            continue
        section = msgspec.structs.replace(section, **{name: str(base / value)})
        settings = msgspec.structs.replace(settings, **{section_name: section})
    return settings


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    section = raw.get(name)
    if not isinstance(section, dict):
        section = {}
        raw[name] = section
    return section


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]+)`")


def _locate(
    message: str,
    shown: str,
    root: yaml.Node | None,
    from_env: Mapping[tuple[str, ...], str],
) -> str:
    """Turn a msgspec error into ``file:line:col: path: message`` or ``ENV_NAME: message``."""
    m = _AT.match(message)
    assert m is not None
    msg = m.group("msg")
    path: list[str] = [p for p in re.split(r"[.\[\]]", m.group("path") or "") if p]
    unknown = _UNKNOWN.search(msg)
    if unknown:
        path.append(unknown.group("name"))
    # A __post_init__ error names its field first ("addr: ..."); point at that field.
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[a-z_]+", head) and not unknown:
        path.append(head)
        msg = rest
    for length in range(len(path), 0, -1):
        env_name = from_env.get(tuple(path[:length]))
        if env_name:
            return f"{env_name}: {msg}"
    dotted = ".".join(path) or "settings"
    node, key_node = _find(root, path)
    mark_node = key_node if unknown and key_node is not None else node
    if mark_node is not None:
        mark = mark_node.start_mark
        return f"{shown}:{mark.line + 1}:{mark.column + 1}: {dotted}: {msg}"
    return f"{shown}: {dotted}: {msg}"


def _find(root: yaml.Node | None, path: list[str]) -> tuple[yaml.Node | None, yaml.Node | None]:
    """The deepest YAML node along ``path`` (value node, and the key node of its last step)."""
    node, key_node = root, None
    for step in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == step:
                node, key_node = v, k
                break
        else:
            break
    return node, key_node


DEFAULT_CONFIG = "config/stellwerk.yaml"


def settings_path(explicit: str | None) -> str | None:
    """The settings file a command reads: ``explicit`` (``--config``), else
    ``$STELLWERK_CONFIG``, else ``config/stellwerk.yaml`` when it exists, else None (defaults)."""
    path = explicit or os.environ.get("STELLWERK_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return path
