"""Independent writes of one batch at the same time, on a bounded set of threads a sink owns.

For destinations where each object is its own round trip (an object store PUT, a file created by the kernel): the
writes of a batch that touch different objects do not depend on each other, so several can be in flight at once.

Guarantees of ``ConcurrentWrites.run``:
- At most ``concurrency`` writes in flight: the calling thread and up to ``concurrency - 1`` threads of this object's
  pool. Writes start in the given order. With ``concurrency=1`` (or two writes or fewer) every write runs in the
  calling thread, one after another, and no thread is ever started.
- One at a time until one write succeeds, so a destination that is away or misconfigured sees one write per batch,
  as with sequential writes.
- Once a write raises an exception ``stops`` accepts, no further write starts; writes already in flight finish.
- The outcomes returned are those of the writes in order, up to and including the first (in the given order) whose
  exception stops the batch: exactly what a sequential loop stopping there would have seen; a write that finished
  after that one is left out (its caller reports it not tried, as before, though it may have been written: callers
  are idempotent). Every write started has finished when ``run`` returns.
- The pool is made on first need (on the worker, and again in a forked child), never pickled, and shut down by
  ``close()``; a later ``run`` makes a new one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any

from core.errors import FatalError

DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64

Write = Callable[[], object]
Stops = Callable[[BaseException], bool]


def checked_concurrency(kind: str, name: str, concurrency: object) -> int:
    """``concurrency`` when it is a whole number from 1 to MAX_CONCURRENCY; FatalError naming the fix otherwise."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise FatalError(f"{kind} sink {name!r}: concurrency must be a whole number from 1 to {MAX_CONCURRENCY} "
                         f"(1 writes one object at a time), got {concurrency!r}")
    return concurrency


class ConcurrentWrites:
    """Runs a batch's independent writes, up to ``concurrency`` at once (see the module docstring)."""

    def __init__(self, name: str, concurrency: int) -> None:
        self.name = name
        self.concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # the process whose threads the pool has (a forked child has none of them)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _pool=None, _pool_pid=0)  # threads never travel with the config

    def close(self) -> None:
        """Shut the pool down (waiting for its threads); the next concurrent ``run`` makes a new one."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def run(self, writes: Sequence[Write], stops: Stops) -> list[BaseException | None]:
        """Each write's outcome in order (None: it returned; else the exception it raised), up to and including the
        first that ``stops`` the batch; the writes after it are not reported (see the module docstring)."""
        outcomes: list[BaseException | None] = []
        for write in writes:  # one at a time until one succeeds
            outcomes.append(outcome := _outcome(write))
            if outcome is None or stops(outcome):
                break
        rest = writes[len(outcomes):]
        if not rest or outcomes[-1] is not None:  # all written, or stopped
            return outcomes
        if self.concurrency == 1 or len(rest) == 1:
            return outcomes + _one_by_one(rest, stops)
        return outcomes + self._concurrently(rest, stops)

    def _concurrently(self, writes: Sequence[Write], stops: Stops) -> list[BaseException | None]:
        """``writes`` in the calling thread and pool threads, each thread taking the next write not yet started."""
        outcomes: list[BaseException | None] = [None] * len(writes)
        lock = threading.Lock()
        started, stopped = 0, False

        def lane() -> None:
            nonlocal started, stopped
            while True:
                with lock:
                    if stopped or started == len(writes):
                        return
                    index, started = started, started + 1
                outcome = outcomes[index] = _outcome(writes[index])
                if outcome is not None:
                    with lock:  # decided under the lock: no write starts once it is known
                        stopped = stopped or stops(outcome)

        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.concurrency - 1, thread_name_prefix=f"writes-{self.name}")
            self._pool_pid = os.getpid()
        helpers = []
        try:  # a helper that cannot be started (no thread left, shutting down): those started are waited for
            for _ in range(min(self.concurrency, len(writes)) - 1):
                helpers.append(self._pool.submit(lane))
            lane()
        except BaseException:
            with lock:
                stopped = True  # the caller is leaving (interrupted): start nothing more
            raise
        finally:
            wait_all(helpers)  # every write started has finished before the outcomes are read
        for helper in helpers:
            helper.result()  # a lane's own failure (a write's exception is its outcome)
        return _one_by_one_view(outcomes[:started], stops)


def _one_by_one(writes: Sequence[Write], stops: Stops) -> list[BaseException | None]:
    """``writes`` in the calling thread, in order, until one stops the batch."""
    outcomes: list[BaseException | None] = []
    for write in writes:
        outcomes.append(outcome := _outcome(write))
        if outcome is not None and stops(outcome):
            break
    return outcomes


def _one_by_one_view(outcomes: list[BaseException | None], stops: Stops) -> list[BaseException | None]:
    """``outcomes`` up to and including the first that stops the batch: what writing one by one would have seen."""
    for position, outcome in enumerate(outcomes):
        if outcome is not None and stops(outcome):
            return outcomes[:position + 1]
    return outcomes


def _outcome(write: Write) -> BaseException | None:
    try:
        write()
    except Exception as exc:
        return exc
    return None
