"""Start the real service (start_production.sh's gunicorn) on a free localhost port for a test."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    logs: Path

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*")) if p.is_file())

    def records(self) -> list[dict]:
        """The JSON lines of logs/serve.jsonl: one per finished request, plus the service's own events."""
        path = self.logs / "serve.jsonl"
        if not path.is_file():
            return []
        whole = path.read_text().split("\n")[:-1]  # a last line without its newline is still being written
        return [json.loads(line) for line in whole if line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(model: Path, logs: Path, conf: str = "gunicorn.conf.py", **env: str) -> Server:
    """gunicorn -c CONF (the real gunicorn.conf.py) with the model and overrides in the environment;
    waits until /health is 200 from every worker (WORKERS of them, each loads its own model after the
    fork, so one can answer while another still says 503 loading)."""
    port = free_port()
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("QWEN_")}, "PORT": str(port),
            "HOST": "127.0.0.1", "MODEL_PATH": str(model), "LOGS_DIR": str(logs), "PYTHONUNBUFFERED": "1",
            **env}
    logs.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", conf], cwd=ROOT, env=full,
                            stdout=open(logs / "stdout.txt", "w"), stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", logs)
    workers, healthy = int(env.get("WORKERS", "1")), set()
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            r = requests.get(server.url + "/health", timeout=1)
            if r.status_code == 200:
                healthy.add(r.headers.get("X-Worker"))
                if len(healthy) >= workers:
                    return server
                time.sleep(0.02)  # the kernel picks which worker accepts: ask again soon
                continue
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{workers - len(healthy)} of {workers} workers did not become healthy:\n"
                       f"{server.log_text()[-3000:]}")
