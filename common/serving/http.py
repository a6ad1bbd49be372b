"""What the service reads from an HTTP request, one place: the client's address, its key, its body, and
whether it is still connected. Each takes the Flask request as an argument: only deploy_with_limits.py
reads `flask.request`, and passes it down."""
from __future__ import annotations

import base64
import json
import re
import select
import socket

from common.serving.openai_wire import ApiError

SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a UTF-16 pair, or a whole pair


def client_ip(request, trusted_proxies: int) -> str:
    if trusted_proxies > 0:  # X-Forwarded-For is set by the proxies we trust, counted from the right
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        if len(hops) >= trusted_proxies:
            return hops[-trusted_proxies]
    return request.remote_addr or "unknown"


def presented_key(request) -> str:
    """The key a client sent: `Authorization: Bearer <key>`, or HTTP Basic with the key as the password
    (a browser on /dashboard asks for it once and sends it with the page's /stats polls)."""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    if auth.startswith("Basic "):
        try:
            return base64.b64decode(auth[6:], validate=True).decode().partition(":")[2]
        except ValueError:  # not base64, or not UTF-8: no key
            return ""
    return ""


def parse_body(request, max_bytes: int):
    """The JSON body, or the 4xx that says what is wrong with it."""
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


def client_gone(request) -> bool:
    """Has the client closed its connection? (gunicorn's socket: readable with nothing to read.)"""
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
