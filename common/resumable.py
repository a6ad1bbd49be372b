"""Long work saved in numbered chunks, so a crash, SIGKILL or Ctrl-C costs at most the chunk in progress.

A directory beside the output holds state.json (what the work is: the input's sha256, the model's
identity, the settings that change results) and one file a finished chunk, each written to a temporary
name and renamed, so a chunk file that exists is whole. The same command finds them and continues; a
changed input, model or setting starts over, and says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

STATE = "state.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """A temp file beside the target, then a rename: a reader never sees half a file. A lone surrogate (only
    ever in a rejected JSONL line's raw item) is written as its \\u escape, which JSON reads back as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ChunkStore:
    def __init__(self, directory: Path, identity: dict):
        self.dir, self.identity = Path(directory), identity

    def saved_identity(self) -> dict | None:
        try:
            return json.loads((self.dir / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def open(self) -> str | None:
        """Continue the saved work if it is this work, else start over; returns what the user should hear."""
        saved = self.saved_identity()
        if saved == self.identity:
            n = len(self.finished())
            return f"continuing from {self.dir}: {n} chunk(s) already done" if n else None
        message = None
        if saved is not None:
            changed = [k for k in self.identity if saved.get(k) != self.identity[k]]
            message = f"the {', '.join(changed) or 'saved state'} changed since {self.dir} was saved; starting over"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        write_atomic(self.dir / STATE, json.dumps(self.identity, indent=2))
        return message

    def path(self, k: int) -> Path:
        return self.dir / f"chunk-{k:06d}.jsonl"

    def finished(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("chunk-*.jsonl"))

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def write(self, k: int, rows: list[dict]) -> None:
        write_atomic(self.path(k), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def read(self, k: int) -> list[dict]:
        return [json.loads(line) for line in self.path(k).read_text(encoding="utf-8").splitlines() if line]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
