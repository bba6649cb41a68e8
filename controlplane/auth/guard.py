"""API-key checks that a flood of wrong keys cannot turn into a denial of service.

``ApiKeyGuard.authenticate`` is what the API runs for every ``dev-id`` + ``x-api-key``:

- A key this process verified before costs one primary-key lookup (its row decides: a key revoked anywhere is refused
  at once) and is never throttled, so a developer whose keys work is not locked out by someone else's failures.
- Otherwise failures decide first (``FailureThrottle``): a client address with too many failed checks in the window,
  or a client that failed in the window asking for a dev-id with too many failed checks, is answered ``Throttled``
  (HTTP 429 with Retry-After) without touching the store or running scrypt, after ``throttled_delay_s``: waiting
  holds a connection but no CPU, so a client flooding with wrong keys slows itself down instead of crowding out
  valid requests. A client with no failures of its own is never refused for the dev-id's, so knowing a dev-id and a
  key id is not enough to lock a developer's new or not-yet-verified keys out.
- A malformed, unknown, revoked or other developer's key is refused after that lookup, without scrypt of its own; it
  runs a dummy scrypt only while the hash workers are idle, so it takes as long as a wrong key unless the server is
  under load. It counts as a failure of the client only (an outsider cannot lock out a dev-id with made-up keys).
- A live key's first check runs scrypt on ``HashGate``: a few worker threads, never the event loop, with a bounded
  queue; when that is full the check is refused as ``AuthBusy`` (HTTP 503 with Retry-After). A wrong secret for a
  real key counts as a failure of the client and of the dev-id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from controlplane.auth.developers import Developers, LiveKey
from core.errors import FatalError, RetryableError
from core.workqueue import BoundedExecutor, QueueFull

log = logging.getLogger(__name__)

T = TypeVar("T")


class Throttled(RetryableError):
    """Too many failed key checks from this client or for this dev-id; ``retry_after`` says when to try again."""


class AuthBusy(RetryableError):
    """Too many key checks waiting for scrypt; ``retry_after`` says when to try again."""


class FailureThrottle:
    """Failed key checks counted per client address and per dev-id in a moving window (the ``limits`` library).

    ``per_client`` / ``per_developer`` are ``limits`` strings such as ``"20/minute"``. ``storage_uri`` is
    ``memory://`` (this process) or ``redis://host:port/db`` (shared by every API process). When the storage cannot
    be reached the throttle lets checks through (and logs it): the hash gate still bounds the work. A Redis storage
    fails fast: each command gives up after ``storage_timeout_s`` (connecting or answering, no retries), and after a
    failure the storage is left alone for ``backoff_s`` (doubling on each further failure up to ``max_backoff_s``),
    so an unreachable Redis costs one key check a timeout, not every check.
    """

    def __init__(self, per_client: str = "20/minute", per_developer: str = "20/minute",
                 storage_uri: str = "memory://", storage_timeout_s: float = 0.5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0) -> None:
        try:
            self.per_client, self.per_developer = parse(per_client), parse(per_developer)
            options: dict[str, Any] = {}
            if storage_uri.startswith(("redis", "rediss")):
                options = {"key_prefix": "healthflow:auth", "socket_connect_timeout": storage_timeout_s,
                           "socket_timeout": storage_timeout_s, "retry": Retry(NoBackoff(), 0)}
            self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri, **options))
        except Exception as exc:  # a bad limit string or storage URI
            raise FatalError(f"API-key throttle: {exc} (limits look like '20/minute'; storage is memory:// or "
                             "redis://host:port/db)") from exc
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._next_backoff_s, self._unavailable_until = backoff_s, 0.0
        self._lock = threading.Lock()

    def check(self, client: str, dev_id: str) -> None:
        """Raise ``Throttled`` when ``client`` used up its failures, or when ``dev_id`` did and ``client`` has failed
        in the window too. A client with no recent failures of its own is never refused for the dev-id's: whoever
        knows a dev-id cannot lock its developer's other clients out (their checks still queue for the hash gate)."""
        if not self._available():
            return
        try:
            client_stats = self._limiter.get_window_stats(self.per_client, "client", client)
            if client_stats.remaining <= 0:
                self._refuse("client", client_stats.reset_time)
            if client_stats.remaining < self.per_client.amount:
                developer_stats = self._limiter.get_window_stats(self.per_developer, "dev-id", dev_id)
                if developer_stats.remaining <= 0:
                    self._refuse("dev-id", developer_stats.reset_time)
        except Throttled:
            raise
        except Exception as exc:  # the shared storage is unreachable: fail open, the gate still bounds scrypt
            self._unavailable("not throttling", exc)
        else:
            self._reachable()

    def failed(self, client: str, dev_id: str | None = None) -> None:
        """Count one failure for ``client`` (and ``dev_id`` when given)."""
        hits: list[tuple[RateLimitItem, str, str]] = [(self.per_client, "client", client)]
        if dev_id is not None:
            hits.append((self.per_developer, "dev-id", dev_id))
        for item, scope, who in hits:
            if not self._available():
                return
            try:
                self._limiter.hit(item, scope, who)
            except Exception as exc:
                self._unavailable("failure not counted", exc)
            else:
                self._reachable()

    @staticmethod
    def _refuse(scope: str, reset_time: float) -> None:
        wait = max(1, math.ceil(reset_time - time.time()))
        raise Throttled(f"too many failed API-key checks for this {scope}: retry in {wait} s", retry_after=wait)

    def _available(self) -> bool:
        return time.monotonic() >= self._unavailable_until

    def _unavailable(self, consequence: str, exc: Exception) -> None:
        with self._lock:
            wait, self._next_backoff_s = self._next_backoff_s, min(self._next_backoff_s * 2, self.max_backoff_s)
            self._unavailable_until = time.monotonic() + wait
        log.warning("API-key throttle unavailable, %s (not asked again for %.0f s): %s", consequence, wait, exc)

    def _reachable(self) -> None:
        if self._next_backoff_s != self.backoff_s:
            with self._lock:
                self._next_backoff_s = self.backoff_s


