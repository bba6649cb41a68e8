"""Grouping within a bundle: values gathered per (key, window) and emitted together, so that the keyed step after
reads and writes its state once per group instead of once per value."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue


class GroupWithinBundle(beam.DoFn):
    """A DoFn whose ``process`` calls ``gather(key, values, window, timestamp)``; it emits ``(key, tuple(values))`` per
    (key, window), the values in the order gathered, with the latest timestamp of the group, every ``per_flush``
    values and at the end of the bundle. Nothing is held across bundles."""

    def __init__(self, per_flush: int) -> None:
        self.per_flush = per_flush

    def start_bundle(self) -> None:
        self.pending: dict[tuple[Any, Any], tuple[list[Any], Any]] = {}
        self.buffered = 0

    def gather(self, key: Any, values: Iterable[Any], window: Any, timestamp: Any) -> Iterator[WindowedValue]:
        group, latest = self.pending.get((key, window)) or ([], timestamp)
        before = len(group)
        group.extend(values)
        self.pending[(key, window)] = (group, max(latest, timestamp))
        self.buffered += len(group) - before
        if self.buffered >= self.per_flush:
            yield from self.finish_bundle()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        pending, self.pending, self.buffered = self.pending, {}, 0
        for (key, window), (group, timestamp) in pending.items():
            yield WindowedValue((key, tuple(group)), timestamp, [window])
