"""A text cut to fit the token budget training had: the classification prompt plus the longest label's
answer within data.max_tokens, the longest prefix of the text that fits (a binary search on characters,
as prepare_data.py's data.overlong truncate cuts a training text). predict.py cuts every row this way,
here and before it sends a text to a service, so both modes score the same prompt.
"""
from __future__ import annotations

from common.text.prompts import answers_ids, classification_ids


def prompts_fitting(tok, texts: list[str], labels: list[str], prompt_cfg, budget: int):
    """(prompt ids, the texts as scored, truncated flags); `budget` is data.max_tokens."""
    answer = max(map(len, answers_ids(tok, labels)))
    ids = classification_ids(tok, texts, labels, prompt_cfg)
    texts, cut = list(texts), [False] * len(texts)
    for i in (i for i, p in enumerate(ids) if len(p) + answer > budget):
        lo, hi = 0, len(texts[i])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            fits = len(classification_ids(tok, [texts[i][:mid].rstrip()], labels, prompt_cfg)[0]) + answer <= budget
            lo, hi = (mid, hi) if fits else (lo, mid)
        texts[i], cut[i] = texts[i][:lo].rstrip(), True
        ids[i] = classification_ids(tok, [texts[i]], labels, prompt_cfg)[0]
    return ids, texts, cut
