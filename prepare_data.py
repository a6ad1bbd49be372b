"""Turn a raw CSV / TSV / JSON / JSONL / Excel .xlsx file into the checked, split data every later stage reads.

    python prepare_data.py                       # data/sample_news.csv -> data/processed/ (~4 s on a CPU)
    python prepare_data.py --input my.jsonl --text-col content --label-col category --overlong truncate
    python prepare_data.py --input reviews.xlsx --sheet 2   # a GBK .csv or an .xlsx needs no conversion
    python prepare_data.py --input chats.jsonl   # chat SFT records ({"messages": [...]}) -> task "chat"

Writes train.jsonl, val.jsonl, test.jsonl, labels.json, rejected.jsonl (every dropped item with its
line and the reason) and report.json to data.processed_dir, and prints the report as a table.
Every item read ends up in exactly one split or in rejected.jsonl. The rules: docs/prepare_data.md.
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from common.cli import run_stage
from common.config import ROOT
from common.terminal import ljust_cols
from common.text.prepared import LABELS_FILE, SPLITS, DataError
from common.resumable import write_atomic
from common.text.prompt_fit import longest_prefix
from common.text.prompts import encode_records
from common.text.reading import TEXT_NAMES, Item, Table, clean, live, pick_column, read_items

# Column names tried in this order (case-insensitive) when --label-col is not given (the text's: TEXT_NAMES).
LABEL_NAMES = ("label", "labels", "category", "class", "sentiment", "类别", "标签", "分类", "情感")
BATCH = 512  # texts per tokenizer call: the fast (Rust) tokenizer encodes a batch in parallel


# ----------------------------------------------------------------------------- cleaning
def as_text(value) -> str | None:
    """A cell as text: None is empty, numbers and booleans (label 0/1 in JSON) become text, lists are not."""
    if value is None or isinstance(value, str):
        return value or ""
    return json.dumps(value) if isinstance(value, (int, float, bool)) else None


def unpaired_surrogate(s: str) -> bool:
    """JSON may escape half of a UTF-16 pair (\\ud800) alone: Python keeps it, no tokenizer can encode it."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


SURROGATE = "holds a lone surrogate escape (such as \\ud800), which is not text"


def to_classification(item: Item, text_col: str, label_col: str) -> None:
    if not isinstance(item.raw, dict):
        return item.reject("not an object", "not a JSON object")
    text, label = as_text(item.raw.get(text_col)), as_text(item.raw.get(label_col))
    if text is None or label is None:
        return item.reject("not text", f"'{text_col if text is None else label_col}' is not text")
    if bad := next((col for col, v in ((text_col, text), (label_col, label)) if unpaired_surrogate(v)), None):
        return item.reject("not text", f"'{bad}' {SURROGATE}")
    item.record = {"text": clean(text), "label": clean(label)}
    if not item.record["text"] or not item.record["label"]:
        item.reject("empty text" if not item.record["text"] else "empty label")


def chat_problem(messages) -> str | None:
    """Why a `messages` value is not a usable SFT conversation, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "no messages list, or an empty one"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"turn {i} has no text content"
        if unpaired_surrogate(m["content"]):
            return f"turn {i} {SURROGATE}"
        if m.get("role") not in ("system", "user", "assistant"):
            return f"unknown role {m.get('role')!r} in turn {i}"
        if m["role"] == "system" and i > 1:
            return f"system turn at position {i}; only the first turn may be system"
        if m["role"] != "system" and not m["content"].strip():
            return f"empty {m['role']} turn (turn {i})"
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if "user" not in roles:
        return "no user turn"
    if roles[-1] != "assistant":
        return "last turn is not an assistant turn"
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(roles)):
        return "turns do not alternate user, assistant (after an optional system turn)"
    return None


def to_chat(item: Item) -> None:
    """Chat content keeps its inner whitespace (code and lists in answers): NFC and an outer strip only."""
    messages = item.raw.get("messages") if isinstance(item.raw, dict) else None
    problem = chat_problem(messages)
    if problem:
        return item.reject("invalid chat", problem)
    item.record = {"messages": [{"role": m["role"], "content": unicodedata.normalize("NFC", m["content"]).strip()}
                                for m in messages]}


def reject_duplicates(items: list[Item], key, label) -> None:
    """Same key and label: keep the first. Same key, different labels: nobody knows which is right, drop all."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in live(items):
        groups[key(it.record)].append(it)
    for same in groups.values():
        where = [f"line {it.line}" if isinstance(it.line, int) else it.line for it in same]
        if len({label(it.record) for it in same}) > 1:
            said = "; ".join(f"{w}: {label(it.record)}" for w, it in zip(where[:5], same))
            for it in same:
                it.reject("conflicting labels", f"conflicting labels ({said})")
        else:
            for it in same[1:]:
                it.reject("duplicate", f"duplicate of {where[0]}")


