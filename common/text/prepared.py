"""The prepared data as the later stages read it: prepare_data.py's JSONL splits and labels.json.

labels.json has one rule, here: a directory's labels.json (a run, a merged model, data/processed)
declares its task; a "classification" file lists the labels in the order training used, a "chat"
file has none. Where several directories may hold one, the first that does decides.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.config import UserError

LABELS_FILE = "labels.json"
SPLITS = ("train", "val", "test")


class DataError(UserError):
    """A user-fixable problem with the input data or the prepared data."""


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a broken line is an error that names it."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n} is not valid JSON ({e.msg}); "
                                    f"run python prepare_data.py again") from None
    return records


def read_labels(*dirs: Path) -> list[str] | None:
    """The classification labels from the first of `dirs` holding labels.json; None for chat data
    or when none holds one."""
    for d in dirs:
        path = Path(d) / LABELS_FILE
        if not path.is_file():
            continue
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg}); run python prepare_data.py again") from None
        task = info.get("task", "classification")
        if task == "chat":
            return None
        labels = info.get("labels")
        if task != "classification" or not isinstance(labels, list) or not labels:
            raise DataError(f"{path} declares task '{task}' with labels {labels!r}: a classification labels.json "
                            f"lists its labels; run python prepare_data.py again")
        return labels
    return None


def load_splits(processed: Path, names: tuple[str, ...]) -> dict[str, list[dict]]:
    """The named splits of prepare_data.py's output; a clear error when it has not run."""
    missing = [f for f in (LABELS_FILE, *(f"{n}.jsonl" for n in names)) if not (processed / f).is_file()]
    if missing:
        raise DataError(f"{processed} lacks {', '.join(missing)}; run python prepare_data.py first")
    return {n: read_jsonl(processed / f"{n}.jsonl") for n in names}


def data_hash(processed: Path, names: tuple[str, ...]) -> str:
    """sha256 over labels.json and the named splits: which data a run saw."""
    h = hashlib.sha256()
    for name in (LABELS_FILE, *(f"{n}.jsonl" for n in names)):
        if (processed / name).is_file():
            h.update((processed / name).read_bytes())
    return h.hexdigest()


def held_out_records(processed: Path, labels: list[str] | None, n: int = 0) -> tuple[list[dict], str | None]:
    """(up to n records of the test split, else the val split, that fit the model's task; 0 = all),
    and the split's file name; ([], None) when neither has any. Checks after a merge or a quantization
    run on these, so they speak of the user's own data."""
    for split in ("test", "val"):
        path = processed / f"{split}.jsonl"
        if not path.is_file():
            continue
        fits = [r for r in read_jsonl(path) if (r.get("label") in labels if labels else "messages" in r)]
        if fits:
            return (fits[:n] if n > 0 else fits), path.name
    return [], None
