"""Merge a LoRA adapter into its 16-bit base: a plain Hugging Face model for serving, vLLM or quantizing.

    python merge_lora.py                                   # the newest run in models/ -> models/<run>-merged/
    python merge_lora.py --adapter models/news-qlora --output models/news-merged --force
    python merge_lora.py --tolerance 0.3                   # a tighter parity bound than the dtype's default

Writes <runs_dir>/<run>-merged/: the base's safetensors shards and index, merged, tokenizer, chat
template, generation config, labels.json and calibration.json (copied from the run), manifest.json (last). The
merge streams (common/model/lora_merge.py): one base shard at a time, each LoRA target becomes
W + (alpha/r)·B·A in fp32 (on the GPU when there is one) rounded once to the base's dtype, the
modules_to_save replace theirs, every other tensor is copied byte for byte; peak RAM ~3.4 GiB
whatever the model's size. A QLoRA / 8-bit LoRA adapter is merged into the 16-bit base too.
Before the directory is renamed into place, the merged shards are proved against base+adapter layer by
layer from disk (and, for a model under 1 GiB in fp32, both loaded whole as well) on merge.verify_items
prompts from the data; a logit difference beyond merge.tolerance, or a different best label, fails the
merge and leaves nothing at the target.
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

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
    pick_device,
    pick_dtype,
)
from common.model.files import check_model_dir, copy_extras, dir_size, newest_run, save_atomically, write_manifest
from common.model.label_scoring import label_tokens, score_label_ids
from common.model.lora_merge import (
    TAIL_POSITIONS,
    check_ram,
    layer_parity,
    merge_shards,
    read_adapter,
    weight_map,
    whole_check,
)
from common.model.memory import machine_ram_gib
from common.text.prompts import probe_records, records_prompt_ids


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


def default_tolerance(base: Path) -> float:
    """merge.tolerance's default by the base's stored dtype: an fp32 base merges exactly up to float
    rounding; a 16-bit one (bf16 Qwen3) rounds every merged weight to 8 bits, and that compounds through
    the layers (0.212 on the 8B shape with random weights, docs/merge.md)."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    return 0.001 if (config.get("dtype") or config.get("torch_dtype")) == "float32" else 0.5


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


def whole_model_parity(tmp: Path, base: Path, adapter: Path, check, cap_gib: float | None) -> dict:
    """The small-model check: base+adapter and the merged directory each loaded whole by from_pretrained."""
    device = fitting_device(base, cap_gib)
    model = load_model(base, device=device, adapter=adapter, dtype=pick_dtype(device)).eval()
    expected = check(model)
    del model
    free_memory(device)
    merged = load_model(tmp, device=device, dtype=pick_dtype(device)).eval()
    result = check(merged, expected)
    del merged
    free_memory(device)
    return result


