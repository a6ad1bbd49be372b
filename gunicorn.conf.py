"""gunicorn settings, derived from config.yaml's serve section (and env: PORT, HOST, WORKERS, ...).

No preload: each worker imports the app and loads the model itself after the fork, so the master
never touches torch or CUDA.
"""
import signal
import threading

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
    """SIGTERM drains before gunicorn stops: admission stops at once (what waits gets 503 'draining',
    /health 503) while the worker keeps answering; the running generations get the grace period,
    less a margin to write the last responses; then gunicorn's own graceful exit runs."""
    serving = worker.wsgi.extensions["qwen"]
    stop = worker.handle_exit
    grace = max(_s.graceful_timeout_s - 2.0, _s.graceful_timeout_s / 2)

    def finish_then_stop(sig):
        serving.finish_running(grace)
        stop(sig, None)

    def drain_then_exit(sig, frame):
        if not serving.draining:
            serving.drain()
            threading.Thread(target=finish_then_stop, args=(sig,), name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, drain_then_exit)
