"""Token sequences of different lengths as one batch: left padding, one rule for every stage.

Left padding ends every row at the same column, so the next token of every row is predicted at
position -1 (generation, label scoring) and every answer sits at the end of its row (training runs
the output head only there). Position ids count real tokens only, so a padded row sees the same
positions, and gives the same logits, as the row alone.
"""
from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] long tensor of the rows right-aligned after `pad_value`s, and the [N, T] attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over each row's real tokens (padding gets 0, which the mask hides anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad_cache(cache, mask: torch.Tensor, width: int):
    """Left-pad a DynamicCache and its attention mask along time to `width` positions."""
    pad = width - mask.shape[1]
    if pad == 0:
        return mask
    for layer in cache.layers:
        zeros = layer.keys.new_zeros(*layer.keys.shape[:2], pad, layer.keys.shape[3])
        layer.keys, layer.values = torch.cat([zeros, layer.keys], 2), torch.cat([zeros, layer.values], 2)
    return torch.cat([mask.new_zeros(mask.shape[0], pad), mask], 1)
