#!/usr/bin/env bash
# The Stellwerk demo: start the daemon against the local Redis and Mosquitto (a demo key and topic
# prefix of its own, wiped first), drive it with `stellwerk loadgen` for about a minute (calls over
# MQTT, mail over SMTP, signed chat and community webhooks, 20 simulated agents), print the report
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

# ---- the agent desktop (/desk) and the wallboard (/wall), docs/desk.md ----------------------
# The demo routing is config/routing.yaml plus one agent, "demo", that loadgen's simulated agents
# leave alone, so a person can sign in at /desk and take contacts by hand while loadgen runs.
DESK_AGENT=demo
DESK_TOKEN=${DEMO_DESK_TOKEN:-demo-desk-token}
WALL_TOKEN=${DEMO_WALL_TOKEN:-demo-wall-token}
SIM_AGENTS=$("$BIN/python" - "$WORK/routing.yaml" "$DESK_AGENT" <<'PY'
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
export STELLWERK_ROUTING="$WORK/routing.yaml"
STELLWERK_AUTH_TOKENS=$("$BIN/python" - "$DESK_AGENT" "$DESK_TOKEN" "$WALL_TOKEN" <<'PY'
import json, sys
from router.daemon.auth import hash_token
agent, desk, wall = sys.argv[1:4]
print(json.dumps([
    {"name": f"agent:{agent}", "role": "agent", "agent_id": agent, "sha256": hash_token(desk)},
    {"name": "demo-wall", "role": "supervisor", "sha256": hash_token(wall)},
]))
PY
)
export STELLWERK_AUTH_TOKENS
DESK_LOADGEN_ARGS=(--routing "$WORK/routing.yaml" --agents "$SIM_AGENTS")
# ---- end of the desk's part --------------------------------------------------------------

source scripts/lib/daemon.sh
wipe_key_prefix
start_daemon demo
echo "demo: daemon ready (pid $DAEMON), HTTP http://$HTTP_ADDR, SMTP $SMTP_ADDR, log $WORK/daemon.log"
echo "demo: loadgen for ${DURATION}s at ${RATE} contacts/s with the agents of config/routing.yaml"
echo "demo: wallboard  http://$HTTP_ADDR/wall  (supervisor token: $WALL_TOKEN)"
echo "demo: agent desk http://$HTTP_ADDR/desk  (agent id: $DESK_AGENT, token: $DESK_TOKEN)"
echo "demo: sign in, press Go available and take a contact; DEMO_KEEP=1 keeps the daemon afterwards"

status=0
"$BIN/stellwerk" loadgen --config config/stellwerk.yaml --rate "$RATE" --duration "$DURATION" \
  --grace 15 "${DESK_LOADGEN_ARGS[@]}" || status=$?

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
