"""The tiny model loads with the plain Auto classes and through common.loading, in 8-bit and 4-bit too."""
import pytest
import torch

from common.loading import load_model, pick_device, pick_dtype, resolve_quantization
from common.prompts import classification_prompt, encode_text


def test_plain_auto_classes_load_it(tiny_model):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == 151936 and not model.config.tie_word_embeddings


def test_cpu_defaults():
    assert pick_device() == "cpu" and pick_dtype("cpu") == torch.float32
    assert resolve_quantization("auto", "cpu") == "none" and resolve_quantization("auto", "cuda") == "8bit"
    with pytest.raises(ValueError, match="quantization must be"):
        resolve_quantization("int3", "cpu")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    from common.config import load_config
    prompt = classification_prompt(tokenizer, "央行下调政策利率。", ["货币政策", "股市"], load_config(use_env=False).prompt)
    return torch.tensor([encode_text(tokenizer, prompt)])


@pytest.fixture(scope="module")
def full_logits(tiny_model, prompt_ids):
    with torch.no_grad():
        return load_model(tiny_model).eval()(prompt_ids).logits


@pytest.mark.parametrize("mode,layer_type", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_loading_runs_on_cpu(tiny_model, prompt_ids, full_logits, mode, layer_type):
    model = load_model(tiny_model, quantization=mode).eval()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer_type
    with torch.no_grad():
        logits = model(prompt_ids).logits
    assert logits.shape == full_logits.shape and torch.isfinite(logits).all()
    # quantization perturbs the logits, but they stay close to the full-precision model's
    corr = torch.corrcoef(torch.stack([logits.flatten(), full_logits.flatten()]))[0, 1]
    assert corr > (0.99 if mode == "8bit" else 0.9)


def test_generation_stops_at_im_end(tiny_model, tokenizer, prompt_ids):
    model = load_model(tiny_model).eval()
    assert model.generation_config.eos_token_id == [151645, 151643]
    out = model.generate(prompt_ids, max_new_tokens=4, attention_mask=torch.ones_like(prompt_ids))
    assert out.shape[1] <= prompt_ids.shape[1] + 4
