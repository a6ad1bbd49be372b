"""Is a model directory complete? One answer for download, verify_setup, merge and serving.

A safetensors file states its own size in its header (8-byte length + JSON header + the data the
last tensor ends at), so a truncated shard is caught without reading the weights. The manifest a
stage writes last (files and sizes) marks a directory whose writing finished.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# What a derived model directory (merged, quantized, converted) carries over besides its weights.
EXTRA_FILES = (*TOKENIZER_FILES, "chat_template.jinja", "chat_template.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "labels.json",
               "calibration.json")
# Files that describe one model's scores (the fitted temperature): taken from the first source only (the
# adapter run, the merged model), never from a base that another run was trained on.
OWN_FILES = ("calibration.json",)


@dataclass
class FileFinding:
    level: str  # "fail" | "warn"
    message: str


def safetensors_problem(path: Path) -> str | None:
    """None when the file is as long as its header says, else what is wrong with it."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes, too short to be safetensors"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"{path.name} is truncated: its header alone should be {header_len} bytes"
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path.name} has a corrupt header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size != expected:
        return f"{path.name} is {size:,} bytes but its header says {expected:,} (truncated or corrupt)"
    return None


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def weight_files(model_dir: Path) -> tuple[list[str], list[FileFinding]]:
    """The safetensors files the model needs, from the index when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = _json(index)
        if not data or "weight_map" not in data:
            return [], [FileFinding("fail", f"{index.name} is not a valid index")]
        return sorted(set(data["weight_map"].values())), []
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"], []
    if any(model_dir.glob("*.bin")):
        return [], [FileFinding("warn", "weights are .bin (pickle) files; safetensors is safer and loads faster")]
    return [], [FileFinding("fail", "no model.safetensors or model.safetensors.index.json")]


def check_model_dir(model_dir: str | Path) -> list[FileFinding]:
    """Everything that would stop training or serving from this directory; [] when complete."""
    d = Path(model_dir)
    if not d.is_dir():
        return [FileFinding("fail", f"{d} does not exist")]
    if (d / "adapter_config.json").is_file():
        return [] if any(d.glob("adapter_model.*")) else [FileFinding("fail", "adapter_config.json but no adapter weights")]
    found: list[FileFinding] = []
    if _json(d / "config.json") is None:
        found.append(FileFinding("fail", "config.json is missing or not valid JSON"))
    names, problems = weight_files(d)
    found += problems
    for name in names:
        f = d / name
        problem = f"{name} is missing (named in the index)" if not f.is_file() else safetensors_problem(f)
        if problem:
            found.append(FileFinding("fail", problem))
    found += _tokenizer_findings(d)
    manifest = _json(d / MANIFEST)
    if manifest is None:
        found.append(FileFinding("warn", f"no {MANIFEST}: not written by download_model.py, or its download did not finish"))
    else:
        for name, size in manifest.get("files", {}).items():
            f = d / name
            if not f.is_file() or f.stat().st_size != size:
                found.append(FileFinding("fail", f"{name} does not match the manifest ({size:,} bytes expected)"))
    return found


def _tokenizer_findings(d: Path) -> list[FileFinding]:
    found = []
    if not (d / "tokenizer.json").is_file() and not (d / "vocab.json").is_file():
        found.append(FileFinding("fail", "no tokenizer (tokenizer.json or vocab.json + merges.txt)"))
    tok_cfg = _json(d / "tokenizer_config.json")
    if tok_cfg is None:
        found.append(FileFinding("fail", "tokenizer_config.json is missing or not valid JSON"))
    elif not (d / "chat_template.jinja").is_file() and "chat_template" not in tok_cfg:
        found.append(FileFinding("fail", "no chat template (chat_template.jinja or tokenizer_config.json)"))
    if not (d / "generation_config.json").is_file():
        found.append(FileFinding("warn", "no generation_config.json: generation may not stop at <|im_end|>"))
    return found


def write_manifest(model_dir: str | Path, **info) -> Path:
    """Record every file and its size; written last, so its presence means the writing finished."""
    d = Path(model_dir)
    files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != MANIFEST and ".cache" not in p.parts}
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info, "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return d / MANIFEST


def save_atomically(target: Path, write, force: bool) -> None:
    """Write into a temporary directory beside `target`, then rename: never a half-written model.

    A writer killed midway (SIGKILL, out of memory) leaves its `.NAME.tmp-*` directory behind; the
    next write of the same target removes those, since they can hold gigabytes.
    """
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors write 0700/0600; services must read them
            p.chmod(0o755 if p.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def newest_run(runs_dir: Path) -> Path:
    """The most recently finished training run (train_info.json is the last file a run writes)."""
    runs = sorted(Path(runs_dir).glob("*/train_info.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no trained run in {runs_dir}; run python train_qwen.py, or pass --model")
    return runs[-1].parent

def newest_merged(runs_dir: Path) -> Path:
    """The most recent finished merge (its manifest is the last file merge_lora.py writes)."""
    merged = sorted(Path(runs_dir).glob("*-merged/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not merged:
        raise FileNotFoundError(f"no merged model in {runs_dir}; run python merge_lora.py, or pass --model")
    return merged[-1].parent


def copy_extras(sources: list[Path], dst: Path) -> list[str]:
    """Copy EXTRA_FILES into dst, each from the first source that has it; returns the names copied."""
    copied = []
    for name in EXTRA_FILES:
        src = next((d / name for d in (sources[:1] if name in OWN_FILES else sources) if (d / name).is_file()), None)
        if src is not None:
            shutil.copyfile(src, dst / name)
            copied.append(name)
    return copied


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def serving_model(cfg) -> tuple[Path, Path | None]:
    """(model dir, adapter dir or None): serve.model, else the newest merged run, else model.path."""
    s = cfg.serve
    if s.model:
        return cfg.resolve(s.model), cfg.resolve(s.adapter) if s.adapter else None
    try:
        base = cfg.resolve(cfg.model.path) if s.adapter else newest_merged(cfg.resolve(cfg.train.runs_dir))
    except FileNotFoundError:
        base = cfg.resolve(cfg.model.path)
    return base, cfg.resolve(s.adapter) if s.adapter else None
