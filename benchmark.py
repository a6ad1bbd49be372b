"""Measure a running OpenAI-compatible service: throughput and latency by concurrency, and
classification by label scoring against generating the label.

    bash start_production.sh &  python benchmark.py                  # http://127.0.0.1:8000
    python benchmark.py --concurrency 1 3 --requests 24 --max-tokens 64 --json bench.json

Every generation request asks for exactly --max-tokens tokens (ignore_eos), so tokens/s compares
like with like. Prints the machine it ran on; the server's own limits must allow the load (raise
RATE_LIMITS for a long run: QWEN_SERVE_RATE_LIMITS=100000/minute bash start_production.sh).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import platform
import sys
import time
from pathlib import Path

import requests

from common.cli import stage_parser
from common.config import ROOT


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def chat_body(model: str, text: str, max_tokens: int, plain: bool) -> dict:
    """A greedy chat request; `plain` (a peer server) keeps to standard OpenAI fields, so no ignore_eos."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": text}]}
    return body if plain else body | {"ignore_eos": True}


def load_run(url: str, model: str, texts: list[str], concurrency: int, n: int, max_tokens: int, headers,
             plain: bool) -> dict:
    """n generation requests from `concurrency` clients at once: requests/s, tokens/s, latency."""
    def one(i):
        t0 = time.perf_counter()
        r = requests.post(url + "/v1/chat/completions",
                          json=chat_body(model, texts[i % len(texts)], max_tokens, plain), headers=headers, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [x for x, _ in results]
    return {"concurrency": concurrency, "requests": n, "seconds": round(wall, 2),
            "requests_per_s": round(n / wall, 2), "tokens_per_s": round(sum(t for _, t in results) / wall, 1),
            "p50_s": round(pct(lat, .5), 3), "p95_s": round(pct(lat, .95), 3)}


def classification_run(url: str, model: str, items: list[dict], headers) -> dict:
    """Per item: one scoring pass (/v1/classify) against generating the label text (chat, greedy)."""
    labels = sorted({it["label"] for it in items})
    score, gen = [], []
    for it in items:
        t0 = time.perf_counter()
        requests.post(url + "/v1/classify", json={"model": model, "text": it["text"], "labels": labels},
                      headers=headers, timeout=600).raise_for_status()
        score.append(time.perf_counter() - t0)
        body = {"model": model, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": it["text"]}]}
        t0 = time.perf_counter()
        requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600).raise_for_status()
        gen.append(time.perf_counter() - t0)
    return {"items": len(items), "scoring_p50_ms": round(1000 * pct(score, .5), 1),
            "generation_p50_ms": round(1000 * pct(gen, .5), 1), "generation_max_tokens": 8}


def bare_generate(model_dir: str, texts: list[str], n: int, max_tokens: int) -> dict:
    """The same prompts through model.generate in this process, one at a time: no service layer."""
    import torch

    from common.loading import load_model, load_tokenizer
    from common.prompts import prompt_ids
    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    lat, tokens = [], 0
    t_all = time.perf_counter()
    for i in range(n):
        ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": texts[i % len(texts)]}])])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
        lat.append(time.perf_counter() - t0)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t_all
    return {"concurrency": 1, "requests": n, "seconds": round(wall, 2), "requests_per_s": round(n / wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(pct(lat, .5), 3), "p95_s": round(pct(lat, .95), 3)}


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="the model id to send (default: the first of GET /v1/models)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--requests", type=int, default=12, help="generation requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--classify-items", type=int, default=16)
    parser.add_argument("--data", default=str(ROOT / "data" / "sample_test.json"))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--plain", action="store_true",
                        help="standard OpenAI fields only (a peer such as `transformers serve`); no classification")
    parser.add_argument("--bare", metavar="MODEL_DIR", help="instead of a server: model.generate in this process")
    args = parser.parse_args(argv)
    items = json.loads(Path(args.data).read_text(encoding="utf-8"))
    if args.bare:
        r = bare_generate(args.bare, [it["text"] for it in items], args.requests, args.max_tokens)
        print(f"machine: {machine()}; bare model.generate, {args.max_tokens} tokens max per request")
        print(f"{r['requests_per_s']} req/s, {r['tokens_per_s']} tokens/s, p50 {r['p50_s']} s, p95 {r['p95_s']} s")
        return 0
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    try:
        model = args.model or requests.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        requests.post(url + "/v1/chat/completions", json=chat_body(model, "warm up", 4, args.plain), headers=headers,
                      timeout=600).raise_for_status()
        runs = [load_run(url, model, [it["text"] for it in items], c, args.requests, args.max_tokens, headers,
                         args.plain) for c in args.concurrency]
        cls = None if args.plain else classification_run(url, model, items[:args.classify_items], headers)
    except (requests.RequestException, KeyError, IndexError) as e:
        print(f"error: {e} (is the service at {url} running, with rate limits above this load?)", file=sys.stderr)
        return 1
    print(f"machine: {machine()}; model {model}; {args.max_tokens} tokens per request")
    print(f"{'concurrency':>11} {'req/s':>7} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7}")
    for r in runs:
        print(f"{r['concurrency']:>11} {r['requests_per_s']:>7} {r['tokens_per_s']:>9} {r['p50_s']:>7} {r['p95_s']:>7}")
    base = runs[0]["tokens_per_s"]
    for r in runs[1:]:
        print(f"throughput at concurrency {r['concurrency']}: {r['tokens_per_s'] / base:.2f}x concurrency "
              f"{runs[0]['concurrency']}")
    if cls:
        print(f"classification per item (p50): label scoring {cls['scoring_p50_ms']} ms, generating the label "
              f"(up to 8 tokens) {cls['generation_p50_ms']} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "model": model, "runs": runs,
                                               "classification": cls}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
