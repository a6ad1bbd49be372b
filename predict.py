"""Label a backlog file with a trained classifier: every row back, with its label, probability, runner-up
and a review flag. Resumable, and splits over processes with accelerate.

    python predict.py --input backlog.xlsx --text-col 内容      # the newest merged model -> backlog.predicted.csv
    python predict.py --input backlog.csv --model models/tiny-qwen3-lora --target-accuracy 0.95 --output out.xlsx
    python predict.py --input backlog.csv --url http://127.0.0.1:8000     # through a running service's /v1/classify
    accelerate launch --num_processes 2 predict.py --input backlog.csv    # rows split over 2 processes (GPUs)

Reads what prepare_data.py reads (CSV/TSV/JSON/JSONL/xlsx; GBK detected) and writes <input>.predicted.csv
(or --output: .csv, .jsonl or .xlsx): every input row in input order with its own columns, plus label,
probability, runner_up, runner_up_probability, review (true below the review threshold, or not scored)
and status (ok, truncated, or why the row was not scored). Probabilities are calibrated (the run's
calibration.json). Progress is saved in <output>.partial/: the same command continues after a crash.
Prints a summary: rows, labelled, for review, not scored, items/s, label counts against the training split.
docs/predict.md has the details.
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import hashlib
import os
import sys
import time
from collections import Counter
from pathlib import Path

from common.cli import add_force, run_stage
from common.config import UserError
from common.model.run_lookup import find_run, model_identity, read_json, run_max_tokens, training_counts
from common.resumable import ChunkStore, file_sha256
from common.text.prepared import read_labels
from common.text.prompt_fit import prompts_fitting
from common.text.reading import TEXT_NAMES, pick_column, read_items
from common.text.table_output import cell_text, check_output, write_table

REVIEW_BELOW = 0.8    # rows whose label is less probable than this are flagged for review (predict.review_below)
CHUNK_ROWS = 256      # rows a saved chunk: what a crash can cost, and the unit split between processes
SERVICE_BATCH = 32    # texts a /v1/classify call (serve.max_classify_texts)
RETRIES = 30          # 429/503 answers waited out before giving up
OUT_COLUMNS = ("label", "probability", "runner_up", "runner_up_probability", "review", "status")


# ----------------------------------------------------------------------------- scores to a row's result
def result(labels: list[str], probs: list[float], truncated: bool) -> dict:
    order = sorted(range(len(labels)), key=lambda k: -probs[k])
    second = order[1] if len(order) > 1 else None
    return {"label": labels[order[0]], "probability": round(probs[order[0]], 4),
            "runner_up": labels[second] if second is not None else None,
            "runner_up_probability": round(probs[second], 4) if second is not None else None,
            "status": "truncated" if truncated else "ok"}


# ----------------------------------------------------------------------------- scoring here
class LocalScorer:
    """The model loaded as the service loads it; label scoring, batched by prompt length."""

    def __init__(self, cfg, model_dir: Path, batch_size: int, max_tokens: int | None):
        from common.evaluation.calibration import temperature_of
        from common.model.loading import adapter_base_path, is_adapter_dir, load_tokenizer
        from common.model.memory import load_as_served
        if not model_dir.is_dir():
            raise UserError(f"model {model_dir} not found; pass --model DIR (a run, a merged or quantized model)")
        self.run = find_run(model_dir)
        self.labels = read_labels(model_dir, *filter(None, [self.run]))
        if self.labels is None:
            raise UserError(f"{model_dir} has no classification labels.json: predict.py labels with a classifier")
        self.cfg, self.batch_size, self.model_dir = cfg, batch_size, model_dir
        self.max_tokens = max_tokens or run_max_tokens(self.run) or cfg.data.max_tokens
        self.temperature = temperature_of(model_dir, self.run)
        base, adapter = (cfg.resolve(adapter_base_path(model_dir)), model_dir) if is_adapter_dir(model_dir) \
            else (model_dir, None)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_as_served(cfg, base, adapter)[0]
        self.identity = model_identity(model_dir, base if adapter else None)

    def score(self, texts: list[str], bar) -> list[dict]:
        from common.evaluation.calibration import probabilities
        from common.model.label_scoring import score_label_ids
        ids, _, cut = prompts_fitting(self.tokenizer, texts, self.labels, self.cfg.prompt, self.max_tokens)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        scores = score_label_ids(self.model, self.tokenizer, [ids[i] for i in order], self.labels,
                                 self.batch_size, progress=bar)
        probs = probabilities(scores.logprobs, self.temperature).tolist()
        out: list[dict] = [{}] * len(ids)
        for row, i in zip(probs, order):
            out[i] = result(self.labels, row, cut[i])
        return out


# ----------------------------------------------------------------------------- scoring through a service
def retry_after(value: str | None) -> float:
    """Retry-After's seconds (1 when absent or an HTTP date, which this service never sends), at most 60."""
    try:
        return min(max(float(value), 0.0), 60.0)
    except (TypeError, ValueError):
        return 1.0


