"""The service's request lifecycle, one place: the model of a worker, admission to the engine,
waiting, streaming, and the one record each request leaves (a log line and /stats).

deploy_with_limits.py holds the endpoints and the rules they run under; they call these.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.data import read_labels
from common.memory import kv_budget, model_shape, placement_for
from common.model_files import serving_model
from common.monitoring import Stats
from common.openai_schema import ApiError, Params, usage
from common.sampling import Sampling, server_defaults

log = logging.getLogger("serve")

# How a finished request is counted in /stats and the log; a 503 is counted by its reason instead.
OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "bad_method",
            413: "too_large", 415: "bad_media_type", 429: "rate_limited", 499: "cancelled", 500: "error",
            504: "timeout"}
TOO_LONG = {"context_length_exceeded", "kv_budget_exceeded"}  # 400s counted as "too_long": the prompt or its KV cache
# How the engine ended a request that did not succeed: (HTTP status, error type, message).
ENDINGS = {
    "error": (500, "server_error", "generation failed on the server; see its log"),
    "queue_timeout": (503, "server_busy", "waited too long for a free slot; retry shortly"),
    "draining": (503, "server_busy", "the server is shutting down; retry on another instance or shortly"),
    "shutdown": (503, "server_busy", "the server shut down before the generation finished; retry"),
    "cancelled": (499, "cancelled", "the client closed the connection"),
}


def api_keys(serve_cfg) -> list[str]:
    """Bearer keys from serve.api_keys (env API_KEYS) and serve.api_keys_file (one a line); none = no auth."""
    keys = list(serve_cfg.api_keys)
    if serve_cfg.api_keys_file:
        keys += [line.strip() for line in Path(serve_cfg.api_keys_file).read_text().splitlines()
                 if not line.startswith("#")]
    return [k.strip() for k in keys if k.strip()]


# ----------------------------------------------------------------------------- the model, per worker
class ServerState:
    """The engine and the model's facts; loaded in a background thread so /health answers at once."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model_dir, self.adapter = serving_model(cfg)
        self.name = cfg.serve.served_model_name or (self.adapter or self.model_dir).name
        self.engine = self.tokenizer = None
        self.labels: list[str] = []
        self.error: str | None = None
        self.draining = False
        self.keys = api_keys(cfg.serve)
        self.limits = None  # common.rate_limits.RateLimits, set by create_app
        self.device, self.placement, self.sampling, self.kv_budget = None, None, {}, 0  # set once loaded
        self.stats = Stats(lambda: self.engine.load() if self.engine else (0, 0),
                           lambda: (self.engine.kv_in_use(), self.engine.kv_budget) if self.engine else (0, 0))
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        from common.engine import Engine
        from common.loading import load_tokenizer
        try:
            started, s = time.time(), self.cfg.serve
            self.tokenizer = load_tokenizer(self.adapter or self.model_dir)
            model, shape = self._load_model()
            self.labels = read_labels(*filter(None, (self.adapter, self.model_dir))) or []
            self.sampling = server_defaults(s, self.model_dir)
            self.kv_budget, source = kv_budget(shape, s, self.device, self.cfg.model.gpu_memory_cap_gib)
            self.engine = Engine(model, self.tokenizer, s.max_concurrent, s.max_queue, s.max_queue_wait_s,
                                 s.batch_wait_ms, unhealthy_after=s.unhealthy_after_failures,
                                 unhealthy_window_s=s.unhealthy_window_s, kv_budget=self.kv_budget,
                                 max_prefill_tokens=s.max_prefill_tokens)
            log.info("serving %s (%d labels), loaded in %.1fs; KV budget %d tokens (%s); sampling defaults %s",
                     self.name, len(self.labels), time.time() - started, self.kv_budget, source, self.sampling)
        except Exception as e:  # the worker stays up and says why on /health
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model load failed")

    def _load_model(self):
        """The model in the serve section's precision and placement (auto: what fits the card)."""
        from common.loading import cap_gpu_memory, load_model, pick_device
        s, cap = self.cfg.serve, self.cfg.model.gpu_memory_cap_gib
        cap_gpu_memory(cap)  # a 10 GB card's budget on a bigger one: placement, KV budget and allocator all see it
        self.device = pick_device()
        shape = model_shape(self.model_dir)
        self.placement = placement_for(self.model_dir, s.quantization, s, self.adapter, cap)
        model = load_model(self.model_dir, self.placement.quantization, adapter=self.adapter,
                           quantize_lm_head=self.placement.quantize_lm_head,
                           embed_on_cpu=self.placement.embed_on_cpu).eval()
        return model, shape

    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def drain(self) -> None:
        """SIGTERM: admit nothing new (503), end what waits (503 'draining'), let what runs finish."""
        self.draining = True
        if self.engine is not None:
            self.engine.drain()
        log.info("draining: admitting nothing new, finishing what runs")

    def finish_running(self, grace_s: float) -> None:
        """Wait up to grace_s for the running generations; then end the rest ('shutdown': a 503, or an
        error event on a stream) and give their responses a moment to be written."""
        deadline = time.monotonic() + grace_s
        while self.engine is not None and not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine is not None and not self.engine.idle():
            log.warning("drain: the grace period ended with %d generations running; ending them",
                        self.engine.load()[0])
            self.engine.abort("shutdown")
            end = time.monotonic() + 2.0
            while not self.engine.idle() and time.monotonic() < end:
                time.sleep(0.05)
        time.sleep(0.2)  # the last responses leave their threads

    def unavailable(self, message: str, code: str) -> ApiError:
        return ApiError(503, message, type="server_busy", code=code,
                        headers={"Retry-After": str(self.cfg.serve.retry_after_unavailable_s)})

    def busy(self, message: str, code: str) -> ApiError:
        return ApiError(503, message, type="server_busy", code=code,
                        headers={"Retry-After": str(self.cfg.serve.retry_after_busy_s)})


