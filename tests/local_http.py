"""What the local stand-ins for the model hubs share (tests/hub_server.py, tests/modelscope_server.py): a
repo's files read from a directory, and a threaded HTTP server started on a free port and stopped with
every request thread joined."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def read_tree(directory: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Every file under `directory` (and `extra`), by its path in the repo."""
    files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    return {**files, **(extra or {})}


class Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every request thread: nothing outlives the fixture


def start(handler: type[BaseHTTPRequestHandler], state, name: str) -> tuple[Server, threading.Thread]:
    """Serve `state` (an object with .port and .release) with `handler` on 127.0.0.1 and a free port."""
    server = Server(("127.0.0.1", 0), handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"{name}-{state.port}", daemon=True)
    thread.start()
    return server, thread


def stop(state, server: Server, thread: threading.Thread) -> None:
    """Release any request the test holds, then stop the server and join its threads."""
    state.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
