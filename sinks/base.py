"""The sink contract: every destination writes batches and returns what it delivered and what failed.

A sink never logs-and-drops: each event of a batch ends in ``SinkResult.delivered`` or in
``SinkResult.failures`` with the exception that decides its route (see ``core.errors``).
Sinks must be idempotent: writing the same event twice leaves one copy (upsert by natural key,
deterministic object names, dedup ids). A sink is built from config only (picklable); it opens
connections in ``open()`` on the worker and releases them in ``close()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.events import NormalizedEvent


@dataclass(frozen=True)
class DeliveryFailure:
    event: NormalizedEvent
    error: BaseException


@dataclass
class SinkResult:
    delivered: list[str] = field(default_factory=list)
    failures: list[DeliveryFailure] = field(default_factory=list)

    def fail_all(self, events: Sequence[NormalizedEvent], error: BaseException) -> SinkResult:
        self.failures.extend(DeliveryFailure(e, error) for e in events)
        return self


class Sink(ABC):
    """A destination. ``name`` identifies it in counters and dead letters."""

    #: True when the sink applies a user's events in the order given to ``write``.
    ordered: bool = True

    def local_only(self) -> str | None:
        """Why this destination exists on one machine only (a file path), or None when every worker reaches it."""
        return None

    def __init__(self, name: str) -> None:
        self.name = name

    def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire connections; called once per worker before the first write."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abstractmethod
    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        """Deliver a batch (in the given order); report every event as delivered or failed."""
