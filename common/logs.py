"""One logging setup for every stage: readable lines on the terminal, JSON lines in logs/<stage>.jsonl."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


class JsonLines(logging.Formatter):
    """One JSON object a line; fields passed as `extra={...}` are kept as keys (request ids, figures)."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class OneLine(logging.Formatter):
    """Terminal lines, one per record: a traceback goes to the JSON log, which names where it is."""

    def __init__(self, where: str):
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        self.where = where

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text = saved
        return line + (f" (traceback in {self.where})" if saved[0] else "")


def setup_logging(stage: str, logs_dir: str | Path | None = "logs", level: str = "INFO") -> logging.Logger:
    """Configure the root logger once per process and return the stage's logger."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S") if logs_dir is None
                         else OneLine(str(Path(logs_dir) / f"{stage}.jsonl")))
    root.addHandler(console)
    if logs_dir is not None:
        Path(logs_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(logs_dir) / f"{stage}.jsonl", encoding="utf-8")
        file.setFormatter(JsonLines())
        root.addHandler(file)
    for noisy in ("urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(stage)