# ----------------------------------------------------------------------------- one request's record
@dataclass
class Accounting:
    """What one request did, recorded once: a JSON log line and /stats. A stream is recorded when it ends."""
    endpoint: str
    request_id: str
    client: str
    started: float = field(default_factory=time.monotonic)
    tokens_in: int = 0
    tokens_out: int = 0
    code: str | None = None   # the error code of a refusal: queue_full, draining, ...
    prompt: object = None     # logged only with serve.log_prompts
    sampling: dict | None = None  # the sampling a generation ran with (the server's defaults filled in)
    deferred: bool = False    # a streaming response: its generator records it at the end
    generation: object = None  # the GenRequest of a generation: its engine timings go to /metrics
    recorded: bool = False

    def outcome(self, status: int) -> str:
        # a 503 or a failed generation is counted by its reason (queue_full, draining, engine_error, ...)
        if status in (500, 503) and self.code:
            return self.code
        return "too_long" if status == 400 and self.code in TOO_LONG else OUTCOMES.get(status, f"http_{status}")

    def record(self, state: ServerState, status: int) -> None:
        if self.recorded:
            return
        self.recorded = True
        outcome, seconds = self.outcome(status), time.monotonic() - self.started
        req = self.generation
        ttft = state.stats.record_generation(req, self.started, seconds) if req is not None else None
        state.stats.record(self.endpoint, outcome, seconds, self.tokens_in, self.tokens_out, ttft)
        extra = {"request_id": self.request_id, "client": self.client, "endpoint": self.endpoint, "status": status,
                 "outcome": outcome, "latency_s": round(seconds, 4), "prompt_tokens": self.tokens_in,
                 "completion_tokens": self.tokens_out}
        if req is not None and req.started_at is not None:
            extra["queue_s"] = round(req.started_at - req.enqueued, 4)
        if ttft is not None:
            extra["ttft_s"] = round(ttft, 4)
        if state.cfg.serve.log_prompts and self.prompt:
            extra["prompt"] = self.prompt
        if self.sampling is not None:
            extra["sampling"] = self.sampling
        log.info("%s %s %s %.3fs", self.endpoint, status, outcome, seconds, extra=extra)


# ----------------------------------------------------------------------------- requests in and out
def client_ip(trusted_proxies: int) -> str:
    from flask import request
    if trusted_proxies > 0:  # X-Forwarded-For is set by the proxies we trust, counted from the right
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        if len(hops) >= trusted_proxies:
            return hops[-trusted_proxies]
    return request.remote_addr or "unknown"


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a UTF-16 pair, or a whole pair


