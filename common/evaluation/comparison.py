"""Is model B better than model A on the same items? The paired statistics, as pure functions.

Both models' predictions on one list of items are compared item by item, so what the items have in
common (easy ones, hard ones) cancels out:
- a paired bootstrap: the items resampled with replacement (the same indices for both models), the
  macro-F1 / accuracy / per-class F1 differences computed on each resample with the toolkit's one
  definition (classification_metrics), and the 2.5th and 97.5th percentiles as the 95% interval;
- McNemar's exact test on the items exactly one model gets right (b: only A, c: only B): under "equally
  good" each of them is a fair coin flip, so p is the two-sided exact binomial tail of min(b, c) in b + c;
- one verdict sentence by the rule in `verdict` (docs/compare.md).
"""
from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from math import comb

import numpy as np

from common.evaluation.classification_metrics import classification_metrics

RESAMPLES = 2000   # bootstrap resamples: the interval's ends move by about 0.002 between seeds at 2,000
SEED = 0           # the bootstrap's seed: the same inputs give the same interval
CONFIDENCE = 0.95  # the interval's coverage
ALPHA = 0.05       # McNemar's threshold; significant = the macro-F1 interval excludes 0 and p < ALPHA


def items_digest(rows: list[dict]) -> str:
    """sha256 of the items (text and gold label, in order): two evaluations are comparable when it is equal."""
    payload = json.dumps([[r["text"], r["label"]] for r in rows], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def first_difference(rows_a: list[dict], rows_b: list[dict]) -> str | None:
    """Why two evaluations are not on the same items (a sentence), or None when they are."""
    if len(rows_a) != len(rows_b):
        return f"A has {len(rows_a)} items and B {len(rows_b)}"
    for i, (a, b) in enumerate(zip(rows_a, rows_b), 1):
        if (a["text"], a["label"]) != (b["text"], b["label"]):
            return f"item {i} differs (A: {a['label']} {a['text'][:40]!r}, B: {b['label']} {b['text'][:40]!r})"
    return None


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: P(a Binomial(b + c, 1/2) count at least as far from the middle as min(b, c)).
    Exact fractions, so a large b + c loses nothing to rounding; b = c = 0 (no disagreement) is p = 1."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = Fraction(sum(comb(n, i) for i in range(k + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def discordant(truth: list[str], pred_a: list, pred_b: list) -> dict:
    """The 2x2 table of right/wrong: both_right, only_a (McNemar's b), only_b (c), both_wrong."""
    ra = [p == t for p, t in zip(pred_a, truth)]
    rb = [p == t for p, t in zip(pred_b, truth)]
    return {"both_right": sum(x and y for x, y in zip(ra, rb)), "only_a": sum(x and not y for x, y in zip(ra, rb)),
            "only_b": sum(y and not x for x, y in zip(ra, rb)), "both_wrong": sum(not (x or y) for x, y in zip(ra, rb))}


def _scores(truth: list[str], predicted: list, labels: list[str]) -> np.ndarray:
    """[macro-F1, accuracy, F1 of each label] by the toolkit's definition."""
    m = classification_metrics(truth, predicted, labels)
    return np.array([m["macro_f1"], m["accuracy"], *(m["per_class"][label]["f1"] for label in labels)], dtype=float)


def paired_bootstrap(truth: list[str], pred_a: list, pred_b: list, labels: list[str],
                     resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, 2 + len(labels)]: B minus A on each resample (macro-F1, accuracy, per-class F1); each
    resample draws len(truth) item indices with replacement and scores both models on the same ones."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    out = np.empty((resamples, 2 + len(labels)))
    for r in range(resamples):
        idx = rng.integers(0, n, size=n)
        t = [truth[i] for i in idx]
        out[r] = _scores(t, [pred_b[i] for i in idx], labels) - _scores(t, [pred_a[i] for i in idx], labels)
    return out


def interval(deltas: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of bootstrap differences."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return float(low), float(high)


def _difference(a: float, b: float, deltas: np.ndarray, confidence: float) -> dict:
    low, high = interval(deltas, confidence)
    return {"a": float(a), "b": float(b), "delta": float(b - a), "low": low, "high": high}


def compare_predictions(truth: list[str], pred_a: list, pred_b: list, labels: list[str],
                        resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> dict:
    """Everything compare.json holds about the difference: macro-F1 and accuracy (with intervals), per-class
    F1 deltas (with intervals), the right/wrong table, McNemar's p, and the verdict."""
    if not truth:
        raise ValueError("no items to compare")
    a, b = _scores(truth, pred_a, labels), _scores(truth, pred_b, labels)
    boot = paired_bootstrap(truth, pred_a, pred_b, labels, resamples, seed)
    table = discordant(truth, pred_a, pred_b)
    support = {label: sum(t == label for t in truth) for label in labels}
    result = {
        "items": len(truth), "resamples": resamples, "seed": seed, "confidence": confidence, "alpha": ALPHA,
        "macro_f1": _difference(a[0], b[0], boot[:, 0], confidence),
        "accuracy": _difference(a[1], b[1], boot[:, 1], confidence),
        "per_class": {label: {**_difference(a[2 + i], b[2 + i], boot[:, 2 + i], confidence), "support": support[label]}
                      for i, label in enumerate(labels)},
        "mcnemar": {**table, "p": mcnemar_exact(table["only_a"], table["only_b"])},
    }
    result["significant"], result["verdict"] = verdict(result)
    return result


def verdict(result: dict) -> tuple[bool, str]:
    """(significant, one sentence). Significant: the macro-F1 interval excludes 0 AND McNemar's p < alpha,
    and both point the same way (a macro-F1 gain with more items wrong is called mixed, not a win)."""
    f1, m = result["macro_f1"], result["mcnemar"]
    figures = (f"macro-F1 {f1['delta']:+.3f} [{f1['low']:+.3f}, {f1['high']:+.3f}], "
               f"McNemar {p_text(m['p'])}")
    excludes_zero = f1["low"] > 0 or f1["high"] < 0
    if not (excludes_zero and m["p"] < result["alpha"]):
        return False, f"no significant difference: {figures}"
    if (f1["low"] > 0) != (m["only_b"] > m["only_a"]):
        return False, (f"mixed: {figures}, but {'A' if f1['low'] > 0 else 'B'} gets more items right "
                       f"({m['only_a']} only A, {m['only_b']} only B)")
    return True, f"{'B' if f1['low'] > 0 else 'A'} is better: {figures}"


def p_text(p: float) -> str:
    """A p-value as people read it: p = 0.41, p = 0.010, p = 0.0031, p = 1, p < 0.0001."""
    if p < 1e-4:
        return "p < 0.0001"
    return "p = 1" if p >= 1 else f"p = {p:#.2g}" if p >= 0.001 else f"p = {p:.4f}"
