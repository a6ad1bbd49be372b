"""Training health: a run that learns shows no warning; one that cannot, or that blows up, says so in plain
words (cause and fix), records it in train_info.json, and --strict turns it into exit 1."""
import csv
import json
import math
import random

import pytest
from conftest import run_script

from common.evaluation.training_health import collapse_finding, grad_finding, loss_finding, prediction_findings


def test_prediction_findings_by_their_definitions():
    truth = ["a"] * 6 + ["b"] * 4
    assert {f.kind for f in prediction_findings(truth, ["a"] * 10, ["a", "b"], 0.375, 7)} == {"one_class", "at_baseline"}
    good = prediction_findings(truth, truth, ["a", "b"], 1.0, 7)
    assert good == []
    three = ["a"] * 3 + ["b"] * 3 + ["c"] * 4
    skewed = prediction_findings(three, ["a"] * 9 + ["b"], ["a", "b", "c"], 0.3, 7)  # 90% 'a' where 30% are
    assert [f.kind for f in skewed][:1] == ["skewed"] and skewed[0].step == 7 and "90%" in skewed[0].finding


def test_loss_and_gradient_findings():
    assert loss_finding([1.0, 0.9, 0.8, 0.7], step=40) is None
    stuck = loss_finding([1.0, 0.7, 0.75, 0.72, 0.71], step=50)
    assert stuck.kind == "no_progress" and "0.7000" in stuck.finding
    assert grad_finding([1.0, 1.2, 0.9, 1.1], step=4) is None
    assert grad_finding([1.0, 1.2, 0.9, 50.0], step=4).kind == "exploding_grads"
    assert grad_finding([1.0, math.inf], step=2).kind == "exploding_grads"
    assert collapse_finding([10.4, 0.0, 0.0, 0.0], step=4).kind == "collapsed"
    assert collapse_finding([10.4, 0.0, 0.0], step=3) is None        # not yet three in a row
    assert collapse_finding([0.0, 0.0, 0.0, 0.0], step=4) is None    # never flowed (e.g. nothing trainable)
    assert collapse_finding([10.4, 0.0, 0.3, 0.0], step=4) is None


def keyword_data(path, signal: bool, n: int = 240):
    """Two labels told apart by one word (signal=True), or the same texts with labels drawn at random."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        text = f"第{i}条评论：房间{'干净整洁，服务热情' if good else '又脏又吵，服务冷淡'}。"
        label = ("正面" if good else "负面") if signal else rng.choice(["正面", "负面"])
        rows.append((text if signal else f"第{i}条评论：房间一般。", label))
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return path


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The same recipe on learnable and on unlearnable data (prepared and trained by the real CLIs)."""
    base = tmp_path_factory.mktemp("health")
    out = {}
    for name, signal in (("healthy", True), ("broken", False)):
        processed = base / name / "processed"
        prep = run_script("prepare_data.py", "--input", str(keyword_data(base / f"{name}.csv", signal)),
                          "--processed-dir", str(processed), "--model", str(tiny_model))
        assert prep.returncode == 0, prep.stderr
        out[name] = run_script("train_qwen.py", "--model", str(tiny_model), "--set", f"data.processed_dir={processed}",
                               "--runs-dir", str(base / "runs"), "--run-name", name, "--report-to", "[]",
                               "--max-steps", "40", "--eval-steps", "20", "--save-steps", "20", "--strict",
                               "--learning-rate", "2e-3")
        out[name].info = json.loads((base / "runs" / name / "train_info.json").read_text())
    return out


def test_a_run_that_learns_shows_no_warning(runs):
    healthy = runs["healthy"]
    assert healthy.returncode == 0, healthy.stdout[-2000:] + healthy.stderr[-2000:]
    assert healthy.info["ended_degenerate"] == [] and "WARNING" not in healthy.stdout
    assert healthy.info["final_eval"]["eval_macro_f1"] > 0.9


def test_a_run_that_cannot_learn_says_so_and_strict_fails_it(runs):
    broken = runs["broken"]
    assert broken.returncode == 1  # --strict
    kinds = {f["kind"] for f in broken.info["ended_degenerate"]}
    assert kinds & {"one_class", "at_baseline"}, broken.info["health"]
    assert "WARNING: this run ended degenerate" in broken.stdout and "Fix:" in broken.stdout
    assert "training health" in broken.stderr  # logged as it was found, not only at the end


def test_a_loss_that_blows_up_stops_the_run_at_once(tiny_model, runs, tmp_path):
    processed = tmp_path / "processed"
    assert run_script("prepare_data.py", "--input", str(keyword_data(tmp_path / "d.csv", True)), "--processed-dir",
                      str(processed), "--model", str(tiny_model)).returncode == 0
    proc = run_script("train_qwen.py", "--model", str(tiny_model), "--set", f"data.processed_dir={processed}",
                      "--runs-dir", str(tmp_path / "runs"), "--run-name", "nan", "--report-to", "[]", "--max-steps",
                      "30", "--eval-steps", "10", "--save-steps", "10", "--logging-steps", "1",
                      "--learning-rate", "1e6", "--warmup-ratio", "0")
    info = json.loads((tmp_path / "runs" / "nan" / "train_info.json").read_text())
    kinds = {f["kind"] for f in info["health"]}
    assert kinds & {"nan_loss", "exploding_grads", "collapsed"}, info["health"]
    if kinds & {"nan_loss", "collapsed"}:  # a dead run: stopped at once, not after 30 steps, and exits 1
        assert proc.returncode == 1 and info["global_step"] < 10, (proc.returncode, info["global_step"])


def test_a_finding_warns_only_at_a_second_evaluated_step():
    from common.evaluation.training_health import make_monitor
    monitor, truth, labels = make_monitor(), ["正面", "负面"] * 4, ["正面", "负面"]
    monitor.predictions(truth, ["正面"] * 8, labels, 1 / 3, step=20)
    monitor.predictions(truth, ["正面"] * 8, labels, 1 / 3, step=20)  # the run's end re-scoring step 20
    assert not monitor.findings and {f.kind for f in monitor.ended_degenerate()} == {"one_class", "at_baseline"}
    monitor.predictions(truth, ["正面"] * 8, labels, 1 / 3, step=40)
    assert {f.kind for f in monitor.findings} == {"one_class", "at_baseline"}
