"""train.report_to: [mlflow] against a real MLflow tracking server (`mlflow server`, SQLite store, started
here from the environment `make mlflow-server` builds): the training run's parameters, curves and
figures, then the evaluation's metrics and report, land in one MLflow run, and compare_runs.py takes
MLflow run ids."""
import json
import os
import subprocess
import time

import pytest
import requests
from conftest import ROOT, run_script, train_args
from serving import free_port

MLFLOW = ROOT / ".venv-mlflow" / "bin" / "mlflow"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """A real MLflow server on a free local port, its runs in SQLite and its artifacts in a folder."""
    assert MLFLOW.exists(), f"{MLFLOW} is missing: make mlflow-server (make test builds it)"
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(d / "server.txt", "w") as log:
        proc = subprocess.Popen([str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{d}/runs.sqlite",
                                 "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (d / "server.txt").read_text()[-3000:]
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the MLflow server did not answer /health within 180 s:\n" + (d / "server.txt").read_text()[-3000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked_run(tracking_uri, tiny_model, prepared_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = [a if a != "[]" else "[mlflow]" for a in train_args(tiny_model, prepared_data, runs, "tracked",
                                                              "--logging-steps", "1")]
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": "toolkit-tests"}
    proc = run_script("train_qwen.py", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = run_script("evaluate_model.py", "--model", str(runs / "tracked"), "--set",
                    f"data.processed_dir={prepared_data}", env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert ev.returncode == 0, ev.stderr[-3000:]
    return runs / "tracked", ev.stdout


def client(uri):
    import mlflow
    return mlflow.MlflowClient(tracking_uri=uri)


def test_training_lands_in_one_mlflow_run(tracking_uri, tracked_run):
    run_dir, _ = tracked_run
    info = json.loads((run_dir / "train_info.json").read_text())
    run = client(tracking_uri).get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert float(run.data.params["learning_rate"]) > 0 and run.data.params["max_steps"] == "4"
    curve = client(tracking_uri).get_metric_history(run.info.run_id, "loss")
    assert len(curve) >= 1 and all(m.step > 0 for m in curve)  # the training curve, step by step
    assert client(tracking_uri).get_metric_history(run.info.run_id, "eval_loss")
    assert run.data.metrics["calibration.temperature"] == pytest.approx(
        json.loads((run_dir / "calibration.json").read_text())["temperature"])
    artifacts = {a.path for a in client(tracking_uri).list_artifacts(run.info.run_id)}
    assert {"train_info.json", "calibration.json", "config.resolved.yaml"} <= artifacts, artifacts


def test_the_evaluation_lands_in_the_same_run(tracking_uri, tracked_run):
    run_dir, stdout = tracked_run
    run_id = json.loads((run_dir / "train_info.json").read_text())["mlflow_run_id"]
    metrics = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    logged = client(tracking_uri).get_run(run_id).data.metrics
    assert logged["test.macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert logged["test.accuracy"] == pytest.approx(metrics["accuracy"])
    files = {a.path for a in client(tracking_uri).list_artifacts(run_id, "eval-test")}
    assert {"eval-test/report.html", "eval-test/metrics.json", "eval-test/predictions.jsonl"} <= files, files
    assert run_id in stdout  # the evaluation says where it logged


def test_compare_takes_mlflow_run_ids(tracking_uri, tracked_run, tmp_path):
    run_dir, _ = tracked_run
    run_id = json.loads((run_dir / "train_info.json").read_text())["mlflow_run_id"]
    proc = run_script("compare_runs.py", f"mlflow:{run_id}", f"mlflow:{run_id}", "--output-dir", str(tmp_path / "cmp"),
                      env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no significant difference" in proc.stdout
    proc = run_script("compare_runs.py", "mlflow:0123456789abcdef", f"mlflow:{run_id}", "--output-dir",
                      str(tmp_path / "cmp2"), env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert proc.returncode == 1 and "0123456789abcdef" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((ROOT / "models").glob(f"mlflow-{run_id}*")) and not list((ROOT / "models").glob("mlflow-0123*"))
