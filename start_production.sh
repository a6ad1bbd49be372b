#!/usr/bin/env bash
# Start the API under gunicorn. Settings: config.yaml's serve section, overridden by the environment
# or .env (.env.example lists the named variables: PORT, MODEL_PATH, API_KEYS, ...).
# Example: PORT=8080 API_KEYS=secret bash start_production.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# preflight: the packages and the machine, then the model to serve and the port
mkdir -p logs
"$PY" verify_setup.py --quick --serving > logs/verify_setup.txt 2>&1 || { cat logs/verify_setup.txt; echo "verify_setup.py failed: fix the FAIL lines above" >&2; exit 1; }
"$PY" deploy_with_limits.py --check

read -r URL LOGS < <("$PY" -c "from common.config import load_config; c = load_config(); \
print(f'http://{c.serve.host}:{c.serve.port}', c.resolve(c.logging.dir))")
echo "starting gunicorn on $URL (logs: $LOGS/serve.jsonl, $LOGS/gunicorn-*.log); health: $URL/health"
exec "$PY" -m gunicorn -c gunicorn.conf.py
