"""What a person sees after a run (issue 17): charts that draw the label names as written, training
curves without TensorBoard, and one report per evaluation that opens in a browser with every image."""
import base64
import io
import json
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import pylopdf_fonts_zh_cn
import pytest
from conftest import run_script
from matplotlib import font_manager

from common.evaluation import plots
from common.evaluation.report import MISTAKES_SHOWN, write_report

PNG = b"\x89PNG\r\n\x1a\n"
HEALTH = [{"kind": "at_baseline", "level": "warn", "finding": "macro-F1 0.022 is not above the majority-class baseline",
           "cause": "too few steps", "fix": "train longer", "step": 4},  # common/evaluation/training_health.py's HealthFinding, as recorded
          {"level": "warn", "finding": "validation loss rose at 3 evaluations in a row",
           "cause": "the learning rate is too high for this data", "fix": "lower --learning-rate"}]


@pytest.fixture(scope="module")
def evaluated(trained_run, prepared_data, tmp_path_factory) -> tuple[Path, Path, str]:
    """(run, eval dir, what the CLI printed): trained_run seen through links, its train_info.json
    given health findings as train_qwen.py records them, evaluated by the real CLI."""
    run = tmp_path_factory.mktemp("report") / "run"
    run.mkdir()
    for f in trained_run.iterdir():
        if f.name not in ("checkpoints", "train_info.json"):
            (run / f.name).symlink_to(f)
    info = json.loads((trained_run / "train_info.json").read_text(encoding="utf-8"))
    (run / "train_info.json").write_text(json.dumps({**info, "health": HEALTH}, ensure_ascii=False), encoding="utf-8")
    out = run.parent / "eval"
    proc = run_script("evaluate_model.py", "--model", str(run), "--set", f"data.processed_dir={prepared_data}",
                      "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, out, proc.stdout


def md_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_tells_the_runs_story(evaluated, prepared_data):
    run, out, stdout = evaluated
    md = (out / "report.md").read_text(encoding="utf-8")
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    info = json.loads((run / "train_info.json").read_text(encoding="utf-8"))
    assert f"report: {out / 'report.html'}" in stdout
    assert f"| this model (label scoring) | {m['macro_f1']:.4f} | {m['accuracy']:.4f} |" in md
    major = m["baselines"]["majority"]
    assert f"| majority-class baseline (always {major['label']}) | {major['macro_f1']:.4f} |" in md
    assert ("Degenerate predictions" in md) == m["degenerate"]
    assert f"- step 4, warn: {HEALTH[0]['finding']} (cause: too few steps; fix: train longer)" in md
    assert f"- warn: {HEALTH[1]['finding']}" in md and "2 warning(s) from training" in md
    for key in ("method", "device", "best_checkpoint"):
        assert f"| {key} | {info[key]} |" in md
    assert re.search(rf"\| base_model \| [^\n]*{re.escape(info['base_model'])}", md)
    assert str(prepared_data / "test.jsonl") in md and "| seed | 42" in md
    for label, c in m["per_class"].items():
        assert f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |" in md
    assert md_images(md) == ["curves_loss.png", "curves_metrics.png", "per_class.png", "confusion_matrix.png",
                             "reliability.png", "coverage.png"]
    assert all((out / name).read_bytes().startswith(PNG) for name in md_images(md))


def test_report_lists_the_most_confident_mistakes(evaluated):
    _, out, _ = evaluated
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    wrong = sorted((p for p in preds if p["predicted"] != p["label"]), key=lambda p: -p["probability"])
    md = (out / "report.md").read_text(encoding="utf-8").split("## Most confident mistakes")[1]
    rows = [r.split(" | ") for r in md.splitlines() if re.match(r"\| \d+ \|", r)]
    assert len(rows) == min(len(wrong), MISTAKES_SHOWN) and len(wrong) > 0  # a 4-step model errs
    for row, p in zip(rows, wrong):
        assert row[1:4] == [f"{p['probability']:.3f}", p["label"], p["predicted"]]
        assert p["text"].startswith(row[4].rstrip(" |").rstrip("…"))


def test_report_shows_the_calibration(evaluated, trained_run):
    """The run's temperature, ECE and NLL before and after it, and every row of the coverage curve."""
    _, out, stdout = evaluated
    c = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["calibration"]
    t = json.loads((trained_run / "calibration.json").read_text())["temperature"]
    md = (out / "report.md").read_text(encoding="utf-8").split("## Calibration")[1].split("\n## ")[0]
    assert c["temperature"] == t and f"Temperature T = {t:.2f}, fitted on the val split" in md
    assert f"| raw scores (T = 1) | {c['ece_before']:.4f} | {c['nll_before']:.4f} |" in md
    assert f"| calibrated (T = {t:.2f}) | {c['ece_after']:.4f} | {c['nll_after']:.4f} |" in md
    assert sum(line.startswith("| 0.") or line.startswith("| 1.") for line in md.splitlines()) == len(c["coverage"])
    assert f"calibration: T={t:.2f}" in stdout and f"{c['ece_before']:.3f} -> {c['ece_after']:.3f}" in stdout


def test_reliability_diagram_draws_a_bar_per_filled_bin():
    from common.evaluation.calibration import reliability
    import torch
    probs = torch.tensor([[0.95, 0.05], [0.92, 0.08], [0.6, 0.4], [0.3, 0.7]])
    rows = reliability(probs, [0, 1, 0, 1])
    fig = plots.reliability_figure({"before": rows, "after": rows}, "t")
    assert [len(ax.patches) for ax in fig.axes] == [3, 3]  # bins 0.5-0.6, 0.6-0.7, 0.9-1.0 hold items
    assert [round(p.get_height(), 4) for p in fig.axes[0].patches] == [1.0, 1.0, 0.5]


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.external = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag in ("link", "script", "iframe") or (tag != "img" and "src" in a):
            self.external.append(tag)


def test_report_html_is_self_contained(evaluated):
    _, out, _ = evaluated
    page = Images()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    md = (out / "report.md").read_text(encoding="utf-8")
    assert len(page.srcs) == len(md_images(md)) == 6 and not page.external
    for src, name in zip(page.srcs, md_images(md)):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix) and base64.b64decode(src[len(prefix):]) == (out / name).read_bytes()


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (make system-deps installs it)")
def test_report_opens_in_chromium_with_every_image_shown(evaluated, tmp_path):
    """Headless Chromium loads report.html; a probe script counts the images it decoded."""
    _, out, _ = evaluated
    probe = ('<script>addEventListener("load", () => { const all = [...document.images]; document.body.dataset.shown ='
             ' all.filter(i => i.complete && i.naturalWidth > 0).length + "/" + all.length; });</script></body>')
    page = tmp_path / "report.html"
    page.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", probe), encoding="utf-8")
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shown = re.search(r'data-shown="(\d+)/(\d+)"', proc.stdout)
    assert shown, proc.stderr[-2000:]
    assert shown.group(1) == shown.group(2) == "6"
    labels = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["labels"]
    assert all(f"<td>{label}</td>" in proc.stdout for label in labels)


