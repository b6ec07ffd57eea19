# Shared by scripts/demo.sh and scripts/crowd-example.sh: wipe a key prefix, start `stellwerk run`
# in the background, wait for /readyz, stop it on exit, drop its broker session. Source it after setting BIN, WORK,
# HTTP_ADDR and the STELLWERK_* environment.

# Forget the previous run's journal, snapshot and lease (only this key prefix).
wipe_key_prefix() {
  "$BIN/python" - <<'PY'
import os, redis
r = redis.Redis.from_url(os.environ.get("STELLWERK_REDIS_URL", "redis://127.0.0.1:6379/0"))
keys = list(r.scan_iter(match=os.environ["STELLWERK_KEY_PREFIX"] + "*"))
if keys:
    r.delete(*keys)
PY
}

# Make the broker forget the ingress session of the daemon's client id (it keeps it, and queues
# every ingress message for it, for session_expiry seconds: seven days by default). A clean-session
# connect with that id discards it. Settings as the daemon reads them (file + STELLWERK_*).
drop_broker_session() {
  "$BIN/python" - <<'PY'
import asyncio, os
from router.daemon.config import load_settings
from router.daemon.mqtt import make_client

s = load_settings(os.environ.get("STELLWERK_CONFIG") or "config/stellwerk.yaml").settings

async def main() -> None:
    async with make_client(s.mqtt, s.mqtt.identifier(s.topic_prefix), persistent=False):
        pass

asyncio.run(main())
PY
}

stop_daemon() {
  if [ -n "${DAEMON:-}" ] && kill -0 "$DAEMON" 2>/dev/null; then
    kill -TERM "$DAEMON" 2>/dev/null || true
    wait "$DAEMON" 2>/dev/null || true
  fi
}

# start_daemon LABEL: the daemon in the background (pid in DAEMON, log in $WORK/daemon.log),
# stopped with SIGTERM when the script exits (unless the script has an EXIT trap of its own, which
# then calls stop_daemon); returns once /readyz answers 200.
start_daemon() {
  local label=$1 ready=""
  "$BIN/stellwerk" run --config config/stellwerk.yaml >"$WORK/daemon.log" 2>&1 &
  DAEMON=$!
  [ -n "$(trap -p EXIT)" ] || trap stop_daemon EXIT
  for _ in $(seq 100); do
    if "$BIN/python" -c "import urllib.request; urllib.request.urlopen('http://$HTTP_ADDR/readyz', timeout=1)" 2>/dev/null; then
      ready=1
      break
    fi
    kill -0 "$DAEMON" 2>/dev/null || break
    sleep 0.2
  done
  if [ -z "$ready" ]; then
    echo "$label: the daemon did not become ready; its log ($WORK/daemon.log) ends with:" >&2
    tail -n 20 "$WORK/daemon.log" >&2
    exit 1
  fi
}
