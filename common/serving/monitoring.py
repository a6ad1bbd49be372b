"""Monitoring for the service: what /health, /stats, /metrics and /dashboard report, one Stats per worker.

The endpoints are module-level views that take the worker (common/serving/worker.py) they report on;
deploy_with_limits.py's route table registers them with the rest and passes the worker in. What the
engine holds is read through its own report(), never from its lock or lists. The Prometheus series keep vLLM's
meaning (and its histogram buckets) under our prefix; docs/serving.md maps each to vLLM's and TGI's name.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from common.bench import quantiles

# vLLM's histogram buckets, so its Grafana panels and alert thresholds read the same here
TTFT_BUCKETS = (.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560)
ITL_BUCKETS = (.01, .025, .05, .075, .1, .15, .2, .3, .4, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
REQUEST_BUCKETS = (.3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
WINDOW_S = 60.0  # /stats' "last_minute": what the dashboard plots, like Prometheus' rate(...[1m])


@dataclass
class Event:
    """One finished request, kept for a minute for /stats' last_minute block."""
    at: float
    outcome: str
    seconds: float
    tokens_in: int
    tokens_out: int
    ttft: float | None


class GpuMemory:
    """qwen_gpu_memory_{used,total}_bytes per visible card, where CUDA is present: the whole card, as
    nvidia-smi shows it, so other processes' memory counts too. Read at scrape time."""

    def collect(self):
        import torch
        from prometheus_client.core import GaugeMetricFamily
        if not torch.cuda.is_available():
            return
        used = GaugeMetricFamily("qwen_gpu_memory_used_bytes", "GPU memory in use on the card", labels=["gpu"])
        total = GaugeMetricFamily("qwen_gpu_memory_total_bytes", "GPU memory of the card", labels=["gpu"])
        for i in range(torch.cuda.device_count()):
            free, size = torch.cuda.mem_get_info(i)
            used.add_metric([str(i)], size - free)
            total.add_metric([str(i)], size)
        yield from (used, total)


