"""The one record each request leaves: a JSON log line and its counts in /stats and /metrics.

deploy_with_limits.py opens an Accounting when a request comes in; the worker fills in what it did
(tokens, sampling, the engine's request, how it ended); deploy_with_limits.py's after_request hook writes
the record once, whichever way the request ended: at once for a whole response, and when the stream
closes for a streamed one (finished, failed, or cut by a client that left).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("serve")

# How a finished request is counted in /stats and the log; a 503 is counted by its reason instead.
OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "bad_method",
            413: "too_large", 415: "bad_media_type", 429: "rate_limited", 499: "cancelled", 500: "error",
            504: "timeout"}
TOO_LONG = {"context_length_exceeded", "kv_budget_exceeded"}  # 400s counted as "too_long": the prompt or its KV cache


@dataclass
class Accounting:
    """What one request did. `streaming`: the status is known only when the stream ends (`ended`)."""
    endpoint: str
    request_id: str
    client: str
    started: float = field(default_factory=time.monotonic)
    tokens_in: int = 0
    tokens_out: int = 0
    code: str | None = None    # the error code of a refusal: queue_full, draining, ...
    prompt: object = None      # logged only with serve.log_prompts
    sampling: dict | None = None  # the sampling a generation ran with (the server's defaults filled in)
    gen_request: object = None    # the engine's GenRequest of a generation: its timings go to /metrics
    streaming: bool = False
    status: int | None = None  # a stream's status as it ended
    recorded: bool = False

    def ended(self, status: int, code: str | None) -> None:
        """How a stream ended (set by the stream itself; the record is written when its response closes)."""
        self.status, self.code = status, code

    def outcome(self, status: int) -> str:
        # a 503 or a failed generation is counted by its reason (queue_full, draining, engine_error, ...)
        if status in (500, 503) and self.code:
            return self.code
        return "too_long" if status == 400 and self.code in TOO_LONG else OUTCOMES.get(status, f"http_{status}")

    def record(self, stats, log_prompts: bool, status: int) -> None:
        """Write the record, once: `stats` (monitoring.Stats) counts it, the log keeps its line."""
        if self.recorded:
            return
        self.recorded = True
        outcome, seconds = self.outcome(status), time.monotonic() - self.started
        req = self.gen_request
        ttft = stats.record_generation(req, self.started, seconds) if req is not None else None
        stats.record(self.endpoint, outcome, seconds, self.tokens_in, self.tokens_out, ttft)
        extra = {"request_id": self.request_id, "client": self.client, "endpoint": self.endpoint, "status": status,
                 "outcome": outcome, "latency_s": round(seconds, 4), "prompt_tokens": self.tokens_in,
                 "completion_tokens": self.tokens_out}
        if req is not None and req.started_at is not None:
            extra["queue_s"] = round(req.started_at - req.enqueued, 4)
        if ttft is not None:
            extra["ttft_s"] = round(ttft, 4)
        if log_prompts and self.prompt:
            extra["prompt"] = self.prompt
        if self.sampling is not None:
            extra["sampling"] = self.sampling
        log.info("%s %s %s %.3fs", self.endpoint, status, outcome, seconds, extra=extra)
