"""The service's rate limits and where their counters live: flask-limiter's per-IP and global limits
and the failed-key counter, in this worker's memory (`memory://`) or in a storage several workers and
instances share (`redis://...`, serve.rate_limit_storage).

A shared storage can go away. Requests never hang on it (serve.rate_limit_storage_timeout_s) and never
fail because of it: while it is unreachable each worker counts in its own memory, tries the storage
again every serve.rate_limit_storage_retry_s, and goes back to it once it answers. With
serve.rate_limit_storage_down: refuse the rate-limited endpoints answer 503 meanwhile instead, so no
request goes uncounted. Either way the change is logged once, and /stats says since when.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from limits.storage import MemoryStorage, Storage, storage_from_string

from common.config import ConfigError

log = logging.getLogger("serve")

WHILE_DOWN = ("memory", "refuse")  # serve.rate_limit_storage_down
REDIS_SCHEMES = ("redis", "rediss", "redis+unix")  # the ones whose client takes the timeout options below
WRAPPED = "failover+"  # the scheme prefix under which flask-limiter builds the storage below


def where(uri: str) -> str:
    """The storage's address without its password: /stats and the log may be read by more people."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class StorageState:
    """Is the shared storage answering? One per worker; every change is logged once."""

    def __init__(self, uri: str, retry_s: float, while_down: str):
        self.where, self.retry_s, self.while_down = where(uri), retry_s, while_down
        self.lock = threading.Lock()
        self.down_since: float | None = None      # wall clock, for /stats
        self.since = time.time()                  # of the current state
        self.next_try = 0.0                       # monotonic: while down, when the storage is tried again
        self.error: str | None = None
        self.outages = 0

    def should_try(self) -> bool:
        """Up: always. Down: one caller per retry period tries it (the others count in memory)."""
        if self.down_since is None:
            return True
        with self.lock:
            now = time.monotonic()
            if now < self.next_try:
                return False
            self.next_try = now + self.retry_s
            return True

    def failed(self, error: Exception) -> None:
        with self.lock:
            self.next_try = time.monotonic() + self.retry_s
            self.error = f"{type(error).__name__}: {error}"
            if self.down_since is not None:
                return
            self.down_since = self.since = time.time()
            self.outages += 1
        doing = "counting in this worker's memory" if self.while_down == "memory" else \
            "refusing rate-limited requests (503)"
        log.warning("rate-limit storage %s unreachable (%s): %s until it answers; trying it every %gs", self.where,
                    self.error, doing, self.retry_s, extra={"rate_limit_storage": self.state()})

    def answered(self) -> None:
        if self.down_since is None:  # the common case, without the lock
            return
        with self.lock:
            if self.down_since is None:
                return
            down_s, self.down_since, self.since = time.time() - self.down_since, None, time.time()
        log.info("rate-limit storage %s answers again after %.0fs down: counters shared again", self.where, down_s,
                 extra={"rate_limit_storage": "ok"})

    def state(self) -> str:
        if self.down_since is None:
            return "ok"
        return "fallback" if self.while_down == "memory" else "refusing"

    def report(self) -> dict:
        return {"storage": self.where, "shared": True, "state": self.state(), "since": round(self.since, 3),
                "while_down": self.while_down, "outages": self.outages, "last_error": self.error}


class FailoverStorage(Storage):
    """A `limits` storage that forwards to the shared one and, while that fails, to this worker's memory.
    Registered under 'failover+<scheme>', so flask-limiter builds it from the URI like any storage."""

    STORAGE_SCHEME = [WRAPPED + s for s in ("redis", "rediss", "redis+unix", "redis+cluster", "redis+sentinel",
                                            "memcached", "mongodb", "mongodb+srv")]

    def __init__(self, uri: str, retry_s: float = 5.0, timeout_s: float = 0.5, while_down: str = "memory",
                 **options):
        super().__init__(uri)
        target = uri.removeprefix(WRAPPED)
        self.shared = storage_from_string(target, **redis_options(target, timeout_s), **options)
        self.memory = MemoryStorage()
        self.status = StorageState(target, retry_s, while_down)

    @property
    def base_exceptions(self):
        return ()  # nothing escapes: a failure of the shared storage is answered from memory

    def _call(self, name: str, *args):
        if self.status.should_try():
            try:
                result = getattr(self.shared, name)(*args)
            except self.shared.base_exceptions as e:
                self.status.failed(e)
            else:
                self.status.answered()
                return result
        return getattr(self.memory, name)(*args)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._call("incr", key, expiry, amount)

    def get(self, key: str) -> int:
        return self._call("get", key)

    def get_expiry(self, key: str) -> float:
        return self._call("get_expiry", key)

    def check(self) -> bool:
        return self.shared.check()

    def reset(self):
        return self._call("reset")

    def clear(self, key: str) -> None:
        return self._call("clear", key)


