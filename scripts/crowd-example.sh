#!/usr/bin/env bash
# The crowd service, worked example (docs/crowd.md): start the daemon with the example routing
# (config/routing.yaml + config/experts.csv, crowd window shortened to CROWD_WINDOW seconds), then
#   1. a community topic that champion Heinz Fischer answers within the window -> answered_by_crowd,
#      never offered to an agent, Heinz's answers +1;
#   2. a topic nobody answers -> offered to the community desk when the window ends;
#   3. a billing question -> community desk at once (personal data: no crowd wait);
#   4. a new expert registered through the admin API (PUT /v1/experts/x-nneu);
# and print the events, `stellwerk experts report` and the crowd metrics. Takes ~15 s.
#
#   ./scripts/crowd-example.sh
#   CROWD_WINDOW=10 CROWD_HTTP_ADDR=127.0.0.1:8282 ./scripts/crowd-example.sh
#   CROWD_KEEP=1 ./scripts/crowd-example.sh     # keep the daemon running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
WINDOW=${CROWD_WINDOW:-5}
HTTP_ADDR=${CROWD_HTTP_ADDR:-127.0.0.1:8181}
WORK=$(mktemp -d /tmp/stellwerk-crowd.XXXXXX)

export STELLWERK_KEY_PREFIX="stellwerk-crowd-example:"
export STELLWERK_TOPIC_PREFIX="stellwerk-crowd-example"
export STELLWERK_MQTT_CLIENT_ID="stellwerk-crowd-example-daemon"
export STELLWERK_HTTP_ADDR="$HTTP_ADDR"
export STELLWERK_SMTP_ADDR=""
export STELLWERK_LOG_FORMAT=json
export STELLWERK_ADMIN_TOKEN="crowd-example-admin-token"
export STELLWERK_SECRET_DISCOURSE="crowd-example-discourse-secret"
export STELLWERK_ROUTING="$WORK/routing.yaml"

# The example routing, with a crowd window of WINDOW seconds instead of 30 minutes.
sed -e "s/crowd_first: 1800/crowd_first: $WINDOW/" \
    -e "s|^experts_file: experts.csv|experts_file: $PWD/config/experts.csv|" \
    config/routing.yaml >"$STELLWERK_ROUTING"
"$BIN/stellwerk" check "$STELLWERK_ROUTING" >/dev/null

./scripts/services.sh >/dev/null

source scripts/lib/daemon.sh
wipe_key_prefix
start_daemon crowd-example
echo "crowd-example: daemon ready (pid $DAEMON), HTTP http://$HTTP_ADDR, crowd window ${WINDOW}s,"
echo "               routing $STELLWERK_ROUTING, log $WORK/daemon.log"
echo

"$BIN/python" - "$HTTP_ADDR" "$WINDOW" <<'EOF'
"""The community's side of the story: Discourse webhooks, an agent desktop, an admin."""
import hashlib, hmac, json, os, sys, threading, time, urllib.request
import paho.mqtt.client as mqtt

addr, window = sys.argv[1], float(sys.argv[2])
base, prefix = f"http://{addr}", os.environ["STELLWERK_TOPIC_PREFIX"]
secret = os.environ["STELLWERK_SECRET_DISCOURSE"].encode()
sample = json.load(open("tests/fixtures/samples/social/discourse-post-created.json"))
start, seen, lock = time.time(), [], threading.Condition()

def on_message(client, userdata, msg):
    with lock:
        seen.append((time.time() - start, msg.topic.removeprefix(prefix + "/"), json.loads(msg.payload)))
        lock.notify_all()

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="crowd-example-desktop")
client.on_message = on_message
client.connect("127.0.0.1", 1883)
client.subscribe([(f"{prefix}/events/#", 1), (f"{prefix}/agents/a16/offers", 1)])
client.loop_start()
time.sleep(0.3)

def wait_for(topic, timeout=window + 5, **match):
    deadline = time.time() + timeout
    with lock:
        while True:
            for _, t, p in seen:
                if t == topic and all(p.get(k) == v for k, v in match.items()):
                    return p
            if not lock.wait(max(0.0, deadline - time.time())):
                sys.exit(f"crowd-example: no {topic} {match} within {timeout}s")

