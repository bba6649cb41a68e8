"""Grouping within a bundle: values gathered per (key, window) and emitted together, so that the step after reads
and writes its state (or ships its data) once per group instead of once per value."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue


class GroupWithinBundle(beam.DoFn):
    """A DoFn whose ``process`` calls ``gather(key, values, window, timestamp)`` for what an element brings, then
    ``yield from gathered(count)``. It emits ``(key, grouped(values))`` per (key, window), the values in the order
    gathered, with the latest timestamp of the group: once ``per_flush`` is counted, and at the end of the bundle.
    Nothing is held across bundles. ``grouped`` is ``tuple`` unless a subclass packs the values otherwise."""

    def __init__(self, per_flush: int) -> None:
        self.per_flush = per_flush

    def start_bundle(self) -> None:
        self.pending: dict[tuple[Any, Any], tuple[list[Any], Any]] = {}
        self.buffered = 0

    def gather(self, key: Any, values: Iterable[Any], window: Any, timestamp: Any) -> None:
        group, latest = self.pending.get((key, window)) or ([], timestamp)
        group.extend(values)
        self.pending[(key, window)] = (group, max(latest, timestamp))

    def gathered(self, count: int = 1) -> Iterator[WindowedValue]:
        """Count what the element gathered (values, messages: the subclass's unit); flush once ``per_flush`` is."""
        self.buffered += count
        if self.buffered >= self.per_flush:
            yield from self.flush()

    def grouped(self, values: list[Any]) -> Any:
        return tuple(values)

    def flush(self) -> Iterator[WindowedValue]:
        pending, self.pending, self.buffered = self.pending, {}, 0
        for (key, window), (group, timestamp) in pending.items():
            yield WindowedValue((key, self.grouped(group)), timestamp, [window])

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield from self.flush()
