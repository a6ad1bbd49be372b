"""gunicorn.conf.py as it is, plus a fault injector for tests: `gunicorn -c tests/faults.conf.py`.

FAULTS_FILE names a JSON file {"id": ..., "prefill": n, "decode": n, "score": n}; once a worker's model
has loaded, its decoder body (which every pass runs) raises on the next n passes of each phase (the
engine's `phase` says which pass is running). Writing the file with a new id arms a new set. Everything
else is the real server.
"""
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("real_conf", Path(__file__).resolve().parent.parent / "gunicorn.conf.py")
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
globals().update({k: v for k, v in vars(_real).items() if not k.startswith("__") and k != "post_worker_init"})


def _arm(serving, path: Path) -> None:
    while serving.engine is None:
        time.sleep(0.05)
    engine = serving.engine
    causal = engine.model.get_base_model() if hasattr(engine.model, "get_base_model") else engine.model
    body, armed = causal.model, {"id": None}
    real = body.forward

    def forward(*args, **kwargs):
        try:
            wanted = json.loads(path.read_text())
        except (OSError, ValueError):
            wanted = {"id": armed.get("id")}  # no file yet (or one being replaced): keep what is armed
        if wanted.get("id") != armed.get("id"):
            armed.clear()
            armed.update(wanted)
        if armed.get(engine.phase, 0) > 0:
            armed[engine.phase] -= 1
            raise RuntimeError(f"injected fault in {engine.phase}")
        return real(*args, **kwargs)

    body.forward = forward


def post_worker_init(worker):
    _real.post_worker_init(worker)
    serving = worker.wsgi.extensions["qwen"]
    threading.Thread(target=_arm, args=(serving, Path(os.environ["FAULTS_FILE"])), daemon=True).start()