# ----------------------------------------------------------------------------- token budget
def example_lengths(tok, records: list[dict], labels: list[str] | None, prompt_cfg) -> list[int]:
    """Tokens of each whole training example, exactly as training encodes it (encode_records), in batches."""
    out: list[int] = []
    for i in range(0, len(records), BATCH):
        out += [len(ex["input_ids"]) for ex in encode_records(tok, records[i:i + BATCH], labels, prompt_cfg)]
    return out


def fit_text(tok, record: dict, labels: list[str], prompt_cfg, budget: int) -> tuple[str, int] | None:
    """(the longest prefix of the text whose example fits, its length) by binary search on characters."""
    def length(text: str) -> int:
        return example_lengths(tok, [{**record, "text": text}], labels, prompt_cfg)[0]
    text = longest_prefix(record["text"], lambda t: length(t) <= budget)
    return (text, length(text)) if text else None


def prepare_classification(items, tok, cfg, cols: tuple[str, str], warnings: list[str]) -> list[str]:
    """Clean, deduplicate and length-check; returns the label set, ordered by first appearance."""
    for it in live(items):
        to_classification(it, *cols)
    reject_duplicates(items, key=lambda r: r["text"], label=lambda r: r["label"])
    labels = list(dict.fromkeys(it.record["label"] for it in live(items)))
    budget, kept = cfg.data.max_tokens, live(items)
    for it, n in zip(kept, example_lengths(tok, [it.record for it in kept], labels, cfg.prompt)):
        truncate = n > budget and cfg.data.overlong == "truncate"
        fitted = fit_text(tok, it.record, labels, cfg.prompt, budget) if truncate else None
        it.tokens = fitted[1] if fitted else n
        if fitted:
            it.record["text"], it.truncated = fitted[0], True
        elif n > budget:
            it.reject("over max_tokens", f"{n} tokens > max_tokens {budget}")
    left = Counter(it.record["label"] for it in live(items))
    # a label whose items were all rejected leaves the set; that only shortens prompts, so the kept still fit
    warnings += [f"label '{label}' has no items left; it is dropped from labels.json" for label in labels
                 if not left[label]]
    return [label for label in labels if left[label]]


def prepare_chat(items, tok, cfg) -> list[str]:
    """Validate, deduplicate and length-check chat records (never truncated); chat has no label set."""
    for it in live(items):
        to_chat(it)
    reject_duplicates(items, key=lambda r: json.dumps(r["messages"], ensure_ascii=False), label=lambda r: "")
    kept, budget = live(items), cfg.data.max_tokens
    for it, n in zip(kept, example_lengths(tok, [it.record for it in kept], None, cfg.prompt)):
        it.tokens = n
        if n > budget:
            it.reject("over max_tokens", f"{n} tokens > max_tokens {budget} (chat records are never truncated)")
    return []


