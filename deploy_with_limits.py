"""The HTTP service: an OpenAI-compatible Flask app with hard limits, run by gunicorn.

    bash start_production.sh                     # gunicorn, config from config.yaml's serve section + env
    bash start_deploy.sh                         # Flask's development server, debug logging
    python deploy_with_limits.py --check         # preflight: the model to serve, its files, the port

Endpoints: POST /v1/chat/completions (stream too), POST /v1/completions, POST /v1/classify,
GET /v1/models, /health, /stats, /metrics, /dashboard (a live page). Limits (serve section): concurrent
generations, a bounded wait queue (503 + Retry-After beyond it), per-IP and global rate limits (429; shared
by workers and instances through Redis, common/rate_limits.py), a request deadline (504, and the
generation stops), token and body caps, optional Bearer API keys. The model loads once
per worker process, after gunicorn forks, in a background thread (/health is 503 until it is ready).

To add an endpoint: write a short function below, then give it a line in ROUTES with the rules it
runs under; create_app applies those rules (key, rate limits, readiness) and the accounting.
"""
from __future__ import annotations

import base64
import functools
import hmac
import sys
import time
import uuid

from common.cli import run_stage
from common.config import load_config
from common.model_files import check_model_dir, serving_model
from common.monitoring import WORKER_ID, dashboard, health, metrics, stats
from common.openai_schema import (ApiError, Params, chat_chunk, chat_response, completion_response, new_id,
                                  parse_chat, parse_classify, parse_completion, usage)
from common.rate_limits import check_settings
from common.service import (OUTCOMES, Accounting, ServerState, capped, check_model_name, classify, client_ip,
                            generation, log, parse_body, request_ids, resolve_labels, stream, wait)


def state() -> ServerState:
    from flask import current_app
    return current_app.extensions["qwen"]


# ----------------------------------------------------------------------------- the endpoints
def parsed(parse) -> tuple[ServerState, Params, list[int]]:
    """The body as `parse` validates it, for the model served here, its prompt tokenized once."""
    from flask import g, request
    st = state()
    p = parse(parse_body(request, st.cfg.serve.max_body_bytes), st.cfg.serve)
    check_model_name(st, p.model)
    ids = request_ids(st, p)
    g.acct.prompt, g.acct.tokens_in = p.messages or p.prompt, len(ids)
    return st, p, ids


def chat_completions():
    from flask import jsonify
    st, p, ids = parsed(parse_chat)
    rid = new_id("chatcmpl")
    if p.labels is not None:
        return jsonify(classify_chat(st, p, ids, rid))
    chunk = lambda text, fin: chat_chunk(rid, st.name, {"content": text} if text else {}, fin)  # noqa: E731
    req = submit_generation(st, p, ids)
    if p.stream:
        return sse_response(st, req, p, chunk, opening=chat_chunk(rid, st.name, {"role": "assistant", "content": ""}))
    finish(st, req)
    return jsonify(chat_response(rid, st.name, req.text, req.finish_reason, usage(len(ids), len(req.out_ids))))


def classify_chat(st: ServerState, p: Params, ids: list[int], rid: str) -> dict:
    """A chat request with `labels`: the answer is one label, scored, with every label's probability."""
    from flask import g

    from common.prompts import answer_ids
    if p.stream:
        raise ApiError(400, "classification ('labels') answers in one piece; send stream: false", param="stream")
    (label, prob, probs), = classify(st, [ids], resolve_labels(st, p.labels))
    g.acct.tokens_out = len(answer_ids(st.tokenizer, label))
    return chat_response(rid, st.name, label, "stop", usage(len(ids), g.acct.tokens_out),
                         {"label": label, "probability": prob, "probabilities": probs})


def completions():
    from flask import jsonify
    st, p, ids = parsed(parse_completion)
    rid = new_id("cmpl")
    req = submit_generation(st, p, ids)
    if p.stream:
        return sse_response(st, req, p, lambda text, fin: completion_response(rid, st.name, text, fin, None))
    finish(st, req)
    return jsonify(completion_response(rid, st.name, req.text, req.finish_reason, usage(len(ids), len(req.out_ids))))


