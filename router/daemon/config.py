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

import msgspec
import yaml

from channels.base import DecodeConfig

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


class MqttSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The MQTT broker connection.

    ``ingress`` says who consumes the ingress and agent-command topics:

    - ``leader`` (default): only the daemon holding the routing lease, under the installation's
      one ``client_id`` (default ``stellwerk-router-{topic_prefix}``). The broker keeps that
      persistent session (and every message not yet acknowledged) while nobody is connected,
      and a standby that takes the lease resumes it, so nothing waits for a dead daemon. The
      subscription is a plain one, which the broker restores after its own restart.
    - ``shared``: every daemon consumes through the shared subscription ``$share/{share_group}``
      with a persistent session of its own (``client_id`` unique per daemon, default
      ``stellwerk-{topic_prefix}-{hostname}``). More ingest capacity, but brokers such as
      Mosquitto keep handing a dead member's share of the messages to its offline session,
      where they wait until a daemon with that ``client_id`` connects again.

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

    def __post_init__(self) -> None:
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
    """The HTTP server (webhooks, metrics, health, admin API). ``addr: ""`` turns it off."""

    addr: str = "127.0.0.1:8080"

    def __post_init__(self) -> None:
        if self.addr:
            try:
                parse_addr(self.addr)
            except ValueError as exc:
                raise ValueError(f"addr: {exc}") from None


class SmtpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The inbound SMTP listener. ``addr: ""`` turns it off."""

    addr: str = "127.0.0.1:2525"
    max_message_size: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.addr:
            try:
                parse_addr(self.addr)
            except ValueError as exc:
                raise ValueError(f"addr: {exc}") from None


class LogSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Logging: ``json`` lines for production, ``console`` for a terminal."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class SourceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the channel decoders need: signing secrets, public URLs, phone region, text bound."""

    default_region: str = "DE"
    max_text: int = 4000
    secrets: dict[str, str] = msgspec.field(default_factory=dict)
    public_urls: dict[str, str] = msgspec.field(default_factory=dict)


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The routing loop: lease, snapshots, journal retention.

    ``node_id`` names this daemon in the lease (default ``{hostname}-{pid}``). A standby takes over
    at most ``lease_ttl`` seconds after the router died. A snapshot is taken every
    ``snapshot_every`` journal entries or ``snapshot_interval`` seconds, whichever comes first;
    journal entries older than ``journal_retention`` seconds and covered by a snapshot are trimmed.
    """

    node_id: str | None = None
    lease_ttl: float = 5.0
    snapshot_every: int = 5000
    snapshot_interval: float = 10.0
    journal_retention: float = 3600.0
    batch: int = 512

    def __post_init__(self) -> None:
        if self.lease_ttl < 0.3:
            raise ValueError("lease_ttl must be at least 0.3 seconds")
        if self.snapshot_every < 1 or self.batch < 1:
            raise ValueError("snapshot_every and batch must be at least 1")
        if self.snapshot_interval <= 0 or self.journal_retention < 0:
            raise ValueError("snapshot_interval must be > 0 and journal_retention >= 0")


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
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    smtp: SmtpSettings = msgspec.field(default_factory=SmtpSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    sources: SourceSettings = msgspec.field(default_factory=SourceSettings)
    router: RouterSettings = msgspec.field(default_factory=RouterSettings)
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
            telephony=_redact_telephony(self.telephony),
        )

    def node_id(self) -> str:
        """This daemon's name in the routing lease."""
        return self.router.node_id or f"{socket.gethostname()}-{os.getpid()}"


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
_NULLABLE = ("admin_token", "client_id", "username", "password", "auth_token", "caller_id")
_MAP_SETTINGS = {
    ("sources", "secrets"),
    ("sources", "public_urls"),
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
        if target in _MAP_SETTINGS:
            try:
                parsed = json.loads(value)
            except ValueError:
                problems.append(f"{name}: expected a JSON object")
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
