"""The daemon: the I/O edge around the pure engine (MQTT, Redis, HTTP, SMTP, metrics)."""
