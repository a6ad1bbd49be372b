"""The HTTP service: an OpenAI-compatible Flask app with hard limits, run by gunicorn.

    bash start_production.sh                     # gunicorn, config from config.yaml's serve section + env
    bash start_deploy.sh                         # Flask's development server, debug logging
    python deploy_with_limits.py --check         # preflight: the model to serve, its files, the port

Endpoints: POST /v1/chat/completions (stream too), POST /v1/completions, POST /v1/classify,
GET /v1/models, /health, /stats, /metrics. Limits (serve section): concurrent generations, a bounded
wait queue (503 + Retry-After beyond it), per-IP and global rate limits (429), a request deadline
(504, and the generation stops), token and body caps, optional Bearer API keys. The model loads once
per worker process, after gunicorn forks, in a background thread (/health is 503 until it is ready).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from common.config import ConfigError, add_config_args, config_from_args, load_config, stage_parser
from common.model_files import check_model_dir, serving_model
from common.monitoring import Stats, register_monitoring
from common.openai_schema import (ApiError, Params, chat_chunk, chat_response, completion_response, new_id,
                                  parse_chat, parse_completion, parse_labels, usage)

log = logging.getLogger("serve")


# ----------------------------------------------------------------------------- what to serve
def api_keys() -> list[str]:
    """Bearer keys from API_KEYS (comma-separated) and API_KEYS_FILE (one a line); none = no auth."""
    keys = [k.strip() for k in os.environ.get("API_KEYS", "").split(",")]
    path = os.environ.get("API_KEYS_FILE")
    if path:
        keys += [line.strip() for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    return [k for k in keys if k]


# ----------------------------------------------------------------------------- the model, per worker
class ServerState:
    """The engine and the model's facts; loaded in a background thread so /health answers at once."""

    def __init__(self, cfg):
        self.cfg, self.stats = cfg, Stats()
        self.model_dir, self.adapter = serving_model(cfg)
        self.name = cfg.serve.served_model_name or (self.adapter or self.model_dir).name
        self.engine = self.tokenizer = None
        self.labels: list[str] = []
        self.error: str | None = None
        self.draining = False
        self.keys = api_keys()
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        from common.engine import Engine
        from common.loading import load_model, load_tokenizer
        try:
            started = time.time()
            self.tokenizer = load_tokenizer(self.adapter or self.model_dir)
            model = load_model(self.model_dir, self.cfg.serve.quantization, adapter=self.adapter).eval()
            labels = (self.adapter or self.model_dir) / "labels.json"
            if labels.is_file():
                self.labels = json.loads(labels.read_text(encoding="utf-8")).get("labels", [])
            s = self.cfg.serve
            self.engine = Engine(model, self.tokenizer, s.max_concurrent, s.max_queue, s.max_queue_wait_s,
                                 s.batch_wait_ms)
            log.info("serving %s (%d labels), loaded in %.1fs", self.name, len(self.labels), time.time() - started)
        except Exception as e:  # the worker stays up and says why on /health
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model load failed")

    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def drain(self) -> None:
        """SIGTERM: admit nothing new (503), let what is in flight finish."""
        self.draining = True
        if self.engine is not None:
            self.engine.drain()


# ----------------------------------------------------------------------------- request handling
def capped_ids(state: ServerState, text: str, param: str) -> list[int]:
    """The prompt's token ids, tokenized once per request; 400 with both numbers past the cap."""
    from common.prompts import encode_text
    ids = encode_text(state.tokenizer, text)
    cap = state.cfg.serve.max_prompt_tokens
    if len(ids) > cap:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {cap}",
                       param=param, code="context_length_exceeded")
    return ids


def prompt_ids(state: ServerState, p: Params) -> list[int]:
    from common.prompts import render_prompt
    if p.messages is None:
        return capped_ids(state, p.prompt, "prompt")
    thinking = p.chat_template_kwargs.get("enable_thinking", state.cfg.prompt.enable_thinking)
    return capped_ids(state, render_prompt(state.tokenizer, p.messages, thinking), "messages")


def submit(state: ServerState, req) -> None:
    from common.engine import Draining, QueueFull
    try:
        state.engine.submit(req)
    except QueueFull:
        raise ApiError(503, "the server is at capacity (all slots and queue places taken); retry shortly",
                       type="server_busy", code="queue_full", headers={"Retry-After": "2"}) from None
    except Draining:
        raise ApiError(503, "the server is shutting down", type="server_busy", code="draining",
                       headers={"Retry-After": "5"}) from None


