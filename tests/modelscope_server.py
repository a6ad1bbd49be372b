"""A local HTTP server that speaks the ModelScope endpoints, serving one directory as one model repo.

It answers what modelscope 1.40.2 asks when `download_model.py --source modelscope` downloads (the
package hands its network work to modelscope-hub 0.5.1; read from its _legacy_api.py / _download.py
and checked against this server's request log):

    GET /api/v1/models/{owner}/{name}/repo/files?Revision=R&Recursive=True   the listing:
        {"Code": 200, "Success": true, "Data": {"Files": [{Path, Name, Type: blob|tree, Size, Sha256, ...}]}}
    GET /api/v1/models/{owner}/{name}/repo?Revision=R&FilePath=P             a file's bytes: 200, or 206 +
                                                                             Content-Range for Range: bytes=N-
    GET /api/v1/models/{owner}/{name}                                        the repo (asked when a listing
                                                                             scoped with Root= finds nothing)

Errors are real HTTP statuses with ModelScope's JSON body: the client reads the status, and takes a
200 that carries an error Code for an empty repo. Every other path is a 404, which is also what the
client's intra-cloud probe (/api/v1/repos/internalAccelerationInfo) gets outside Alibaba Cloud.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

from local_http import Server, read_tree, start, stop  # noqa: F401  (stop: the tests' teardown)

CHUNK = 1 << 20
REVISIONS = ("master", "v1.0")  # the default branch and a tag; anything else is an unknown revision


load_files = read_tree  # a ModelScope repo is its files as they are (no LFS pointers, unlike the Hub's)


@dataclass(frozen=True)
class Request:
    path: str
    file: str | None  # FilePath= of a file download
    revision: str | None  # Revision= as the client sent it (absent: the server's default, master)
    range: str | None
    auth: bool  # an Authorization header came with it


@dataclass
class ModelScope:
    """What the server serves and how it misbehaves; `log` holds a Request for each request it answered."""
    files: dict[str, bytes]
    repo_id: str = "tiny/qwen3"
    token: str | None = None  # every request needs "Authorization: Bearer <token>", as for a private repo
    served: dict[str, bytes] = field(default_factory=dict)  # bytes sent instead of the listed ones (size, SHA-256)
    cut: str | None = None  # the first GET of this file sends half its bytes, then closes the connection
    after_cut: str = "serve"  # what later GETs of it get: "serve" (Range honoured) | "hold" (never answered)
    log: list[Request] = field(default_factory=list)
    port: int = 0
    half_sent: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cuts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def file_gets(self, name: str) -> list[Request]:
        return [r for r in self.log if r.file == name]

    def listing(self, revision: str, root: str | None) -> list[dict]:
        """The repo's files and directories as the listing shows them (directories are "tree" entries)."""
        prefix = root.strip("/") + "/" if root else ""
        dirs = {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        entries = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": len(data),
                    "Sha256": hashlib.sha256(data).hexdigest(), "IsLFS": p.endswith(".safetensors"),
                    "Revision": revision, "CommittedDate": 1735689600} for p, data in sorted(self.files.items())]
        entries += [{"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0, "Sha256": "",
                     "Revision": revision} for d in sorted(dirs)]
        return [e for e in entries if e["Path"].startswith(prefix)]


REPO = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+?)(?P<kind>/repo/files|/repo)?/?$")


class ModelScopeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection ends, so teardown never waits on it
    ms: ModelScope  # set on the subclass that serve() makes

    def log_message(self, *args) -> None:  # the server's own log replaces stderr noise
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.ms._lock:
            self.ms.log.append(Request(path, query.get("FilePath"), query.get("Revision"), self.headers.get("Range"),
                                       "Authorization" in self.headers))
        m = REPO.match(path)
        if m is None:
            return self.error(404, f"no such API: {path}")
        if problem := self.access_problem(m["repo"], query.get("Revision", "master")):
            return self.error(*problem)
        if m["kind"] is None:
            owner, name = m["repo"].split("/")
            return self.json({"Id": 1, "Path": owner, "Name": name, "Revision": "master"})
        if m["kind"] == "/repo/files":
            return self.json({"Files": self.ms.listing(query.get("Revision", "master"), query.get("Root"))})
        self.file(query.get("FilePath", ""))

    def access_problem(self, repo: str, revision: str) -> tuple[int, str] | None:
        """(status, message) the way ModelScope answers, or None when access is granted."""
        if self.ms.token and self.headers.get("Authorization") != f"Bearer {self.ms.token}":
            return 401, "Unauthorized: please log in with an access token"
        if repo != self.ms.repo_id:
            return 404, f"Model {repo} not exists"
        if revision not in REVISIONS:
            return 404, f"Revision {revision} not exists"
        return None

    def file(self, name: str) -> None:
        if name not in self.ms.files:
            return self.error(404, f"file {name} not exists")
        data = self.ms.served.get(name, self.ms.files[name])
        if name == self.ms.cut:
            with self.ms._lock:
                self.ms._cuts += 1
                first = self.ms._cuts == 1
            if first:
                return self.cut_off(data)
        start = int(m[1]) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
        if start >= len(data) > 0:
            return self.send(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send(206 if start else 200, headers, data[start:])

    def cut_off(self, data: bytes) -> None:
        """Announce the whole file, send half of it, then drop the connection (or hold it open)."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.ms.half_sent.set()
        if self.ms.after_cut == "hold":  # the test interrupts the client while it waits for the rest
            self.ms.release.wait(timeout=30)
        self.close_connection = True

    def error(self, status: int, message: str) -> None:
        body = {"Code": 10010205001, "Message": message, "Success": False, "RequestId": "local"}
        self.send(status, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def json(self, data) -> None:
        body = {"Code": 200, "Message": "success", "Success": True, "RequestId": "local", "Data": data}
        self.send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            for i in range(0, len(data), CHUNK):
                self.wfile.write(data[i:i + CHUNK])
        except (BrokenPipeError, ConnectionResetError):  # a client killed mid-file: what the tests do
            self.close_connection = True


def serve(ms: ModelScope) -> tuple[Server, threading.Thread]:
    """Start the server on 127.0.0.1 and a free port (ms.port); stop it with stop()."""
    return start(type("Handler", (ModelScopeHandler,), {"ms": ms}), ms, "ms")
