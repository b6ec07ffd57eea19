"""Settings: defaults, the example file, env overrides and located errors."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from router.daemon.config import ENV_NAMES, SettingsError, load_settings, parse_addr

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stellwerk.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_example_is_valid_and_points_at_the_shipped_routing_file() -> None:
    loaded = load_settings(REPO / "config" / "stellwerk.yaml", env={})
    assert loaded.settings.topic_prefix == "stellwerk"
    assert Path(loaded.settings.routing).resolve() == (REPO / "config" / "routing.yaml").resolve()


def test_every_setting_named_in_the_spec_has_its_env_variable() -> None:
    for name in (
        "STELLWERK_MQTT_URL",
        "STELLWERK_REDIS_URL",
        "STELLWERK_HTTP_ADDR",
        "STELLWERK_SMTP_ADDR",
        "STELLWERK_TOPIC_PREFIX",
        "STELLWERK_ROUTING",
        "STELLWERK_KEY_PREFIX",
        "STELLWERK_ADMIN_TOKEN",
        "STELLWERK_LOG_FORMAT",
    ):
        assert name in ENV_NAMES


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "topic_prefix: fromfile\nmqtt:\n  keepalive: 10\n")
    loaded = load_settings(
        path,
        env={
            "STELLWERK_TOPIC_PREFIX": "fromenv",
            "STELLWERK_MQTT_KEEPALIVE": "25",
            "STELLWERK_ROUTER_LEASE_TTL": "1.5",
            "STELLWERK_SECRET_TWILIO_VOICE": "tok",
            "STELLWERK_SOURCES_PUBLIC_URLS": '{"twilio-voice": "https://x/v1/webhooks/twilio-voice"}',
            "STELLWERK_ROUTING": "elsewhere.yaml",
            "STELLWERK_NOT_A_SETTING": "1",
        },
    )
    s = loaded.settings
    assert s.topic_prefix == "fromenv"
    assert s.mqtt.keepalive == 25
    assert s.router.lease_ttl == 1.5
    assert s.decode_config().secrets == {"twilio-voice": "tok"}
    assert s.sources.public_urls["twilio-voice"].startswith("https://")
    # An env path is relative to the working directory, a file path to the file.
    assert s.routing == "elsewhere.yaml"
    assert loaded.unknown_env == ("STELLWERK_NOT_A_SETTING",)
    assert "STELLWERK_TOPIC_PREFIX" in loaded.env_overrides


def test_relative_routing_path_is_relative_to_the_file(tmp_path: Path) -> None:
    loaded = load_settings(write(tmp_path, "routing: rules/r.yaml\n"), env={})
    assert Path(loaded.settings.routing) == tmp_path / "rules" / "r.yaml"


def test_mqtt_url_carries_host_port_and_credentials() -> None:
    s = load_settings(None, env={"STELLWERK_MQTT_URL": "mqtts://u%40x:p%3Aw@broker:9999"}).settings
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.tls) == ("broker", 9999, True)
    assert s.mqtt.credentials == ("u@x", "p:w")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mqtt:\n  url: mqtt://x\n  urll: 3\n", ":3:3: mqtt.urll: Object contains unknown field"),
        ("http:\n  addr: nowhere\n", ":2:9: http.addr: 'nowhere' is not host:port"),
        ("log:\n  format: xml\n", ":2:11: log.format: Invalid enum value 'xml'"),
        ("event_loop: libev\n", ":1:13: event_loop: Invalid enum value 'libev'"),
        ("router:\n  lease_ttl: fast\n", ":2:14: router.lease_ttl: Expected `float`"),
        ("topic_prefix: a/#\n", ":1:15: topic_prefix: must be non-empty"),
        ("mqtt: [1, 2]\n", ":1:7: mqtt: Expected `object`, got `array`"),
        ("a: [unclosed\n", ":2:1: not valid YAML"),
        ("- 1\n", ":1:1: expected a mapping"),
    ],
)
def test_file_errors_are_located(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={})
    (problem,) = info.value.problems
    assert problem.startswith(str(path) + expected.split(":")[0] + ":") or expected in problem, (
        problem
    )
    assert expected in problem, problem


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STELLWERK_MQTT_KEEPALIVE": "often"}, "STELLWERK_MQTT_KEEPALIVE: Expected `int`"),
        ({"STELLWERK_HTTP_ADDR": "8080"}, "STELLWERK_HTTP_ADDR: '8080' is not host:port"),
        ({"STELLWERK_SMTP_ADDR": "2525"}, "STELLWERK_SMTP_ADDR: '2525' is not host:port"),
        ({"STELLWERK_SOURCES_SECRETS": "nope"}, "STELLWERK_SOURCES_SECRETS: expected a JSON"),
        ({"STELLWERK_MQTT_URL": "http://x"}, "STELLWERK_MQTT_URL: 'http://x' is not mqtt://"),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(None, env=env)
    assert expected in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"nope\.yaml: cannot read"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_parse_addr() -> None:
    assert parse_addr("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_addr("[::1]:25") == ("::1", 25)
    assert parse_addr(":2525") == ("0.0.0.0", 2525)
    with pytest.raises(ValueError):
        parse_addr("localhost")
    with pytest.raises(ValueError):
        parse_addr("h:99999")


def test_redacted_settings_hide_every_secret() -> None:
    s = load_settings(
        None,
        env={
            "STELLWERK_MQTT_URL": "mqtt://user:pa55@broker:1883",
            "STELLWERK_MQTT_PASSWORD": "mqttpw",
            "STELLWERK_REDIS_URL": "redis://:redispw@127.0.0.1:6379/0",
            "STELLWERK_ADMIN_TOKEN": "admintok",
            "STELLWERK_SECRET_DISCOURSE": "discsecret",
        },
    ).settings
    shown = str(s.redacted())
    for secret in ("pa55", "mqttpw", "redispw", "admintok", "discsecret"):
        assert secret not in shown
    assert "mqtt://user:***@broker:1883" in shown and "discourse" in shown
    # The real settings are untouched.
    assert s.mqtt.credentials == ("user", "mqttpw")


def test_default_ingress_client_id_is_stable_and_scoped_to_the_installation() -> None:
    leader = load_settings(None, env={}).settings
    assert leader.mqtt.identifier(leader.topic_prefix) == "stellwerk-router-stellwerk"
    other = load_settings(None, env={"STELLWERK_TOPIC_PREFIX": "demo/eu"}).settings
    assert other.mqtt.identifier(other.topic_prefix) == "stellwerk-router-demo-eu"
    shared = load_settings(None, env={"STELLWERK_MQTT_INGRESS": "shared"}).settings
    assert shared.mqtt.identifier("p").startswith("stellwerk-p-")
    fixed = load_settings(None, env={"STELLWERK_MQTT_CLIENT_ID": "mine"}).settings
    assert fixed.mqtt.identifier("p") == "mine"


def test_telephony_settings_have_short_env_names_and_are_redacted() -> None:
    loaded = load_settings(
        None,
        env={
            "STELLWERK_ASTERISK_URL": "http://ari:s3cr3t@127.0.0.1:8088",
            "STELLWERK_ASTERISK_USERNAME": "stellwerk",
            "STELLWERK_ASTERISK_PASSWORD": "pw1",
            "STELLWERK_ASTERISK_APP": "acd",
            "STELLWERK_FREESWITCH_HOST": "10.0.0.5",
            "STELLWERK_FREESWITCH_PORT": "8022",
            "STELLWERK_FREESWITCH_PASSWORD": "ClueCon",
            "STELLWERK_TWILIO_ACCOUNT_SID": "ACxxx",
            "STELLWERK_TELEPHONY_TWILIO_AUTH_TOKEN": "tok",
            "STELLWERK_TWILIO_PUBLIC_URL": "https://acd.example.com",
        },
    )
    t = loaded.settings.telephony
    assert (t.asterisk.url, t.asterisk.username, t.asterisk.app) == (
        "http://ari:s3cr3t@127.0.0.1:8088",
        "stellwerk",
        "acd",
    )
    assert (t.freeswitch.host, t.freeswitch.port) == ("10.0.0.5", 8022)
    assert t.twilio.auth_token == "tok" and t.twilio.api_base == "https://api.twilio.com"
    assert t.asterisk.enabled and t.freeswitch.enabled and t.twilio.enabled
    shown = msgspec.json.encode(loaded.settings.redacted()).decode()
    for secret in ("s3cr3t", "pw1", "ClueCon", '"tok"'):
        assert secret not in shown


def test_telephony_is_off_unless_configured_and_bad_values_are_named() -> None:
    t = load_settings(None, env={}).settings.telephony
    assert not (t.asterisk.enabled or t.freeswitch.enabled or t.twilio.enabled)
    with pytest.raises(SettingsError) as info:
        load_settings(None, env={"STELLWERK_ASTERISK_URL": "ws://pbx:8088"})
    assert info.value.problems[0].startswith("STELLWERK_ASTERISK_URL: ")
    with pytest.raises(SettingsError) as info:
        load_settings(None, env={"STELLWERK_FREESWITCH_PORT": "70000"})
    assert info.value.problems[0].startswith("STELLWERK_FREESWITCH_PORT: ")


# ---- outbound platforms -----------------------------------------------------------------------


def test_outbound_sections_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "stellwerk.yaml"
    path.write_text(
        "outbound:\n"
        "  mail: {host: smtp.example.net, security: tls, port: 465, password: s3cret}\n"
        "  discourse: {url: 'https://community.example.net', api_key: k, api_username: staff}\n",
        encoding="utf-8",
    )
    env = {
        "STELLWERK_OUTBOUND_CHATWOOT": '{"url": "https://chat.example.net", "account_id": 3,'
        ' "api_token": "cw-secret"}'
    }
    s = load_settings(path, env=env).settings
    assert s.outbound.configured
    assert (
        s.outbound.mail and s.outbound.mail.security,
        s.outbound.chatwoot and s.outbound.chatwoot.account_id,
    ) == ("tls", 3)
    shown = s.redacted().outbound
    assert shown.chatwoot is not None and shown.chatwoot.api_token == "***"
    assert shown.mail is not None and shown.mail.password == "***"
    assert shown.discourse is not None and shown.discourse.api_key == "***"
    assert not load_settings(None, env={}).settings.outbound.configured


def test_outbound_problems_are_located(tmp_path: Path) -> None:
    path = tmp_path / "stellwerk.yaml"
    path.write_text("outbound:\n  rocketchat: {url: 'ftp://x', user_id: u, auth_token: t}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={})
    assert info.value.problems[0].startswith(f"{path}:2:")
    assert "not an http:// or https:// URL" in info.value.problems[0]
    with pytest.raises(SettingsError) as info:
        load_settings(
            None, env={"STELLWERK_OUTBOUND_WHATSAPP": '{"access_token": "t", "version": "21"}'}
        )
    assert (
        info.value.problems
        == ["STELLWERK_OUTBOUND_WHATSAPP: version: '21' is not a Graph API version like v21.0"]
        or "Graph API version" in info.value.problems[0]
    )


def test_mail_forward_mode_settings_are_checked_and_their_secret_hidden() -> None:
    forward = {
        "secret": "a-secret-of-enough-length",
        "reply_address": "desk@stellwerk.example.net",
        "agents": {"a01": "anna@example.net"},
    }
    env = {"STELLWERK_OUTBOUND_MAIL": json.dumps({"host": "smtp.example.net", "forward": forward})}
    s = load_settings(None, env=env).settings
    assert s.outbound.mail is not None and s.outbound.mail.forward is not None
    assert s.outbound.mail.forward.agents == {"a01": "anna@example.net"}
    shown = s.redacted().outbound.mail
    assert shown is not None and shown.forward is not None and set(shown.forward.secret) == {"*"}
    for change, problem in [
        ({"secret": "short"}, "at least 16 characters"),
        ({"reply_address": "desk+x@stellwerk.example.net"}, "without a '+'"),
        ({"reply_address": "desk"}, "is not local@domain"),
        ({"agents": {"a01": "anna"}}, "agents.a01: 'anna' is not a mail address"),
    ]:
        bad = {"host": "smtp.example.net", "forward": {**forward, **change}}
        with pytest.raises(SettingsError) as info:
            load_settings(None, env={"STELLWERK_OUTBOUND_MAIL": json.dumps(bad)})
        assert problem in info.value.problems[0], info.value.problems
