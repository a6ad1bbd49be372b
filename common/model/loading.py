"""Model loading, one place: device, dtype, bitsandbytes 8-bit / 4-bit, base+adapter or merged.

    device: CUDA > MPS > CPU
    dtype:  bf16 where the GPU supports it, else fp16 on a GPU, fp32 on the CPU
    quant:  none | 8bit (LLM.int8) | 4bit (NF4, double quant, compute in the dtype above)
    lm_head: kept 16-bit by bitsandbytes, or quantized like the projections (quantize_lm_head)
    embedding: on the compute device, or in CPU memory (embed_on_cpu): a lookup of a few rows per
            step, whose output moves to the GPU, frees 1.16 GiB of GPU memory on Qwen3-8B
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
QUANT_MODES = ("none", "8bit", "4bit")
# train.method -> the precision train_qwen.py loads the frozen base in
TRAIN_METHODS = {"lora": "none", "qlora": "4bit", "lora8": "8bit"}


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str) -> torch.dtype:
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32  # CPU matmuls in bf16 are slow on most CPUs and fp16 is worse


def resolve_quantization(mode: str, device: str) -> str:
    """`auto` means 8-bit on CUDA (the 8B fits a 10 GB card only so) and full precision elsewhere."""
    if mode == "auto":
        return "8bit" if device == "cuda" else "none"
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be auto, {', '.join(QUANT_MODES)}; got '{mode}'")
    return mode


def quantization_config(mode: str, compute_dtype: torch.dtype, quantize_lm_head: bool = False,
                        int8_threshold: float | None = None):
    """The bitsandbytes config for a mode, or None for full precision. transformers keeps the output
    head 16-bit unless told which modules to skip: an empty list quantizes it too. int8_threshold
    (model.int8_threshold) is LLM.int8's outlier threshold: input features above it run in 16-bit beside
    the int8 matmul (6.0, bitsandbytes' default); 0.0 turns that decomposition off (faster, may cost accuracy)."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig
    skip = [] if quantize_lm_head else None
    if mode == "8bit":
        extra = {} if int8_threshold is None else {"llm_int8_threshold": int8_threshold}
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip, **extra)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantizes the quantization constants too: ~0.4 GB less on 8B
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def int8_threshold_of(model) -> float | None:
    """The outlier threshold a loaded model's 8-bit layers run with (a pre-quantized copy keeps the one it
    was made with); None when the model is not 8-bit."""
    quant = getattr(model.config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    return float(quant.get("llm_int8_threshold", 6.0)) if quant.get("load_in_8bit") else None


def skipped_modules(model, quant) -> list[str]:
    """The modules transformers leaves unquantized for this config (memory.py counts with the same list)."""
    from transformers.quantizers.base import HfQuantizer
    return HfQuantizer.get_modules_to_not_convert(model, quant.llm_int8_skip_modules, model._keep_in_fp32_modules)


def model_device(model) -> torch.device:
    """Where the model computes (its output head): inputs go there, even when the embedding sits in
    CPU memory (its hooks move the ids in and the vectors out)."""
    return next(model.get_output_embeddings().parameters()).device


def embedding_to_cpu(model) -> None:
    """Keep the input embedding in CPU memory: ids go to the CPU for the lookup, vectors come back."""
    embedding, device = model.get_input_embeddings(), model_device(model)
    if model.config.tie_word_embeddings:
        raise ValueError("the model ties its embedding to its output head: the embedding cannot leave the GPU")
    embedding.to("cpu")
    if device.type == "cuda" if isinstance(device, torch.device) else str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # give the 16-bit table's memory back: the KV budget is measured from what is free
    embedding.register_forward_pre_hook(lambda module, args: (args[0].to("cpu"),))
    embedding.register_forward_hook(lambda module, args, out: out.to(device))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:  # Qwen3 ships <|endoftext|> as pad; never fall back to the eos it learns
        tok.pad_token = "<|endoftext|>"
    return tok


def is_prequantized(path: str | Path) -> bool:
    try:
        return "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_path(adapter: str | Path) -> str:
    return json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_model(path: str | Path, quantization: str = "none", device: str | None = None,
               adapter: str | Path | None = None, dtype: torch.dtype | None = None,
               quantize_lm_head: bool = False, embed_on_cpu: bool = False, int8_threshold: float | None = None):
    """Load a merged model, or a base model plus a LoRA adapter, ready for inference or training.

    `path` may be an adapter directory itself; its base is then read from adapter_config.json.
    """
    from transformers import AutoModelForCausalLM
    if adapter is None and is_adapter_dir(path):
        adapter, path = path, adapter_base_path(path)
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    mode = resolve_quantization(quantization, device)
    quant = quantization_config(mode, dtype, quantize_lm_head, int8_threshold)
    # A pre-quantized copy (quantize_model.py) carries its own config; passing None would override it.
    kwargs = {"quantization_config": quant} if quant is not None and not is_prequantized(path) else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": device},
                                                 low_cpu_mem_usage=True, **kwargs)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    if embed_on_cpu and device != "cpu":
        embedding_to_cpu(model)
    head = type(model.get_output_embeddings()).__name__
    log.info("loaded %s%s on %s (%s, quantization %s, lm_head %s, embedding on %s)", path,
             f" + adapter {adapter}" if adapter else "", device, str(dtype).removeprefix("torch."), mode, head,
             "cpu" if embed_on_cpu else device)
    return model


def cap_gpu_memory(cap_gib: float | None) -> None:
    """model.gpu_memory_cap_gib: this process may allocate at most that much of the GPU (a 10 GB card's
    budget on a bigger one). A no-op without a GPU or a cap."""
    if cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap_gib * 1024**3 / total, 1.0))


def gpu_free_bytes(cap_gib: float | None = None) -> int:
    """What this process can still allocate on the GPU: the device's free memory, within the cap."""
    torch.cuda.empty_cache()  # blocks the allocator holds but nothing uses (a load's leftovers) count as free
    free = torch.cuda.mem_get_info()[0]
    if cap_gib:
        free = min(free, int(cap_gib * 1024**3) - torch.cuda.memory_reserved())
    return max(free, 0)



def peak_memory(device: str) -> dict:
    """This process's peak: on a GPU the allocator's peak, its reserved peak and the CUDA context (what a card
    must hold beyond the peak), else the peak RSS."""
    if device != "cuda":
        import resource
        return {"peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}  # KiB
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 1024**3, 2),
            "cuda_context_gib": round(cuda_context_bytes() / 1024**3, 2)}


def cuda_context_bytes() -> int:
    """What the card holds beyond this process's PyTorch pool: the CUDA context and the libraries'
    workspaces (0.3 to 0.6 GiB), which a card's budget must hold on top of the allocator's peak. Read as
    the device's used memory less the pool, so another process on the same card counts too."""
    free, total = torch.cuda.mem_get_info()
    return max(total - free - torch.cuda.memory_reserved(), 0)

def fitting_device(model_dir: Path, cap_gib: float | None = None) -> str:
    """pick_device(), but the CPU when the 16-bit weights (+20%) do not fit the GPU's free memory:
    Qwen3-8B is 16.4 GB in bf16 and a 10 GB card cannot hold it: quantize_model.py's 16-bit reference
    then runs on the CPU."""
    device = pick_device()
    if device != "cuda":
        return device
    need = 1.2 * sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    free = gpu_free_bytes(cap_gib)
    if need <= free:
        return device
    print(f"note: {model_dir.name} needs ~{need / 2**30:.1f} GiB in 16-bit and the GPU has {free / 2**30:.1f} GiB "
          f"free, so this runs on the CPU (fp32)")
    return "cpu"


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