# ----------------------------------------------------------------------------- split and report
def holdout_counts(n: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """(val, test) sizes of a group of n, rounded half up; train always keeps at least one item."""
    n_test = min(math.floor(n * test_ratio + 0.5), max(n - 1, 0))
    return min(math.floor(n * val_ratio + 0.5), max(n - 1 - n_test, 0)), n_test


def split_items(kept: list[Item], group, data_cfg) -> dict[str, list[Item]]:
    """Per group (a class; one group for chat): seeded shuffle, test and val off the top, the rest train."""
    rng, groups = random.Random(data_cfg.seed), defaultdict(list)
    for it in kept:
        groups[group(it)].append(it)
    splits: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for members in groups.values():
        rng.shuffle(members)
        n_val, n_test = holdout_counts(len(members), data_cfg.val_ratio, data_cfg.test_ratio)
        splits["test"] += members[:n_test]
        splits["val"] += members[n_test:n_test + n_val]
        splits["train"] += members[n_test + n_val:]
    return {name: sorted(part, key=lambda it: it.index) for name, part in splits.items()}  # input order


def check_accounting(items: list[Item], splits: dict[str, list[Item]]) -> None:
    """Every item read is in exactly one split or in rejected.jsonl; anything else is a bug in this file."""
    placed = [it.index for part in splits.values() for it in part] + [it.index for it in items if it.kind]
    if sorted(placed) != list(range(len(items))):
        raise AssertionError(f"accounting bug: {len(items)} items read, {len(placed)} placed")


def build_report(src: str, table: Table, task: str, cols, splits, labels, cfg, warnings: list[str]) -> dict:
    items, kept = table.items, [it for part in splits.values() for it in part]
    lengths = sorted(it.tokens for it in kept)  # nearest-rank percentiles: each is a length some example has
    tokens = {f"p{q}": lengths[math.ceil(q / 100 * len(lengths)) - 1] if kept else None for q in (50, 90, 99, 100)}
    classes = {label: {name: sum(it.record["label"] == label for it in splits[name]) for name in SPLITS}
               for label in labels}
    warnings += [f"class '{label}' has only {sum(n.values())} items (min_per_class {cfg.data.min_per_class})"
                 for label, n in classes.items() if sum(n.values()) < cfg.data.min_per_class]
    warnings += [f"the {name} split is empty" for name in SPLITS if not splits[name]]
    return {
        "input": src, "source": table.source, "task": task,
        "columns": {"text": cols[0], "label": cols[1]} if cols else None,
        "counts": {"read": len(items), "kept": len(kept), "rejected": len(items) - len(kept),
                   "rejected_by_reason": dict(Counter(it.kind for it in items if it.kind)),
                   "truncated": sum(it.truncated for it in kept),
                   "splits": {name: len(part) for name, part in splits.items()}, "classes": classes},
        "tokens": {**tokens, "max": tokens.pop("p100"), "max_tokens": cfg.data.max_tokens},
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- writing and printing
def write_outputs(out: Path, splits, items, labels, report) -> list[str]:
    def jsonl(rows):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = {label: sum(n.values()) for label, n in report["counts"]["classes"].items()}
    files = {f"{name}.jsonl": jsonl(it.record for it in splits[name]) for name in SPLITS}
    files[LABELS_FILE] = json.dumps({"task": report["task"], "labels": labels, "counts": counts},
                                      ensure_ascii=False, indent=2) + "\n"
    files["rejected.jsonl"] = jsonl({"line": it.line, "reason": it.reason, "item": it.raw} for it in items if it.kind)
    files["report.json"] = json.dumps(report, ensure_ascii=False, indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_atomic(out / name, text)
    return list(files)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_as(source: dict) -> str:
    """How the file was read, for the report's first line: "gbk, detected" or "sheet '评论'"."""
    if "sheet" in source:
        return f"sheet '{source['sheet']}'"
    return f"{source['encoding']}, {'detected' if source['detected'] else 'as data.encoding says'}"


def print_report(report: dict, labels: list[str]) -> None:
    c, t, cols = report["counts"], report["tokens"], report["columns"]
    print(f"{report['input']} ({read_as(report['source'])}) -> {report['task']}"
          + (f" (text column '{cols['text']}', label column '{cols['label']}')" if cols else ""))
    print("".join(f"{name:<10}{c[name]:>7}\n" for name in ("read", "kept", "rejected")), end="")
    print("".join(f"  {kind:<20}{n:>5}\n" for kind, n in c["rejected_by_reason"].items()), end="")
    print(f"{'truncated':<10}{c['truncated']:>7}  (kept, text cut to fit max_tokens)\n")
    rows = [(label, list(c["classes"][label].values())) for label in labels]
    rows.append(("all", [c["splits"][name] for name in SPLITS]))
    width = max(12, *(2 * len(label) + 2 for label, _ in rows))
    print(ljust_cols("class", width) + "".join(f"{h:>7}" for h in (*SPLITS, "total")))
    for label, n in rows:
        print(ljust_cols(label, width) + "".join(f"{v:>7}" for v in (*n, sum(n))))
    print(f"\ntokens per example: p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']} "
          f"(max_tokens {t['max_tokens']})")
    for w in report["warnings"]:
        print(f"warning: {w}")


# ----------------------------------------------------------------------------- the stage
def load_tok(model_dir: Path):
    if not (model_dir / "tokenizer_config.json").is_file():
        raise DataError(f"no model at {shown(model_dir)}; run `python download_model.py --tiny` (the CPU demo) "
                        "or `python download_model.py` first, or pass --model DIR")
    from common.model.loading import load_tokenizer  # imports torch: not needed for --help or an early error
    try:
        return load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the tokenizer from {shown(model_dir)} ({e}); "
                        "download it again with `python download_model.py --force`") from None


def read_and_detect(cfg, src: Path) -> tuple[Table, str, tuple[str, str] | None]:
    """Read every item and tell the task: (the table, "chat" or "classification", (text_col, label_col) or None)."""
    table = read_items(src, cfg.data.encoding, cfg.data.sheet)
    first = next((it.raw for it in live(table.items) if isinstance(it.raw, dict)), None)
    if src.suffix.lower() in (".json", ".jsonl") and isinstance(first, dict) and "messages" in first:
        return table, "chat", None
    cols = (pick_column(table.columns, cfg.data.text_col, TEXT_NAMES, "text"),
            pick_column(table.columns, cfg.data.label_col, LABEL_NAMES, "label"))
    if cols[0] == cols[1]:
        raise DataError(f"text and label are the same column '{cols[0]}'; pick two with --text-col and --label-col")
    return table, "classification", cols


def run(cfg) -> dict:
    """Read data.input, check and split it into data.processed_dir, print the report; returns the report.
    Raises DataError (after printing) when no item passed the checks."""
    log = logging.getLogger("prepare_data")
    d, start = cfg.data, time.perf_counter()
    src, out = cfg.resolve(d.input), cfg.resolve(d.processed_dir)
    if d.overlong not in ("reject", "truncate"):
        raise DataError(f"data.overlong must be reject or truncate, got '{d.overlong}'")
    if not (0 <= d.val_ratio and 0 <= d.test_ratio and d.val_ratio + d.test_ratio < 1):
        raise DataError(f"val_ratio and test_ratio must be >= 0 and sum below 1, got {d.val_ratio} and {d.test_ratio}")
    if not src.is_file():
        raise DataError(f"input file {src} not found; set data.input or pass --input PATH")
    table, task, cols = read_and_detect(cfg, src)  # before the tokenizer: a wrong column fails at once
    items, warnings, loading = table.items, list(table.warnings), time.perf_counter()
    tok = load_tok(cfg.resolve(cfg.model.path))
    loading = time.perf_counter() - loading
    labels = prepare_classification(items, tok, cfg, cols, warnings) if cols else prepare_chat(items, tok, cfg)
    splits = split_items(live(items), lambda it: it.record.get("label", ""), d)
    report = build_report(shown(src), table, task, cols, splits, labels, cfg, warnings)
    check_accounting(items, splits)
    names = write_outputs(out, splits, items, labels, report)
    print_report(report, labels)
    seconds = time.perf_counter() - start - loading
    print(f"wrote {shown(out)}/: {', '.join(names)}\n{len(items)} items in {seconds:.2f} s, "
          f"{len(items) / seconds:.0f} items/s (+ {loading:.1f} s loading the tokenizer)")
    log.info("prepared %s", shown(src), extra={"source": table.source, "counts": report["counts"],
                                            "warnings": report["warnings"], "out": str(out),
                                            "seconds": round(seconds, 3)})
    if not report["counts"]["kept"]:
        raise DataError(f"no item passed the checks; {shown(out / 'rejected.jsonl')} says why for each")
    return report


def main(argv=None) -> int:
    return run_stage("prepare_data", __doc__, lambda cfg, args: run(cfg), section="data",
                     model_help="model directory whose tokenizer counts tokens", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