class ServiceScorer:
    """/v1/classify of a running service, SERVICE_BATCH texts a call; texts are cut with --model's
    tokenizer (when given) so they match what the local mode scores."""

    def __init__(self, cfg, url: str, key: str | None, local: Path | None, max_tokens: int | None):
        import requests
        self.http, self.url = requests.Session(), url.rstrip("/")
        if key:
            self.http.headers["Authorization"] = f"Bearer {key}"
        self.cfg, self.tokenizer, self.labels, self.run = cfg, None, None, None
        if local is not None:
            from common.model.loading import load_tokenizer
            self.run, self.tokenizer = find_run(local), load_tokenizer(local)
            self.labels = read_labels(local, *filter(None, [self.run]))
        self.max_tokens = max_tokens or run_max_tokens(self.run) or cfg.data.max_tokens
        models = self.call("GET", "/v1/models").get("data", [])
        self.identity = hashlib.sha256(f"{self.url} {[m.get('id') for m in models]}".encode()).hexdigest()

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        import requests
        for _ in range(RETRIES):
            try:
                r = self.http.request(method, self.url + path, json=body, timeout=300)
            except requests.RequestException as e:
                raise UserError(f"nothing answers at {self.url} ({type(e).__name__}); start the service "
                                "(bash start_production.sh) or check --url") from None
            if r.status_code not in (429, 503):
                break
            time.sleep(retry_after(r.headers.get("Retry-After")))  # busy or rate-limited: wait as it says
        else:
            raise UserError(f"{self.url} stayed busy ({r.status_code}) through {RETRIES} tries; try again later")
        if r.status_code == 401:
            raise UserError(f"{self.url} wants an API key: set API_KEY in the environment or pass --api-key")
        if r.status_code != 200:
            raise ServiceRefused(r.status_code, error_message(r))
        return r.json()

    def classify(self, texts: list[str], cut: list[bool]) -> list[dict]:
        """One call; a text the service refuses (400) is found by asking for each text alone."""
        body = {"text": texts, **({"labels": self.labels} if self.labels else {})}
        try:
            found = self.call("POST", "/v1/classify", body)["results"]
        except ServiceRefused as e:
            if e.status != 400:
                raise UserError(f"{self.url}/v1/classify answered {e.status}: {e.message}") from None
            if len(texts) == 1:
                return [{"status": f"refused by the service: {e.message}"}]
            return [r for t, c in zip(texts, cut) for r in self.classify([t], [c])]
        return [result(list(r["probabilities"]), list(r["probabilities"].values()), c) for r, c in zip(found, cut)]

    def score(self, texts: list[str], bar) -> list[dict]:
        cut = [False] * len(texts)
        if self.tokenizer is not None and self.labels:
            _, texts, cut = prompts_fitting(self.tokenizer, texts, self.labels, self.cfg.prompt, self.max_tokens)
        out = []
        for start in range(0, len(texts), SERVICE_BATCH):
            out += self.classify(texts[start:start + SERVICE_BATCH], cut[start:start + SERVICE_BATCH])
            bar.update(len(texts[start:start + SERVICE_BATCH]))
        return out


class ServiceRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


# ----------------------------------------------------------------------------- rows in, rows out
def read_rows(cfg, args, src: Path) -> tuple[list[str], list[dict], list[str | None], list[str]]:
    """(the columns, each row's cells, each row's text or None, each row's status when it cannot be scored)."""
    table = read_items(src, args.encoding or cfg.data.encoding, args.sheet or cfg.data.sheet)
    col = pick_column(table.columns, args.text_col, TEXT_NAMES, "text")
    rows, texts, statuses = [], [], []
    for it in table.items:
        cells = isinstance(it.raw, list) and table.source["format"] in ("csv", "tsv")  # a malformed row's fields
        raw = it.raw if isinstance(it.raw, dict) else dict(zip(table.columns, it.raw)) if cells else {}
        text, why = (None, it.reason) if it.kind else cell_text(raw.get(col)) if isinstance(it.raw, dict) \
            else (None, "not a JSON object")
        rows.append(raw)
        texts.append(text)
        statuses.append(why)
    return table.columns, rows, texts, statuses


