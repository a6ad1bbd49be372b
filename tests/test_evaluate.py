"""evaluate_model.py and the metrics it shares with training."""
import json
import shutil

import pytest
from conftest import run_script

from common.evaluation.classification_metrics import classification_metrics
from common.evaluation.report import add_baselines, baselines


def test_metrics_against_a_hand_computed_confusion_matrix():
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = classification_metrics(truth, pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2 R 2/3 F1 .8; b: P 1/2 R 1/2 F1 .5; c: P 1/2 R 1/1 F1 2/3
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3 * 1) / 6)


def test_invalid_predictions_count_as_wrong():
    m = classification_metrics(["a", "b"], [None, "b"], ["a", "b"])
    assert m["accuracy"] == 0.5 and m["per_class"]["a"]["recall"] == 0.0


def test_evaluate_cli_writes_metrics_png_and_predictions(trained_run, prepared_data, tmp_path):
    out = tmp_path / "eval"
    proc = run_script("evaluate_model.py", "--model", str(trained_run), "--set", f"data.processed_dir={prepared_data}",
                      "--output-dir", str(out), "--generate", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    labels = json.loads((prepared_data / "labels.json").read_text())["labels"]
    assert len(preds) == m["items"] == len((prepared_data / "test.jsonl").read_text().splitlines())
    assert all(p["predicted"] in labels and 0 < p["probability"] <= 1 for p in preds)  # always a valid label
    again = classification_metrics([p["label"] for p in preds], [p["predicted"] for p in preds], labels)
    assert again["macro_f1"] == pytest.approx(m["macro_f1"]) and again["confusion_matrix"] == m["confusion_matrix"]
    assert 0 <= m["generation"]["invalid_rate"] <= 1
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro_f1" in proc.stdout and "items/s" in proc.stdout
    # issue 13: the no-skill baselines beside the score, and the degenerate flag, printed and in metrics.json
    expected, major = baselines([p["label"] for p in preds], labels), m["baselines"]["majority"]
    assert major["label"] == expected["majority"]["label"] and f"always {major['label']}" in proc.stdout
    for kind in ("majority", "uniform"):
        for key in ("accuracy", "macro_f1"):
            assert m["baselines"][kind][key] == pytest.approx(expected[kind][key])
    one_class = len({p["predicted"] for p in preds}) == 1
    assert m["degenerate"] == (one_class or m["macro_f1"] <= major["macro_f1"])
    assert ("warning: degenerate predictions" in proc.stdout) == m["degenerate"]
    assert f"report: {out / 'report.html'}" in proc.stdout and (out / "report.md").is_file()
    # issue 23: the probabilities are the run's calibrated ones; ECE before (T = 1) and after, recomputable
    c, t = m["calibration"], json.loads((trained_run / "calibration.json").read_text())["temperature"]
    assert c["temperature"] == t and c["fitted_on"].startswith("val split") and c["items"] == m["items"]
    assert c["ece_after"] == pytest.approx(ece_of(preds), abs=2e-3)  # predictions.jsonl holds the calibrated ones
    assert f"calibration: T={t:.2f}" in proc.stdout and (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    raw = tmp_path / "raw"  # the same run without its calibration.json: the raw probabilities, the same labels
    shutil.copytree(trained_run, raw, ignore=shutil.ignore_patterns("checkpoints", "calibration.json"))
    base = run_script("evaluate_model.py", "--model", str(raw), "--set", f"data.processed_dir={prepared_data}",
                      "--output-dir", str(tmp_path / "again"), "--baseline", str(out / "metrics.json"))
    assert base.returncode == 0 and "vs baseline" in base.stdout and "no calibration.json" in base.stdout
    r = json.loads((tmp_path / "again" / "metrics.json").read_text())["calibration"]
    assert r["temperature"] == 1.0 and r["fitted_on"] is None and r["ece_after"] == r["ece_before"] == c["ece_before"]
    raw_preds = [json.loads(line) for line in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert [p["predicted"] for p in raw_preds] == [p["predicted"] for p in preds]  # T never changes the label
    assert r["ece_before"] == pytest.approx(ece_of(raw_preds), abs=2e-3)


def ece_of(preds: list[dict], bins: int = 10) -> float:
    """ECE from predictions.jsonl alone (the best label's probability, and whether it was right), by hand."""
    total = 0.0
    for i in range(bins):
        inside = [p for p in preds if i / bins < p["probability"] <= (i + 1) / bins]
        if inside:
            accuracy = sum(p["predicted"] == p["label"] for p in inside) / len(inside)
            total += len(inside) / len(preds) * abs(accuracy - sum(p["probability"] for p in inside) / len(inside))
    return total


def test_evaluate_without_a_run_says_what_to_do(prepared_data, tmp_path):
    proc = run_script("evaluate_model.py", "--set", f"data.processed_dir={prepared_data}",
                      "--set", f"train.runs_dir={tmp_path}")
    assert proc.returncode == 1 and "python train_qwen.py" in proc.stderr and "Traceback" not in proc.stderr


def test_baselines_against_hand_computed_values():
    base = baselines(["a", "a", "a", "b"], ["a", "b", "c"])
    # always a: a P .75 R 1 F1 6/7, b F1 0; c is absent from the data, so not in the macro average
    assert base["majority"] == pytest.approx({"label": "a", "accuracy": 0.75, "macro_f1": 3 / 7})
    # a uniform guess over 3 labels: recall 1/3, precision = the share (.75, .25); F1 = 2PR / (P + R)
    f1 = [2 * p / 3 / (p + 1 / 3) for p in (0.75, 0.25)]
    assert base["uniform"] == pytest.approx({"accuracy": 1 / 3, "macro_f1": sum(f1) / 2})


@pytest.mark.parametrize("predicted, reasons", [
    (["a", "a", "a", "a"], ["every prediction is a", "not above the majority-class baseline"]),
    (["b", "b", "b", "b"], ["every prediction is b", "not above the majority-class baseline"]),
    (["a", "a", "b", "a"], ["not above the majority-class baseline"]),  # two classes, still no skill
    (["a", "a", "a", "b"], []),
])
def test_degenerate_predictions_are_flagged(predicted, reasons):
    truth, labels = ["a", "a", "a", "b"], ["a", "b"]
    m = add_baselines(classification_metrics(truth, predicted, labels), truth, predicted)
    assert m["degenerate"] == bool(reasons) and len(m["degenerate_reasons"]) == len(reasons)
    assert all(want in got for want, got in zip(reasons, m["degenerate_reasons"]))


@pytest.mark.parametrize("predicted", [["a"] * 4, ["b"] * 4, ["a", "a", "b", "a"], ["a", "a", "a", "b"],
                                       ["b", "a", "a", "a"]])
def test_the_report_and_training_health_agree_on_a_degenerate_run(predicted):
    """One rule: the evaluation report flags a run degenerate exactly when training health does, same words."""
    from common.evaluation.training_health import prediction_findings
    truth, labels = ["a", "a", "a", "b"], ["a", "b"]
    m = add_baselines(classification_metrics(truth, predicted, labels), truth, predicted)
    health = [f for f in prediction_findings(truth, predicted, labels, m["macro_f1"], step=1)
              if f.kind in ("one_class", "at_baseline")]
    assert m["degenerate"] == bool(health)
    assert m["degenerate_reasons"] == [f.finding for f in health]
