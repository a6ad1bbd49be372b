"""The batching engine: same tokens as model.generate alone and when joining mid-flight; bounds."""
import queue
import time

import pytest
import torch

from common.model.loading import load_model
from common.serving.engine import Draining, Engine, GenRequest, QueueFull, ScoreRequest
from common.text.prompts import prompt_ids


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model).eval()


def ids_for(tokenizer, text):
    return prompt_ids(tokenizer, [{"role": "user", "content": text}])


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
    for r in held:
        r.cancelled = True  # cancelled rows stop at the next step and free their slots
    assert all(r.done.wait(10) for r in held) and {r.finish_reason for r in held} == {"cancelled"}
    late.deadline = time.monotonic() + 0.3
    engine.submit(late)
    assert late.done.wait(5) and late.finish_reason == "timeout" and len(late.out_ids) < 10_000
    assert engine.occupancy() == (0, 0) and engine.peak_admitted == 3


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


def inject(engine, **budget):
    """The decoder body's forward (every pass runs it: prefill, decode, score) raises on the next
    budget[phase] passes of each phase."""
    body = engine.model.model
    real = body.forward

    def forward(*args, **kwargs):
        if budget.get(engine.phase, 0) > 0:
            budget[engine.phase] -= 1
            raise budget.get("error", RuntimeError)(f"injected fault in {engine.phase}")
        return real(*args, **kwargs)
    body.forward = forward
    return budget


def settled(engine):
    """Wait for the scheduler to finish its current pass, then: (admitted, waiting + running)."""
    deadline = time.monotonic() + 30
    while engine.phase != "idle" and time.monotonic() < deadline:
        time.sleep(0.01)
    with engine.wake:
        return engine.admitted, len(engine.pending) + len(engine.rows)


@pytest.fixture
def engine(tiny_model, tokenizer):
    eng = Engine(load_model(tiny_model).eval(), tokenizer, max_concurrent=3, max_queue=4, max_queue_wait_s=30,
                 batch_wait_ms=0, unhealthy_after=2)
    yield eng
    eng.abort("test over")


def test_a_failed_prefill_fails_only_the_joining_request(engine, tokenizer):
    running = request(tokenizer, "正在运行", 300, events=queue.Queue())
    engine.submit(running)
    assert running.events.get(timeout=30)[0] == "delta"
    inject(engine, prefill=1)
    joining = request(tokenizer, "加入", 8)
    engine.submit(joining)
    assert joining.done.wait(10) and joining.finish_reason == "error"
    assert running.done.wait(60) and running.finish_reason == "length" and len(running.out_ids) == 300
    assert settled(engine) == (0, 0) and engine.accounting_errors == 0


def test_a_failed_decode_step_fails_its_rows_and_frees_their_slots(engine, tokenizer):
    rows = [request(tokenizer, f"行{i}", 50) for i in range(2)]
    inject(engine, decode=1)
    with engine.wake:  # both pending before the engine looks, so both are in the failing step
        for r in rows:
            engine.submit(r)
    assert all(r.done.wait(10) for r in rows) and {r.finish_reason for r in rows} == {"error"}
    after = request(tokenizer, "之后", 5)
    engine.submit(after)
    assert after.done.wait(10) and after.finish_reason == "length"
    assert settled(engine) == (0, 0)


def test_a_failed_scoring_pass_fails_that_request(engine, tokenizer):
    inject(engine, score=1)
    bad, good = (ScoreRequest(prompt_ids=[ids_for(tokenizer, "x")], labels=["a", "b"], deadline=time.monotonic() + 30)
                 for _ in range(2))
    engine.submit(bad)
    assert bad.done.wait(10) and bad.finish_reason == "error"
    engine.submit(good)
    assert good.done.wait(10) and good.finish_reason == "stop" and good.logprobs.shape == (1, 2)
    assert settled(engine) == (0, 0)


