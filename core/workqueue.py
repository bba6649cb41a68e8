"""A bounded work queue: a fixed set of worker threads and at most ``queue`` tasks waiting for them.

    work = BoundedExecutor("backfill", workers=2, queue=32)
    future = work.submit(task)           # QueueFull (a RetryableError with retry_after) when 34 are in flight
    work.submit(task, optional=True)     # runs only on an idle worker, else None (e.g. decoy work)

Work beyond the bound is refused at once, so a burst of requests can neither start a thread each nor pile up
memory: the caller answers "busy, retry after N s" instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from core.errors import FatalError, RetryableError

T = TypeVar("T")


class QueueFull(RetryableError):
    """Every worker is busy and the queue is full; ``retry_after`` is a sensible wait."""


class BoundedExecutor:
    def __init__(self, name: str, workers: int, queue: int, retry_after_s: float = 1.0) -> None:
        if workers < 1 or queue < 0:
            raise FatalError(f"{name}: needs at least 1 worker and a queue of 0 or more (got {workers} and {queue})")
        self.name, self.workers, self.queue, self.retry_after_s = name, workers, queue, retry_after_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Tasks running or waiting."""
        with self._lock:
            return self._in_flight

    def submit(self, fn: Callable[..., T], *args: Any, optional: bool = False) -> Future[T] | None:
        """Run ``fn(*args)`` on a worker. Raises ``QueueFull`` when ``workers + queue`` tasks are in flight; an
        ``optional`` task runs only when a worker is idle and is dropped (None) otherwise."""
        with self._lock:
            if self._in_flight >= (self.workers if optional else self.workers + self.queue):
                if optional:
                    return None
                raise QueueFull(f"{self.name}: {self.workers} workers busy and {self.queue} tasks waiting; retry in "
                                f"{self.retry_after_s:g} s", retry_after=self.retry_after_s)
            self._in_flight += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def close(self, wait: bool = False) -> None:
        """Stop taking work; waiting tasks are dropped, running ones finish (``wait`` for them)."""
        self._executor.shutdown(wait=wait, cancel_futures=True)
