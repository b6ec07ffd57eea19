#!/usr/bin/env bash
# The Stellwerk demo, with authentication on: `stellwerk broker-config` generates MQTT accounts,
# ACLs and HTTP tokens into a temp dir; a private Mosquitto on a free port runs with them (no
# anonymous access; the shared broker on 1883 is left alone); the daemon starts against it and the
# local Redis (a demo key and topic prefix of its own, wiped first); `stellwerk loadgen` drives it
# for about a minute as a real site would: the telephony bridge, 22 simulated agents and a
# wallboard, each with its own account (calls over MQTT, mail over SMTP, signed chat and community
# webhooks). It prints the report and a few live metrics, shows an anonymous client and a request
# without a token being refused, then stops the daemon (SIGTERM: graceful hand-over) and the broker.
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
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
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

./scripts/services.sh   # the local Redis (and the anonymous loopback broker of the tests, unused here)

# ---- the agent desktop (/desk) and the wallboard (/wall), docs/desk.md ----------------------
# The demo routing is config/routing.yaml plus one agent, "demo", that loadgen's simulated agents
# leave alone, so a person can sign in at /desk and take contacts by hand while loadgen runs.
# broker-config below issues its token like every other agent's.
DESK_AGENT=demo
ROUTING="$WORK/routing.yaml"
SIM_AGENTS=$("$BIN/python" - "$ROUTING" "$DESK_AGENT" <<'PY'
import sys
from pathlib import Path
import yaml
out, agent = Path(sys.argv[1]), sys.argv[2]
data = yaml.safe_load(Path("config/routing.yaml").read_text(encoding="utf-8"))
data["experts_file"] = str(Path("config", data["experts_file"]).resolve())
skills = {s: 3 for s in data["skills"]} | {"de": 5, "en": 4}
# No phone: a person at a laptop takes chats, mails and community posts.
data["agents"].append({"id": agent, "name": "Demo Agent", "skills": skills,
                       "capacity": {"phone": 0, "chat": 3, "email": 5, "social": 5}})
out.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
print(len(data["agents"]) - 1)  # loadgen simulates the agents before it, never this one
PY
)
export STELLWERK_ROUTING="$ROUTING"
DESK_LOADGEN_ARGS=(--routing "$ROUTING" --agents "$SIM_AGENTS")
# ---- end of the desk's part --------------------------------------------------------------

# 1. Credentials: MQTT accounts + ACLs for Mosquitto, HTTP tokens (hashed) for the daemon.
"$BIN/stellwerk" broker-config --routing "$ROUTING" --out "$WORK/broker" \
  --topic-prefix "$STELLWERK_TOPIC_PREFIX"