def parse_body(request, max_bytes: int):
    if request.mimetype != "application/json":
        raise ApiError(415, f"send the body as application/json, not {request.mimetype or 'nothing'}",
                       code="unsupported_media_type")
    from werkzeug.exceptions import HTTPException
    try:
        raw = request.get_data(cache=False)
    except HTTPException:  # 413 past MAX_CONTENT_LENGTH: werkzeug's answer stands
        raise
    except Exception as e:  # the server's HTTP parser on a broken body (a bad chunk size, a cut connection)
        raise ApiError(400, f"the request body could not be read: {e}", code="invalid_body") from None
    if len(raw) > max_bytes:
        raise ApiError(413, f"the body is over the limit of {max_bytes} bytes", code="body_too_large")
    try:
        text = raw.decode("utf-8")
        body = json.loads(text)
        if SURROGATE_ESCAPE.search(text):  # rare: then check that every string is text the tokenizer can take
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", code="invalid_encoding") from None
    except UnicodeEncodeError:  # an escape such as \ud800 with no pair: JSON allows it, text cannot hold it
        raise ApiError(400, "the body holds a lone UTF-16 surrogate escape (such as \\ud800), which is not text",
                       code="invalid_encoding") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON for this API: it is nested too deeply",
                       code="invalid_json") from None
    return body


def check_model_name(state: ServerState, model: str | None) -> None:
    if model not in (None, "", state.name):
        raise ApiError(404, f"model '{model}' is not served here; GET /v1/models lists '{state.name}'",
                       code="model_not_found", param="model")


def capped(state: ServerState, ids: list[int], param: str) -> list[int]:
    """The prompt's token ids (tokenized once per request); 400 with both numbers past the cap."""
    cap = state.cfg.serve.max_prompt_tokens
    if len(ids) > cap:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {cap}",
                       param=param, code="context_length_exceeded")
    return ids


def request_ids(state: ServerState, p: Params) -> list[int]:
    """Chat messages through the prompt contract (their text stays data); a raw completion prompt is the
    client's own template, so its special tokens count (as in vLLM)."""
    from common.prompts import encode_text, prompt_ids
    if p.messages is None:
        return capped(state, encode_text(state.tokenizer, p.prompt), "prompt")
    thinking = p.chat_template_kwargs.get("enable_thinking", state.cfg.prompt.enable_thinking)
    return capped(state, prompt_ids(state.tokenizer, p.messages, thinking), "messages")


def resolve_labels(state: ServerState, labels) -> list[str]:
    if labels is True:
        if not state.labels:
            raise ApiError(400, "this model has no labels.json; send the candidate labels as a list", param="labels")
        return state.labels
    return labels


# ----------------------------------------------------------------------------- the engine's side
def submit(state: ServerState, req) -> None:
    from common.engine import Draining, QueueFull
    try:
        state.engine.submit(req)
    except QueueFull:
        raise state.busy("the server is at capacity (all slots and queue places taken); retry shortly",
                         "queue_full") from None
    except Draining:
        raise state.unavailable("the server is shutting down", "draining") from None


def client_gone() -> bool:
    """Has the client closed its connection? (gunicorn's socket: readable with nothing to read.)"""
    from flask import request
    sock = request.environ.get("gunicorn.socket")
    if sock is None:  # another server (Flask's development server): cannot tell, so assume present
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset by the peer
        return True


def ending_error(state: ServerState, reason: str | None) -> ApiError | None:
    """The HTTP error for how the engine ended a request; None when it succeeded."""
    if reason in ("stop", "length"):
        return None
    if reason in (None, "timeout"):
        return ApiError(504, f"the request took longer than {state.cfg.serve.request_timeout_s:g}s and was stopped",
                        type="timeout", code="timeout")
    status, kind, message = ENDINGS[reason]
    retry = {"queue_timeout": state.cfg.serve.retry_after_busy_s}.get(reason, state.cfg.serve.retry_after_unavailable_s)
    return ApiError(status, message, type=kind, code=reason if reason != "error" else "engine_error",
                    headers={"Retry-After": str(retry)} if status == 503 else None)


