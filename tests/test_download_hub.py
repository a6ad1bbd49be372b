"""download_model.py against a local server in the Hugging Face Hub's URL layout (tests/hub_server.py).

The real CLI and the real huggingface_hub client, pointed at the server with HF_ENDPOINT: the full
download, resume after a cut connection, a failed and an interrupted run finished by the next one,
and every error a user meets (404, 401, gated, offline, no disk) as one sentence, never a traceback.
"""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_script
from hub_server import COMMIT, Hub, load_repo, serve, stop

SHARD = "model-00001-of-00003.safetensors"
# Files a real repo has beside the model, which a download must leave alone.
EXTRA = {"README.md": b"# tiny/qwen3\n", ".gitattributes": b"*.safetensors filter=lfs\n",
         "original/params.json": b"{}\n"}
WANTED = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
          "tokenizer_config.json", "chat_template.jinja", SHARD, "model-00002-of-00003.safetensors",
          "model-00003-of-00003.safetensors"}


@pytest.fixture(scope="session")
def repo_files(tiny_model):
    files = load_repo(tiny_model, EXTRA)
    del files["manifest.json"]  # written by --tiny, not part of a Hub repo
    return files


@pytest.fixture
def hub(repo_files):
    """A fresh server per test (its misbehaviour is the test's to set), stopped with its threads at teardown."""
    h = Hub(dict(repo_files))
    server, thread = serve(h)
    yield h
    stop(h, server, thread)


def hub_env(hub, tmp_path, **extra) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "",
            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5", **extra}


