"""Evaluate a trained adapter (or a merged model) on the test split by label scoring.

    python evaluate_model.py                               # the newest run in models/ on data/processed/test.jsonl
    python evaluate_model.py --model models/tiny-qwen3-lora --generate     # also free generation + parsing
    python evaluate_model.py --baseline models/other-run/eval-test/metrics.json   # print the deltas

Every label's log-probability is scored after the prompt (common/model/label_scoring.py), so each answer is a
valid label with a probability, calibrated by the run's temperature (calibration.json, fitted on the val
split by train_qwen.py). Writes <model>/eval-<split>/: metrics.json (accuracy, macro-F1, weighted-F1,
per-class precision/recall/F1/support, confusion matrix, the majority-class and uniform baselines, a
degenerate flag, calibration: ECE before/after the temperature, reliability tables, coverage curve),
predictions.jsonl, confusion_matrix.png, reliability.png, coverage.png and report.md / report.html (the
run's story on one page: provenance, curves, per-class scores, calibration, confident mistakes); prints a
per-class table, the baselines, the ECE, items/s and latency.
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import json
import sys
import time
from pathlib import Path

import torch

from common.cli import run_stage
from common.evaluation.calibration import calibration_figures, calibration_of, probabilities, temperature_of
from common.config import ConfigError
from common.evaluation.classification_metrics import classification_metrics
from common.evaluation.plots import save_confusion_png
from common.evaluation.report import add_baselines, write_report
from common.model.batching import left_pad
from common.model.files import newest_run
from common.model.label_scoring import score_label_ids
from common.model.loading import load_tokenizer
from common.terminal import ljust_cols
from common.text.prepared import read_jsonl, read_labels
from common.text.prompts import classification_ids, parse_label


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
    from common.model.loading import adapter_base_path, is_adapter_dir
    from common.model.memory import load_as_served
    base, adapter = (cfg.resolve(adapter_base_path(model_dir)), model_dir) if is_adapter_dir(model_dir) \
        else (model_dir, None)
    return load_as_served(cfg, base, adapter, cfg.evaluate.quantization)[0]


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
                  model_dir: Path, split_path: Path) -> list[str]:
    """Everything the evaluation writes; the names of the files, in the order written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    rows = [{"text": r["text"], "label": r["label"], "predicted": p, "probability": round(c, 4)}
            for r, p, c in zip(records, predicted, conf)]
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    title = f"{model_dir.name} on {split_path.stem}: macro-F1 {metrics['macro_f1']:.3f}"
    save_confusion_png(metrics["confusion_matrix"], metrics["labels"], out_dir / "confusion_matrix.png", title)
    report_files = write_report(out_dir, metrics, rows, model_dir, split_path)
    return ["metrics.json", "predictions.jsonl", "confusion_matrix.png", *report_files]


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
    calibration = calibration_block(model_dir, scores.logprobs, [labels.index(r["label"]) for r in records])
    conf, idx = probabilities(scores.logprobs, calibration["temperature"]).max(dim=-1)  # the served probabilities
    idx, conf = idx.tolist(), conf.tolist()
    predicted, truth = [labels[i] for i in idx], [r["label"] for r in records]
    metrics = add_baselines(classification_metrics(truth, predicted, labels), truth, predicted)
    metrics.update(model=str(model_dir), split=e.split, items=len(records), seconds=round(seconds, 2),
                   items_per_second=round(len(records) / seconds, 1),
                   ms_per_item=round(1000 * seconds / len(records), 1),
                   prompt_tokens_mean=round(sum(map(len, prompts)) / len(prompts), 1), calibration=calibration)
    if e.generate:
        start = time.time()
        generated = generate_labels(model, tokenizer, prompts, labels, e.batch_size, e.max_new_tokens)
        metrics["generation"] = {**classification_metrics(truth, generated, labels),
                                 "invalid_rate": sum(g is None for g in generated) / len(generated),
                                 "ms_per_item": round(1000 * (time.time() - start) / len(records), 1)}
    out_dir = Path(output_dir) if output_dir else model_dir / f"eval-{e.split}"
    split_path = cfg.resolve(cfg.data.processed_dir) / f"{e.split}.jsonl"
    written = write_outputs(out_dir, metrics, records, predicted, conf, model_dir, split_path)
    return metrics | {"output_dir": str(out_dir), "written": written, "provenance_lines": run_lines(model_dir),
                      "tracked": track(model_dir, out_dir, metrics, written)}


