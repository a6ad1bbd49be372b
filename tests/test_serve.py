"""The real gunicorn service on a free localhost port with the tiny model: API, limits, errors, shutdown."""
import concurrent.futures as cf
import json
import socket
import time

import openai
import pytest
import requests
from serving import start_server

CHAT = "/v1/chat/completions"
LONG = {"max_tokens": 128, "ignore_eos": True}  # a generation that keeps its slot for a while


def wait_for(condition, timeout=60.0):
    """Poll until condition() holds (an event the test waits on, not a guessed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def chat(text="你好", **extra):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The 8B profile's serving limits (3 running, 10 waiting, the token caps) on the tiny model."""
    srv = start_server(tiny_model, tmp_path_factory.mktemp("logs"), QWEN_SERVE_RATE_LIMITS="1000/minute",
                       QWEN_PROFILE="none")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    """API keys, 10/minute per client behind one trusted proxy, a 5 s request deadline, one slot; 4,000
    new tokens allowed, so a long generation outlasts the deadline on any machine."""
    srv = start_server(tiny_model, tmp_path_factory.mktemp("logs"), API_KEYS="sk-good,sk-other",
                       RATE_LIMITS="10/minute", TRUSTED_PROXIES="1", QWEN_SERVE_REQUEST_TIMEOUT_S="5",
                       MAX_CONCURRENT="1", QWEN_SERVE_MAX_TOKENS="4000")
    yield srv
    srv.stop()


def client(srv, key="unused", ip=None):
    headers = {"X-Forwarded-For": ip} if ip else None
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, default_headers=headers)


def test_openai_sdk_chat_stream_completions_models(server):
    c = client(server)
    (model,) = [m.id for m in c.models.list()]
    assert model == "tiny-qwen3"
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "你好"}], max_tokens=5)
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "你好"}], max_tokens=6,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text  # the deltas carry the generated text
    comp = c.completions.create(model=model, prompt="The market", max_tokens=4)
    assert comp.object == "text_completion" and comp.usage.completion_tokens <= 4


def test_sse_ends_with_done(server):
    r = requests.post(server.url + CHAT, json=chat(stream=True), stream=True, timeout=30)
    lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert r.headers["Content-Type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_classification_answers_a_valid_label_with_probability(server):
    labels = ["货币政策", "股市", "房地产"]
    r = requests.post(server.url + CHAT, json=chat("央行宣布降准", labels=labels), timeout=30).json()
    msg = r["choices"][0]["message"]
    assert msg["content"] in labels and msg["label"] == msg["content"]
    assert abs(sum(msg["probabilities"].values()) - 1) < 1e-4 and msg["probability"] == max(msg["probabilities"].values())
    vllm = requests.post(server.url + CHAT, json=chat("央行宣布降准", guided_choice=labels), timeout=30).json()
    assert vllm["choices"][0]["message"]["content"] == msg["content"]  # same scores, either spelling
    batch = requests.post(server.url + "/v1/classify", json={"text": ["沪指收涨", "楼市新政"], "labels": labels},
                          timeout=30).json()
    assert [x["label"] in labels for x in batch["results"]] == [True, True]


def test_sdk_bad_request_error(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "x"}],
                                               temperature=5)
    assert "temperature" in str(e.value)