def out_names(columns: list[str]) -> dict[str, str]:
    """Our column names; one the input has already is prefixed predicted_ (a labelled file keeps its label)."""
    names = {}
    for name in OUT_COLUMNS:
        mine = name
        while mine in columns:
            mine = f"predicted_{mine}"
        names[name] = mine
    return names


def review_threshold(args, local: Path | None) -> float:
    """--review-below, or the lowest threshold whose labels reach --target-accuracy on the validation split."""
    if args.target_accuracy is None:
        return args.review_below
    from common.evaluation.calibration import calibration_of, threshold_for
    found = calibration_of(local, find_run(local)) if local else None
    if not found or not found.get("coverage"):
        raise UserError("--target-accuracy needs the model's calibration.json with its coverage curve (train_qwen.py "
                        "writes it; in --url mode pass --model too); or use --review-below P")
    row = threshold_for(found["coverage"], args.target_accuracy)
    if row is None:
        best = max((r["accuracy"] for r in found["coverage"] if r["accuracy"] is not None), default=0)
        raise UserError(f"no threshold reaches accuracy {args.target_accuracy} on the validation split (best "
                        f"{best}); ask for less, or use --review-below P")
    print(f"review threshold {row['threshold']}: on the validation split {row['coverage']:.0%} of items are at or "
          f"above it, {row['accuracy']:.1%} of them right (target {args.target_accuracy})")
    return row["threshold"]


