"""A gunicorn worker's serving side, one place: its model and engine (loaded in the background), admission
to the engine, waiting, streaming, and label scoring.

deploy_with_limits.py holds the endpoints and the rules they run under; they call a Worker's methods,
passing in what they read from the HTTP request. The Worker talks to its Engine through the engine's
methods only, and fills in each request's Accounting (common/serving/accounting.py).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from common.evaluation.calibration import calibration_of, probabilities, temperature_of
from common.model.files import serving_model
from common.model.memory import kv_budget, load_as_served, model_shape
from common.serving.accounting import Accounting
from common.serving.monitoring import Stats
from common.serving.openai_wire import ApiError, Params, usage
from common.serving.sampling import Sampling, server_defaults
from common.text.prepared import read_labels

log = logging.getLogger("serve")

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


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Worker:
    """The model, its engine and the facts the endpoints need; the model loads in a background thread so
    /health answers at once (503 'loading' until it is ready)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model_dir, self.adapter = serving_model(cfg)
        self.name = cfg.serve.served_model_name or (self.adapter or self.model_dir).name
        self.engine = self.tokenizer = None
        self.labels: list[str] = []
        self.temperature: float | None = None  # calibration.json's, for self.labels' probabilities; None: no file
        self.error: str | None = None
        self.draining = False
        self.keys = api_keys(cfg.serve)
        self.limits = None  # common.serving.rate_limits.RateLimits, set by create_app
        self.device, self.placement, self.sampling, self.kv_budget = None, None, {}, 0  # set once loaded
        self.int8_threshold: float | None = None
        self.stats = Stats(lambda: self.engine.occupancy() if self.engine else (0, 0),
                           lambda: (self.engine.kv_in_use(), self.engine.kv_budget) if self.engine else (0, 0))
        threading.Thread(target=self._start, name="model-loader", daemon=True).start()

    def _start(self) -> None:
        """Load the tokenizer and the model, then start the engine; a failure is kept for /health."""
        from common.model.loading import load_tokenizer
        from common.serving.engine import Engine
        try:
            started, s = time.time(), self.cfg.serve
            self.tokenizer = load_tokenizer(self.adapter or self.model_dir)
            model, shape = self._load_model()
            self.labels = read_labels(*filter(None, (self.adapter, self.model_dir))) or []
            self.temperature = temperature_of(self.adapter, self.model_dir) \
                if calibration_of(self.adapter, self.model_dir) is not None else None
            self.sampling = server_defaults(s, self.model_dir)
            self.kv_budget, source = kv_budget(shape, s, self.device, self.cfg.model.gpu_memory_cap_gib)
            self.engine = Engine(model, self.tokenizer, s.max_concurrent, s.max_queue, s.max_queue_wait_s,
                                 s.batch_wait_ms, unhealthy_after=s.unhealthy_after_failures,
                                 unhealthy_window_s=s.unhealthy_window_s, kv_budget=self.kv_budget,
                                 max_prefill_tokens=s.max_prefill_tokens)
            log.info("serving %s (%d labels, temperature %s), loaded in %.1fs; KV budget %d tokens (%s); sampling "
                     "defaults %s", self.name, len(self.labels), self.temperature, time.time() - started,
                     self.kv_budget, source, self.sampling)
        except Exception as e:  # the worker stays up and says why on /health
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model load failed")

    def _load_model(self):
        """The model in the serve section's precision and placement (auto: what fits the card)."""
        from common.model.loading import int8_threshold_of, pick_device
        model, self.placement = load_as_served(self.cfg, self.model_dir, self.adapter)
        self.device = pick_device()  # after the cap: a 10 GB card's budget on a bigger one, for the KV budget too
        self.int8_threshold = int8_threshold_of(model)
        return model, model_shape(self.model_dir)

    # ------------------------------------------------------------------ state and lifecycle
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def problem(self) -> str | None:
        """Why this worker cannot answer (its load failed, or its engine fails), or None."""
        return self.error or (self.engine.problem() if self.engine else None)

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
                        self.engine.occupancy()[0])
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

    def record(self, acct: Accounting, status: int) -> None:
        """Write a request's one record. A stream's status is how it ended; one that never ran (its client
        left before the first byte) is cancelled here, so its generation frees its slot."""
        if acct.streaming and acct.status is None:
            acct.gen_request.cancelled = True
            acct.ended(499, "cancelled")
        acct.record(self.stats, self.cfg.serve.log_prompts, acct.status if acct.streaming else status)

    # ------------------------------------------------------------------ what a request asks for
    def check_model_name(self, model: str | None) -> None:
        if model not in (None, "", self.name):
            raise ApiError(404, f"model '{model}' is not served here; GET /v1/models lists '{self.name}'",
                           code="model_not_found", param="model")

    def capped(self, ids: list[int], param: str) -> list[int]:
        """The prompt's token ids (tokenized once per request); 400 with both numbers past the cap."""
        cap = self.cfg.serve.max_prompt_tokens
        if len(ids) > cap:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {cap}",
                           param=param, code="context_length_exceeded")
        return ids

    def prompt_ids(self, p: Params, acct: Accounting) -> list[int]:
        """Chat messages through the prompt contract (their text stays data); a raw completion prompt is the
        client's own template, so its special tokens count (as in vLLM)."""
        from common.text.prompts import encode_text, prompt_ids
        if p.messages is None:
            ids = self.capped(encode_text(self.tokenizer, p.prompt), "prompt")
        else:
            thinking = p.chat_template_kwargs.get("enable_thinking", self.cfg.prompt.enable_thinking)
            ids = self.capped(prompt_ids(self.tokenizer, p.messages, thinking), "messages")
        acct.prompt, acct.tokens_in = p.messages or p.prompt, len(ids)
        return ids

    def classification_prompts(self, texts: list[str], labels: list[str], acct: Accounting) -> list[list[int]]:
        """Each text through the prompt contract's classification prompt, capped like any prompt."""
        from common.text.prompts import classification_ids
        ids = [self.capped(x, "text") for x in classification_ids(self.tokenizer, texts, labels, self.cfg.prompt)]
        acct.tokens_in = sum(map(len, ids))
        return ids

    def labels_for(self, labels) -> list[str]:
        """`labels: true` means this model's labels.json; a list is the client's own."""
        if labels is True:
            if not self.labels:
                raise ApiError(400, "this model has no labels.json; send the candidate labels as a list",
                               param="labels")
            return self.labels
        return labels

    # ------------------------------------------------------------------ the engine's side
    def _submit(self, req) -> None:
        from common.serving.engine_requests import Draining, QueueFull
        try:
            self.engine.submit(req)
        except QueueFull:
            raise self.busy("the server is at capacity (all slots and queue places taken); retry shortly",
                            "queue_full") from None
        except Draining:
            raise self.unavailable("the server is shutting down", "draining") from None

    def ending_error(self, reason: str | None) -> ApiError | None:
        """The HTTP error for how the engine ended a request; None when it succeeded."""
        s = self.cfg.serve
        if reason in ("stop", "length"):
            return None
        if reason in (None, "timeout"):
            return ApiError(504, f"the request took longer than {s.request_timeout_s:g}s and was stopped",
                            type="timeout", code="timeout")
        status, kind, message = ENDINGS[reason]
        retry = s.retry_after_busy_s if reason == "queue_timeout" else s.retry_after_unavailable_s
        return ApiError(status, message, type=kind, code=reason if reason != "error" else "engine_error",
                        headers={"Retry-After": str(retry)} if status == 503 else None)

    def too_large(self, need: int, what: str) -> ApiError:
        return ApiError(400, f"{what} needs up to {need:,} tokens of KV cache; this server's memory budget is "
                             f"{self.kv_budget:,}: lower max_tokens or shorten the prompt", code="kv_budget_exceeded")

    def generate(self, p: Params, ids: list[int], acct: Accounting):
        """Submit one generation; the caller waits for it (wait) or streams it (stream)."""
        from common.serving.engine_requests import GenRequest
        sampling = Sampling(**{**self.sampling, **p.sampling}, seed=p.seed)
        req = GenRequest(prompt_ids=ids, max_tokens=p.max_tokens, sampling=sampling, stop=p.stop,
                         ignore_eos=p.ignore_eos, deadline=time.monotonic() + self.cfg.serve.request_timeout_s,
                         events=queue.Queue() if p.stream else None)
        if req.worst_tokens > self.kv_budget:  # it could never start: say so now instead of queueing it
            raise self.too_large(req.worst_tokens, f"this request (prompt {len(ids):,} + max_tokens {p.max_tokens:,})")
        self._submit(req)
        acct.sampling, acct.gen_request, acct.streaming = req.sampling.as_dict(), req, p.stream
        return req

    def wait(self, req, gone, acct: Accounting | None = None) -> None:
        """Block until the engine finishes the request; a client that hangs up meanwhile (`gone()`) cancels
        it (its slot is free at the next step). Raises the HTTP error for how it ended, if it failed; the
        tokens it made go to `acct` however it ended."""
        try:
            self._wait(req, gone)
        finally:
            if acct is not None:
                acct.tokens_out = len(req.out_ids)

    def _wait(self, req, gone) -> None:
        limit = req.deadline + 1.0
        while not req.done.wait(timeout=0.1):
            if gone():
                req.cancelled = True
                req.done.wait(timeout=2.0)
                raise self.ending_error("cancelled")
            if time.monotonic() > limit:  # the engine missed the deadline: stop it from here
                req.cancelled = True
                break
        error = self.ending_error(req.finish_reason)
        if error is not None:
            raise error

    def calibrated(self, labels: list[str]) -> bool:
        """The model's temperature applies to the label set it was fitted on (labels.json's, in any order);
        another set's probabilities are the raw scores'."""
        return self.temperature is not None and set(labels) == set(self.labels)

    def classify(self, ids: list[list[int]], labels: list[str], gone) -> list[dict]:
        """Per prompt: the best label, its probability, every label's probability and whether they are
        calibrated (common/evaluation/calibration.py); one scoring pass."""
        from common.model.label_scoring import label_tokens
        from common.serving.engine_requests import ScoreRequest
        req = ScoreRequest(prompt_ids=ids, labels=labels, deadline=time.monotonic() + self.cfg.serve.request_timeout_s,
                           label_tokens=max(map(len, label_tokens(self.tokenizer, labels))))
        if req.tokens_per_prompt > self.kv_budget:
            raise self.too_large(req.tokens_per_prompt, f"scoring {len(labels)} labels on a prompt")
        self._submit(req)
        self._wait(req, gone)
        calibrated = self.calibrated(labels)
        out = []
        for row in probabilities(req.logprobs, self.temperature if calibrated else 1.0):
            probs = {label: round(float(p), 6) for label, p in zip(labels, row)}
            best = max(probs, key=probs.get)
            out.append({"label": best, "probability": probs[best], "probabilities": probs, "calibrated": calibrated})
        return out

    def stream(self, req, p: Params, chunk, acct: Accounting, opening: dict | None = None):
        """Server-sent events: (an opening chunk), text deltas, the finish chunk, usage if asked, [DONE].
        A failure after the status line travels as an error event before [DONE]. How it ended goes to
        `acct` (the record itself is written when the response closes)."""
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
            error = self.ending_error(req.finish_reason)
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
            error = self.ending_error("cancelled" if gone else req.finish_reason)
            acct.tokens_out = len(req.out_ids)
            acct.ended(error.status if error else 200, error.code if error else None)
