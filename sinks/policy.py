"""A destination's delivery settings: its sink, its retry policy (quick retries, then scheduled redeliveries), its
batch size and the event types it takes. Read from the destinations file (``sinks.config``) and applied by the
pipeline's delivery (``transforms.deliver``)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sinks.base import Sink
from sinks.status import DEFAULT_DISABLE_AFTER_S

SVIX_REDELIVERY_S = (300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)  # 5 min, 30 min, 2 h, 5 h, 10 h, 10 h


@dataclass(frozen=True)
class RetryPolicy:
    """A destination's retries: quick ones inside the pipeline, then a schedule of redeliveries.

    In the pipeline: ``max_attempts`` with capped exponential backoff and jitter, ``Retry-After``
    honoured up to ``max_delay_s``. After that a transient failure becomes a dead letter with a
    ``next_attempt_at`` from ``redelivery_schedule_s`` (Svix's: 5 min … 10 h, about 27 h in all;
    never sooner than the destination's ``Retry-After``), which scheduled redelivery picks up. A
    destination failing without a single success for ``disable_after_s`` is disabled.
    """

    max_attempts: int = 4
    initial_delay_s: float = 0.2
    max_delay_s: float = 5.0
    jitter: float = 0.2
    redelivery_schedule_s: tuple[float, ...] = SVIX_REDELIVERY_S
    disable_after_s: float = DEFAULT_DISABLE_AFTER_S

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        base = self.initial_delay_s * (2 ** (attempt - 1)) * (1 + random.uniform(-self.jitter, self.jitter))
        if retry_after is not None:
            base = max(base, retry_after)
        return max(0.0, min(base, self.max_delay_s))

    def next_redelivery_ms(self, redelivery_round: int, retry_after: float | None, now: int) -> int | None:
        """When redelivery round ``redelivery_round`` is due, or None once the schedule is spent."""
        if redelivery_round >= len(self.redelivery_schedule_s):
            return None
        wait = self.redelivery_schedule_s[redelivery_round] * (1 + random.uniform(-self.jitter, self.jitter))
        hint = retry_after if retry_after is not None and math.isfinite(retry_after) else 0.0
        return now + int(max(wait, min(hint, 7 * 24 * 3600.0)) * 1000)


@dataclass(frozen=True)
class Target:
    """One destination as the pipeline delivers to it: the sink and its own delivery settings."""

    sink: Sink
    retry: RetryPolicy = RetryPolicy()
    batch_size: int = 200
    event_types: frozenset[str] | None = None  # None: every type

    @property
    def name(self) -> str:
        return self.sink.name
