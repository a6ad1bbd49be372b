"""Run tracking in MLflow, when train.report_to names it: one MLflow run per training run, holding the
trainer's parameters and curves (transformers' MLflowCallback logs into the run this module starts),
the run's own figures (train_info.json, calibration.json), and later the evaluation's metrics and
report (evaluate_model.py), so the tracking server shows a run from data to report. The tracking
server is MLFLOW_TRACKING_URI (mlflow's own variable; unset: ./mlruns). train_info.json keeps the
MLflow run id, which evaluate_model.py logs into and compare_runs.py accepts as `mlflow:<run id>`.

Only the tracking client is a dependency (mlflow-skinny); the server (`mlflow server`) pins an older
gunicorn than the service, so it runs from its own environment (`make mlflow-server`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from pathlib import Path

from common.config import ConfigError

PREFIX = "mlflow:"


def enabled(report_to) -> bool:
    return "mlflow" in (report_to or [])


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("train.report_to names mlflow, which is not installed: pip install mlflow-skinny") from None
    return mlflow


@contextlib.contextmanager
def training_run(report_to, run_name: str, tags: dict | None = None):
    """An MLflow run around training (yields its id, or None when report_to does not name mlflow): the
    trainer's callback logs into it instead of starting and ending its own, so what comes after
    training lands in the same run. A failure ends it FAILED."""
    if not enabled(report_to):
        yield None
        return
    mlflow = _mlflow()
    run = mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
    try:
        yield run.info.run_id
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def numbers(figures: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) dict, as MLflow metric names: {"a": {"b": 1}} -> {"a.b": 1.0}."""
    out = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= numbers(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def log_figures(run_id: str, figures: dict, files: list[Path] = (), prefix: str = "", artifact_dir: str | None = None,
                tracking_uri: str | None = None):
    """The numbers of `figures` as metrics of the run (names prefixed) and `files` as its artifacts."""
    from mlflow.entities import Metric
    client, now = _mlflow().MlflowClient(tracking_uri), int(time.time() * 1000)
    metrics = {re.sub(r"[^\w.\- :/]", "_", k): v for k, v in numbers(figures, prefix).items()}
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in list(metrics.items())[start:start + 1000]])
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_dir)


RUN_FILES = ("train_info.json", "calibration.json", "config.resolved.yaml", "labels.json", "curves_loss.png",
             "curves_metrics.png")


def tracking_facts(run_id: str | None) -> dict:
    """What train_info.json keeps of the MLflow run: its id and server, so the evaluation logs into it."""
    return {"mlflow_run_id": run_id, "mlflow_tracking_uri": _mlflow().get_tracking_uri()} if run_id else {}


def log_training(run_id: str | None, run_dir: Path, figures: dict) -> None:
    """The run's own figures (final eval, calibration, speed, memory) and files, into its MLflow run."""
    if run_id:
        log_figures(run_id, {k: v for k, v in figures.items() if k not in ("provenance", "health")},
                    [Path(run_dir) / name for name in RUN_FILES])


def tracked_run(run_dir: Path | None) -> tuple[str | None, str | None]:
    """(MLflow run id, tracking server) a training run recorded in train_info.json, or (None, None); the
    server is MLFLOW_TRACKING_URI when set (the same server under another address), else the recorded one."""
    try:
        info = json.loads((Path(run_dir) / "train_info.json").read_text(encoding="utf-8")) if run_dir else {}
    except (OSError, ValueError):
        return None, None
    run_id = info.get("mlflow_run_id")
    return (run_id, os.environ.get("MLFLOW_TRACKING_URI") or info.get("mlflow_tracking_uri")) if run_id else (None, None)


def fetch_artifacts(run_id: str, artifact_dir: str, dest: Path) -> Path:
    """Download an artifact folder of a run (e.g. eval-test) into dest; a one-sentence error when the run
    or the folder is not there."""
    mlflow = _mlflow()
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_dir,
                                                        dst_path=str(dest)))
    except Exception as e:  # the server's error types vary by store; the sentence says which run and folder
        raise ConfigError(f"MLflow run {run_id} has no artifacts '{artifact_dir}' at "
                          f"{mlflow.get_tracking_uri()} ({type(e).__name__}); evaluate that run first") from None
