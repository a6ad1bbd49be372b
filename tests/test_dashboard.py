"""GET /dashboard in headless Chromium against the real server under a small load: the page logs in with the
API key, polls /stats, and every chart draws non-zero data. It loads nothing from elsewhere."""
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from serving import start_server

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHAT = "/v1/chat/completions"
KEY = {"Authorization": "Bearer sk-dash"}
CHARTS = ("requests", "load", "rejections", "latency", "tokens", "memory")


def wait_for(condition, timeout=60.0, step=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(step)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """Keys, 3 requests a minute per client, one slot and two queue places, room for long generations."""
    srv = start_server(tiny_model, tmp_path_factory.mktemp("logs"), API_KEYS="sk-dash", TRUSTED_PROXIES="1",
                       RATE_LIMITS="3/minute", MAX_CONCURRENT="1", MAX_QUEUE="2", QWEN_SERVE_MAX_TOKENS="4000")
    yield srv
    srv.stop()


def test_dashboard_is_protected_like_stats_and_self_contained(server):
    r = requests.get(server.url + "/dashboard", timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")  # a browser asks for the key
    page = requests.get(server.url + "/dashboard", auth=("anyone", "sk-dash"), timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert set(re.findall(r"\w+://[^\s\"'`)]+", page.text)) == {"http://www.w3.org/2000/svg"}  # a namespace, no fetch
    assert requests.get(server.url + "/stats", auth=("anyone", "sk-dash"), timeout=10).status_code == 200
    assert requests.get(server.url + "/stats", auth=("anyone", "wrong"), timeout=10).status_code == 401
    for garbage in ("Basic %%%", "Basic " + "é" * 8, "Basic /w=="):  # not base64, not ASCII, not UTF-8
        r = requests.get(server.url + "/stats", headers={"Authorization": garbage}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def stream(srv, ip: str) -> socket.socket:
    """A long streaming generation on a bare socket, left open: it runs (or waits) until the test hangs up."""
    body = json.dumps({"messages": [{"role": "user", "content": "长"}], "max_tokens": 4000, "ignore_eos": True,
                       "stream": True}).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-dash\r\n"
                 b"X-Forwarded-For: %s\r\nContent-Length: %d\r\n\r\n%s" % (CHAT.encode(), ip.encode(), len(body), body))
    return sock


def small_load(srv) -> list[socket.socket]:
    """Answers, refusals (a wrong key, a rate limit), then one generation running and one queued."""
    for ip, key in (("10.5.0.1", KEY), ("10.5.0.1", KEY), ("10.5.0.1", KEY), ("10.5.0.1", KEY),
                    ("10.5.0.2", {"Authorization": "Bearer wrong"})):
        requests.post(srv.url + CHAT, json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8},
                      headers={**key, "X-Forwarded-For": ip}, timeout=60)
    socks = [stream(srv, "10.5.0.3")]
    wait_for(lambda: requests.get(srv.url + "/stats", headers=KEY, timeout=10).json()["in_flight"] == 1)
    socks.append(stream(srv, "10.5.0.4"))
    wait_for(lambda: requests.get(srv.url + "/stats", headers=KEY, timeout=10).json()["queue"] == 1)
    return socks


def chromium(url: str, profile: Path, *action: str) -> str:
    """Headless Chromium on `url`; --virtual-time-budget lets the page's poll timers run (virtual time
    waits for each /stats fetch), then the action (--dump-dom, --screenshot) runs."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--window-size=1300,880", "--virtual-time-budget=6000",
                           *action, url], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-deps installs it as root)")
def test_dashboard_renders_every_chart_with_data(server, tmp_path):
    socks = small_load(server)
    loaded = time.monotonic()
    try:
        url = server.url.replace("http://", "http://anyone:sk-dash@") + "/dashboard?every=1"
        dom = chromium(url, tmp_path / "profile", "--dump-dom")
        took = time.monotonic() - loaded  # the charts plot /stats' last minute: the answers must still be in it
        shot = tmp_path / "dashboard.png"
        chromium(url, tmp_path / "profile", f"--screenshot={shot}")
    finally:
        for sock in socks:
            sock.close()
    assert re.search(r'id="message">\s*<', dom), "the page reported a problem"
    assert re.search(r'id="status" class="pill ok">ok<', dom)
    for chart in CHARTS:
        (svg,) = re.findall(rf'<svg id="chart-{chart}"[^>]*>', dom)
        points, top = re.search(r'data-points="(\d+)"', svg), re.search(r'data-max="([\d.e+-]+)"', svg)
        assert points and int(points.group(1)) >= 2 and top and float(top.group(1)) > 0, (chart, svg, took)
        polyline = re.search(rf'<svg id="chart-{chart}".*?<polyline points="([^"]+)"', dom, re.S)
        assert polyline and len(polyline.group(1).split()) >= 2, chart  # a line was drawn
    assert "rate_limited" in dom and "unauthorized" in dom  # the rejections chart's legend names its reasons
    assert shot.stat().st_size > 20_000  # a rendered page, not an empty one
