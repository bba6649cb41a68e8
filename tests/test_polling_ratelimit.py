"""The shared rate limiter: token buckets in the machine's Redis (and the in-process fallback), priorities, pauses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from connectors import registry
from controlplane.polling.ratelimit import (
    LIVE,
    LOW,
    Cancelled,
    LocalRateLimiter,
    RateLimited,
    RedisRateLimiter,
    bucket_for_limit,
    buckets_for,
    http_date,
)
from core.errors import parse_retry_after

pytest_plugins = ("servers.fake_provider_api",)  # fixtures: redis_client, limiter_namespace

ROOT = Path(__file__).resolve().parent.parent


def max_in_window(times: list[float], seconds: float) -> int:
    times, best, first = sorted(times), 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= seconds:
            first += 1
        best = max(best, last - first + 1)
    return best


@pytest.fixture(params=["redis", "local"])
def make_limiter(request):
    """A factory of limiters that share state: Redis instances with their own connections, or one local limiter."""
    if request.param == "local":
        shared = LocalRateLimiter()
        return lambda: shared
    import redis

    namespace = request.getfixturevalue("limiter_namespace")
    return lambda: RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=namespace)


def test_buckets_follow_the_manifest_and_never_allow_more_than_the_limit_per_window():
    whoop = buckets_for(registry()["whoop"].manifest)
    assert [(b.capacity, round(b.capacity + b.rate * p)) for b, p in zip(whoop, (60, 86400), strict=True)] == [
        (20.0, 100), (2000.0, 10000)]
    fitbit = buckets_for(registry()["fitbit"].manifest, user="u-1")
    assert fitbit[0].user == "u-1" and "user:u-1" in fitbit[0].key
    assert buckets_for(registry()["fitbit"].manifest, user="u-2")[0].key != fitbit[0].key  # per connection
    assert bucket_for_limit("x", 0, 1, 10, "app", None).capacity == 1


def test_retry_after_as_seconds_or_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert 1.0 <= parse_retry_after(http_date(2)) <= 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: go now
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_concurrent_acquirers_never_exceed_the_rate(make_limiter):
    buckets = [bucket_for_limit("acme", 0, 10, 1.0, "app", None)]  # 10 per second: burst 2, 8/s
    taken: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 2.0

    def worker() -> None:
        limiter = make_limiter()
        while True:
            limiter.acquire(buckets, timeout=5)
            now = time.monotonic()
            if now > stop_at:
                return
            with lock:
                taken.append(now)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max_in_window(taken, 1.0) <= 10
    assert len(taken) >= 14  # and the limit is used: 2 + 8/s × 2 s, minus scheduling slack


def test_buckets_are_shared_across_processes(redis_client, limiter_namespace):
    """Another Python process takes from the same Redis bucket: together they stay within the limit."""
    script = textwrap.dedent(f"""
        import time, redis
        from controlplane.polling.ratelimit import RedisRateLimiter, bucket_for_limit
        limiter = RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace={limiter_namespace!r})
        bucket = [bucket_for_limit("acme", 0, 10, 1.0, "app", None)]
        stop = time.time() + 2.0
        while True:
            limiter.acquire(bucket, timeout=5)
            if time.time() > stop:
                break
            print(time.time(), flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    limiter = RedisRateLimiter(redis_client, namespace=limiter_namespace)
    bucket = [bucket_for_limit("acme", 0, 10, 1.0, "app", None)]
    mine: list[float] = []
    stop = time.time() + 2.5
    while time.time() < stop:
        limiter.acquire(bucket, timeout=5)
        mine.append(time.time())
    out, _ = child.communicate(timeout=20)
    assert child.returncode == 0
    theirs = [float(line) for line in out.split()]
    assert theirs and mine
    assert max_in_window(mine + theirs, 1.0) <= 10


def test_several_limits_all_apply(make_limiter):
    limiter = make_limiter()
    buckets = [bucket_for_limit("acme", 0, 100, 1.0, "app", None), bucket_for_limit("acme", 1, 3, 60.0, "app", None)]
    assert limiter.try_acquire(buckets) == 0.0  # the 3/min bucket: a burst of 1
    assert limiter.try_acquire(buckets) > 1.0  # the slow bucket decides, the fast one is not charged
    assert limiter.try_acquire(buckets[:1]) == 0.0


def test_a_pause_applies_to_every_limiter_and_only_to_its_scope(make_limiter):
    first, second = make_limiter(), make_limiter()
    app = [bucket_for_limit("acme", 0, 100, 1.0, "app", None)]
    first.pause("acme", 0.6)
    assert 0.3 < second.try_acquire(app) <= 0.6
    assert second.paused_for("acme") > 0.3
    assert second.try_acquire([bucket_for_limit("other", 0, 100, 1.0, "app", None)]) == 0.0
    started = time.monotonic()
    second.acquire(app, timeout=5)
    assert time.monotonic() - started >= 0.3
    first.pause("acme", 0.1)  # a shorter pause never shortens a longer one
    first.pause("acme", 0.8)
    assert second.paused_for("acme") > 0.5
    user = [bucket_for_limit("fitbit", 0, 100, 1.0, "user", "u-1")]
    first.pause("fitbit", 5, user="u-1")
    assert second.try_acquire(user) > 4
    assert second.try_acquire([bucket_for_limit("fitbit", 0, 100, 1.0, "user", "u-2")]) == 0.0


def test_low_priority_only_takes_from_a_more_than_half_full_bucket_and_yields_to_waiting_live(make_limiter):
    limiter = make_limiter()
    bucket = [bucket_for_limit("acme", 0, 40, 10.0, "app", None)]  # burst 8, 3.2 tokens/s
    for _ in range(4):
        assert limiter.try_acquire(bucket, LOW) == 0.0
    assert limiter.try_acquire(bucket, LOW) > 0  # 4 left: taking one would leave the bucket half full or less
    for _ in range(4):
        assert limiter.try_acquire(bucket, LIVE) == 0.0  # live traffic takes the rest
    assert limiter.try_acquire(bucket, LIVE) > 0  # a live request now waits: its marker holds backfill back …
    time.sleep(0.35)  # … even once a token is back
    assert limiter.try_acquire(bucket, LOW) > 0
    assert limiter.acquire(bucket, LIVE, timeout=2) >= 0


def test_acquire_is_bounded_and_cancellable(make_limiter):
    limiter = make_limiter()
    bucket = [bucket_for_limit("acme", 0, 2, 60.0, "app", None)]  # burst 1, then one per minute
    limiter.acquire(bucket)
    with pytest.raises(RateLimited) as raised:
        limiter.acquire(bucket, timeout=1)
    assert raised.value.retry_after and raised.value.retry_after > 1
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(Cancelled):
        limiter.acquire(bucket, timeout=None, cancel=cancel)
