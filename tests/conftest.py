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
    from common.loading import load_tokenizer
    return load_tokenizer(tiny_model)


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch):
    """Deployment variables from the developer's shell must not leak into config tests."""
    from common.config import ENV_KEYS
    for var in [*ENV_KEYS, "QWEN_CONFIG"]:
        monkeypatch.delenv(var, raising=False)
