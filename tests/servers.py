"""Where the integration tests find Redis and the MQTT broker, and the namespace they use.

``STELLWERK_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) and
``STELLWERK_TEST_MQTT_URL`` (default ``mqtt://127.0.0.1:1883``) point the suite elsewhere.
Everything a test run creates lives under this run's prefixes, ``stwtest:{RUN}:`` in Redis and
``stwtest/{RUN}/`` on the broker, so the check at the end of the run (tests/conftest.py) can
tell what this run left behind from what other runs on the same servers are still using.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit

REDIS_URL = os.environ.get("STELLWERK_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
MQTT_URL = os.environ.get("STELLWERK_TEST_MQTT_URL") or "mqtt://127.0.0.1:1883"
_mqtt = urlsplit(MQTT_URL)
MQTT_HOST = _mqtt.hostname or "127.0.0.1"
MQTT_PORT = _mqtt.port or 1883
MQTT_USER = _mqtt.username
MQTT_PASSWORD = _mqtt.password

RUN = uuid.uuid4().hex[:8]
KEY_ROOT = f"stwtest:{RUN}:"
TOPIC_ROOT = f"stwtest/{RUN}"


# tag -> the test that used it, so the end-of-run check can say which test left something.
OWNERS: dict[str, str] = {}


def owner(name: str) -> str:
    """`` (from TEST)`` for a key or topic of this run whose tag a test registered."""
    rest = name.removeprefix(KEY_ROOT).removeprefix(TOPIC_ROOT + "/")
    tag = rest.split(":", 1)[0].split("/", 1)[0]
    return f" (from {OWNERS[tag]})" if tag in OWNERS else ""


def key_prefix(tag: str) -> str:
    """A Redis key prefix of this run for one test (or fixture)."""
    return f"{KEY_ROOT}{tag}:"


def topic_prefix(tag: str) -> str:
    """An MQTT topic prefix of this run for one test."""
    return f"{TOPIC_ROOT}/{tag}"
