"""``stellwerk broker-config``: MQTT identities and ACLs for Mosquitto, and the HTTP tokens.

From the routing file (its agents) and the options (ingress sources, read-only accounts) it
writes into ``--out DIR``:

- ``mosquitto.passwd`` — one line per MQTT identity, ``user:$7$101$<salt>$<hash>``: Mosquitto's
  own PBKDF2-SHA512 format (what ``mosquitto_passwd`` writes), computed with :mod:`hashlib`;
- ``mosquitto.acl`` — what each identity may publish and read (below); anything not granted is
  refused, and with ``allow_anonymous false`` nobody without an account gets in;
- ``mosquitto-auth.conf`` — the three lines that include the two files (``include_dir`` it or
  copy them into ``mosquitto.conf``);
- ``http-tokens.yaml`` — the HTTP bearer tokens as SHA-256 digests, for ``auth.tokens_file``;
- ``credentials.yaml`` (mode 0600) — every password and token in clear, for the operator to hand
  out; ``daemon.env`` (0600) — the daemon's ``STELLWERK_MQTT_USERNAME`` / ``..._PASSWORD`` and
  ``STELLWERK_AUTH_TOKENS_FILE``.

Identities and what the ACL grants (``P`` is the topic prefix):

==========================  ==============================================================
daemon (``stellwerk``)      read ``P/in/#``, ``P/agents/+/cmd``; write ``P/agents/+/offers``,
                            ``P/events/#``
source ``S`` on channel C   write ``P/in/C/S`` only (one per ingress source / telephony bridge)
agent ``A`` (``agent-A``)   write ``P/agents/A/cmd``, read ``P/agents/A/offers`` only
reader ``R``                read ``P/events/#`` only (wallboards, CRM)
==========================  ==============================================================

HTTP tokens: ``admin``, ``supervisor`` and one per agent (role agent, ``agent:A``).

Re-running keeps every password and token already in ``credentials.yaml``; new identities get
new ones, identities no longer wanted are dropped. Why a password file and an ACL file rather
than Mosquitto's dynamic-security plugin: they are plain files the broker reads at start and on
SIGHUP, reviewable in a diff and generated idempotently from the routing file, with no plugin
to load and no admin account on the broker that could itself be abused; dynamic security suits
sites that manage accounts at runtime over ``$CONTROL`` topics.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.daemon.auth import hash_token
from rules.load import load_routing_or_problems

PROG = "stellwerk broker-config"
ITERATIONS = 101
"""What mosquitto_passwd 2.0 uses for ``$7$`` (PBKDF2-SHA512)."""
SALT_BYTES = 12
DAEMON_USER = "stellwerk"
DEFAULT_SOURCES = ("asterisk-ari:phone", "freeswitch:phone")
DEFAULT_READERS = ("wallboard",)
CHANNELS = ("phone", "email", "chat", "social")
_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


class BrokerConfigError(Exception):
    """Bad options or input; the message is the one line the user sees."""


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """``$7$101$<b64 salt>$<b64 hash>``: Mosquitto 2's PBKDF2-SHA512 password hash."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, ITERATIONS, 64)
    b64 = base64.b64encode
    return f"$7${ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def mosquitto_verify(password: str, encoded: str) -> bool:
    """Whether ``encoded`` (a ``$7$`` hash) is the hash of ``password``."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), parts[4]
    mine = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return secrets.compare_digest(base64.b64encode(mine).decode(), digest)


@dataclass
class Identity:
    """One MQTT account and the ACL lines it gets."""

    user: str
    kind: str
    grants: list[tuple[str, str]] = field(default_factory=list)
    """(access, topic) with access read / write / readwrite."""


def identities(
    prefix: str, agents: list[str], sources: list[tuple[str, str]], readers: list[str]
) -> list[Identity]:
    """Every MQTT identity with its grants (see the module docstring's table)."""
    out = [
        Identity(
            DAEMON_USER,
            "daemon",
            [
                ("read", f"{prefix}/in/#"),
                ("read", f"{prefix}/agents/+/cmd"),
                ("write", f"{prefix}/agents/+/offers"),
                ("write", f"{prefix}/events/#"),
            ],
        )
    ]
    by_source: dict[str, Identity] = {}
    for source, channel in sources:
        ident = by_source.get(source)
        if ident is None:
            ident = Identity(f"source-{source}", "source")
            by_source[source] = ident
            out.append(ident)
        ident.grants.append(("write", f"{prefix}/in/{channel}/{source}"))
    for agent in agents:
        out.append(
            Identity(
                f"agent-{agent}",
                "agent",
                [
                    ("write", f"{prefix}/agents/{agent}/cmd"),
                    ("read", f"{prefix}/agents/{agent}/offers"),
                ],
            )
        )
    for reader in readers:
        out.append(Identity(f"reader-{reader}", "reader", [("read", f"{prefix}/events/#")]))
    users = [i.user for i in out]
    dup = sorted({u for u in users if users.count(u) > 1})
    if dup:
        raise BrokerConfigError(f"two identities share the user name(s) {dup}")
    return out


def acl_text(idents: list[Identity]) -> str:
    """The Mosquitto ACL file: one ``user`` block per identity; nothing else is granted."""
    lines = [
        "# Generated by `stellwerk broker-config`; re-run it rather than editing by hand.",
        "# Anything not granted here is refused (Mosquitto denies by default with an acl_file).",
        "",
    ]
    for ident in idents:
        lines.append(f"# {ident.kind}")
        lines.append(f"user {ident.user}")
        lines.extend(f"topic {access} {topic}" for access, topic in ident.grants)
        lines.append("")
    return "\n".join(lines)


def _check_name(what: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BrokerConfigError(f"{what} {name!r}: only A-Z a-z 0-9 _ . @ - are allowed")
    return name


def _parse_sources(specs: list[str]) -> list[tuple[str, str]]:
    from channels.contact_event import SOURCES

    out = []
    for spec in specs:
        source, sep, channel = spec.partition(":")
        if not sep or channel not in CHANNELS:
            raise BrokerConfigError(
                f"--source {spec!r}: expected SOURCE:CHANNEL, e.g. asterisk-ari:phone"
            )
        if source not in SOURCES:
            raise BrokerConfigError(
                f"--source {spec!r}: unknown source; known: {', '.join(SOURCES)}"
            )
        out.append((source, channel))
    return out


def _agent_ids(routing: Path) -> list[str]:
    table, problems = load_routing_or_problems(routing)
    if table is None:
        lines = "".join(f"\n  {problem}" for problem in problems)
        raise BrokerConfigError(f"{routing} does not validate:{lines}")
    return [_check_name("agent id", a.id) for a in table.file.agents]


def _load_credentials(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {"mqtt": {}, "http": {}}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BrokerConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BrokerConfigError(f"{path}: expected a mapping")
    out: dict[str, dict[str, str]] = {}
    for section in ("mqtt", "http"):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise BrokerConfigError(f"{path}: {section} must be a mapping")
        out[section] = {str(k): str(v) for k, v in value.items()}
    return out


def _write(path: Path, text: str, mode: int) -> None:
    """Write atomically with ``mode`` from the start (a secret is never briefly world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass
class Generated:
    """What :func:`generate` wrote (for tests and the summary line)."""

    out: Path
    mqtt: dict[str, str]
    http: dict[str, str]
    identities: list[Identity]
    kept: int


def generate(
    routing: Path,
    out: Path,
    *,
    prefix: str = "stellwerk",
    sources: list[str] | None = None,
    readers: list[str] | None = None,
) -> Generated:
    """Write the files (module docstring) for ``routing``'s agents into ``out``."""
    agents = _agent_ids(routing)
    idents = identities(
        prefix,
        agents,
        _parse_sources(list(sources if sources is not None else DEFAULT_SOURCES)),
        [_check_name("reader", r) for r in (readers if readers is not None else DEFAULT_READERS)],
    )
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    creds_path = out / "credentials.yaml"
    old = _load_credentials(creds_path)
    kept = 0

    def secret_for(section: str, name: str) -> str:
        nonlocal kept
        existing = old[section].get(name)
        if existing:
            kept += 1
            return existing
        return secrets.token_urlsafe(24)

    mqtt = {i.user: secret_for("mqtt", i.user) for i in idents}
    http_roles: list[tuple[str, str, str | None]] = [
        ("admin", "admin", None),
        ("supervisor", "supervisor", None),
    ] + [(f"agent:{a}", "agent", a) for a in agents]
    http = {name: secret_for("http", name) for name, _, _ in http_roles}

    passwd = "".join(f"{user}:{mosquitto_hash(pw)}\n" for user, pw in mqtt.items())
    _write(out / "mosquitto.passwd", passwd, 0o640)
    _write(out / "mosquitto.acl", acl_text(idents), 0o644)
    _write(
        out / "mosquitto-auth.conf",
        "# Generated by `stellwerk broker-config`: accounts and ACLs, no anonymous access.\n"
        "allow_anonymous false\n"
        f"password_file {out.resolve() / 'mosquitto.passwd'}\n"
        f"acl_file {out.resolve() / 'mosquitto.acl'}\n",
        0o644,
    )
    tokens: list[dict[str, Any]] = []
    for name, role, agent in http_roles:
        entry: dict[str, Any] = {"name": name, "role": role, "sha256": hash_token(http[name])}
        if agent is not None:
            entry["agent_id"] = agent
        tokens.append(entry)
    _write(
        out / "http-tokens.yaml",
        "# Generated by `stellwerk broker-config`: SHA-256 digests of the HTTP tokens\n"
        "# (auth.tokens_file); the tokens themselves are in credentials.yaml.\n"
        + yaml.safe_dump({"tokens": tokens}, sort_keys=False),
        0o644,
    )
    _write(
        creds_path,
        "# Generated by `stellwerk broker-config`. SECRET: every password and token in clear.\n"
        "# Hand each identity its own; re-running keeps them (delete a line to rotate it).\n"
        + yaml.safe_dump({"mqtt": mqtt, "http": http}, sort_keys=False),
        0o600,
    )
    _write(
        out / "daemon.env",
        f"STELLWERK_MQTT_USERNAME={DAEMON_USER}\n"
        f"STELLWERK_MQTT_PASSWORD={mqtt[DAEMON_USER]}\n"
        f"STELLWERK_AUTH_TOKENS_FILE={(out / 'http-tokens.yaml').resolve()}\n",
        0o600,
    )
    return Generated(out=out, mqtt=mqtt, http=http, identities=idents, kept=kept)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``broker-config`` sub-command's options."""
    parser.add_argument("--routing", required=True, metavar="ROUTING.yaml", help="routing file")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    parser.add_argument(
        "--topic-prefix",
        default=os.environ.get("STELLWERK_TOPIC_PREFIX", "stellwerk"),
        help="MQTT topic prefix (default: $STELLWERK_TOPIC_PREFIX, else stellwerk)",
    )
    parser.add_argument(
        "--source",
        action="append",
        metavar="SOURCE:CHANNEL",
        help="an ingress identity publishing {prefix}/in/CHANNEL/SOURCE; repeatable "
        f"(default: {' '.join(DEFAULT_SOURCES)})",
    )
    parser.add_argument(
        "--reader",
        action="append",
        metavar="NAME",
        help="a read-only account on {prefix}/events/# (wallboard, CRM); repeatable "
        f"(default: {' '.join(DEFAULT_READERS)})",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``stellwerk broker-config``."""
    prefix = args.topic_prefix
    if not prefix or any(c in prefix for c in "#+\0") or prefix.endswith("/"):
        print(f"{PROG}: --topic-prefix {prefix!r} is not a plain topic prefix", file=sys.stderr)
        return 2
    try:
        done = generate(
            Path(args.routing),
            Path(args.out),
            prefix=prefix,
            sources=args.source,
            readers=args.reader,
        )
    except BrokerConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    total = len(done.mqtt) + len(done.http)
    print(
        f"{PROG}: {len(done.mqtt)} MQTT identities, {len(done.http)} HTTP tokens in {done.out} "
        f"({done.kept} of {total} secrets kept from the last run); hand out credentials.yaml's "
        "entries one by one"
    )
    return 0
