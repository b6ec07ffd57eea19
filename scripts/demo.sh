#!/usr/bin/env bash
# The Stellwerk demo: start the daemon against the local Redis and Mosquitto (a demo key and topic
# prefix of its own, wiped first), drive it with `stellwerk loadgen` for about a minute (calls over
# MQTT, mail over SMTP, signed chat and community webhooks, 22 simulated agents), print the report
# and a few live metrics, then stop the daemon (SIGTERM: graceful hand-over).
#
#   ./scripts/demo.sh                     # what `make demo` runs
#   DEMO_DURATION=20 DEMO_RATE=8 ./scripts/demo.sh
#   DEMO_KEEP=1 ./scripts/demo.sh         # keep the daemon running afterwards (Ctrl-C stops it)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
DURATION=${DEMO_DURATION:-60}
RATE=${DEMO_RATE:-5}
HTTP_ADDR=${DEMO_HTTP_ADDR:-127.0.0.1:8080}
SMTP_ADDR=${DEMO_SMTP_ADDR:-127.0.0.1:2525}
WORK=$(mktemp -d /tmp/stellwerk-demo.XXXXXX)

export STELLWERK_KEY_PREFIX="stellwerk-demo:"
export STELLWERK_TOPIC_PREFIX="stellwerk-demo"
export STELLWERK_MQTT_CLIENT_ID="stellwerk-demo-daemon"
export STELLWERK_HTTP_ADDR="$HTTP_ADDR"
export STELLWERK_SMTP_ADDR="$SMTP_ADDR"
export STELLWERK_LOG_FORMAT=json
export STELLWERK_ADMIN_TOKEN="demo-admin-token"
# Signed webhooks, as in production: the daemon checks and loadgen signs with the same secrets.
export STELLWERK_SOURCES_SECRETS='{"discourse": "demo-discourse-secret", "whatsapp": "demo-meta-secret", "rocketchat": "demo-rocketchat-token"}'

./scripts/services.sh

source scripts/lib/daemon.sh

# Leave nothing behind, however the demo ends: stop the daemon, remove the demo's keys and the
# broker session its ingress keeps (seven days otherwise), so a second run, or another daemon
# on the same Redis and broker, starts from the same clean state.
demo_cleanup() {
  stop_daemon
  if wipe_key_prefix && drop_broker_session; then
    echo "demo: removed the Redis keys ${STELLWERK_KEY_PREFIX}* and the broker session $STELLWERK_MQTT_CLIENT_ID"
  else
    echo "demo: cleanup failed; remove the keys ${STELLWERK_KEY_PREFIX}* and the broker session $STELLWERK_MQTT_CLIENT_ID by hand" >&2
  fi
}
trap demo_cleanup EXIT
trap 'exit 130' INT TERM

wipe_key_prefix
start_daemon demo
echo "demo: daemon ready (pid $DAEMON), HTTP http://$HTTP_ADDR, SMTP $SMTP_ADDR, log $WORK/daemon.log"
echo "demo: loadgen for ${DURATION}s at ${RATE} contacts/s with the agents of config/routing.yaml"

status=0
"$BIN/stellwerk" loadgen --config config/stellwerk.yaml --rate "$RATE" --duration "$DURATION" \
  --grace 15 || status=$?

echo
echo "demo: metrics at http://$HTTP_ADDR/metrics (queues: http://$HTTP_ADDR/v1/queues), e.g.:"
"$BIN/python" - "$HTTP_ADDR" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
wanted = ("stellwerk_contacts_routed_total", "stellwerk_offers_total", "stellwerk_service_level_ratio",
          "stellwerk_queue_waiting", "stellwerk_contacts_abandoned_total",
          "stellwerk_contacts_answered_by_crowd_total", "stellwerk_journal_lag_entries")
shown = [l for l in text.splitlines() if l.startswith(wanted) and not l.endswith(" 0.0")]
print("\n".join("  " + l for l in shown[:25]))
EOF

if [ "${DEMO_KEEP:-}" = 1 ]; then
  echo "demo: the daemon keeps running (pid $DAEMON); Ctrl-C stops it"
  wait "$DAEMON" || true
fi
exit "$status"
