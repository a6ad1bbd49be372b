"""Merge a LoRA adapter into its 16-bit base: a plain Hugging Face model for serving, vLLM or quantizing.

    python merge_lora.py                                   # the newest run in models/ -> models/<run>-merged/
    python merge_lora.py --adapter models/news-qlora --output models/news-merged --force
    python merge_lora.py --tolerance 0.05                  # the parity bound for a bf16 merge on a GPU

Writes <runs_dir>/<run>-merged/: safetensors shards (merge.shard_size), tokenizer, chat template,
generation config, labels.json (copied from the run) and manifest.json (written last). The base is
read from the adapter's adapter_config.json and loaded in 16-bit (fp32 on the CPU), never quantized:
a QLoRA / 8-bit LoRA adapter is merged into the 16-bit base too. Before the directory is renamed into
place, the saved model is loaded back and its logits are compared with base+adapter on
merge.verify_items prompts from the data; a difference beyond merge.tolerance, or a different
best label, fails the merge and leaves nothing at the target.
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from common.cli import add_force, run_stage
from common.config import ConfigError, UserError
from common.text.prepared import held_out_records, read_labels
from common.model.loading import (
    adapter_base_path,
    cap_gpu_memory,
    fitting_device,
    free_memory,
    is_adapter_dir,
    load_model,
    load_tokenizer,
    pick_dtype,
)
from common.model.files import check_model_dir, copy_extras, dir_size, newest_run, save_atomically, write_manifest
from common.model.label_scoring import score_label_ids
from common.text.prompts import probe_records, records_prompt_ids

TAIL_POSITIONS = 16  # logits compared at each prompt's last positions: every layer feeds them, and
#                      the last one is where the answer starts; all positions x 151,936 would be GBs


class MergeError(UserError):
    """The merged model does not reproduce base+adapter: nothing is written."""


# ----------------------------------------------------------------------------- what to merge
def find_adapter(cfg) -> Path:
    adapter = cfg.resolve(cfg.merge.adapter) if cfg.merge.adapter else newest_run(cfg.resolve(cfg.train.runs_dir))
    if not is_adapter_dir(adapter):
        raise ConfigError(f"{adapter} holds no adapter_config.json; pass --adapter with a run directory "
                          f"of train_qwen.py")
    return adapter


def find_base(cfg, adapter: Path) -> Path:
    base = cfg.resolve(adapter_base_path(adapter))  # relative paths are relative to the repo root
    if not (base / "config.json").is_file():
        raise ConfigError(f"the adapter's base {base} (adapter_config.json: base_model_name_or_path) is not a "
                          f"model directory; download it, or fix base_model_name_or_path")
    return base


def training_method(run: Path) -> str | None:
    """lora / qlora / lora8 from train_info.json, else config.resolved.yaml (a checkpoint has neither)."""
    info = run / "train_info.json"
    if info.is_file():
        return json.loads(info.read_text(encoding="utf-8")).get("method")
    resolved = run / "config.resolved.yaml"
    if resolved.is_file():
        return (yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}).get("train", {}).get("method")
    return None


def verify_prompts(cfg, tokenizer, labels: list[str] | None, n: int) -> tuple[list[list[int]], str]:
    """n prompts through the prompt contract, from the test (else val) split, else the task's own words."""
    records, source = held_out_records(cfg.resolve(cfg.data.processed_dir), labels, n)
    if not records:
        records, source = probe_records(labels, cfg.prompt)[:n], "the labels" if labels else "the system prompt"
    return records_prompt_ids(tokenizer, records, labels, cfg.prompt), source


def stored_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype the weights are stored in (config.json), so a bf16 base gives a bf16 merge, not fp32."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


