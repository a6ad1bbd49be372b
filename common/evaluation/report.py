"""One report per evaluation: report.md, and the same as a self-contained report.html (every image
inlined as a data: URI), in the evaluation's output folder.

It tells a run's story in one place: the score beside the majority-class and uniform baselines, any
training-health warnings, where the model and the data came from, the training curves, per-class
scores, the confusion matrix, how far its probabilities can be trusted (calibration: reliability diagram
and coverage curve) and the mistakes the model was surest of. Both files are rendered from
one list of blocks, so they cannot disagree.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections import Counter
from pathlib import Path

import yaml

from common.evaluation.classification_metrics import degenerate, majority_baseline
from common.evaluation.calibration import threshold_for
from common.evaluation.plots import save_calibration_pngs, save_per_class_png, save_training_curves

MISTAKES_SHOWN = 20   # the most confident mistakes listed; predictions.jsonl holds them all
TEXT_SHOWN = 160      # characters of a mistake's text in the table
PROVENANCE_KEYS = ("base_model", "method", "task", "data", "data_sha256", "data_hashes", "seed", "versions",
                   "device", "dtype", "global_step", "best_checkpoint", "best_metric")
MANIFEST_KEYS = ("source", "base", "adapter", "method", "quantization", "parity", "created")
CONFIG_SECTIONS = ("profile", "model", "train")  # what made the run; the rest is in config.resolved.yaml


# ----------------------------------------------------------------------------- baselines (issue 13)
def baselines(truth: list[str], labels: list[str]) -> dict:
    """What no-skill classifiers score on the same items: always the most frequent label, and a
    uniform random guess (in expectation: a class's precision is its share, its recall 1/K)."""
    counts = Counter(truth)
    k, n = len(labels), max(len(truth), 1)
    f1s = [2 * (c / n) / k / (c / n + 1 / k) for c in (counts[label] for label in labels) if c]
    return {"majority": majority_baseline(truth, labels),
            "uniform": {"accuracy": 1 / k, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}}


def add_baselines(metrics: dict, truth: list[str], predicted: list[str | None]) -> dict:
    """metrics plus baselines, degenerate (bool) and degenerate_reasons, as metrics.json keeps them."""
    base = baselines(truth, metrics["labels"])
    reasons = [sentence for _, sentence in degenerate(truth, predicted, metrics["labels"], metrics["macro_f1"])]
    metrics.update(baselines=base, degenerate=bool(reasons), degenerate_reasons=reasons)
    return metrics


def confident_mistakes(predictions: list[dict], n: int = MISTAKES_SHOWN) -> list[dict]:
    """The first n wrong predictions by falling probability (predictions.jsonl's rows)."""
    wrong = [p for p in predictions if p["predicted"] != p["label"]]
    return sorted(wrong, key=lambda p: -p["probability"])[:n]


# ----------------------------------------------------------------------------- where it came from
def _load_json(path: Path):
    """A JSON file's value; None when absent, {"unreadable": why} when broken (a report is still due)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        return {"unreadable": f"{path.name} could not be read ({e})"}


def training_run(model_dir: Path, manifest: dict) -> Path | None:
    """The run directory that trained the model: itself, or the adapter a merged model's manifest names."""
    for d in (model_dir, manifest.get("adapter")):
        if isinstance(d, (str, Path)) and d and (Path(d) / "train_info.json").is_file():
            return Path(d)
    return None


def _text(value) -> str:
    """A JSON value on one line; sha256 digests cut to 16 hex digits (train_info.json has them whole)."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16] + "…"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(_text, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_config(run_dir: Path | None, info: dict) -> dict:
    if isinstance(info.get("config"), dict):
        return info["config"]
    path = run_dir / "config.resolved.yaml" if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def run_facts(info: dict) -> dict:
    """train_info.json's provenance, whether at the top level or under "provenance" (the nested form wins)."""
    nested = info.get("provenance")
    return {**info, **nested} if isinstance(nested, dict) else info


def provenance_blocks(model_dir: Path, run_dir: Path | None, info: dict, manifest: dict, split_path: Path) -> list:
    info = run_facts(info)
    rows = [("evaluated model", str(model_dir))]
    rows += [(f"manifest: {k}", _text(manifest[k])) for k in MANIFEST_KEYS if k in manifest]
    if run_dir is not None and run_dir != model_dir:
        rows.append(("training run", str(run_dir)))
    rows += [(k, _text(info[k])) for k in (*PROVENANCE_KEYS, "unreadable") if k in info]
    config = run_config(run_dir, info)
    seed = config.get("train", {}).get("seed") if isinstance(config.get("train"), dict) else None
    if "seed" not in info and seed is not None:
        rows.append(("seed", f"{seed} (config)"))
    if split_path.is_file():
        digest = hashlib.sha256(split_path.read_bytes()).hexdigest()
        rows.append(("evaluated data", f"{split_path} (sha256 {_text(digest)})"))
    blocks = [("h2", "Provenance"), ("table", ["", "value"], rows)]
    shown = {k: config[k] for k in CONFIG_SECTIONS if k in config}
    if shown:
        blocks.append(("code", "configuration (as resolved for the run)",
                       yaml.safe_dump(shown, allow_unicode=True, sort_keys=False)))
    return blocks


def _finding(h: dict) -> str:
    at = f"step {h['step']}, " if "step" in h else ""
    return (f"{at}{h.get('level', 'warn')}: {h.get('finding', '?')} "
            f"(cause: {h.get('cause', '?')}; fix: {h.get('fix', '?')})")


def health_blocks(info: dict) -> list:
    """train_qwen.py's findings ({level, finding, cause, fix}); nothing when the run recorded none."""
    health = info.get("health")
    if not isinstance(health, list):
        return []
    if not health:
        return [("h2", "Training health"), ("p", "The run recorded no warnings.")]
    items = [_finding(h) if isinstance(h, dict) else str(h) for h in health]
    return [("h2", "Training health"), ("warn", f"{len(items)} warning(s) from training."), ("list", items)]


# ----------------------------------------------------------------------------- the sections
def summary_blocks(m: dict, model_dir: Path) -> list:
    base = m["baselines"]
    rows = [("this model (label scoring)", f"{m['macro_f1']:.4f}", f"{m['accuracy']:.4f}", f"{m['weighted_f1']:.4f}"),
            (f"majority-class baseline (always {base['majority']['label']})", f"{base['majority']['macro_f1']:.4f}",
             f"{base['majority']['accuracy']:.4f}", ""),
            ("uniform random guess (expected)", f"{base['uniform']['macro_f1']:.4f}",
             f"{base['uniform']['accuracy']:.4f}", "")]
    if "generation" in m:
        g = m["generation"]
        rows.append((f"greedy generation + parsing ({100 * g['invalid_rate']:.1f}% invalid)",
                     f"{g['macro_f1']:.4f}", f"{g['accuracy']:.4f}", f"{g['weighted_f1']:.4f}"))
    blocks = [("h1", f"{model_dir.name} on {m['split']}"),
              ("p", f"{m['items']} items; label scoring {m['items_per_second']} items/s, {m['ms_per_item']} ms/item."),
              ("table", ["", "macro-F1", "accuracy", "weighted-F1"], rows)]
    if m["degenerate"]:
        blocks.append(("warn", "Degenerate predictions: " + "; ".join(m["degenerate_reasons"]) + "."))
    return blocks


def per_class_blocks(m: dict) -> list:
    rows = [(label, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
            for label, c in m["per_class"].items()]
    return [("h2", "Per class"), ("table", ["label", "precision", "recall", "F1", "support"], rows),
            ("img", "per_class.png", "precision, recall and F1 per class")]


def calibration_blocks(m: dict, out_dir: Path) -> list:
    """ECE and NLL before and after the run's temperature, the reliability diagram, and the coverage curve
    (what share a review threshold labels automatically, how accurately); draws reliability.png, coverage.png."""
    c = m.get("calibration")
    if not isinstance(c, dict):
        return []
    save_calibration_pngs(c, out_dir)
    t = c["temperature"]
    refused = f" On the val split {c['note']}." if c.get("note") else ""
    how = (f"Temperature T = {t:.2f}, fitted on the {c['fitted_on']} (calibration.json): every probability here and "
           f"in predictions.jsonl is softmax(scores / T); the best label is the same at any T.{refused}"
           if c.get("fitted_on") else "No calibration.json: the raw probabilities (T = 1). "
           "python train_qwen.py --calibrate-only RUN fits a temperature on the run's val split.")
    rows = [("raw scores (T = 1)", f"{c['ece_before']:.4f}", f"{c['nll_before']:.4f}"),
            (f"calibrated (T = {t:.2f})", f"{c['ece_after']:.4f}", f"{c['nll_after']:.4f}")]
    curve = [(f"{r['threshold']:.3f}", f"{100 * r['coverage']:.1f}%",
              "" if r["accuracy"] is None else f"{r['accuracy']:.4f}") for r in c["coverage"]]
    picks = [(a, threshold_for(c["coverage"], a)) for a in (0.9, 0.95, 0.99)]
    told = [f"accuracy {a:.0%}: threshold {p['threshold']:.3f} labels {100 * p['coverage']:.1f}% automatically"
            for a, p in picks if p is not None]
    return [("h2", "Calibration"), ("p", how),
            ("table", [f"on {m['split']} ({m['items']} items)", "ECE (10 bins)", "NLL"], rows),
            ("img", "reliability.png", "reliability diagram before and after the temperature"),
            ("p", "Coverage: items whose best label's probability reaches the threshold are labelled automatically, "
                  "the rest go to review." + (" For a target " + "; ".join(told) + "." if told else "")),
            ("table", ["threshold", "labelled automatically", "their accuracy"], curve),
            ("img", "coverage.png", "coverage and accuracy against the threshold")]


def mistake_blocks(predictions: list[dict]) -> list:
    wrong = confident_mistakes(predictions)
    if not wrong:
        return [("h2", "Most confident mistakes"), ("p", "None: every prediction is right.")]
    rows = [(str(i), f"{p['probability']:.3f}", p["label"], p["predicted"],
             p["text"] if len(p["text"]) <= TEXT_SHOWN else p["text"][:TEXT_SHOWN] + "…")
            for i, p in enumerate(wrong, 1)]
    total = sum(p["predicted"] != p["label"] for p in predictions)
    return [("h2", "Most confident mistakes"),
            ("p", f"The first {len(wrong)} of {total} by probability (all in predictions.jsonl)."),
            ("table", ["#", "probability", "gold", "predicted", "text"], rows)]


def chart_blocks(out_dir: Path, m: dict, run_dir: Path | None, info: dict) -> list:
    """Draws per_class.png and, from the run's history.json, the training curves into out_dir."""
    save_per_class_png(m["per_class"], out_dir / "per_class.png", f"per class, macro-F1 {m['macro_f1']:.3f}")
    history = _load_json(run_dir / "history.json") if run_dir else None
    if not isinstance(history, list):
        return []
    curves = save_training_curves(history, out_dir, info.get("best_checkpoint"))
    return [("h2", "Training curves"), *[("img", p.name, p.stem.replace("_", " ")) for p in curves]] if curves else []


# ----------------------------------------------------------------------------- rendering
def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def to_markdown(blocks: list) -> str:
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "warn":
            out.append(f"> **Warning:** {args[0]}")
        elif kind == "list":
            out.append("\n".join(f"- {_md_cell(item)}" for item in args[0]))
        elif kind == "code":  # folded: GitHub and most viewers render <details> in Markdown
            out.append(f"<details><summary>{args[0]}</summary>\n\n```yaml\n{args[1].rstrip()}\n```\n\n</details>")
        elif kind == "img":
            out.append(f"![{args[1]}]({args[0]})")
        elif kind == "table":
            header, rows = args
            lines = [header, ["---"] * len(header), *rows]
            out.append("\n".join("| " + " | ".join(map(_md_cell, r)) + " |" for r in lines))
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:"Noto Sans SC","WenQuanYi Micro Hei","Microsoft YaHei",sans-serif;max-width:1000px;margin:2em auto;
  padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0} th{background:#f3f3f3} td:first-child{white-space:nowrap}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
img{max-width:100%;display:block;margin:1em 0} pre{background:#f6f6f6;padding:1em;overflow-x:auto}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.6em 1em}
"""


def _html_block(kind: str, args: list, out_dir: Path) -> str:
    e = html.escape
    if kind == "h2":  # an anchor per section: report.html#confusion-matrix
        return f'<h2 id="{re.sub(r"[^a-z0-9]+", "-", args[0].lower()).strip("-")}">{e(args[0])}</h2>'
    if kind in ("h1", "p"):
        return f"<{kind}>{e(args[0])}</{kind}>"
    if kind == "warn":
        return f'<p class="warn"><strong>Warning:</strong> {e(args[0])}</p>'
    if kind == "list":
        return "<ul>" + "".join(f"<li>{e(item)}</li>" for item in args[0]) + "</ul>"
    if kind == "code":
        return f"<details><summary>{e(args[0])}</summary><pre>{e(args[1])}</pre></details>"
    if kind == "img":
        data = base64.b64encode((out_dir / args[0]).read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{e(args[1])}">'
    header, rows = args
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(blocks: list, out_dir: Path) -> str:
    title = next((args[0] for kind, *args in blocks if kind == "h1"), "evaluation report")
    body = "\n".join(_html_block(kind, args, out_dir) for kind, *args in blocks)
    return (f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(out_dir: Path, metrics: dict, predictions: list[dict], model_dir: Path, split_path: Path) -> list[str]:
    """report.md and report.html (plus the charts they show) in out_dir; the names of the files written.
    metrics must hold add_baselines' keys; confusion_matrix.png, when out_dir has it, is shown too."""
    manifest = _load_json(model_dir / "manifest.json")
    manifest = manifest if isinstance(manifest, dict) else {}
    run_dir = training_run(model_dir, manifest)
    info = _load_json(run_dir / "train_info.json") if run_dir else None
    info = info if isinstance(info, dict) else {}
    curves = chart_blocks(out_dir, metrics, run_dir, info)
    confusion = [("h2", "Confusion matrix"), ("img", "confusion_matrix.png", "confusion matrix")] \
        if (out_dir / "confusion_matrix.png").is_file() else []
    blocks = [*summary_blocks(metrics, model_dir), *health_blocks(info),
              *provenance_blocks(model_dir, run_dir, info, manifest, split_path), *curves,
              *per_class_blocks(metrics), *confusion, *calibration_blocks(metrics, out_dir),
              *mistake_blocks(predictions)]
    (out_dir / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(blocks, out_dir), encoding="utf-8")
    images = [args[0] for kind, *args in blocks if kind == "img" and args[0] != "confusion_matrix.png"]
    return [*images, "report.md", "report.html"]
