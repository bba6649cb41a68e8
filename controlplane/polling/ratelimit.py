"""Rate limits shared by every poller: token buckets in Redis (or in process, for the embedded demo).

One bucket per ``(provider, scope key, limit)`` from the manifest's ``api.rate_limits``; a request takes one
token from *every* bucket that applies (all of a provider's limits hold at once), all or nothing.

Sizing: a provider limit of ``N`` requests per ``P`` seconds becomes a bucket of capacity ``C`` (the burst,
``burst_fraction`` of ``N``, at least 1) refilled at ``(N - C) / P`` tokens per second. In any ``P``-second window
at most ``C + (N - C) = N`` requests pass, so the provider's own window counter is never exceeded, whatever it
is (fixed or sliding), at the price of a sustained rate of ``1 - burst_fraction`` of the limit.

Priority: ``LIVE`` requests take a token whenever one is there. ``LOW`` (backfill) requests only take one while
the bucket stays more than half full after the take (``low_reserve``), and never while a live request is waiting
for that provider (live waiters leave a short-lived marker): live polls are never starved by a backfill.

A 429 pauses a scope (``pause``): every limiter sharing the Redis sees the pause and waits it out.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

from core.errors import FatalError, RetryableError

DEFAULT_NAMESPACE = "healthflow:ratelimit"


class Priority(Enum):
    LIVE = "live"
    LOW = "low"


LIVE, LOW = Priority.LIVE, Priority.LOW


class RateLimited(RetryableError):
    """The wait for a token is longer than the caller accepts; ``retry_after`` says how long it would be."""


class Cancelled(RetryableError):
    """The wait was cancelled (the scheduler is stopping)."""


@dataclass(frozen=True)
class Bucket:
    """One token bucket: ``key`` is unique per provider, scope key and limit; ``rate`` is tokens per second."""

    provider: str
    key: str
    capacity: float
    rate: float
    user: str | None = None  # the scope key of a ``user`` limit (its pauses are per user)


def bucket_for_limit(provider: str, index: int, requests: int, per_seconds: float, scope: str,
                     user: str | None, burst_fraction: float = 0.2) -> Bucket:
    if scope == "user" and not user:
        raise FatalError(f"{provider}: a per-user rate limit needs the connection's user key")
    burst = 1 if requests < 2 else max(1, min(requests - 1, math.floor(requests * burst_fraction)))
    rate = (requests - burst) / per_seconds if requests >= 2 else requests / per_seconds
    scope_key = f"user:{user}" if scope == "user" else "app"
    return Bucket(provider, f"{scope_key}:{index}:{requests}/{per_seconds:g}", float(burst), rate,
                  user if scope == "user" else None)


def buckets_for(manifest: Any, user: str | None = None, burst_fraction: float = 0.2) -> list[Bucket]:
    """The buckets of a provider manifest (``connectors.manifest.Manifest``) for one connection."""
    limits = manifest.api.rate_limits if manifest.api else []
    return [bucket_for_limit(manifest.provider, i, limit.requests, limit.per_seconds, limit.scope, user,
                             burst_fraction)
            for i, limit in enumerate(limits)]


def http_date(seconds_from_now: float) -> str:
    """An HTTP-date ``seconds_from_now`` ahead (rounded up to the next whole second)."""
    moment = datetime.fromtimestamp(math.ceil(time.time() + seconds_from_now), UTC)
    return email.utils.format_datetime(moment, usegmt=True)


class RateLimiter(Protocol):
    def try_acquire(self, buckets: Sequence[Bucket], priority: Priority = LIVE, cost: int = 1) -> float: ...

    def acquire(self, buckets: Sequence[Bucket], priority: Priority = LIVE, cost: int = 1,
                timeout: float | None = 60.0, cancel: threading.Event | None = None) -> float: ...

    def pause(self, provider: str, seconds: float, user: str | None = None) -> None: ...

    def paused_for(self, provider: str, user: str | None = None) -> float: ...


class _Blocking(ABC):
    """``acquire`` on top of ``try_acquire``: sleep the announced wait, bounded by ``timeout``."""

    low_poll_s = 0.25  # backfill re-checks at least this often (its wait is only an estimate)

    @abstractmethod
    def try_acquire(self, buckets: Sequence[Bucket], priority: Priority = LIVE, cost: int = 1) -> float:
        """Take ``cost`` tokens from every bucket and return 0, or return the seconds to wait."""

    def acquire(self, buckets: Sequence[Bucket], priority: Priority = LIVE, cost: int = 1,
                timeout: float | None = 60.0, cancel: threading.Event | None = None) -> float:
        """Block until every bucket gave a token; return the seconds waited.

        Raises ``RateLimited`` (with ``retry_after``) when the announced wait exceeds what is left of ``timeout``,
        and ``Cancelled`` when ``cancel`` is set while waiting.
        """
        started = time.monotonic()
        while True:
            wait = self.try_acquire(buckets, priority, cost)
            if wait <= 0:
                return time.monotonic() - started
            waited = time.monotonic() - started
            if timeout is not None and waited + wait > timeout:
                provider = buckets[0].provider if buckets else "?"
                raise RateLimited(f"{provider}: rate limited for {wait:.1f}s more (waited {waited:.1f}s, "
                                  f"limit {timeout:g}s)", retry_after=wait)
            if priority is LOW:
                wait = min(wait, self.low_poll_s) * random.uniform(0.8, 1.2)
            else:
                wait = wait + random.uniform(0, 0.01)  # de-synchronize waiters woken by the same refill
            if cancel is not None:
                if cancel.wait(wait):
                    raise Cancelled("rate-limit wait cancelled")
            else:
                time.sleep(wait)


# ----------------------------------------------------------------------------------------------------------------------
# Redis
# ----------------------------------------------------------------------------------------------------------------------
# KEYS: n bucket keys, m pause keys, the live-waiting key. ARGV: n, m, cost, low (0/1), low_reserve, then per bucket:
# capacity, rate (tokens per ms), ttl ms. Returns 0 when every bucket gave its tokens, else the wait in ms.
_ACQUIRE = """
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local low = ARGV[4] == '1'
local reserve = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local waiting = KEYS[n + m + 1]
local wait = 0
for i = n + 1, n + m do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl > wait then wait = ttl end
end
if low then
  local ttl = redis.call('PTTL', waiting)
  if ttl > wait then wait = ttl end
