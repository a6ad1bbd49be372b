"""A text cut to fit the token budget training had: the classification prompt plus the longest label's
answer within data.max_tokens, the longest prefix of the text that fits (longest_prefix, a binary search
on characters, which prepare_data.py's data.overlong truncate uses on training texts too). predict.py cuts
every row this way, here and before it sends a text to a service, so both modes score the same prompt.
"""
from __future__ import annotations

from common.text.prompts import answers_ids, classification_ids


def prompts_fitting(tok, texts: list[str], labels: list[str], prompt_cfg, budget: int):
    """(prompt ids, the texts as scored, truncated flags); `budget` is data.max_tokens."""
    answer = max(map(len, answers_ids(tok, labels)))
    ids = classification_ids(tok, texts, labels, prompt_cfg)
    texts, cut = list(texts), [False] * len(texts)
    for i in (i for i, p in enumerate(ids) if len(p) + answer > budget):
        texts[i], cut[i] = longest_prefix(texts[i], lambda t: len(classification_ids(
            tok, [t], labels, prompt_cfg)[0]) + answer <= budget), True
        ids[i] = classification_ids(tok, [texts[i]], labels, prompt_cfg)[0]
    return ids, texts, cut


def longest_prefix(text: str, fits) -> str:
    """The longest prefix of `text` (right-stripped) that fits(prefix), by binary search on characters, for a
    text that does not fit whole; "" when no prefix does. prepare_data.py's truncate and predict.py share it."""
    lo, hi = 0, len(text)  # fits(text[:hi]) is false; text[:lo] fits unless lo is 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(text[:mid].rstrip()) else (lo, mid)
    return text[:lo].rstrip()
