"""The telephony tests use the daemon tests' real Redis / Mosquitto fixtures."""

from __future__ import annotations

from tests.daemon.conftest import (  # noqa: F401  (pytest finds fixtures by name)
    daemon_env,
    daemons,
    journal,
    mqtt_probe,
    names,
    redis_client,
    start_daemon,
)
