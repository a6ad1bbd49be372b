"""Memory fit from the module tree the loader builds, counted byte by byte, before anything loads.

The model is built from its config.json on the meta device (no weights, no memory), the loader's own
bitsandbytes replacement applied (8-bit / NF4 projections, lm_head in or out), and every tensor is
counted with the bytes it will have and the device it will sit on. KV cache per token =
2 (K and V) x layers x kv_heads x head_dim x 2 bytes. verify_setup prints these figures and the
server's memory budget starts from them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3  # cards are sized in GiB: an RTX 3080 "10 GB" is 10 GiB
CUDA_CONTEXT_GIB = 0.5  # CUDA context, cuBLAS workspace and allocator slack, seen on consumer cards
KV_MARGIN_GIB = 0.25  # kept free beside the KV budget: allocator fragmentation, sampling and scoring temporaries
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes NF4: absmax per 64 weights, double-quantized per 256 blocks

# Published Qwen3 shapes (their config.json), so a fit can be checked before a download.
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, num_key_value_heads=8,
              max_position_embeddings=40960, rope_theta=1000000.0)
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


@dataclass(frozen=True)
class Placement:
    """How the loader lays a model out: what common/model/loading.py's load_model is asked for."""
    quantization: str = "none"      # none | 8bit | 4bit
    quantize_lm_head: bool = False  # the output head in the projections' precision too
    embed_on_cpu: bool = False      # the input embedding (a lookup) in CPU memory


# ----------------------------------------------------------------------------- the module tree
def meta_model(cfg: dict, placement: Placement, dtype_bytes: int = 2):
    """The model the loader would build, on the meta device, with its bitsandbytes layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.model.loading import quantization_config, skipped_modules
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("quantization_config",)})
    dtype = torch.float16 if dtype_bytes == 2 else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quant = quantization_config(placement.quantization, dtype, placement.quantize_lm_head)
    if quant is not None:
        from transformers.integrations import replace_with_bnb_linear
        model = replace_with_bnb_linear(model, modules_to_not_convert=skipped_modules(model, quant),
                                        quantization_config=quant)
    return model


def _quantized_bytes(module) -> int | None:
    """Bytes of a bitsandbytes layer's weight once quantized (None for any other module)."""
    kind = type(module).__name__
    if kind not in ("Linear8bitLt", "Linear4bit"):
        return None
    n = module.in_features * module.out_features
    if kind == "Linear8bitLt":
        return n + 4 * module.out_features                       # int8 weight + fp32 row scales (SCB)
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 * (256 + 16 + 1)


def weight_bytes(model, dtype_bytes: int, embed_on_cpu: bool = False) -> dict[str, int]:
    """{"gpu": bytes, "cpu": bytes} of a (meta) model's weights and buffers as the loader places them."""
    embedding = model.get_input_embeddings()
    out = {"gpu": 0, "cpu": 0}
    for module in model.modules():
        where = "cpu" if embed_on_cpu and module is embedding else "gpu"
        quantized = _quantized_bytes(module)
        if quantized is not None:
            out[where] += quantized + (module.bias.numel() * dtype_bytes if module.bias is not None else 0)
            continue
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            out[where] += p.numel() * (dtype_bytes if p.is_floating_point() else p.element_size())
    return out


def loaded_bytes(model) -> dict[str, int]:
    """{device type: bytes} of a loaded model: every parameter, buffer and bitsandbytes quantization state."""
    out: dict[str, int] = {}

    def add(t) -> None:
        out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        if getattr(t, "SCB", None) is not None:
            add(t.SCB)
        state = getattr(t, "quant_state", None)
        for part in ([state, state.state2] if state is not None and state.nested else [state]) if state else []:
            add(part.absmax)
            add(part.code)
            if getattr(part, "offset", None) is not None:
                add(part.offset)
    return out


# ----------------------------------------------------------------------------- serving
def kv_bytes_per_token(cfg: dict) -> int:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 2