def test_out_of_memory_on_prefill_retries_one_by_one(engine, tokenizer):
    """An OOM on a joint prefill tries each request alone once: here the first alone fails too, the rest run."""
    engine.batch_wait_s = 0.2  # let the three arrive as one prefill
    inject(engine, prefill=2, error=torch.OutOfMemoryError)
    reqs = [request(tokenizer, f"内存{i}", 4) for i in range(3)]
    for r in reqs:
        engine.submit(r)
    assert all(r.done.wait(20) for r in reqs)
    assert [r.finish_reason for r in reqs] == ["error", "length", "length"]
    assert settled(engine) == (0, 0)


def test_repeated_failures_show_in_health_and_a_success_clears_them(engine, tokenizer):
    inject(engine, prefill=2)
    for i in range(2):
        r = request(tokenizer, f"坏{i}", 4)
        engine.submit(r)
        assert r.done.wait(10) and r.finish_reason == "error"
    assert "prefill: RuntimeError: injected fault" in engine.problem()
    ok = request(tokenizer, "好", 4)
    engine.submit(ok)
    assert ok.done.wait(10) and ok.finish_reason == "length" and engine.problem() is None


def test_drain_ends_what_waits_and_finishes_what_runs(tiny_model, tokenizer):
    eng = Engine(load_model(tiny_model).eval(), tokenizer, max_concurrent=1, max_queue=3, max_queue_wait_s=30,
                 batch_wait_ms=0)
    running = request(tokenizer, "运行", 100, events=queue.Queue())
    eng.submit(running)
    assert running.events.get(timeout=30)[0] == "delta"
    waiting = [request(tokenizer, f"等{i}", 4) for i in range(2)]
    for r in waiting:
        eng.submit(r)
    eng.drain()
    assert all(r.done.is_set() and r.finish_reason == "draining" for r in waiting)  # at once, not after
    with pytest.raises(Draining):
        eng.submit(request(tokenizer, "新", 4))
    assert running.done.wait(60) and running.finish_reason == "length"
    long = request(tokenizer, "被截断", 100_000)
    eng.draining = False  # admit one more to show abort: what runs at the end of a grace period is cut
    eng.submit(long)
    eng.abort("shutdown")
    assert long.done.wait(10) and long.finish_reason == "shutdown" and settled(eng) == (0, 0)


def test_a_burst_is_admitted_only_as_far_as_the_kv_budget_allows(tiny_model, tokenizer):
    """Budget 2 x (prompt + 40): of six long requests at most two run at once, and all six finish."""
    prompt = ids_for(tokenizer, "很长的提示。" * 60)
    budget = 2 * (len(prompt) + 40)
    eng = Engine(load_model(tiny_model).eval(), tokenizer, max_concurrent=3, max_queue=6, max_queue_wait_s=60,
                 batch_wait_ms=0, kv_budget=budget)
    burst = [GenRequest(prompt_ids=prompt, max_tokens=40, deadline=time.monotonic() + 120, ignore_eos=True)
             for _ in range(6)]
    for r in burst:
        eng.submit(r)
    assert all(r.done.wait(120) for r in burst) and {r.finish_reason for r in burst} == {"length"}
    assert eng.peak_rows == 2 and eng.peak_kv_reserved <= budget  # the slots allowed 3; memory allowed 2
    assert settled(eng) == (0, 0)


def test_prefill_passes_take_at_most_max_prefill_tokens(tiny_model, tokenizer):
    prompts = [ids_for(tokenizer, f"预填充{i}" * 20) for i in range(3)]
    eng = Engine(load_model(tiny_model).eval(), tokenizer, max_concurrent=3, max_queue=3, max_queue_wait_s=60,
                 batch_wait_ms=200, max_prefill_tokens=len(prompts[0]) + 1)
    sizes = []
    real = eng._prefill_forward
    eng._prefill_forward = lambda new: (sizes.append(sum(len(r.prompt_ids) for r in new)), real(new))[1]
    reqs = [GenRequest(prompt_ids=p, max_tokens=4, deadline=time.monotonic() + 60) for p in prompts]
    for r in reqs:
        eng.submit(r)
    assert all(r.done.wait(60) for r in reqs)
    assert len(sizes) == 3 and max(sizes) <= len(prompts[0]) + 1  # one prompt a pass, as the cap allows
