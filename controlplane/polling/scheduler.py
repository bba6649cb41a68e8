"""Poll every active connection × kind every ``interval_s`` (default 15 min), with jitter, until stopped.

    scheduler = Scheduler(poller, connections=lambda: cp.active_connections(),
                          access_token=lambda c: cp.access_token(c.user_id))
    with scheduler:          # start(): a loop thread and a pool of ``workers`` poll threads
        ...
    # stop(): no new polls; rate-limit waits and backoffs are cancelled; in-flight polls end (cursors stay consistent)

The connection list is read again every ``refresh_s``; new connections are first polled within ``jitter × interval``
(spreading a fleet's first polls), then every ``interval × (1 ± jitter)``. One (connection, kind) is never polled
twice at once. A ``TokenRejected`` defers every kind of that connection by one interval and is reported to
``on_error`` (where the auth layer refreshes or revokes). Providers whose manifest says data is pushed
(``webhooks.mode: push``, Garmin) are not polled unless ``kinds`` says so.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from controlplane.polling.poller import Poller, PollResult, PollTarget, TokenRejected

log = logging.getLogger(__name__)

ErrorHandler = Callable[[PollTarget, str, BaseException], None]


class Scheduler:
    def __init__(self, poller: Poller, connections: Callable[[], Iterable[PollTarget]],
                 access_token: Callable[[PollTarget], str], *, interval_s: float = 900.0, jitter: float = 0.1,
                 workers: int = 4, refresh_s: float = 60.0, kinds: Callable[[PollTarget], Iterable[str]] | None = None,
                 on_error: ErrorHandler | None = None, on_result: Callable[[PollResult], None] | None = None) -> None:
        if interval_s <= 0 or not 0 <= jitter < 1:
            raise ValueError("interval_s must be > 0 and jitter in [0, 1)")
        self.poller, self.connections, self.access_token = poller, connections, access_token
        self.interval_s, self.jitter, self.workers, self.refresh_s = interval_s, jitter, workers, refresh_s
        self.kinds = kinds or self.default_kinds
        self.on_error, self.on_result = on_error, on_result
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._due: dict[tuple[str, str], float] = {}
        self._targets: dict[tuple[str, str], PollTarget] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.polls = 0  # completed polls (successful or not)

    def default_kinds(self, connection: PollTarget) -> list[str]:
        manifest = self.poller.manifest(connection.provider)
        if manifest.webhooks is not None and manifest.webhooks.mode == "push":
            return []
        return self.poller.kinds(connection.provider)

    # ------------------------------------------------------------------------------------------------ one pass
    def poll_one(self, connection: PollTarget, kind: str) -> PollResult | None:
        try:
            result = self.poller.poll(connection, kind, lambda: self.access_token(connection))
        except Exception as exc:
            self._failed(connection, kind, exc)
            return None
        if self.on_result:
            self.on_result(result)
        return result

    def run_once(self) -> list[PollResult]:
        """Poll every connection × kind now (in the worker pool) and wait for all; for cron-style runs and tests."""
        targets = [(c, k) for c in self.connections() for k in self.kinds(c)]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="poll") as pool:
            results = list(pool.map(lambda target: self.poll_one(*target), targets))
        return [r for r in results if r is not None]

    def _failed(self, connection: PollTarget, kind: str, exc: BaseException) -> None:
        log.warning("poll %s %s %s failed: %s: %s", connection.provider, connection.user_id, kind,
                    type(exc).__name__, exc)
        if isinstance(exc, TokenRejected):
            with self._lock:
                later = time.monotonic() + self.interval_s
                for key in self._due:
                    if key[0] == connection.user_id:
                        self._due[key] = max(self._due[key], later)
        if self.on_error:
            try:
                self.on_error(connection, kind, exc)
            except Exception:
                log.exception("on_error handler failed")

    # ------------------------------------------------------------------------------------------------ loop
    def start(self) -> Scheduler:
        if self._thread is not None:
            return self
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="poll")
        self._thread = threading.Thread(target=self._loop, name="poll-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop cleanly: no new polls, waits cancelled, in-flight polls finished or aborted before returning."""
        self._stop.set()
        self.poller.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _refresh(self, now: float) -> None:
        try:
            current = {(c.user_id, k): c for c in self.connections() for k in self.kinds(c)}
        except Exception:
            log.exception("listing connections failed; keeping the previous list")
            return
        with self._lock:
            for key in list(self._due):
                if key not in current:
                    del self._due[key]
            for key in current:
                self._due.setdefault(key, now + random.uniform(0, self.jitter * self.interval_s))
            self._targets = current

    def _loop(self) -> None:
        next_refresh = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_refresh:
                self._refresh(now)
                next_refresh = now + self.refresh_s
            with self._lock:
                ready = [k for k, due in self._due.items() if due <= now and k not in self._in_flight]
                self._in_flight.update(ready)
                upcoming = min((d for k, d in self._due.items() if k not in self._in_flight), default=next_refresh)
            for key in ready:
                assert self._pool is not None
                future = self._pool.submit(self.poll_one, self._targets[key], key[1])
                future.add_done_callback(lambda f, key=key: self._done(key, f))
            self._stop.wait(max(0.01, min(upcoming, next_refresh) - time.monotonic()))

    def _done(self, key: tuple[str, str], future: Future[Any]) -> None:
        with self._lock:
            self._in_flight.discard(key)
            self.polls += 1
            if key in self._due:
                spread = random.uniform(1 - self.jitter, 1 + self.jitter)
                self._due[key] = max(self._due[key], time.monotonic() + self.interval_s * spread)
