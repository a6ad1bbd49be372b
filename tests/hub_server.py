"""A local HTTP server in the Hugging Face Hub's URL layout, serving one directory as one model repo.

It answers what huggingface_hub 2.4.0 asks when `download_model.py` downloads (read from its
hf_api.py / file_download.py and checked against this server's request log):

    GET  /api/models/{repo}/revision/{rev}?blobs=true   model_info: sha + siblings with size / lfs
    GET  /api/models/{repo}/tree/{sha}?recursive=true   snapshot_download's file listing
    HEAD /{repo}/resolve/{sha}/{path}                   small file: 200 + ETag (git blob sha1),
                                                        LFS file: 302 + X-Linked-Etag (sha256),
                                                        X-Linked-Size, Location on another origin
    GET  /{repo}/resolve/{sha}/{path}                   the small file's bytes
    GET  /cdn/{sha256}                                  an LFS file's bytes, 200 or 206 for Range

Every repo answer carries X-Repo-Commit. Errors carry the X-Error-Code / X-Error-Message headers
the library turns into RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, ...
The CDN host is `localhost` while the API is `127.0.0.1`: a different origin, as on the real Hub,
so the library stops at the 302 and drops the Authorization header for the blob (a signed URL).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from local_http import Server, read_tree, start, stop  # noqa: F401  (stop: the tests' teardown)

COMMIT = hashlib.sha1(b"tiny/qwen3@main").hexdigest()
CHUNK = 1 << 20


@dataclass
class RepoFile:
    path: str
    data: bytes
    blob_id: str  # git sha1 of what git stores: the content, or the LFS pointer
    sha256: str | None  # set for LFS files

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


def load_repo(directory: Path, extra: dict[str, bytes] | None = None) -> dict[str, RepoFile]:
    """Every file under `directory` (and `extra`), safetensors and files over 1 MB as LFS, like the Hub."""
    files = {}
    for path, data in read_tree(directory, extra).items():
        lfs = path.endswith(".safetensors") or len(data) > 1_000_000
        sha256 = hashlib.sha256(data).hexdigest() if lfs else None
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        stored = pointer.encode() if lfs else data
        blob_id = hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()
        files[path] = RepoFile(path, data, blob_id, sha256)
    return files


@dataclass
class Hub:
    """What the server serves and how it misbehaves; `log` holds (method, path, Range, had Authorization)."""
    files: dict[str, RepoFile]
    repo_id: str = "tiny/qwen3"
    token: str | None = None  # every repo request needs "Authorization: Bearer <token>"
    gated: bool = False  # 403 GatedRepo, as for a user who has not accepted the license
    listed_sizes: dict[str, int] = field(default_factory=dict)  # sizes model_info claims instead of the real ones
    cut: str | None = None  # the first GET of this file sends half its bytes, then closes the connection
    after_cut: str = "serve"  # what later GETs of it get: "serve" (Range honoured) | "503" | "hold"
    log: list[tuple[str, str, str | None, bool]] = field(default_factory=list)
    port: int = 0
    half_sent: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cuts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, method: str, path_part: str = "") -> list[tuple[str, str, str | None, bool]]:
        return [r for r in self.log if r[0] == method and path_part in r[1]]

    def size(self, f: RepoFile) -> int:
        return self.listed_sizes.get(f.path, len(f.data))

    def sibling(self, f: RepoFile, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": f.path}
        lfs = {"size": self.size(f), "sha256": f.sha256, "pointerSize": 134} if f.lfs else None
        return {"rfilename": f.path, "size": self.size(f), "blobId": f.blob_id, **({"lfs": lfs} if lfs else {})}

    def tree_entry(self, f: RepoFile) -> dict:
        lfs = {"oid": f.sha256, "size": self.size(f), "pointerSize": 134} if f.lfs else None
        return {"type": "file", "oid": f.blob_id, "size": self.size(f), "path": f.path, **({"lfs": lfs} if lfs else {})}


API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+))?/?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection ends, so teardown never waits on it
    hub: Hub  # set on the subclass that serve() makes

    def log_message(self, *args) -> None:  # the hub's own log replaces stderr noise
        pass

    def do_HEAD(self) -> None:
        self.route(body=False)

    def do_GET(self) -> None:
        self.route(body=True)

    # -------------------------------------------------------------------------- routing
    def route(self, body: bool) -> None:
        path = urlsplit(self.path).path
        with self.hub._lock:
            self.hub.log.append((self.command, path, self.headers.get("Range"), "Authorization" in self.headers))
        if m := CDN.match(path):
            return self.blob(m["sha"], body)
        m = API.match(path) or RESOLVE.match(path)
        if m is None:
            return self.error(404, None, "Not found")
        if problem := self.access_problem(m["repo"], m.groupdict().get("rev")):
            return self.error(*problem)
        if path.startswith("/api/"):
            blobs = parse_qs(urlsplit(self.path).query).get("blobs", [""])[0].lower() == "true"
            return self.api(m["kind"], blobs)
        return self.resolve(unquote(m["path"]), body)

    def access_problem(self, repo: str, rev: str | None) -> tuple[int, str | None, str] | None:
        """(status, X-Error-Code, message) the way the Hub answers, or None when access is granted."""
        hub, auth = self.hub, self.headers.get("Authorization")
        if hub.token and auth is None:
            return 401, "RepoNotFound", "Invalid username or password."
        if hub.token and auth != f"Bearer {hub.token}":
            return 401, None, "Invalid credentials in Authorization header"
        if repo != hub.repo_id:
            return 404, "RepoNotFound", "Repository not found"
        if hub.gated:
            return 403, "GatedRepo", (f"Access to model {repo} is restricted and you are not in the authorized list. "
                                      f"Visit {hub.url}/{repo} to ask for access.")
        if rev is not None and unquote(rev) not in ("main", COMMIT):
            return 404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}"
        return None

    # -------------------------------------------------------------------------- answers
    def api(self, kind: str | None, blobs: bool) -> None:
        files = self.hub.files.values()
        if kind == "tree":
            return self.json([self.hub.tree_entry(f) for f in files])
        self.json({"_id": "0", "id": self.hub.repo_id, "modelId": self.hub.repo_id, "sha": COMMIT, "private": False,
                   "gated": False, "siblings": [self.hub.sibling(f, blobs) for f in files]})

    def resolve(self, path: str, body: bool) -> None:
        f = self.hub.files.get(path)
        if f is None:
            return self.error(404, "EntryNotFound", f"{path} does not exist on \"main\"")
        headers = {"X-Repo-Commit": COMMIT}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data)),
                        "Location": f"http://localhost:{self.hub.port}/cdn/{f.sha256}"}
            return self.send(302, headers, b"")
        self.send(200, headers | {"ETag": f'"{f.blob_id}"'}, f.data if body else None, len(f.data))

    def blob(self, sha: str, body: bool) -> None:
        f = next((f for f in self.hub.files.values() if f.sha256 == sha), None)
        if f is None:
            return self.error(404, None, "Not found")
        start = int(m[1]) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
        if body and f.path == self.hub.cut:
            with self.hub._lock:
                self.hub._cuts += 1
                first = self.hub._cuts == 1
            if first:
                return self.cut_off(f)
            if self.hub.after_cut == "503":
                return self.error(503, None, "Service Unavailable")
        status = 206 if start else 200
        headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(f.data) - 1}/{len(f.data)}"
        self.send(status, headers, f.data[start:] if body else None, len(f.data) - start)

    def cut_off(self, f: RepoFile) -> None:
        """Announce the whole file, send half of it, then drop the connection (or hold it open)."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(f.data)))
        self.end_headers()
        self.wfile.write(f.data[: len(f.data) // 2])
        self.wfile.flush()
        self.hub.half_sent.set()
        if self.hub.after_cut == "hold":  # the test interrupts the client while it waits for the rest
            self.hub.release.wait(timeout=30)
        self.close_connection = True

    def error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self.send(status, headers | {"Content-Type": "application/json"}, json.dumps({"error": message}).encode())

    def json(self, data) -> None:
        self.send(200, {"Content-Type": "application/json"}, json.dumps(data).encode())

    def send(self, status: int, headers: dict[str, str], data: bytes | None, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        for i in range(0, len(data or b""), CHUNK):
            self.wfile.write(data[i:i + CHUNK])


def serve(hub: Hub) -> tuple[Server, threading.Thread]:
    """Start the server on 127.0.0.1 and a free port (hub.port); stop it with stop()."""
    return start(type("Handler", (HubHandler,), {"hub": hub}), hub, "hub")
