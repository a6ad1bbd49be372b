"""The OpenAI wire format the server speaks: request validation and response shapes.

Every check names the field it refuses, so a client sees one clear 400 instead of a 500. Fields a
client may send that change nothing here (user, metadata, zero penalties) are accepted; fields that
would change the answer in a way this server cannot honour (tools, n > 1, logprobs) are refused
rather than silently ignored.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
ZERO_OK = {"logprobs": False, "top_logprobs": 0, "n": 1}
# sampling fields: (low, high, integer); a request that names none of them gets the server's defaults
SAMPLING = {"temperature": (0, 2, False), "top_p": (1e-6, 1, False), "top_k": (-1, 100_000, True),
            "min_p": (0, 1, False), "presence_penalty": (-2, 2, False), "frequency_penalty": (-2, 2, False),
            "repetition_penalty": (1e-6, 2, False)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass
class Params:
    """One validated request: what the engine and the response builder need."""
    model: str | None
    messages: list[dict] | None = None    # chat
    prompt: str | None = None             # completions
    max_tokens: int = 256
    sampling: dict = field(default_factory=dict)  # the sampling fields the request named (SAMPLING)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    ignore_eos: bool = False
    labels: list[str] | bool | None = None   # classification: candidate labels, or True = the model's own
    chat_template_kwargs: dict = field(default_factory=dict)


def _number(body: dict, name: str, lo: float, hi: float, default: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def _check_keys(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed or key in HARMLESS:
            continue
        if key in ZERO_OK and value in (ZERO_OK[key], None):
            continue
        if key in ZERO_OK:
            raise bad(key, f"'{key}' = {value!r} is not supported by this server")
        raise bad(key, f"unknown or unsupported field '{key}'")


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # OpenAI's list-of-parts form, text parts only
    raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        out.append({"role": m["role"], "content": _content(m, i)})
    if not any(m["role"] == "user" for m in out):
        raise bad("messages", "'messages' needs at least one user message")
    return out


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "'model' must be a string")
    return model


def parse_labels(body: dict, max_labels: int):
    """`labels` (or vLLM's `guided_choice`): None, True (the model's labels.json) or a list of labels."""
    value = body.get("labels", body.get("guided_choice"))
    name = "labels" if "labels" in body else "guided_choice"
    if value is None or value is True:
        return value
    if (not isinstance(value, list) or not 2 <= len(value) <= max_labels
            or not all(isinstance(v, str) and v.strip() for v in value) or len(set(value)) != len(value)):
        raise bad(name, f"'{name}' must be true (the model's labels) or a list of 2-{max_labels} distinct "
                        f"non-empty strings")
    return value


def parse_classify(body, limits) -> tuple[list[str], object, str | None]:
    """POST /v1/classify: (texts, labels as parse_labels gives them, model)."""
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    _check_keys(body, {"model", "text", "labels"})
    texts = body.get("text")
    texts = [texts] if isinstance(texts, str) else texts
    n = limits.max_classify_texts
    if not isinstance(texts, list) or not 1 <= len(texts) <= n or not all(isinstance(t, str) and t.strip()
                                                                           for t in texts):
        raise bad("text", f"'text' must be a non-empty string or a list of 1-{n} of them")
    return texts, parse_labels({"labels": body.get("labels", True)}, limits.max_labels), _model(body)


def _common(body: dict, limits) -> dict:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "'stop' must be a non-empty string or a list of them")
    if len(stop) > limits.max_stop:
        raise bad("stop", f"'stop' may hold at most {limits.max_stop} strings, got {len(stop)}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, 1, limits.max_tokens, limits.default_max_tokens, integer=True)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not set(opts) <= {"include_usage"}:
        raise bad("stream_options", "'stream_options' may only hold 'include_usage'")
    for flag in ("stream", "ignore_eos"):
        if not isinstance(body.get(flag, False), bool):
            raise bad(flag, f"'{flag}' must be true or false")
    return dict(model=_model(body), max_tokens=max_tokens, stop=stop, stream=body.get("stream", False),
                include_usage=bool(opts.get("include_usage")), ignore_eos=body.get("ignore_eos", False),
                sampling={k: _number(body, k, lo, hi, None, integer=i) for k, (lo, hi, i) in SAMPLING.items()
                          if body.get(k) is not None},
                seed=_number(body, "seed", -2**63, 2**63 - 1, None, integer=True))


COMMON_KEYS = {"model", "max_tokens", "max_completion_tokens", *SAMPLING, "stop", "stream",
               "stream_options", "seed", "ignore_eos"}


def parse_chat(body, limits) -> Params:
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    _check_keys(body, COMMON_KEYS | {"messages", "labels", "guided_choice", "chat_template_kwargs"})
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or not set(kwargs) <= {"enable_thinking"} \
            or not isinstance(kwargs.get("enable_thinking", False), bool):
        raise bad("chat_template_kwargs", "'chat_template_kwargs' may only hold 'enable_thinking' (true/false)")
    return Params(messages=parse_messages(body.get("messages")), labels=parse_labels(body, limits.max_labels), chat_template_kwargs=kwargs,
                  **_common(body, limits))


def parse_completion(body, limits) -> Params:
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    _check_keys(body, COMMON_KEYS | {"prompt"})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "'prompt' must be a non-empty string")
    return Params(prompt=prompt, **_common(body, limits))


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict, extra: dict | None = None) -> dict:
    message = {"role": "assistant", "content": text, **(extra or {})}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish: str | None, use: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    return body | ({"usage": use} if use is not None else {})