def redis_options(uri: str, timeout_s: float) -> dict:
    """A Redis call gives up after timeout_s and retries once at once (a connection the server dropped
    on restart), never redis-py's default of three retries with backoff (seconds per request)."""
    if urlsplit(uri).scheme not in REDIS_SCHEMES:
        return {}
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, "retry": Retry(NoBackoff(), 1)}


def rate_limit_problems(s) -> list[str]:
    """What is wrong with the serve section's rate-limit storage keys (deploy_with_limits --check)."""
    problems = []
    if s.rate_limit_storage_down not in WHILE_DOWN:
        problems.append(f"serve.rate_limit_storage_down is '{s.rate_limit_storage_down}'; "
                        f"set it to {' or '.join(WHILE_DOWN)}")
    scheme = urlsplit(s.rate_limit_storage).scheme
    if scheme != "memory" and WRAPPED + scheme not in FailoverStorage.STORAGE_SCHEME:
        problems.append(f"serve.rate_limit_storage '{where(s.rate_limit_storage)}' is not a storage flask-limiter "
                        f"knows; use memory:// or redis://host:6379")
    return problems


@dataclass
class RateLimits:
    """What create_app applies: the limits of the "api" routes and the failed-key counter, one storage."""
    limiter: object            # flask_limiter.Limiter
    decorators: list           # the global limit, then the per-IP one
    auth_failures: object      # limits.RateLimitItem: wrong keys per client address
    status: StorageState | None  # None: counters in this worker's memory, nothing shared to lose

    def refusing(self) -> bool:
        return self.status is not None and self.status.state() == "refusing"

    def auth_wait(self, client: str) -> int:
        """Seconds until `client` may present a key again; 0 when it may now."""
        if self.limiter.limiter.test(self.auth_failures, "auth-failures", client):
            return 0
        reset = self.limiter.limiter.get_window_stats(self.auth_failures, "auth-failures", client)[0]
        return int(reset - time.time()) + 1

    def auth_failed(self, client: str) -> None:
        self.limiter.limiter.hit(self.auth_failures, "auth-failures", client)

    def report(self) -> dict:
        if self.status is None:
            return {"storage": "memory://", "shared": False, "state": "ok"}
        return self.status.report()


def rate_limits(app, s, key_func) -> RateLimits:
    """flask-limiter on `app`, counting per `key_func()` (the client's address) and for everyone."""
    from flask_limiter import Limiter
    from limits import parse as parse_limit
    problems = rate_limit_problems(s)
    if problems:
        raise ConfigError("; ".join(problems))
    shared = urlsplit(s.rate_limit_storage).scheme != "memory"
    options = {"retry_s": s.rate_limit_storage_retry_s, "timeout_s": s.rate_limit_storage_timeout_s,
               "while_down": s.rate_limit_storage_down} if shared else {}
    limiter = Limiter(key_func=key_func, app=app, storage_uri=(WRAPPED if shared else "") + s.rate_limit_storage,
                      storage_options=options, strategy="fixed-window",
                      headers_enabled=False)  # X-RateLimit-*: deploy_with_limits.rate_limit_headers, the tightest
    decorators = [limiter.shared_limit(s.global_rate_limit, scope="global", key_func=lambda: "all"),
                  limiter.shared_limit(s.rate_limits, scope="per-ip")]
    status = limiter.storage.status if shared else None
    return RateLimits(limiter, decorators, parse_limit(s.auth_failure_limit), status)
