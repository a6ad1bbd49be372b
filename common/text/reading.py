"""Reading the files users have into items: CSV / TSV, a JSON array, JSONL, a sheet of an Excel .xlsx.

Each item keeps where it came from (the CSV row's physical line, the JSONL line, "item N", the Excel row)
and the raw value, so prepare_data.py can account for every one: kept in a split, or rejected with a reason.
Text files are decoded first: UTF-8 (a BOM or not), UTF-16 with a BOM, or GBK / GB18030 (what Excel writes
on a Chinese Windows), detected; or the codec data.encoding names. The rules: docs/prepare_data.md.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.text.prepared import DataError

TEXT_KINDS = (".csv", ".tsv", ".json", ".jsonl")
BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# A GB18030 decoding whose double-byte characters are less than this share GB2312's everyday ones is taken
# for another encoding read wrongly: real GBK text measures ~1.0, Big5 0.4-0.5, Latin-1 ~0.25, Shift-JIS ~0.
MIN_COMMON = 0.8
RESAVE = "re-save it as UTF-8 (in Excel: Save As, CSV UTF-8)"
OLE_MAGIC = bytes.fromhex("D0CF11E0A1B11AE1")  # an encrypted workbook or an old .xls, not a zip
ZIP_MAGIC = b"PK\x03\x04"                        # an .xlsx (a zip) named like a text file


@dataclass
class Item:
    index: int                  # position in the file: the accounting check and the split order use it
    line: int | str             # CSV row / JSONL line / Excel row number (1-based), or "item N" of a JSON array
    raw: object                 # the item as read, or the raw line text; rejected.jsonl shows it
    record: dict | None = None  # the cleaned output record
    kind: str | None = None     # why it was rejected (the category the report counts); None = kept
    reason: str = ""
    tokens: int = 0
    truncated: bool = False

    def reject(self, kind: str, reason: str = "") -> None:
        self.kind, self.reason = kind, reason or kind


@dataclass
class Table:
    columns: list[str]          # JSON: the keys in order of first appearance
    items: list[Item]
    source: dict                # how it was read, for the report: format and encoding, or format and sheet
    warnings: list[str] = field(default_factory=list)


def live(items: list[Item]) -> list[Item]:
    return [it for it in items if it.kind is None]


# ----------------------------------------------------------------------------- decoding text
def line_at(e: UnicodeDecodeError, codec: str) -> int:
    """The 1-based line the bad bytes are on, from the bytes before them decoded (UTF-16 has two-byte newlines).
    e.object, not the file: utf-8-sig counts e.start from after the BOM."""
    return e.object[:e.start].decode(codec, errors="replace").count("\n") + 1


def bad_bytes(e: UnicodeDecodeError) -> str:
    return "bytes " + e.object[e.start:e.end].hex(" ").upper()


def decode(path: Path, encoding: str) -> tuple[str, str, bool]:
    """(text, codec, detected): data.encoding "auto" detects; anything else is a codec the user names."""
    data = path.read_bytes()
    if data.startswith((ZIP_MAGIC, OLE_MAGIC)):
        raise DataError(f"{path.name} is an Excel workbook (or another Office file), not text; "
                        "name it .xlsx, or in Excel: Save As, CSV UTF-8")
    auto = encoding.strip().lower() == "auto"
    text, codec = detect(path, data) if auto else decode_as(path, data, encoding)
    text = text.removeprefix("\ufeff")  # a named codec (utf-8, utf-16-le) leaves the BOM in the first column name
    if "\x00" in text:  # UTF-8 and GBK both take NUL bytes, but no text file has them
        refuse_nul(path, text.count("\n", 0, text.index("\x00")) + 1, codec)
    return text, codec, auto


def refuse_nul(path: Path, line: int, codec: str) -> None:
    raise DataError(f"line {line} of {path.name} holds a NUL character, so it is not {codec} text (UTF-16 "
                    f"without a byte-order mark? a binary file?); {RESAVE}, or name its encoding with --encoding")


def decode_as(path: Path, data: bytes, encoding: str) -> tuple[str, str]:
    try:
        codec = codecs.lookup(encoding).name
        return data.decode(codec), codec
    except UnicodeDecodeError as e:
        raise DataError(f"line {line_at(e, codec)} of {path.name} is not {codec} ({bad_bytes(e)}); "
                        "name the file's encoding with --encoding, or use --encoding auto") from None
    except LookupError:  # an unknown name, or a codec that is not for text (rot13, base64)
        raise DataError(f"unknown text encoding '{encoding}' (data.encoding); use auto, or a codec name "
                        "such as utf-8, gb18030, big5, cp1252") from None


def detect(path: Path, data: bytes) -> tuple[str, str]:
    """A byte-order mark says what the file is; else UTF-8 if all of it is, else GBK, else GB18030 (its
    superset: same characters for GBK's bytes, plus 4-byte ones), unless UTF-8 lines say the file is mixed."""
    bom = next((codec for mark, codec in BOMS if data.startswith(mark)), None)
    try:
        return data.decode(bom or "utf-8"), bom or "utf-8"
    except UnicodeDecodeError as e:
        line, what = line_at(e, bom or "utf-8"), bad_bytes(e)
    if bom:
        raise DataError(f"{path.name} starts with a {bom} byte-order mark but line {line} is not {bom} ({what}), "
                        f"so it mixes encodings; {RESAVE}")
    if b"\x00" in data:  # before GBK: UTF-16 without a BOM would fail there on a line number that means nothing
        refuse_nul(path, data.count(b"\n", 0, data.index(b"\x00")) + 1, "UTF-8 or GBK")
    refuse_mixed(path, data, line, what)
    for codec in ("gbk", "gb18030"):
        try:
            text = data.decode(codec)
        except UnicodeDecodeError as e:
            line, what = line_at(e, codec), bad_bytes(e)
            continue
        refuse_unlikely(path, text, codec)
        return text, codec
    raise DataError(f"{path.name} is neither UTF-8 nor GBK/GB18030 (line {line} has {what}); {RESAVE}, "
                    "or name its encoding with --encoding (e.g. big5, cp1252)")


def refuse_mixed(path: Path, data: bytes, bad_line: int, what: str) -> None:
    """A line that is valid UTF-8 with a 3- or 4-byte character (all CJK is) is UTF-8 Chinese: GBK text
    never forms one by chance (a GBK line passes as UTF-8 only with 2-byte sequences, and rarely)."""
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.isascii():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if any(ord(c) >= 0x800 for c in text):
            raise DataError(f"{path.name} mixes encodings: line {n} is UTF-8 but line {bad_line} is not ({what}); "
                            "re-save the whole file as UTF-8 (in Excel: Save As, CSV UTF-8), "
                            "or pass --encoding gb18030 if every line is GBK")


def refuse_unlikely(path: Path, text: str, codec: str) -> None:
    """GB18030 takes almost any pair of bytes 0x81-0xFE (Big5, Shift-JIS, a Latin-1 accent before a letter):
    such a decoding is mostly characters outside GB2312's rows, which Chinese text seldom uses. 4-byte
    characters (emoji, rare hanzi) do not count: byte soup hardly ever forms their digit pattern."""
    double = {c: n for c, n in Counter(text).items() if c > "\x7f" and len(c.encode(codec)) == 2}
    common = sum(n for c, n in double.items() if in_gb2312(c.encode(codec)))
    total = sum(double.values())
    if total and common < MIN_COMMON * total:
        raise DataError(f"{path.name} decodes as {codec.upper()}, but only {common / total:.0%} of its characters "
                        "are everyday Chinese ones (GB2312), so it is most likely another encoding (Big5, Shift-JIS, "
                        f"Latin-1); {RESAVE}, or name its encoding with --encoding (--encoding {codec} if it "
                        f"really is {codec.upper()})")


def in_gb2312(pair: bytes) -> bool:
    """GB2312's rows inside GBK: symbols A1-A9 and hanzi B0-F7, second byte A1-FE (AA-AF: user-defined)."""
    return 0xA1 <= pair[0] <= 0xF7 and pair[1] >= 0xA1 and not 0xAA <= pair[0] <= 0xAF


# ----------------------------------------------------------------------------- text formats
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


def read_json_items(path: Path, text: str) -> list[Item]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                        "for one object a line name it .jsonl") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON array of items")
    return [Item(i, f"item {i}", obj) for i, obj in enumerate(data)]


