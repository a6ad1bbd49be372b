"""compare_runs.py and its statistics (common/evaluation/comparison.py): answers known by hand, then the
real stage on evaluations the real evaluate_model.py wrote."""
import json
import shutil

import pytest
from conftest import run_script

from common.evaluation.classification_metrics import classification_metrics
from common.evaluation.comparison import (compare_predictions, first_difference, items_digest, mcnemar_exact,
                                          paired_bootstrap, p_text)

LABELS = ["x", "y", "z"]


def flip(label: str) -> str:
    return LABELS[(LABELS.index(label) + 1) % len(LABELS)]


def predictions(truth: list[str], wrong: set[int]) -> list[str]:
    return [flip(t) if i in wrong else t for i, t in enumerate(truth)]


TRUTH = [LABELS[i % 3] for i in range(300)]


@pytest.mark.parametrize("b, c, p", [(10, 2, 0.03857421875), (2, 10, 0.03857421875), (0, 0, 1.0), (5, 5, 1.0),
                                     (1, 0, 1.0), (6, 0, 2 / 64), (3, 1, 0.625)])
def test_mcnemar_exact_p_by_hand(b, c, p):
    """b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096 = 0.0386."""
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_mcnemar_stays_exact_for_many_discordant_items():
    assert mcnemar_exact(2000, 2000) == 1.0
    assert 0 < mcnemar_exact(900, 1100) < 1e-4  # 2^2000 in exact fractions, no overflow to 0 or nan


def test_identical_predictions_are_no_difference():
    pred = predictions(TRUTH, set(range(0, 300, 4)))
    c = compare_predictions(TRUTH, pred, list(pred), LABELS, resamples=200)
    for key in ("macro_f1", "accuracy"):
        assert c[key]["delta"] == 0 and c[key]["low"] == 0 and c[key]["high"] == 0
    assert all(d["delta"] == 0 for d in c["per_class"].values())
    assert c["mcnemar"]["p"] == 1.0 and c["mcnemar"]["only_a"] == c["mcnemar"]["only_b"] == 0
    assert not c["significant"] and c["verdict"].startswith("no significant difference: macro-F1 +0.000")


def test_a_clearly_better_b_is_called_better_and_the_other_way_round():
    a = predictions(TRUTH, set(range(0, 300, 3)) | set(range(1, 300, 6)))   # 150 wrong
    b = predictions(TRUTH, set(range(0, 300, 30)))                            # 10 wrong, all also wrong in A
    c = compare_predictions(TRUTH, a, b, LABELS, resamples=300)
    assert c["mcnemar"]["only_a"] == 0 and c["mcnemar"]["only_b"] == 140 and c["mcnemar"]["both_wrong"] == 10
    assert c["accuracy"]["delta"] == pytest.approx(140 / 300)
    assert c["significant"] and c["verdict"].startswith("B is better: macro-F1 +") and "p < 0.0001" in c["verdict"]
    assert compare_predictions(TRUTH, b, a, LABELS, resamples=300)["verdict"].startswith("A is better: macro-F1 -")


def test_a_small_difference_is_not_significant():
    a = predictions(TRUTH, set(range(0, 300, 5)))           # 60 wrong
    b = predictions(TRUTH, set(range(0, 300, 5)) - {0, 5})  # 58 wrong: two more right, none fewer
    c = compare_predictions(TRUTH, a, b, LABELS, resamples=300)
    assert c["macro_f1"]["delta"] > 0 and c["mcnemar"]["p"] == 0.5  # b=0, c=2: 2 * 1/4
    assert not c["significant"] and c["verdict"].startswith("no significant difference")


def test_a_macro_f1_gain_with_more_items_wrong_is_mixed():
    """B finds the rare class (macro-F1 up) at the price of 100 frequent items (accuracy down): no winner."""
    truth = ["x"] * 950 + ["y"] * 50
    a = ["x"] * 1000
    b = ["y"] * 100 + ["x"] * 850 + ["y"] * 50
    c = compare_predictions(truth, a, b, ["x", "y"], resamples=300)
    assert c["macro_f1"]["low"] > 0 and c["accuracy"]["high"] < 0 and c["mcnemar"]["p"] < 0.05
    assert not c["significant"] and c["verdict"].startswith("mixed: ") and "A gets more items right" in c["verdict"]


def test_the_bootstrap_interval_holds_the_estimate_and_repeats_with_its_seed():
    a = predictions(TRUTH, set(range(0, 300, 4)))
    b = predictions(TRUTH, set(range(0, 300, 5)) | {1, 2})
    first = compare_predictions(TRUTH, a, b, LABELS, resamples=400, seed=7)
    for d in (first["macro_f1"], first["accuracy"], *first["per_class"].values()):
        assert d["low"] <= d["delta"] <= d["high"] and d["low"] < d["high"]
    assert compare_predictions(TRUTH, a, b, LABELS, resamples=400, seed=7) == first
    assert compare_predictions(TRUTH, a, b, LABELS, resamples=400, seed=8)["macro_f1"] != first["macro_f1"]


