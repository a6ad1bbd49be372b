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


def log_figures(run_id: str, figures: dict, files: list[Path] = (), prefix: str = "", artifact_dir: str | None = None):
    """The numbers of `figures` as metrics of the run (names prefixed) and `files` as its artifacts."""
    client = _mlflow().MlflowClient()
    metrics = numbers(figures, prefix)
    if metrics:
        from mlflow.entities import Metric
        import time
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_dir)


def run_id_of(run_dir: Path) -> str | None:
    """The MLflow run id a training run recorded (train_info.json's mlflow_run_id), or None."""
    try:
        return json.loads((Path(run_dir) / "train_info.json").read_text(encoding="utf-8")).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


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