# ----------------------------------------------------------------------------- parity
@torch.no_grad()
def tail_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[TAIL_POSITIONS, V] fp32 logits per prompt, one prompt at a time (no padding to differ)."""
    device = model.get_input_embeddings().weight.device
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out.append(model(input_ids=ids, logits_to_keep=TAIL_POSITIONS).logits[0].float().cpu())
    return out


def reference(model, tokenizer, prompts: list[list[int]], labels: list[str] | None) -> dict:
    """What a model answers on the prompts: tail logits and, for a classifier, its best labels."""
    ref = {"logits": tail_logits(model, prompts)}
    if labels:
        ref["best"] = score_label_ids(model, tokenizer, prompts, labels).best()[0]
    return ref


def compare(merged: dict, expected: dict, tolerance: float) -> dict:
    diffs = [(a - b).abs().max().item() for a, b in zip(merged["logits"], expected["logits"])]
    worst = max(diffs, key=lambda d: math.inf if math.isnan(d) else d)  # a non-finite logit counts as worst
    same = [a == b for a, b in zip(merged.get("best", []), expected.get("best", []))]
    result = {"max_abs_diff": worst, "tolerance": tolerance, "labels_agree": sum(same), "prompts": len(diffs)}
    if math.isnan(worst):
        raise MergeError(f"the logits on prompt {diffs.index(worst)} are not finite (NaN or inf): the adapter or "
                         f"its base holds corrupt values; nothing was written")
    if worst > tolerance:
        raise MergeError(f"the merged model's logits differ from base+adapter by {worst:.3g} on prompt "
                         f"{diffs.index(worst)} (tolerance {tolerance:g}); "
                         f"nothing was written")
    if not all(same):
        raise MergeError(f"the merged model picks a different label than base+adapter on {len(same) - sum(same)} "
                         f"of {len(same)} prompts; nothing was written")
    return result


# ----------------------------------------------------------------------------- the merge
def explain_method(method: str | None) -> None:
    bits = {"qlora": "4-bit NF4", "lora8": "8-bit"}.get(method or "")
    if bits:
        print(f"note: this adapter was trained on a {bits} base ({method}); it is merged into the 16-bit base, "
              f"because adding the LoRA update to quantized weights would round most of it away, and a plain "
              f"16-bit model is what vLLM and quantize_model.py take. Parity is checked against the 16-bit base "
              f"+ adapter; the merged model is a little more precise than the base the adapter was trained on.")


def merge_into(tmp: Path, base: Path, adapter: Path, device: str, shard_size: str, check) -> dict:
    """Merge, save into tmp, load the saved model back and run `check` on it; returns the timings."""
    t = {"start": time.time()}
    model = load_model(base, device=device, adapter=adapter, dtype=pick_dtype(device)).eval()
    t["load"] = time.time()
    expected = check(model)
    t["reference"] = time.time()
    # W + (alpha/r)·B·A into each target; modules_to_save (the trained lm_head) replace theirs. On a base
    # with tied embeddings (Qwen3-0.6B..4B) peft also unties them, or the saved model would drop the head.
    model = model.merge_and_unload()
    save_as = stored_dtype(base)
    if save_as is not None and save_as != model.dtype and save_as.itemsize == 2:
        model = model.to(save_as)  # a bf16 base merged in fp32 on the CPU is saved in bf16, its own size
    t["merge"] = time.time()
    model.save_pretrained(tmp, max_shard_size=shard_size)
    copy_extras([adapter, base], tmp)
    t["save"] = time.time()
    del model
    free_memory(device)
    merged = load_model(tmp, device=device, dtype=pick_dtype(device)).eval()
    result = check(merged, expected)
    t["verify"] = time.time()
    del merged
    free_memory(device)
    steps = ["load", "reference", "merge", "save", "verify"]
    times = {s: t[s] - t[p] for p, s in zip(["start", *steps], steps)}
    return {**result, "seconds": times}


def run(cfg, force: bool = False) -> dict:
    """Merge merge.adapter (else the newest run) into its base, check parity, write the merged model."""
    m = cfg.merge
    if m.verify_items < 1:
        raise ConfigError("merge.verify_items must be at least 1: an unchecked merge is not written")
    adapter = find_adapter(cfg)
    base = find_base(cfg, adapter)
    target = cfg.resolve(m.output) if m.output else cfg.resolve(cfg.train.runs_dir) / f"{adapter.name}-merged"
    if target.exists() and not force:  # before minutes of loading; save_atomically checks it again
        raise ConfigError(f"{target} exists; pass --force to replace it")
    method = training_method(adapter)
    explain_method(method)
    cap_gpu_memory(cfg.model.gpu_memory_cap_gib)
    device = fitting_device(base, cfg.model.gpu_memory_cap_gib)
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base)
    labels = read_labels(adapter, cfg.resolve(cfg.data.processed_dir))
    prompts, source = verify_prompts(cfg, tokenizer, labels, m.verify_items)

    def check(model, expected=None):
        got = reference(model, tokenizer, prompts, labels)
        return got if expected is None else compare(got, expected, m.tolerance)

    figures: dict = {}

    def write(tmp: Path) -> None:
        figures.update(merge_into(tmp, base, adapter, device, m.shard_size, check))
        problems = [f.message for f in check_model_dir(tmp) if f.level == "fail"]
        if problems:
            raise MergeError(f"the merged directory is incomplete: {problems[0]}")
        write_manifest(tmp, source="merge", adapter=str(adapter), base=str(base), method=method,
                       parity={k: figures[k] for k in ("max_abs_diff", "tolerance", "labels_agree", "prompts")})

    start = time.time()
    save_atomically(target, write, force)
    return {**figures, "target": target, "adapter": adapter, "base": base, "device": device, "source": source,
            "classification": labels is not None, "size": dir_size(target), "total_s": time.time() - start}


def report(f: dict) -> None:
    agree = f", best label agrees on {f['labels_agree']}/{f['prompts']}" if f["classification"] else ""
    print(f"parity on {f['prompts']} prompts ({f['source']}): max |logit diff| {f['max_abs_diff']:.3g} "
          f"(tolerance {f['tolerance']:g}){agree}")
    shards = len(list(f["target"].glob("*.safetensors")))
    print(f"wrote {f['target']}/ ({shards} safetensors shard{'s' * (shards > 1)}, tokenizer, chat template, "
          f"generation config, labels.json, manifest.json): {f['size'] / 1e6:.1f} MB")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in f["seconds"].items())
    print(f"merged {f['adapter'].name} into {f['base'].name} on {f['device']} in {f['total_s']:.1f}s ({steps})")


def cli_run(cfg, args) -> dict:
    try:
        return run(cfg, args.force)
    except RuntimeError as e:  # an adapter made for another base: peft's shape mismatch, first line only
        raise MergeError(f"could not merge the adapter into its base: {str(e).strip().splitlines()[0]}") from None


def main(argv=None) -> int:
    return run_stage("merge_lora", __doc__, cli_run, section="merge", add_args=add_force, report=report,
                     argv=argv)


if __name__ == "__main__":
    sys.exit(main())
