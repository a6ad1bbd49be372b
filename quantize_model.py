"""Save a pre-quantized bitsandbytes copy of the merged model, which loads without quantizing at start-up.

    python quantize_model.py                       # the newest models/<run>-merged -> models/<run>-merged-int8/
    python quantize_model.py --bits 4              # NF4 with double quantization -> models/<run>-merged-nf4/
    python quantize_model.py --model models/news-merged --output models/news-int8 --force

The 16-bit model is loaded with the bitsandbytes config (common/model/loading.py) and saved as it is:
config.json carries its quantization_config, so a plain AutoModelForCausalLM.from_pretrained(copy)
comes back quantized. Beside the weights: tokenizer, chat template, generation config, labels.json,
calibration.json, manifest.json (written last); the directory appears only complete (written beside it, then renamed).
Before the rename the copy is loaded back, must hold only bitsandbytes layers and answer a prompt.
Reports the size on disk (copy vs source), the load time (copy vs quantizing at load time) and how
often its best label agrees with the 16-bit model's on the test split (quantize.compare_items).
Make the copy on the kind of machine that serves it: on the CPU the layers that stay unquantized
(embeddings, norms, lm_head) are kept in fp32, and the 4-bit compute dtype is fp32.
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import json
import sys
import time
from pathlib import Path

import torch

from common.cli import add_force, run_stage
from common.config import ConfigError, UserError
from common.model.files import check_model_dir, copy_extras, newest_merged, save_atomically, write_manifest
from common.model.label_scoring import score_label_ids
from common.model.loading import cap_gpu_memory, fitting_device, free_memory, load_model, load_tokenizer
from common.model.memory import GIB, PROCESS_RAM_GIB, machine_ram_gib, shard_bytes
from common.text.prepared import held_out_records, read_labels
from common.text.prompts import probe_records, records_prompt_ids

MODES = {8: ("8bit", "int8", "Linear8bitLt"), 4: ("4bit", "nf4", "Linear4bit")}  # bits -> load mode, suffix, layer


class QuantizeError(UserError):
    """The quantized copy does not load quantized or does not answer: nothing is written."""


# ----------------------------------------------------------------------------- what to quantize
def find_source(cfg) -> Path:
    q = cfg.quantize
    source = cfg.resolve(q.model) if q.model else newest_merged(cfg.resolve(cfg.train.runs_dir))
    problems = [f.message for f in check_model_dir(source) if f.level == "fail"]
    if problems:
        raise ConfigError(f"{source} is not a complete model ({problems[0]}); pass --model with a merged model")
    if (source / "adapter_config.json").is_file():
        raise ConfigError(f"{source} is an adapter; merge it first: python merge_lora.py --adapter {source}")
    if "quantization_config" in json.loads((source / "config.json").read_text(encoding="utf-8")):
        raise ConfigError(f"{source} is already quantized; pass --model with the 16-bit merged model")
    return source


def quant_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # bitsandbytes runs on CUDA and the CPU, not MPS


# ----------------------------------------------------------------------------- checks
def unquantized_linears(model, head_too: bool) -> list[str]:
    """Linear layers bitsandbytes left in full precision; lm_head stays so unless asked (quantize.lm_head)."""
    return [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and (head_too or name != "lm_head")]


def check_quantized(model, layer: str, head_too: bool) -> int:
    """The number of `layer` modules; raises when the copy did not come back quantized."""
    count = sum(type(m).__name__ == layer for m in model.modules())
    plain = unquantized_linears(model, head_too)
    if count == 0 or plain:
        raise QuantizeError(f"the saved copy loads with {count} {layer} layers and full-precision {plain[:3]}: "
                            f"it did not come back quantized; nothing was written")
    return count


def answer(model, tokenizer, prompts: list[list[int]], labels: list[str] | None) -> dict:
    """The best label per prompt and every label's probability (as /v1/classify gives them); for a chat
    model, finite next-token logits on the first prompt."""
    if labels:
        scores = score_label_ids(model, tokenizer, prompts, labels)
        if not torch.isfinite(scores.logprobs).all():
            raise QuantizeError("the quantized copy gives non-finite label scores; nothing was written")
        return {"picked": scores.best()[0], "probs": scores.logprobs.float().softmax(-1).cpu()}
    ids = torch.tensor([prompts[0]], device=model.device)
    with torch.no_grad():
        if not torch.isfinite(model(input_ids=ids, logits_to_keep=1).logits).all():
            raise QuantizeError("the quantized copy gives non-finite logits; nothing was written")
    return {"picked": [], "probs": None}


class OutlierWatch:
    """While the 8-bit copy answers: the largest input to its 8-bit layers, and how many of their calls
    had a feature column past LLM.int8's outlier threshold (`at`: bitsandbytes' default 6.0). Those are
    the columns threshold 6.0 multiplies in 16 bits and 0.0 quantizes with the rest, so with none of
    them the two thresholds compute the same; emergent outliers are a trait of large models."""

    def __init__(self, model, at: float = 6.0):
        self.at, self.peak, self.calls, self.with_outliers, self.most_columns = at, 0.0, 0, 0, 0
        self.hooks = [m.register_forward_pre_hook(self.see) for m in model.modules()
                      if type(m).__name__ == "Linear8bitLt"]

    def see(self, module, args) -> None:
        x = args[0].detach()
        columns = x.abs().reshape(-1, x.shape[-1]).amax(0)
        outliers = int((columns >= self.at).sum())
        self.peak, self.calls = max(self.peak, float(columns.max())), self.calls + 1
        self.with_outliers, self.most_columns = self.with_outliers + (outliers > 0), max(self.most_columns, outliers)

    def figures(self) -> dict:
        for hook in self.hooks:
            hook.remove()
        return {"largest_input": round(self.peak, 2), "threshold": self.at, "layer_calls": self.calls,
                "calls_with_outlier_columns": self.with_outliers, "most_outlier_columns": self.most_columns}


def weights_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


# ----------------------------------------------------------------------------- the copy
def quantize_into(tmp: Path, source: Path, bits: int, head: bool, device: str, threshold: float, ask) -> dict:
    """Quantize at load, save, load the saved copy plainly, check its layers and let it answer."""
    from transformers import AutoModelForCausalLM
    mode, _, layer = MODES[bits]
    start = time.time()
    model = load_model(source, quantization=mode, device=device, quantize_lm_head=head, int8_threshold=threshold)
    quantize_load_s = time.time() - start
    model.save_pretrained(tmp)  # bitsandbytes weights + quantization_config in config.json
    copy_extras([source], tmp)
    del model
    free_memory(device)
    start = time.time()
    copy = AutoModelForCausalLM.from_pretrained(tmp, device_map={"": device}).eval()  # no quantization config given
    copy_load_s = time.time() - start
    layers = check_quantized(copy, layer, head)
    watch = OutlierWatch(copy, threshold or 6.0) if bits == 8 else None
    answers = ask(copy)
    outliers = watch.figures() if watch else None
    del copy
    free_memory(device)
    return {"quantize_load_s": quantize_load_s, "copy_load_s": copy_load_s, "layers": layers, "answers": answers,
            "int8_outliers": outliers}


def reference_dtype(source: Path, device: str) -> torch.dtype | None:
    """The 16-bit model's dtype for the agreement check: as loading picks it (fp32 on the CPU) where that
    fits the RAM free now, else the stored 16-bit dtype (the 8B: 15.3 GiB instead of 30.5); refused before
    anything loads when neither fits."""
    if device != "cpu":
        return None
    stored, free = sum(shard_bytes(source)) / GIB, machine_ram_gib("MemAvailable")
    if 2 * stored + PROCESS_RAM_GIB <= free:
        return None
    if stored + PROCESS_RAM_GIB <= free:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        print(f"note: the 16-bit reference runs on the CPU in its stored 16-bit dtype ({stored:.1f} GiB), since "
              f"fp32 ({2 * stored:.1f} GiB) would not fit the {free:.1f} GiB of RAM free")
        return torch.float16 if name == "float16" else torch.bfloat16
    raise UserError(f"the agreement check needs the 16-bit model ({stored:.1f} GiB) in RAM and {free:.1f} GiB is "
                    f"free; quantize on a box where it fits in RAM or GPU memory (verify_setup.py: RAM quantize)")


def sixteen_bit_answers(source: Path, tokenizer, prompts: list[list[int]], labels: list[str],
                        cap_gib: float | None = None) -> dict:
    device = fitting_device(source, cap_gib)
    model = load_model(source, device=device, dtype=reference_dtype(source, device)).eval()
    answers = answer(model, tokenizer, prompts, labels)
    del model
    free_memory(device)
    return answers


def agreement(quantized: dict, reference: dict, truth: list[int]) -> dict:
    """How often the copy's best label is the 16-bit model's, the accuracy of each, and how far the copy
    moves the label probabilities /v1/classify reports (mean and largest |delta p| over items x labels)."""
    picked, ref, n = quantized["picked"], reference["picked"], len(reference["picked"])
    delta = (quantized["probs"] - reference["probs"]).abs()
    return {"items": n, "agreement": sum(a == b for a, b in zip(picked, ref)) / n,
            "accuracy_16bit": sum(a == b for a, b in zip(ref, truth)) / n,
            "accuracy_quantized": sum(a == b for a, b in zip(picked, truth)) / n,
            "mean_abs_delta_p": round(float(delta.mean()), 5), "max_abs_delta_p": round(float(delta.max()), 5)}


def run(cfg, force: bool = False) -> dict:
    """A pre-quantized copy of quantize.model (else the newest merge), checked before it is renamed into place."""
    q = cfg.quantize
    if q.bits not in MODES:
        raise ConfigError(f"quantize.bits must be 8 (LLM.int8) or 4 (NF4), got {q.bits}")
    if q.lm_head not in ("quantized", "16bit"):
        raise ConfigError(f"quantize.lm_head must be quantized or 16bit, got '{q.lm_head}'")
    source = find_source(cfg)
    cap_gpu_memory(cfg.model.gpu_memory_cap_gib)
    mode, suffix, _ = MODES[q.bits]
    tied = json.loads((source / "config.json").read_text(encoding="utf-8")).get("tie_word_embeddings", False)
    head = q.lm_head == "quantized" and not tied
    target = cfg.resolve(q.output) if q.output else source.parent / f"{source.name}-{suffix}"
    if target.exists() and not force:  # before minutes of loading; save_atomically checks it again
        raise ConfigError(f"{target} exists; pass --force to replace it")
    tokenizer = load_tokenizer(source)
    processed = cfg.resolve(cfg.data.processed_dir)
    labels = read_labels(source, processed)
    # the agreement check runs on the held-out items; without them (or for a chat model) a probe must answer
    items, split = held_out_records(processed, labels, q.compare_items) if labels else ([], None)
    prompts = records_prompt_ids(tokenizer, items or probe_records(labels, cfg.prompt), labels, cfg.prompt)
    device, figures = quant_device(), {}

    def write(tmp: Path) -> None:
        # The 16-bit answers first: this load also pays the process's one-time set-up (~2 s), so the two
        # timed loads below compare loading, not importing.
        cap = cfg.model.gpu_memory_cap_gib
        reference = sixteen_bit_answers(source, tokenizer, prompts, labels, cap) if items else None
        figures.update(quantize_into(tmp, source, q.bits, head, device, cfg.model.int8_threshold,
                                     lambda m: answer(m, tokenizer, prompts, labels)))
        if items:
            figures.update(agreement(figures.pop("answers"), reference, [labels.index(r["label"]) for r in items]),
                           split=split)
        write_manifest(tmp, source="quantize", model=str(source), quantization=mode, lm_head_quantized=head,
                       int8_threshold=cfg.model.int8_threshold if q.bits == 8 else None,
                       int8_outliers=figures.get("int8_outliers"),
                       **{k: figures[k] for k in ("agreement", "mean_abs_delta_p", "items") if k in figures})

    start = time.time()
    save_atomically(target, write, force)
    return {**figures, "source": source, "target": target, "mode": mode, "device": device, "lm_head": head,
            "copy_bytes": weights_size(target), "source_bytes": weights_size(source), "total_s": time.time() - start}


def report(f: dict) -> None:
    ratio = f["copy_bytes"] / f["source_bytes"]
    print(f"size on disk (weights): {f['copy_bytes'] / 1e6:.1f} MB vs {f['source_bytes'] / 1e6:.1f} MB 16-bit "
          f"({100 * ratio:.0f}%)")
    print(f"load time on {f['device']}: {f['copy_load_s']:.2f}s pre-quantized vs {f['quantize_load_s']:.2f}s "
          f"quantizing the 16-bit model at load; {f['layers']} bitsandbytes layers "
          f"(lm_head {'quantized' if f['lm_head'] else '16-bit'})")
    if "agreement" in f:
        print(f"label agreement with the 16-bit model on {f['items']} items of {f['split']}: {f['agreement']:.3f} "
              f"(accuracy 16-bit {f['accuracy_16bit']:.3f}, {f['mode']} {f['accuracy_quantized']:.3f}); label "
              f"probabilities moved by {f['mean_abs_delta_p']:.4f} on average, {f['max_abs_delta_p']:.4f} at most")
    else:
        print("label agreement not measured: no classification labels or no test split (data.processed_dir)")
    if f.get("int8_outliers"):
        o = f["int8_outliers"]
        print(f"inputs to the 8-bit layers peaked at {o['largest_input']}; {o['calls_with_outlier_columns']} of "
              f"{o['layer_calls']} layer calls had a column at or past {o['threshold']} (at most "
              f"{o['most_outlier_columns']})" + ("" if o["calls_with_outlier_columns"] else
                                                 ": outlier thresholds 0.0 and 6.0 compute the same on this model"))
    print(f"wrote {f['target']}/ (safetensors, tokenizer, chat template, generation config, labels.json, "
          f"calibration.json, manifest.json) in {f['total_s']:.1f}s")


def cli_run(cfg, args) -> dict:
    try:
        return run(cfg, args.force)
    except ImportError as e:  # bitsandbytes missing or too old for this device
        raise QuantizeError(f"bitsandbytes quantization is not available here ({e}); "
                            f"pip install bitsandbytes") from None


def main(argv=None) -> int:
    return run_stage("quantize_model", __doc__, cli_run, section="quantize", add_args=add_force, report=report,
                     argv=argv)


if __name__ == "__main__":
    sys.exit(main())
