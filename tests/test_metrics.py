"""/metrics as an operator of vLLM or TGI expects it, read with prometheus-client's own parser after the real
server has answered, refused, timed out and lost requests: every series there, with values that add up."""
import concurrent.futures as cf
import json
import re
import socket
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from serving import start_server

CHAT = "/v1/chat/completions"
KEY = {"Authorization": "Bearer sk-m"}
OUTCOMES = {"ok", "queue_full", "rate_limited", "too_long", "unauthorized", "timeout", "cancelled"}


def wait_for(condition, timeout=60.0, step=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(step)


def chat(srv, ip: str, text="你好", key=KEY, **extra):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    return requests.post(srv.url + CHAT, json=body, headers={**key, "X-Forwarded-For": ip}, timeout=60)


def stats(srv) -> dict:
    return requests.get(srv.url + "/stats", headers=KEY, timeout=10).json()


def scrape(srv) -> dict:
    """{family name: {(sample name, sorted labels): value}} from /metrics, parsed as Prometheus does."""
    text = requests.get(srv.url + "/metrics", timeout=10).text
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def value(families, family, sample=None, **labels):
    return families[family][(sample or family, tuple(sorted(labels.items())))]


def raw_stream(srv, ip: str, max_tokens: int) -> socket.socket:
    """A streaming chat on a bare socket, read up to its first content chunk: the generation is running."""
    body = json.dumps({"messages": [{"role": "user", "content": "长"}], "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True}).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-m\r\n"
                 b"Connection: close\r\nX-Forwarded-For: %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (CHAT.encode(), ip.encode(), len(body), body))
    seen = b""
    while b'"delta": {"content"' not in seen:  # not the opening {"role": ..., "content": ""}: generated text
        seen += sock.recv(4096)
    return sock


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """One slot and one queue place (6 s at most), 3 requests a minute per client, a 14 s deadline (and a
    token cap high enough that a generation reaches it on any CPU), keys."""
    srv = start_server(tiny_model, tmp_path_factory.mktemp("logs"), API_KEYS="sk-m", TRUSTED_PROXIES="1",
                       RATE_LIMITS="3/minute", MAX_CONCURRENT="1", MAX_QUEUE="1", QWEN_SERVE_MAX_TOKENS="4000",
                       QWEN_SERVE_REQUEST_TIMEOUT_S="14", QWEN_SERVE_MAX_QUEUE_WAIT_S="6")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def loaded(server) -> dict:
    """Every outcome once or more: a long generation holds the slot (cut at the deadline: timeout), one waits
    (and gives up: queue_timeout), a third is refused (queue_full); a client hangs up mid-stream (cancelled);
    a wrong key, a prompt too long, three answers and a fourth over the rate limit. What was seen on the way."""
    seen = {}
    holder = raw_stream(server, "10.9.0.1", max_tokens=4000)
    with cf.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, server, "10.9.0.2")
        wait_for(lambda: stats(server)["queue"] == 1)
        seen["busy"], seen["refused"] = scrape(server), chat(server, "10.9.0.3")
        seen["waited"] = waiting.result(timeout=30)
    holder.settimeout(30)
    seen["held"] = b""
    while chunk := holder.recv(65536):  # the deadline ends the stream: an error event, then [DONE]
        seen["held"] += chunk
    raw_stream(server, "10.9.0.4", max_tokens=4000).close()  # a client that hangs up mid-stream
    wait_for(lambda: stats(server)["rejections"].get("cancelled") == 1, timeout=10)
    seen["wrong_key"] = chat(server, "10.9.0.5", key={"Authorization": "Bearer sk-wrong"})
    seen["too_long"] = chat(server, "10.9.0.5", text="很长的新闻" * 1200)
    seen["codes"] = [chat(server, "10.9.0.6", stream=stream, max_tokens=12).status_code
                     for stream in (False, True, False, False)]
    return seen


def test_gauges_under_load_then_every_outcome_is_counted(server, loaded):
    busy = loaded["busy"]
    assert value(busy, "qwen_num_requests_running") == 1 and value(busy, "qwen_num_requests_waiting") == 1
    assert 0 < value(busy, "qwen_kv_tokens_reserved") <= value(busy, "qwen_kv_budget_tokens")
    assert 0 < value(busy, "qwen_kv_cache_usage_perc") <= 1
    assert loaded["refused"].status_code == 503 and loaded["refused"].json()["error"]["code"] == "queue_full"
    assert loaded["waited"].json()["error"]["code"] == "queue_timeout"
    assert b'"code": "timeout"' in loaded["held"] and b"data: [DONE]" in loaded["held"]
    assert loaded["wrong_key"].status_code == 401
    assert loaded["too_long"].json()["error"]["code"] == "context_length_exceeded"
    assert loaded["codes"] == [200, 200, 200, 429]
    by_outcome = stats(server)["requests"]["by_outcome"]
    assert OUTCOMES <= set(by_outcome) and by_outcome["timeout"] == 1 and by_outcome["too_long"] == 1, by_outcome


def test_every_series_is_there_with_values_that_add_up(server, loaded):
    m, s = scrape(server), stats(server)
    requests_by = {dict(k[1])["outcome"]: v for k, v in m["qwen_requests"].items() if k[0] == "qwen_requests_total"}
    assert OUTCOMES <= set(requests_by) and requests_by == s["requests"]["by_outcome"]
    # idle again: nothing runs, nothing waits, no KV reserved; the budget stays
    assert value(m, "qwen_num_requests_running") == value(m, "qwen_num_requests_waiting") == 0
    assert value(m, "qwen_kv_tokens_reserved") == 0 < value(m, "qwen_kv_budget_tokens")
    # tokens: the same totals as /stats, under vLLM's names and the older one
    assert value(m, "qwen_prompt_tokens", "qwen_prompt_tokens_total") == s["tokens"]["prompt"] > 0
    assert value(m, "qwen_generation_tokens", "qwen_generation_tokens_total") == s["tokens"]["completion"] > 0
    assert value(m, "qwen_tokens", "qwen_tokens_total", kind="completion") == s["tokens"]["completion"]
    # finish reasons: the answered generations stopped or hit their length; timeout, cancelled, queue_timeout: aborts
    finished = {dict(k[1])["finished_reason"]: v for k, v in m["qwen_request_success"].items()
                if k[0] == "qwen_request_success_total"}
    assert finished.get("stop", 0) + finished.get("length", 0) == 3 and finished["abort"] == 3
    hist = {name: histogram(m, name) for name in ("qwen_time_to_first_token_seconds", "qwen_inter_token_latency_seconds",
                                                  "qwen_e2e_request_latency_seconds", "qwen_request_queue_time_seconds")}
    assert hist["qwen_e2e_request_latency_seconds"]["count"] == 3  # the answered generations
    # those, and the two cut short after their first token (the one that gave up waiting never started)
    assert hist["qwen_time_to_first_token_seconds"]["count"] == hist["qwen_request_queue_time_seconds"]["count"] == 5
    assert hist["qwen_inter_token_latency_seconds"]["count"] > 20  # a gap per token after the first
    mean = {name: h["sum"] / h["count"] for name, h in hist.items()}
    assert 0 < mean["qwen_inter_token_latency_seconds"] < mean["qwen_e2e_request_latency_seconds"]
    assert 0 < mean["qwen_time_to_first_token_seconds"] and mean["qwen_request_queue_time_seconds"] >= 0
    assert value(m, "process_resident_memory_bytes") > 0
    import torch
    assert ("qwen_gpu_memory_used_bytes" in m) == torch.cuda.is_available()  # only where CUDA is present


def histogram(m, name) -> dict:
    """count and sum of a histogram, after checking its buckets are cumulative and end at the count."""
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m[name].items() if k[0] == name + "_bucket")
    counts = [v for _, v in buckets]
    count, total = value(m, name, name + "_count"), value(m, name, name + "_sum")
    assert counts == sorted(counts) and buckets[-1] == (float("inf"), count) and total >= 0
    return {"count": count, "sum": total}


def test_stats_last_minute_block(server, loaded):
    recent = stats(server)["last_minute"]
    assert recent["requests_per_s"] > 0 and recent["completion_tokens_per_s"] > 0
    assert recent["latency_s"]["p50"] <= recent["latency_s"]["p95"] and recent["ttft_s"]["p95"] > 0
    assert recent["by_outcome"]["ok"] == 3


def test_the_grafana_dashboard_plots_series_the_server_exposes(server, loaded):
    """deploy/grafana-dashboard.json: a Grafana dashboard (its datasource picked on import) whose every query
    names a series this server exposes, and that plots the load, latencies, tokens, outcomes and memory."""
    from conftest import ROOT
    board = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "instance"}
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all(p["targets"] for p in panels)
    used = {name for p in panels for t in p["targets"] for name in re.findall(r"\b(?:qwen|process)_\w+", t["expr"])}
    exposed = {s.name for f in text_string_to_metric_families(requests.get(server.url + "/metrics", timeout=10).text)
               for s in f.samples}
    import torch
    absent_here = {"qwen_rate_limit_storage_up"} | (set() if torch.cuda.is_available() else
                                                    {"qwen_gpu_memory_used_bytes", "qwen_gpu_memory_total_bytes"})
    assert used - exposed == absent_here  # the rest only with Redis (tests/test_redis_limits.py) or CUDA
    for series in ("qwen_num_requests_running", "qwen_num_requests_waiting", "qwen_time_to_first_token_seconds_bucket",
                   "qwen_inter_token_latency_seconds_bucket", "qwen_e2e_request_latency_seconds_bucket",
                   "qwen_request_queue_time_seconds_bucket", "qwen_prompt_tokens_total", "qwen_generation_tokens_total",
                   "qwen_request_success_total", "qwen_requests_total", "qwen_kv_tokens_reserved",
                   "qwen_kv_budget_tokens", "qwen_gpu_memory_used_bytes", "qwen_gpu_memory_total_bytes"):
        assert series in used, series