def wait(state: ServerState, req) -> None:
    """Block until the engine finishes the request; a client that hangs up meanwhile cancels it (its
    slot is free at the next step). Raises the HTTP error for how it ended, if it failed."""
    limit = req.deadline + 1.0
    while not req.done.wait(timeout=0.1):
        if client_gone():
            req.cancelled = True
            req.done.wait(timeout=2.0)
            raise ending_error(state, "cancelled")
        if time.monotonic() > limit:  # the engine missed the deadline: stop it from here
            req.cancelled = True
            break
    error = ending_error(state, req.finish_reason)
    if error is not None:
        raise error


def too_large(state: ServerState, need: int, what: str) -> ApiError:
    return ApiError(400, f"{what} needs up to {need:,} tokens of KV cache; this server's memory budget is "
                         f"{state.kv_budget:,}: lower max_tokens or shorten the prompt", code="kv_budget_exceeded")


def generation(state: ServerState, p: Params, ids: list[int]):
    """Submit one generation; the caller waits for it (wait) or streams it (stream)."""
    from common.engine import GenRequest
    sampling = Sampling(**{**state.sampling, **p.sampling}, seed=p.seed)
    req = GenRequest(prompt_ids=ids, max_tokens=p.max_tokens, sampling=sampling, stop=p.stop,
                     ignore_eos=p.ignore_eos, deadline=time.monotonic() + state.cfg.serve.request_timeout_s,
                     events=queue.Queue() if p.stream else None)
    if req.worst_tokens > state.kv_budget:  # it could never start: say so now instead of queueing it
        raise too_large(state, req.worst_tokens, f"this request (prompt {len(ids):,} + max_tokens {p.max_tokens:,})")
    submit(state, req)
    return req


def classify(state: ServerState, ids: list[list[int]], labels: list[str]) -> list[tuple[str, float, dict]]:
    """(best label, its probability, every label's probability) per prompt: one scoring pass."""
    from common.engine import ScoreRequest
    from common.scoring import label_tokens
    req = ScoreRequest(prompt_ids=ids, labels=labels, deadline=time.monotonic() + state.cfg.serve.request_timeout_s,
                       label_tokens=max(map(len, label_tokens(state.tokenizer, labels))))
    if req.tokens_per_prompt > state.kv_budget:
        raise too_large(state, req.tokens_per_prompt, f"scoring {len(labels)} labels on a prompt")
    submit(state, req)
    wait(state, req)
    out = []
    for row in req.logprobs.softmax(-1):
        probs = {label: round(float(p), 6) for label, p in zip(labels, row)}
        best = max(probs, key=probs.get)
        out.append((best, probs[best], probs))
    return out


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream(state: ServerState, req, p: Params, chunk, acct: Accounting, opening: dict | None = None):
    """Server-sent events: (an opening chunk), text deltas, the finish chunk, usage if asked, [DONE].
    A failure after the status line travels as an error event before [DONE]."""
    gone = False
    try:
        if opening is not None:
            yield sse(opening)
        while True:
            try:
                kind, text = req.events.get(timeout=max(req.deadline - time.monotonic(), 0) + 1.0)
            except queue.Empty:  # the engine missed the deadline by more than a second: stop it from here
                req.cancelled, req.finish_reason = True, req.finish_reason or "timeout"
                break
            if kind == "done":
                break
            yield sse(chunk(text, None))
        error = ending_error(state, req.finish_reason)
        if error is None:
            yield sse(chunk("", req.finish_reason))
            if p.include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": usage(len(req.prompt_ids), len(req.out_ids))})
        else:
            yield sse(error.body())
        yield "data: [DONE]\n\n"
    except GeneratorExit:  # the server closed the stream because the client went away
        gone = True
        raise
    finally:
        req.cancelled = req.cancelled or gone or not req.done.is_set()
        error = ending_error(state, "cancelled" if gone else req.finish_reason)
        acct.tokens_out, acct.code = len(req.out_ids), error.code if error else None
        acct.record(state, error.status if error else 200)
