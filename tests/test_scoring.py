"""Label scoring equals scoring each label with full forward passes: one prompt pass when every label starts
with its own token, the shared-prefix labels' continuations on the prompt's KV cache otherwise."""
import pytest
import torch

from common.config import load_config
from common.model.label_scoring import score_label_ids
from common.model.loading import load_model
from common.text.prompts import answer_ids, classification_ids

LABELS = ["货币政策", "股市", "宏观经济", "公司", "公司债券", "国际贸易"]  # mixed token lengths, a prefix pair
DISTINCT = ["货币政策", "股市", "宏观经济", "国际贸易"]  # every label starts with its own token


def naive_scores(model, tokenizer, prompts, labels):
    """Each label's tokens up to the first one no other label shares there, scored by full forward passes."""
    answers = [answer_ids(tokenizer, label) for label in labels]
    out = torch.zeros(len(prompts), len(labels))
    with torch.no_grad():
        for i, p_ids in enumerate(prompts):
            for j, a in enumerate(answers):
                d = 1
                while any(o[:d] == a[:d] for k, o in enumerate(answers) if k != j):
                    d += 1
                lp = torch.log_softmax(model(torch.tensor([p_ids + a])).logits[0].float(), -1)
                out[i, j] = sum(lp[len(p_ids) - 1 + q, t] for q, t in enumerate(a[:d]))
    return out


def forward_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("adapter", [False, True])
@pytest.mark.parametrize("labels", [LABELS, DISTINCT], ids=["shared-prefix", "distinct-first-tokens"])
def test_cached_scoring_equals_full_sequences(tiny_model, tokenizer, trained_run, adapter, labels):
    model = (load_model(trained_run) if adapter else load_model(tiny_model)).eval()
    cfg = load_config(use_env=False).prompt
    texts = ["央行降准", "沪指上涨1%，成交额破万亿，创业板走强。" * 3, "测试"]  # different lengths: left padding
    prompts = classification_ids(tokenizer, texts, labels, cfg)
    body = forward_calls((model.get_base_model() if adapter else model).model)
    fast = score_label_ids(model, tokenizer, prompts, labels, batch_size=3)
    assert len(body) == (1 if labels is DISTINCT else 2)  # the prompt pass, and the continuations if needed
    naive = naive_scores(model, tokenizer, prompts, labels)
    assert torch.allclose(fast.probs, torch.softmax(naive, -1), atol=1e-5)
    # up to the prompt's normalizer, the same for every label of a prompt: differences are exact
    assert torch.allclose(fast.logprobs - fast.logprobs[:, :1], naive - naive[:, :1], atol=1e-4)


def test_distinct_first_tokens_need_one_pass_only(tiny_model, tokenizer):
    from common.model.label_scoring import label_tokens
    assert all(len(t) == 1 for t in label_tokens(tokenizer, DISTINCT))
    assert [len(t) for t in label_tokens(tokenizer, ["公司", "公司债券", "股市"])][2] == 1
    model = load_model(tiny_model).eval()
    body, head = forward_calls(model.model), forward_calls(model.lm_head)
    prompts = classification_ids(tokenizer, ["央行降准"], DISTINCT, load_config(use_env=False).prompt)
    score_label_ids(model, tokenizer, prompts, DISTINCT)
    assert len(body) == 1 and len(head) == 0  # one body pass; the head's K label rows, not all of it


def test_probabilities_and_best(tiny_model, tokenizer):
    model = load_model(tiny_model).eval()
    prompts = classification_ids(tokenizer, ["x"], LABELS, load_config(use_env=False).prompt)
    scores = score_label_ids(model, tokenizer, prompts, LABELS)
    (idx,), (conf,) = scores.best()
    assert scores.probs.sum().item() == pytest.approx(1.0, abs=1e-5) and conf == scores.probs.max().item()
    assert 0 <= idx < len(LABELS)