def prefill_activation_bytes(cfg: dict, tokens: int) -> int:
    """Peak of one prefill pass of `tokens` tokens (16-bit): a layer's hidden states, attention and MLP
    outputs, plus the int32 accumulator of an 8-bit matmul over the widest projection."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    return tokens * ((8 * h + 4 * inter) * 2 + 4 * inter)


@dataclass
class ServingFit:
    weights_gpu: float       # GiB
    weights_cpu: float
    kv: float
    activations: float
    overhead: float
    kv_tokens: int

    @property
    def total(self) -> float:
        return self.weights_gpu + self.kv + self.activations + self.overhead

    def budget_tokens(self, card_gib: float, kv_per_token: int) -> int:
        """The KV budget the server would measure on this card: what the rest leaves free."""
        free = card_gib - self.weights_gpu - self.activations - self.overhead - KV_MARGIN_GIB
        return max(int(free * GIB // kv_per_token), 0)

    def describe(self) -> str:
        cpu = f" (+ {self.weights_cpu:.2f} GiB in CPU memory)" if self.weights_cpu >= 0.01 else ""
        return (f"weights {self.weights_gpu:.2f} GiB{cpu} + KV cache {self.kv_tokens:,} tokens {self.kv:.2f} GiB + "
                f"prefill {self.activations:.2f} GiB + CUDA context {self.overhead:.2f} GiB = {self.total:.2f} GiB")


def effective_concurrency(budget_tokens: int, serve) -> tuple[int, str]:
    """How many requests at their longest (max_prompt_tokens + max_tokens) run at once, and what decides
    it: the KV budget, or the serve.max_concurrent ceiling when memory would allow more."""
    per = serve.max_prompt_tokens + serve.max_tokens
    by_memory = budget_tokens // per
    if by_memory >= serve.max_concurrent:
        return serve.max_concurrent, f"the ceiling serve.max_concurrent (memory would allow {by_memory})"
    return by_memory, f"the KV budget: {budget_tokens:,} tokens / {per:,} per longest request"


def worst_case_kv_tokens(serve) -> int:
    """What the serving limits can hold at once: every slot at its longest prompt and answer."""
    return serve.max_concurrent * (serve.max_prompt_tokens + serve.max_tokens)


def card_gib(cap_gib: float | None = None) -> float | None:
    """The GPU's memory in GiB (at most model.gpu_memory_cap_gib), or None without one."""
    import torch
    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    return min(total, cap_gib) if cap_gib else total