def discourse(topic, number, user, raw, title):
    post = dict(sample["post"], id=topic * 10 + number, topic_id=topic, post_number=number,
                username=user, name=user, display_username=user, raw=raw, topic_title=title,
                cooked=f"<p>{raw}</p>", reply_to_post_number=None if number == 1 else 1,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
    body = json.dumps({"post": post}).encode()
    sig = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(f"{base}/v1/webhooks/discourse", data=body, headers={
        "Content-Type": "application/json", "X-Discourse-Event": "post_created",
        "X-Discourse-Event-Type": "post", "X-Discourse-Event-Signature": sig})
    urllib.request.urlopen(req, timeout=5).read()
    print(f"  +{time.time() - start:5.1f}s  discourse topic {topic} post {number} by {user}: {raw}")

def admin(method, path, body):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method=method,
        headers={"Authorization": "Bearer " + os.environ["STELLWERK_ADMIN_TOKEN"],
                 "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=5))

# The community desk's agent (Paula Hartmann: community and billing) logs in.
client.publish(f"{prefix}/agents/a16/cmd", json.dumps({"op": "login"}), qos=1)
wait_for("events/agent.state", agent_id="a16", state="available")

print("1. A question the crowd answers: champion Heinz Fischer (discourse:heinzf) replies.")
discourse(9001, 1, "kunde_wlan", "Mein WLAN bricht abends ständig ab. Was kann ich tun?", "WLAN instabil")
time.sleep(1.0)
discourse(9001, 2, "heinzf", "Stell den 2,4-GHz-Kanal fest auf 1, 6 oder 11 – dann ist Ruhe.", "WLAN instabil")
done = wait_for("events/contact.answered_by_crowd", contact_id="discourse:9001")
print(f"         -> answered_by_crowd by {done['by']} (expert {done['by_expert']}) after {done['waited']:.1f}s")

print(f"2. A question nobody answers: it waits {window:.0f}s for the crowd, then goes to the community desk.")
discourse(9002, 1, "kunde_tv", "Seit dem Update zeigt mein Receiver kein Bild mehr.", "Receiver ohne Bild")
offer = wait_for("agents/a16/offers", type="offer", contact_id="discourse:9002")
client.publish(f"{prefix}/agents/a16/cmd", json.dumps({"op": "accept", "offer_id": offer["offer_id"]}), qos=1)
got = wait_for("events/contact.assigned", contact_id="discourse:9002")
print(f"         -> offered to a16 in {offer['queue']}, accepted; waited {got['waited']:.1f}s from the post")

print("3. A question that needs personal data skips the crowd window.")
discourse(9003, 1, "kunde_geld", "Auf meiner Rechnung wurde zweimal abgebucht!", "Doppelte Abbuchung")
q = wait_for("events/contact.queued", contact_id="discourse:9003")
print(f"         -> rule {q['rule']}: queued in {q['queue']} at once")

print("4. A new champion is registered through the admin API.")
reply = admin("PUT", "/v1/experts/x-nneu", {"name": "Nora Neu", "level": 1, "skills": ["tv"],
                                             "handles": ["discourse:nora"]})
wait_for("events/expert.updated", expert_id="x-nneu")
print(f"         -> {reply['op']} accepted (journal id {reply['journal_id']})")

time.sleep(0.5)
print("\nEvents published on", prefix + "/events/#:")
for at, topic, p in seen:
    if topic.startswith("events/") and topic != "events/agent.state":
        who = p.get("by") or p.get("agent_id") or p.get("expert_id") or ""
        print(f"  +{at:5.1f}s  {topic[7:]:<28} {p.get('contact_id') or '':<16} "
              f"{p.get('queue') or '':<15} {p.get('rule') or '':<26} {who}")
client.loop_stop()
EOF

echo
echo "\$ stellwerk experts report --url http://$HTTP_ADDR"
"$BIN/stellwerk" experts report --url "http://$HTTP_ADDR"

echo
echo "Crowd metrics (http://$HTTP_ADDR/metrics):"
"$BIN/python" - "$HTTP_ADDR" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
wanted = ("stellwerk_crowd_", "stellwerk_expert_answers_total", "stellwerk_experts",
          "stellwerk_contacts_answered_by_crowd_total", "stellwerk_contacts_crowd_first_total")
print("\n".join("  " + l for l in text.splitlines() if l.startswith(wanted) and "_created" not in l))
EOF

if [ "${CROWD_KEEP:-}" = 1 ]; then
  echo "crowd-example: the daemon keeps running (pid $DAEMON); Ctrl-C stops it"
  wait "$DAEMON" || true
fi
