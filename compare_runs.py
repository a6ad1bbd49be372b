"""Is the new model better? Two models' evaluations on the same test items, compared item by item.

    python compare_runs.py models/cmp-100 models/cmp-300                     # A = reference, B = candidate
    python compare_runs.py models/cmp-100 models/cmp-300 --evaluate-missing  # first runs evaluate_model.py where needed
    python compare_runs.py runs/a/eval-test runs/b/eval-test --output-dir reports/a-vs-b
    MLFLOW_TRACKING_URI=http://mlflow:5000 python compare_runs.py mlflow:<run id A> mlflow:<run id B>

A RUN is a training run (an adapter), a merged model, an evaluation folder itself, or mlflow:<run id> (a
run tracked with train.report_to: [mlflow], whose evaluation was logged there); its evaluation is
<RUN>/eval-<split>/ (predictions.jsonl and metrics.json, as evaluate_model.py writes them). Both must be on
the same items with the same labels. Prints macro-F1 and accuracy of A and B with the difference's 95%
paired-bootstrap interval, per-class F1 deltas, McNemar's exact test and one verdict, and writes
compare.json, report.md and report.html to <B>/compare-<A>/ (the rule: docs/compare.md).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import add_force, run_stage
from common.config import ConfigError
from common.evaluation.comparison import (CONFIDENCE, RESAMPLES, SEED, compare_predictions, first_difference,
                                          items_digest, p_text)
from common.terminal import ljust_cols

ROOT = Path(__file__).resolve().parent
MLFLOW = "mlflow:"  # RUN_A / RUN_B as mlflow:<run id>: that run's evaluation, from MLFLOW_TRACKING_URI


@dataclass
class RunEvaluation:
    """One side of a comparison: a display name, the evaluation folder, its predictions and metrics."""
    name: str
    run_dir: Path   # the model (or the evaluation folder when one was given): the default output lives under B's
    eval_dir: Path
    rows: list[dict]
    metrics: dict


# ----------------------------------------------------------------------------- the inputs
def evaluation_dir(spec: str, split: str, evaluate=None) -> tuple[str, Path, Path]:
    """(name, run directory, evaluation folder) a RUN argument names; `evaluate(run_dir)` makes a missing
    evaluation, None says which command makes it. The one place a new form (mlflow:<run_id>) is added."""
    if spec.startswith(MLFLOW):  # an MLflow run's evaluation, fetched into a temporary folder; the default
        import tempfile  # output of a comparison with it as B is models/mlflow-<run id>/compare-<A>/
        from common.evaluation.tracking import fetch_artifacts
        run_id = spec.removeprefix(MLFLOW)
        fetched = fetch_artifacts(run_id, f"eval-{split}", Path(tempfile.mkdtemp(prefix=f"mlflow-{run_id[:8]}-")))
        return f"mlflow-{run_id[:8]}", ROOT / "models" / f"mlflow-{run_id}", fetched
    path = Path(spec)
    if (path / "predictions.jsonl").is_file():  # an evaluation folder: named by its run when it is eval-<split>
        name = path.resolve().parent.name if path.name.startswith("eval-") else path.name
        return name, path, path
    if not path.is_dir():
        raise ConfigError(f"{spec} is not a run, a merged model or an evaluation folder")
    target = path / f"eval-{split}"
    if not (target / "predictions.jsonl").is_file():
        if evaluate is None:
            raise ConfigError(f"{path} has no evaluation on the {split} split: run python evaluate_model.py "
                              f"--model {path} --split {split} (or pass --evaluate-missing)")
        evaluate(path)
    return path.resolve().name, path, target


def read_predictions(path: Path) -> list[dict]:
    """predictions.jsonl's rows; a broken line is an error that names it."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not valid JSON ({e.msg}); evaluate the model again") from None
        if row is not None and not (isinstance(row, dict) and {"text", "label", "predicted"} <= row.keys()):
            raise ConfigError(f"{path} line {n} lacks text, label or predicted; evaluate the model again")
        rows += [row] if row is not None else []
    return rows


def load_side(spec: str, split: str, evaluate=None) -> RunEvaluation:
    name, run_dir, eval_dir = evaluation_dir(spec, split, evaluate)
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{eval_dir} has predictions.jsonl but no metrics.json; evaluate the model again")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return RunEvaluation(name, run_dir, eval_dir, read_predictions(eval_dir / "predictions.jsonl"), metrics)


