"""Pulling provider APIs: a shared rate limiter, a window/pagination poller, backfills and a scheduler.

    from controlplane.polling import (CursorStore, KafkaPublisher, Poller, PollConnection, RedisRateLimiter,
                                      Scheduler)

    poller = Poller(cursors=CursorStore(store_url), publisher=KafkaPublisher(bootstrap, raw_topic),
                    limiter=RedisRateLimiter(url="redis://127.0.0.1:6379/0"))   # LocalRateLimiter() without Redis
    poller.poll(connection, "daily_sleep", access_token=lambda: cp.access_token(connection.user_id))
    poller.backfill(connection, "daily_sleep", start, end, access_token=...)   # header healthflow-backfill: true
    Scheduler(poller, connections=..., access_token=lambda c: cp.access_token(c.user_id)).start()

- ``ratelimit``: token buckets per (provider, scope key, limit) from ``api.rate_limits``, in Redis (one Lua
  script per acquire) or in process; ``LIVE``/``LOW`` priority; 429 pauses shared by every worker.
- ``poller``: windows from the cursor in ``max_days`` chunks, manifest pagination, retries; publishes each page as a
  raw event and advances the cursor only after the broker acknowledged the whole window.
- ``cursors``: cursors in the control-plane store (``core.store``).
- ``publisher``: one idempotent producer; per-window acknowledged batches with Kafka headers.
- ``connectors.hooks`` (the provider framework): per-provider request headers and response context (the manifest's
  ``hooks.poll``, usually a class in ``connectors/providers/<slug>/client.py``).
- ``scheduler``: every active connection × kind every 15 minutes, with jitter.

Exports are loaded lazily, so importing the package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Bucket": "ratelimit", "LocalRateLimiter": "ratelimit", "RedisRateLimiter": "ratelimit", "RateLimiter": "ratelimit",
    "RateLimited": "ratelimit", "Cancelled": "ratelimit", "Priority": "ratelimit", "LIVE": "ratelimit",
    "LOW": "ratelimit", "buckets_for": "ratelimit",
    "CursorStore": "cursors",
    "KafkaPublisher": "publisher", "PublishFailed": "publisher", "BACKFILL_HEADER": "publisher",
    "Poller": "poller", "PollConnection": "poller", "PollResult": "poller", "PollTarget": "poller",
    "TokenRejected": "poller", "windows": "poller",
    "Scheduler": "scheduler",
    "ConnectionPolling": "service", "PollReport": "service",
    "NotificationFetcher": "notifications", "FetchReport": "notifications",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
