"""convert_checkpoint.py: a prefixed, wrapped state dict becomes a Hugging Face model with the same logits;
unexpected keys are named and left out, a missing tensor is an error naming it."""
import argparse
import json

import pytest
import torch
from conftest import run_script

from common.model.files import check_model_dir
from convert_checkpoint import DEFAULT_PREFIXES, strip_key


@pytest.fixture(scope="module")
def perturbed(tiny_model) -> dict[str, torch.Tensor]:
    """The tiny model's weights, each moved a little, so a conversion that fell back to the base shows."""
    from transformers import AutoModelForCausalLM
    gen = torch.Generator().manual_seed(0)
    state = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.fixture(scope="module")
def probe(tokenizer) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "沪深两市成交额突破万亿元。"}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def logits_of(model_dir, ids, state=None) -> torch.Tensor:
    """A model dir's logits, or (with `state`) those of its architecture holding `state` directly."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if state is not None:
        model.load_state_dict(state)
    with torch.no_grad():
        return model(input_ids=ids).logits


def convert(checkpoint, base, output, *extra: str):
    return run_script("convert_checkpoint.py", "--checkpoint", str(checkpoint), "--base", str(base),
                      "--output", str(output), *extra)


def test_help():
    proc = run_script("convert_checkpoint.py", "--help")
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout and "--allow-missing" in proc.stdout


def test_strip_key_only_towards_a_known_key():
    known = {"model.norm.weight", "lm_head.weight"}
    assert strip_key("module._orig_mod.model.norm.weight", DEFAULT_PREFIXES, known) == \
        ("model.norm.weight", ["module.", "_orig_mod."])
    assert strip_key("actor.module.lm_head.weight", DEFAULT_PREFIXES, known) == ("lm_head.weight", ["actor.", "module."])
    assert strip_key("module.value_head.weight", DEFAULT_PREFIXES, known) == ("module.value_head.weight", [])
    assert strip_key("model.norm.weight", DEFAULT_PREFIXES, known) == ("model.norm.weight", [])


def test_round_trip_of_a_wrapped_prefixed_checkpoint(perturbed, tiny_model, probe, tmp_path):
    ckpt = tmp_path / "step_500.pt"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in perturbed.items()}, "step": 500}, ckpt)
    out = tmp_path / "converted"
    proc = convert(ckpt, tiny_model, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 missing, 0 unexpected" in proc.stdout and "module. from 25, _orig_mod. from 25" in proc.stdout
    assert "max |logit diff| 0 " in proc.stdout
    got, expected = logits_of(out, probe), logits_of(tiny_model, probe, perturbed)
    assert (got - expected).abs().max() <= 1e-6
    assert (got - logits_of(tiny_model, probe)).abs().max() > 0.01  # the checkpoint's weights, not the base's
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template and check_model_dir(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "convert" and manifest["unexpected"] == [] and manifest["from_base"] == []


def test_bf16_safetensors_with_an_extra_prefix(perturbed, tiny_model, probe, tmp_path):
    from safetensors.torch import save_file
    state = {k: v.to(torch.bfloat16) for k, v in perturbed.items()}
    save_file({f"policy.actor.{k}": v for k, v in state.items()}, tmp_path / "policy.safetensors")
    out = tmp_path / "converted"
    proc = convert(tmp_path / "policy.safetensors", tiny_model, out, "--strip", "policy.")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(bfloat16): 25 of 25 tensors" in proc.stdout and "max |logit diff| 0 (allowed 0)" in proc.stdout
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # no silent change of precision


def test_an_extra_key_is_reported_as_unexpected(perturbed, tiny_model, tmp_path):
    state = {f"module.{k}": v for k, v in perturbed.items()} | {"module.value_head.weight": torch.zeros(1, 128)}
    torch.save({"model": state}, tmp_path / "rl.pt")
    proc = convert(tmp_path / "rl.pt", tiny_model, tmp_path / "converted")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 missing, 1 unexpected" in proc.stdout and "module.value_head.weight" in proc.stdout
    from safetensors import safe_open
    with safe_open(tmp_path / "converted" / "model.safetensors", framework="pt") as f:
        assert not [k for k in f.keys() if "value_head" in k]  # noqa: SIM118 -- safe_open has no `in`


def test_a_missing_tensor_fails_naming_it(perturbed, tiny_model, tmp_path):
    state = {f"module.{k}": v for k, v in perturbed.items() if k != "model.norm.weight"}
    torch.save(state, tmp_path / "partial.pt")
    proc = convert(tmp_path / "partial.pt", tiny_model, tmp_path / "converted")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "model.norm.weight" in proc.stderr and "--allow-missing" in proc.stderr
    assert not (tmp_path / "converted").exists()


def test_what_is_not_a_state_dict_is_refused(tiny_model, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    proc = convert(tmp_path / "list.pt", tiny_model, tmp_path / "converted")
    assert proc.returncode == 1 and "not a state dict" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    proc = convert(tmp_path / "junk.pt", tiny_model, tmp_path / "converted")
    assert proc.returncode == 1 and "is not a PyTorch checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    torch.save({"state_dict": {"w": torch.zeros(2)}, "trainer": argparse.Namespace(lr=1e-4)}, tmp_path / "obj.pt")
    proc = convert(tmp_path / "obj.pt", tiny_model, tmp_path / "converted")
    assert proc.returncode == 1 and "holds Python objects besides tensors" in proc.stderr
