"""Sampling: the penalties by their definitions, the filters, and the server's defaults for a request
that names none (the seed's temperature 0.3, Qwen's non-thinking top_p/top_k when the model says nothing)."""
import json

import torch

from common.serving.sampling import QWEN_NON_THINKING, Sampling, model_defaults, penalize, sample, server_defaults


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    rep = penalize(logits, Sampling(repetition_penalty=2.0), prompt_ids=[0], out_ids=[1])
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive divided, negative multiplied; unseen untouched
    pf = penalize(logits, Sampling(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[0], out_ids=[2, 2, 3])
    assert pf.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25]  # output tokens only, prompt ignored


def test_filters_leave_only_what_they_allow():
    logits = torch.tensor([3.0, 2.9, 0.0, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, Sampling(temperature=1.0, top_k=2), gen) for _ in range(200)} == {0, 1}
    assert {sample(logits, Sampling(temperature=1.0, min_p=0.5), gen) for _ in range(200)} == {0, 1}
    assert {sample(logits, Sampling(temperature=1.0, top_p=0.3), gen) for _ in range(200)} == {0}
    assert sample(logits, Sampling(temperature=0.0), gen) == 0


def test_server_defaults_fall_back_from_config_to_the_model_to_qwen(tmp_path):
    from common.config import load_config
    serve = load_config(use_env=False).serve
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert server_defaults(serve, tmp_path) == {**QWEN_NON_THINKING, "temperature": 0.3}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.95, "top_k": 40}))
    assert model_defaults(tmp_path) == {"top_p": 0.95, "top_k": 40}
    assert server_defaults(serve, tmp_path)["top_p"] == 0.95  # the model's own, since config.yaml says null
