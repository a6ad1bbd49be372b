"""merge_lora.py: parity with base+adapter (trained lm_head included), a plain Hugging Face model that
loads alone, no overwrite without --force, nothing at the target after a SIGKILL or a failed check."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script

from common.config import load_config
from common.model.files import check_model_dir
from common.model.loading import load_model
from common.text.prompts import classification_ids


def merge_args(run, prepared_data, output, *extra: str) -> list[str]:
    return ["--adapter", str(run), "--output", str(output), "--set", f"data.processed_dir={prepared_data}", *extra]


def copy_run(run, dest):
    """The run's adapter and the files merge reads, without its checkpoints."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "eval-*"))
    return dest


@pytest.fixture(scope="module")
def merged(trained_run, prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "lora-merged"
    proc = run_script("merge_lora.py", *merge_args(trained_run, prepared_data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def labels(prepared_data):
    return json.loads((prepared_data / "labels.json").read_text(encoding="utf-8"))["labels"]


def test_help():
    proc = run_script("merge_lora.py", "--help")
    assert proc.returncode == 0 and "python merge_lora.py" in proc.stdout and "--tolerance" in proc.stdout


def test_printed_parity_is_within_tolerance(merged):
    out, stdout = merged
    m = re.search(r"parity on (\d+) prompts \(test\.jsonl\): max \|logit diff\| (\S+) \(tolerance (\S+)\), "
                  r"best label agrees on (\d+)/(\d+)", stdout)
    assert m, stdout
    assert int(m[1]) == 8 and float(m[2]) <= float(m[3]) == 1e-3 and m[4] == m[5] == "8"
    assert f"wrote {out}/" in stdout and " MB" in stdout and re.search(r"in \d+\.\ds \(load", stdout)


def test_merged_logits_equal_base_plus_adapter(merged, trained_run, tokenizer, labels, tiny_model):
    """Re-checked here at every position of a prompt, and the trained lm_head is the one merged in."""
    from transformers import AutoModelForCausalLM
    out, _ = merged
    ids = torch.tensor(classification_ids(tokenizer, ["央行宣布降准0.5个百分点。"], labels,
                                          load_config(use_env=False).prompt))
    with torch.no_grad():
        reference = load_model(trained_run, device="cpu").eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
    assert (got - reference).abs().max() <= 1e-4
    assert (base - reference).abs().max() > 0.1  # the adapter changes the answer: the parity is not vacuous
    from safetensors.torch import load_file
    trained_head = next(v for k, v in load_file(trained_run / "adapter_model.safetensors").items() if "lm_head" in k)
    merged_head = AutoModelForCausalLM.from_pretrained(out).lm_head.weight
    assert torch.equal(merged_head, trained_head.to(merged_head.dtype))


def test_merged_dir_is_a_plain_complete_model(merged, trained_run, tokenizer, labels):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _ = merged
    assert check_model_dir(out) == []  # weights, tokenizer, chat template, generation config, manifest
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM" and not (out / "adapter_config.json").exists()
    assert (out / "labels.json").read_bytes() == (trained_run / "labels.json").read_bytes()
    assert (out / "chat_template.jinja").read_bytes() == (trained_run / "chat_template.jinja").read_bytes()
    assert not (out / "train_info.json").exists()  # or newest_run() would take the merged dir for a run
    pcfg = load_config(use_env=False).prompt
    assert classification_ids(AutoTokenizer.from_pretrained(out), ["文本"], labels, pcfg) == \
        classification_ids(tokenizer, ["文本"], labels, pcfg)  # the prompt contract survives the merge
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "merge" and manifest["adapter"] == str(trained_run) and manifest["method"] == "lora"
    assert manifest["parity"]["max_abs_diff"] <= manifest["parity"]["tolerance"]
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")


def test_existing_output_is_not_overwritten(merged, trained_run, prepared_data):
    out, _ = merged
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
    proc = run_script("merge_lora.py", *merge_args(trained_run, prepared_data, out))
    assert proc.returncode == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()} == before


def test_force_replaces_and_a_qlora_adapter_goes_into_the_16bit_base(trained_run, prepared_data, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    info = json.loads((run / "train_info.json").read_text())
    (run / "train_info.json").write_text(json.dumps({**info, "method": "qlora"}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("an older merge")
    proc = run_script("merge_lora.py", *merge_args(run, prepared_data, out, "--force"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4-bit NF4 base (qlora)" in proc.stdout and "merged into the 16-bit base" in proc.stdout
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_sigkill_midway_leaves_nothing_at_the_target(trained_run, prepared_data, tmp_path):
    out = tmp_path / "killed-merged"
    proc = subprocess.Popen([sys.executable, str(ROOT / "merge_lora.py"), *merge_args(trained_run, prepared_data, out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # killed once the weights are being written: after that, reloading and checking them takes ~1 s
    while not list(tmp_path.glob(".killed-merged.tmp-*/*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the merge finished before it could be killed"
    assert list(tmp_path.glob(".killed-merged.tmp-*/*")) and not out.exists()
    again = run_script("merge_lora.py", *merge_args(trained_run, prepared_data, out))  # no --force needed
    assert again.returncode == 0, again.stderr[-3000:]
    assert check_model_dir(out) == []
    assert not list(tmp_path.glob(".killed-merged.tmp-*"))  # the killed writer's leftovers are gone too
    assert oct((out / "config.json").stat().st_mode & 0o777) == "0o644"  # readable by a service user


def test_parity_failure_writes_nothing(trained_run, prepared_data, tmp_path):
    """Tolerance 0 genuinely fails: merging reorders floating-point sums (measured diff ~1e-5)."""
    out = tmp_path / "strict-merged"
    proc = run_script("merge_lora.py", *merge_args(trained_run, prepared_data, out, "--tolerance", "0"))
    assert proc.returncode == 1 and "(tolerance 0)" in proc.stderr and "nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_corrupt_adapter_fails_loudly(trained_run, prepared_data, tmp_path):
    """A run that diverged into NaN: the merge refuses it rather than writing a broken model."""
    from safetensors.torch import load_file, save_file
    run = copy_run(trained_run, tmp_path / "run")
    tensors = load_file(run / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, run / "adapter_model.safetensors")
    proc = run_script("merge_lora.py", *merge_args(run, prepared_data, tmp_path / "out"))
    assert proc.returncode == 1 and "not finite" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_no_run_is_one_sentence(tmp_path):
    proc = run_script("merge_lora.py", "--set", f"train.runs_dir={tmp_path}")
    assert proc.returncode == 1 and "no trained run" in proc.stderr and "Traceback" not in proc.stderr
