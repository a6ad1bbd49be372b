"""Training health, in plain words: what a run that learned nothing, or broke, looks like, found while it
trains, each finding with its likely cause and the fix.

A model can reach the end of its steps having learned nothing: every prediction one class, macro-F1 at
the majority-class baseline, the "best" checkpoint the first one. train_qwen.py runs this monitor as a
Trainer callback, logs each finding once as a WARN line, records them in train_info.json ("health"),
and says so in its last lines when the run ends degenerate (`--strict`: exit 1).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

from common.evaluation.classification_metrics import degenerate

FIXES = {"one_class": "check labels.json and a few prepared examples; try a lower learning rate or more steps",
         "at_baseline": "the model has learned nothing yet: see above"}
LEARNING = ("learning rate too high (or too low to move in these steps), too few steps, a class imbalance, "
            "or labels the prompt cannot tell apart")


@dataclass
class HealthFinding:
    kind: str      # one_class | skewed | at_baseline | nan_loss | collapsed | no_progress | exploding_grads
    finding: str
    cause: str
    fix: str
    step: int = 0
    level: str = "warn"

    def line(self) -> str:
        return f"step {self.step}: {self.finding}. Likely: {self.cause}. Fix: {self.fix}"


def prediction_findings(truth: list[str], predicted: list[str], labels: list[str], macro_f1: float,
                        step: int) -> list[HealthFinding]:
    """What the predictions on held-out items say about a classifier: the evaluation report's degenerate
    rule (one class, at the baseline), and predictions far from the labels' own shares."""
    found = [HealthFinding(kind, sentence, LEARNING, FIXES[kind], step)
             for kind, sentence in degenerate(truth, predicted, labels, macro_f1)]
    pred, true = Counter(predicted), Counter(truth)
    (top, count), n = pred.most_common(1)[0], len(predicted)
    if not any(f.kind == "one_class" for f in found) and sum(abs(pred[x] - true[x]) for x in labels) / (2 * n) > 0.5:
        found.insert(0, HealthFinding("skewed", f"{count / n:.0%} of the predictions are '{top}', far from the "
                                      "labels' own distribution", LEARNING, "balance the classes or train longer; "
                                      "compare the per-class recall in evaluate_model.py", step))
    return found


def loss_finding(losses: list[float], step: int, patience: int = 3) -> HealthFinding | None:
    """Validation loss that has not gone down over the last `patience` evaluations."""
    if len(losses) <= patience or min(losses[-patience:]) < min(losses[:-patience]) * 0.995:
        return None
    return HealthFinding("no_progress", f"the validation loss has not gone down over the last {patience} evaluations "
                                  f"(best {min(losses):.4f}, now {losses[-1]:.4f})",
                   "a learning rate too high (it bounces) or too low (it crawls), or a model that already "
                   "learned what the data holds", "lower train.learning_rate 3-10x, or stop earlier", step)


def grad_finding(norms: list[float], step: int) -> HealthFinding | None:
    """A gradient norm that is not finite, or 10x the median of the ones before it."""
    if not norms:
        return None
    last, earlier = norms[-1], sorted(norms[:-1])
    if math.isfinite(last) and (len(earlier) < 3 or last <= 10 * earlier[len(earlier) // 2]):
        return None
    return HealthFinding("exploding_grads", f"the gradient norm jumped to {last:.3g}", "a learning rate too high, or fp16 "
                   "overflow", "lower train.learning_rate; on a GPU without bf16 keep gradient clipping on", step)


def collapse_finding(norms: list[float], step: int, run: int = 3) -> HealthFinding | None:
    """A gradient norm of exactly 0 at `run` logged steps in a row after a non-zero one: the weights blew up
    into a state (saturated, or every output the same) where no gradient flows: the run is dead, whatever
    the loss still says. Seen with a learning rate 10^4-10^6 too high: loss ln(vocab), gradients 0."""
    if len(norms) <= run or any(norms[-run:]) or not any(norms[:-run]):
        return None
    return HealthFinding("collapsed", f"the gradient norm has been 0 for {run} logged steps after being "
                                f"{max(norms[:-run]):.3g}: the weights blew up and nothing is learning",
                   "a learning rate far too high", "lower train.learning_rate 10-100x and start again", step, "error")


def make_monitor():
    """The Trainer callback (built lazily: transformers is heavy to import for --help)."""
    from transformers import TrainerCallback

    class HealthMonitor(TrainerCallback):
        def __init__(self):
            self.findings: list[HealthFinding] = []  # every finding, in order
            self.latest: list[HealthFinding] = []    # from the latest evaluation: what the run ends with
            self.losses: list[float] = []
            self.norms: list[float] = []
            self.watched: set = set()           # early findings already logged
            self.step, self.kinds_before = -1, set()  # the latest evaluated step; the kinds found before it

        def note(self, found: list[HealthFinding], early: set[str] = frozenset()) -> None:
            """Log each new finding once: WARN, or INFO for the kinds in `early` (not yet worth a warning)."""
            import logging
            log, seen = logging.getLogger("train_qwen"), {(f.kind, f.finding) for f in self.findings}
            for f in found:
                if f.kind in early:
                    if (f.kind, f.finding, f.step) not in self.watched:
                        self.watched.add((f.kind, f.finding, f.step))
                        log.info("training health (early, watching): %s", f.line())
                    continue
                if (f.kind, f.finding) not in seen:
                    log.warning("training health: %s", f.line(), extra=asdict(f))
                self.findings.append(f)

        def on_log(self, args, state, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                control.should_training_stop = True  # nothing a NaN run does after this is worth the time
                self.note([HealthFinding("nan_loss", f"the training loss is {loss}", "fp16 overflow, or a learning rate "
                                   "so high the weights blew up", "lower train.learning_rate; use bf16 or fp32",
                                   state.global_step, "error")])
            if (logs or {}).get("grad_norm") is not None:
                self.norms.append(float(logs["grad_norm"]))
                self.note([f for f in [grad_finding(self.norms, state.global_step)] if f])
                dead = collapse_finding(self.norms, state.global_step)
                if dead and not any(f.kind == "collapsed" for f in self.findings):
                    control.should_training_stop = True  # no gradient flows: more steps change nothing
                    self.note([dead])

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and metrics.get("eval_loss") is not None:
                self.losses.append(float(metrics["eval_loss"]))
                self.note([f for f in [loss_finding(self.losses, state.global_step)] if f])

        def predictions(self, truth, predicted, labels, macro_f1, step) -> None:
            # A first evaluation that still predicts one class is normal early in a run; a finding is a
            # warning once it holds at two evaluations in a row (and the run's end reports the last one).
            # The run's final evaluation can re-score the step just evaluated: that is not a second look.
            if step != self.step:
                self.step, self.kinds_before = step, {f.kind for f in self.latest}
            self.latest = prediction_findings(truth, predicted, labels, macro_f1, step)
            self.note(self.latest, early={f.kind for f in self.latest if f.kind not in self.kinds_before})

        def ended_degenerate(self) -> list[HealthFinding]:
            """What the run ends with: the latest evaluation's findings, and a run that died (NaN, collapse)."""
            return self.latest + [f for f in self.findings if f.level == "error"]

    return HealthMonitor()
