"""FRONT=nginx bash start_production.sh: the shipped nginx config in front of the real gunicorn server.
Clients that trickle their request a byte at a time hold nginx connections, not gunicorn's threads."""
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests
from conftest import ROOT
from serving import free_port

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None,
                                reason="nginx is not installed: `make system-deps` (as root) or apt-get install nginx")


@pytest.fixture(scope="module")
def fronted(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QWEN_")}, "FRONT": "nginx", "PORT": str(port),
           "HOST": "127.0.0.1", "MODEL_PATH": str(tiny_model), "LOGS_DIR": str(logs), "PYTHON": sys_python()}
    proc = subprocess.Popen(["bash", str(ROOT / "start_production.sh")], cwd=ROOT, env=env,
                            stdout=open(logs / "start.txt", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (logs / "start.txt").read_text()[-3000:]
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.3)
    # one answer first, so the timed ones below measure the slow clients, not the first forward pass
    assert requests.post(url + "/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}).status_code == 200
    yield proc, url, logs
    if proc.poll() is None:
        proc.kill()


def sys_python() -> str:
    import sys
    return sys.executable


def trickle(port: int, stop: threading.Event) -> None:
    """A request header sent one byte every 2 s, as a slowloris client does."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            if stop.wait(2.0):
                return
            try:
                s.send(bytes([byte]))
            except OSError:  # nginx closed it (client_header_timeout): what it should do
                return


def test_25_slow_clients_do_not_delay_health_or_chat(fronted):
    proc, url, _ = fronted
    stop = threading.Event()
    port = int(url.rsplit(":", 1)[1])
    slow = [threading.Thread(target=trickle, args=(port, stop), daemon=True) for _ in range(25)]
    for t in slow:
        t.start()
    try:
        time.sleep(4)  # every slow connection is open and has sent bytes: each would hold a gunicorn thread
        for _ in range(3):
            health = requests.get(url + "/health", timeout=2)  # a timeout here is the failure
            chat = requests.post(url + "/v1/chat/completions", timeout=2,
                                 json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4})
            assert health.status_code == 200 and chat.status_code == 200
            assert chat.json()["usage"]["completion_tokens"] >= 1
    finally:
        stop.set()


def test_nginx_refusals_are_json_and_metrics_stay_internal(fronted):
    _, url, _ = fronted
    r = requests.post(url + "/v1/chat/completions", data=b"{" + b" " * 1_500_000 + b"}",
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] in ("body_too_large",)
    assert requests.get(url + "/metrics", timeout=5).status_code == 200  # from 127.0.0.1: allowed


def test_sigterm_drains_through_nginx_and_both_exit(fronted):
    proc, url, logs = fronted
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=2)
    assert "draining" in (logs / "serve.jsonl").read_text()
