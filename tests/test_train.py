"""train_qwen.py: answer-only loss, real few-step runs (lora, qlora, lora8), resume after SIGKILL, DDP,
the temperature fitted on the val split (calibration.json)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script, train_args

from common.config import load_config
from common.model.loading import load_model
from common.text.prepared import read_jsonl
from common.text.prompts import IGNORE_INDEX
from common.text.prompts import encode_records
from train_qwen import LeftPadCollator, make_trainer_class


def test_loss_mask_on_a_real_example(tokenizer, prepared_data):
    record = read_jsonl(prepared_data / "train.jsonl")[0]
    labels = json.loads((prepared_data / "labels.json").read_text())["labels"]
    (ex,) = encode_records(tokenizer, [record], labels, load_config(use_env=False).prompt)
    learned = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == record["label"] + "<|im_end|>"
    n_prompt = len(ex["labels"]) - len(learned)
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # the whole prompt is masked, nothing after it
    assert tokenizer.decode(ex["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_answer_only_loss_equals_the_full_sequence_loss(tiny_model, tokenizer, prepared_data):
    """The output head runs only on the answer positions; the loss must equal transformers' own."""
    labels = json.loads((prepared_data / "labels.json").read_text())["labels"]
    records = read_jsonl(prepared_data / "train.jsonl")[:4]
    batch = LeftPadCollator(tokenizer.pad_token_id)(encode_records(tokenizer, records, labels,
                                                                   load_config(use_env=False).prompt))
    model = load_model(tiny_model).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        reference = model(**batch).loss  # transformers' loss over full logits
        cls = make_trainer_class()
        trainer = cls.__new__(cls)  # only compute_loss is exercised: it needs no trainer state
        seen = []
        watch = head.register_forward_hook(lambda _, args, out: seen.append(tuple(out.shape)))
        ours = trainer.compute_loss(model, dict(batch))
        watch.remove()
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)
    n_answer = int((batch["labels"] != IGNORE_INDEX).sum())
    assert seen == [(n_answer, head.out_features)]  # the head ran on the answer positions, nothing else
    assert not head._forward_pre_hooks  # and the model is left as it was
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id or batch["attention_mask"].all()  # left padding


def test_lora_run_writes_a_usable_adapter(trained_run, tiny_model, prepared_data):
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "labels.json", "calibration.json", "config.resolved.yaml", "history.json", "train_info.json"):
        assert (trained_run / name).is_file(), name
    info = json.loads((trained_run / "train_info.json").read_text())
    assert info["global_step"] == 4 and info["method"] == "lora" and len(info["data_sha256"]) == 64
    assert info["tokens_per_second"] > 0 and 0 <= info["padding_ratio"] < 0.5 and info["peak_memory_gib"] > 0
    assert "eval_macro_f1" in info["final_eval"] and info["best_checkpoint"]
    ckpts = list((trained_run / "checkpoints").glob("checkpoint-*"))
    assert 1 <= len(ckpts) <= 3  # save_total_limit
    model = load_model(trained_run)  # the adapter directory alone finds its base
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_the_run_is_calibrated_on_its_val_split(trained_run, tiny_model, prepared_data, tmp_path):
    cal = json.loads((trained_run / "calibration.json").read_text())
    assert cal["split"] == "val" and cal["items"] == len(read_jsonl(prepared_data / "val.jsonl"))
    assert math.isfinite(cal["temperature"]) and 0.05 <= cal["temperature"] <= 20
    assert cal["nll_after"] <= cal["nll_before"] + 1e-6  # T minimises the val NLL; T = 1 is one candidate
    assert all(0 <= r["coverage"] <= 1 for r in cal["coverage"]) and cal["coverage"][0]["threshold"] == 0.5
    info = json.loads((trained_run / "train_info.json").read_text())
    assert info["calibration"]["temperature"] == cal["temperature"] and "ece_after" in info["calibration"]
    # --calibrate-only on a run without the file: the same fit, by the same code path, from the run on disk
    run = tmp_path / "old"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "calibration.json"))
    proc = run_script("train_qwen.py", "--calibrate-only", str(run), "--set", f"data.processed_dir={prepared_data}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"calibration: T={cal['temperature']:.2f} on {cal['items']} val items" in proc.stdout
    refit = json.loads((run / "calibration.json").read_text())["temperature"]
    assert math.isclose(refit, cal["temperature"], rel_tol=1e-2)
    assert json.loads((run / "train_info.json").read_text())["calibration"]["temperature"] == refit
    other = run_script("train_qwen.py", "--calibrate-only", str(run), "--set", f"data.processed_dir={tmp_path}")
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-2000:]