def wait(state: ServerState, req) -> None:
    """Block until the engine finishes the request; map how it ended to an HTTP error if it failed."""
    req.done.wait(timeout=max(req.deadline - time.monotonic(), 0) + 1.0)
    reason = req.finish_reason
    if reason is None or reason == "timeout":
        req.cancelled = True
        raise ApiError(504, f"the request took longer than {state.cfg.serve.request_timeout_s:g}s and was stopped",
                       type="timeout", code="timeout")
    if reason == "queue_timeout":
        raise ApiError(503, "waited too long for a free slot; retry shortly", type="server_busy",
                       code="queue_timeout", headers={"Retry-After": "2"})
    if reason == "error":
        raise ApiError(500, "generation failed on the server; see its log", type="server_error", code="engine_error")


def classify(state: ServerState, ids: list[list[int]], labels: list[str], deadline: float) -> list[tuple[str, float, dict]]:
    from common.engine import ScoreRequest
    req = ScoreRequest(prompt_ids=ids, labels=labels, deadline=deadline)
    submit(state, req)
    wait(state, req)
    out = []
    for row in req.logprobs.softmax(-1):
        probs = {label: round(float(p), 6) for label, p in zip(labels, row)}
        best = max(probs, key=probs.get)
        out.append((best, probs[best], probs))
    return out


def resolve_labels(state: ServerState, labels) -> list[str]:
    if labels is True:
        if not state.labels:
            raise ApiError(400, "this model has no labels.json; send the candidate labels as a list", param="labels")
        return state.labels
    return labels


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream(state: ServerState, req, p: Params, chunk, on_end, opening: dict | None = None):
    """Server-sent events: (an opening chunk), text deltas, the finish chunk, usage if asked, [DONE]."""
    try:
        if opening is not None:
            yield sse(opening)
        while True:
            kind, text = req.events.get(timeout=max(req.deadline - time.monotonic(), 0) + 1.0)
            if kind == "done":
                break
            yield sse(chunk(text, None))
        if req.finish_reason in ("stop", "length"):
            yield sse(chunk("", req.finish_reason))
            if p.include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": usage(len(req.prompt_ids), len(req.out_ids))})
        else:  # the status line is long gone: the failure travels as an error event
            status, kind = (500, "server_error") if req.finish_reason == "error" else (504, "timeout")
            yield sse(ApiError(status, f"generation ended early: {req.finish_reason}", type=kind,
                               code=req.finish_reason).body())
        yield "data: [DONE]\n\n"
    except BaseException:  # the client went away (GeneratorExit), or the wait itself timed out
        req.cancelled = True
        raise
    finally:
        on_end(req)


def make_request(state: ServerState, p: Params, ids: list[int], streaming: bool):
    import queue

    from common.engine import GenRequest
    return GenRequest(prompt_ids=ids, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                      stop=p.stop, ignore_eos=p.ignore_eos, seed=p.seed,
                      deadline=time.monotonic() + state.cfg.serve.request_timeout_s,
                      events=queue.Queue() if streaming else None)


def parse_body(request, max_bytes: int):
    if request.mimetype != "application/json":
        raise ApiError(415, f"send the body as application/json, not {request.mimetype or 'nothing'}",
                       code="unsupported_media_type")
    raw = request.get_data(cache=False)
    if len(raw) > max_bytes:
        raise ApiError(413, f"the body is {len(raw)} bytes; the limit is {max_bytes}", code="body_too_large")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", code="invalid_encoding") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def client_ip(trusted_proxies: int):
    from flask import request
    if trusted_proxies > 0:  # X-Forwarded-For is set by the proxies we trust, counted from the right
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        if len(hops) >= trusted_proxies:
            return hops[-trusted_proxies]
    return request.remote_addr or "unknown"


OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "bad_method",
            413: "too_large", 415: "bad_media_type", 429: "rate_limited", 500: "error", 504: "timeout"}


