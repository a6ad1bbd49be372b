"""What makes a run: the resolved config, a hash of each data split and of the base model's manifest,
package versions, device, dtype and seed. train_qwen.py records it in train_info.json; evaluation
prints it beside its metrics, so a figure can be traced to what produced it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
from pathlib import Path

from common.text.prepared import LABELS_FILE

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "numpy")


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes; None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    return {name: version(name) for name in PACKAGES}


def run_provenance(cfg, processed: Path, model_path: Path, device: str, dtype: str) -> dict:
    """The record of what a training run was made of (a run is a function of these)."""
    splits = {name: file_sha256(processed / f"{name}.jsonl") for name in ("train", "val", "test")}
    return {"seed": cfg.train.seed, "device": device, "dtype": dtype, "versions": versions(),
            "data": {"dir": str(processed), "labels.json": file_sha256(processed / LABELS_FILE), **splits},
            "base_model": {"path": cfg.model.path, "manifest_sha256": file_sha256(Path(model_path) / "manifest.json")},
            "config": dataclasses.asdict(cfg)}


def describe(info: dict) -> list[str]:
    """Lines for a terminal: what the run was made of, as far as `info` (a train_info.json) says."""
    prov = info.get("provenance") or {}
    if not prov:
        return []
    short = {k: (v or "-")[:12] for k, v in prov.get("data", {}).items() if k != "dir"}
    v = prov.get("versions", {})
    return [f"run: base {prov['base_model']['path']} (manifest {(prov['base_model']['manifest_sha256'] or '-')[:12]}),"
            f" method {info.get('method')}, seed {prov.get('seed')}, {prov.get('device')} {prov.get('dtype')}",
            "data sha256: " + ", ".join(f"{k} {h}" for k, h in short.items()),
            "versions: " + ", ".join(f"{k} {ver}" for k, ver in v.items() if ver)]
