"""The tiny model loads with the plain Auto classes and through common.model.loading, in 8-bit and 4-bit too."""
import pytest
import torch

from common.model.loading import load_model, pick_device, pick_dtype, resolve_quantization
from common.text.prompts import classification_ids


def test_plain_auto_classes_load_it(tiny_model):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == 151936 and not model.config.tie_word_embeddings


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_order_cuda_mps_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device() == expected


def test_cpu_defaults():
    assert pick_dtype("cpu") == torch.float32
    assert resolve_quantization("auto", "cpu") == "none" and resolve_quantization("auto", "cuda") == "8bit"
    with pytest.raises(ValueError, match="quantization must be"):
        resolve_quantization("int3", "cpu")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    from common.config import load_config
    return torch.tensor(classification_ids(tokenizer, ["央行下调政策利率。"], ["货币政策", "股市"],
                                           load_config(use_env=False).prompt))


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
    """The saved generation config makes a plain generate() stop at <|im_end|>: with the head nudged to
    emit it after two tokens, generation ends there instead of running to max_new_tokens."""
    model = load_model(tiny_model).eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [im_end, tokenizer.pad_token_id]
    start, steps = prompt_ids.shape[1], []

    def favour_im_end(module, args, logits):
        steps.append(1)  # the third step (prefill, then two decode steps) picks <|im_end|>; none before it
        logits[..., [im_end, tokenizer.pad_token_id]] -= 1e4
        if len(steps) == 3:
            logits[..., im_end] += 2e4
        return logits

    hook = model.lm_head.register_forward_hook(favour_im_end)
    try:
        out = model.generate(prompt_ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(prompt_ids))
    finally:
        hook.remove()
    assert out.shape[1] == start + 3 and out[0, -1] == im_end


def test_embedding_in_cpu_memory_gives_identical_logits(tiny_model, prompt_ids, full_logits):
    """The hooks that keep the embedding in CPU memory (ids in, vectors out to the compute device); on a
    GPU box the vectors cross to the GPU, here the path runs with both ends on the CPU."""
    from common.model.loading import embedding_to_cpu, model_device
    model = load_model(tiny_model).eval()
    embedding_to_cpu(model)
    assert model.get_input_embeddings().weight.device.type == "cpu" and model_device(model).type == "cpu"
    assert len(model.get_input_embeddings()._forward_pre_hooks) == 1
    with torch.no_grad():
        assert torch.equal(model(prompt_ids).logits, full_logits)


def test_a_tied_head_keeps_its_embedding(tiny_model):
    from common.model.loading import embedding_to_cpu
    model = load_model(tiny_model).eval()
    model.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="ties its embedding"):
        embedding_to_cpu(model)