# ----------------------------------------------------------------------------- processes and chunks
def processes():
    """(rank, world size, barrier): one process, or those `accelerate launch` / torchrun started (their
    WORLD_SIZE, RANK, LOCAL_RANK); accelerate's PartialState would treat CPU processes as one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():  # "cuda" is then this process's own card when the model loads
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():  # a long backlog: ranks may reach the last barrier hours apart
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=48))
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def score_chunks(store: ChunkStore, scorer, texts, statuses, chunk_rows: int, rank: int, world: int) -> tuple[int, float]:
    """Score this process's chunks (k % world == rank) not saved yet; returns (items scored, seconds)."""
    from tqdm import tqdm
    mine = [k for k in range(0, -(-len(texts) // chunk_rows)) if k % world == rank and not store.done(k)]
    todo = sum(sum(t is not None for t in texts[k * chunk_rows:(k + 1) * chunk_rows]) for k in mine)
    start, scored = time.perf_counter(), 0
    with tqdm(total=todo, desc="labelling" if world == 1 else f"labelling (process {rank})", unit="item",
              position=rank, disable=None) as bar:
        for k in mine:
            part = range(k * chunk_rows, min((k + 1) * chunk_rows, len(texts)))
            live = [i for i in part if texts[i] is not None]
            found = dict(zip(live, scorer.score([texts[i] for i in live], bar) if live else []))
            store.write(k, [found.get(i) or {"status": statuses[i]} for i in part])
            scored += len(live)
    return scored, time.perf_counter() - start


def assemble(store: ChunkStore, rows: list[dict], chunk_rows: int, threshold: float, names: dict) -> list[dict]:
    """Every input row with its result, in input order."""
    out = []
    for k in range(0, -(-len(rows) // chunk_rows)):
        for row, res in zip(rows[k * chunk_rows:(k + 1) * chunk_rows], store.read(k)):
            scored = res.get("label") is not None
            res = {**res, "review": not scored or res["probability"] < threshold}
            out.append({**row, **{names[c]: res.get(c) for c in OUT_COLUMNS}})
    return out


# ----------------------------------------------------------------------------- the stage
def output_path(args) -> Path:
    src = Path(args.input)
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}.predicted.csv")
    check_output(out)
    if not src.is_file():
        raise UserError(f"input file {src} not found; pass --input PATH")
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to replace it (or --output PATH)")
    return out


def local_model(cfg, args) -> Path | None:
    """--model, else (without --url) the newest merged model in train.runs_dir."""
    from common.model.files import newest_merged
    if args.model or args.url:
        return Path(args.model) if args.model else None
    try:
        return newest_merged(cfg.resolve(cfg.train.runs_dir))
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def build_scorer(cfg, args, local: Path | None):
    if args.url:
        key = args.api_key or os.environ.get("API_KEY") or next(iter(cfg.serve.api_keys), None)
        return ServiceScorer(cfg, args.url, key, local, args.max_tokens)
    return LocalScorer(cfg, local, args.batch_size or cfg.evaluate.batch_size, args.max_tokens)


def run(cfg, args) -> dict | None:
    out = output_path(args)
    src, wall = Path(args.input), time.perf_counter()
    columns, rows, texts, statuses = read_rows(cfg, args, src)  # before the model: a wrong column fails at once
    local = local_model(cfg, args)
    threshold = review_threshold(args, local)  # before the model loads: a threshold no one reaches fails at once
    rank, world, barrier = processes()
    scorer = build_scorer(cfg, args, local)
    identity = {"input": file_sha256(src), "model": scorer.identity,
                "settings": {"text_col": args.text_col, "chunk_rows": args.chunk_rows, "batch_size": args.batch_size,
                             "max_tokens": scorer.max_tokens, "prompt": vars(cfg.prompt)}}
    store = ChunkStore(out.with_name(out.name + ".partial"), identity)
    if rank == 0 and (message := store.open()):
        print(message)
    barrier()
    scored, seconds = score_chunks(store, scorer, texts, statuses, args.chunk_rows, rank, world)
    barrier()
    if rank != 0:
        return None
    names = out_names(columns)
    table = assemble(store, rows, args.chunk_rows, threshold, names)
    write_table(out, [*columns, *names.values()], table)
    store.remove()
    return {"output": str(out), "rows": table, "names": names, "threshold": threshold, "scored": scored,
            "seconds": seconds, "wall": time.perf_counter() - wall, "world": world,
            "training": training_counts(scorer.run)}


def report(r: dict | None) -> None:
    if r is None:  # another process than rank 0: rank 0 reports for all
        return
    from common.terminal import ljust_cols
    rows, n = r["rows"], r["names"]
    labelled = [x for x in rows if x[n["label"]] is not None]
    unscored = Counter(x[n["status"]] for x in rows if x[n["label"]] is None)
    print(f"\nrows {len(rows)}, labelled {len(labelled)} (truncated "
          f"{sum(x[n['status']] == 'truncated' for x in labelled)}), for review "
          f"{sum(x[n['review']] for x in labelled)} (probability < {r['threshold']}), not scored {sum(unscored.values())}")
    for why, count in unscored.most_common():
        print(f"  {count:>6}  {why}")
    rate = r["scored"] / r["seconds"] if r["seconds"] > 0 else 0.0
    print(f"{r['scored']} items scored in {r['seconds']:.1f} s = {rate:.1f} items/s"
          + (f" in process 0 of {r['world']}" if r["world"] > 1 else "") + f"; {r['wall']:.1f} s in all")
    predicted, (train, where) = Counter(x[n["label"]] for x in labelled), r["training"]
    print(f"\n{'label':<12} {'predicted':>9} {'share':>6}" + (f" {'training':>9} {'share':>6}" if train else ""))
    for label in dict.fromkeys([*(train or {}), *predicted]):
        share = predicted[label] / max(len(labelled), 1)
        tail = f" {train[label]:>9} {train[label] / max(sum(train.values()), 1):>6.1%}" if train else ""
        print(f"{ljust_cols(str(label), 12)} {predicted[label]:>9} {share:>6.1%}{tail}")
    print(f"(training split: {where})" if train else f"({where}: no training counts to compare)")
    print(f"wrote {r['output']}")


def add_args(parser) -> None:
    parser.add_argument("--input", default="data/sample_test.json", help="the rows to label (default %(default)s)")
    parser.add_argument("--text-col", help="the column to classify (default: detected, as prepare_data.py does)")
    parser.add_argument("--output", help="where to write: .csv, .jsonl or .xlsx (default <input>.predicted.csv)")
    parser.add_argument("--model", help="a training run, a merged or a quantized model (default: the newest merged)")
    parser.add_argument("--url", help="label through this running service's /v1/classify instead of loading a model")
    parser.add_argument("--api-key", help="the service's Bearer key (default: $API_KEY)")
    parser.add_argument("--review-below", type=float, default=REVIEW_BELOW, metavar="P",
                        help="flag rows whose label is less probable than P (default %(default)s)")
    parser.add_argument("--target-accuracy", type=float, metavar="A",
                        help="pick the review threshold from calibration.json: the labels kept reach accuracy A")
    parser.add_argument("--batch-size", type=int, help="prompts a scoring pass (default evaluate.batch_size)")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows a saved chunk (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, help="cut texts to fit (default: the run's data.max_tokens)")
    parser.add_argument("--encoding", help="the input's text encoding (default data.encoding: auto)")
    parser.add_argument("--sheet", help="an .xlsx's sheet, by name or number (default: the first)")
    add_force(parser, "output file")


def main(argv=None) -> int:
    return run_stage("predict", __doc__, run, add_args=add_args, report=report, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
