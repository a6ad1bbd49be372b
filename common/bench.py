"""What the measuring scripts share (benchmark.py, measure_shape.py, test_api.py): the machine's name,
percentiles (the service's /stats ranks its latencies with the same rule), and running jobs from N
clients at once."""
from __future__ import annotations

import concurrent.futures as cf
import os
import platform
import time


def machine() -> str:
    """The CPU model and core count (and the GPU, when there is one): every figure names its machine."""
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    except ImportError:
        gpu = ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


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
