"""The batching engine: same tokens as model.generate alone and when joining mid-flight; bounds."""
import queue
import time

import pytest
import torch

from common.engine import Engine, GenRequest, QueueFull, ScoreRequest
from common.loading import load_model
from common.prompts import encode_text, render_prompt


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model).eval()


def ids_for(tokenizer, text):
    return encode_text(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": text}]))


def request(tokenizer, text, n, **kw):
    return GenRequest(prompt_ids=ids_for(tokenizer, text), max_tokens=n, deadline=time.monotonic() + 60,
                      ignore_eos=True, **kw)


def reference(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_equals_generate_alone_and_when_joining(model, tokenizer):
    engine = Engine(model, tokenizer, max_concurrent=3, max_queue=4, max_queue_wait_s=30, batch_wait_ms=5.0)
    alone = request(tokenizer, "你好，世界", 24)
    engine.submit(alone)
    assert alone.done.wait(30) and alone.finish_reason == "length"
    expected = reference(model, alone.prompt_ids, 24)
    assert alone.out_ids == expected
    busy = request(tokenizer, "先占住批次的一个更长的提示。" * 3, 400, events=queue.Queue())
    engine.submit(busy)
    assert busy.events.get(timeout=30)[0] == "delta"  # busy is decoding now
    joined = request(tokenizer, "你好，世界", 24)
    engine.submit(joined)
    assert joined.done.wait(30) and not busy.done.is_set()  # so joined ran inside busy's batch, start to end
    assert busy.done.wait(60)
    assert joined.out_ids == expected and busy.out_ids == reference(model, busy.prompt_ids, 400)


def test_admission_is_bounded_and_the_deadline_stops_generation(model, tokenizer):
    engine = Engine(model, tokenizer, max_concurrent=2, max_queue=1, max_queue_wait_s=30, batch_wait_ms=5.0)
    held = [request(tokenizer, f"长{i}", 400) for i in range(3)]
    for r in held:
        engine.submit(r)
    with pytest.raises(QueueFull):
        engine.submit(request(tokenizer, "多余", 4))
    late = request(tokenizer, "限时", 10_000)
    late.deadline = time.monotonic() + 0.3
    for r in held:
        r.cancelled = True  # cancelled rows stop at the next step and free their slots
    assert all(r.done.wait(10) for r in held) and {r.finish_reason for r in held} == {"cancelled"}
    engine.submit(late)
    assert late.done.wait(5) and late.finish_reason == "timeout" and len(late.out_ids) < 10_000
    assert engine.load() == (0, 0) and engine.peak_admitted == 3


def test_stop_strings_and_streamed_text(model, tokenizer):
    engine = Engine(model, tokenizer, max_concurrent=2, max_queue=2, max_queue_wait_s=30, batch_wait_ms=5.0)
    probe = request(tokenizer, "停", 12)
    engine.submit(probe)
    probe.done.wait(30)
    stop = probe.text[4:6]  # a string the greedy output really contains
    r = request(tokenizer, "停", 12, stop=[stop], events=queue.Queue())
    engine.submit(r)
    assert r.done.wait(30) and r.finish_reason == "stop" and r.text == probe.text[:probe.text.index(stop)]
    streamed = []
    while (item := r.events.get(timeout=5))[0] != "done":
        streamed.append(item[1])
    assert "".join(streamed) == r.text


def test_score_requests_share_the_thread(model, tokenizer):
    engine = Engine(model, tokenizer, max_concurrent=2, max_queue=2, max_queue_wait_s=30, batch_wait_ms=5.0)
    s = ScoreRequest(prompt_ids=[ids_for(tokenizer, "x")], labels=["a", "b"], deadline=time.monotonic() + 30)
    engine.submit(s)
    assert s.done.wait(30) and s.logprobs.shape == (1, 2) and torch.isfinite(s.logprobs).all()
