"""download_model.py --source modelscope against a local server that speaks ModelScope's endpoints
(tests/modelscope_server.py).

The real CLI and the real modelscope client (1.40.2, with modelscope-hub 0.5.1 doing the network
work), pointed at the server with MODELSCOPE_ENDPOINT: the full download, a cut connection resumed
within the run, an interrupted run resumed by the next one from its partial file, files whose bytes
do not match the listing refused, and a missing repo, a private repo and no network as one sentence.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_script
from modelscope_server import ModelScope, load_files, serve, stop

SHARD = "model-00001-of-00003.safetensors"  # 78 MB: the one a cut or an interruption hits
SMALL = "model-00003-of-00003.safetensors"  # 1.6 MB: the one served with wrong bytes (retried by the client)
# Files a real repo has beside the model, which a download must leave alone (and a directory, original/).
EXTRA = {"README.md": b"# tiny/qwen3\n", ".gitattributes": b"*.safetensors filter=lfs\n",
         "original/params.json": b"{}\n"}
WANTED = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
          "tokenizer_config.json", "chat_template.jinja", SHARD, "model-00002-of-00003.safetensors", SMALL}


@pytest.fixture(scope="session")
def repo_files(tiny_model):
    files = load_files(tiny_model, EXTRA)
    del files["manifest.json"]  # written by --tiny, not part of a ModelScope repo
    return files


@pytest.fixture
def ms(repo_files):
    """A fresh server per test (its misbehaviour is the test's to set), stopped with its threads at teardown."""
    m = ModelScope(dict(repo_files))
    server, thread = serve(m)
    yield m
    stop(m, server, thread)


def ms_env(ms, tmp_path, **extra) -> dict:
    # the client's cache (its lock files) and its home (a session id, a stored login) stay in the test's directory
    return {"MODELSCOPE_ENDPOINT": ms.url, "MODELSCOPE_CACHE": str(tmp_path / "ms-cache"),
            "MODELSCOPE_HOME": str(tmp_path / "ms-home"), "MODELSCOPE_API_TOKEN": "", **extra}


def cli(target, *args) -> list[str]:
    return ["download_model.py", "--source", "modelscope", "--repo-id", "tiny/qwen3", "--local-dir", str(target), *args]


def download(ms, target, *args, **env):
    proc = run_script(*cli(target, *args), env=ms_env(ms, target.parent, **env), timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def error_line(proc) -> str:
    """The sentence the script ends with (the client's own retry warnings may come before it)."""
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr
    return line


def manifest(target) -> dict:
    return json.loads((target / "manifest.json").read_text())


def partial_files(target) -> list:
    return list(target.rglob("*.incomplete"))


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ----------------------------------------------------------------------------- the happy path
def test_download_fetches_what_serving_needs_verifies_and_writes_the_manifest_last(ms, tmp_path):
    target = tmp_path / "models" / "tiny" / "qwen3"
    proc = download(ms, target)
    assert proc.returncode == 0, proc.stderr
    assert f"tiny/qwen3@main from {ms.url}: fetching 9 of 9 files" in proc.stdout
    assert "9 files verified" in proc.stdout and "MB/s" in proc.stdout

    m = manifest(target)
    assert (m["source"], m["repo_id"], m["revision"], m["commit"], m["endpoint"]) == \
        ("modelscope", "tiny/qwen3", "main", None, ms.url)
    assert m["files"] == {name: len(ms.files[name]) for name in WANTED}  # no README, no original/
    assert all((target / n).read_bytes() == ms.files[n] for n in WANTED) and not partial_files(target)
    newest_other = max(p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert (target / "manifest.json").stat().st_mtime_ns >= newest_other
    # config.yaml's revision 'main' is "the default branch", which ModelScope calls master
    assert {r.revision for r in ms.log if r.path.startswith("/api/v1/models/")} == {"master"}
    assert sorted(r.file for r in ms.log if r.file) == sorted(WANTED)  # each file once, nothing else

    check = run_script("verify_setup.py", "--model", str(target), "--quick", "--json")
    assert check.returncode == 0, check.stdout
    assert {c["name"]: c["status"] for c in json.loads(check.stdout)}["model files"] == "PASS"

    seen = len(ms.log)
    again = download(ms, target)
    assert again.returncode == 0 and "already downloaded" in again.stdout and len(ms.log) == seen


def test_a_tag_and_include_take_repo_files_but_not_directories(ms, tmp_path):
    """ModelScope's listing has an entry for each directory too; --include '*' must not take one for a file.
    The endpoint comes the deprecated way here, MODELSCOPE_DOMAIN, which the client still honours."""
    target = tmp_path / "m"
    proc = download(ms, target, "--revision", "v1.0", "--include", "*",
                    MODELSCOPE_ENDPOINT="", MODELSCOPE_DOMAIN=ms.url)  # an empty MODELSCOPE_ENDPOINT counts as unset
    assert proc.returncode == 0, proc.stderr
    assert manifest(target)["files"] == {name: len(data) for name, data in ms.files.items()}
    assert manifest(target)["endpoint"] == ms.url
    assert (target / "original" / "params.json").read_bytes() == b"{}\n"
    assert {r.revision for r in ms.log if r.path.startswith("/api/v1/models/")} == {"v1.0"}


# ----------------------------------------------------------------------------- resume
def test_a_cut_connection_is_resumed_with_a_range_request(ms, tmp_path):
    ms.cut = SHARD  # half the shard, then the connection drops; the retry is served
    target = tmp_path / "m"
    proc = download(ms, target)
    assert proc.returncode == 0, proc.stderr
    first, retry = ms.file_gets(SHARD)
    assert first.range is None and retry.range.startswith("bytes=")
    start = int(retry.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(ms.files[SHARD]) // 2  # what had reached the disk is not fetched again
    assert (target / SHARD).read_bytes() == ms.files[SHARD] and manifest(target)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_an_interrupted_run_leaves_no_manifest_and_the_next_run_resumes_its_partial_file(ms, tmp_path, sig):
    ms.cut, ms.after_cut = SHARD, "hold"  # half the shard, then the server stalls
    target = tmp_path / "m"
    partial = target / f"{SHARD}.incomplete"  # where modelscope writes a file until it is complete
    proc = subprocess.Popen([sys.executable, *cli(target)], cwd=ROOT, env={**os.environ, **ms_env(ms, tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert ms.half_sent.wait(timeout=60)
        # the other files finish while the shard waits, so the next run has exactly one file to fetch
        others = WANTED - {SHARD}
        assert wait_for(lambda: all((target / n).is_file() for n in others) and partial.is_file()
                        and partial.stat().st_size > 0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)  # the server holds the shard forever: only a prompt exit ends it
    finally:
        proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert "interrupted" in err and "run the same command again" in err and "Traceback" not in err
    assert not (target / "manifest.json").exists() and not (target / SHARD).exists()
    kept = partial.stat().st_size
    assert 0 < kept <= len(ms.files[SHARD]) // 2

    ms.release.set()
    seen = len(ms.log)
    proc = download(ms, target)
    assert proc.returncode == 0, proc.stderr
    assert "fetching 1 of 9 files" in proc.stdout and manifest(target)
    # modelscope resumes the partial file a killed run left, across processes: only the rest is fetched
    assert [r.range for r in ms.log[seen:] if r.file] == [f"bytes={kept}-"]
    assert (target / SHARD).read_bytes() == ms.files[SHARD] and not partial_files(target)


@pytest.mark.parametrize("fault", ["sha256", "size"])
def test_a_file_that_does_not_match_its_listing_is_not_kept(ms, tmp_path, fault):
    good = ms.files[SMALL]
    # the listing keeps the real size and SHA-256; the bytes served are one byte off, or 10 bytes short
    ms.served[SMALL] = bytes([good[0] ^ 1]) + good[1:] if fault == "sha256" else good[:-10]
    target = tmp_path / "m"
    proc = download(ms, target)
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"{SMALL} from ModelScope ({ms.url}) does not match the size and SHA-256 the repo lists" in line
    assert "run the same command again" in line and "--source hf" in line
    assert not (target / "manifest.json").exists() and not (target / SMALL).exists() and not partial_files(target)
    # the client's own retries before it gives up: 3 for a wrong hash, 2 for a wrong size
    assert len(ms.file_gets(SMALL)) == {"sha256": 3, "size": 2}[fault]

    ms.served.clear()
    seen = len(ms.log)
    proc = download(ms, target)
    assert proc.returncode == 0, proc.stderr
    assert "fetching 1 of 9 files" in proc.stdout and (target / SMALL).read_bytes() == good
    assert [r.file for r in ms.log[seen:] if r.file] == [SMALL]


# ----------------------------------------------------------------------------- errors: one sentence each
def test_a_missing_repo_and_an_unknown_revision_name_what_to_check(ms, tmp_path):
    target = tmp_path / "m"
    proc = download(ms, target, "--repo-id", "tiny/nope")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [error_line(proc)]  # nothing but the sentence
    assert f"tiny/nope (revision 'main') was not found on ModelScope ({ms.url})" in proc.stderr
    assert "check --repo-id" in proc.stderr
    proc = download(ms, target, "--revision", "v9")
    assert proc.returncode == 1
    assert "tiny/qwen3 (revision 'v9') was not found on ModelScope" in error_line(proc) and "--revision" in proc.stderr
    assert not target.exists()


def test_a_private_repo_needs_a_token(ms, tmp_path):
    ms.token = "good-token"
    proc = download(ms, tmp_path / "m")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "HTTP 401" in line and "set MODELSCOPE_API_TOKEN" in line and "modelscope login" in line
    assert not any(r.auth for r in ms.log)
    seen = len(ms.log)
    proc = download(ms, tmp_path / "m", MODELSCOPE_API_TOKEN="good-token")
    assert proc.returncode == 0, proc.stderr
    assert all(r.auth for r in ms.log[seen:] if r.path.startswith("/api/v1/models/"))  # listings and files


def test_no_network_says_to_check_it_or_use_the_hub(ms, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = download(ms, tmp_path / "m", MODELSCOPE_ENDPOINT=closed)
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"cannot download tiny/qwen3 from ModelScope ({closed})" in line and "check the network" in line
    assert "MODELSCOPE_ENDPOINT" in line and "--source hf" in line
    assert not (tmp_path / "m").exists()


def test_without_the_modelscope_package_says_how_to_install_it(tmp_path):
    """An environment installed without requirements.txt: the import fails the way a missing package does."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "modelscope.py").write_text("raise ModuleNotFoundError(\"No module named 'modelscope'\", "
                                          "name='modelscope')\n")
    proc = run_script(*cli(tmp_path / "m"), env={"PYTHONPATH": str(shadow)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "pip install -r requirements.txt" in error_line(proc)


def test_a_full_disk_mid_download_is_one_sentence(tmp_path, monkeypatch):
    """What a local server cannot fake: ENOSPC while modelscope writes a file, which its client reports
    among the files that failed, as the OSError itself."""
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    from download_model import explain
    from modelscope_hub.errors import FileDownloadError  # what snapshot_download raises when files failed
    dl = SimpleNamespace(source="modelscope", repo_id="Qwen/Qwen3-8B", revision="main")
    failed = FileDownloadError("1 of 9 file(s) failed to download from Qwen/Qwen3-8B@master",
                               failed_files={SHARD: OSError(errno.ENOSPC, "No space left on device")})
    sentence = explain(failed, dl, tmp_path, need=16_400_000_000)
    assert f"the disk holding {tmp_path} is full: free at least 16.4 GB" in sentence
    assert "finished files are kept" in sentence