def evaluator(args):
    """evaluate_model.py as a subprocess (a stage never imports another), with this command's config flags."""
    def evaluate(run_dir: Path) -> None:
        cmd = [sys.executable, str(ROOT / "evaluate_model.py"), "--model", str(run_dir), "--split", args.split]
        for flag, value in [("--config", args.config), ("--profile", args.profile), *(("--set", s) for s in args.set)]:
            cmd += [flag, value] if value else []
        print(f"evaluating {run_dir}: {' '.join(cmd[1:])}", flush=True)
        code = subprocess.run(cmd).returncode  # from the same folder as this command, so relative paths agree
        if code != 0:
            raise ConfigError(f"evaluate_model.py failed for {run_dir} (exit {code}); its message is above")
    return evaluate


def check_comparable(a: RunEvaluation, b: RunEvaluation) -> list[str]:
    """The shared label list; refuses evaluations that are not on the same items or not on the same labels."""
    if set(a.metrics["labels"]) != set(b.metrics["labels"]):
        raise ConfigError(f"A and B were evaluated on different label sets ({', '.join(a.metrics['labels'])} vs "
                          f"{', '.join(b.metrics['labels'])}); compare models of the same task")
    why = first_difference(a.rows, b.rows)
    if why:
        raise ConfigError(f"{a.eval_dir} and {b.eval_dir} are not on the same items ({why}): evaluate both on "
                          f"the same data split (python evaluate_model.py --model RUN)")
    return list(a.metrics["labels"])


# ----------------------------------------------------------------------------- the report
def disagreements(a: RunEvaluation, b: RunEvaluation) -> list[tuple]:
    """The items exactly one model gets right: (#, who is right, gold, A, B, text)."""
    from common.evaluation.report import TEXT_SHOWN
    rows = []
    for i, (ra, rb) in enumerate(zip(a.rows, b.rows), 1):
        right_a, right_b = ra["predicted"] == ra["label"], rb["predicted"] == rb["label"]
        if right_a != right_b:
            text = ra["text"] if len(ra["text"]) <= TEXT_SHOWN else ra["text"][:TEXT_SHOWN] + "…"
            rows.append((str(i), "A" if right_a else "B", ra["label"], ra["predicted"], rb["predicted"], text))
    return rows


def _diff_row(name: str, d: dict) -> tuple:
    return (name, f"{d['a']:.4f}", f"{d['b']:.4f}", f"{d['delta']:+.4f}", f"[{d['low']:+.4f}, {d['high']:+.4f}]")


def report_blocks(c: dict, a: RunEvaluation, b: RunEvaluation) -> list:
    """The comparison in report.py's block format (rendered by its to_markdown / to_html)."""
    from common.evaluation.report import MISTAKES_SHOWN
    m, pct = c["mcnemar"], f"{100 * c['confidence']:.0f}%"
    wrong_one = disagreements(a, b)
    blocks = [("h1", f"{b.name} vs {a.name} on {c['split']}"), ("p", c["verdict"]),
              ("p", f"A (reference) = {a.eval_dir}; B (candidate) = {b.eval_dir}. {c['items']} items "
                    f"(sha256 {c['items_sha256'][:16]}…), {c['resamples']} paired bootstrap resamples (seed "
                    f"{c['seed']}). Significant = the macro-F1 interval excludes 0 and McNemar's p < {c['alpha']}."),
              ("table", ["", "A", "B", "B − A", f"{pct} interval"],
               [_diff_row("macro-F1", c["macro_f1"]), _diff_row("accuracy", c["accuracy"])]),
              ("h2", "Per class"),
              ("table", ["label", "support", "F1 A", "F1 B", "B − A", f"{pct} interval"],
               [(label, str(d["support"]), *_diff_row(label, d)[1:]) for label, d in c["per_class"].items()]),
              ("h2", "Right and wrong"),
              ("table", ["", "B right", "B wrong"], [("A right", str(m["both_right"]), str(m["only_a"])),
                                                     ("A wrong", str(m["only_b"]), str(m["both_wrong"]))]),
              ("p", f"McNemar's exact test on the {m['only_a'] + m['only_b']} items exactly one model gets right: "
                    f"{p_text(m['p'])}."),
              ("h2", "Items they disagree on")]
    if not wrong_one:
        return blocks + [("p", "None: the two models are right and wrong on the same items.")]
    return blocks + [("p", f"The first {min(len(wrong_one), MISTAKES_SHOWN)} of {len(wrong_one)} items exactly "
                           f"one model gets right, in test order."),
                     ("table", ["#", "right", "gold", "A", "B", "text"], wrong_one[:MISTAKES_SHOWN])]


