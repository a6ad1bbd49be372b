"""Label probabilities that mean what they say: temperature scaling, and the figures that show it.

A run's label scores (common/model/label_scoring.py) are log-probabilities; their softmax is the label
probability /v1/classify, predict.py and evaluate_model.py give. Trained to be right, a model is rarely
right 9 times in 10 at 0.9. Temperature scaling (Guo et al., 2017) divides the scores by one number T
fitted on the validation split (T minimises its negative log-likelihood; T > 1 softens overconfident
scores): the best label never changes, only how sure it is said to be. train_qwen.py fits T after
training and writes calibration.json into the run; merge_lora.py and quantize_model.py carry it like
labels.json; whoever gives probabilities reads it with temperature_of().

The figures: expected calibration error (ECE: the gap between confidence and accuracy, averaged over
equal-width confidence bins, weighted by their items), the reliability table it is drawn from, and the
coverage curve (for each threshold, the share of items whose best label is at least that probable, and
their accuracy) from which a review threshold is picked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

CALIBRATION = "calibration.json"
T_RANGE = (0.05, 20.0)  # a temperature outside this says the scores or the data are broken, not overconfident


def nll(logprobs: torch.Tensor, truth: list[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logprobs / T)."""
    logp = torch.log_softmax(logprobs.double() / temperature, dim=-1)
    return float(-logp[torch.arange(len(truth)), torch.tensor(truth)].mean())


def fit_temperature(logprobs: torch.Tensor, truth: list[int]) -> float:
    """The T in T_RANGE minimising nll(): a golden-section search on log T (the NLL is convex in 1/T)."""
    if len(truth) == 0:
        raise ValueError("no items to fit a temperature on")
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logprobs, truth, math.exp(a)), nll(logprobs, truth, math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logprobs, truth, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logprobs, truth, math.exp(b))
    return round(math.exp((lo + hi) / 2), 4)


def probabilities(logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, K] label probabilities at temperature T (1.0: the raw scores)."""
    return torch.softmax(logprobs.float() / temperature, dim=-1)


def reliability(probs: torch.Tensor, truth: list[int], bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin (of the best label's probability): items, mean confidence, accuracy."""
    conf, picked = probs.max(dim=-1)
    right = (picked == torch.tensor(truth)).double()
    rows = []
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        inside = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        rows.append({"low": lo, "high": hi, "items": n,
                     "confidence": round(float(conf[inside].double().mean()), 4) if n else None,
                     "accuracy": round(float(right[inside].mean()), 4) if n else None})
    return rows


