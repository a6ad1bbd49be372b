"""What the measuring scripts share (benchmark.py, measure_shape.py, test_api.py): the machine's name,
percentiles (the service's /stats ranks its latencies with the same rule), running jobs from N clients at
once, and the service as a measurement sees it: started by start_production.sh, streamed from, idle."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.config import ROOT, UserError


def machine() -> str:
    """The CPU model and core count (and the GPU, when there is one): every figure names its machine."""
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores{gpu_name()}"


def gpu_name() -> str:
    """", <GPU model>" from nvidia-smi, or "": asking torch would open a CUDA context in this process, and
    a client's context on the server's card would count in the server's measured memory."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return f", {names[0]}" if names else ""


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile by nearest rank (NaN for no data): the one rule for every figure the toolkit
    reports, from benchmark.py's p95 to the service's /stats."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def quantiles(xs: list[float], qs=(0.5, 0.95)) -> dict:
    """{"p50": ..., "p95": ...} of xs, rounded, by percentile(); None when there is nothing to rank."""
    return {f"p{round(q * 100)}": round(percentile(xs, q), 4) if xs else None for q in qs}


def timed_pool(fn, jobs: list, concurrency: int) -> tuple[list, float]:
    """fn over jobs from `concurrency` clients at once: (results in order, wall seconds)."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(fn, jobs))
    return out, time.perf_counter() - t0


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a measurement or test starts)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- a served model, measured
def start_server(model_dir: Path, logs: Path, env: dict[str, str], load_timeout_s: float = 900):
    """start_production.sh for `model_dir` on a free local port, rate limits out of the way, QWEN_* from
    this process left out (`env` sets what the measurement wants); waits for /health. (process, url)."""
    import requests
    port = free_port()
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("QWEN_")}, "PORT": str(port),
            "HOST": "127.0.0.1", "MODEL_PATH": str(model_dir), "LOGS_DIR": str(logs), "PYTHON": sys.executable,
            "QWEN_SERVE_RATE_LIMITS": "100000/minute", "QWEN_SERVE_GLOBAL_RATE_LIMIT": "100000/minute", **env}
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "server.txt", "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(["bash", str(ROOT / "start_production.sh")], cwd=ROOT, env=full, stdout=out,
                                stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + load_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited: see {logs / 'server.txt'}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(proc)
    raise UserError(f"the server did not load within {load_timeout_s:.0f} s: see {logs / 'server.txt'}")


def stop_server(proc: subprocess.Popen, grace_s: float = 120) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not gone within grace_s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Stream:
    """One streamed chat request exactly `new_tokens` tokens long (ignore_eos), read in its own thread:
    when it was sent, when its first content came, when it ended and how (error None: it finished; else
    the server's code, http_<status>, or 'cancelled'). cancel() hangs up at the next chunk, as a client
    that leaves does; a request still waiting for a slot sends no chunk, so it hangs up once admitted."""

    def __init__(self, url: str, messages: list[dict], new_tokens: int):
        self.body = {"messages": messages, "max_tokens": new_tokens, "ignore_eos": True, "stream": True,
                     "temperature": 0}
        self.url, self.new_tokens, self.cancelled = url, new_tokens, False
        self.sent = self.first = self.ended = self.error = None
        self.started = threading.Event()  # set at the first content, or at the end if none came
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Stream":
        self.sent = time.perf_counter()
        self.thread.start()
        return self

    def _run(self) -> None:
        import requests
        try:
            with requests.post(self.url + "/v1/chat/completions", json=self.body, stream=True, timeout=1800) as r:
                if r.status_code != 200:
                    self.error = f"http_{r.status_code}"
                    return
                for line in r.iter_lines(decode_unicode=True):
                    if self.cancelled:
                        self.error = "cancelled"
                        return
                    if self.first is None and line.startswith("data: ") and '"content"' in line \
                            and '"role"' not in line:
                        self.first = time.perf_counter()
                        self.started.set()
                    if line.startswith("data: {") and '"error"' in line:
                        self.error = json.loads(line[6:])["error"].get("code") or "error"
            self.error = self.error or (None if self.first else "no_content")
        except (requests.RequestException, ValueError) as e:
            self.error = self.error or type(e).__name__
        finally:
            self.ended = time.perf_counter()
            self.started.set()

    def cancel(self) -> None:
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> "Stream":
        self.thread.join(timeout)
        return self

    def ttft(self) -> float | None:
        return None if self.first is None else round(self.first - self.sent, 3)

    def decode_rate(self) -> float | None:
        """Tokens/s after the first token, of a stream that ran to its end."""
        if self.error or self.first is None or self.ended is None:
            return None
        return (self.new_tokens - 1) / max(self.ended - self.first, 1e-9)


def streams_at_once(url: str, messages: list[dict], new_tokens: int, n: int) -> list[Stream]:
    """n identical streams sent together, each run to its end."""
    streams = [Stream(url, messages, new_tokens).start() for _ in range(n)]
    return [s.wait() for s in streams]


def admission(url: str, messages: list[dict], new_tokens: int, n: int = 3) -> dict:
    """n requests of the prompt + new_tokens sent together: each one's time to first token, and whether all
    reached it before any ended (the KV budget admitted them at once); then all are cancelled."""
    streams = [Stream(url, messages, new_tokens).start() for _ in range(n)]
    for s in streams:
        s.started.wait(900)
    for s in streams:
        s.cancel()
    firsts = [s.first for s in streams]
    ended = [s.ended for s in streams if s.ended is not None and s.error != "cancelled" and s.first is not None]
    at_once = sum(f is not None and f < min(ended, default=float("inf")) for f in firsts)
    for s in streams:
        s.wait(120)
    return {"requests": n, "admitted_at_once": at_once, "ttft_s": [s.ttft() for s in streams],
            "refused": [s.error for s in streams if s.error not in (None, "cancelled")]}


def run_benchmark(arguments: list[str], env: dict, out: Path, name: str) -> dict:
    """benchmark.py as a child (this process's QWEN_* left out, `env` set), its log in out/<name>.txt: its
    runs keyed by classification way ('bare' for --bare), or {"error": the last line it printed}."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *arguments, "--json", str(out / f"{name}.json")],
                          cwd=ROOT, env={**{k: v for k, v in os.environ.items() if not k.startswith("QWEN_")}, **env},
                          capture_output=True, text=True)
    (out / f"{name}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {r.get("way", "bare"): r for r in json.loads((out / f"{name}.json").read_text())["runs"]}


def wait_idle(url: str, timeout_s: float = 120) -> bool:
    """Until /stats shows nothing admitted (a cancelled generation has left its slot); False on timeout."""
    import requests
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            engine = requests.get(url + "/stats", timeout=10).json().get("engine") or {}
            if engine.get("admitted", 0) == 0:
                return True
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    return False
