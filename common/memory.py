"""Memory-fit estimates from a model's config.json alone, before anything is loaded.

Weights: bitsandbytes quantizes the decoder's linear layers only; the embedding and the output
head stay 16-bit. KV cache per token = 2 (K and V) x layers x kv_heads x head_dim x 2 bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3  # cards are sized in GiB: an RTX 3080 "10 GB" is 10 GiB
BYTES_PER_WEIGHT = {"none": 2.0, "8bit": 1.0, "4bit": 0.5 + 0.5 / 64}  # NF4 + double-quant constants
CUDA_CONTEXT_GIB = 0.5  # CUDA context, cuBLAS workspace and allocator slack, seen on consumer cards


# Published Qwen3 shapes (their config.json), so a fit can be checked before a download.
_QWEN3 = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8)
QWEN3_SHAPES = {
    "Qwen3-0.6B": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "Qwen3-4B": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "Qwen3-8B": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "Qwen3-14B": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, tie_word_embeddings=False),
    "Qwen3-32B": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, tie_word_embeddings=False),
}


def model_shape(model_dir: str | Path) -> dict | None:
    """The model's config.json, or the published shape its directory name names, or None."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return QWEN3_SHAPES.get(Path(model_dir).name.removesuffix("-Base"))


@dataclass
class ParamCount:
    linear: int  # the decoder's projections: what bitsandbytes quantizes
    other: int   # embeddings, output head, norms: kept 16-bit

    @property
    def total(self) -> int:
        return self.linear + self.other


def count_params(cfg: dict) -> ParamCount:
    """Parameter count of a Qwen2/Qwen3-style decoder from its config.json."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o and k, v
    mlp = 3 * h * cfg["intermediate_size"]                   # gate, up, down
    embed = cfg["vocab_size"] * h
    head = 0 if cfg.get("tie_word_embeddings", False) else embed
    norms = layers * (2 * h + 2 * head_dim) + h              # layer norms, q/k norms, final norm
    return ParamCount(linear=layers * (attn + mlp), other=embed + head + norms)


def weights_gib(cfg: dict, quantization: str) -> float:
    p = count_params(cfg)
    return (p.linear * BYTES_PER_WEIGHT[quantization] + p.other * 2.0) / GIB


def kv_cache_gib(cfg: dict, tokens: int) -> float:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv = cfg.get("num_key_value_heads", heads)
    return 2 * cfg["num_hidden_layers"] * kv * head_dim * 2 * tokens / GIB


@dataclass
class ServingFit:
    weights_gib: float
    kv_gib: float
    overhead_gib: float
    concurrent: int
    tokens_each: int

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_gib + self.overhead_gib

    def describe(self, quantization: str) -> str:
        return (f"{quantization} weights {self.weights_gib:.1f} GiB + KV cache for {self.concurrent} concurrent x "
                f"{self.tokens_each / 1000:.1f}k tokens {self.kv_gib:.1f} GiB + {self.overhead_gib:.1f} GiB overhead "
                f"= {self.total_gib:.1f} GiB")


def serving_fit(cfg: dict, quantization: str, concurrent: int, tokens_each: int) -> ServingFit:
    return ServingFit(weights_gib(cfg, quantization), kv_cache_gib(cfg, concurrent * tokens_each),
                      CUDA_CONTEXT_GIB, concurrent, tokens_each)


def _projection_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder projection, by module name."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def trainable_params(cfg: dict, r: int, targets: list[str], modules_to_save: list[str]) -> int:
    shapes = _projection_shapes(cfg)
    lora = cfg["num_hidden_layers"] * sum(r * (i + o) for name, (i, o) in shapes.items() if name in targets)
    full = sum(cfg["vocab_size"] * cfg["hidden_size"] for m in modules_to_save if m in ("lm_head", "embed_tokens"))
    return lora + full


@dataclass
class TrainingFit:
    weights_gib: float
    trainable_gib: float     # fp32 weights + grads + Adam moments of what is trained
    activations_gib: float
    logits_gib: float
    overhead_gib: float = CUDA_CONTEXT_GIB

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.trainable_gib + self.activations_gib + self.logits_gib + self.overhead_gib

    def describe(self) -> str:
        return (f"weights {self.weights_gib:.1f} + trainable {self.trainable_gib:.1f} + activations "
                f"{self.activations_gib:.1f} + logits {self.logits_gib:.1f} + overhead {self.overhead_gib:.1f} "
                f"= {self.total_gib:.1f} GiB")


def training_fit(cfg: dict, quantization: str, r: int, targets: list[str], modules_to_save: list[str],
                 batch: int, seq_len: int, answer_len: int, checkpointing: bool) -> TrainingFit:
    """Peak memory of one LoRA training step, from shapes and the longest batch of the data."""
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    tokens = batch * seq_len
    per_layer = tokens * (10 * h + 3 * inter) * 2  # 16-bit tensors autograd keeps for one layer's backward
    activations = (layers * tokens * h * 2 + per_layer) if checkpointing else layers * per_layer
    # only the answer positions go through the output head (logits_to_keep), in fp32 with its softmax
    logits = batch * (answer_len + 1) * cfg["vocab_size"] * 4 * 2
    return TrainingFit(weights_gib(cfg, quantization), trainable_params(cfg, r, targets, modules_to_save) * 16 / GIB,
                       activations / GIB, logits / GIB)