def test_existing_run_is_not_overwritten(trained_run, tiny_model, prepared_data):
    before = (trained_run / "train_info.json").read_text()
    proc = run_script("train_qwen.py", *train_args(tiny_model, prepared_data, trained_run.parent, "lora"))
    assert proc.returncode == 1 and "--resume" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr and (trained_run / "train_info.json").read_text() == before


def test_missing_prepared_data_is_one_sentence(tiny_model, tmp_path):
    proc = run_script("train_qwen.py", *train_args(tiny_model, tmp_path / "nothing", tmp_path, "x"))
    assert proc.returncode == 1 and "run python prepare_data.py first" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("method", ["qlora", "lora8"])
def test_quantized_methods_train_on_cpu(method, tiny_model, prepared_data, tmp_path):
    proc = run_script("train_qwen.py", *train_args(tiny_model, prepared_data, tmp_path, method, "--method", method,
                                                   "--max-steps", "2", "--gradient-checkpointing"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / method / "train_info.json").read_text())
    assert info["global_step"] == 2 and info["method"] == method
    history = json.loads((tmp_path / method / "history.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)


def test_resume_after_sigkill_reaches_the_uninterrupted_adapter(tiny_model, prepared_data, tmp_path):
    steps = ("--max-steps", "12", "--save-steps", "4", "--eval-steps", "4", "--early-stopping-patience", "0")
    args = train_args(tiny_model, prepared_data, tmp_path, "killed", *steps)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_qwen.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "killed" / "train_info.json").exists()  # killed midway
    killed_state = first.read_bytes(), first.stat().st_mtime_ns
    resumed = run_script("train_qwen.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((tmp_path / "killed" / "train_info.json").read_text())
    assert info["global_step"] == 12
    # a run that started over would have written checkpoint-4 again; a resumed one leaves it as it was
    assert (first.read_bytes(), first.stat().st_mtime_ns) == killed_state
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h][:3] == [4, 8, 12]  # no step ran twice
    straight = run_script("train_qwen.py", *train_args(tiny_model, prepared_data, tmp_path, "straight", *steps))
    assert straight.returncode == 0, straight.stderr[-2000:]
    from safetensors.torch import load_file
    resumed_w, straight_w = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("killed", "straight"))
    assert resumed_w.keys() == straight_w.keys()
    assert all(torch.equal(resumed_w[k], straight_w[k]) for k in resumed_w)  # the same adapter, bit for bit


def test_two_process_accelerate_run(tiny_model, prepared_data, tmp_path):
    """DDP with two CPU processes (gloo); on a GPU box the same command runs one process per GPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_qwen.py"),
           *train_args(tiny_model, prepared_data, tmp_path, "ddp", "--max-steps", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    info = json.loads((tmp_path / "ddp" / "train_info.json").read_text())
    assert info["global_step"] == 2


def test_same_config_data_and_seed_give_the_same_adapter_bytes(trained_run, tiny_model, prepared_data, tmp_path):
    """A run is a function of its config, data and seed: again with seed 42 (the fixture's), bit for bit;
    with seed 7, a different adapter. train_info.json records what made it."""
    again = run_script("train_qwen.py", *train_args(tiny_model, prepared_data, tmp_path, "again"))
    other = run_script("train_qwen.py", *train_args(tiny_model, prepared_data, tmp_path, "other", "--seed", "7"))
    assert again.returncode == 0 and other.returncode == 0, again.stderr[-2000:] + other.stderr[-2000:]
    reference = (trained_run / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == reference
    assert (tmp_path / "other" / "adapter_model.safetensors").read_bytes() != reference
    prov = json.loads((trained_run / "train_info.json").read_text())["provenance"]
    assert prov["seed"] == 42 and prov["device"] == "cpu" and prov["dtype"] == "float32"
    assert len(prov["data"]["train"]) == 64 and prov["base_model"]["manifest_sha256"]
    assert prov["versions"]["torch"] and prov["config"]["train"]["seed"] == 42