def classify_texts():
    from flask import g, jsonify, request

    from common.prompts import classification_ids
    st = state()
    texts, labels, model = parse_classify(parse_body(request, st.cfg.serve.max_body_bytes), st.cfg.serve)
    check_model_name(st, model)
    labels = resolve_labels(st, labels)
    ids = [capped(st, x, "text") for x in classification_ids(st.tokenizer, texts, labels, st.cfg.prompt)]
    g.acct.tokens_in = sum(map(len, ids))
    results = classify(st, ids, labels)
    g.acct.tokens_out = len(results)
    return jsonify({"id": new_id("cls"), "object": "classification", "model": st.name,
                    "results": [{"label": lab, "probability": pr, "probabilities": ps} for lab, pr, ps in results]})


def models():
    from flask import jsonify
    st = state()
    return jsonify({"object": "list", "data": [{"id": st.name, "object": "model",
                                                "created": int(st.stats.started), "owned_by": "local"}]})


def submit_generation(st: ServerState, p: Params, ids: list[int]):
    """Submit the generation; its record notes the sampling it runs with (defaults filled in)."""
    from flask import g
    req = generation(st, p, ids)
    g.acct.sampling, g.acct.generation = req.sampling.as_dict(), req
    return req


def finish(st: ServerState, req) -> None:
    """Wait for a non-streaming generation; its tokens go to the request's record, however it ended."""
    from flask import g
    try:
        wait(st, req)
    finally:
        g.acct.tokens_out = len(req.out_ids)


