"""ConcurrentWrites with real threads: how many writes run at once, in which order they start, what is reported."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest

from sinks.concurrent_writes import ConcurrentWrites


class Refused(Exception):
    """A write's failure that does not stop the batch."""


class Stop(Exception):
    """A write's failure that stops the batch."""


def stops(exc: BaseException) -> bool:
    return isinstance(exc, Stop)


def test_one_at_a_time_until_a_write_succeeds_then_at_once() -> None:
    threads: list[str] = []
    lock = threading.Lock()
    in_flight, most = 0, 0
    released = threading.Event()

    def write(index: int) -> Callable[[], None]:
        def run() -> None:
            nonlocal in_flight, most
            with lock:
                threads.append(threading.current_thread().name)
                in_flight += 1
                most = max(most, in_flight)
                if in_flight == 3:
                    released.set()
            try:
                if index < 3:
                    raise Refused(index)
                if index > 3:
                    assert released.wait(20)  # three at once (the bound): only then does any finish
            finally:
                with lock:
                    in_flight -= 1
        return run

    writes = ConcurrentWrites("unit", 3)
    outcomes = writes.run([write(i) for i in range(12)], stops)
    writes.close()

    assert [type(o) for o in outcomes] == [Refused] * 3 + [type(None)] * 9
    assert threads[:4] == [threading.current_thread().name] * 4  # the failing ones and the first success: inline
    assert most == 3 and len(set(threads[4:])) == 3


def test_nothing_starts_after_a_stop_and_only_what_one_by_one_would_see_is_reported() -> None:
    """Writes 1-4 start together; write 2 stops the batch while 1, 3 and 4 are in flight: they finish (once the stop
    is known) before ``run`` returns, writes 5-9 never start, and the outcomes end at write 2."""
    started: list[int] = []
    finished: list[int] = []
    all_started = threading.Barrier(4, timeout=20)
    stop_known = threading.Event()

    def write(index: int) -> Callable[[], None]:
        def run() -> None:
            started.append(index)
            if index in (1, 2, 3, 4):
                all_started.wait()
            if index == 2:
                finished.append(index)
                raise Stop
            assert index == 0 or stop_known.wait(20)
            finished.append(index)
            if index == 3:
                raise Refused
        return run

    def stop_noted(exc: BaseException) -> bool:
        if stops(exc):
            stop_known.set()
        return stops(exc)

    writes = ConcurrentWrites("unit", 4)
    outcomes = writes.run([write(i) for i in range(10)], stop_noted)
    writes.close()

    assert [type(o) for o in outcomes] == [type(None), type(None), Stop]
    assert sorted(started) == sorted(finished) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("concurrency", "count"), [(1, 10), (8, 2), (8, 1), (8, 0)])
def test_no_thread_when_one_at_a_time_or_two_writes_or_fewer(concurrency: int, count: int) -> None:
    threads: list[str] = []
    writes = ConcurrentWrites("unit", concurrency)

    outcomes = writes.run([lambda: threads.append(threading.current_thread().name)] * count, stops)

    assert outcomes == [None] * count and threads == [threading.current_thread().name] * count
    assert writes._pool is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_threads_of_its_own() -> None:
    """A child forked after the pool was made has none of its threads: waiting for them would never end."""
    writes = ConcurrentWrites("unit", 4)
    all_threads = threading.Barrier(4, timeout=20)  # writes 1-4 at once: all three pool threads made, then idle
    assert writes.run([lambda: None, *[all_threads.wait] * 4], stops) == [None] * 5
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit status
        signal.alarm(20)
        os._exit(0 if writes.run([lambda: None] * 6, stops) == [None] * 6 else 1)
    _, status = os.waitpid(child, 0)
    writes.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_helper_that_cannot_start_leaves_no_write_running_after_run() -> None:
    """Threads run out (or the interpreter is shutting down) after a helper was started: ``run`` raises, and only
    once every write started has finished; nothing is written after it returns."""
    import time

    lock = threading.Lock()
    finished = 0

    def write() -> None:
        nonlocal finished
        time.sleep(0.05)
        with lock:
            finished += 1

    writes = ConcurrentWrites("unit", 4)
    writes.run([write], stops)  # one success: the next run goes concurrent at once
    assert writes._pool is None  # one write: inline
    writes.run([write, write, write], stops)  # makes the pool
    pool = writes._pool
    assert pool is not None
    submitted = 0
    submit = pool.submit

    def submit_once(*args: object, **kwargs: object) -> object:
        nonlocal submitted
        submitted += 1
        if submitted > 1:
            raise RuntimeError("can't start new thread")
        return submit(*args, **kwargs)

    pool.submit = submit_once  # type: ignore[method-assign]
    finished = 0
    with pytest.raises(RuntimeError, match="can't start new thread"):
        writes.run([write] * 10, stops)
    done_at_return = finished
    time.sleep(0.3)
    assert finished == done_at_return  # the helper that started had finished its writes before run returned
    assert done_at_return >= 1
    writes.close()