end
local levels = {}
for i = 1, n do
  local base = 5 + (i - 1) * 3
  local cap = tonumber(ARGV[base + 1])
  local rate = tonumber(ARGV[base + 2])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = cap
  elseif now > ts then
    tokens = math.min(cap, tokens + (now - ts) * rate)
  end
  levels[i] = tokens
  local floor = 0
  if low then floor = math.max(0, math.min(cap * reserve, cap - cost)) end
  local need = cost + floor - tokens
  if need > 0 then
    local w = math.ceil(need / rate)
    if w > wait then wait = w end
  end
end
if wait > 0 then
  wait = math.ceil(wait)
  if not low and redis.call('PTTL', waiting) < wait + 100 then
    redis.call('SET', waiting, '1', 'PX', wait + 100)
  end
  return wait
end
for i = 1, n do
  local base = 5 + (i - 1) * 3
  redis.call('HSET', KEYS[i], 'tokens', tostring(levels[i] - cost), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[base + 3]))
end
return 0
"""

# KEYS: the pause key. ARGV: ms. Only ever extends a pause.
_PAUSE = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return redis.call('PTTL', KEYS[1])
"""


class RedisRateLimiter(_Blocking):
    """Token buckets in Redis, one atomic Lua script per acquire: shared by every worker and process.

    Keys are ``<namespace>:{<provider>}:…`` (one Redis Cluster hash slot per provider, as the script needs). The
    script reads Redis' own clock, so workers on machines with skewed clocks still share one consistent bucket.
    """

    def __init__(self, client: Any = None, *, url: str | None = None, namespace: str = DEFAULT_NAMESPACE,
                 low_reserve: float = 0.5) -> None:
        if client is None:
            import redis

            client = redis.Redis.from_url(url or "redis://127.0.0.1:6379/0")
        self.client = client
        self.namespace = namespace
        self.low_reserve = low_reserve
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)

    def _key(self, provider: str, suffix: str) -> str:
        return f"{self.namespace}:{{{provider}}}:{suffix}"

    def _pause_keys(self, provider: str, users: Sequence[str | None]) -> list[str]:
        keys = [self._key(provider, "pause")]
        keys += [self._key(provider, f"pause:user:{u}") for u in dict.fromkeys(users) if u]
        return keys

    def try_acquire(self, buckets: Sequence[Bucket], priority: Priority = LIVE, cost: int = 1) -> float:
        """Take ``cost`` tokens from every bucket (all or none); 0 when taken, else the seconds to wait."""
        if not buckets:
            return 0.0
        provider = buckets[0].provider
        if any(b.provider != provider for b in buckets):
            raise ValueError("one acquire covers one provider's buckets")
        pauses = self._pause_keys(provider, [b.user for b in buckets])
        keys = [self._key(provider, f"bucket:{b.key}") for b in buckets] + pauses + [self._key(provider, "live")]
        args: list[Any] = [len(buckets), len(pauses), cost, int(priority is LOW), self.low_reserve]
        for b in buckets:
            ttl_ms = int(max(60.0, 2 * b.capacity / b.rate) * 1000)
            args += [b.capacity, repr(b.rate / 1000.0), ttl_ms]
        try:
            wait_ms = int(self._acquire(keys=keys, args=args))
        except Exception as exc:  # redis.ConnectionError, TimeoutError, …: the shared limiter is unreachable
            raise _redis_error(exc) from exc
        return wait_ms / 1000.0

    def pause(self, provider: str, seconds: float, user: str | None = None) -> None:
        """Pause ``provider`` (or only ``user``'s per-user buckets) for everyone; an existing longer pause stays."""
        key = self._key(provider, f"pause:user:{user}" if user else "pause")
        try:
            self._pause(keys=[key], args=[max(1, math.ceil(seconds * 1000))])
        except Exception as exc:
            raise _redis_error(exc) from exc

    def paused_for(self, provider: str, user: str | None = None) -> float:
        try:
            ttls = [self.client.pttl(k) for k in self._pause_keys(provider, [user])]
        except Exception as exc:
            raise _redis_error(exc) from exc
        return max([t for t in ttls if t > 0], default=0) / 1000.0