class Stats:
    """What /stats and /metrics report: outcomes, rejections, latency, tokens, memory."""

    def __init__(self, occupancy, kv):
        """`occupancy()` gives (in flight, waiting) now, `kv()` (KV tokens reserved, budget): for the gauges."""
        from prometheus_client import CollectorRegistry, ProcessCollector
        self.started = time.time()
        self.lock = threading.Lock()
        self.outcomes, self.rejections = Counter(), Counter()
        self.latencies: deque[float] = deque(maxlen=4096)
        self.recent: deque[Event] = deque()  # the last WINDOW_S seconds of finished requests
        self.tokens_in = self.tokens_out = 0
        self.registry = CollectorRegistry()
        self.occupancy, self.kv = occupancy, kv
        self._request_series()
        self._engine_series()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, ...
        self.registry.register(GpuMemory())

    def _request_series(self) -> None:
        """Per request, as it ends: HTTP outcome, finish reason, tokens, and vLLM's four latencies."""
        from prometheus_client import Counter as PCounter
        from prometheus_client import Histogram
        r = self.registry
        self.p_requests = PCounter("qwen_requests", "requests by endpoint and HTTP outcome (ok, rate_limited, "
                                   "queue_full, too_long, unauthorized, timeout, cancelled, ...)",
                                   ["endpoint", "outcome"], registry=r)
        self.p_finished = PCounter("qwen_request_success", "generations by finish reason (stop, length, abort)",
                                   ["finished_reason"], registry=r)
        self.p_prompt = PCounter("qwen_prompt_tokens", "prompt tokens processed", registry=r)
        self.p_generated = PCounter("qwen_generation_tokens", "tokens generated", registry=r)
        self.p_tokens = PCounter("qwen_tokens", "tokens processed (older name: prompt | completion)", ["kind"],
                                 registry=r)
        self.p_latency = Histogram("qwen_request_seconds", "latency of answered requests, any endpoint", ["endpoint"],
                                   registry=r, buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 120))
        self.p_ttft = Histogram("qwen_time_to_first_token_seconds", "arrival to first generated token",
                                registry=r, buckets=TTFT_BUCKETS)
        self.p_itl = Histogram("qwen_inter_token_latency_seconds", "time between successive generated tokens",
                               registry=r, buckets=ITL_BUCKETS)
        self.p_e2e = Histogram("qwen_e2e_request_latency_seconds", "arrival to the whole answer, of generations "
                               "that finished (stop or length)", registry=r, buckets=REQUEST_BUCKETS)
        self.p_queue = Histogram("qwen_request_queue_time_seconds", "admitted to its prefill starting",
                                 registry=r, buckets=REQUEST_BUCKETS)

    def _engine_series(self) -> None:
        """Read from the engine at scrape time: what runs, what waits, the KV budget."""
        occupancy, kv = self.occupancy, self.kv
        self.gauge("qwen_num_requests_running", "requests in the running batch", lambda: occupancy()[0])
        self.gauge("qwen_num_requests_waiting", "requests admitted and waiting for the batch", lambda: occupancy()[1])
        self.gauge("qwen_in_flight", "older name of qwen_num_requests_running", lambda: occupancy()[0])
        self.gauge("qwen_queue", "older name of qwen_num_requests_waiting", lambda: occupancy()[1])
        self.gauge("qwen_kv_tokens_reserved", "KV-cache tokens the running batch may reach", lambda: kv()[0])
        self.gauge("qwen_kv_budget_tokens", "KV-cache tokens the engine may reserve", lambda: kv()[1])
        self.gauge("qwen_kv_cache_usage_perc", "KV-cache tokens reserved / budget (1 = full)",
                   lambda: kv()[0] / kv()[1] if kv()[1] else 0.0)

    def gauge(self, name: str, doc: str, read) -> None:
        """A gauge read at scrape time (`read()`), in this worker's registry."""
        from prometheus_client import Gauge
        Gauge(name, doc, registry=self.registry).set_function(read)

    def record(self, endpoint: str, outcome: str, seconds: float, tokens_in: int = 0, tokens_out: int = 0,
               ttft: float | None = None) -> None:
        now = time.time()
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome != "ok":
                self.rejections[outcome] += 1
            else:
                self.latencies.append(seconds)
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self.recent.append(Event(now, outcome, seconds, tokens_in, tokens_out, ttft))
            self._forget(now)
        if outcome == "ok":
            self.p_latency.labels(endpoint).observe(seconds)
        self.p_requests.labels(endpoint, outcome).inc()
        self.p_prompt.inc(tokens_in)
        self.p_generated.inc(tokens_out)
        self.p_tokens.labels("prompt").inc(tokens_in)
        self.p_tokens.labels("completion").inc(tokens_out)

    def record_generation(self, req, arrived: float, seconds: float) -> float | None:
        """vLLM's timings of one generation as it ends (monotonic times of this process; `arrived`: when
        its HTTP request came in, `seconds`: until its answer was written). Returns the time to first
        token, measured from arrival as vLLM does, when it got one."""
        reason = req.finish_reason if req.finish_reason in ("stop", "length") else "abort"
        self.p_finished.labels(reason).inc()
        if req.started_at is not None:
            self.p_queue.observe(req.started_at - req.enqueued)
        for gap in req.token_gaps:
            self.p_itl.observe(gap)
        if reason != "abort":
            self.p_e2e.observe(seconds)
        if req.first_token_at is None:
            return None
        self.p_ttft.observe(req.first_token_at - arrived)
        return req.first_token_at - arrived

    def _forget(self, now: float) -> None:
        while self.recent and self.recent[0].at < now - WINDOW_S:
            self.recent.popleft()

    def counts(self) -> dict:
        """The totals so far, read together: requests by outcome, rejections, tokens."""
        with self.lock:
            return {"outcomes": dict(self.outcomes), "rejections": dict(self.rejections),
                    "tokens_in": self.tokens_in, "tokens_out": self.tokens_out}

    def percentiles(self) -> dict:
        with self.lock:
            xs = list(self.latencies)
        return {**quantiles(xs, (0.5, 0.95, 0.99)), "count": len(xs)}

    def last_minute(self) -> dict:
        """The last WINDOW_S seconds: rates, outcomes, latency and time to first token (the dashboard's)."""
        now = time.time()
        with self.lock:
            self._forget(now)
            events = list(self.recent)
        span = min(WINDOW_S, max(now - self.started, 1.0))
        return {"requests_per_s": round(len(events) / span, 3),
                "by_outcome": dict(Counter(e.outcome for e in events)),
                "prompt_tokens_per_s": round(sum(e.tokens_in for e in events) / span, 2),
                "completion_tokens_per_s": round(sum(e.tokens_out for e in events) / span, 2),
                "latency_s": quantiles([e.seconds for e in events if e.outcome == "ok"]),
                "ttft_s": quantiles([e.ttft for e in events if e.ttft is not None])}


WORKER_ID = os.urandom(4).hex()  # tells workers apart in /stats without naming a process id