# 2. A private broker with them, configured like config/mosquitto.conf.
MQTT_PORT=$("$BIN/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
{
  # As root, mosquitto would drop to user "mosquitto", who cannot read the 0700 credentials dir.
  if [ "$(id -u)" = 0 ]; then echo "user $(id -un)"; fi
  echo "listener $MQTT_PORT 127.0.0.1"
  cat "$WORK/broker/mosquitto-auth.conf"
  echo "persistence true"
  echo "persistence_location $WORK/"
  echo "autosave_interval 1"
  echo "set_tcp_nodelay true"
  echo "max_queued_messages 1000000"
  echo "max_queued_bytes 0"
  echo "log_dest file $WORK/mosquitto.log"
} >"$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" &
BROKER=$!
for _ in $(seq 50); do
  if "$BIN/python" -c "import socket; socket.create_connection(('127.0.0.1', $MQTT_PORT), 1)" 2>/dev/null; then
    break
  fi
  sleep 0.1
done

# 3. The daemon with its own account (STELLWERK_MQTT_USERNAME/PASSWORD) and the tokens file.
set -a
# shellcheck disable=SC1091
. "$WORK/broker/daemon.env"
set +a
export STELLWERK_MQTT_URL="mqtt://127.0.0.1:$MQTT_PORT"
SUPERVISOR_TOKEN=$("$BIN/python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['http']['supervisor'])" "$WORK/broker/credentials.yaml")

source scripts/lib/daemon.sh
# Leave nothing behind, however the demo ends: stop the daemon and the private broker (its
# sessions and persistence live in the temp dir; its credentials go, the logs stay) and remove
# the demo's Redis keys, so a second run, or another daemon on the same Redis, starts
# from the same clean state.
demo_cleanup() {
  stop_daemon
  kill -TERM "$BROKER" 2>/dev/null || true
  wait "$BROKER" 2>/dev/null || true
  if wipe_key_prefix; then
    echo "demo: removed the Redis keys ${STELLWERK_KEY_PREFIX}* and the demo's credentials; logs in $WORK"
  else
    echo "demo: cleanup failed; remove the Redis keys ${STELLWERK_KEY_PREFIX}* by hand" >&2
  fi
  rm -rf "$WORK/broker"
}
trap demo_cleanup EXIT
trap 'exit 130' INT TERM
wipe_key_prefix
start_daemon demo
echo "demo: daemon ready (pid $DAEMON), HTTP http://$HTTP_ADDR, SMTP $SMTP_ADDR, log $WORK/daemon.log"
echo "demo: broker 127.0.0.1:$MQTT_PORT, accounts and ACLs only; secrets in $WORK/broker/credentials.yaml"
echo "demo: loadgen for ${DURATION}s at ${RATE} contacts/s with the agents of config/routing.yaml"
DESK_TOKEN=$("$BIN/python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['http']['agent:' + sys.argv[2]])" "$WORK/broker/credentials.yaml" "$DESK_AGENT")
echo "demo: wallboard  http://$HTTP_ADDR/wall  (supervisor token: $SUPERVISOR_TOKEN)"
echo "demo: agent desk http://$HTTP_ADDR/desk  (agent id: $DESK_AGENT, token: $DESK_TOKEN)"
echo "demo: sign in, press Go available and take a contact; DEMO_KEEP=1 keeps the daemon afterwards"

status=0
"$BIN/stellwerk" loadgen --config config/stellwerk.yaml --rate "$RATE" --duration "$DURATION" \
  --grace 15 --credentials "$WORK/broker/credentials.yaml" "${DESK_LOADGEN_ARGS[@]}" || status=$?

echo
echo "demo: an anonymous MQTT client, and /v1/queues without a token:"
"$BIN/python" - "$MQTT_PORT" "$HTTP_ADDR" "$SUPERVISOR_TOKEN" <<'EOF'
import asyncio, json, sys, urllib.error, urllib.request
import aiomqtt

async def anonymous() -> str:
    try:
        async with aiomqtt.Client("127.0.0.1", int(sys.argv[1]), timeout=3):
            return "connected (unexpected!)"
    except aiomqtt.MqttError as exc:
        return f"refused by the broker ({exc})"

print("  anonymous MQTT client:", asyncio.run(anonymous()))
url = f"http://{sys.argv[2]}/v1/queues"
try:
    urllib.request.urlopen(url, timeout=5)
    print("  /v1/queues without a token: answered (unexpected!)")
except urllib.error.HTTPError as exc:
    print(f"  /v1/queues without a token: HTTP {exc.code}")
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {sys.argv[3]}"})
queues = json.load(urllib.request.urlopen(req, timeout=5))["queues"]
print("  /v1/queues with the supervisor token: " + ", ".join(f"{q['name']} {q['waiting']} waiting" for q in queues))
EOF

echo
echo "demo: metrics at http://$HTTP_ADDR/metrics (open by default; auth.metrics: supervisor closes it), e.g.:"
"$BIN/python" - "$HTTP_ADDR" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
wanted = ("stellwerk_contacts_routed_total", "stellwerk_offers_total", "stellwerk_service_level_ratio",
          "stellwerk_queue_waiting", "stellwerk_contacts_abandoned_total",
          "stellwerk_contacts_answered_by_crowd_total", "stellwerk_journal_lag_entries",
          "stellwerk_auth_refused_total")
shown = [l for l in text.splitlines() if l.startswith(wanted) and not l.endswith(" 0.0")]
print("\n".join("  " + l for l in shown[:25]))
EOF

if [ "${DEMO_KEEP:-}" = 1 ]; then
  echo "demo: the daemon keeps running (pid $DAEMON); Ctrl-C stops it"
  wait "$DAEMON" || true
fi
exit "$status"
