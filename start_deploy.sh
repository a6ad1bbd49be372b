#!/usr/bin/env bash
# Development server: Flask's own, threaded, DEBUG logging, same app and limits. Not for production:
# use start_production.sh (gunicorn) there. Example: PORT=8001 bash start_deploy.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export LOG_LEVEL=${LOG_LEVEL:-DEBUG}
exec "$PY" deploy_with_limits.py --dev "$@"
