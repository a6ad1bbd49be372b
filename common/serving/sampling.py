"""One token per row from its logits: Qwen's recommended knobs, in vLLM's order.

    repetition_penalty   prompt and output tokens: a positive logit is divided by it, a negative one
                         multiplied (transformers' and vLLM's rule)
    presence_penalty     output tokens: logit -= presence_penalty if the token was generated before,
    frequency_penalty    and -= frequency_penalty x how often (OpenAI's definition)
    temperature -> top_k -> top_p -> min_p -> a draw (greedy: the argmax after the penalties)

Qwen3's advice: thinking off T=0.7, top_p=0.8, top_k=20, min_p=0; thinking on T=0.6, top_p=0.95,
top_k=20; presence_penalty 0-2 against endless repetition.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

QWEN_NON_THINKING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0, "presence_penalty": 0.0,
                     "frequency_penalty": 0.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0         # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def as_dict(self) -> dict:
        return asdict(self)


def model_defaults(model_dir: Path) -> dict:
    """top_p / top_k / min_p / repetition_penalty as the model's generation_config.json sets them."""
    try:
        gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: gen[k] for k in ("top_p", "top_k", "min_p", "repetition_penalty") if gen.get(k) is not None}


def server_defaults(serve, model_dir: Path) -> dict:
    """What a request that names no sampling field gets: the serve section's values; where those are null,
    the model's generation_config.json; else Qwen's non-thinking values."""
    found = {**QWEN_NON_THINKING, **model_defaults(model_dir)}
    return {k: getattr(serve, k) if getattr(serve, k) is not None else found[k] for k in QWEN_NON_THINKING}


def penalize(logits: torch.Tensor, s: Sampling, prompt_ids: list[int], out_ids: list[int]) -> torch.Tensor:
    """[V] logits with the repetition, presence and frequency penalties applied (a new tensor)."""
    logits = logits.float().clone()
    if s.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt_ids) | set(out_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if out_ids and (s.presence_penalty or s.frequency_penalty):
        counts = torch.bincount(torch.tensor(out_ids, device=logits.device), minlength=logits.shape[0]).float()
        logits -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from a row of (penalized) logits."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if 0 < s.top_k < logits.shape[0]:
        logits = logits.masked_fill(logits < logits.topk(s.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p   # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    if s.min_p > 0:
        probs = probs.masked_fill(probs < s.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