# ----------------------------------------------------------------------------- the charts
@pytest.fixture
def no_system_cjk_font(monkeypatch):
    """matplotlib as on a fresh server: only the fonts it ships (DejaVu), none of this machine's."""
    fm = font_manager.fontManager
    own = Path(matplotlib.get_data_path()) / "fonts"
    monkeypatch.setattr(fm, "ttflist", [f for f in fm.ttflist if own in Path(f.fname).parents])
    fm._findfont_cached.cache_clear()
    yield
    monkeypatch.undo()
    fm._findfont_cached.cache_clear()


def render(fig) -> list[str]:
    """Draw `fig` to PNG bytes; the glyphs matplotlib reported it could not find in any font."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def tick_texts(ax, axis: str) -> list[str]:
    return [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()]


def test_label_names_are_drawn_without_a_system_cjk_font(no_system_cjk_font, prepared_data):
    labels = json.loads((prepared_data / "labels.json").read_text(encoding="utf-8"))["labels"]
    cm = [[int(i == j) * 3 for j in range(len(labels))] for i in range(len(labels))]
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}):  # the control: the check can fail
        assert render(plots.confusion_figure(cm, labels, "control"))
    with matplotlib.rc_context(plots.style()):
        assert font_manager.findfont(plots.font_families()[0]) == str(pylopdf_fonts_zh_cn.sans_path())
        fig = plots.confusion_figure(cm, labels, "混淆矩阵")
        assert render(fig) == []
        ax = fig.axes[0]
        assert tick_texts(ax, "x") == labels and tick_texts(ax, "y") == labels
        per_class = {label: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for label in labels}
        fig = plots.per_class_figure(per_class, "每类")
        assert render(fig) == [] and tick_texts(fig.axes[0], "y") == [f"{label} (3)" for label in labels]


def test_long_label_names_wrap_and_rotate(no_system_cjk_font):
    labels = ["International trade and tariffs", "中华人民共和国国家金融监督管理总局", "股市"]
    with matplotlib.rc_context(plots.style()):
        fig = plots.confusion_figure([[1, 0, 0], [0, 1, 0], [0, 0, 1]], labels, "long names")
        assert render(fig) == []
    ticks = fig.axes[0].get_xticklabels()
    assert [t.get_text().replace("\n", "") for t in ticks] == labels
    assert all(plots.columns(line) <= plots.LABEL_COLUMNS for t in ticks for line in t.get_text().split("\n"))
    assert ticks[0].get_text() == "International \ntrade and \ntariffs" and ticks[0].get_rotation() == 45


def test_training_curves_from_a_runs_history(trained_run, tmp_path):
    history = json.loads((trained_run / "history.json").read_text(encoding="utf-8"))
    best = json.loads((trained_run / "train_info.json").read_text(encoding="utf-8"))["best_checkpoint"]
    written = plots.save_training_curves(history, tmp_path, best)
    assert written == [tmp_path / "curves_loss.png", tmp_path / "curves_metrics.png"]
    assert all(p.read_bytes().startswith(PNG) for p in written)
    evals = [e for e in history if "eval_macro_f1" in e and "step" in e]
    figs = plots.curves_figures(history, best)
    lines = {line.get_label(): line for line in figs["curves_metrics.png"].axes[0].get_lines()}
    f1_steps = list(lines["macro-F1"].get_xdata())
    assert f1_steps == sorted({e["step"] for e in evals}) and len(f1_steps) == 2  # evaluations at steps 2 and 4
    assert list(lines[f"best: {Path(best).name}"].get_xdata()) == [plots.checkpoint_step(best)] * 2
    chat = [{k: v for k, v in e.items() if k not in ("eval_macro_f1", "eval_accuracy")} for e in history]
    (tmp_path / "chat").mkdir()
    assert plots.save_training_curves(chat, tmp_path / "chat", best) == [tmp_path / "chat" / "curves_loss.png"]


def test_curves_leave_out_the_evaluation_after_training():
    """trainer.evaluate() of the reloaded best checkpoint is logged at the last step; it is not a point
    of the curve."""
    history = [{"loss": 2.0, "step": 1}, {"eval_loss": 1.5, "eval_macro_f1": 0.2, "step": 2},
               {"loss": 1.0, "step": 2}, {"eval_loss": 1.0, "eval_macro_f1": 0.5, "step": 4},
               {"train_loss": 1.5, "train_runtime": 9.0, "step": 4},
               {"eval_loss": 1.2, "eval_macro_f1": 0.4, "step": 4}]
    series = plots.history_series(history)
    assert series["eval_loss"] == [(2, 1.5), (4, 1.0)] and series["loss"] == [(1, 2.0), (2, 1.0)]
    assert plots.checkpoint_step("/runs/x/checkpoints/checkpoint-200") == 200 and plots.checkpoint_step(None) is None


# ----------------------------------------------------------------------------- a merged model
def test_report_for_a_merged_model(evaluated, prepared_data, tmp_path):
    """A merged model has no train_info.json: provenance from its manifest, the run from the adapter it names;
    an unreadable train_info.json is a line in the report, not a failure."""
    run, out, _ = evaluated
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    merged = tmp_path / "run-merged"
    merged.mkdir()
    (merged / "manifest.json").write_text(json.dumps({"source": "merge", "adapter": str(run), "method": "lora"}))
    report_dir = tmp_path / "eval"
    shutil.copytree(out, report_dir)
    names = write_report(report_dir, m, preds, merged, prepared_data / "test.jsonl")
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    assert names[-2:] == ["report.md", "report.html"] and "curves_loss.png" in names
    assert "| manifest: source | merge |" in md and f"| training run | {run} |" in md and "## Training curves" in md
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train_info.json").write_text("{not json")
    write_report(report_dir, m, preds, bare, prepared_data / "test.jsonl")
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "train_info.json could not be read" in md and "## Training curves" not in md
