"""What every stage of the pipeline emits besides its main output: dead letters, ended acks, tallies.

- ``DEAD_LETTER``: ``DeadLetterOut`` — a dead-letter record, with the acks that end once it is stored.
- ``ENDED``: acks of work that ended without a dead letter (delivered, filtered, nothing to do).
- ``TALLY``: ``(name, count)`` per bundle, summed into the run summary. Results are read from
  this data, so they are the same on every runner; the same counts go to Beam metrics for
  runners' dashboards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from core.dead_letters import write_dead_letter
from transforms.acks import Acks

DEAD_LETTER = "dead_letter"
ENDED = "ended"
TALLY = "tally"
METRICS = "healthflow"


@dataclass(frozen=True)
class DeadLetterOut:
    record: dict[str, Any]
    acks: Acks = ()


class Tally:
    """Counts of one bundle; ``flush()`` emits them on the ``tally`` output (global window)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, name: str, count: int = 1) -> None:
        if count:
            self.counts[name] += count

    def flush(self) -> Iterator[Any]:
        counts, self.counts = self.counts, Counter()
        for name, count in counts.items():
            Metrics.counter(METRICS, name).inc(count)
            yield pvalue.TaggedOutput(TALLY, GlobalWindows.windowed_value((name, count)))


class StoreDeadLetters(beam.DoFn):
    """Persist each dead letter (``core.dead_letters`` layout), then end the acks it carries.

    An I/O error fails the bundle, so nothing is acknowledged before its dead letter is stored.
    """

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def process(self, dead: DeadLetterOut) -> Iterator[Acks]:
        write_dead_letter(self.root, dead.record)
        if dead.acks:
            yield dead.acks
