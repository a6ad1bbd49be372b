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


# ----------------------------------------------------------------------------- the run's file
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