def kv_budget(cfg: dict, serve, device: str, cap_gib: float | None = None) -> tuple[int, str]:
    """(KV-cache tokens the engine may reserve, where the number comes from). On a GPU: what is free once
    the model is loaded, less the prefill's activations and a margin; on a CPU: what the limits need."""
    if serve.kv_budget_tokens:
        return serve.kv_budget_tokens, "serve.kv_budget_tokens"
    if device == "cuda":
        from common.model.loading import gpu_free_bytes
        free = gpu_free_bytes(cap_gib)
        reserve = prefill_activation_bytes(cfg, serve.max_prefill_tokens) + int(KV_MARGIN_GIB * GIB)
        tokens = max(int((free - reserve) // kv_bytes_per_token(cfg)), 0)
        return tokens, f"{free / GIB:.2f} GiB free after loading, less {reserve / GIB:.2f} GiB for prefill"
    return worst_case_kv_tokens(serve), "what the limits need (no GPU)"


def serving_fit(cfg: dict, placement: Placement, serve) -> ServingFit:
    weights = weight_bytes(meta_model(cfg, placement), 2, placement.embed_on_cpu)
    tokens = worst_case_kv_tokens(serve)
    return ServingFit(weights["gpu"] / GIB, weights["cpu"] / GIB, tokens * kv_bytes_per_token(cfg) / GIB,
                      prefill_activation_bytes(cfg, serve.max_prefill_tokens) / GIB, CUDA_CONTEXT_GIB, tokens)


def choose_placement(cfg: dict, quantization: str, serve, card_gib: float | None) -> Placement:
    """serve.lm_head / serve.embedding: 'auto' keeps both as bitsandbytes leaves them while the limits
    fit the card, and turns both on (an untied head only) when they would not."""
    tied = cfg.get("tie_word_embeddings", False)
    head, embed = serve.lm_head, serve.embedding_device
    if quantization != "none" and not tied and card_gib is not None and "auto" in (head, embed):
        plain = Placement(quantization, head == "quantized", embed == "cpu")
        needed = serving_fit(cfg, plain, serve).total > card_gib
        head = ("quantized" if needed else "16bit") if head == "auto" else head
        embed = ("cpu" if needed else "gpu") if embed == "auto" else embed
    return Placement(quantization, head == "quantized" and not tied and quantization != "none",
                     embed == "cpu" and not tied)


def placement_for(model_dir: Path, quantization: str, serve, adapter: Path | None = None,
                  cap_gib: float | None = None) -> Placement:
    """The placement serving (and evaluation, which mirrors it) loads `model_dir` with on this machine."""
    from common.model.loading import pick_device, resolve_quantization
    shape = model_shape(model_dir) or {}
    placement = choose_placement(shape, resolve_quantization(quantization, pick_device()), serve, card_gib(cap_gib)) \
        if shape else Placement(resolve_quantization(quantization, pick_device()))
    saved = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("modules_to_save") if adapter else None
    saves_head = "lm_head" in (saved or [])  # an adapter's own trained head replaces the base's, in full precision
    return Placement(placement.quantization, placement.quantize_lm_head and not saves_head, placement.embed_on_cpu)



def load_as_served(cfg, model_dir: Path, adapter: Path | None = None, quantization: str | None = None):
    """The model as the service loads it on this machine, in eval mode, and its Placement: the card's cap
    (model.gpu_memory_cap_gib) applied first, then placement_for's choice and LLM.int8's outlier threshold
    (model.int8_threshold). The server, evaluate_model.py and benchmark.py --bare all load through here."""
    from common.model.loading import cap_gpu_memory, load_model
    cap = cfg.model.gpu_memory_cap_gib
    cap_gpu_memory(cap)
    p = placement_for(model_dir, quantization or cfg.serve.quantization, cfg.serve, adapter, cap)
    model = load_model(model_dir, p.quantization, adapter=adapter, quantize_lm_head=p.quantize_lm_head,
                       embed_on_cpu=p.embed_on_cpu, int8_threshold=cfg.model.int8_threshold).eval()
    return model, p

# ----------------------------------------------------------------------------- training
def trainable_params(cfg: dict, r: int, targets: list[str], modules_to_save: list[str]) -> int:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    lora = cfg["num_hidden_layers"] * sum(r * (i + o) for name, (i, o) in shapes.items() if name in targets)
    full = sum(cfg["vocab_size"] * h for m in modules_to_save if m in ("lm_head", "embed_tokens"))
    return lora + full


@dataclass
class TrainingFit:
    weights: float           # GiB
    trainable: float         # fp32 weights + grads + optimizer state of what is trained
    activations: float
    logits: float
    overhead: float = CUDA_CONTEXT_GIB

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        return (f"weights {self.weights:.2f} + trainable {self.trainable:.2f} + activations {self.activations:.2f} + "
                f"logits {self.logits:.2f} + CUDA context {self.overhead:.2f} = {self.total:.2f} GiB")


def training_fit(cfg: dict, quantization: str, tcfg, seq_len: int, answer_len: int) -> TrainingFit:
    """Peak of one LoRA training step: the base as train_qwen.py loads it, the adapters with their
    optimizer state, and the activations of a batch of `seq_len` tokens."""
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    weights = weight_bytes(meta_model(cfg, Placement(quantization)), 2)["gpu"]
    optimizer = 2 if "8bit" in tcfg.optimizer else 8  # Adam's two moments: fp32, or 8-bit blocks
    trainable = trainable_params(cfg, tcfg.lora_r, tcfg.target_modules, tcfg.modules_to_save) * (8 + optimizer)
    tokens = tcfg.batch_size * seq_len
    per_layer = tokens * (10 * h + 3 * inter) * 2  # 16-bit tensors autograd keeps for one layer's backward
    activations = (layers * tokens * h * 2 + per_layer) if tcfg.gradient_checkpointing else layers * per_layer
    # only the answer positions go through the output head (logits_to_keep), in fp32 with its softmax
    logits = tcfg.batch_size * (answer_len + 1) * cfg["vocab_size"] * 4 * 2
    return TrainingFit(weights / GIB, trainable / GIB, activations / GIB, logits / GIB)


# ----------------------------------------------------------------------------- RAM, stage by stage
# The process itself: Python, torch, transformers and peft take 0.4 GiB on a CPU (measured here); the CUDA
# runtime's host side (libraries, pinned buffers) adds 1-2 GiB on a GPU box. An estimate, not a count.
PROCESS_RAM_GIB = 2.5
RAM_PASS = 0.9  # PASS up to 90% of the box's RAM: the OS and the page cache need the rest, and there is no swap


@dataclass
class RamFit:
    stage: str
    parts: list[tuple[str, float]]  # (what, GiB)
    fix: str                        # what to do when it does not fit

    @property
    def total(self) -> float:
        return sum(gib for _, gib in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{what} {gib:.2f}" for what, gib in self.parts) + f" = {self.total:.2f} GiB"


def shard_bytes(model_dir: Path) -> list[int]:
    """The sizes of a model directory's safetensors files (none yet: the published sizes, ~4 GB shards)."""
    return [f.stat().st_size for f in Path(model_dir).glob("*.safetensors")]


def param_count(cfg: dict) -> int:
    """Parameters of a Qwen3-shaped model, from its config (embedding, head unless tied, layers)."""
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    return vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + layers * layer_params(cfg) + h


def largest_projection(cfg: dict) -> int:
    """Elements of the largest LoRA target (the MLP's gate/up/down: hidden x intermediate)."""
    return cfg["hidden_size"] * cfg["intermediate_size"]


HEAD_ROWS = 16384  # output-head rows per fp32 matmul in the merge's parity check: 256 MiB on the 8B, not 2.3 GiB


def merge_phases(target: int, layer: int, lora_layer: int, width: int) -> list[tuple[str, float]]:
    """(phase, GiB) of the streaming merge beside its process, from element counts: the largest targeted
    tensor, one decoder layer and its LoRA, the model's width. Its peak is the largest phase."""
    phases = [("the merge of the largest tensor in fp32 (W, B·A, their sum, the result)", 4 * target * 3.5),
              ("the layer check: a decoder layer and its LoRA in fp32, a block of head rows",
               4 * (layer + lora_layer) + 4 * HEAD_ROWS * width * 2)]
    return [(what, b / GIB) for what, b in phases]


def layer_params(cfg: dict) -> int:
    """Parameters of one decoder layer of a Qwen3-shaped model."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    return h * heads * hd * 2 + h * kv * hd * 2 + 2 * hd + 3 * h * inter + 2 * h


def ram_fits(cfg: dict, shards: list[int], serve_fit: ServingFit, workers: int, lora_r: int,
             targets: list[str], card_gib: float | None) -> list[RamFit]:
    """RAM each stage needs on a box with this card (None: no GPU) for a model of shape `cfg` stored in
    `shards` (bytes each; none yet: the published layout of ~4 GB shards)."""
    p, gib, n = PROCESS_RAM_GIB, (lambda b: b / GIB), param_count(cfg)
    shard = gib(max(shards) if shards else min(2 * n, 4e9))  # the Hub's Qwen3 shards are up to ~4 GB
    sixteen = gib(2 * n)
    lora_layer = trainable_params(cfg, lora_r, targets, []) // cfg["num_hidden_layers"]
    merge = max(merge_phases(largest_projection(cfg), layer_params(cfg), lora_layer, cfg["hidden_size"]),
                key=lambda phase: phase[1])
    # without a GPU the model trains in fp32 on the CPU; a GPU loads the base shard by shard
    train = [("a shard while loading", shard)] if card_gib else [("the model in fp32 on the CPU", 2 * sixteen)]
    # quantize_model.py's agreement check runs the 16-bit model where it fits: the GPU, else the CPU
    reference = 0.0 if card_gib and 1.2 * sixteen <= card_gib else sixteen
    return [
        RamFit("train", [("process", p), *train], "train on a GPU (the base is loaded shard by shard)"),
        RamFit("merge", [("process", p), merge], "merge on a box with more RAM (it streams tensor by tensor: "
               "its need does not grow with the model's size, only with one layer's)"),
        RamFit("quantize", [("process", p), ("the 16-bit model for the agreement check" if reference else
                                             "a shard while loading", reference or shard)],
               "quantize where the 16-bit model fits in RAM or GPU memory (the merged directory copies as it is)"),
        RamFit("serve", [("process", p * workers), ("embedding in CPU memory", serve_fit.weights_cpu * workers),
                         ("a shard while loading", shard * workers)],
               "fewer gunicorn workers (WORKERS), or keep the embedding on the GPU (serve.embedding_device gpu)"),
    ]


def machine_ram_gib(field: str = "MemTotal") -> float:
    """This machine's RAM in GiB: all of it (MemTotal), or what can be had now without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024**2