def sse_response(st: ServerState, req, p: Params, chunk, opening: dict | None = None):
    from flask import Response, g, stream_with_context
    g.acct.deferred = True  # the stream records itself when it ends
    body = stream_with_context(stream(st, req, p, chunk, g.acct, opening))
    return Response(body, mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                  "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------- the routes and their rules
# open: anyone; key: the API key when keys are set; api: the key, the per-IP and global rate limits,
# and the model loaded (503 while loading or draining).
ROUTES = [
    ("POST", "/v1/chat/completions", chat_completions, "api"),
    ("POST", "/v1/completions", completions, "api"),
    ("POST", "/v1/classify", classify_texts, "api"),
    ("GET", "/v1/models", models, "key"),
    ("GET", "/health", health, "open"),
    ("GET", "/stats", stats, "key"),
    ("GET", "/metrics", metrics, "open"),
    ("GET", "/dashboard", dashboard, "key"),
]


def presented_key() -> str:
    """The key a client sent: `Authorization: Bearer <key>`, or HTTP Basic with the key as the password
    (a browser on /dashboard asks for it once and sends it with the page's /stats polls)."""
    from flask import request
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    if auth.startswith("Basic "):
        try:
            return base64.b64decode(auth[6:], validate=True).decode().partition(":")[2]
        except ValueError:  # not base64, or not UTF-8: no key
            return ""
    return ""


def check_key(st: ServerState) -> None:
    """The key, when keys are set. Failures count per client address (serve.auth_failure_limit):
    past the limit even a right key gets 429 until the window ends, so keys cannot be guessed fast."""
    from flask import g
    if not st.keys:
        return
    wait_s = st.limits.auth_wait(g.acct.client)
    if wait_s:
        raise ApiError(429, f"too many failed authentications from this address ({st.limits.auth_failures}); "
                            f"retry in {wait_s}s", type="rate_limit_exceeded", code="auth_failures",
                       headers={"Retry-After": str(wait_s)})
    given = presented_key()
    if not any([hmac.compare_digest(given.encode(), k.encode()) for k in st.keys]):  # no short-circuit
        st.limits.auth_failed(g.acct.client)
        raise ApiError(401, "missing or invalid API key: send Authorization: Bearer <key>", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Basic realm="qwen-serve", charset="UTF-8"'})


def check_ready(st: ServerState) -> None:
    if st.limits.refusing():  # serve.rate_limit_storage_down: refuse, and the shared counters are unreachable
        raise st.unavailable("the rate-limit storage is unreachable and this server counts every request there; "
                             "retry shortly", "rate_limit_storage_down")
    if not st.ready():
        raise st.unavailable(f"the model is {'shutting down' if st.draining else 'not loaded yet'}",
                             "draining" if st.draining else "loading")


def guarded(view, rule: str, limits: list):
    """The view behind its rules, in order: the key, the rate limits, the model loaded."""
    @functools.wraps(view)
    def when_ready():
        if rule == "api":
            check_ready(state())
        return view()

    limited = when_ready
    for limit in limits if rule == "api" else []:
        limited = limit(limited)

    @functools.wraps(view)
    def with_key():
        if rule != "open":
            check_key(state())
        return limited()
    return with_key


def rate_limit_headers(limiter, resp) -> None:
    """X-RateLimit-* of the limit closest to running out (per-IP or global); Retry-After on a 429 only."""
    limits = limiter.current_limits
    if not limits:
        return
    tight = min(limits, key=lambda lim: (not lim.breached, lim.remaining))
    resp.headers["X-RateLimit-Limit"] = str(tight.limit.amount)
    resp.headers["X-RateLimit-Remaining"] = str(tight.remaining)
    resp.headers["X-RateLimit-Reset"] = str(tight.reset_at)
    if resp.status_code == 429 and "Retry-After" not in resp.headers:
        resp.headers["Retry-After"] = str(max(tight.reset_at - int(time.time()), 1))


def add_accounting(app, st: ServerState, limiter) -> None:
    """Every /v1/ request leaves one record (common.service.Accounting); errors are OpenAI-shaped JSON."""
    from flask import g, jsonify, request
    from werkzeug.exceptions import HTTPException

    @app.before_request
    def start():
        g.acct = Accounting(request.path, request.headers.get("X-Request-ID") or uuid.uuid4().hex,
                            client_ip(st.cfg.serve.trusted_proxies))

    @app.after_request
    def done(resp):
        resp.headers["X-Request-ID"] = g.acct.request_id
        resp.headers["X-Worker"] = WORKER_ID  # which gunicorn worker answered (the `worker` of its /stats)
        rate_limit_headers(limiter, resp)
        if request.path.startswith("/v1/") and not g.acct.deferred:
            g.acct.record(st, resp.status_code)
        return resp

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        g.acct.code = e.code
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


def create_app(cfg=None):
    """The Flask app (gunicorn calls this in each worker, after the fork)."""
    from flask import Flask

    from common.logs import setup_logging
    from common.rate_limits import rate_limits
    cfg = cfg or load_config()
    setup_logging("serve", cfg.resolve(cfg.logging.dir), cfg.logging.level)
    s, st = cfg.serve, ServerState(cfg)
    app = Flask("qwen-serve")
    app.extensions["qwen"] = st
    # one byte over: a chunked body (no Content-Length) is cut there rather than refused, and parse_body
    # then sees more than max_body_bytes and answers 413 instead of parsing a truncated body
    app.config["MAX_CONTENT_LENGTH"] = s.max_body_bytes + 1
    st.limits = rate_limits(app, s, key_func=lambda: client_ip(s.trusted_proxies))
    if st.limits.status is not None:
        st.stats.gauge("qwen_rate_limit_storage_up", "1 while the shared rate-limit storage answers, 0 while down",
                       lambda: float(st.limits.status.state() == "ok"))
    add_accounting(app, st, st.limits.limiter)
    for method, path, view, rule in ROUTES:
        app.add_url_rule(path, view_func=guarded(view, rule, st.limits.decorators), methods=[method])
    return app


# ----------------------------------------------------------------------------- the command line
def preflight(cfg) -> list[str]:
    """What would stop the service from starting: the model to serve and the port."""
    import socket
    model_dir, adapter = serving_model(cfg)
    problems = [f"{d}: {f.message}" for d in filter(None, (model_dir, adapter))
                for f in check_model_dir(d) if f.level == "fail"] + check_settings(cfg.serve)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.serve.host, cfg.serve.port))
        except OSError:
            problems.append(f"{cfg.serve.host}:{cfg.serve.port} is in use; stop what holds it or set PORT")
    return problems


def run(cfg, check: bool = False, dev: bool = False) -> int:
    """--check: the preflight alone; --dev: Flask's development server. Production is gunicorn's."""
    problems = preflight(cfg)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    model_dir, adapter = serving_model(cfg)
    if check:
        print(f"model: {model_dir}{f' + adapter {adapter}' if adapter else ''}; port {cfg.serve.port} free")
        return 0
    if dev:
        create_app(cfg).run(cfg.serve.host, cfg.serve.port, threaded=True)
        return 0
    print("run it with gunicorn (bash start_production.sh), or pass --dev or --check", file=sys.stderr)
    return 2


def add_args(parser) -> None:
    parser.add_argument("--check", action="store_true", help="preflight only: model files and port")
    parser.add_argument("--dev", action="store_true", help="run Flask's development server (not for production)")


def main(argv=None) -> int:
    return run_stage("deploy_with_limits", __doc__, lambda cfg, a: run(cfg, a.check, a.dev), section="serve",
                     add_args=add_args, report=lambda status: status, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
