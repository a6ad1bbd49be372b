"""Monitoring for the service: what /health, /stats and /metrics report, one Stats per worker.

The three endpoints are module-level views over the worker's ServerState (app.extensions["qwen"]);
deploy_with_limits.py's route table registers them with the rest.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque


class Stats:
    """What /stats and /metrics report: outcomes, rejections, latency, tokens, memory."""

    def __init__(self, load, kv):
        """`load()` gives (in flight, waiting) now, `kv()` (KV tokens reserved, budget): for the gauges."""
        from prometheus_client import CollectorRegistry, Gauge, Histogram
        from prometheus_client import Counter as PCounter
        self.started = time.time()
        self.lock = threading.Lock()
        self.outcomes, self.rejections = Counter(), Counter()
        self.latencies: deque[float] = deque(maxlen=4096)
        self.token_log: deque[tuple[float, int]] = deque()       # (time, completion tokens) for tokens/s
        self.tokens_in = self.tokens_out = 0
        self.registry = CollectorRegistry()
        self.p_requests = PCounter("qwen_requests", "requests by endpoint and outcome", ["endpoint", "outcome"],
                                   registry=self.registry)
        self.p_latency = Histogram("qwen_request_seconds", "latency of answered requests", ["endpoint"],
                                   registry=self.registry, buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 120))
        self.p_tokens = PCounter("qwen_tokens", "tokens processed", ["kind"], registry=self.registry)
        Gauge("qwen_in_flight", "generations running", registry=self.registry).set_function(lambda: load()[0])
        Gauge("qwen_queue", "requests waiting for a slot", registry=self.registry).set_function(lambda: load()[1])
        Gauge("qwen_kv_tokens_reserved", "KV-cache tokens the running batch may reach",
              registry=self.registry).set_function(lambda: kv()[0])
        Gauge("qwen_kv_budget_tokens", "KV-cache tokens the engine may reserve",
              registry=self.registry).set_function(lambda: kv()[1])
        self.load, self.kv = load, kv

    def record(self, endpoint: str, outcome: str, seconds: float, tokens_in: int = 0, tokens_out: int = 0) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome != "ok":
                self.rejections[outcome] += 1
            else:
                self.latencies.append(seconds)
                self.p_latency.labels(endpoint).observe(seconds)
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self.token_log.append((time.time(), tokens_out))
        self.p_requests.labels(endpoint, outcome).inc()
        self.p_tokens.labels("prompt").inc(tokens_in)
        self.p_tokens.labels("completion").inc(tokens_out)

    def percentiles(self) -> dict:
        with self.lock:
            xs = sorted(self.latencies)
        pick = (lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)) if xs else (lambda q: None)
        return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "count": len(xs)}

    def tokens_per_second(self, window: float = 60.0) -> float:
        now = time.time()
        with self.lock:
            while self.token_log and self.token_log[0][0] < now - window:
                self.token_log.popleft()
            total = sum(n for _, n in self.token_log)
        return round(total / min(window, max(now - self.started, 1e-9)), 2)


WORKER_ID = os.urandom(4).hex()  # tells workers apart in /stats without naming a process id


def engine_report(engine, serve) -> dict:
    """The engine's own accounting: what it holds, and how its passes went."""
    if engine is None:
        return {}
    with engine.wake:
        admitted, waiting, running = engine.admitted, len(engine.pending), len(engine.rows)
    from common.memory import effective_concurrency
    runs, why = effective_concurrency(engine.kv_budget, serve)
    return {"admitted": admitted, "waiting": waiting, "running": running, "effective_concurrency": runs,
            "concurrency_set_by": why, "kv_budget_tokens": engine.kv_budget,
            "kv_tokens_reserved": engine.kv_in_use(), "peak_kv_tokens_reserved": engine.peak_kv_reserved,
            "peak_running": engine.peak_rows, "max_prefill_tokens": engine.max_prefill_tokens,
            "failed_passes": engine.failures,
            "consecutive_failures": engine.consecutive_failures, "last_failure": engine.last_failure,
            "accounting_errors": engine.accounting_errors, "health": engine.health() or "ok"}


def memory_report() -> dict:
    import torch
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"device": torch.cuda.get_device_name(0), "used_gib": round((total - free) / 1024**3, 2),
                "total_gib": round(total / 1024**3, 2), "allocated_gib": round(torch.cuda.memory_allocated() / 1024**3, 2)}
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"device": "cpu", "rss_gib": round(rss / 1024**3, 2)}


def _state():
    from flask import current_app
    return current_app.extensions["qwen"]


def health():
    """200 when the model is loaded and the engine works; 503 with the reason while loading, after a
    load error, while draining, or after repeated engine failures."""
    from flask import jsonify
    state = _state()
    problem = state.engine.health() if state.engine else None
    if state.ready() and problem is None:
        return jsonify({"status": "ok", "model": state.name})
    status = "draining" if state.draining else "error" if state.error else "degraded" if problem else "loading"
    return jsonify({"status": status, "model": state.name, "error": state.error or problem}), 503


def stats():
    from flask import jsonify
    state = _state()
    s, st = state.cfg.serve, state.stats
    with st.lock:
        outcomes, rejections = dict(st.outcomes), dict(st.rejections)
    in_flight, waiting = st.load()
    engine = state.engine
    return jsonify({  # names, never absolute paths: /stats may be readable by more people than the box is
        "model": state.name, "model_dir": state.model_dir.name, "adapter": state.adapter.name if state.adapter else None,
        "status": "ok" if state.ready() else "unavailable", "uptime_s": round(time.time() - st.started, 1),
        "requests": {"total": sum(outcomes.values()), "by_outcome": outcomes}, "rejections": rejections,
        "in_flight": in_flight, "queue": waiting,
        "peak_admitted": engine.peak_admitted if engine else 0, "latency_s": st.percentiles(),
        "tokens": {"prompt": st.tokens_in, "completion": st.tokens_out,
                   "completion_per_s_last_minute": st.tokens_per_second()},
        "engine": engine_report(engine, s), "memory": memory_report(), "worker": WORKER_ID,
        "limits": {k: getattr(s, k) for k in ("max_concurrent", "max_queue", "max_queue_wait_s",
                                              "request_timeout_s", "max_tokens", "max_prompt_tokens",
                                              "max_body_bytes", "rate_limits", "global_rate_limit")},
    })


def metrics():
    from flask import Response
    from prometheus_client import generate_latest
    return Response(generate_latest(_state().stats.registry), mimetype="text/plain; version=0.0.4")
