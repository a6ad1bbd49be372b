"""Temperature scaling and its figures (common/evaluation/calibration.py) on scores whose truth is known:
labels drawn from softmax(z), scores 3z (overconfident by a factor 3), so the right temperature is ~3."""
import torch

from common.evaluation.calibration import (coverage_curve, ece, fit_temperature, fit_within_range, nll, probabilities,
                                           reliability, summary_line, temperature_of, threshold_for, write_calibration)


def overconfident(n=3000, k=4, factor=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    z[torch.arange(n), torch.randint(0, k, (n,), generator=g)] += 1.5
    truth = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1).tolist()
    return z * factor, truth


def test_the_fitted_temperature_undoes_the_overconfidence_and_lowers_ece():
    scores, truth = overconfident()
    t = fit_temperature(scores, truth)
    assert 2.6 < t < 3.4, t
    assert nll(scores, truth, t) < nll(scores, truth, 1.0)
    before, after = ece(probabilities(scores), truth), ece(probabilities(scores, t), truth)
    assert after < before / 3 and after < 0.05, (before, after)
    # the best label never changes, only its probability
    assert torch.equal(probabilities(scores).argmax(-1), probabilities(scores, t).argmax(-1))


def test_reliability_bins_hold_every_item_once():
    scores, truth = overconfident(n=500)
    rows = reliability(probabilities(scores), truth, bins=10)
    assert sum(r["items"] for r in rows) == 500 and len(rows) == 10
    assert all(r["confidence"] is None or r["low"] <= r["confidence"] <= r["high"] for r in rows)


def test_coverage_falls_and_accuracy_rises_with_the_threshold():
    scores, truth = overconfident()
    curve = coverage_curve(probabilities(scores, fit_temperature(scores, truth)), truth)
    covered = [r["coverage"] for r in curve]
    assert covered == sorted(covered, reverse=True) and covered[0] > covered[-1]
    acc = [r["accuracy"] for r in curve if r["accuracy"] is not None]
    assert acc[-1] > acc[0]
    pick = threshold_for(curve, 0.9)
    assert pick is not None and pick["accuracy"] >= 0.9
    assert all(r["threshold"] >= pick["threshold"] for r in curve if r["accuracy"] and r["accuracy"] >= 0.9)
    assert threshold_for(curve, 1.01) is None


def test_the_run_file_round_trips_and_a_broken_one_means_raw_scores(tmp_path):
    assert temperature_of(tmp_path) == 1.0
    write_calibration(tmp_path, 2.5, split="val", items=40)
    assert temperature_of(None, tmp_path) == 2.5
    (tmp_path / "calibration.json").write_text("{broken")
    assert temperature_of(tmp_path) == 1.0


def test_a_fit_that_runs_to_a_bound_keeps_the_raw_scores():
    """Every item right: the NLL falls all the way to T -> 0, so no temperature is fitted (T stays 1, noted)."""
    scores, truth = overconfident(n=200)
    perfect = scores.argmax(-1).tolist()
    kept = fit_within_range(scores, perfect)
    assert kept["temperature"] == 1.0 and kept["fitted"] <= 0.06 and "right on every item" in kept["note"]
    assert kept["ece_after"] == kept["ece_before"] and "T is kept at 1" in summary_line(kept)
    fitted = fit_within_range(scores, truth)
    assert 2.6 < fitted["temperature"] < 3.4 and "note" not in fitted
    assert summary_line(fitted) == (f"calibration: T={fitted['temperature']:.2f} on 200 val items, "
                                    f"ECE {fitted['ece_before']:.3f} -> {fitted['ece_after']:.3f}")