def create_app(cfg=None):
    """The Flask app (gunicorn calls this in each worker, after the fork)."""
    from flask import Flask, g, jsonify, request
    from flask_limiter import Limiter
    from werkzeug.exceptions import HTTPException

    from common.logs import setup_logging
    cfg = cfg or load_config()
    setup_logging("serve", cfg.resolve(cfg.logging.dir), cfg.logging.level)
    s = cfg.serve
    state = ServerState(cfg)
    app = Flask("qwen-serve")
    app.extensions["qwen"] = state
    app.config["MAX_CONTENT_LENGTH"] = s.max_body_bytes
    limiter = Limiter(key_func=lambda: client_ip(s.trusted_proxies), app=app, storage_uri=s.rate_limit_storage,
                      headers_enabled=True, strategy="fixed-window")
    per_ip = limiter.shared_limit(s.rate_limits, scope="per-ip")
    everyone = limiter.shared_limit(s.global_rate_limit, scope="global", key_func=lambda: "all")

    def finish(endpoint: str, status: int, code: str | None, tokens_in=0, tokens_out=0) -> None:
        outcome = code if status == 503 and code else OUTCOMES.get(status, f"http_{status}")
        seconds = time.monotonic() - g.t0
        state.stats.record(endpoint, outcome, seconds, tokens_in, tokens_out)
        extra = {"request_id": g.rid, "client": client_ip(s.trusted_proxies), "endpoint": endpoint,
                 "status": status, "outcome": outcome, "latency_s": round(seconds, 4),
                 "prompt_tokens": tokens_in, "completion_tokens": tokens_out}
        if s.log_prompts and getattr(g, "prompt", None):
            extra["prompt"] = g.prompt
        log.info("%s %s %s %.3fs", endpoint, status, outcome, seconds, extra=extra)

    @app.before_request
    def start():
        g.t0, g.rid = time.monotonic(), request.headers.get("X-Request-ID") or uuid.uuid4().hex
        g.streaming, g.tokens = False, (0, 0)
        if request.path.startswith("/v1/") and state.keys:
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip() if auth.startswith("Bearer ") else ""
            if not any([hmac.compare_digest(given.encode(), k.encode()) for k in state.keys]):  # no short-circuit
                raise ApiError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                               code="invalid_api_key")

    @app.after_request
    def done(resp):
        resp.headers["X-Request-ID"] = g.rid
        if request.path.startswith("/v1/") and not g.streaming:
            finish(request.path, resp.status_code, getattr(g, "error_code", None), *g.tokens)
        return resp

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        g.error_code = e.code
        return jsonify(e.body()), e.status, e.headers

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        kind = "rate_limit_exceeded" if e.code == 429 else "invalid_request_error"
        message = f"rate limit exceeded ({e.description}); retry after the Retry-After seconds" if e.code == 429 \
            else e.description
        return api_error(ApiError(e.code, message, type=kind, code=OUTCOMES.get(e.code, "http_error")))

    @app.errorhandler(Exception)
    def server_error(e: Exception):
        log.exception("unhandled error on %s", request.path)
        return api_error(ApiError(500, "internal server error; see the server log", type="server_error"))

    def ready_for(p: Params) -> None:
        if not state.ready():
            code = "draining" if state.draining else "loading"
            raise ApiError(503, f"the model is {'shutting down' if state.draining else 'not loaded yet'}",
                           type="server_busy", code=code, headers={"Retry-After": "5"})
        if p.model not in (None, "", state.name):
            raise ApiError(404, f"model '{p.model}' is not served here; GET /v1/models lists '{state.name}'",
                           code="model_not_found", param="model")

    register_routes(app, state, [everyone, per_ip], ready_for, finish)
    return app


