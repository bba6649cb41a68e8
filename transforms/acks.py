"""Acknowledge a source message only after everything it became is delivered or dead-lettered.

Every message read from a topic carries an ``AckToken`` and the whole ``ROOT_WEIGHT``. Each stage
that turns one element into several splits the weights it carries among them (never copies), and
each branch that ends — an event delivered or dead-lettered at one destination, a dead letter
stored, a message that held nothing — hands its weights to ``Acknowledge``. When the weights of a
message add up to ``ROOT_WEIGHT`` again, all of it has ended: a Pub/Sub message is acknowledged,
and a Kafka partition's committed offset moves past every message before it that has ended too.

Weights are exact integers, so nothing ends early whatever order the branches finish in; a runner
that loses in-flight work (a crash) never acknowledges it, and the source delivers it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms import userstate
from apache_beam.utils.windowed_value import WindowedValue

from core.raw import AckToken
from transforms.bundles import GroupWithinBundle
from transforms.reuse import acquire, private_copy, release

ROOT_WEIGHT = 1 << 60

log = logging.getLogger(__name__)


Acks = tuple[tuple[AckToken, int], ...]


def root_acks(token: AckToken | None) -> Acks:
    return () if token is None else ((token, ROOT_WEIGHT),)


def split_acks(acks: Acks, parts: int) -> list[Acks]:
    """``acks`` shared among ``parts`` branches: the weights of all parts add up to the original."""
    if parts <= 1:
        return [acks][:parts]
    shares: list[list[tuple[AckToken, int]]] = [[] for _ in range(parts)]
    for token, weight in acks:
        each, rest = divmod(weight, parts)
        for index in range(parts):
            share = each + (rest if index == 0 else 0)
            if share:
                shares[index].append((token, share))
    return [tuple(s) for s in shares]


def join_acks(groups: Iterable[Acks]) -> Acks:
    return tuple(ack for group in groups for ack in group)


@dataclass
class _StreamProgress:
    """One stream's acknowledgement state (Beam state, per stream key)."""

    weights: dict[tuple[str, Any], int] = field(default_factory=dict)  # (reader, position) → weight returned so far
    ended_after: dict[int, int] = field(default_factory=dict)  # previous offset → ended offset
    committed: int | None = None  # last offset below which everything has ended


class Acknowledger:
    """Source-side acknowledgement, opened on the worker (see ``transforms.streams``)."""

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def commit(self, positions: dict[str, int]) -> None:
        """Commit ``stream → next offset to read``."""
        raise NotImplementedError(f"{type(self).__name__} does not commit offsets")

    def acknowledge(self, stream: str, ids: Sequence[Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not acknowledge message ids")


def _opened(acknowledger: Acknowledger) -> Acknowledger:
    acknowledger.open()
    return acknowledger


class _TrackAcks(beam.DoFn):
    """(stream, acks) → acknowledgements once a message's weights are complete; keyed by stream."""

    PROGRESS = userstate.ReadModifyWriteStateSpec("progress", PickleCoder())

    def __init__(self, acknowledger: Acknowledger) -> None:
        self.acknowledger = acknowledger

    def setup(self) -> None:
        self.source_acks = acquire("acknowledger", self.acknowledger,
                                   lambda: _opened(private_copy(self.acknowledger)))

    def teardown(self) -> None:
        release("acknowledger", self.acknowledger, self.source_acks)

    def start_bundle(self) -> None:
        self.commits: dict[str, int] = {}
        self.acks: dict[str, list[Any]] = {}

    def process(self, element: tuple[str, Acks], progress=beam.DoFn.StateParam(PROGRESS)) -> Iterator[Any]:
        stream, acks = element
        state: _StreamProgress = progress.read() or _StreamProgress()
        for token, weight in acks:
            copy = (token.reader, token.position)
            total = state.weights.get(copy, 0) + weight
            if total < ROOT_WEIGHT:
                state.weights[copy] = total
                continue
            state.weights.pop(copy, None)
            if token.kind == "ack_id":
                self.acks.setdefault(stream, []).append(token.position)
                continue
            if token.first and state.committed is None:
                state.committed = token.previous
            state.ended_after[int(token.previous)] = int(token.position)
        if state.committed is not None and state.committed in state.ended_after:
            while state.committed in state.ended_after:
                state.committed = state.ended_after.pop(state.committed)
            self.commits[stream] = state.committed + 1
        progress.write(state)
        return iter(())

    def finish_bundle(self) -> None:
        # Progress is in state already: a failed commit or acknowledgement is made good by the next one (Kafka), or
        # the source delivers the messages again (Pub/Sub); never a reason to stop the stream.
        try:
            if self.commits:
                self.source_acks.commit(self.commits)
            for stream, ids in self.acks.items():
                self.source_acks.acknowledge(stream, ids)
        except Exception as exc:
            log.warning("acknowledging at the source failed (it will deliver again what was not): %s", exc)


class _ByStream(GroupWithinBundle):
    """Acks → (stream, acks): the acks of a bundle gathered per stream (at most ``acks_per_flush`` at a time), so
    that ``_TrackAcks`` reads and writes a stream's progress once for them all instead of once per ended branch. The
    weights are the same ones, only grouped: a message still ends when, and only when, all of them are back."""

    def __init__(self, acks_per_flush: int = 5000) -> None:
        super().__init__(acks_per_flush)

    def process(self, acks: Acks, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam) -> Iterator[WindowedValue]:
        for token, weight in acks:
            self.gather(token.stream, ((token, weight),), window, timestamp)
        yield from self.gathered(len(acks))


class Acknowledge(beam.PTransform):
    """PCollection[Acks] (ended branches) → acknowledgements at the source; outputs nothing."""

    def __init__(self, acknowledger: Acknowledger) -> None:
        super().__init__()
        self.acknowledger = acknowledger

    def expand(self, ended):
        return (ended
                | "ByStream" >> beam.ParDo(_ByStream()).with_output_types(tuple[str, Any])
                | "Track" >> beam.ParDo(_TrackAcks(self.acknowledger)).with_input_types(tuple[str, Any]))