def merge_into(tmp: Path, base: Path, plan, device: str, verify: dict) -> dict:
    """Merge shard by shard into tmp, then prove it layer by layer (and whole, for a small model)."""
    t = {"start": time.time()}
    with tqdm(total=len(set(weight_map(base).values())), desc="merge", unit="shard") as bar:
        counts = merge_shards(base, plan, tmp, device, bar)
    copy_extras([plan.path, base], tmp)
    t["merge"] = time.time()
    layers = json.loads((base / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    with tqdm(total=2 * layers, desc="parity", unit="layer") as bar:
        expected, got = layer_parity(base, plan, tmp, verify["prompts"], verify["cand"], device, bar)
    result = {"layers": compare(got, expected, verify["tolerance"])}
    t["verify_layers"] = time.time()
    if verify["whole"] is not None:
        result["whole"] = whole_model_parity(tmp, base, plan.path, verify["whole"], verify["cap_gib"])
        t["verify_whole"] = time.time()
    steps = [s for s in t if s != "start"]
    times = {s: t[s] - t[p] for p, s in zip(["start", *steps], steps)}
    return {**result, **counts, "seconds": times}


def run(cfg, force: bool = False) -> dict:
    """Merge merge.adapter (else the newest run) into its base, check parity, write the merged model."""
    m = cfg.merge
    if m.verify_items < 1:
        raise ConfigError("merge.verify_items must be at least 1: an unchecked merge is not written")
    adapter = find_adapter(cfg)
    base = find_base(cfg, adapter)
    target = cfg.resolve(m.output) if m.output else cfg.resolve(cfg.train.runs_dir) / f"{adapter.name}-merged"
    if target.exists() and not force:  # before minutes of merging; save_atomically checks it again
        raise ConfigError(f"{target} exists; pass --force to replace it")
    method = training_method(adapter)
    explain_method(method)
    plan = read_adapter(adapter, base)  # refuses what W + scale·B·A cannot reproduce, before any writing
    whole = whole_check(base)
    need = check_ram(base, plan, whole, machine_ram_gib("MemAvailable"))
    cap_gpu_memory(cfg.model.gpu_memory_cap_gib)
    device = pick_device()  # one tensor, one layer at a time: any GPU holds that
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base)
    labels = read_labels(adapter, cfg.resolve(cfg.data.processed_dir))
    prompts, source = verify_prompts(cfg, tokenizer, labels, m.verify_items)

    tolerance = m.tolerance if m.tolerance is not None else default_tolerance(base)

    def check(model, expected=None):
        got = reference(model, tokenizer, prompts, labels)
        return got if expected is None else compare(got, expected, tolerance)

    verify = {"prompts": prompts, "cand": label_tokens(tokenizer, labels) if labels else None,
              "tolerance": tolerance, "whole": check if whole else None, "cap_gib": cfg.model.gpu_memory_cap_gib}
    figures: dict = {}

    def write(tmp: Path) -> None:
        figures.update(merge_into(tmp, base, plan, device, verify))
        problems = [f.message for f in check_model_dir(tmp) if f.level == "fail"]
        if problems:
            raise MergeError(f"the merged directory is incomplete: {problems[0]}")
        checks = [figures[k] for k in ("layers", "whole") if k in figures]
        parity = {**max(checks, key=lambda c: c["max_abs_diff"]), "checks": [k for k in ("layers", "whole")
                                                                              if k in figures]}
        write_manifest(tmp, source="merge", adapter=str(adapter), base=str(base), method=method, parity=parity)

    start = time.time()
    save_atomically(target, write, force)
    return {**figures, "target": target, "adapter": adapter, "base": base, "device": device, "source": source,
            "classification": labels is not None, "size": dir_size(target), "total_s": time.time() - start,
            "ram_estimate_gib": need, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def report(f: dict) -> None:
    for key, how in (("layers", "layer by layer from disk"), ("whole", "whole models loaded back")):
        if key in f:
            c = f[key]
            agree = f", best label agrees on {c['labels_agree']}/{c['prompts']}" if f["classification"] else ""
            print(f"parity on {c['prompts']} prompts ({f['source']}), {how}: max |logit diff| "
                  f"{c['max_abs_diff']:.3g} (tolerance {c['tolerance']:g}){agree}")
    shards = len(list(f["target"].glob("*.safetensors")))
    print(f"wrote {f['target']}/ ({shards} safetensors shard{'s' * (shards > 1)}, tokenizer, chat template, "
          f"generation config, labels.json, calibration.json, manifest.json): {f['size'] / 1e6:.1f} MB")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in f["seconds"].items())
    print(f"merged {f['adapter'].name} into {f['base'].name} on {f['device']} in {f['total_s']:.1f}s ({steps}); "
          f"{f['merged']} tensors merged, {f['replaced']} replaced, {f['copied']} copied; peak RSS "
          f"{f['peak_rss_gib']:.2f} GiB (estimated {f['ram_estimate_gib']:.1f})")


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