class HashGate:
    """scrypt on ``workers`` threads (default half the CPUs) with at most ``queue`` checks waiting."""

    def __init__(self, workers: int | None = None, queue: int = 16) -> None:
        self._work = BoundedExecutor("api-key-hash", workers or max(1, (os.cpu_count() or 2) // 2), queue)

    async def run(self, work: Callable[[], T], *, required: bool = True) -> T | None:
        """``work()`` on a hash worker. ``required`` work waits in the queue, or raises ``AuthBusy`` when it is
        full; optional work (a dummy hash) runs only on an idle worker and returns None otherwise."""
        try:
            future = self._work.submit(work, optional=not required)
        except QueueFull as exc:
            raise AuthBusy("too many API-key checks in progress: retry in 1 s", retry_after=1) from exc
        return None if future is None else await asyncio.wrap_future(future)

    def close(self) -> None:
        self._work.close()


class ApiKeyGuard:
    """Checks API keys for the API; see the module docstring."""

    def __init__(self, developers: Developers, throttle: FailureThrottle | None = None,
                 gate: HashGate | None = None, throttled_delay_s: float = 0.25) -> None:
        self.developers, self.throttled_delay_s = developers, throttled_delay_s
        self.throttle = throttle or FailureThrottle()
        self.gate = gate or HashGate()

    async def authenticate(self, dev_id: str, api_key: str, client: str) -> bool:
        """True when ``api_key`` is a live key of ``dev_id``; raises ``Throttled`` or ``AuthBusy``."""
        try:
            key = await anyio.to_thread.run_sync(self._lookup, dev_id, api_key, client)
        except Throttled:
            await asyncio.sleep(self.throttled_delay_s)  # holds a connection, not a CPU: a flood slows itself
            raise
        if key is None:
            await self.gate.run(partial(Developers.dummy_verify, api_key), required=False)
            return False
        if key.remembered:
            return True
        return bool(await self.gate.run(partial(self._verify, dev_id, api_key, key, client)))

    def _lookup(self, dev_id: str, api_key: str, client: str) -> LiveKey | None:
        if not self.developers.remembers(dev_id, api_key):
            self.throttle.check(client, dev_id)
        key = self.developers.live_key(dev_id, api_key)
        if key is None:
            self.throttle.failed(client)
        return key

    def _verify(self, dev_id: str, api_key: str, key: LiveKey, client: str) -> bool:
        if self.developers.verify(dev_id, api_key, key):
            return True
        self.throttle.failed(client, dev_id)
        return False

    def close(self) -> None:
        self.gate.close()