def test_the_bootstrap_uses_the_toolkits_macro_f1_on_the_same_indices():
    """One resample is B's minus A's classification_metrics on the items the seed draws, for both."""
    import numpy as np
    a, b = predictions(TRUTH, {0, 1, 2, 9}), predictions(TRUTH, {3, 4})
    deltas = paired_bootstrap(TRUTH, a, b, LABELS, resamples=1, seed=3)
    idx = np.random.default_rng(3).integers(0, len(TRUTH), size=len(TRUTH))
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    expected = (classification_metrics(pick(TRUTH), pick(b), LABELS)["macro_f1"]
                - classification_metrics(pick(TRUTH), pick(a), LABELS)["macro_f1"])
    assert deltas[0, 0] == pytest.approx(expected)


def test_items_are_the_same_only_when_texts_and_labels_match_in_order():
    rows = [{"text": "甲", "label": "x"}, {"text": "乙", "label": "y"}]
    assert first_difference(rows, [dict(r, predicted="z") for r in rows]) is None
    assert items_digest(rows) == items_digest([dict(r, predicted="z") for r in rows])
    assert "item 2 differs" in first_difference(rows, [rows[0], {"text": "乙", "label": "x"}])
    assert "A has 2 items and B 1" == first_difference(rows, rows[:1])
    assert items_digest(rows) != items_digest(rows[::-1])


def test_p_values_read_as_people_write_them():
    assert [p_text(p) for p in (1.0, 0.41, 0.0386, 0.0031, 0.0004, 1e-7)] == \
        ["p = 1", "p = 0.41", "p = 0.039", "p = 0.0031", "p = 0.0004", "p < 0.0001"]


# ----------------------------------------------------------------------------- the stage, end to end
@pytest.fixture(scope="module")
def evaluated(trained_run, prepared_data, tmp_path_factory):
    """The tiny run's evaluation on the test split, by the real evaluate_model.py."""
    out = tmp_path_factory.mktemp("compare") / "first"
    proc = run_script("evaluate_model.py", "--model", str(trained_run), "--set", f"data.processed_dir={prepared_data}",
                      "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def linked_copy(run, target):
    """The run again under another name, its files linked (the adapter is not copied; the fixture's run stays as is)."""
    target.mkdir()
    for f in run.iterdir():
        if not f.name.startswith(("eval-", "compare-")):
            (target / f.name).symlink_to(f)
    return target


def test_the_same_model_twice_is_no_significant_difference(evaluated, trained_run, prepared_data, tmp_path):
    again = linked_copy(trained_run, tmp_path / "again")
    flags = ["--set", f"data.processed_dir={prepared_data}"]
    missing = run_script("compare_runs.py", str(evaluated), str(again), *flags)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"has no evaluation on the test split: run python evaluate_model.py --model {again}" in missing.stderr

    proc = run_script("compare_runs.py", str(evaluated), str(again), *flags, "--evaluate-missing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "eval-test" / "predictions.jsonl").is_file()  # evaluate_model.py ran for B
    out = again / "compare-first"  # the default: <B>/compare-<A name>/
    c = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    items = len((prepared_data / "test.jsonl").read_text(encoding="utf-8").splitlines())
    assert c["items"] == items and c["resamples"] == 2000 and c["split"] == "test"
    assert c["macro_f1"]["delta"] == 0 and c["mcnemar"]["p"] == 1.0 and not c["significant"]
    assert c["verdict"].startswith("no significant difference") and c["verdict"] in proc.stdout
    assert c["a"]["name"] == "first" and c["b"]["name"] == "again"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert c["verdict"] in report and "## Per class" in report and "| A right |" in report
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "macro-F1" in proc.stdout and "right/wrong: both right" in proc.stdout


def test_evaluations_on_different_items_or_labels_are_refused(evaluated, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(evaluated, changed)
    rows = (changed / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    (changed / "predictions.jsonl").write_text("\n".join(rows[1:]) + "\n", encoding="utf-8")
    proc = run_script("compare_runs.py", str(evaluated), str(changed))
    assert proc.returncode == 1 and "not on the same items (A has" in proc.stderr and "Traceback" not in proc.stderr
    assert not (changed / "compare-first").exists()

    metrics = json.loads((evaluated / "metrics.json").read_text(encoding="utf-8"))
    metrics["labels"] = [*metrics["labels"], "另一类"]
    (changed / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    proc = run_script("compare_runs.py", str(evaluated), str(changed))
    assert proc.returncode == 1 and "different label sets" in proc.stderr


def test_a_given_output_folder_is_not_written_into_without_force(evaluated, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep", encoding="utf-8")
    flags = [str(evaluated), str(evaluated), "--output-dir", str(out), "--resamples", "50"]
    proc = run_script("compare_runs.py", *flags)
    assert proc.returncode == 1 and "pass --force" in proc.stderr and not (out / "compare.json").exists()
    proc = run_script("compare_runs.py", *flags, "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "compare.json").read_text(encoding="utf-8"))["resamples"] == 50
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep"


def test_help_shows_the_commands_and_a_wrong_path_is_one_sentence(tmp_path):
    proc = run_script("compare_runs.py", "--help")
    assert proc.returncode == 0 and "python compare_runs.py models/cmp-100 models/cmp-300" in proc.stdout
    assert "--evaluate-missing" in proc.stdout and "--force" in proc.stdout
    proc = run_script("compare_runs.py", str(tmp_path / "nothing"), str(tmp_path))
    assert proc.returncode == 1 and "is not a run, a merged model or an evaluation folder" in proc.stderr
    assert "Traceback" not in proc.stderr
