"""Shared fixtures: the tiny Qwen3 is built once per test session, by the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a stage script the way a user does, from the repo root, and capture what it prints."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """models/tiny-qwen3 built into a temporary directory with `download_model.py --tiny`."""
    target = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    proc = run_script("download_model.py", "--tiny", "--tiny-dir", str(target))
    assert proc.returncode == 0, proc.stderr
    return target


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from common.model.loading import load_tokenizer
    return load_tokenizer(tiny_model)


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch):
    """Deployment variables from the developer's shell must not leak into config tests."""
    import os

    from common.config import ENV_KEYS
    for var in [*ENV_KEYS, "QWEN_CONFIG", "API_KEYS", "API_KEYS_FILE", *[v for v in os.environ if v.startswith("QWEN_")]]:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def prepared_data(tiny_model, tmp_path_factory) -> Path:
    """data/processed for a 240-item slice of the sample CSV, written by the real prepare_data.py."""
    base = tmp_path_factory.mktemp("data")
    lines = (ROOT / "data" / "sample_news.csv").read_text(encoding="utf-8").splitlines()
    (base / "news.csv").write_text("\n".join(lines[:241]) + "\n", encoding="utf-8")
    out = base / "processed"
    proc = run_script("prepare_data.py", "--input", str(base / "news.csv"), "--processed-dir", str(out),
                      "--model", str(tiny_model))
    assert proc.returncode == 0, proc.stderr
    return out


def train_args(tiny_model, prepared_data, runs_dir, run_name: str, *extra: str) -> list[str]:
    """train_qwen.py flags for a few-step run of the tiny model, the run kept in a temporary directory."""
    return ["--model", str(tiny_model), "--set", f"data.processed_dir={prepared_data}",
            "--runs-dir", str(runs_dir), "--run-name", run_name, "--report-to", "[]", "--max-steps", "4",
            "--eval-steps", "2", "--save-steps", "2", *extra]


@pytest.fixture(scope="session")
def trained_run(tiny_model, prepared_data, tmp_path_factory) -> Path:
    """A 4-step LoRA run of the tiny model (the demo method), made by the real CLI."""
    runs = tmp_path_factory.mktemp("runs")
    proc = run_script("train_qwen.py", *train_args(tiny_model, prepared_data, runs, "lora"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "lora"
