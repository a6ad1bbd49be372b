"""One logging setup for every stage: readable lines on the terminal, JSON lines in logs/<stage>.jsonl;
and the one place where the libraries' own noise is quieted (quiet_libraries)."""
from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

NOISY = ("urllib3", "filelock", "httpx", "huggingface_hub")  # request-by-request INFO lines


class _OncePerMessage(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_libraries() -> None:
    """Drop what the libraries log that a user cannot act on. Every stage calls it first, before it
    imports torch (run_stage does too; calling it again changes nothing):
    - torch 2.13 imports bitsandbytes while torch itself is imported (a device-backend plugin), and its CPU
      backend then logs that the optional `kernels` package (which would fetch code from a hub) is
      missing; the built-in CPU path works without it;
    - bitsandbytes warns on every 8-bit matmul on the CPU (the fp16 cast): once is enough;
    - peft still calls a deprecated transformers name (is_gradient_checkpointing);
    - HTTP and file-lock libraries log every request at INFO."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    matmul = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OncePerMessage) for f in matmul.filters):
        matmul.addFilter(_OncePerMessage())
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    quiet_libraries()
    return logging.getLogger(stage)
