#!/usr/bin/env bash
# Make sure Redis (127.0.0.1:6379) and Mosquitto (127.0.0.1:1883) are up for the integration
# tests and the demo: start them when they are not running, install the Debian packages when
# they are missing and we are allowed to (root). Never touches a server that already answers.
set -euo pipefail
cd "$(dirname "$0")/.."

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

need_install=()
port_open 6379 || command -v redis-server >/dev/null || need_install+=(redis-server)
port_open 1883 || command -v mosquitto >/dev/null || need_install+=(mosquitto)
if [ ${#need_install[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}"
  else
    echo "services: please install ${need_install[*]} (e.g. sudo apt-get install ${need_install[*]})" >&2
    exit 1
  fi
fi

if ! port_open 6379; then
  mkdir -p /tmp/stellwerk-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/stellwerk-redis --logfile /tmp/stellwerk-redis/redis.log
fi
if ! port_open 1883; then
  # Anonymous on loopback, with the production example's tuning (TCP_NODELAY, a deep queue
  # for offline sessions, saved every second). config/mosquitto.conf itself needs the accounts
  # `stellwerk broker-config` writes and refuses anonymous clients.
  mkdir -p /tmp/stellwerk-mosquitto
  # Started as root, mosquitto drops to its own user, who must be able to write there.
  if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto: /tmp/stellwerk-mosquitto; fi
  mosquitto -d -c "$(pwd)/scripts/mosquitto-local.conf"
fi
for port in 6379 1883; do
  for _ in $(seq 50); do port_open "$port" && break; sleep 0.1; done
  port_open "$port" || { echo "services: nothing listens on 127.0.0.1:$port" >&2; exit 1; }
done
echo "services: redis 127.0.0.1:6379 and mosquitto 127.0.0.1:1883 are up"
