"""Check a running service end to end and print a table: health, models, answers, streaming, stats.

    python test_api.py                                         # http://127.0.0.1:8000
    python test_api.py --url http://gpu-box:8000 --api-key sk-...
    python test_api.py --limits                                # also show the 503 burst and the 429 limit

Answers: every item of data/sample_test.json is classified through POST /v1/classify (the prompt
contract, the model's labels.json or the file's labels) for accuracy and p50/p95 latency, and a few
through chat generation. Exit 1 when any check fails.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from common.bench import percentile
from common.cli import stage_parser
from common.config import ROOT


@dataclass
class Result:
    check: str
    ok: bool | None  # None = informational
    detail: str


class Api:
    def __init__(self, url: str, key: str | None, timeout: float):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.s = requests.Session()
        if key:
            self.s.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str):
        return self.s.get(self.url + path, timeout=self.timeout)

    def post(self, path: str, body: dict, **kw):
        return self.s.post(self.url + path, json=body, timeout=self.timeout, **kw)


def check_health(api: Api) -> Result:
    r = api.get("/health")
    return Result("health", r.status_code == 200, f"{r.status_code} {r.json().get('status')}")


def check_models(api: Api) -> tuple[Result, str | None]:
    r = api.get("/v1/models")
    if r.status_code != 200:
        return Result("models", False, f"{r.status_code} {r.text[:120]}"), None
    ids = [m["id"] for m in r.json()["data"]]
    return Result("models", len(ids) == 1, ", ".join(ids)), ids[0] if ids else None


def check_answers(api: Api, model: str, items: list[dict], min_accuracy: float, batch: int) -> Result:
    """Classify the test items, `batch` texts a call (the per-IP limit counts calls, not texts)."""
    labels: list[str] | bool = True  # the model's labels.json; the file's labels if it has none
    predicted, latencies = [], []
    for start in range(0, len(items), batch):
        texts = [it["text"] for it in items[start:start + batch]]
        t0 = time.perf_counter()
        r = api.post("/v1/classify", {"model": model, "text": texts, "labels": labels})
        if r.status_code == 400 and "labels.json" in r.text:
            labels = sorted({it["label"] for it in items})
            r = api.post("/v1/classify", {"model": model, "text": texts, "labels": labels})
        latencies.append(time.perf_counter() - t0)
        if r.status_code != 200:
            return Result("answers", False, f"{r.status_code} {r.text[:120]}")
        predicted += [x["label"] for x in r.json()["results"]]
    acc = sum(p == it["label"] for p, it in zip(predicted, items)) / len(items)
    return Result("answers", acc >= min_accuracy,
                  f"accuracy {acc:.3f} on {len(items)} items in {len(latencies)} calls; per call p50 "
                  f"{1000 * percentile(latencies, .5):.0f} ms, p95 {1000 * percentile(latencies, .95):.0f} ms; "
                  f"{1000 * sum(latencies) / len(items):.1f} ms per item")


def check_chat(api: Api, model: str, text: str) -> Result:
    r = api.post("/v1/chat/completions", {"model": model, "max_tokens": 16,
                                          "messages": [{"role": "user", "content": text}]})
    if r.status_code != 200:
        return Result("chat", False, f"{r.status_code} {r.text[:120]}")
    body = r.json()
    return Result("chat", body["object"] == "chat.completion",
                  f"{body['usage']['completion_tokens']} tokens: {body['choices'][0]['message']['content'][:40]!r}")


def check_stream(api: Api, model: str) -> Result:
    body = {"model": model, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "你好"}]}
    t0, first, events = time.perf_counter(), None, []
    with api.post("/v1/chat/completions", body, stream=True) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                first = first or time.perf_counter() - t0
                events.append(line[6:])
    ok = r.status_code == 200 and events and events[-1] == "[DONE]" and "finish_reason" in events[-2]
    return Result("streaming", bool(ok), f"{len(events)} events, first after {1000 * (first or 0):.0f} ms")


def check_stats(api: Api) -> Result:
    s = api.get("/stats").json()
    return Result("stats", "requests" in s and "latency_s" in s,
                  f"{s['requests']['total']} requests {s['requests']['by_outcome']}, p50 {s['latency_s']['p50']} s, "
                  f"in flight {s['in_flight']}, queue {s['queue']}")


def check_burst(api: Api, model: str, n: int) -> Result:
    """n simultaneous long generations: beyond the slots and the queue the server must say 503."""
    body = {"model": model, "max_tokens": 256, "ignore_eos": True, "messages": [{"role": "user", "content": "写一段话"}]}

    def one(_):
        r = requests.post(api.url + "/v1/chat/completions", json=body, headers=dict(api.s.headers), timeout=api.timeout)
        return r.status_code, r.headers.get("Retry-After")
    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    codes = {c: sum(1 for x, _ in results if x == c) for c in sorted({c for c, _ in results})}
    unexpected = set(codes) - {200, 429, 503, 504}
    missing_retry = any(c == 503 and not ra for c, ra in results)
    return Result("burst", not unexpected and not missing_retry and api.get("/health").status_code == 200,
                  f"{n} at once -> " + ", ".join(f"{c}: {k}" for c, k in codes.items()) +
                  ("" if 503 in codes else " (no 503: the per-IP rate limit or the slots+queue exceed what one "
                                           "client can send at once)"))


def check_rate_limit(api: Api, model: str, n: int) -> Result:
    """Rapid tiny calls until the per-IP limit answers 429 (with Retry-After), at most n."""
    body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    for i in range(1, n + 1):
        r = api.post("/v1/chat/completions", body)
        if r.status_code == 429:
            return Result("rate limit", "Retry-After" in r.headers,
                          f"429 on call {i}, Retry-After {r.headers.get('Retry-After')} s")
    return Result("rate limit", None, f"no 429 within {n} calls (the per-IP limit is higher)")


def read_items(path: Path) -> list[dict]:
    """The items to classify: a JSON array, or JSON lines (a prepared split), each with text and label."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def run(args) -> list[Result]:
    api = Api(args.url, args.api_key, args.timeout)
    try:
        results = [check_health(api)]
    except requests.ConnectionError:
        return [Result("health", False, f"nothing answers at {args.url}: start it with bash start_production.sh")]
    models, model = check_models(api)
    results.append(models)
    if model is None:
        return results
    items = read_items(Path(args.data))[:args.max_items or None]
    results += [check_answers(api, model, items, args.min_accuracy, args.batch), check_chat(api, model, items[0]["text"]),
                check_stream(api, model)]
    if args.limits:
        results += [check_burst(api, model, args.burst), check_rate_limit(api, model, args.rapid)]
    return results + [check_stats(api)]


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default %(default)s)")
    parser.add_argument("--api-key", help="Bearer key, when the service has API_KEYS")
    parser.add_argument("--data", default=str(ROOT / "data" / "sample_test.json"),
                        help="items with text and label: a JSON array or JSON lines")
    parser.add_argument("--max-items", type=int, default=0, help="classify only the first N items (0 = all)")
    parser.add_argument("--batch", type=int, default=32, help="texts per /v1/classify call (at most 32)")
    parser.add_argument("--min-accuracy", type=float, default=0.0, help="fail below this accuracy")
    parser.add_argument("--limits", action="store_true", help="also send a burst (503s) and rapid calls (429)")
    parser.add_argument("--burst", type=int, default=20, help="simultaneous requests for --limits")
    parser.add_argument("--rapid", type=int, default=15, help="rapid calls for --limits")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per HTTP call")
    args = parser.parse_args(argv)
    try:
        results = run(args)
    except (requests.RequestException, OSError, ValueError, KeyError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for r in results:
        mark = "PASS" if r.ok else "INFO" if r.ok is None else "FAIL"
        print(f"{mark:<5} {r.check:<11} {r.detail}")
    failed = sum(r.ok is False for r in results)
    print(f"\n{sum(r.ok is True for r in results)} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
