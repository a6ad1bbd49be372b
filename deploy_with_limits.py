"""The HTTP service: an OpenAI-compatible Flask app with hard limits, run by gunicorn.

    bash start_production.sh                     # gunicorn, config from config.yaml's serve section + env
    bash start_deploy.sh                         # Flask's development server, debug logging
    python deploy_with_limits.py --check         # preflight: the model to serve, its files, the port

Endpoints: POST /v1/chat/completions (stream too), POST /v1/completions, POST /v1/classify,
GET /v1/models, /health, /stats, /metrics, /dashboard (a live page). Limits (serve section): concurrent
generations, a bounded wait queue (503 + Retry-After beyond it), per-IP and global rate limits (429; shared
by workers and instances through Redis, common/serving/rate_limits.py), a request deadline (504, and the
generation stops), token and body caps, optional Bearer API keys. The model loads once
per worker process, after gunicorn forks, in a background thread (/health is 503 until it is ready).

To add an endpoint: write a short function below, then give it a line in ROUTES with the rules it
runs under; create_app applies those rules (key, rate limits, readiness) and the accounting.
"""
from __future__ import annotations

import functools
import hmac
import sys
import time
import uuid

from common.cli import run_stage
from common.config import load_config
from common.model.files import check_model_dir, serving_model
from common.serving.accounting import OUTCOMES, Accounting, log
from common.serving.http import client_gone, client_ip, parse_body, presented_key
from common.serving.monitoring import WORKER_ID, dashboard, health, metrics, stats
from common.serving.openai_wire import (ApiError, Params, chat_chunk, chat_response, completion_response, new_id,
                                        parse_chat, parse_classify, parse_completion, usage)
from common.serving.rate_limits import rate_limit_problems
from common.serving.worker import Worker


def this_worker() -> Worker:
    from flask import current_app
    return current_app.extensions["qwen"]


def gone():
    """Has this request's client hung up? (the worker polls it while the request waits)"""
    from flask import request
    return client_gone(request)


# ----------------------------------------------------------------------------- the endpoints
def parsed(w: Worker, parse) -> tuple[Params, list[int], Accounting]:
    """The body as `parse` validates it, for the model served here, its prompt tokenized once."""
    from flask import g, request
    p = parse(parse_body(request, w.cfg.serve.max_body_bytes), w.cfg.serve)
    w.check_model_name(p.model)
    return p, w.prompt_ids(p, g.acct), g.acct


def chat_completions(w: Worker):
    from flask import jsonify
    p, ids, acct = parsed(w, parse_chat)
    rid = new_id("chatcmpl")
    if p.labels is not None:
        return jsonify(classify_chat(w, p, ids, rid, acct))
    chunk = lambda text, fin: chat_chunk(rid, w.name, {"content": text} if text else {}, fin)  # noqa: E731
    req = w.generate(p, ids, acct)
    if p.stream:
        return sse_response(w.stream(req, p, chunk, acct, opening=chat_chunk(rid, w.name, {"role": "assistant",
                                                                                            "content": ""})))
    w.wait(req, gone, acct)
    return jsonify(chat_response(rid, w.name, req.text, req.finish_reason, usage(len(ids), len(req.out_ids))))


def classify_chat(w: Worker, p: Params, ids: list[int], rid: str, acct: Accounting) -> dict:
    """A chat request with `labels`: the answer is one label, scored, with every label's probability."""
    from common.text.prompts import answer_ids
    if p.stream:
        raise ApiError(400, "classification ('labels') answers in one piece; send stream: false", param="stream")
    result, = w.classify([ids], w.labels_for(p.labels), gone)
    acct.tokens_out = len(answer_ids(w.tokenizer, result["label"]))
    return chat_response(rid, w.name, result["label"], "stop", usage(len(ids), acct.tokens_out), result)


def completions(w: Worker):
    from flask import jsonify
    p, ids, acct = parsed(w, parse_completion)
    rid = new_id("cmpl")
    req = w.generate(p, ids, acct)
    if p.stream:
        return sse_response(w.stream(req, p, lambda text, fin: completion_response(rid, w.name, text, fin, None), acct))
    w.wait(req, gone, acct)
    return jsonify(completion_response(rid, w.name, req.text, req.finish_reason, usage(len(ids), len(req.out_ids))))


def classify_texts(w: Worker):
    from flask import g, jsonify, request
    texts, labels, model = parse_classify(parse_body(request, w.cfg.serve.max_body_bytes), w.cfg.serve)
    w.check_model_name(model)
    labels, acct = w.labels_for(labels), g.acct
    results = w.classify(w.classification_prompts(texts, labels, acct), labels, gone)
    acct.tokens_out = len(results)
    return jsonify({"id": new_id("cls"), "object": "classification", "model": w.name, "results": results})


def models(w: Worker):
    from flask import jsonify
    return jsonify({"object": "list", "data": [{"id": w.name, "object": "model",
                                                "created": int(w.stats.started), "owned_by": "local"}]})


