"""Reading the files users have into items: CSV / TSV, a JSON array, JSONL.

Each item keeps where it came from (the CSV row's physical line, the JSONL line, "item N") and the
raw value, so prepare_data.py can account for every one: kept in a split, or rejected with a reason.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from common.data import DataError


@dataclass
class Item:
    index: int                  # position in the file: the accounting check and the split order use it
    line: int | str             # CSV row / JSONL line number (1-based), or "item N" of a JSON array
    raw: object                 # the item as read, or the raw line text; rejected.jsonl shows it
    record: dict | None = None  # the cleaned output record
    kind: str | None = None     # why it was rejected (the category the report counts); None = kept
    reason: str = ""
    tokens: int = 0
    truncated: bool = False

    def reject(self, kind: str, reason: str = "") -> None:
        self.kind, self.reason = kind, reason or kind


def live(items: list[Item]) -> list[Item]:
    return [it for it in items if it.kind is None]


def decode(path: Path) -> str:
    """UTF-8 with or without a BOM; a GBK file (a Chinese CSV saved by Excel) gets the command that fixes it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        try:
            data.decode("gbk")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
        fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
        raise DataError(f"{path.name} is GBK-encoded; convert it: iconv -f GBK -t UTF-8 {path} > {fixed}") from None


def read_csv(text: str, delimiter: str) -> tuple[list[str], list[Item]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns, items = [c.strip() for c in next(reader, [])], []
    start = reader.line_num + 1  # the physical line the next row starts on (a quoted cell may span lines)
    try:
        for row in reader:
            if any(cell.strip() for cell in row):  # a blank line is not an item
                ok = len(row) == len(columns)
                items.append(Item(len(items), start, dict(zip(columns, row)) if ok else row))
                if not ok:
                    items[-1].reject("malformed row", f"row has {len(row)} fields, the header has {len(columns)}")
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"CSV error at line {start}: {e}") from None
    return columns, items


def read_jsonl_items(text: str) -> list[Item]:
    items: list[Item] = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if line.strip():
            items.append(Item(len(items), n, line.rstrip("\r")))
            try:
                items[-1].raw = json.loads(line)
            except json.JSONDecodeError as e:
                items[-1].reject("malformed JSON", f"malformed JSON: {e.msg} (column {e.colno})")
    return items


def read_items(path: Path) -> tuple[list[str], list[Item]]:
    """(columns, items) of a .csv/.tsv/.json/.jsonl file; JSON columns are the keys in order of appearance."""
    kind = path.suffix.lower()
    if kind not in (".csv", ".tsv", ".json", ".jsonl"):
        raise DataError(f"cannot read '{path.name}': use a .csv, .tsv, .json or .jsonl file")
    text = decode(path)
    if kind in (".csv", ".tsv"):
        return read_csv(text, "," if kind == ".csv" else "\t")
    if kind == ".jsonl":
        items = read_jsonl_items(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                            "for one object a line name it .jsonl") from None
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON array of items")
        items = [Item(i, f"item {i}", obj) for i, obj in enumerate(data)]
    objects = [it.raw for it in live(items) if isinstance(it.raw, dict)]
    return list(dict.fromkeys(k for obj in objects for k in obj)), items


def pick_column(columns: list[str], wanted: str | None, names: tuple[str, ...], what: str) -> str:
    by_lower = {c.lower(): c for c in reversed(columns)}  # reversed: the first of equal names wins
    found = (wanted if wanted in columns else by_lower.get(wanted.lower())) if wanted else \
        next((by_lower[n] for n in names if n in by_lower), None)
    if found is None:
        asked = f"{what} column '{wanted}' not found" if wanted else f"no {what} column found"
        raise DataError(f"{asked}; the file has columns: {', '.join(columns) or 'none'} "
                        f"(pick one with --{what}-col NAME)")
    return found
