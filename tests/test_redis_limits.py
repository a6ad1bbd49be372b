"""Rate limits shared through a real Redis server (started and stopped here): two gunicorn workers count a
client together, and when Redis goes away the service keeps answering, says so in its log and /stats,
and goes back to Redis when it returns."""
import shutil
import subprocess
import time
from collections import Counter

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from serving import free_port, start_server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make system-deps installs it as root)")

CHAT = "/v1/chat/completions"
KEY = {"Authorization": "Bearer sk-redis"}


def wait_for(condition, timeout=60.0, step=0.05):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(step)
    return result


class RedisServer:
    """Debian's redis-server on a free port, in the foreground, nothing saved; start() again on the same port."""

    def __init__(self, logs):
        self.port, self.logs, self.proc = free_port(), logs, None
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        import redis
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=open(self.logs / "redis.log", "a"),
                                     stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers():
            assert self.proc.poll() is None, (self.logs / "redis.log").read_text()
            try:
                return client.ping()
            except redis.ConnectionError:
                return False
        wait_for(answers, timeout=20)
        self.client = client

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_workers(tiny_model, redis_server, tmp_path_factory):
    """Two gunicorn workers behind one port, 10/minute per client, the counters in Redis; keys set, so
    every keyed request also counts failed keys there."""
    srv = start_server(tiny_model, tmp_path_factory.mktemp("logs"), WORKERS="2", RATE_LIMITS="10/minute",
                       RATE_LIMIT_STORAGE=redis_server.url, TRUSTED_PROXIES="1", API_KEYS="sk-redis",
                       QWEN_SERVE_RATE_LIMIT_STORAGE_RETRY_S="0.5")
    yield srv
    srv.stop()


def ask(srv, ip: str, **extra):
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 1}
    return requests.post(srv.url + CHAT, json=body, headers={**KEY, "X-Forwarded-For": ip, **extra}, timeout=30)


def stats(srv) -> dict:
    r = requests.get(srv.url + "/stats", headers=KEY, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_two_workers_share_a_clients_limit_through_redis(two_workers, redis_server):
    served = [ask(two_workers, "10.7.0.1") for _ in range(10)]
    assert [r.status_code for r in served] == [200] * 10
    refused_by = Counter()
    for _ in range(200):  # until both workers have refused the client: the kernel picks who accepts
        r = ask(two_workers, "10.7.0.1")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) > 0 and r.headers["X-RateLimit-Remaining"] == "0"
        refused_by[r.headers["X-Worker"]] += 1
        if len(refused_by) == 2:
            break
    by_worker = Counter(r.headers["X-Worker"] for r in served)
    # both refused the 11th and later, and one of them had served fewer than 10 itself: they count together
    assert len(refused_by) == 2 and any(by_worker[w] < 10 for w in refused_by), (by_worker, refused_by)
    assert ask(two_workers, "10.7.0.2").status_code == 200  # another client behind the proxy: its own budget
    keys = [k.decode() for k in redis_server.client.keys("LIMITS*")]
    assert any("10.7.0.1" in k for k in keys) and any("10.7.0.2" in k for k in keys), keys
    assert {s["rate_limit_storage"]["state"] for s in [stats(two_workers) for _ in range(4)]} == {"ok"}


def both_workers(srv, state: str) -> dict:
    """Poll /stats (each poll checks the key, so it touches the storage) until both workers report `state`."""
    seen = {}

    def done():
        s = stats(srv)
        seen[s["worker"]] = s["rate_limit_storage"]
        return len(seen) == 2 and all(v["state"] == state for v in seen.values())
    wait_for(done, timeout=60, step=0.02)
    return seen


def test_redis_stopped_mid_run_the_service_answers_and_says_so(two_workers, redis_server):
    redis_server.stop()
    seen = both_workers(two_workers, "fallback")
    assert all(v["outages"] == 1 and "ConnectionError" in v["last_error"] and v["since"] > 0 for v in seen.values())
    answers = [ask(two_workers, f"10.7.1.{i}") for i in range(4)]  # counted in each worker's memory meanwhile
    assert [r.status_code for r in answers] == [200] * 4
    assert requests.get(two_workers.url + "/health", timeout=10).status_code == 200
    metrics = requests.get(two_workers.url + "/metrics", timeout=10).text
    (up,) = [s.value for f in text_string_to_metric_families(metrics) for s in f.samples
             if s.name == "qwen_rate_limit_storage_up"]
    assert up == 0.0
    down = [r for r in two_workers.records() if "unreachable" in r["message"]]
    assert len(down) == 2 and {r["rate_limit_storage"] for r in down} == {"fallback"}  # once per worker

    redis_server.start()  # back on the same port: both workers count there again
    both_workers(two_workers, "ok")
    assert len([r for r in two_workers.records() if "answers again" in r["message"]]) == 2
    assert ask(two_workers, "10.7.2.1").status_code == 200
    assert any("10.7.2.1" in k.decode() for k in redis_server.client.keys("LIMITS*"))
    assert "Traceback" not in (two_workers.logs / "stdout.txt").read_text()


def test_refuse_mode_answers_503_while_redis_is_down(tiny_model, tmp_path):
    """serve.rate_limit_storage_down: refuse: no request goes uncounted, so the limited endpoints say 503
    until Redis answers again; /health and /stats keep answering."""
    redis = RedisServer(tmp_path)
    srv = start_server(tiny_model, tmp_path / "logs", RATE_LIMIT_STORAGE=redis.url, TRUSTED_PROXIES="1",
                       API_KEYS="sk-redis", QWEN_SERVE_RATE_LIMIT_STORAGE_DOWN="refuse",
                       QWEN_SERVE_RATE_LIMIT_STORAGE_RETRY_S="0.5")
    try:
        assert ask(srv, "10.8.0.1").status_code == 200
        redis.stop()
        r = ask(srv, "10.8.0.1")
        assert r.status_code == 503 and r.json()["error"]["code"] == "rate_limit_storage_down"
        assert int(r.headers["Retry-After"]) > 0
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
        s = stats(srv)
        assert s["rate_limit_storage"]["state"] == "refusing" and s["rejections"]["rate_limit_storage_down"] == 1
        redis.start()
        wait_for(lambda: ask(srv, "10.8.0.2").status_code == 200, timeout=30, step=0.2)
        assert stats(srv)["rate_limit_storage"]["state"] == "ok"
    finally:
        srv.stop()
        redis.stop()
