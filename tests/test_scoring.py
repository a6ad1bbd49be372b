"""Label scoring (one prompt pass + the labels on its KV cache) equals scoring K full sequences."""
import pytest
import torch

from common.config import load_config
from common.loading import load_model
from common.prompts import answer_ids, classification_ids
from common.scoring import score_label_ids

LABELS = ["货币政策", "股市", "宏观经济", "公司", "公司债券", "国际贸易"]  # mixed token lengths, a prefix pair


def naive_scores(model, tokenizer, prompts, labels):
    out = torch.zeros(len(prompts), len(labels))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            p_ids = p
            for j, label in enumerate(labels):
                a = answer_ids(tokenizer, label)
                lp = torch.log_softmax(model(torch.tensor([p_ids + a])).logits[0].float(), -1)
                out[i, j] = sum(lp[len(p_ids) - 1 + q, t] for q, t in enumerate(a))
    return out


@pytest.mark.parametrize("adapter", [False, True])
def test_cached_scoring_equals_full_sequences(tiny_model, tokenizer, trained_run, adapter):
    model = (load_model(trained_run) if adapter else load_model(tiny_model)).eval()
    cfg = load_config(use_env=False).prompt
    texts = ["央行降准", "沪指上涨1%，成交额破万亿，创业板走强。" * 3, "测试"]  # different lengths: left padding
    prompts = classification_ids(tokenizer, texts, LABELS, cfg)
    fast = score_label_ids(model, tokenizer, prompts, LABELS, batch_size=2).logprobs
    assert torch.allclose(fast, naive_scores(model, tokenizer, prompts, LABELS), atol=1e-4)


def test_probabilities_and_best(tiny_model, tokenizer):
    model = load_model(tiny_model).eval()
    prompts = classification_ids(tokenizer, ["x"], LABELS, load_config(use_env=False).prompt)
    scores = score_label_ids(model, tokenizer, prompts, LABELS)
    (idx,), (conf,) = scores.best()
    assert scores.probs.sum().item() == pytest.approx(1.0, abs=1e-5) and conf == scores.probs.max().item()
    assert 0 <= idx < len(LABELS)
