"""Classification metrics from a confusion matrix; one implementation for training and evaluation."""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: list[str], y_pred: list[str], labels: list[str]) -> np.ndarray:
    """[true, predicted] counts; a prediction outside `labels` (an invalid generation) counts nowhere."""
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if p in index:
            cm[index[t], index[p]] += 1
    return cm


def majority_baseline(truth: list[str], labels: list[str]) -> dict:
    """What always answering the most frequent label scores on these items (a tie: the first in labels)."""
    counts = {label: sum(t == label for t in truth) for label in labels}
    majority = max(labels, key=lambda label: counts[label])
    always = classification_metrics(truth, [majority] * len(truth), labels)
    return {"label": majority, "accuracy": always["accuracy"], "macro_f1": always["macro_f1"]}


def degenerate(truth: list[str], predicted: list, labels: list[str], macro_f1: float) -> list[tuple[str, str]]:
    """(kind, sentence) for each way the predictions say nothing about the inputs: one class for every item
    while the items hold several ("one_class"), or a macro-F1 not above always answering the most frequent
    label ("at_baseline"). The one rule: the evaluation report and training health both flag a run by it."""
    found, kinds, majority = [], set(predicted), majority_baseline(truth, labels)
    if len(kinds) == 1 and len(set(truth)) > 1:
        found.append(("one_class", f"every prediction is {next(iter(kinds))}"))
    if len(set(truth)) > 1 and macro_f1 <= majority["macro_f1"] + 1e-9:  # equal, up to float rounding
        found.append(("at_baseline", f"macro-F1 {macro_f1:.3f} is not above the majority-class baseline's "
                                     f"{majority['macro_f1']:.3f} (always {majority['label']})"))
    return found


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """accuracy, macro/weighted F1, per-class precision/recall/F1/support, the confusion matrix."""
    cm = confusion_matrix(y_true, y_pred, labels)
    tp = np.diag(cm).astype(float)
    support = np.array([sum(t == label for t in y_true) for label in labels], dtype=float)
    precision = _safe_div(tp, cm.sum(axis=0).astype(float))
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0  # macro-F1 averages the classes the data holds
    return {
        "accuracy": float(tp.sum() / max(len(y_true), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1)),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]),
                              "f1": float(f1[i]), "support": int(support[i])} for i, label in enumerate(labels)},
        "confusion_matrix": cm.tolist(),
        "labels": labels,
    }