def register_routes(app, state: ServerState, limits, ready_for, finish) -> None:
    from flask import Response, g, jsonify, request, stream_with_context

    from common.prompts import answer_ids, classification_prompt

    s = state.cfg.serve

    def limited(view):
        for limit in limits:
            view = limit(view)
        return view

    def generate(p: Params, ids: list[int], endpoint: str, chunk, opening=None):
        """Run one generation; the JSON body, or an SSE response when streaming."""
        req = make_request(state, p, ids, p.stream)
        submit(state, req)
        g.tokens = (len(ids), 0)
        if not p.stream:
            wait(state, req)
            g.tokens = (len(ids), len(req.out_ids))
            return req
        g.streaming = True
        rid, t0 = g.rid, g.t0

        def on_end(r):  # the request context is gone by now: record with what was captured
            g.rid, g.t0 = rid, t0
            ok = r.finish_reason in ("stop", "length")
            finish(endpoint, 200 if ok else 504, None if ok else r.finish_reason, len(r.prompt_ids), len(r.out_ids))

        body = stream_with_context(stream(state, req, p, chunk, on_end, opening))
        return Response(body, mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                      "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    @limited
    def chat_completions():
        p = parse_chat(parse_body(request, s.max_body_bytes), s)
        ready_for(p)
        ids = prompt_ids(state, p)
        g.prompt = p.messages
        rid = new_id("chatcmpl")
        if p.labels is not None:
            if p.stream:
                raise ApiError(400, "classification ('labels') answers in one piece; send stream: false", param="stream")
            labels = resolve_labels(state, p.labels)
            (label, prob, probs), = classify(state, [ids], labels, time.monotonic() + s.request_timeout_s)
            n_out = len(answer_ids(state.tokenizer, label))
            g.tokens = (len(ids), n_out)
            return jsonify(chat_response(rid, state.name, label, "stop", usage(len(ids), n_out),
                                         {"label": label, "probability": prob, "probabilities": probs}))
        chunk = lambda text, fin: chat_chunk(rid, state.name, {"content": text} if text else {}, fin)  # noqa: E731
        out = generate(p, ids, "/v1/chat/completions", chunk,
                       opening=chat_chunk(rid, state.name, {"role": "assistant", "content": ""}))
        if isinstance(out, Response):
            return out
        return jsonify(chat_response(rid, state.name, out.text, out.finish_reason,
                                     usage(len(ids), len(out.out_ids))))

    @app.post("/v1/completions")
    @limited
    def completions():
        p = parse_completion(parse_body(request, s.max_body_bytes), s)
        ready_for(p)
        ids = prompt_ids(state, p)
        g.prompt = p.prompt
        rid = new_id("cmpl")
        out = generate(p, ids, "/v1/completions",
                       lambda text, fin: completion_response(rid, state.name, text, fin, None))
        if isinstance(out, Response):
            return out
        return jsonify(completion_response(rid, state.name, out.text, out.finish_reason,
                                           usage(len(ids), len(out.out_ids))))

    @app.post("/v1/classify")
    @limited
    def classify_texts():
        body = parse_body(request, s.max_body_bytes)
        texts = body.get("text") if isinstance(body, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not 1 <= len(texts) <= 32 or not all(isinstance(t, str) and t.strip()
                                                                                for t in texts):
            raise ApiError(400, "'text' must be a non-empty string or a list of 1-32 of them", param="text")
        p = Params(model=body.get("model"), labels=body.get("labels", True))
        ready_for(p)
        labels = resolve_labels(state, parse_labels({"labels": p.labels}))
        ids = [capped_ids(state, classification_prompt(state.tokenizer, t, labels, state.cfg.prompt), "text")
               for t in texts]
        results = classify(state, ids, labels, time.monotonic() + s.request_timeout_s)
        g.tokens = (sum(map(len, ids)), len(results))
        return jsonify({"id": new_id("cls"), "object": "classification", "model": state.name,
                        "results": [{"label": lab, "probability": pr, "probabilities": ps} for lab, pr, ps in results]})

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": state.name, "object": "model",
                                                    "created": int(state.stats.started), "owned_by": "local"}]})

    register_monitoring(app, state)


# ----------------------------------------------------------------------------- the command line
def preflight(cfg) -> list[str]:
    """What would stop the service from starting: the model to serve and the port."""
    import socket
    model_dir, adapter = serving_model(cfg)
    problems = [f"{d}: {f.message}" for d in filter(None, (model_dir, adapter))
                for f in check_model_dir(d) if f.level == "fail"]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.serve.host, cfg.serve.port))
        except OSError:
            problems.append(f"{cfg.serve.host}:{cfg.serve.port} is in use; stop what holds it or set PORT")
    return problems


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--check", action="store_true", help="preflight only: model files and port")
    parser.add_argument("--dev", action="store_true", help="run Flask's development server (not for production)")
    add_config_args(parser, "serve")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, "serve")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    problems = preflight(cfg)
    model_dir, adapter = serving_model(cfg)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems or args.check:
        print(f"model: {model_dir}{f' + adapter {adapter}' if adapter else ''}" if not problems else "", end="")
        print("" if problems else f"; port {cfg.serve.port} free")
        return 1 if problems else 0
    if args.dev:
        create_app(cfg).run(cfg.serve.host, cfg.serve.port, threaded=True)
        return 0
    parser.error("run it with gunicorn (bash start_production.sh), or pass --dev or --check")


if __name__ == "__main__":
    sys.exit(main())