def ece(probs: torch.Tensor, truth: list[int], bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (items / N) * |accuracy - confidence|."""
    n = len(truth)
    return round(sum(r["items"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(probs, truth, bins) if r["items"]), 4) if n else float("nan")


def coverage_curve(probs: torch.Tensor, truth: list[int], thresholds=None) -> list[dict]:
    """For each threshold: the share of items labelled automatically (best probability >= it) and the
    accuracy of those; None where no item is left."""
    conf, picked = probs.max(dim=-1)
    right = picked == torch.tensor(truth)
    thresholds = thresholds if thresholds is not None else [round(0.5 + i / 40, 3) for i in range(20)] + [0.99]
    rows = []
    for t in thresholds:
        kept = conf >= t
        n = int(kept.sum())
        rows.append({"threshold": t, "coverage": round(n / max(len(truth), 1), 4),
                     "accuracy": round(float(right[kept].double().mean()), 4) if n else None})
    return rows


def threshold_for(curve: list[dict], target_accuracy: float) -> dict | None:
    """The lowest threshold of the curve whose automatic labels reach target_accuracy (most coverage), or
    None when none does."""
    ok = [r for r in curve if r["accuracy"] is not None and r["accuracy"] >= target_accuracy]
    return min(ok, key=lambda r: r["threshold"]) if ok else None


def calibration_figures(logprobs: torch.Tensor, truth: list[int], temperature: float) -> dict:
    """What calibration at `temperature` does on scored items: NLL and ECE before (T = 1) and after, the
    reliability tables, and the coverage curve at T (the probabilities clients get)."""
    before, after = probabilities(logprobs), probabilities(logprobs, temperature)
    return {"temperature": temperature, "items": len(truth),
            "nll_before": round(nll(logprobs, truth), 4), "nll_after": round(nll(logprobs, truth, temperature), 4),
            "ece_before": ece(before, truth), "ece_after": ece(after, truth),
            "reliability_before": reliability(before, truth), "reliability_after": reliability(after, truth),
            "coverage": coverage_curve(after, truth)}


def fit_on(model, tokenizer, records: list[dict], labels: list[str], prompt_cfg, batch_size: int = 8) -> dict:
    """Score `records` (text + label) with the model in eval mode and fit T on them: calibration_figures() at
    the fitted T. Training calls it on the validation split, with the model it just trained."""
    from common.model.label_scoring import score_label_ids
    from common.text.prompts import classification_ids
    was_training = model.training
    model.eval()
    with torch.no_grad():
        prompts = classification_ids(tokenizer, [r["text"] for r in records], labels, prompt_cfg)
        scores = score_label_ids(model, tokenizer, prompts, labels, batch_size).logprobs
    model.train(was_training)
    return fit_within_range(scores, [labels.index(r["label"]) for r in records])


def fit_within_range(logprobs: torch.Tensor, truth: list[int]) -> dict:
    """calibration_figures() at the fitted T, or at T = 1 with a note when the fit ran to a bound of T_RANGE:
    there the data set no temperature. A model right on every item has no NLL minimum (T -> 0 makes each
    answer certain, and a later mistake would come at probability 1), so the raw scores stay."""
    t = fit_temperature(logprobs, truth)
    if T_RANGE[0] * 1.01 < t < T_RANGE[1] * 0.99:
        return calibration_figures(logprobs, truth, t)
    why = "the model is right on every item here" if t < 1 else "the scores carry no information here"
    return {**calibration_figures(logprobs, truth, 1.0), "fitted": t,
            "note": f"the fit ran to the bound T={t:g}: {why}, so T is kept at 1"}


# ----------------------------------------------------------------------------- the run's file
SUMMARY = ("temperature", "items", "nll_before", "nll_after", "ece_before", "ece_after", "note")  # train_info's


def calibrate_run(run_dir: Path, model, tokenizer, records: list[dict], labels: list[str], cfg) -> dict | None:
    """Fit T on (a seeded sample of at most train.calibration_items of) the val split `records` and write
    calibration.json into the run; returns the SUMMARY figures, or None when train.calibration_items is 0."""
    import random
    t = cfg.train
    if t.calibration_items <= 0 or not records:
        return None
    sample = random.Random(t.seed).sample(records, min(t.calibration_items, len(records)))
    found = fit_on(model, tokenizer, sample, labels, cfg.prompt, t.eval_batch_size)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_calibration(run_dir, split="val", **found)
    return {k: found[k] for k in SUMMARY if k in found}


def recalibrate(cfg, run_dir: Path) -> dict | None:
    """calibration.json for a finished run (`train_qwen.py --calibrate-only RUN`: one trained before
    calibration existed), fitted on the val split it was trained on, the model loaded as evaluate_model.py
    loads it; the figures go into its train_info.json too."""
    from common.config import ConfigError
    from common.model.loading import adapter_base_path, load_tokenizer
    from common.model.memory import load_as_served
    from common.text.prepared import data_hash, load_splits, read_labels
    info_path, processed = Path(run_dir) / "train_info.json", cfg.resolve(cfg.data.processed_dir)
    labels = read_labels(run_dir) if info_path.is_file() else None
    if not labels:
        raise ConfigError(f"{run_dir} is no finished classification run (train_info.json and labels.json)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("data_sha256") != data_hash(processed, ("train", "val")):
        raise ConfigError(f"{processed} is not the data {Path(run_dir).name} was trained on; set the "
                          f"data.processed_dir (or the profile) the run used")
    model, _ = load_as_served(cfg, cfg.resolve(adapter_base_path(run_dir)), run_dir, cfg.evaluate.quantization)
    val = load_splits(processed, ("val",))["val"]
    info["calibration"] = calibrate_run(run_dir, model, load_tokenizer(run_dir), val, labels, cfg)
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    return info["calibration"]


def summary_line(c: dict | None) -> str:
    """The terminal's one line: "calibration: T=1.83 on 200 val items, ECE 0.121 -> 0.034"."""
    if not c:
        return "calibration: off (train.calibration_items is 0)"
    return (f"calibration: T={c['temperature']:.2f} on {c['items']} val items, "
            f"ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}" + (f" ({c['note']})" if c.get("note") else ""))


def write_calibration(run_dir: Path, temperature: float, **figures) -> Path:
    """calibration.json in the run: the temperature and how it was fitted (split, items, NLL, ECE)."""
    path = Path(run_dir) / CALIBRATION
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"method": "temperature scaling", "temperature": temperature, **figures}, indent=2),
                   encoding="utf-8")
    tmp.replace(path)
    return path


def calibration_of(*dirs) -> dict | None:
    """calibration.json of the first of `dirs` holding one (temperature, split, items, NLL and ECE before and
    after, the validation split's coverage curve at that temperature), or None."""
    for d in filter(None, dirs):
        path = Path(d) / CALIBRATION
        if path.is_file():
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                return None
            return found if isinstance(found, dict) else None
    return None


def temperature_of(*dirs) -> float:
    """The temperature in the first of `dirs` (a run, its merged or quantized copy) holding calibration.json;
    1.0 (the raw scores) when none does or the file is unreadable."""
    try:
        t = float((calibration_of(*dirs) or {}).get("temperature", 1.0))
    except (TypeError, ValueError):
        return 1.0
    return t if T_RANGE[0] <= t <= T_RANGE[1] else 1.0
