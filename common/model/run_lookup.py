"""The training run behind a model directory, and what it recorded: a run is itself, a merged model names
its adapter in manifest.json, a quantized copy names the merged model it came from. predict.py reads the
run's data.max_tokens, its training split's label counts, and an identity of the weights from here.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from common.text.prepared import read_jsonl


def find_run(model_dir: Path) -> Path | None:
    """The training run behind a model: itself, or the adapter a merge's manifest names (via a quantized copy)."""
    d = model_dir
    for _ in range(3):
        if (d / "train_info.json").is_file():
            return d
        try:
            manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        d = Path(manifest.get("adapter") or manifest.get("model") or "")
        if not str(d) or not d.is_dir():
            return None
    return None


def model_identity(*dirs: Path) -> str:
    """Weights by name, size and time; labels and calibration by content: what makes the scores."""
    h = hashlib.sha256()
    for d in filter(None, dirs):
        for p in sorted(d.glob("*")):
            if p.suffix == ".safetensors":
                h.update(f"{p.resolve()} {p.stat().st_size} {p.stat().st_mtime_ns}".encode())
            elif p.name in ("labels.json", "calibration.json", "adapter_config.json", "config.json"):
                h.update(p.read_bytes())
    return h.hexdigest()


def run_max_tokens(run: Path | None) -> int | None:
    """data.max_tokens as the run was trained with (train_info.json's provenance)."""
    info = read_json(run / "train_info.json") if run else None
    return (((info or {}).get("provenance") or {}).get("config") or {}).get("data", {}).get("max_tokens")


def read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def training_counts(run: Path | None) -> tuple[Counter | None, str]:
    """The training split's label counts (the run's data, from its provenance), or None and why not."""
    info = read_json(run / "train_info.json") if run else None
    data = (((info or {}).get("provenance") or {}).get("data") or {}).get("dir")
    if not data or not (Path(data) / "train.jsonl").is_file():
        return None, "the training split was not found" + (f" ({data}/train.jsonl)" if data else "")
    return Counter(r.get("label") for r in read_jsonl(Path(data) / "train.jsonl")), f"{data}/train.jsonl"
