"""`make demo` in a reduced form, so it cannot rot: train -> evaluate -> merge -> start_production.sh ->
test_api.py, each the real script, on a few-step run of the tiny model."""
import os
import signal
import subprocess
import time

import requests

from conftest import ROOT, run_script
from serving import free_port


def test_trained_run_to_a_served_answer(trained_run, prepared_data, tmp_path):
    data = ["--set", f"data.processed_dir={prepared_data}"]
    ev = run_script("evaluate_model.py", "--model", str(trained_run), "--output-dir", str(tmp_path / "eval"), *data)
    assert ev.returncode == 0, ev.stderr[-2000:]
    merged = tmp_path / "merged"
    mg = run_script("merge_lora.py", "--adapter", str(trained_run), "--output", str(merged), *data)
    assert mg.returncode == 0, mg.stderr[-2000:]
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "MODEL_PATH": str(merged),
           "LOGS_DIR": str(tmp_path / "logs"), "PYTHON": os.environ.get("PYTHON", "") or __import__("sys").executable}
    server = subprocess.Popen(["bash", str(ROOT / "start_production.sh")], cwd=ROOT, env=env,
                              stdout=open(tmp_path / "server.txt", "w"), stderr=subprocess.STDOUT)
    try:
        url, deadline, healthy = f"http://127.0.0.1:{port}", time.time() + 300, False
        while not healthy and time.time() < deadline and server.poll() is None:
            try:
                healthy = requests.get(url + "/health", timeout=1).status_code == 200
            except (requests.ConnectionError, requests.Timeout):  # not listening yet
                pass
            time.sleep(0 if healthy else 0.5)  # 503 while loading: ask again, without hurrying the load
        assert server.poll() is None and healthy, (tmp_path / "server.txt").read_text()[-3000:]
        api = run_script("test_api.py", "--url", url, "--max-items", "16")
        assert api.returncode == 0, api.stdout + api.stderr
        assert "PASS  models      merged" in api.stdout and "PASS  answers" in api.stdout
        assert f"starting gunicorn on {url}" in (tmp_path / "server.txt").read_text()
    finally:
        server.send_signal(signal.SIGTERM)  # start_production.sh execs gunicorn: this is its master
        assert server.wait(timeout=60) == 0


def test_start_production_refuses_a_missing_model(tmp_path):
    env = {**os.environ, "PORT": str(free_port()), "MODEL_PATH": str(tmp_path / "nothing"),
           "LOGS_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(["bash", str(ROOT / "start_production.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "nothing" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
