"""Merge a LoRA adapter into its base a tensor at a time, and prove the merge a decoder layer at a time:
peak RAM is set by the largest tensor and one decoder layer, not by the model (Qwen3-8B: 3.35 GiB).

    merge_shards(base, read_adapter(adapter, base), out)   # out/: the base's shards, index and config, merged
    layer_parity(base, adapter, out, prompts, labels, tokenizer)   # tail logits of both, streamed from disk

Each base shard is rewritten with the same name, tensors and byte layout: a LoRA target becomes
W + scale·B·A, computed in fp32 (on the GPU when there is one) and rounded once to the base's dtype;
a modules_to_save tensor (the tiny recipe's lm_head, embed_tokens) replaces the base's; every other
tensor is copied byte for byte. The writer streams: a shard is never held in memory.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import UserError
from common.model.memory import GIB, HEAD_ROWS, PROCESS_RAM_GIB, merge_phases

INDEX = "model.safetensors.index.json"
PREFIX = "base_model.model."  # peft's name for the wrapped model in adapter_model.safetensors
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
TAIL_POSITIONS = 16  # logits compared at each prompt's last positions: every layer feeds them, and
#                      the last one is where the answer starts; all positions x 151,936 would be GBs
WHOLE_CHECK_MAX_GIB = 1.0  # a base this small in fp32 (the tiny model, test shapes; no published Qwen3) is
#                            also loaded whole, base+adapter and merged, for the parity check through from_pretrained


class AdapterError(UserError):
    """An adapter this merge cannot reproduce exactly: refused before anything is written."""


# ----------------------------------------------------------------------------- safetensors, a tensor at a time
def weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> file, from the index of a sharded model or the header of a single file."""
    if (model_dir / INDEX).is_file():
        return json.loads((model_dir / INDEX).read_text(encoding="utf-8"))["weight_map"]
    names = read_header(model_dir / "model.safetensors")
    return {name: "model.safetensors" for name in names if name != "__metadata__"}


