"""Evaluate a trained adapter (or a merged model) on the test split by label scoring.

    python evaluate_model.py                               # the newest run in models/ on data/processed/test.jsonl
    python evaluate_model.py --model models/tiny-qwen3-lora --generate     # also free generation + parsing
    python evaluate_model.py --baseline models/other-run/eval-test/metrics.json   # print the deltas

Every label's log-probability is scored after the prompt (common/scoring.py), so each answer is a
valid label with a probability. Writes <model>/eval-<split>/: metrics.json (accuracy, macro-F1,
weighted-F1, per-class precision/recall/F1/support, confusion matrix), predictions.jsonl and
confusion_matrix.png; prints a per-class table, items/s and latency.
"""
from __future__ import annotations

import common  # noqa: F401, I001  (first: see common/__init__.py; quiets a notice `import torch` causes)

import json
import sys
import time
from pathlib import Path

import torch

from common.cli import run_stage
from common.config import ConfigError
from common.data import read_jsonl, read_labels
from common.loading import load_model, load_tokenizer
from common.metrics import classification_metrics
from common.model_files import newest_run
from common.batching import left_pad
from common.prompts import classification_ids, parse_label
from common.scoring import score_label_ids
from common.terminal import ljust_cols


@torch.no_grad()
def generate_labels(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int,
                    max_new_tokens: int) -> list[str | None]:
    """Greedy generation and parsing: what a client asking for free text would get."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = (t.to(model.device) for t in left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id))
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        out += [parse_label(t, labels) for t in texts]
    return out


def save_confusion_png(cm: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """A heat map; tick labels are the label names when a CJK font is installed, else their numbers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    cjk = [f.name for f in font_manager.fontManager.ttflist
           if any(k in f.name for k in ("CJK", "WenQuanYi", "Hei", "YaHei", "PingFang", "Source Han"))]
    names = labels if cjk or all(label.isascii() for label in labels) else [str(i) for i in range(len(labels))]
    if cjk:
        plt.rcParams["font.family"] = cjk[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 1.0 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > max(map(max, cm)) / 2 else "black")
    ax.set_xticks(range(len(labels)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(m: dict, baseline: dict | None) -> None:
    print(f"{'label':<12} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}" + ("  Δf1" if baseline else ""))
    for label, c in m["per_class"].items():
        delta = ""
        if baseline and label in baseline.get("per_class", {}):
            delta = f"  {c['f1'] - baseline['per_class'][label]['f1']:+.3f}"
        print(f"{ljust_cols(label, 12)} {c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>6.3f} {c['support']:>8}{delta}")
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        delta = f"  ({m[key] - baseline[key]:+.3f} vs baseline)" if baseline and key in baseline else ""
        print(f"{key:<12} {m[key]:.4f}{delta}")


def load_served(cfg, model_dir: Path):
    """The model as serving would load it (evaluate.quantization, the serve section's placement)."""
    from common.loading import adapter_base_path, is_adapter_dir
    from common.memory import placement_for
    base, adapter = (cfg.resolve(adapter_base_path(model_dir)), model_dir) if is_adapter_dir(model_dir) \
        else (model_dir, None)
    p = placement_for(base, cfg.evaluate.quantization, cfg.serve, adapter)
    return load_model(base, p.quantization, adapter=adapter, quantize_lm_head=p.quantize_lm_head,
                      embed_on_cpu=p.embed_on_cpu).eval()


def test_set(cfg, model_dir: Path) -> tuple[list[dict], list[str]]:
    """(the split's records, the model's labels); errors when they do not fit together."""
    processed = cfg.resolve(cfg.data.processed_dir)
    split_path = processed / f"{cfg.evaluate.split}.jsonl"
    if not split_path.is_file():
        raise ConfigError(f"{split_path} not found; run python prepare_data.py first")
    labels = read_labels(model_dir, processed)
    if labels is None:
        raise ConfigError(f"{model_dir} and {processed} hold no classification labels.json: evaluate_model.py "
                          f"scores classifiers (a chat model's loss is in its train_info.json)")
    records = read_jsonl(split_path)
    unknown = sorted({r["label"] for r in records} - set(labels))
    if unknown:
        raise ConfigError(f"{split_path.name} has labels the model was not trained on: {', '.join(unknown)}")
    return records, labels


def write_outputs(out_dir: Path, metrics: dict, records: list[dict], predicted: list[str], conf: list[float],
                  title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for r, p, c in zip(records, predicted, conf):
            f.write(json.dumps({"text": r["text"], "label": r["label"], "predicted": p, "probability": round(c, 4)},
                               ensure_ascii=False) + "\n")
    save_confusion_png(metrics["confusion_matrix"], metrics["labels"], out_dir / "confusion_matrix.png", title)


def run(cfg, output_dir: str | None = None) -> dict:
    """Score the model evaluate.model names (else the newest run) on evaluate.split; returns the metrics."""
    from tqdm import tqdm
    e = cfg.evaluate
    model_dir = cfg.resolve(e.model) if e.model else newest_run(cfg.resolve(cfg.train.runs_dir))
    records, labels = test_set(cfg, model_dir)
    tokenizer, model = load_tokenizer(model_dir), load_served(cfg, model_dir)
    prompts = classification_ids(tokenizer, [r["text"] for r in records], labels, cfg.prompt)
    start = time.time()
    with tqdm(total=len(prompts), desc="scoring", unit="item") as bar:
        scores = score_label_ids(model, tokenizer, prompts, labels, e.batch_size, progress=bar)
    seconds = time.time() - start
    idx, conf = scores.best()
    predicted, truth = [labels[i] for i in idx], [r["label"] for r in records]
    metrics = classification_metrics(truth, predicted, labels)
    metrics.update(model=str(model_dir), split=e.split, items=len(records), seconds=round(seconds, 2),
                   items_per_second=round(len(records) / seconds, 1),
                   ms_per_item=round(1000 * seconds / len(records), 1),
                   prompt_tokens_mean=round(sum(map(len, prompts)) / len(prompts), 1))
    if e.generate:
        start = time.time()
        generated = generate_labels(model, tokenizer, prompts, labels, e.batch_size, e.max_new_tokens)
        metrics["generation"] = {**classification_metrics(truth, generated, labels),
                                 "invalid_rate": sum(g is None for g in generated) / len(generated),
                                 "ms_per_item": round(1000 * (time.time() - start) / len(records), 1)}
    out_dir = Path(output_dir) if output_dir else model_dir / f"eval-{e.split}"
    write_outputs(out_dir, metrics, records, predicted, conf,
                  f"{model_dir.name} on {e.split}: macro-F1 {metrics['macro_f1']:.3f}")
    return metrics | {"output_dir": str(out_dir)}


def report(m: dict, baseline: dict | None) -> None:
    print()
    print_table(m, baseline)
    print(f"\nlabel scoring: {m['items']} items in {m['seconds']:.1f}s = {m['items_per_second']} items/s, "
          f"{m['ms_per_item']} ms/item (mean prompt {m['prompt_tokens_mean']} tokens)")
    if "generation" in m:
        g = m["generation"]
        print(f"generation:    macro-F1 {g['macro_f1']:.4f}, invalid outputs {100 * g['invalid_rate']:.1f}%, "
              f"{g['ms_per_item']} ms/item")
    print(f"wrote {m['output_dir']}/ (metrics.json, predictions.jsonl, confusion_matrix.png)")


def add_args(parser) -> None:
    parser.add_argument("--baseline", help="another metrics.json to print the differences against")
    parser.add_argument("--output-dir", help="where to write (default: <model>/eval-<split>/)")


def cli_run(cfg, args) -> tuple[dict, dict | None]:
    baseline = json.loads(Path(args.baseline).read_text(encoding="utf-8")) if args.baseline else None
    return run(cfg, args.output_dir), baseline


def main(argv=None) -> int:
    return run_stage("evaluate_model", __doc__, cli_run, section="evaluate", add_args=add_args,
                     report=lambda result: report(*result), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
