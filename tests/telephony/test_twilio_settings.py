"""The ``telephony.twilio`` settings: what turns Twilio on, what it needs, what is hidden."""

from __future__ import annotations

import pytest

from router.daemon.config import SettingsError, load_settings
from router.daemon.telephony.connector import HoldSpec
from router.daemon.telephony.twilio import DEFAULT_MUSIC, TwilioDriver


def test_twilio_needs_its_token_and_public_url() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, env={"STELLWERK_TWILIO_ACCOUNT_SID": "AC1"})
    assert "auth_token and public_url are required" in str(err.value)


def test_music_classes_come_from_the_environment_and_the_token_is_redacted() -> None:
    env = {
        "STELLWERK_TWILIO_ACCOUNT_SID": "AC1",
        "STELLWERK_TWILIO_AUTH_TOKEN": "secret-token",
        "STELLWERK_TWILIO_PUBLIC_URL": "https://acd.example.com",
        "STELLWERK_TELEPHONY_TWILIO_MUSIC": '{"jazz": "https://media.example.com/jazz.mp3"}',
    }
    settings = load_settings(None, env=env).settings
    twilio = settings.telephony.twilio
    assert twilio.enabled and twilio.music == {"jazz": "https://media.example.com/jazz.mp3"}
    assert settings.redacted().telephony.twilio.auth_token == "***"
    driver = TwilioDriver(twilio)
    assert driver._music(HoldSpec(music_class="jazz")) == "https://media.example.com/jazz.mp3"
    assert driver._music(HoldSpec(music_class="default")) == DEFAULT_MUSIC
    url = "https://cdn.example.com/own.mp3"
    assert driver._music(HoldSpec(music_class=url)) == url


def test_a_music_class_must_be_a_url() -> None:
    env = {
        "STELLWERK_TWILIO_ACCOUNT_SID": "AC1",
        "STELLWERK_TWILIO_AUTH_TOKEN": "t",
        "STELLWERK_TWILIO_PUBLIC_URL": "https://acd.example.com",
        "STELLWERK_TELEPHONY_TWILIO_MUSIC": '{"jazz": "moh/jazz"}',
    }
    with pytest.raises(SettingsError) as err:
        load_settings(None, env=env)
    assert "music.jazz" in str(err.value)
