#!/usr/bin/env bash
# Start the API under gunicorn. Settings: config.yaml's serve section, overridden by the environment
# or .env (.env.example lists the named variables: PORT, MODEL_PATH, API_KEYS, ...).
#   bash start_production.sh                  # gunicorn on serve.host:serve.port
#   FRONT=nginx bash start_production.sh      # (serve.front) nginx on serve.host:serve.port, gunicorn behind it
#                                             # on a unix socket: slow or idle clients cannot tie up its threads
# Example: PORT=8080 API_KEYS=secret FRONT=nginx bash start_production.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# preflight: the packages and the machine, then the model to serve and the port
mkdir -p logs
"$PY" verify_setup.py --quick --serving > logs/verify_setup.txt 2>&1 || { cat logs/verify_setup.txt; echo "verify_setup.py failed: fix the FAIL lines above" >&2; exit 1; }
"$PY" deploy_with_limits.py --check

read -r HOST PORT FRONT LOGS BODY TIMEOUT < <("$PY" -c "from common.config import load_config; c = load_config(); \
s = c.serve; print(s.host, s.port, s.front, c.resolve(c.logging.dir), s.max_body_bytes + 65536, int(s.request_timeout_s) + 60)")
URL="http://$HOST:$PORT"

if [ "$FRONT" = none ]; then
  case "$HOST" in
    127.*|localhost|::1) ;;
    *) echo "note: gunicorn faces clients on $HOST directly: slow or idle clients can hold its threads;" \
            "FRONT=nginx puts nginx in front (docs/serving.md, \"Slow clients\")" >&2 ;;
  esac
  echo "starting gunicorn on $URL (logs: $LOGS/serve.jsonl, $LOGS/gunicorn-*.log); health: $URL/health"
  exec "$PY" -m gunicorn -c gunicorn.conf.py
fi

# nginx listens where gunicorn would; gunicorn takes a unix socket in logs/nginx/ instead, and trusts
# the one X-Forwarded-For hop nginx appends (unless the environment says how many proxies there are)
RUN="$LOGS/nginx"
mkdir -p "$RUN"
SOCK="$RUN/gunicorn.sock"
# started as root, nginx's workers would run as nobody, who may not reach logs/: run them as its owner
USER_LINE=""
[ "$(id -u)" != 0 ] || USER_LINE="user $(stat -c %U "$LOGS");"
sed -e "s|__LISTEN__|$HOST:$PORT|" -e "s|__BACKEND__|unix:$SOCK|" -e "s|__RUN__|$RUN|g" -e "s|__USER__|$USER_LINE|" \
    -e "s|__BODY__|$BODY|" -e "s|__READ_TIMEOUT__|${TIMEOUT}s|" deploy/nginx-qwen.conf > "$RUN/nginx.conf"
nginx -t -q -p "$RUN" -c "$RUN/nginx.conf"
[ -n "${TRUSTED_PROXIES:-}${QWEN_SERVE_TRUSTED_PROXIES:-}" ] || export TRUSTED_PROXIES=1

"$PY" -m gunicorn -c gunicorn.conf.py --bind "unix:$SOCK" &
GUNICORN=$!
nginx -p "$RUN" -c "$RUN/nginx.conf" -g "daemon off;" &
NGINX=$!
echo "starting nginx on $URL -> gunicorn on $SOCK (logs: $LOGS/serve.jsonl, $RUN/); health: $URL/health"

# SIGTERM/SIGINT: gunicorn drains first (nginx keeps answering meanwhile), then nginx stops
stop() { kill -TERM "$GUNICORN" 2>/dev/null || true; }
trap stop TERM INT
status=0
while kill -0 "$GUNICORN" 2>/dev/null && kill -0 "$NGINX" 2>/dev/null; do
  wait -n "$GUNICORN" "$NGINX" || true
done
if kill -0 "$GUNICORN" 2>/dev/null; then  # nginx died on its own: take gunicorn down with it
  echo "nginx exited; stopping gunicorn" >&2
  kill -TERM "$GUNICORN"
fi
wait "$GUNICORN" || status=$?
kill -QUIT "$NGINX" 2>/dev/null || true
wait "$NGINX" 2>/dev/null || true
exit "$status"