def sse_response(events):
    from flask import Response, stream_with_context
    return Response(stream_with_context(events), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------- the routes and their rules
# open: anyone; key: the API key when keys are set; api: the key, the per-IP and global rate limits,
# and the model loaded (503 while loading or draining). Every view takes this process's Worker.
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


def check_key(w: Worker) -> None:
    """The key, when keys are set. Failures count per client address (serve.auth_failure_limit):
    past the limit even a right key gets 429 until the window ends, so keys cannot be guessed fast."""
    from flask import g, request
    if not w.keys:
        return
    wait_s = w.limits.auth_wait(g.acct.client)
    if wait_s:
        raise ApiError(429, f"too many failed authentications from this address ({w.limits.auth_failures}); "
                            f"retry in {wait_s}s", type="rate_limit_exceeded", code="auth_failures",
                       headers={"Retry-After": str(wait_s)})
    given = presented_key(request)
    if not any([hmac.compare_digest(given.encode(), k.encode()) for k in w.keys]):  # no short-circuit
        w.limits.auth_failed(g.acct.client)
        raise ApiError(401, "missing or invalid API key: send Authorization: Bearer <key>", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Basic realm="qwen-serve", charset="UTF-8"'})


def check_ready(w: Worker) -> None:
    if w.limits.refusing():  # serve.rate_limit_storage_down: refuse, and the shared counters are unreachable
        raise w.unavailable("the rate-limit storage is unreachable and this server counts every request there; "
                            "retry shortly", "rate_limit_storage_down")
    if not w.ready():
        raise w.unavailable(f"the model is {'shutting down' if w.draining else 'not loaded yet'}",
                            "draining" if w.draining else "loading")


def guarded(view, rule: str, limits: list):
    """The view behind its rules, in order: the key, the rate limits, the model loaded."""
    @functools.wraps(view)
    def when_ready():
        w = this_worker()
        if rule == "api":
            check_ready(w)
        return view(w)

    limited = when_ready
    for limit in limits if rule == "api" else []:
        limited = limit(limited)

    @functools.wraps(view)
    def with_key():
        if rule != "open":
            check_key(this_worker())
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


def add_accounting(app, w: Worker, limiter) -> None:
    """Every /v1/ request leaves one record (common/serving/accounting.py), written here and only here:
    when its response is made, or, for a stream, when the stream closes. Errors are OpenAI-shaped JSON."""
    from flask import g, jsonify, request
    from werkzeug.exceptions import HTTPException

    @app.before_request
    def start():
        g.acct = Accounting(request.path, request.headers.get("X-Request-ID") or uuid.uuid4().hex,
                            client_ip(request, w.cfg.serve.trusted_proxies))

    @app.after_request
    def done(resp):
        acct = g.acct
        resp.headers["X-Request-ID"] = acct.request_id
        resp.headers["X-Worker"] = WORKER_ID  # which gunicorn worker answered (the `worker` of its /stats)
        rate_limit_headers(limiter, resp)
        if request.path.startswith("/v1/"):
            if acct.streaming:  # its status is how the stream ends; the server closes it last
                resp.call_on_close(lambda: w.record(acct, resp.status_code))
            else:
                w.record(acct, resp.status_code)
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
    from flask import Flask, request

    from common.logs import quiet_libraries, setup_logging
    from common.serving.rate_limits import rate_limits
    quiet_libraries()
    cfg = cfg or load_config()
    setup_logging("serve", cfg.resolve(cfg.logging.dir), cfg.logging.level)
    s, w = cfg.serve, Worker(cfg)
    app = Flask("qwen-serve")
    app.extensions["qwen"] = w
    # one byte over: a chunked body (no Content-Length) is cut there rather than refused, and parse_body
    # then sees more than max_body_bytes and answers 413 instead of parsing a truncated body
    app.config["MAX_CONTENT_LENGTH"] = s.max_body_bytes + 1
    w.limits = rate_limits(app, s, key_func=lambda: client_ip(request, s.trusted_proxies))
    if w.limits.status is not None:
        w.stats.gauge("qwen_rate_limit_storage_up", "1 while the shared rate-limit storage answers, 0 while down",
                      lambda: float(w.limits.status.state() == "ok"))
    add_accounting(app, w, w.limits.limiter)
    for method, path, view, rule in ROUTES:
        app.add_url_rule(path, view_func=guarded(view, rule, w.limits.decorators), methods=[method])
    return app


# ----------------------------------------------------------------------------- the command line
def preflight(cfg) -> list[str]:
    """What would stop the service from starting: the model to serve and the port."""
    import socket
    model_dir, adapter = serving_model(cfg)
    problems = [f"{d}: {f.message}" for d in filter(None, (model_dir, adapter))
                for f in check_model_dir(d) if f.level == "fail"] + rate_limit_problems(cfg.serve)
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
