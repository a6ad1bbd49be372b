"""gunicorn settings, derived from config.yaml's serve section (and env: PORT, HOST, WORKERS, ...).

No preload: each worker imports the app and loads the model itself after the fork, so the master
never touches torch or CUDA.
"""
import signal

from common.config import load_config

_cfg = load_config()
_s = _cfg.serve

wsgi_app = "deploy_with_limits:create_app()"
bind = f"{_s.host}:{_s.port}"
workers = _s.workers
worker_class = "gthread"
# a thread for every request that may be in flight or waiting, plus a few for /health and /stats
threads = _s.max_concurrent + _s.max_queue + 4
timeout = int(_s.request_timeout_s + 60)       # a worker is killed only well past the request deadline
graceful_timeout = int(_s.graceful_timeout_s)
keepalive = 5
_logs = _cfg.resolve(_cfg.logging.dir)
_logs.mkdir(parents=True, exist_ok=True)
accesslog = str(_logs / "gunicorn-access.log")
errorlog = str(_logs / "gunicorn-error.log")
loglevel = _cfg.logging.level.lower()
proc_name = "qwen-serve"


def post_worker_init(worker):
    """On SIGTERM, first stop admitting (503 and /health 503), then let gunicorn finish in-flight work."""
    state = worker.wsgi.extensions["qwen"]
    stop = worker.handle_exit

    def drain_then_exit(sig, frame):
        state.drain()
        stop(sig, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)