BAD_REQUESTS = [
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ({"data": b'{"messages": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}, 400, "UTF-8"),
    ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "application/json"),
    ({"json": {"messages": []}}, 400, "'messages' must be a non-empty list"),
    ({"json": {"messages": [{"role": "robot", "content": "x"}]}}, 400, "messages[0].role"),
    ({"json": {"messages": [{"role": "user", "content": 5}]}}, 400, "messages[0].content"),
    ({"json": {"messages": [{"role": "system", "content": "x"}]}}, 400, "at least one user message"),
    ({"json": chat(n=2)}, 400, "'n' = 2 is not supported"),
    ({"json": chat(temperature="hot")}, 400, "'temperature' must be a number"),
    ({"json": chat(top_p=0)}, 400, "'top_p' must be between"),
    ({"json": chat(max_tokens=100000)}, 400, "'max_tokens' must be between 1 and 512"),
    ({"json": chat(stop=["a", "b", "c", "d", "e"])}, 400, "at most 4 strings"),
    ({"json": chat(tools=[{}])}, 400, "unsupported field 'tools'"),
    ({"json": chat(labels=["only-one"])}, 400, "'labels' must be true"),
    ({"json": chat(labels=True)}, 400, "no labels.json"),
    ({"json": chat(model="gpt-4")}, 404, "model 'gpt-4' is not served here"),
    ({"json": chat("很长的新闻" * 1200)}, 400, "this server accepts at most 2048"),
    ({"data": b"{" + b" " * 1_100_000 + b"}", "headers": {"Content-Type": "application/json"}}, 413, ""),
    ({"json": [1, 2]}, 400, "must be a JSON object"),
    ({"data": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
      "headers": {"Content-Type": "application/json"}}, 400, "nested too deeply"),
    ({"data": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
      "headers": {"Content-Type": "application/json"}}, 400, "lone UTF-16 surrogate"),
    ({"json": chat(top_k="many")}, 400, "'top_k' must be an integer"),
    ({"json": chat(min_p=1.5)}, 400, "'min_p' must be between 0 and 1"),
    ({"json": chat(presence_penalty=3)}, 400, "'presence_penalty' must be between -2 and 2"),
    ({"json": chat(repetition_penalty=0)}, 400, "'repetition_penalty' must be between"),
]


def test_chunked_bodies_broken_or_too_large_get_4xx(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(body)["error"]["code"] == "invalid_body"
    too_large = (b"{" + b" " * 100_000 for _ in range(12))  # a generator: requests sends it chunked, no length
    r = requests.post(server.url + CHAT, data=too_large, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text


@pytest.mark.parametrize("kwargs,status,message", BAD_REQUESTS, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_4xx_json(server, kwargs, status, message):
    r = requests.post(server.url + CHAT, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and message in err["message"]


def test_a_request_without_sampling_fields_gets_the_configured_defaults(server):
    """temperature 0.3 (the seed's), top_p 0.8 and top_k 20 (Qwen3's non-thinking advice: the tiny model's
    generation_config.json names none), never OpenAI's 1.0: logged, and the same draws as naming them."""
    quiet = requests.post(server.url + CHAT, json=chat("采样", max_tokens=12, seed=11), timeout=30).json()
    named = requests.post(server.url + CHAT, json=chat("采样", max_tokens=12, seed=11, temperature=0.3, top_p=0.8,
                                                        top_k=20), timeout=30).json()
    hot = requests.post(server.url + CHAT, json=chat("采样", max_tokens=12, seed=11, temperature=1.0, top_p=1.0,
                                                      top_k=0), timeout=30).json()
    text = [r["choices"][0]["message"]["content"] for r in (quiet, named, hot)]
    assert text[0] == text[1] and text[0] != text[2]
    logged = [r["sampling"] for r in server.records() if "sampling" in r]
    assert {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "min_p": 0.0, "seed": 11}.items() <= logged[-3].items()


def test_penalties_are_accepted_and_applied(server):
    """Greedy, the tiny model repeats tokens within 100 (89 distinct here); the penalties change that."""
    plain = chat("重复", max_tokens=100, ignore_eos=True, temperature=0)
    greedy = requests.post(server.url + CHAT, json=plain, timeout=60).json()
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.5}):
        r = requests.post(server.url + CHAT, json={**plain, **penalty}, timeout=60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] != greedy["choices"][0]["message"]["content"], penalty


def test_no_traceback_in_the_server_log(server):
    requests.get(server.url + "/nowhere", timeout=10)
    requests.delete(server.url + CHAT, timeout=10)
    assert "Traceback" not in server.log_text()


def test_burst_is_bounded_by_slots_and_queue(server):
    before = requests.get(server.url + "/stats", timeout=10).json()

    def one(i):
        r = requests.post(server.url + CHAT, json=chat(f"请求{i}", **LONG), timeout=120)
        return r.status_code, r.headers.get("Retry-After")

    with cf.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) <= 13 and codes.count(200) >= 3
    assert all(ra for c, ra in results if c == 503)  # every refusal says when to retry
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    after = requests.get(server.url + "/stats", timeout=10).json()
    delta = {k: after["requests"]["by_outcome"].get(k, 0) - before["requests"]["by_outcome"].get(k, 0)
             for k in ("ok", "queue_full", "queue_timeout")}
    assert delta["ok"] == codes.count(200) and delta["queue_full"] + delta["queue_timeout"] == codes.count(503)
    assert after["in_flight"] == 0 and after["queue"] == 0 and after["latency_s"]["p95"] is not None
    assert after["peak_admitted"] <= 13  # never more than 3 decoding + 10 waiting at once


def test_monitoring_endpoints(server):
    stats = requests.get(server.url + "/stats", timeout=10).json()
    assert stats["limits"]["max_concurrent"] == 3 and stats["limits"]["max_queue"] == 10
    assert stats["engine"]["effective_concurrency"] == 3 and "ceiling" in stats["engine"]["concurrency_set_by"]
    assert "rss_gib" in stats["memory"] or "used_gib" in stats["memory"]
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert "qwen_requests_total" in metrics and "qwen_in_flight" in metrics
    r = requests.get(server.url + "/health", headers={"X-Request-ID": "abc-123"}, timeout=10)
    assert r.headers["X-Request-ID"] == "abc-123"


def test_sdk_authentication_error(guarded):
    with pytest.raises(openai.AuthenticationError):
        client(guarded, key="sk-wrong", ip="10.0.0.1").models.list()
    assert client(guarded, key="sk-other", ip="10.0.0.1").models.list().data[0].id == "tiny-qwen3"
    assert requests.get(guarded.url + "/health", timeout=10).status_code == 200  # health stays open


def test_guessing_keys_is_rate_limited_per_address(guarded):
    """20 bad keys a minute from one address, then 429 (even for a right key); other addresses go on."""
    bad = {"Authorization": "Bearer sk-guess", "X-Forwarded-For": "10.0.0.9"}
    codes = [requests.get(guarded.url + "/v1/models", headers=bad, timeout=10).status_code for _ in range(21)]
    assert codes == [401] * 20 + [429]
    good = {"Authorization": "Bearer sk-good", "X-Forwarded-For": "10.0.0.9"}
    r = requests.get(guarded.url + "/v1/models", headers=good, timeout=10)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and r.json()["error"]["code"] == "auth_failures"
    assert requests.get(guarded.url + "/v1/models", headers={**good, "X-Forwarded-For": "10.0.0.10"},
                        timeout=10).status_code == 200


def test_stats_needs_a_key_and_shows_no_paths(guarded, tiny_model):
    assert requests.get(guarded.url + "/stats", headers={"X-Forwarded-For": "10.0.0.11"}, timeout=10).status_code == 401
    r = requests.get(guarded.url + "/stats", headers={"Authorization": "Bearer sk-good"}, timeout=10)
    assert r.status_code == 200 and str(tiny_model.parent) not in r.text and r.json()["model_dir"] == tiny_model.name
    assert str(tiny_model.parent) not in requests.get(guarded.url + "/metrics", timeout=10).text


def test_rate_limit_headers_describe_the_closest_limit(guarded):
    headers = {"Authorization": "Bearer sk-good", "X-Forwarded-For": "10.0.0.12"}
    r = requests.post(guarded.url + CHAT, json=chat(max_tokens=1), headers=headers, timeout=30)
    assert r.status_code == 200 and "Retry-After" not in r.headers
    assert r.headers["X-RateLimit-Limit"] == "10" and r.headers["X-RateLimit-Remaining"] == "9"  # per IP, not global


def test_eleventh_request_in_a_minute_is_rate_limited(guarded):
    c = client(guarded, key="sk-good", ip="10.0.0.2")
    for _ in range(10):
        c.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert int(e.value.response.headers["Retry-After"]) > 0
    # another client behind the same proxy has its own budget
    client(guarded, key="sk-good", ip="10.0.0.3").chat.completions.create(
        model="tiny-qwen3", messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_deadline_gives_504_and_frees_the_slot(guarded):
    headers = {"Authorization": "Bearer sk-good", "X-Forwarded-For": "10.0.0.4"}
    r = requests.post(guarded.url + CHAT, json=chat(max_tokens=4000, ignore_eos=True), headers=headers, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    # the server's only slot: had the timed-out generation kept running, this one would wait past its deadline
    r = requests.post(guarded.url + CHAT, json=chat(max_tokens=2), headers=headers, timeout=30)
    assert r.status_code == 200
    stats = requests.get(guarded.url + "/stats", headers=headers, timeout=10).json()
    assert stats["in_flight"] == 0 and stats["rejections"].get("timeout") == 1
    timed_out = [json.loads(line) for line in (guarded.logs / "serve.jsonl").read_text().splitlines()
                 if '"status": 504' in line]
    assert len(timed_out) == 1 and 0 < timed_out[0]["completion_tokens"] < 4000  # it stopped where the deadline fell


def test_8bit_serving_on_cpu(tiny_model, tmp_path):
    """8-bit with model.int8_threshold from the environment: the layers run with it, and /stats says so."""
    srv = start_server(tiny_model, tmp_path / "logs", QUANTIZATION="8bit", QWEN_MODEL_INT8_THRESHOLD="0.0")
    try:
        r = requests.post(srv.url + CHAT, json=chat(max_tokens=4), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert "quantization 8bit" in srv.log_text()
        placement = requests.get(srv.url + "/stats", timeout=10).json()["placement"]
        assert placement["quantization"] == "8bit" and placement["int8_threshold"] == 0.0, placement
    finally:
        srv.stop()


def test_sigterm_finishes_in_flight_requests(tiny_model, tmp_path):
    srv = start_server(tiny_model, tmp_path / "logs", QWEN_SERVE_GRACEFUL_TIMEOUT_S="50")
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(requests.post, srv.url + CHAT, json=chat(f"问{i}", max_tokens=200, ignore_eos=True),
                               timeout=120) for i in range(3)]
        wait_for(lambda: requests.get(srv.url + "/stats", timeout=10).json()["in_flight"] == 3)
        code = srv.stop()
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.json()["usage"]["completion_tokens"] == 200 for a in answers)
    assert code == 0


def test_test_api_script_passes_against_the_service(server):
    from conftest import run_script
    proc = run_script("test_api.py", "--url", server.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  answers     accuracy" in proc.stdout and "PASS  streaming" in proc.stdout


def test_test_api_limits_mode_shows_429(guarded):
    from conftest import run_script
    proc = run_script("test_api.py", "--url", guarded.url, "--api-key", "sk-good", "--limits", "--max-items", "4",
                      "--batch", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "429 on call" in proc.stdout
    bad = run_script("test_api.py", "--url", guarded.url, "--api-key", "sk-wrong", "--max-items", "4")
    assert bad.returncode == 1 and "FAIL  models      401" in bad.stdout


def test_test_api_says_when_nothing_answers():
    from conftest import run_script
    from serving import free_port
    proc = run_script("test_api.py", "--url", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and "start it with bash start_production.sh" in proc.stdout


def test_memory_budget_bounds_a_burst_and_refuses_what_never_fits(tiny_model, tokenizer, tmp_path):
    """A KV budget of two long requests: six at once all succeed, at most two at a time; one that could
    never fit gets a 400 with the numbers instead of a place in the queue."""
    from common.text.prompts import prompt_ids
    long = "很长的新闻" * 100
    prompt_tokens = len(prompt_ids(tokenizer, [{"role": "user", "content": long + "0"}]))
    budget = 2 * (prompt_tokens + 64) + 50  # two fit, three do not
    srv = start_server(tiny_model, tmp_path / "logs", RATE_LIMITS="1000/minute", MAX_CONCURRENT="3",
                       QWEN_SERVE_KV_BUDGET_TOKENS=str(budget))
    try:
        with cf.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda i: requests.post(srv.url + CHAT, json=chat(long + str(i), max_tokens=64,
                                                                                     ignore_eos=True),
                                                          timeout=120).status_code, range(6)))
        assert codes == [200] * 6
        engine = requests.get(srv.url + "/stats", timeout=10).json()["engine"]
        assert engine["peak_running"] == 2 and engine["peak_kv_tokens_reserved"] <= engine["kv_budget_tokens"] == budget
        r = requests.post(srv.url + CHAT, json=chat(long + "0", max_tokens=512), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_budget_exceeded"
        assert f"{prompt_tokens + 512:,}" in r.json()["error"]["message"] and f"{budget:,}" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_base_plus_adapter_with_its_labels(tiny_model, trained_run, tmp_path):
    """ADAPTER_PATH: the run's adapter on its base; `labels: true` uses the run's labels.json."""
    import json as _json
    labels = _json.loads((trained_run / "labels.json").read_text())["labels"]
    srv = start_server(tiny_model, tmp_path / "logs", ADAPTER_PATH=str(trained_run))
    try:
        r = requests.post(srv.url + CHAT, json=chat("央行宣布降准", labels=True), timeout=60).json()
        assert r["model"] == trained_run.name and r["choices"][0]["message"]["content"] in labels
        c = requests.post(srv.url + "/v1/classify", json={"text": "沪指收涨"}, timeout=60).json()
        assert c["results"][0]["label"] in labels and set(c["results"][0]["probabilities"]) == set(labels)
        assert f"+ adapter {trained_run}" in srv.log_text()
    finally:
        srv.stop()


def test_the_models_temperature_calibrates_its_own_labels_only(server, tiny_model, tmp_path):
    from common.evaluation.calibration import write_calibration
    (model := tmp_path / "calibrated").mkdir()
    [(model / f.name).symlink_to(f) for f in tiny_model.iterdir()]  # the same weights, with calibration.json
    labels, texts = ["货币政策", "股市", "房地产"], ["央行宣布降准", "沪指收涨"]
    (model / "labels.json").write_text(json.dumps({"task": "classification", "labels": labels}))
    write_calibration(model, 2.0, split="val", items=100)
    classify = lambda srv, **x: requests.post(srv.url + "/v1/classify", json={"text": texts, **x}, timeout=60).json()["results"]  # noqa: E731,E501
    raw, srv = classify(server, labels=labels), start_server(model, tmp_path / "logs", RATE_LIMITS="1000/minute")
    try:
        own, shuffled, other = classify(srv), classify(srv, labels=labels[::-1]), classify(srv, labels=labels[:2])
        assert [r["calibrated"] for r in raw + own + shuffled + other] == [False] * 2 + [True] * 4 + [False] * 2
        assert requests.post(srv.url + CHAT, json=chat(texts[0], labels=True)).json()["choices"][0]["message"]["calibrated"]
        for r, p in zip(own, raw):  # T = 2: the raw probabilities' square roots, renormalized
            roots = {k: v ** 0.5 for k, v in p["probabilities"].items()}
            assert all(abs(r["probabilities"][k] - roots[k] / sum(roots.values())) < 1e-4 for k in labels), (r, p)
            assert r["label"] == p["label"] and r["probability"] < p["probability"]  # same label, less sure
        assert [requests.get(s.url + "/stats").json()["placement"]["label_temperature"] for s in (server, srv)] == [None, 2]
    finally:
        srv.stop()


def test_benchmark_modes_run_against_the_service(server, tmp_path):
    """benchmark.py's three modes, reduced, against the real server: figures come out, none is made up."""
    from conftest import run_script
    runs = {}
    for mode, extra in (("generate", ["--requests", "2", "--max-tokens", "4", "--concurrency", "1"]),
                        ("classify", ["--classify-items", "4", "--concurrency", "1"]),
                        ("overload", ["--clients", "4", "--per-client", "2", "--max-tokens", "4"])):
        out = tmp_path / f"{mode}.json"
        proc = run_script("benchmark.py", "--url", server.url, "--mode", mode, "--json", str(out), *extra)
        assert proc.returncode == 0 and "machine:" in proc.stdout, proc.stdout + proc.stderr
        runs[mode] = json.loads(out.read_text())["runs"]
    assert runs["generate"][0]["tokens_per_s"] > 0
    assert len({r["way"] for r in runs["classify"]}) == 3 and all(r["items"] == 4 for r in runs["classify"])
    overload = runs["overload"][0]
    assert overload["served"] + overload["refused"] == overload["requests"] == 8 and overload["tokens_per_s"] > 0