def download(hub, target, *args, **env):
    proc = run_script("download_model.py", "--repo-id", "tiny/qwen3", "--local-dir", str(target), *args,
                      env=hub_env(hub, target.parent, **env), timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def manifest(target) -> dict:
    return json.loads((target / "manifest.json").read_text())


def partial_files(target) -> list:
    return list(target.rglob("*.incomplete"))


def blob_gets(hub, name: str) -> list:
    return hub.requests("GET", f"/cdn/{hub.files[name].sha256}")


# ----------------------------------------------------------------------------- the happy path
def test_download_fetches_what_serving_needs_verifies_and_writes_the_manifest_last(hub, tmp_path):
    target = tmp_path / "models" / "tiny" / "qwen3"
    proc = download(hub, target)
    assert proc.returncode == 0, proc.stderr
    assert "9 files verified" in proc.stdout and "MB/s" in proc.stdout and "Fetching 9 files" in proc.stderr

    m = manifest(target)
    assert (m["source"], m["repo_id"], m["revision"], m["commit"], m["endpoint"]) == \
        ("hf", "tiny/qwen3", "main", COMMIT, hub.url)
    assert m["files"] == {name: len(hub.files[name].data) for name in WANTED}  # no README, no original/
    assert all((target / n).read_bytes() == hub.files[n].data for n in WANTED)
    newest_other = max(p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert (target / "manifest.json").stat().st_mtime_ns >= newest_other

    check = run_script("verify_setup.py", "--model", str(target), "--quick", "--json")
    assert check.returncode == 0, check.stdout
    assert {c["name"]: c["status"] for c in json.loads(check.stdout)}["model files"] == "PASS"

    seen = len(hub.log)
    again = download(hub, target)
    assert again.returncode == 0 and "already downloaded" in again.stdout and len(hub.log) == seen


def test_a_commit_sha_is_a_revision(hub, tmp_path):
    proc = download(hub, tmp_path / "m", "--revision", COMMIT)
    assert proc.returncode == 0, proc.stderr
    assert (manifest(tmp_path / "m")["revision"], manifest(tmp_path / "m")["commit"]) == (COMMIT, COMMIT)
    assert hub.requests("GET", f"/api/models/tiny/qwen3/revision/{COMMIT}")


# ----------------------------------------------------------------------------- resume
def test_a_cut_connection_is_resumed_with_a_range_request(hub, tmp_path):
    hub.cut = SHARD  # half the shard, then the connection drops; the retry is served
    target = tmp_path / "m"
    proc = download(hub, target)
    assert proc.returncode == 0, proc.stderr
    first, retry = blob_gets(hub, SHARD)
    assert first[2] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", retry[2])[1])
    assert 0 < start <= len(hub.files[SHARD].data) // 2  # what had reached the disk is not fetched again
    assert (target / SHARD).read_bytes() == hub.files[SHARD].data and manifest(target)


def test_a_failed_run_leaves_no_manifest_and_the_next_run_fetches_only_what_is_missing(hub, tmp_path):
    hub.cut, hub.after_cut = SHARD, "503"  # the connection drops, then the server is down for the retry
    target = tmp_path / "m"
    proc = download(hub, target)
    assert proc.returncode == 1
    assert "HTTP 503" in proc.stderr and "run the same command later to resume" in proc.stderr
    assert not (target / "manifest.json").exists() and not partial_files(target)
    assert not (target / SHARD).exists() and (target / "model-00002-of-00003.safetensors").is_file()

    hub.after_cut, seen = "serve", len(hub.log)
    proc = download(hub, target)
    assert proc.returncode == 0, proc.stderr
    assert "fetching 1 of 9 files" in proc.stdout and manifest(target)
    fetched = [r for r in hub.log[seen:] if r[0] == "GET" and "/api/" not in r[1]]
    # huggingface_hub 2.4 deletes a failed file's partial data, so a new process fetches it from byte 0
    assert fetched == [("GET", f"/cdn/{hub.files[SHARD].sha256}", None, False)]


def test_ctrl_c_stops_at_once_and_the_next_run_completes(hub, tmp_path):
    hub.cut, hub.after_cut = SHARD, "hold"  # half the shard, then the server stalls
    target = tmp_path / "m"
    cmd = [sys.executable, str(ROOT / "download_model.py"), "--repo-id", "tiny/qwen3", "--local-dir", str(target)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **hub_env(hub, tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.half_sent.wait(timeout=30)
        time.sleep(0.2)  # let the client write what it received
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)  # the server holds the shard forever: only a prompt exit ends it
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in err and "run the same command again" in err and "Traceback" not in err
    assert not (target / "manifest.json").exists() and not partial_files(target)

    hub.release.set()
    proc = download(hub, target)
    assert proc.returncode == 0, proc.stderr
    assert (target / SHARD).read_bytes() == hub.files[SHARD].data


# ----------------------------------------------------------------------------- errors: one sentence each
def test_unknown_repo_and_revision_name_what_to_check(hub, tmp_path):
    proc = download(hub, tmp_path / "m", "--repo-id", "tiny/nope")
    assert proc.returncode == 1
    assert "tiny/nope was not found" in proc.stderr and "HTTP 404" in proc.stderr and "--repo-id" in proc.stderr
    proc = download(hub, tmp_path / "m", "--revision", "v9")
    assert proc.returncode == 1 and "no revision 'v9'" in proc.stderr and "--revision" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_a_private_repo_needs_hf_token(hub, tmp_path):
    hub.token = "good-token"
    proc = download(hub, tmp_path / "m")
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr and "set HF_TOKEN" in proc.stderr
    proc = download(hub, tmp_path / "m", HF_TOKEN="bad-token")
    assert proc.returncode == 1 and "did not accept the token in HF_TOKEN" in proc.stderr

    proc = download(hub, tmp_path / "m", HF_TOKEN="good-token")
    assert proc.returncode == 0, proc.stderr
    assert manifest(tmp_path / "m")["files"].keys() == WANTED
    # the token goes to the hub, never to the storage host a redirect points at (a signed URL there)
    assert all(r[3] for r in hub.requests("HEAD", "/resolve/"))
    assert not any(r[3] for r in hub.requests("GET", "/cdn/"))


def test_a_gated_repo_says_to_accept_the_license(hub, tmp_path):
    hub.gated = True
    proc = download(hub, tmp_path / "m", HF_TOKEN="some-token")
    assert proc.returncode == 1
    assert "is gated" in proc.stderr and "accept its license" in proc.stderr and "HF_TOKEN" in proc.stderr


def test_no_network_suggests_a_mirror_or_modelscope(hub, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = download(hub, tmp_path / "m", HF_ENDPOINT=closed)
    assert proc.returncode == 1
    assert f"cannot download tiny/qwen3 from {closed}" in proc.stderr
    assert "HF_ENDPOINT" in proc.stderr and "--source modelscope" in proc.stderr


def test_not_enough_disk_refuses_before_downloading(hub, tmp_path):
    hub.listed_sizes = {"model-00002-of-00003.safetensors": 10**15}  # the Hub lists a 1 PB shard
    target = tmp_path / "m"
    proc = download(hub, target)
    assert proc.returncode == 1
    assert re.search(r"the download needs 1000000\.\d GB but only [\d.]+ GB is free on \S+: free", proc.stderr)
    assert not hub.requests("GET", "/resolve/") and not hub.requests("GET", "/cdn/")
    assert not target.exists() or not any(target.iterdir())


def test_a_full_disk_and_the_file_selection(tmp_path):
    """What a local server cannot fake: ENOSPC mid-download; and which repo files a download takes."""
    from download_model import explain, select_files
    dl = SimpleNamespace(source="hf", repo_id="Qwen/Qwen3-8B", revision="main")
    sentence = explain(OSError(errno.ENOSPC, "No space left on device"), dl, tmp_path, need=16_400_000_000)
    assert "is full" in sentence and "16.4 GB" in sentence and "finished files are kept" in sentence
    names = ["config.json", "model-00001-of-00002.safetensors", "README.md", "original/params.json",
             "onnx/model.safetensors", "LICENSE", "merges.txt", "vocab.json", "tokenizer.json"]
    assert select_files(names) == ["LICENSE", "config.json", "merges.txt", "model-00001-of-00002.safetensors",
                                   "tokenizer.json", "vocab.json"]
    assert "original/params.json" in select_files(names, ["original/*"])
