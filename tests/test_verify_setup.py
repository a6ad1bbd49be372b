"""verify_setup.py on a complete and on broken model directories."""
import json
import shutil

import pytest
from conftest import run_script


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    target = tmp_path / "tiny-qwen3"
    shutil.copytree(tiny_model, target)
    return target


def checks_by_name(proc):
    return {c["name"]: c for c in json.loads(proc.stdout)}


def test_complete_model_passes_and_no_gpu_is_a_warning(tiny_model):
    proc = run_script("verify_setup.py", "--model", str(tiny_model), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = checks_by_name(proc)
    assert checks["model files"]["status"] == "PASS"
    assert checks["tokenizer"]["status"] == "PASS"
    assert checks["gpu"]["status"] in ("WARN", "PASS")  # WARN on a CPU machine, PASS on a GPU box
    assert all(c["status"] != "FAIL" for c in checks.values())


def test_table_output_has_a_summary(tiny_model):
    proc = run_script("verify_setup.py", "--model", str(tiny_model), "--quick")
    assert proc.returncode == 0
    assert "PASS  model files" in proc.stdout and "0 failed" in proc.stdout


def test_truncated_shard_fails_naming_the_file(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    proc = run_script("verify_setup.py", "--model", str(model_copy), "--json")
    assert proc.returncode == 1
    detail = checks_by_name(proc)["model files"]
    assert detail["status"] == "FAIL" and shard.name in detail["detail"] and "truncated" in detail["detail"]
    assert "--force" in detail["fix"]


def test_missing_shard_fails_naming_the_file(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[-1]
    shard.unlink()
    proc = run_script("verify_setup.py", "--model", str(model_copy), "--quick")
    assert proc.returncode == 1
    assert f"{shard.name} is missing" in proc.stdout and "FAIL  model files" in proc.stdout


def test_missing_chat_template_and_tokenizer(model_copy):
    (model_copy / "chat_template.jinja").unlink()
    (model_copy / "tokenizer.json").unlink()
    proc = run_script("verify_setup.py", "--model", str(model_copy), "--json")
    detail = checks_by_name(proc)["model files"]["detail"]
    assert proc.returncode == 1 and "no chat template" in detail and "no tokenizer" in detail


def test_missing_model_dir_says_how_to_get_one(tmp_path):
    proc = run_script("verify_setup.py", "--model", str(tmp_path / "nothing"), "--quick")
    assert proc.returncode == 1 and "download_model.py" in proc.stdout
