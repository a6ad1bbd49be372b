"""Classification by label scoring: log P(label + <|im_end|> | prompt) for every label, one pass each.

The prompt runs once; its KV cache is repeated for the K labels, and all K continuations run as one
batch on top of it. So the answer is always a valid label with a probability, at the cost of one
forward pass over the prompt plus K short ones, instead of generating text and hoping it parses.
tests/test_scoring.py proves this gives the same numbers as scoring K full sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.batching import left_pad, position_ids
from common.prompts import answers_ids


@dataclass
class LabelScores:
    logprobs: torch.Tensor  # [N, K] total log-probability of each label's tokens + <|im_end|>

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities renormalized over the candidate labels."""
        return torch.softmax(self.logprobs, dim=-1)

    def best(self) -> tuple[list[int], list[float]]:
        p = self.probs
        conf, idx = p.max(dim=-1)
        return idx.tolist(), conf.tolist()


def label_tokens(tokenizer, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, L] right-padded answer ids (label + <|im_end|>) and their mask."""
    seqs = answers_ids(tokenizer, labels)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def _score_batch(model, prompt_ids: list[list[int]], cand: torch.Tensor, cand_mask: torch.Tensor,
                 pad_id: int) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    ids, mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    n, k, length = ids.shape[0], cand.shape[0], cand.shape[1]
    pos = position_ids(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)            # [N, V]: the label's first token
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)                                        # [N*K, ...]
    cand, cand_mask = cand.to(device), cand_mask.to(device)
    c_ids, c_valid = cand.repeat(n, 1), cand_mask.repeat(n, 1)              # [N*K, L]
    c_mask = torch.cat([mask.repeat_interleave(k, 0), c_valid], dim=1)
    c_pos = pos[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(length, device=device)
    # The body runs on every continuation token, the 151,936-wide output head only where a position
    # predicts a real next token: with one-token labels that is one position per label, not L.
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.model(input_ids=c_ids, attention_mask=c_mask, position_ids=c_pos,
                          past_key_values=cache).last_hidden_state          # [N*K, L, d]
    need = c_valid[:, 1:].bool()                                            # position j predicts token j+1
    head = causal.get_output_embeddings()
    rest = torch.log_softmax(head(hidden[:, :-1][need]).float(), dim=-1).gather(1, c_ids[:, 1:][need][:, None])
    total = first.repeat_interleave(k, 0).gather(1, c_ids[:, :1]).squeeze(1)  # the first token, from the prompt
    total = total.index_add(0, need.nonzero()[:, 0], rest.squeeze(1))
    return total.view(n, k).cpu()


def score_label_ids(model, tokenizer, prompt_ids: list[list[int]], labels: list[str], batch_size: int = 8,
                    progress=None) -> LabelScores:
    """Log-probability of each label after each tokenized prompt, `batch_size` prompts at a time."""
    cand, cand_mask = label_tokens(tokenizer, labels)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start:start + batch_size]
        out.append(_score_batch(model, batch, cand, cand_mask, tokenizer.pad_token_id))
        if progress is not None:
            progress.update(len(batch))
    return LabelScores(torch.cat(out) if out else torch.empty(0, len(labels)))