def engine_report(engine, serve) -> dict:
    """The engine's own report, with the concurrency the KV budget allows under this configuration."""
    if engine is None:
        return {}
    from common.model.memory import effective_concurrency
    report = engine.report()
    runs, why = effective_concurrency(report["kv_budget_tokens"], serve)
    return {**report, "effective_concurrency": runs, "concurrency_set_by": why}


def placement_report(worker) -> dict:
    """How the model was loaded: precision, LLM.int8's outlier threshold, where the head and embedding sit, and
    the temperature of its labels' probabilities (calibration.json; null: raw scores)."""
    p = worker.placement
    if p is None:
        return {}
    return {"quantization": p.quantization, "int8_threshold": worker.int8_threshold,
            "lm_head_quantized": p.quantize_lm_head, "embedding_on_cpu": p.embed_on_cpu, "device": worker.device,
            "label_temperature": worker.temperature}


def memory_report() -> dict:
    import torch
    if torch.cuda.is_available():
        from common.model.loading import cuda_context_bytes
        free, total = torch.cuda.mem_get_info()
        gib = lambda n: round(n / 1024**3, 2)  # noqa: E731
        reserved, context = torch.cuda.memory_reserved(), cuda_context_bytes()
        # the peak a card must hold is the allocator's peak plus the context
        return {"device": torch.cuda.get_device_name(0), "used_gib": gib(total - free), "total_gib": gib(total),
                "allocated_gib": gib(torch.cuda.memory_allocated()), "reserved_gib": gib(reserved),
                "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
                "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()), "context_gib": gib(context),
                "peak_total_gib": gib(torch.cuda.max_memory_reserved() + context)}
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"device": "cpu", "rss_gib": round(rss / 1024**3, 2)}


def health(worker):
    """200 when the model is loaded and the engine works; 503 with the reason while loading, after a
    load error, while draining, or after repeated engine failures."""
    from flask import jsonify
    problem = worker.problem()
    if worker.ready() and problem is None:
        return jsonify({"status": "ok", "model": worker.name})
    status = "draining" if worker.draining else "error" if worker.error else "degraded" if problem else "loading"
    return jsonify({"status": status, "model": worker.name, "error": problem}), 503


def stats(worker):
    from flask import jsonify
    s, st = worker.cfg.serve, worker.stats
    counts, (in_flight, waiting) = st.counts(), st.occupancy()
    outcomes, engine, recent = counts["outcomes"], engine_report(worker.engine, s), st.last_minute()
    return jsonify({  # names, never absolute paths: /stats may be readable by more people than the box is
        "model": worker.name, "model_dir": worker.model_dir.name,
        "adapter": worker.adapter.name if worker.adapter else None,
        "status": "ok" if worker.ready() else "unavailable", "uptime_s": round(time.time() - st.started, 1),
        "time": round(time.time(), 3), "worker": WORKER_ID,
        "requests": {"total": sum(outcomes.values()), "by_outcome": outcomes}, "rejections": counts["rejections"],
        "in_flight": in_flight, "queue": waiting,
        "peak_admitted": engine.get("peak_admitted", 0), "latency_s": st.percentiles(),
        "tokens": {"prompt": counts["tokens_in"], "completion": counts["tokens_out"],
                   "completion_per_s_last_minute": recent["completion_tokens_per_s"]},
        "last_minute": recent, "engine": engine, "memory": memory_report(), "placement": placement_report(worker),
        "rate_limit_storage": worker.limits.report() if worker.limits else None,
        "limits": {k: getattr(s, k) for k in ("max_concurrent", "max_queue", "max_queue_wait_s",
                                              "request_timeout_s", "max_tokens", "max_prompt_tokens",
                                              "max_body_bytes", "rate_limits", "global_rate_limit")},
    })


def metrics(worker):
    from flask import Response
    from prometheus_client import generate_latest
    return Response(generate_latest(worker.stats.registry), mimetype="text/plain; version=0.0.4")


DASHBOARD = Path(__file__).with_name("dashboard.html")
# the page may run its own script and styles and talk to this server, nothing else: it works on an offline box
# and cannot be made to load anything from elsewhere
DASHBOARD_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                 "img-src data:")


def dashboard(worker):
    """The live page: one self-contained HTML file that polls /stats and draws the last minutes."""
    from flask import Response
    return Response(DASHBOARD.read_bytes(), mimetype="text/html",
                    headers={"Cache-Control": "no-store", "Content-Security-Policy": DASHBOARD_CSP})
