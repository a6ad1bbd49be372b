"""Measure a running OpenAI-compatible service (ours or a peer such as `transformers serve`).

    python benchmark.py                                   # throughput: tokens/s, p50/p95 at concurrency 1 and 3
    python benchmark.py --mode classify                   # the trained prompt: scoring vs generating the label
    python benchmark.py --mode overload --clients 30 --per-client 3      # served / rejected / latency under load
    python benchmark.py --url http://127.0.0.1:8141 --plain --model models/tiny-qwen3   # a peer: OpenAI fields only
    python benchmark.py --bare models/tiny-qwen3          # no server: model.generate in this process
    python benchmark.py --bare models/tiny-qwen3 --prompt-tokens 2048 --max-tokens 128 --requests 2

Generation requests ask for exactly --max-tokens tokens (ignore_eos; a --plain peer gets no such field),
so tokens/s compares like with like. Classification sends each item through the prompt contract (the
system prompt and user template it was trained on, labels in labels.json's order) and parses the reply,
so accuracy stands beside items/s. Prints the machine it ran on; the service's rate limits must allow
the load (QWEN_SERVE_RATE_LIMITS=100000/minute QWEN_SERVE_GLOBAL_RATE_LIMIT=100000/minute).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import sys
import time
from pathlib import Path

import requests

from common.bench import machine, percentile, timed_pool
from common.cli import stage_parser
from common.config import ROOT, load_config


def chat_body(model: str, messages: list[dict], max_tokens: int, plain: bool, exact: bool = True) -> dict:
    """A greedy chat request; `plain` (a peer server) keeps to standard OpenAI fields, so no ignore_eos."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": messages}
    return body if plain or not exact else body | {"ignore_eos": True}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def load_run(url: str, model: str, texts: list[str], concurrency: int, n: int, max_tokens: int, headers,
             plain: bool) -> dict:
    """n generation requests from `concurrency` clients at once: requests/s, tokens/s, latency."""
    def one(i):
        t0 = time.perf_counter()
        r = requests.post(url + "/v1/chat/completions", json=chat_body(model, user(texts[i % len(texts)]), max_tokens,
                                                                       plain), headers=headers, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [x for x, _ in results]
    return {"concurrency": concurrency, "requests": n, "seconds": round(wall, 2),
            "requests_per_s": round(n / wall, 2), "tokens_per_s": round(sum(t for _, t in results) / wall, 1),
            "p50_s": round(percentile(lat, .5), 3), "p95_s": round(percentile(lat, .95), 3)}


# ----------------------------------------------------------------------------- classification
def classify_rows(url: str, model: str, items: list[dict], labels: list[str], headers, plain: bool,
                  concurrency: int, generate_tokens: int = 8) -> list[dict]:
    """Generating the label through the trained prompt (at most generate_tokens tokens); unless plain,
    /v1/classify 1 and 32 texts a call."""
    from common.text.prompts import build_messages, parse_label
    pcfg = load_config(use_env=False).prompt
    truth = [it["label"] for it in items]

    def generate(it):
        body = chat_body(model, build_messages(it["text"], labels, pcfg), generate_tokens, plain, exact=False)
        r = requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
        r.raise_for_status()
        return [parse_label(r.json()["choices"][0]["message"]["content"], labels)]

    def score(batch):
        r = requests.post(url + "/v1/classify", json={"model": model, "text": [it["text"] for it in batch],
                                                       "labels": labels}, headers=headers, timeout=600)
        r.raise_for_status()
        return [x["label"] for x in r.json()["results"]]

    ways = [("generating the label (chat, greedy)", generate, items)]
    if not plain:
        ways += [("label scoring, 1 text a call", score, [[it] for it in items]),
                 ("label scoring, 32 texts a call", score, [items[i:i + 32] for i in range(0, len(items), 32)])]
    rows = []
    for name, fn, jobs in ways:
        answers, wall = timed_pool(fn, jobs, concurrency)
        got = [a for batch in answers for a in batch]
        rows.append({"way": name, "concurrency": concurrency, "items": len(items),
                     "items_per_s": round(len(items) / wall, 1), "ms_per_item": round(1000 * wall / len(items), 1),
                     "accuracy": round(sum(g == t for g, t in zip(got, truth)) / len(items), 3),
                     "invalid": sum(g is None for g in got)})
    return rows


def model_labels(items: list[dict]) -> list[str]:
    """The labels in the order training put them in the prompt (data.processed_dir/labels.json)."""
    from common.text.prepared import read_labels
    cfg = load_config(use_env=False)
    return read_labels(cfg.resolve(cfg.data.processed_dir)) or list(dict.fromkeys(it["label"] for it in items))


# ----------------------------------------------------------------------------- overload
def overload_run(url: str, model: str, texts: list[str], clients: int, per_client: int, max_tokens: int, headers,
                 plain: bool) -> dict:
    """`clients` clients at once, each sending `per_client` requests one after another: what was served,
    what was refused (and how fast), the admitted requests' latency, tokens/s."""
    def client(c):
        out = []
        for k in range(per_client):
            t0 = time.perf_counter()
            r = requests.post(url + "/v1/chat/completions", json=chat_body(model, user(texts[(c + k) % len(texts)]),
                                                                           max_tokens, plain), headers=headers,
                              timeout=600)
            out.append((r.status_code, time.perf_counter() - t0,
                        r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0))
        return out
    results, wall = timed_pool(client, list(range(clients)), clients)
    flat = [x for c in results for x in c]
    ok = [s for code, s, _ in flat if code == 200]
    refused = [s for code, s, _ in flat if code != 200]
    codes: dict[int, int] = {}
    for code, _, _ in flat:
        codes[code] = codes.get(code, 0) + 1
    return {"clients": clients, "per_client": per_client, "requests": len(flat), "served": len(ok),
            "refused": len(refused), "codes": codes, "seconds": round(wall, 2),
            "tokens_per_s": round(sum(t for _, _, t in flat) / wall, 1),
            "admitted_p50_s": round(percentile(ok, .5), 3), "admitted_p95_s": round(percentile(ok, .95), 3),
            "admitted_max_s": round(max(ok, default=float("nan")), 3),
            "refusal_p50_ms": round(1000 * percentile(refused, .5), 1) if refused else None}


# ----------------------------------------------------------------------------- in process, no server
class FirstToken:
    """A generate() streamer that notes when the first new token came (its first put() is the prompt)."""
    def __init__(self):
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def bare_generate(model_dir: str, prompts: list[list[dict]], n: int, max_tokens: int) -> dict:
    """The same prompts through model.generate in this process, one at a time, loaded as the server loads
    them (precision, placement, GPU cap, int8 threshold: QWEN_* and the config apply), exactly max_tokens
    each: the model's own speed, with no service around it."""
    import torch

    from common.model.loading import load_tokenizer, model_device
    from common.model.memory import load_as_served
    from common.text.prompts import prompt_ids
    t0 = time.perf_counter()
    tok, (model, placement) = load_tokenizer(model_dir), load_as_served(load_config(), Path(model_dir))
    load_s, device = time.perf_counter() - t0, model_device(model)
    with torch.no_grad():  # the first pass sets up kernels and workspaces: a server has done that before it counts
        ids = torch.tensor([prompt_ids(tok, prompts[0])], device=device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    lat, ttft, decode, tokens = [], [], [], 0
    t_all = time.perf_counter()
    for i in range(n):
        ids = torch.tensor([prompt_ids(tok, prompts[i % len(prompts)])], device=device)
        first, t0 = FirstToken(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, streamer=first)
        done, new = time.perf_counter(), out.shape[1] - ids.shape[1]
        lat.append(done - t0)
        ttft.append(first.at - t0)
        decode.append((new - 1) / max(done - first.at, 1e-9))
        tokens += new
    wall = time.perf_counter() - t_all
    return {"concurrency": 1, "requests": n, "prompt_tokens": len(ids[0]), "load_seconds": round(load_s, 1),
            "placement": placement.__dict__, "seconds": round(wall, 2), "requests_per_s": round(n / wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(percentile(ttft, .5), 3),
            "decode_tokens_per_s": round(percentile(decode, .5), 1), "p50_s": round(percentile(lat, .5), 3),
            "p95_s": round(percentile(lat, .95), 3)}


# ----------------------------------------------------------------------------- the command line
def table(rows: list[dict], keys: list[str]) -> None:
    print("  ".join(f"{k:>{max(len(k), 8)}}" for k in keys))
    for r in rows:
        print("  ".join(f"{str(r[k]):>{max(len(k), 8)}}" for k in keys))


def run(args) -> dict:
    items = json.loads(Path(args.data).read_text(encoding="utf-8"))
    texts = [it["text"] for it in items]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    model = args.model or requests.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    requests.post(url + "/v1/chat/completions", json=chat_body(model, user("warm up"), 4, args.plain),
                  headers=headers, timeout=600).raise_for_status()
    out = {"machine": machine(), "model": model, "mode": args.mode}
    if args.mode == "generate":
        out["runs"] = [load_run(url, model, texts, c, args.requests, args.max_tokens, headers, args.plain)
                       for c in args.concurrency]
    elif args.mode == "classify":
        labels = args.labels.split(",") if args.labels else model_labels(items)
        chosen = items[:args.classify_items] if args.classify_items else items
        out["runs"] = [row for c in args.concurrency
                       for row in classify_rows(url, model, chosen, labels, headers, args.plain, c,
                                                args.generate_tokens)]
    else:
        out["runs"] = [overload_run(url, model, texts, args.clients, args.per_client, args.max_tokens, headers,
                                    args.plain)]
    return out


COLUMNS = {"generate": ["concurrency", "requests_per_s", "tokens_per_s", "p50_s", "p95_s"],
           "classify": ["way", "concurrency", "items_per_s", "ms_per_item", "accuracy", "invalid"],
           "overload": ["requests", "served", "refused", "codes", "tokens_per_s", "admitted_p50_s", "admitted_p95_s",
                        "admitted_max_s", "refusal_p50_ms"]}


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="the model id to send (default: the first of GET /v1/models)")
    parser.add_argument("--mode", choices=list(COLUMNS), default="generate")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--requests", type=int, default=12, help="generation requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--classify-items", type=int, default=0, help="items to classify (0 = all of --data)")
    parser.add_argument("--labels", help="classify: the labels in the prompt's order, comma-separated (default: "
                        "data.processed_dir/labels.json, else those of --data)")
    parser.add_argument("--generate-tokens", type=int, default=8,
                        help="classify: tokens a generated label may take (the label and its end of turn)")
    parser.add_argument("--clients", type=int, default=30, help="overload: clients at once")
    parser.add_argument("--per-client", type=int, default=3, help="overload: requests each, one after another")
    parser.add_argument("--data", default=str(ROOT / "data" / "sample_test.json"))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--plain", action="store_true",
                        help="standard OpenAI fields only (a peer such as `transformers serve`); no /v1/classify")
    parser.add_argument("--bare", metavar="MODEL_DIR", help="instead of a server: model.generate in this process, "
                        "loaded as the server would load it")
    parser.add_argument("--prompt-tokens", type=int, help="with --bare: one filler prompt of about this many tokens "
                        "instead of --data's texts")
    args = parser.parse_args(argv)
    if args.bare:
        from common.model.loading import load_tokenizer
        from common.text.prompts import filler_text
        texts = [filler_text(load_tokenizer(args.bare), args.prompt_tokens)] if args.prompt_tokens else \
            [it["text"] for it in json.loads(Path(args.data).read_text(encoding="utf-8"))]
        r = bare_generate(args.bare, [user(t) for t in texts], args.requests, args.max_tokens)
        print(f"machine: {machine()}; bare model.generate, {r['prompt_tokens']}-token prompt (the last), "
              f"{args.max_tokens} tokens per request; loaded in {r['load_seconds']} s ({r['placement']})")
        print(f"{r['requests_per_s']} req/s, {r['tokens_per_s']} tokens/s, first token p50 {r['ttft_p50_s']} s, "
              f"decode {r['decode_tokens_per_s']} tokens/s, p50 {r['p50_s']} s, p95 {r['p95_s']} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "mode": "bare", "runs": [r]}, indent=2))
        return 0
    try:
        out = run(args)
    except (requests.RequestException, KeyError, IndexError, ValueError) as e:
        print(f"error: {e} (is the service at {args.url} running, with rate limits above this load?)", file=sys.stderr)
        return 1
    print(f"machine: {out['machine']}; model {out['model']}; mode {args.mode}")
    table(out["runs"], COLUMNS[args.mode])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