def track(model_dir: Path, out_dir: Path, metrics: dict, written: list[str]) -> str:
    """The evaluation's numbers (<split>.macro_f1, ...) and files (under eval-<split>/) into the MLflow run
    that trained the model, when it was tracked (train.report_to: [mlflow]); a line saying what happened."""
    from common.evaluation.report import training_run
    from common.evaluation.tracking import log_figures, tracked_run
    manifest = json.loads((model_dir / "manifest.json").read_text()) if (model_dir / "manifest.json").is_file() else {}
    run_id, uri = tracked_run(training_run(model_dir, manifest))
    if run_id is None:
        return ""
    try:
        log_figures(run_id, {k: v for k, v in metrics.items() if k != "calibration"} | {
            "calibration": {k: v for k, v in (metrics.get("calibration") or {}).items() if not isinstance(v, list)}},
            [out_dir / name for name in written], prefix=f"{metrics['split']}.", artifact_dir=out_dir.name,
            tracking_uri=uri)
    except Exception as e:  # the evaluation stands on disk; the tracking server is a copy of it
        return f"warning: not logged to MLflow run {run_id} at {uri}: {type(e).__name__}: {str(e)[:200]}"
    return f"logged to MLflow run {run_id} at {uri} ({metrics['split']}.* metrics, {out_dir.name}/ artifacts)"


def calibration_block(model_dir: Path, logprobs: torch.Tensor, truth: list[int]) -> dict:
    """The split's calibration at the model's temperature (its calibration.json, which merge and quantize
    copy; T = 1 without one): ECE and NLL before and after, reliability tables, coverage curve."""
    found = calibration_of(model_dir)
    fitted = f"{found.get('split', '?')} split, {found.get('items', '?')} items" if found else None
    return {**calibration_figures(logprobs, truth, temperature_of(model_dir)), "fitted_on": fitted,
            "note": (found or {}).get("note")}  # why a fit was refused (T kept at 1), when it was


def calibration_line(m: dict) -> str:
    c = m["calibration"]
    if not c["fitted_on"]:
        return (f"calibration: no calibration.json (raw probabilities, T=1): ECE on {m['split']} "
                f"{c['ece_before']:.3f}; python train_qwen.py --calibrate-only RUN fits one")
    return (f"calibration: T={c['temperature']:.2f} (fitted on the {c['fitted_on']}): ECE on {m['split']} "
            f"{c['ece_before']:.3f} -> {c['ece_after']:.3f}, NLL {c['nll_before']:.3f} -> {c['nll_after']:.3f}"
            + (f" ({c['note']})" if c.get("note") else ""))


def run_lines(model_dir: Path) -> list[str]:
    """The evaluated run's provenance, for the terminal (a merged model names its run in manifest.json)."""
    from common.evaluation.provenance import describe
    run = model_dir
    if not (run / "train_info.json").is_file() and (model_dir / "manifest.json").is_file():
        run = Path(json.loads((model_dir / "manifest.json").read_text()).get("adapter") or model_dir)
    try:
        return describe(json.loads((run / "train_info.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


def print_baselines(m: dict) -> None:
    """The no-skill scores beside the model's, and a warning when the model is no better than them."""
    major, uniform = m["baselines"]["majority"], m["baselines"]["uniform"]
    print(f"baselines: always {major['label']}: macro-F1 {major['macro_f1']:.4f}, accuracy {major['accuracy']:.4f}; "
          f"uniform guess: macro-F1 {uniform['macro_f1']:.4f}, accuracy {uniform['accuracy']:.4f}")
    if m["degenerate"]:
        print(f"warning: degenerate predictions: {'; '.join(m['degenerate_reasons'])}")


def report(m: dict, baseline: dict | None) -> None:
    print()
    print_table(m, baseline)
    print_baselines(m)
    print(calibration_line(m))
    for line in m.get("provenance_lines", []):  # what the evaluated run was made of (train_info.json)
        print(line)
    print(f"\nlabel scoring: {m['items']} items in {m['seconds']:.1f}s = {m['items_per_second']} items/s, "
          f"{m['ms_per_item']} ms/item (mean prompt {m['prompt_tokens_mean']} tokens)")
    if "generation" in m:
        g = m["generation"]
        print(f"generation:    macro-F1 {g['macro_f1']:.4f}, invalid outputs {100 * g['invalid_rate']:.1f}%, "
              f"{g['ms_per_item']} ms/item")
    print(f"wrote {m['output_dir']}/ ({', '.join(m['written'])})")
    print(f"report: {Path(m['output_dir']) / 'report.html'} (open it in a browser; report.md beside it)")
    if m.get("tracked"):
        print(m["tracked"])


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
