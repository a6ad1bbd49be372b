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


def test_ram_lines_for_every_stage_on_the_cards_box_and_a_smaller_one():
    """The 8B profile on the card's box (10 GiB card, 31 GB RAM): a RAM line per stage, all PASS. On 12 GiB
    the stage that cannot fit (quantize's 16-bit agreement check) FAILs with its figures and a fix."""
    ram = {}
    for gib in (31, 12):
        proc = run_script("verify_setup.py", "--profile", "none", "--gpu-memory-gib", "10", "--ram-gib", str(gib),
                          "--quick", "--json")
        ram[gib] = {name: c for name, c in checks_by_name(proc).items() if name.startswith("RAM ")}
    assert set(ram[31]) == {"RAM train", "RAM merge", "RAM quantize", "RAM serve"}
    assert {c["status"] for c in ram[31].values()} == {"PASS"}, ram[31]
    assert all("vs 31.0 GiB of RAM" in c["detail"] and " = " in c["detail"] for c in ram[31].values())
    quantize = ram[12]["RAM quantize"]
    assert quantize["status"] == "FAIL" and "16-bit model" in quantize["detail"] and "quantize where" in quantize["fix"]
    assert ram[12]["RAM train"]["status"] == "PASS"


def test_the_8b_training_default_leaves_room_for_the_context_on_a_10_gib_card():
    proc = run_script("verify_setup.py", "--profile", "none", "--gpu-memory-gib", "10", "--quick", "--json")
    train = checks_by_name(proc)["training fit"]
    assert train["status"] == "PASS" and "batch 2 x 1024" in train["detail"] and "CUDA context 0.50" in train["detail"]
    spare = float(train["detail"].split("(+")[1].split(" GiB")[0])
    assert spare >= 1.0, train["detail"]  # a display's few hundred MiB and the context's growth fit beside it
