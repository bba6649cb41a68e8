"""The error taxonomy: one small set of classes decides retry vs dead-letter vs fail.

- ``RetryableError``: transient (network, timeouts, 5xx, 429, lock waits). Retried with backoff,
  then dead-lettered when attempts run out.
- ``PermanentError``: this input can never succeed as it is (malformed payload, schema mismatch,
  4xx). Dead-lettered at once with its original bytes and the reason.
- ``FatalError``: the pipeline itself is misconfigured (bad credentials, missing table rights,
  bad destination config). Fails the run: retrying or dead-lettering every element would hide it.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC
from enum import Enum
from typing import TypeVar

T = TypeVar("T")


class Route(Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    FAIL = "fail"


class HealthflowError(Exception):
    """Base of healthflow's own errors."""


class RetryableError(HealthflowError):
    """Transient failure; ``retry_after`` (seconds) is the earliest sensible retry when known."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(HealthflowError):
    """This input will never succeed as it is: dead-letter it."""


class FatalError(HealthflowError):
    """Misconfiguration: stop the run and say what to fix."""


class EndpointGone(PermanentError):
    """The destination said it is gone for good (HTTP 410): dead-letter, and disable the destination."""


class DestinationDisabled(PermanentError):
    """The destination is disabled; its events are kept as dead letters until it is enabled again."""


def route(exc: BaseException) -> Route:
    """Where a failure goes. Unknown exceptions are retried, then dead-lettered: never dropped."""
    if isinstance(exc, FatalError):
        return Route.FAIL
    if isinstance(exc, PermanentError | ValueError | KeyError | TypeError | UnicodeError | ArithmeticError):
        return Route.DEAD_LETTER  # ArithmeticError: a value no computation can hold (OverflowError), never transient
    return Route.RETRY


MAX_RETRY_AFTER_S = 7 * 24 * 3600.0  # a server asking for longer is capped, not obeyed forever


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), capped at a week;
    None when absent or unparsable (including ``inf`` and ``nan``); never negative (a past date means now)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(max(0.0, seconds), MAX_RETRY_AFTER_S) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, when.timestamp() - (time.time() if now is None else now)), MAX_RETRY_AFTER_S)


def wait_out(action: Callable[[], T], what: str, patience_s: float | None = 300.0, first_delay_s: float = 0.2,
             max_delay_s: float = 5.0, log: logging.Logger | None = None) -> T:
    """``action()``, retried with exponential backoff while it raises RetryableError (an outage of ``what``), for up to
    ``patience_s`` seconds (None: for as long as it lasts; then the last error is raised). Other errors, FatalError
    included, are raised at once. Each wait is logged as a warning naming ``what``."""
    deadline = None if patience_s is None else time.monotonic() + patience_s
    delay = first_delay_s
    while True:
        try:
            return action()
        except RetryableError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            (log or logging.getLogger(__name__)).warning("%s unavailable, retrying in %.1fs: %s", what, delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
