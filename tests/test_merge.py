"""merge_lora.py: the streaming merge equals peft's merge_and_unload within bf16 rounding (tied and untied
heads), parity with base+adapter layer by layer and whole (trained lm_head included), a plain Hugging Face
model that loads alone, no overwrite without --force, nothing at the target after a SIGKILL or a failed check."""
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
    for how in ("layer by layer from disk", "whole models loaded back"):  # a tiny model gets both checks
        m = re.search(rf"parity on (\d+) prompts \(test\.jsonl\), {how}: max \|logit diff\| (\S+) "
                      r"\(tolerance (\S+)\), best label agrees on (\d+)/(\d+)", stdout)
        assert m, stdout
        assert int(m[1]) == 8 and float(m[2]) <= float(m[3]) == 1e-3 and m[4] == m[5] == "8"
    assert f"wrote {out}/" in stdout and " MB" in stdout and re.search(r"in \d+\.\ds \(merge", stdout)
    assert re.search(r"14 tensors merged, 2 replaced, 9 copied; peak RSS \d+\.\d+ GiB", stdout)


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
    assert (out / "calibration.json").read_bytes() == (trained_run / "calibration.json").read_bytes()  # its T
    assert (out / "chat_template.jinja").read_bytes() == (trained_run / "chat_template.jinja").read_bytes()
    assert not (out / "train_info.json").exists()  # or newest_run() would take the merged dir for a run
    pcfg = load_config(use_env=False).prompt
    assert classification_ids(AutoTokenizer.from_pretrained(out), ["文本"], labels, pcfg) == \
        classification_ids(tokenizer, ["文本"], labels, pcfg)  # the prompt contract survives the merge
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "merge" and manifest["adapter"] == str(trained_run) and manifest["method"] == "lora"
    assert manifest["parity"]["max_abs_diff"] <= manifest["parity"]["tolerance"]
    assert manifest["parity"]["checks"] == ["layers", "whole"]
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


def test_dora_is_refused_in_one_sentence(trained_run, prepared_data, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    proc = run_script("merge_lora.py", *merge_args(run, prepared_data, tmp_path / "out"))
    assert proc.returncode == 1 and "DoRA" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ram_check_names_its_figures(trained_run, tiny_model):
    from common.config import UserError
    from common.model.lora_merge import check_ram, read_adapter
    adapter = read_adapter(trained_run, tiny_model)
    assert check_ram(tiny_model, adapter, True, 64.0) < 64.0
    with pytest.raises(UserError, match=r"needs ~\d+\.\d GiB of RAM .* and 0\.5 GiB is free now"):
        check_ram(tiny_model, adapter, True, 0.5)


def test_streamed_best_labels_equal_label_scoring(merged, trained_run, tiny_model, tokenizer):
    """Labels that share leading tokens need their continuations: the layer check scores them as label
    scoring does, so its best labels are label scoring's."""
    from common.model.label_scoring import label_tokens, score_label_ids
    from common.model.lora_merge import layer_parity, read_adapter
    labels = ["公司", "公司债券", "宏观经济", "宏观"]
    cand = label_tokens(tokenizer, labels)
    assert any(len(c) > 1 for c in cand)  # the continuation path is exercised
    prompts = classification_ids(tokenizer, ["央行宣布降准0.5个百分点。", "某公司发行债券。", "经济数据公布。"],
                                 labels, load_config(use_env=False).prompt)
    expected, got = layer_parity(tiny_model, read_adapter(trained_run, tiny_model), merged[0], prompts, cand)
    full = score_label_ids(load_model(trained_run, device="cpu").eval(), tokenizer, prompts, labels).best()[0]
    assert expected["best"] == got["best"] == full


# ----------------------------------------------------------------------------- the streaming merge vs peft
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=512)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_base_and_adapter(tmp_path, tied: bool):
    """A bf16 Qwen3 of a small shape in several shards, and an r=8 adapter on all projections with random
    A and B (and, on a tied base, a trained lm_head: the merge must untie it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(Qwen3Config(**SMALL, tie_word_embeddings=tied)).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size="200KB")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False,
                                            modules_to_save=["lm_head"] if tied else None))
    if tied:
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at each value (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(1e-30))) - 7)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-head-trained"])
def test_streaming_merge_equals_peft_merge_and_unload(tmp_path, tied):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.model.lora_merge import merge_shards, read_adapter, read_tensor, weight_map
    base, adapter_dir = small_base_and_adapter(tmp_path, tied)
    assert len(set(weight_map(base).values())) > 1  # the sharded, indexed path
    adapter = read_adapter(adapter_dir, base)
    out = tmp_path / "merged"
    out.mkdir()
    counts = merge_shards(base, adapter, out)
    assert counts["merged"] == 7 * SMALL["num_hidden_layers"] and counts["replaced"] == int(tied)
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                            adapter_dir).merge_and_unload()
    reference = peft_merged.state_dict()
    files = weight_map(out)
    assert set(files) == set(weight_map(base)) | ({"lm_head.weight"} if tied else set())
    for name, shard in files.items():
        ours = read_tensor(out / shard, name)
        assert ours.dtype == torch.bfloat16, name
        if name in adapter.targets:
            a_key, b_key, scale = adapter.targets[name]
            w = read_tensor(base / weight_map(base)[name], name)
            delta = (read_tensor(adapter.file, b_key).float() @ read_tensor(adapter.file, a_key).float()) * scale
            assert torch.equal(ours, (w.float() + delta).bfloat16()), name  # fp32 sum, rounded once
            assert delta.abs().max() > 10 * bf16_ulp(w).max(), name  # the update is real, not lost in rounding
            # peft rounds B·A to bf16 before adding it in bf16: at most a unit in the last place apart
            gap = (ours.float() - reference[name].float()).abs()
            assert (gap <= torch.maximum(bf16_ulp(ours), bf16_ulp(reference[name]))).all(), name
        else:
            assert torch.equal(ours, reference[name]), name  # copied (or the trained head) exactly
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False if tied else not config.get("tie_word_embeddings")
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
        want = peft_merged.float()(input_ids=ids).logits
    assert (got - want).abs().max() < 0.05  # the same model within the two roundings


def test_layer_check_catches_a_lost_update(tmp_path):
    """A merged shard that lost one projection's update fails the layer-by-layer parity."""
    from safetensors.torch import load_file, save_file

    from common.model.lora_merge import layer_parity, merge_shards, read_adapter, weight_map
    base, adapter_dir = small_base_and_adapter(tmp_path, False)
    adapter = read_adapter(adapter_dir, base)
    out = tmp_path / "merged"
    out.mkdir()
    merge_shards(base, adapter, out)
    prompts = [[5, 17, 300, 42, 7, 99, 3, 8], [1, 2, 3]]
    expected, got = layer_parity(base, adapter, out, prompts)
    good = max((a - b).abs().max().item() for a, b in zip(expected["logits"], got["logits"]))
    name = "model.layers.1.mlp.down_proj.weight"
    shard = out / weight_map(out)[name]
    tensors = load_file(shard)
    tensors[name] = load_file(base / weight_map(base)[name])[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    expected, got = layer_parity(base, adapter, out, prompts)
    bad = max((a - b).abs().max().item() for a, b in zip(expected["logits"], got["logits"]))
    assert good < 0.05 < bad and bad > 10 * good
