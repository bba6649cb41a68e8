"""Writing dead letters from a pipeline: the Beam step in front of the dead-letter store (``core.dead_letters``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from core.dead_letters import write_dead_letter


class WriteDeadLetter(beam.DoFn):
    """Persist each dead letter; yields its path. An I/O error fails the bundle (Beam retries it)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def process(self, record: dict[str, Any]) -> Iterator[str]:
        yield write_dead_letter(self.root, record)
