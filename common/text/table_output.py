"""Users' rows back out: a table of dicts written as CSV, JSONL or an Excel .xlsx (chosen by the suffix),
all at once through a temporary file and a rename, so a reader never sees half a file.

And the one rule for a cell as the text a model sees (prepare_data.py cleans training texts the same way):
NFC, every whitespace run one space, numbers and booleans as text, lists and objects and lone surrogates
refused with a reason.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from common.text.prepared import DataError
from common.text.reading import clean

OUTPUT_KINDS = (".csv", ".jsonl", ".xlsx")


# ----------------------------------------------------------------------------- cells as text
def cell_text(value) -> tuple[str | None, str]:
    """(the cleaned text of a cell, "") or (None, why it is not text): None and "" are empty text."""
    if isinstance(value, (int, float, bool)) and not isinstance(value, str):
        value = json.dumps(value)
    if value is None:
        value = ""
    if not isinstance(value, str):
        return None, f"not text ({type(value).__name__})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, "not text (a lone surrogate escape such as \\ud800)"
    text = clean(value)
    return (text, "") if text else (None, "empty text")


# ----------------------------------------------------------------------------- writing
def check_output(path: Path) -> None:
    if path.suffix.lower() not in OUTPUT_KINDS:
        raise DataError(f"cannot write '{path.name}': name the output .csv, .jsonl or .xlsx")


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_csv(tmp: Path, columns: list[str], rows) -> None:
    # UTF-8 with a byte-order mark: Excel on a Chinese Windows opens it as UTF-8 only with one
    with tmp.open("w", encoding="utf-8-sig", newline="", errors="backslashreplace") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([csv_cell(row.get(c)) for c in columns])


def write_jsonl(tmp: Path, columns: list[str], rows) -> None:
    with tmp.open("w", encoding="utf-8", errors="backslashreplace") as f:
        for row in rows:
            f.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n")


def write_xlsx(tmp: Path, columns: list[str], rows) -> None:
    import openpyxl
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE  # control characters XML cannot hold
    wb = openpyxl.Workbook(write_only=True)
    ws = wb.create_sheet("predicted")
    ws.append(columns)
    for row in rows:
        values = [row.get(c) for c in columns]
        ws.append([ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else
                   v if v is None or isinstance(v, (int, float, bool)) else json.dumps(v, ensure_ascii=False)
                   for v in values])
    wb.save(tmp)


def write_table(path: Path, columns: list[str], rows) -> None:
    """Every row (a dict; missing keys are empty cells) under `columns`, as the suffix says, atomically."""
    check_output(path)
    writer = {".csv": write_csv, ".jsonl": write_jsonl, ".xlsx": write_xlsx}[path.suffix.lower()]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer(tmp, columns, rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
