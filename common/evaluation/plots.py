"""The charts of a run and of its evaluation: confusion matrix, per-class scores, training curves,
reliability diagram and coverage curve (calibration).

Label names are drawn as written, in any script, on a machine with no system CJK font: the
requirements bring Noto Sans SC (pylopdf-fonts-zh-cn, OFL licence), registered with matplotlib here
at plot time, and matplotlib's own DejaVu Sans is the per-glyph fallback for what it lacks. Figures
are built without pyplot (no global backend or figure registry), so any stage, server or test can
draw without side effects.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.terminal import columns

DPI = 120
LABEL_COLUMNS = 14   # wrap a tick label past this many columns (a CJK character takes two)
COLUMN_INCH = 0.07   # about one column of 10-point text, to size figures around their labels
CURVE_KEYS = ("loss", "eval_loss", "eval_macro_f1", "eval_accuracy")


def font_families() -> list[str]:
    """The families to draw with, the bundled CJK font first; registers it once per process."""
    try:
        import pylopdf_fonts_zh_cn
    except ImportError:  # a pinned requirement; without it a chart is still drawn, Chinese maybe as boxes
        return ["Noto Sans CJK SC", "WenQuanYi Micro Hei", "DejaVu Sans"]
    path = str(pylopdf_fonts_zh_cn.sans_path())
    if not any(f.fname == path for f in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(path)
    return [font_manager.FontProperties(fname=path).get_name(), "DejaVu Sans"]


def style() -> dict:
    """rc settings every chart here is built and saved under (matplotlib.rc_context(style()))."""
    return {"font.family": font_families(), "font.size": 10, "axes.titlesize": 11}


def wrap_label(name: str, width: int = LABEL_COLUMNS) -> str:
    """`name` in lines of at most `width` columns, broken after a space where the line has one, else
    anywhere (Chinese has no spaces); removing the newlines gives `name` back."""
    lines, line = [], ""
    for ch in name:
        if line and not ch.isspace() and columns(line + ch) > width:
            cut = line.rfind(" ") + 1 or len(line)
            lines.append(line[:cut])
            line = line[cut:]
        line += ch
    return "\n".join([*lines, line])


def _widest(names: list[str]) -> int:
    return max((columns(line) for n in names for line in n.split("\n")), default=1)


def confusion_figure(cm: list[list[int]], labels: list[str], title: str) -> Figure:
    """Counts of [true, predicted] with the label names on both axes and a colour bar for the scale."""
    n, names = len(labels), [wrap_label(label) for label in labels]
    cell, text_in = 0.55, COLUMN_INCH * _widest(names)
    rotate = text_in > cell  # names wider than a cell would run into each other along the x axis
    x_room = text_in * (0.75 if rotate else 0.25)
    fig = Figure(figsize=(2.6 + cell * n + text_in, 1.6 + cell * n + x_room), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    top = max((max(row) for row in cm), default=0)
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    if rotate:
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted label", ylabel="true label", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="items")
    return fig


def per_class_figure(per_class: dict[str, dict], title: str) -> Figure:
    """Precision, recall and F1 of each class as horizontal bars, in labels.json's order from the top."""
    labels = list(per_class)
    names = [f"{wrap_label(label)} ({per_class[label]['support']})" for label in labels]
    fig = Figure(figsize=(6.5 + COLUMN_INCH * _widest(names), 1.4 + 0.5 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    height = 0.26
    for k, (key, colour) in enumerate((("precision", "#9ecae1"), ("recall", "#4292c6"), ("F1", "#08306b"))):
        ys = [i + (k - 1) * height for i in range(len(labels))]
        values = [per_class[label][key.lower()] for label in labels]
        bars = ax.barh(ys, values, height=height, color=colour, label=key)
        if key == "F1":
            ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax.set_yticks(range(len(labels)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set(xlabel="score (support in brackets)", title=title)
    fig.legend(loc="outside lower center", ncols=3, frameon=False)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def save_confusion_png(cm: list[list[int]], labels: list[str], path: Path, title: str) -> Path:
    with matplotlib.rc_context(style()):
        return save_figure(confusion_figure(cm, labels, title), path)


def save_per_class_png(per_class: dict[str, dict], path: Path, title: str) -> Path:
    with matplotlib.rc_context(style()):
        return save_figure(per_class_figure(per_class, title), path)


# ----------------------------------------------------------------------------- training curves
def history_series(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each of CURVE_KEYS in the Trainer's log_history. The evaluations
    logged after the training summary (the entry with train_loss) are dropped: they score the best
    checkpoint reloaded at the end, so plotted at the last step they would misplace it."""
    end = max((i for i, e in enumerate(history) if "train_loss" in e), default=len(history))
    points: dict[str, dict[int, float]] = {k: {} for k in CURVE_KEYS}
    for entry in history[:end]:
        for key in CURVE_KEYS:
            value = entry.get(key)
            if "step" in entry and isinstance(value, (int, float)) and math.isfinite(value):
                points[key].setdefault(int(entry["step"]), float(value))
    return {k: sorted(v.items()) for k, v in points.items()}


def checkpoint_step(checkpoint: str | None) -> int | None:
    """200 for ".../checkpoints/checkpoint-200"."""
    found = re.search(r"checkpoint-(\d+)$", str(checkpoint or "").rstrip("/"))
    return int(found.group(1)) if found else None


def _mark_best(ax, best: int | None, checkpoint: str | None) -> None:
    if best is not None:
        ax.axvline(best, color="#d62728", linestyle="--", linewidth=1, label=f"best: {Path(checkpoint).name}")


def _curve_axes(title: str, ylabel: str):
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole; a short run would get 2.25
    ax.grid(alpha=0.3)
    return fig, ax


def loss_figure(series: dict, best: int | None, checkpoint: str | None) -> Figure | None:
    """Training loss and validation loss against step; a log scale when the loss falls by orders of
    magnitude, as it does from a random start."""
    if not series["loss"] and not series["eval_loss"]:
        return None
    fig, ax = _curve_axes("loss (answer tokens)", "cross-entropy")
    for key, name, marker, colour in (("loss", "training", None, "C0"), ("eval_loss", "validation", "o", "C1")):
        if series[key]:
            ax.plot(*zip(*series[key]), marker=marker, markersize=4, label=name, color=colour)
    values = [v for key in ("loss", "eval_loss") for _, v in series[key]]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    _mark_best(ax, best, checkpoint)
    ax.legend()
    return fig


def metrics_figure(series: dict, best: int | None, checkpoint: str | None) -> Figure | None:
    """Validation macro-F1 and accuracy against step, the chosen checkpoint marked; None when the
    run logged no label metrics (a chat run)."""
    if not series["eval_macro_f1"] and not series["eval_accuracy"]:
        return None
    fig, ax = _curve_axes("validation macro-F1 and accuracy", "score")
    for key, name, colour in (("eval_macro_f1", "macro-F1", "C0"), ("eval_accuracy", "accuracy", "C1")):
        if series[key]:
            ax.plot(*zip(*series[key]), marker="o", markersize=4, label=name, color=colour)
    _mark_best(ax, best, checkpoint)
    at_best = dict(series["eval_macro_f1"]).get(best)
    if at_best is not None:
        ax.plot([best], [at_best], marker="*", markersize=14, color="#d62728", linestyle="none")
        ax.annotate(f"{at_best:.3f}", (best, at_best), textcoords="offset points", xytext=(6, -14))
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="lower right")
    return fig


def curves_figures(history: list[dict], best_checkpoint: str | None) -> dict[str, Figure]:
    """{file name: figure} for the curves the history has data for (build under rc_context(style()))."""
    series, best = history_series(history), checkpoint_step(best_checkpoint)
    figures = {"curves_loss.png": loss_figure(series, best, best_checkpoint),
               "curves_metrics.png": metrics_figure(series, best, best_checkpoint)}
    return {name: fig for name, fig in figures.items() if fig is not None}


def save_training_curves(history: list[dict], run_dir: Path, best_checkpoint: str | None) -> list[Path]:
    """run_dir/curves_loss.png and, for a classifier, run_dir/curves_metrics.png; the paths written."""
    with matplotlib.rc_context(style()):
        return [save_figure(fig, Path(run_dir) / name)
                for name, fig in curves_figures(history, best_checkpoint).items()]


# ----------------------------------------------------------------------------- calibration
def reliability_figure(tables: dict[str, list[dict]], title: str) -> Figure:
    """One panel per reliability table (calibration.reliability: {name: rows}): the accuracy of each
    confidence bin as a bar against the diagonal of perfect calibration, its item count above it. A bar
    below the diagonal is overconfidence; ECE is the item-weighted mean gap between the bar and the mean
    confidence (the dot)."""
    fig = Figure(figsize=(4.2 * len(tables), 4.4), layout="constrained")
    axes = fig.subplots(1, len(tables), sharey=True, squeeze=False)[0]
    for ax, (name, rows) in zip(axes, tables.items()):
        filled = [r for r in rows if r["items"]]
        ax.bar([r["low"] for r in filled], [r["accuracy"] for r in filled],
               width=[r["high"] - r["low"] for r in filled], align="edge", color="#4292c6", edgecolor="white",
               label="accuracy of the bin")
        ax.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], "o", color="#08306b",
                markersize=3, label="(mean confidence, accuracy)")
        for r in filled:
            ax.annotate(str(r["items"]), ((r["low"] + r["high"]) / 2, r["accuracy"]), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], "--", color="#d62728", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (the best label's probability)", title=name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    return fig


def coverage_figure(curve: list[dict], title: str) -> Figure:
    """calibration.coverage_curve: for each threshold, the share of items labelled automatically (best
    probability at least the threshold) and the accuracy of those; the rest would go to a person."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["threshold"] for r in curve], [r["coverage"] for r in curve], marker="o", markersize=4,
            label="share labelled automatically")
    kept = [(r["threshold"], r["accuracy"]) for r in curve if r["accuracy"] is not None]
    if kept:
        ax.plot(*zip(*kept), marker="o", markersize=4, label="accuracy of those")
    ax.set(xlabel="threshold on the best label's probability", ylabel="share / accuracy", ylim=(-0.02, 1.05),
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return fig


def save_calibration_pngs(cal: dict, out_dir: Path) -> list[Path]:
    """reliability.png (before and after the temperature) and coverage.png from an evaluation's
    calibration block (calibration.figures); the paths written."""
    t = cal["temperature"]
    tables = {"raw scores (T = 1)": cal["reliability_before"], f"calibrated (T = {t:.2f})": cal["reliability_after"]}
    with matplotlib.rc_context(style()):
        return [save_figure(reliability_figure(tables, f"reliability: ECE {cal['ece_before']:.3f} -> "
                                                       f"{cal['ece_after']:.3f}"), Path(out_dir) / "reliability.png"),
                save_figure(coverage_figure(cal["coverage"], f"coverage at T = {t:.2f}"),
                            Path(out_dir) / "coverage.png")]