def read_header(path: Path) -> dict:
    """name -> {dtype, shape, data_offsets}, in the file's order (its __metadata__ under that key)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def read_tensor(path: Path, name: str) -> torch.Tensor:
    # opened per tensor: a memory map held for a whole shard would count its pages (GBs) in the RSS
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def read_rows(path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(name)[start:stop]


def write_safetensors(path: Path, plan: list[tuple[str, str, list[int]]], produce, metadata: dict | None) -> None:
    """A safetensors file written tensor by tensor: `plan` is (name, dtype, shape) in file order and
    produce(name) gives each tensor as its turn comes, so at most one tensor is in memory."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name, dtype, shape in plan:
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data that follows to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, dtype, shape in plan:
            t = produce(name).contiguous()
            if list(t.shape) != list(shape) or SAFETENSORS_DTYPE.get(t.dtype, dtype) != dtype:
                raise AdapterError(f"{name} would be written as {list(t.shape)} {t.dtype}, not {shape} {dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the directory is renamed into place


# ----------------------------------------------------------------------------- the adapter
@dataclass
class LoraAdapter:
    path: Path
    config: dict
    targets: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # weight -> (A key, B key, scale)
    replaced: dict[str, str] = field(default_factory=dict)  # weight -> adapter key (modules_to_save)

    @property
    def file(self) -> Path:
        return self.path / "adapter_model.safetensors"

    def tensor(self, key: str) -> torch.Tensor:
        return read_tensor(self.file, key)


def lora_scale(config: dict, module: str) -> float:
    """peft's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), rank/alpha patterns first."""
    from peft.utils.other import get_pattern_key
    r = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}).keys(), module), config["r"])
    alpha = config.get("alpha_pattern", {}).get(get_pattern_key(config.get("alpha_pattern", {}).keys(), module),
                                                config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def refusal(config: dict) -> str | None:
    """Why an adapter cannot be merged as W + scale·B·A, or None."""
    unsupported = [(config.get("peft_type", "LORA") != "LORA", f"a {config.get('peft_type')} adapter, not LoRA"),
                   (config.get("use_dora"), "DoRA (use_dora): its magnitude vector rescales each merged weight"),
                   (config.get("bias", "none") != "none" or config.get("lora_bias"), "trained biases"),
                   (config.get("target_parameters"), "target_parameters"),
                   (config.get("layer_replication"), "layer_replication"),
                   (config.get("trainable_token_indices"), "trainable_token_indices")]
    return next((why for bad, why in unsupported if bad), None)


def read_adapter(adapter: Path, base: Path) -> LoraAdapter:
    """What the adapter changes in the base: each LoRA target and each modules_to_save tensor."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    why = refusal(config)
    if why:
        raise AdapterError(f"{adapter.name} uses {why}, which this merge does not support; serve it as base + "
                           f"adapter (serve.adapter) instead")
    found = LoraAdapter(adapter, config)
    if not found.file.is_file():
        raise AdapterError(f"{adapter} has no adapter_model.safetensors; save the adapter with safetensors")
    base_names = set(weight_map(base))
    for key in read_header(found.file):
        name = key.removeprefix(PREFIX)
        if key == "__metadata__" or ".lora_B." in name:
            continue
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            found.targets[module + ".weight"] = (key, key.replace(".lora_A.", ".lora_B."), lora_scale(config, module))
        elif name in base_names or name == HEAD:  # a tied base stores no head; the trained one is added
            found.replaced[name] = key
        else:
            raise AdapterError(f"{adapter.name} holds {key}, which matches no weight of {base.name}; "
                               f"it was trained on another base, or is not a LoRA adapter")
    missing = sorted(set(found.targets) - base_names)
    if missing:
        raise AdapterError(f"{adapter.name} adapts {missing[0]}, which {base.name} does not have; "
                           f"it was trained on another base")
    return found


# ----------------------------------------------------------------------------- the merge
def merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool,
                  device: str) -> torch.Tensor:
    """W + scale·B·A in fp32, rounded once to W's dtype (peft rounds B·A first, then adds in 16-bit)."""
    delta = (b.to(device, torch.float32) @ a.to(device, torch.float32)) * scale  # [out, r] @ [r, in]
    if transpose:  # fan_in_fan_out: GPT-2's Conv1D stores the weight as [in, out]
        delta = delta.T
    if delta.shape != w.shape:
        raise AdapterError(f"the adapter's update is {list(delta.shape)} and the weight {list(w.shape)}; "
                           f"it was trained on another base")
    return (w.to(device, torch.float32) + delta).to(w.dtype).cpu()


def unties(base_config: dict, adapter: LoraAdapter) -> bool:
    """A base that ties its head to its embedding, with either trained: the merged model keeps both apart,
    as peft's forward did (the trained head on the base embedding, or the base head on a trained embedding)."""
    return bool(base_config.get("tie_word_embeddings")) and bool({HEAD, EMBED} & set(adapter.replaced))


def producer(adapter: LoraAdapter, shard: Path, device: str):
    """name -> the merged tensor of `shard`: merged, replaced or copied unchanged."""
    transpose = bool(adapter.config.get("fan_in_fan_out"))

    names = set(read_header(shard))

    def produce(name: str) -> torch.Tensor:
        stored = name if name in names else EMBED  # an added head starts as the tied embedding
        if name in adapter.replaced:
            like = read_rows(shard, stored, 0, 1)
            return adapter.tensor(adapter.replaced[name]).to(like.dtype)
        w = read_tensor(shard, stored)
        if name not in adapter.targets:
            return w  # the stored bytes, unchanged
        a_key, b_key, scale = adapter.targets[name]
        return merged_weight(w, adapter.tensor(a_key), adapter.tensor(b_key), scale, transpose, device)
    return produce


def merge_shards(base: Path, adapter: LoraAdapter, out: Path, device: str = "cpu", progress=None) -> dict:
    """Write out/'s shards, index and config.json; returns counts of merged, replaced and copied tensors."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    files, untie = weight_map(base), unties(config, adapter)
    if untie:
        files.setdefault(HEAD, files[EMBED])  # the head goes into the embedding's shard
    total = 0
    for shard in sorted(set(files.values())):
        header = read_header(base / shard)
        plan = [(n, t["dtype"], t["shape"]) for n, t in header.items() if n != "__metadata__"]
        if untie and files[HEAD] == shard and HEAD not in header:
            plan.append((HEAD, header[EMBED]["dtype"], header[EMBED]["shape"]))
        total += sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in plan)
        write_safetensors(out / shard, plan, producer(adapter, base / shard, device),
                          header.get("__metadata__") or {"format": "pt"})
        if progress is not None:
            progress.update(1)
    if (base / INDEX).is_file():
        index = json.loads((base / INDEX).read_text(encoding="utf-8"))
        index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total},
                 "weight_map": dict(sorted(files.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False} if untie else config,
                                                indent=2) + "\n", encoding="utf-8")
    counts = {"merged": len(adapter.targets), "replaced": len(adapter.replaced)}
    return {**counts, "copied": len(files) - sum(counts.values()), "shards": len(set(files.values()))}


# ----------------------------------------------------------------------------- parity, a layer at a time
def read_rows_at(path: Path, name: str, ids: list[int]) -> torch.Tensor:
    """[len(ids), d]: the embedding rows of these token ids, without reading the whole table."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        table = f.get_slice(name)
        return torch.cat([table[i:i + 1] for i in ids])


class Side:
    """One model of the comparison, built on the meta device and given its weights one decoder layer at a
    time: base + adapter through peft's own LoRA layers (its scaling, unmerged), or the merged directory."""

    def __init__(self, model_dir: Path, device: str, adapter: LoraAdapter | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        if adapter is not None:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig.from_pretrained(str(adapter.path))).base_model.model
        self.body, self.device, self.adapter = model.model, device, adapter
        self.rotary = type(self.body.rotary_emb)(config).to(device)
        self.files = {n: model_dir / f for n, f in weight_map(model_dir).items()}
        replaced = adapter.replaced if adapter else {}
        # where the embedding and the head are read: the adapter's trained copy, else the base's own
        self.embed = (adapter.file, replaced[EMBED]) if EMBED in replaced else (self.files[EMBED], EMBED)
        own_head = HEAD if not config.tie_word_embeddings else EMBED
        self.head = (adapter.file, replaced[HEAD]) if HEAD in replaced else (self.files[own_head], own_head)

    def tensor(self, name: str) -> torch.Tensor:
        """A weight by the name peft gives it: LoRA factors from the adapter, the rest from the model."""
        if ".lora_A." in name or ".lora_B." in name:
            return self.adapter.tensor(PREFIX + name.replace(".default.weight", ".weight"))
        stored = name.replace(".base_layer.", ".")
        return read_tensor(self.files[stored], stored)

    def load(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        state = {k: self.tensor(prefix + k).to(self.device, torch.float32) for k in module.state_dict()}
        module.load_state_dict(state, assign=True, strict=True)
        return module

    def embeddings(self, ids: list[int]) -> torch.Tensor:
        return read_rows_at(*self.embed, ids).to(self.device, torch.float32)[None]  # [1, T, d]

    def layers(self, hidden: list[torch.Tensor]):
        """Each decoder layer's outputs for every sequence, one layer in memory at a time."""
        for i, layer in enumerate(self.body.layers):
            self.load(layer, f"model.layers.{i}.")
            for j, h in enumerate(hidden):
                pos = torch.arange(h.shape[1], device=self.device)[None]
                hidden[j] = layer(h, position_embeddings=self.rotary(h, pos), position_ids=pos)
            layer.to("meta")  # frees the layer's weights
            yield i, hidden

    def logits(self, hidden: list[torch.Tensor], keep: list[int]) -> list[torch.Tensor]:
        """[keep, V] fp32 logits at each sequence's last `keep` positions, the head read in row blocks."""
        norm = self.load(self.body.norm, "model.norm.")
        x = torch.cat([norm(h[0, -k:]) for h, k in zip(hidden, keep)])
        path, name = self.head
        vocab = read_header(path)[name]["shape"][0]
        out = torch.cat([x @ read_rows(path, name, s, s + HEAD_ROWS).to(self.device, torch.float32).T
                         for s in range(0, vocab, HEAD_ROWS)], dim=1)
        return [t.cpu() for t in out.split(keep)]


def label_sequences(prompts: list[list[int]], cand: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The prompts, then each prompt + each longer label's answer but its last token, and how many last
    positions of each sequence to score: label scoring reads those continuations off the prompt's cache."""
    longer = [c for c in cand if len(c) > 1]
    seqs = prompts + [p + c[:-1] for p in prompts for c in longer]
    return seqs, [min(len(p), TAIL_POSITIONS) for p in prompts] + [len(c) - 1 for _ in prompts for c in longer]


def best_labels(logits: list[torch.Tensor], n: int, cand: list[list[int]]) -> list[int]:
    """label_scoring's best label from full-sequence logits: a label's first-token logit (log Z is the same
    for every label of a prompt), plus log P of its further tokens up to the distinguishing one."""
    longer = [k for k, c in enumerate(cand) if len(c) > 1]
    best = []
    for i in range(n):
        score = logits[i][-1, [c[0] for c in cand]].clone()
        for j, k in enumerate(longer):
            logp = torch.log_softmax(logits[n + i * len(longer) + j], dim=-1)
            score[k] += logp.gather(1, torch.tensor(cand[k][1:])[:, None]).sum()
        best.append(int(score.argmax()))
    return best


@torch.no_grad()
def layer_parity(base: Path, adapter: LoraAdapter, merged: Path, prompts: list[list[int]],
                 cand: list[list[int]] | None = None, device: str = "cpu", progress=None) -> tuple[dict, dict]:
    """(base+adapter, merged): each {"logits": [last positions, V] per prompt, "best": label indices}.
    Each model runs its own hidden states from its embedding to its head, as a whole-model forward does,
    so the logits differ by what the merge changed end to end, and the same tolerance holds."""
    seqs, keep = label_sequences(prompts, cand or [])
    results = []
    for side in (Side(base, device, adapter), Side(merged, device)):
        hidden = [side.embeddings(s) for s in seqs]
        for _ in side.layers(hidden):
            if progress is not None:
                progress.update(1)
        logits = side.logits(hidden, keep)
        results.append({"logits": logits[:len(prompts)],
                        **({"best": best_labels(logits, len(prompts), cand)} if cand else {})})
    return results[0], results[1]


# ----------------------------------------------------------------------------- what it needs
def tensor_sizes(model_dir: Path) -> dict[str, int]:
    """name -> elements, from the shards' headers (no weights read)."""
    files = weight_map(model_dir)
    headers = {f: read_header(model_dir / f) for f in set(files.values())}
    return {n: math.prod(headers[f][n]["shape"]) for n, f in files.items()}


def whole_check(base: Path) -> bool:
    """Whether the parity check also loads the models whole: only where that costs little."""
    return sum(tensor_sizes(base).values()) * 4 / GIB <= WHOLE_CHECK_MAX_GIB


def ram_phases(base: Path, adapter: LoraAdapter, whole: bool) -> list[tuple[str, float]]:
    """(phase, GiB) beside the process itself: the peak is the process plus the largest phase."""
    sizes = tensor_sizes(base)
    target = max((sizes[n] for n in adapter.targets), default=0)
    layer = sum(v for n, v in sizes.items() if n.startswith("model.layers.0."))
    width = sizes[EMBED] // max(1, read_header(base / weight_map(base)[EMBED])[EMBED]["shape"][0])
    lora = sum(math.prod(t["shape"]) for k, t in read_header(adapter.file).items()
               if k != "__metadata__" and ".layers.0." in k)
    phases = merge_phases(target, layer, lora, width)  # the formula verify_setup's RAM line uses
    if whole:
        phases.append(("the whole-model check: base+adapter in fp32", 4 * (sum(sizes.values()) + 2 * sizes[EMBED])
                       / GIB))
    return phases


def check_ram(base: Path, adapter: LoraAdapter, whole: bool, free_gib: float) -> float:
    """The estimated peak in GiB; one sentence when it does not fit the RAM free now."""
    what, gib = max(ram_phases(base, adapter, whole), key=lambda p: p[1])
    need = PROCESS_RAM_GIB + gib
    if need > free_gib:
        raise UserError(f"the merge needs ~{need:.1f} GiB of RAM (the process {PROCESS_RAM_GIB:.1f} + {what} "
                        f"{gib:.1f}) and {free_gib:.1f} GiB is free now; close other programs, or merge on a box "
                        f"with more RAM")
    return need