def output_dir(a: RunEvaluation, b: RunEvaluation, given: str | None, force: bool) -> Path:
    """<B>/compare-<A>/ by default (written again on each run, like eval-<split>/); a folder the user
    named is not written into when it holds files, unless --force."""
    if given is None:
        return b.run_dir / f"compare-{a.name}"
    out = Path(given)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to write into it, or name another --output-dir")
    return out


# ----------------------------------------------------------------------------- the stage
def describe(side: RunEvaluation) -> dict:
    return {"name": side.name, "evaluation": str(side.eval_dir), "model": side.metrics.get("model")}


def run(cfg, run_a: str, run_b: str, output: str | None = None, force: bool = False, split: str | None = None,
        resamples: int = RESAMPLES, seed: int = SEED, evaluate=None) -> dict:
    """Compare B against A on evaluate.split (or `split`); returns compare.json's content plus what was written."""
    split = split or cfg.evaluate.split
    a, b = load_side(run_a, split, evaluate), load_side(run_b, split, evaluate)
    labels = check_comparable(a, b)
    out = output_dir(a, b, output, force)
    start = time.time()
    truth = [r["label"] for r in a.rows]
    result = compare_predictions(truth, [r["predicted"] for r in a.rows], [r["predicted"] for r in b.rows],
                                 labels, resamples, seed, CONFIDENCE)
    c = {"a": describe(a), "b": describe(b), "split": split, "labels": labels, "items_sha256": items_digest(a.rows),
         **result, "seconds": round(time.time() - start, 2)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(c, indent=2, ensure_ascii=False), encoding="utf-8")
    # report.py pulls in torch (through calibration): imported here, so --help and a refusal answer at once
    from common.evaluation.report import to_html, to_markdown
    blocks = report_blocks(c, a, b)
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, out), encoding="utf-8")
    return c | {"output_dir": str(out), "written": ["compare.json", "report.md", "report.html"]}


def print_report(c: dict) -> None:
    pct = f"{100 * c['confidence']:.0f}%"
    print(f"\nA = {c['a']['name']} ({c['a']['evaluation']})\nB = {c['b']['name']} ({c['b']['evaluation']})")
    print(f"{c['items']} items of {c['split']}, {c['resamples']} paired bootstrap resamples (seed {c['seed']})\n")
    print(f"{'':<14} {'A':>7} {'B':>7} {'B−A':>8}  {pct} interval")
    rows = [("macro-F1", c["macro_f1"]), ("accuracy", c["accuracy"]),
            *((f"F1 {label}", d) for label, d in c["per_class"].items())]
    for name, d in rows:
        print(f"{ljust_cols(name, 14)} {d['a']:>7.4f} {d['b']:>7.4f} {d['delta']:>+8.4f}  "
              f"[{d['low']:+.4f}, {d['high']:+.4f}]")
    m = c["mcnemar"]
    print(f"\nright/wrong: both right {m['both_right']}, only A {m['only_a']}, only B {m['only_b']}, "
          f"both wrong {m['both_wrong']}")
    print(c["verdict"])
    print(f"\ncompared in {c['seconds']:.1f}s; wrote {c['output_dir']}/ ({', '.join(c['written'])})")


def add_args(parser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="the reference: a run, a merged model or an evaluation folder")
    parser.add_argument("run_b", metavar="RUN_B", help="the candidate, evaluated on the same items")
    parser.add_argument("--output-dir", help="where to write (default: <RUN_B>/compare-<RUN_A name>/)")
    parser.add_argument("--split", help="the evaluated split (default: evaluate.split in config.yaml)")
    parser.add_argument("--evaluate-missing", action="store_true",
                        help="run evaluate_model.py for a run that has no evaluation on the split")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help=f"bootstrap resamples (default {RESAMPLES})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"the bootstrap's seed (default {SEED})")
    add_force(parser, "--output-dir that holds files")


def cli_run(cfg, args) -> dict:
    if args.resamples < 1:
        raise ConfigError("--resamples must be at least 1")
    args.split = args.split or cfg.evaluate.split
    return run(cfg, args.run_a, args.run_b, args.output_dir, args.force, args.split, args.resamples, args.seed,
               evaluator(args) if args.evaluate_missing else None)


def main(argv=None) -> int:
    return run_stage("compare_runs", __doc__, cli_run, add_args=add_args, report=print_report, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