def read_text_file(path: Path, encoding: str) -> Table:
    text, codec, detected = decode(path, encoding)
    kind, source = path.suffix.lower(), {"format": path.suffix.lower()[1:], "encoding": codec, "detected": detected}
    if kind in (".csv", ".tsv"):
        return Table(*read_csv(text, "," if kind == ".csv" else "\t"), source)
    items = read_jsonl_items(text) if kind == ".jsonl" else read_json_items(path, text)
    objects = [it.raw for it in live(items) if isinstance(it.raw, dict)]
    return Table(list(dict.fromkeys(k for obj in objects for k in obj)), items, source)


# ----------------------------------------------------------------------------- Excel
def filled(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def cell_value(value):
    """A cell as JSON can hold it (rejected.jsonl shows it): text, numbers and booleans as they are
    (prepare_data.as_text turns numbers into text, as for JSON), dates and times as ISO text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def open_workbook(path: Path):
    import openpyxl  # only an .xlsx needs it
    with path.open("rb") as f:
        if f.read(8) == OLE_MAGIC:  # Excel encrypts a workbook with a password into an OLE file, not a zip
            raise DataError(f"{path.name} is password-protected (or an old .xls renamed); in Excel remove the "
                            "password (File, Info, Protect Workbook) or Save As .xlsx, then run again")
    try:  # read_only streams the rows; data_only gives a formula's value as Excel last calculated it
        return openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # a damaged file fails in zipfile, the XML parser or openpyxl, each its own way
        raise damaged(path, e) from None


def damaged(path: Path, e: Exception) -> DataError:
    return DataError(f"cannot read {path.name} as an Excel workbook ({type(e).__name__}: {e}); "
                     "open it in Excel and save it again as .xlsx")


def find_sheet(names: list[str], wanted: str) -> str | None:
    """Its exact name, else a 1-based number (tab order), else the name in any case (as Excel compares them)."""
    w = wanted.strip()
    if w in names:
        return w
    if w.isdigit() and 1 <= int(w) <= len(names):
        return names[int(w) - 1]
    return next((n for n in names if n.casefold() == w.casefold()), None)


def pick_sheet(wb, wanted: str | None, file: str):
    """The first sheet, or the one data.sheet names."""
    name = wb.sheetnames[0] if wanted is None else find_sheet(wb.sheetnames, str(wanted))
    if name is None:
        listed = ", ".join(f"{i} '{n}'" for i, n in enumerate(wb.sheetnames, 1))
        raise DataError(f"{file} has no sheet '{wanted}'; its sheets are {listed} "
                        "(pick one with --sheet NAME or --sheet NUMBER)")
    if not hasattr(wb[name], "iter_rows"):
        raise DataError(f"sheet '{name}' of {file} is a chart, not a table; pick another with --sheet")
    return wb[name]


def sheet_rows(path: Path, sheet: str | None) -> tuple[str, list[tuple[int, tuple]]]:
    """(the sheet's name, its non-empty rows with their Excel row numbers)."""
    wb = open_workbook(path)
    try:
        ws = pick_sheet(wb, sheet, path.name)
        ws.reset_dimensions()  # every row there is, not the range the file declares (some writers get it wrong)
        try:
            rows = enumerate(ws.iter_rows(min_row=1, values_only=True), 1)  # empty rows come as empty tuples
            return ws.title, [(n, row) for n, row in rows if any(map(filled, row))]
        except Exception as e:  # a damaged sheet fails while its XML streams in
            raise damaged(path, e) from None
    finally:
        wb.close()


def header_of(rows: list[tuple[int, tuple]], where: str) -> tuple[list[str], list[int]]:
    """(the column names, their cell indices) from the first non-empty row. A column with values under an
    empty header cell (a merged one, or a title row above the table) is an error: its values have no name."""
    from openpyxl.utils import get_column_letter
    (at, head), body = rows[0], rows[1:]
    named = [i for i, v in enumerate(head) if filled(v)]
    for n, row in body:
        stray = next((i for i, v in enumerate(row) if filled(v) and i not in named), None)
        if stray is not None:
            raise DataError(f"{where}: column {get_column_letter(stray + 1)} has a value in row {n} but no name in "
                            f"the header, row {at} (an empty or merged cell, or a title above the table?); "
                            "give every column a name in the first row, or delete the rows above the header")
    names = [cell_value(head[i]) for i in named]
    return [v.strip() if isinstance(v, str) else json.dumps(v) for v in names], named


def read_xlsx(path: Path, sheet: str | None) -> Table:
    """One item a non-empty row under the header row, `line` its Excel row number."""
    title, rows = sheet_rows(path, sheet)
    if not rows:
        raise DataError(f"sheet '{title}' of {path.name} is empty; pick another with --sheet")
    columns, cells = header_of(rows, f"sheet '{title}' of {path.name}")
    items = [Item(k, n, {c: cell_value(row[i]) if i < len(row) else None for c, i in zip(columns, cells)})
             for k, (n, row) in enumerate(rows[1:])]
    return Table(columns, items, {"format": "xlsx", "sheet": title})


# ----------------------------------------------------------------------------- any file
def read_items(path: Path, encoding: str, sheet: str | None) -> Table:
    """The columns and items of a .csv/.tsv/.json/.jsonl (decoded by `encoding`) or .xlsx (`sheet`) file."""
    kind = path.suffix.lower()
    if kind not in (*TEXT_KINDS, ".xlsx"):
        raise DataError(f"cannot read '{path.name}': use a .csv, .tsv, .json, .jsonl or .xlsx file"
                        + (" (in Excel: Save As, .xlsx)" if kind == ".xls" else ""))
    if kind == ".xlsx":
        table = read_xlsx(path, sheet)
        if encoding.strip().lower() != "auto":
            table.warnings.append(f"data.encoding '{encoding}' applies to text files only; ignored for {path.name}")
        return table
    table = read_text_file(path, encoding)
    if sheet is not None:
        table.warnings.append(f"data.sheet '{sheet}' applies to .xlsx files only; ignored for {path.name}")
    return table


# Column names tried in this order (case-insensitive) when no text column is named (prepare_data, predict).
TEXT_NAMES = ("text", "content", "sentence", "title", "news", "review", "comment",
              "文本", "内容", "新闻", "标题", "评论", "评价")


def clean(s: str) -> str:
    """A text as the model sees it (training and labelling alike): NFC, and every whitespace run (newlines
    too) becomes one space, stripped at both ends."""
    return " ".join(unicodedata.normalize("NFC", s).split())


def pick_column(columns: list[str], wanted: str | None, names: tuple[str, ...], what: str) -> str:
    by_lower = {c.lower(): c for c in reversed(columns)}  # reversed: the first of equal names wins
    found = (wanted if wanted in columns else by_lower.get(wanted.lower())) if wanted else \
        next((by_lower[n] for n in names if n in by_lower), None)
    if found is None:
        asked = f"{what} column '{wanted}' not found" if wanted else f"no {what} column found"
        raise DataError(f"{asked}; the file has columns: {', '.join(columns) or 'none'} "
                        f"(pick one with --{what}-col NAME)")
    return found
