"""Classification by label scoring: the probability that the model answers each label, in one pass.

A label's score is log P of its answer tokens (label + <|im_end|>) up to the first token that tells
it apart from every other label: the probability that generation commits to that label. When every
label starts with its own token, that is the first token alone, read at the prompt pass's last
position: one pass of the body per prompt, and of the 151,936-row output head only the K label rows
(the vocabulary's normalizer is the same for every label of a prompt, so it cancels in the
probabilities). Labels that share leading tokens ("公司", "公司债券") need the continuation: the
prompt's KV cache is repeated for those labels only and their tokens up to the distinguishing one run
as one batch on top of it. The answer is always a valid label with a probability.
tests/test_scoring.py checks both paths against full forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.model.batching import left_pad, position_ids
from common.model.loading import model_device
from common.text.prompts import answers_ids


@dataclass
class LabelScores:
    # [N, K] log-probability of each label's tokens up to its distinguishing one, less the prompt
    # position's normalizer log Z(prompt): the same for every label of a prompt, so probs are exact
    logprobs: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities renormalized over the candidate labels."""
        return torch.softmax(self.logprobs, dim=-1)

    def best(self) -> tuple[list[int], list[float]]:
        p = self.probs
        conf, idx = p.max(dim=-1)
        return idx.tolist(), conf.tolist()


def distinguishing_tokens(seqs: list[list[int]]) -> list[list[int]]:
    """Each sequence cut after the first token no other sequence shares at that point."""
    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    return [s[:min(len(s), 1 + max((common(s, o) for j, o in enumerate(seqs) if j != i), default=0))]
            for i, s in enumerate(seqs)]


def label_tokens(tokenizer, labels: list[str]) -> list[list[int]]:
    """The tokens a label is scored on: its answer (label + <|im_end|>) up to its distinguishing token."""
    return distinguishing_tokens(answers_ids(tokenizer, labels))


def head_logits(head, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """[N, K] the output head's logits for `token_ids` only: K rows of the weight instead of all 151,936
    (a plain matrix); a quantized or adapter-wrapped head runs whole, then the K are picked."""
    if type(head) is torch.nn.Linear:
        rows = torch.tensor(token_ids, device=hidden.device)
        out = hidden.to(head.weight.dtype) @ head.weight[rows].T
        return (out + head.bias[rows]) if head.bias is not None else out
    return head(hidden)[:, token_ids]


@torch.no_grad()
def _score_batch(model, prompt_ids: list[list[int]], cand: list[list[int]], pad_id: int) -> torch.Tensor:
    device = model_device(model)
    ids, mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    pos = position_ids(mask)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    longer = [k for k, c in enumerate(cand) if len(c) > 1]
    out = causal.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=bool(longer))
    # log P(first token) up to log Z(prompt), which every label of the prompt shares: the K logits suffice
    total = head_logits(causal.get_output_embeddings(), out.last_hidden_state[:, -1], [c[0] for c in cand]).float()
    if longer:  # labels that share leading tokens: their continuations, on the prompt's cache
        total[:, longer] += _continuations(model, out.past_key_values, mask, pos, [cand[k] for k in longer], pad_id)
    return total.cpu()


def _continuations(model, cache, mask, pos, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """[N, K'] log P(tokens 2.. of each sequence) given the prompt and the tokens before them."""
    device, n, k = mask.device, mask.shape[0], len(seqs)
    width = max(map(len, seqs)) - 1                                                  # inputs: all but the last
    c_ids = torch.full((k, width + 1), pad_id, dtype=torch.long, device=device)
    c_valid = torch.zeros_like(c_ids)
    for j, s in enumerate(seqs):
        c_ids[j, :len(s)], c_valid[j, :len(s)] = torch.tensor(s, device=device), 1
    cache.batch_repeat_interleave(k)                                                 # [N*K', ...]
    inputs, targets = c_ids[:, :-1].repeat(n, 1), c_ids[:, 1:].repeat(n, 1)         # [N*K', width]
    need = c_valid[:, 1:].repeat(n, 1).bool()                                        # position j predicts j+1
    c_mask = torch.cat([mask.repeat_interleave(k, 0), c_valid[:, :-1].repeat(n, 1)], dim=1)
    c_pos = pos[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(width, device=device)
    # the body runs on every continuation token, the 151,936-wide output head only where it predicts one
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.model(input_ids=inputs, attention_mask=c_mask, position_ids=c_pos,
                          past_key_values=cache).last_hidden_state                   # [N*K', width, d]
    head = causal.get_output_embeddings()
    logp = torch.log_softmax(head(hidden[need]).float(), dim=-1).gather(1, targets[need][:, None]).squeeze(1)
    rows = torch.zeros(n * k, device=device).index_add(0, need.nonzero()[:, 0], logp)
    return rows.view(n, k)


def score_label_ids(model, tokenizer, prompt_ids: list[list[int]], labels: list[str], batch_size: int = 8,
                    progress=None) -> LabelScores:
    """Log-probability of each label after each tokenized prompt, `batch_size` prompts a pass."""
    cand = label_tokens(tokenizer, labels)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start:start + batch_size]
        out.append(_score_batch(model, batch, cand, tokenizer.pad_token_id))
        if progress is not None:
            progress.update(len(batch))
    return LabelScores(torch.cat(out) if out else torch.empty(0, len(labels)))
