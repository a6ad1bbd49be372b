"""The real gunicorn service on a bad day: engine faults, clients that leave, a SIGTERM mid-load.
Every admitted request gets exactly one answer, and no capacity is lost."""
import concurrent.futures as cf
import json
import signal
import socket
import time
import uuid

import pytest
import requests
from serving import start_server

CHAT = "/v1/chat/completions"


def chat(text="你好", **extra):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def wait_for(condition, timeout=60.0, step=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(step)


def engine_stats(srv):
    return requests.get(srv.url + "/stats", timeout=10).json()


def open_stream(srv, **body):
    """A streaming chat request, read up to its first content chunk (the generation is running)."""
    r = requests.post(srv.url + CHAT, json=chat(stream=True, **body), stream=True, timeout=60)
    lines = r.iter_lines(decode_unicode=True)
    for line in lines:
        if line.startswith("data: ") and '"content"' in line and '"role"' not in line:
            return r, lines
    raise AssertionError("the stream never produced content")


def rest_of(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def stream_to_end(srv, **body) -> list[str]:
    return rest_of(open_stream(srv, **body)[1])


@pytest.fixture(scope="module")
def faulty(tiny_model, tmp_path_factory):
    """The real server with tests/faults.conf.py: the model's forward raises when the test asks."""
    logs = tmp_path_factory.mktemp("logs")
    srv = start_server(tiny_model, logs, conf="tests/faults.conf.py", FAULTS_FILE=str(logs / "faults.json"),
                       RATE_LIMITS="100000/minute", MAX_CONCURRENT="3", MAX_QUEUE="10",
                       QWEN_SERVE_REQUEST_TIMEOUT_S="110", QWEN_SERVE_UNHEALTHY_AFTER_FAILURES="3",
                       QWEN_SERVE_MAX_TOKENS="4000", QWEN_SERVE_MAX_QUEUE_WAIT_S="100")
    def faults(**n):  # written aside, then renamed: the injector never reads half a file
        (logs / "faults.tmp").write_text(json.dumps({"id": uuid.uuid4().hex, **n}))
        (logs / "faults.tmp").replace(logs / "faults.json")
    srv.faults = faults
    yield srv
    srv.stop()


def timed(fn):
    t0 = time.monotonic()
    r = fn()
    return r, time.monotonic() - t0


def test_a_failed_prefill_answers_500_at_once_and_leaves_the_running_batch_alone(faulty):
    stream, lines = open_stream(faulty, max_tokens=200, ignore_eos=True)
    faulty.faults(prefill=1)
    r, seconds = timed(lambda: requests.post(faulty.url + CHAT, json=chat(), timeout=60))
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error" and seconds < 1.0, seconds
    events = rest_of(lines)  # the stream that was running goes on to the end
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_a_failed_decode_step_and_scoring_pass_answer_500_then_the_next_succeed(faulty):
    faulty.faults(decode=1)
    r, seconds = timed(lambda: requests.post(faulty.url + CHAT, json=chat(max_tokens=50), timeout=60))
    assert r.status_code == 500 and seconds < 1.0, seconds
    assert requests.post(faulty.url + CHAT, json=chat(), timeout=60).status_code == 200
    faulty.faults(score=1)
    body = {"text": "央行降准", "labels": ["货币政策", "股市"]}
    r, seconds = timed(lambda: requests.post(faulty.url + "/v1/classify", json=body, timeout=60))
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error" and seconds < 1.0, seconds
    assert requests.post(faulty.url + "/v1/classify", json=body, timeout=60).status_code == 200


def test_a_failed_step_mid_stream_ends_it_with_an_error_event(faulty):
    stream, lines = open_stream(faulty, max_tokens=200, ignore_eos=True)
    faulty.faults(decode=1)
    events = rest_of(lines)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error"


def test_repeated_failures_turn_health_503_and_a_success_clears_it(faulty):
    faulty.faults(prefill=3)
    for _ in range(3):
        assert requests.post(faulty.url + CHAT, json=chat(), timeout=60).status_code == 500
    health = requests.get(faulty.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert "injected fault in prefill" in health.json()["error"]
    assert requests.post(faulty.url + CHAT, json=chat(), timeout=60).status_code == 200
    assert requests.get(faulty.url + "/health", timeout=10).status_code == 200


def test_after_the_faults_every_slot_and_queue_place_still_works(faulty):
    """13 at once = 3 running + 10 queued, all answered: no capacity was lost to the failures above."""
    with cf.ThreadPoolExecutor(13) as pool:
        codes = list(pool.map(lambda i: requests.post(faulty.url + CHAT, json=chat(f"问{i}", max_tokens=32,
                                                                                      ignore_eos=True),
                                                        timeout=120).status_code, range(13)))
    assert codes == [200] * 13, [faulty.records()[-14:]]
    engine = engine_stats(faulty)["engine"]
    assert engine["admitted"] == engine["waiting"] + engine["running"] == 0
    assert engine["accounting_errors"] == 0 and engine["failed_passes"] >= 6
    assert "Traceback" not in (faulty.logs / "stdout.txt").read_text()  # failures are logged, not dumped


def raw_request(srv, body: dict) -> socket.socket:
    """A request sent on a bare socket, so the test can hang up whenever it likes."""
    data = json.dumps(body).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_a_client_that_hangs_up_frees_its_slot_and_is_logged_as_cancelled(faulty):
    sock = raw_request(faulty, chat(max_tokens=4000, ignore_eos=True))  # ~50 s of decoding here
    wait_for(lambda: engine_stats(faulty)["in_flight"] == 1)
    sock.close()
    left = time.monotonic()
    wait_for(lambda: engine_stats(faulty)["in_flight"] == 0, timeout=10)
    assert (freed := time.monotonic() - left) < 1.0, freed  # a slot kept to the end would take a minute
    wait_for(lambda: any(r.get("status") == 499 for r in faulty.records()), timeout=10)
    (record,) = [r for r in faulty.records() if r.get("status") == 499]
    assert record["outcome"] == "cancelled" and record["completion_tokens"] < 4000


def test_a_stream_that_is_dropped_is_cancelled_not_a_timeout(faulty):
    before, logged = engine_stats(faulty)["rejections"], len([r for r in faulty.records() if r.get("status") == 499])
    sock, seen = raw_request(faulty, chat(max_tokens=500, ignore_eos=True, stream=True)), b""
    def generating(data: bytes) -> bool:  # a content chunk past the opening one (which names the role)
        return any(b'"content"' in line and b'"role"' not in line for line in data.split(b"\n"))
    while not generating(seen.split(b"\r\n\r\n", 1)[-1]):
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream before any content"
        seen += chunk
    sock.close()  # hang up as a closed browser tab does
    wait_for(lambda: engine_stats(faulty)["rejections"].get("cancelled", 0) > before.get("cancelled", 0), timeout=10)
    wait_for(lambda: engine_stats(faulty)["in_flight"] == 0, timeout=10)  # its slot is free at the next step
    assert engine_stats(faulty)["rejections"].get("timeout", 0) == before.get("timeout", 0)
    # /stats counts before the log line is written: wait for the line
    wait_for(lambda: len([r for r in faulty.records() if r.get("status") == 499]) == logged + 1, timeout=10)
    cancelled = [r for r in faulty.records() if r.get("status") == 499]
    assert len(cancelled) == logged + 1 and cancelled[-1]["outcome"] == "cancelled"
    assert cancelled[-1]["completion_tokens"] > 0  # it was streaming when the client left


def test_sigterm_refuses_the_queue_at_once_and_finishes_what_runs(tiny_model, tmp_path):
    srv = start_server(tiny_model, tmp_path / "logs", RATE_LIMITS="100000/minute", MAX_CONCURRENT="3",
                       MAX_QUEUE="10", QWEN_SERVE_GRACEFUL_TIMEOUT_S="120", QWEN_SERVE_REQUEST_TIMEOUT_S="300")
    pool = cf.ThreadPoolExecutor(8)
    try:
        running = [pool.submit(stream_to_end, srv, max_tokens=150, ignore_eos=True) for _ in range(3)]
        wait_for(lambda: engine_stats(srv)["in_flight"] == 3)
        queued = [pool.submit(requests.post, srv.url + CHAT, json=chat(f"排队{i}"), timeout=120) for i in range(5)]
        wait_for(lambda: engine_stats(srv)["queue"] == 5)
        srv.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        refused = [f.result(timeout=15) for f in queued]
        assert (took := time.monotonic() - sent) < 1.0, took  # answered now, not after the three finish
        assert [r.status_code for r in refused] == [503] * 5
        assert {r.json()["error"]["code"] for r in refused} == {"draining"} and all("Retry-After" in r.headers
                                                                                 for r in refused)
        sent = time.monotonic()
        wait_for(lambda: requests.get(srv.url + "/health", timeout=1).status_code == 503, timeout=5)
        assert (took := time.monotonic() - sent) < 1.0, took  # before, it hung and the connection reset
        for f in running:
            events = f.result(timeout=120)
            assert events[-1] == "[DONE]" and "choices" in json.loads(events[-2]), events[-2]
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(timeout=60) == 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        srv.stop()
