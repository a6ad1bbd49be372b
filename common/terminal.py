"""Terminal output shared by the stages' reports."""
from __future__ import annotations

import unicodedata


def columns(text: str) -> int:
    """Display width in columns: a wide (CJK) character takes two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def ljust_cols(text: str, width: int) -> str:
    """Left-justify in terminal columns, where a CJK character takes two."""
    return text + " " * max(width - columns(text), 0)