def _redis_error(exc: Exception) -> Exception:
    if isinstance(exc, RetryableError | FatalError):
        return exc
    return RetryableError(f"rate limiter: Redis unavailable ({type(exc).__name__}: {exc})", retry_after=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# In process
# ----------------------------------------------------------------------------------------------------------------------
class LocalRateLimiter(_Blocking):
    """The same buckets, priorities and pauses in one process (embedded demo, tests without Redis)."""

    def __init__(self, low_reserve: float = 0.5) -> None:
        self.low_reserve = low_reserve
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # → (tokens, at)
        self._pauses: dict[tuple[str, str | None], float] = {}  # → until (monotonic)
        self._live_waiting: dict[str, float] = {}  # provider → until

    def try_acquire(self, buckets: Sequence[Bucket], priority: Priority = LIVE, cost: int = 1) -> float:
        if not buckets:
            return 0.0
        provider = buckets[0].provider
        with self._lock:
            now = time.monotonic()
            wait = max([self._pauses.get((provider, u), 0.0) - now for u in {None, *(b.user for b in buckets)}])
            if priority is LOW:
                wait = max(wait, self._live_waiting.get(provider, 0.0) - now)
            levels = []
            for b in buckets:
                tokens, at = self._buckets.get((provider, b.key), (b.capacity, now))
                tokens = min(b.capacity, tokens + max(0.0, now - at) * b.rate)
                levels.append(tokens)
                floor = max(0.0, min(b.capacity * self.low_reserve, b.capacity - cost)) if priority is LOW else 0.0
                need = cost + floor - tokens
                if need > 0:
                    wait = max(wait, need / b.rate)
            if wait > 0:
                if priority is LIVE:
                    self._live_waiting[provider] = max(self._live_waiting.get(provider, 0.0), now + wait + 0.1)
                return wait
            for b, tokens in zip(buckets, levels, strict=True):
                self._buckets[(provider, b.key)] = (tokens - cost, now)
            return 0.0

    def pause(self, provider: str, seconds: float, user: str | None = None) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            self._pauses[(provider, user)] = max(self._pauses.get((provider, user), 0.0), until)

    def paused_for(self, provider: str, user: str | None = None) -> float:
        with self._lock:
            now = time.monotonic()
            return max(0.0, *(self._pauses.get((provider, u), 0.0) - now for u in {None, user}))
