"""The tiny model's tokenizer is the real Qwen tokenizer: same ids, special tokens at their real ids."""
import json
from pathlib import Path

import pytest

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "qwen_reference_ids.json").read_text())


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[c["name"] for c in REFERENCE["cases"]])
def test_reproduces_published_qwen_ids(tokenizer, case):
    assert tokenizer(case["text"], add_special_tokens=False)["input_ids"] == case["ids"]
    assert tokenizer.decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("token,expected_id", [
    ("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
    ("<tool_call>", 151657), ("<|fim_prefix|>", 151659), ("<think>", 151667), ("</think>", 151668),
])
def test_special_tokens_sit_at_their_real_ids(tokenizer, token, expected_id):
    assert tokenizer.convert_tokens_to_ids(token) == expected_id
    assert tokenizer(token, add_special_tokens=False)["input_ids"] == [expected_id]


def test_eos_pad_and_sizes(tokenizer, tiny_model):
    from transformers import AutoConfig
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 151669
    assert AutoConfig.from_pretrained(tiny_model).vocab_size == 151936  # Qwen3 pads the matrix past the tokenizer


def test_nfc_normalization_and_digits(tokenizer):
    # U+03D2 U+0301 (NFD) normalizes to U+03D3 before encoding, as Qwen's tokenizer does
    assert tokenizer.encode("\u03d2\u0301") == tokenizer.encode("\u03d3")
    # Qwen splits numbers into single digits
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2026")] == ["2", "0", "2", "6"]


def test_think_tags_survive_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<think>x</think>ok<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>ok"
