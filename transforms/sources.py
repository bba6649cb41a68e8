"""Raw sources: the ingestion topic (Kafka, read with confluent-kafka, no JVM) and files.

Kafka batch reads take, per partition, everything from the consumer group's committed offset to
the end of the partition at read time. Offsets are committed by the runner only after the whole
pipeline (every sink) has succeeded: a failed run re-reads the same messages (at least once).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from core.errors import FatalError
from core.raw import RawMessage
from transforms.normalize import METRICS

NEXT_OFFSET = "next_offset"


def _consumer(bootstrap: str, group: str, **extra: Any) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", **extra})


def plan_partitions(bootstrap: str, topic: str, group: str, timeout_s: float = 10.0) -> list[tuple[int, int]]:
    """``(partition, start offset)`` for every partition: the group's committed offset, else the start."""
    consumer = _consumer(bootstrap, group)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise FatalError(f"topic {topic!r} not found on {bootstrap}: {info.error if info else 'missing'}")
        partitions = [TopicPartition(topic, p) for p in sorted(info.partitions)]
        committed = consumer.committed(partitions, timeout=timeout_s)
        plan = []
        for tp in committed:
            start = tp.offset
            if start in (OFFSET_INVALID, None) or start < 0:
                start = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=timeout_s)[0]
            plan.append((tp.partition, start))
        return plan
    except KafkaException as exc:
        raise FatalError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    finally:
        consumer.close()


def commit_offsets(bootstrap: str, topic: str, group: str, next_offsets: dict[int, int]) -> None:
    """Commit the group's position (synchronously); call only after every sink accepted the data."""
    if not next_offsets:
        return
    consumer = _consumer(bootstrap, group)
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in next_offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def _healthflow_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """The ``healthflow-*`` Kafka headers a raw event carries (backfill marker, request reference)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in headers or () if k.startswith("healthflow-")}


class ReadPartitionToEnd(beam.DoFn):
    """Read one partition from a start offset to its end (partition EOF), at most ``limit`` messages."""

    def __init__(self, bootstrap: str, topic: str, group: str, limit: int | None = None,
                 poll_timeout_s: float = 0.1, idle_polls: int = 300) -> None:
        self.bootstrap, self.topic, self.group, self.limit = bootstrap, topic, group, limit
        self.poll_timeout_s, self.idle_polls = poll_timeout_s, idle_polls

    def process(self, element: tuple[int, int]) -> Iterator[RawMessage]:
        partition, start = element
        consumer = _consumer(self.bootstrap, f"{self.group}.reader", **{"enable.partition.eof": True})
        next_offset, read, idle = start, 0, 0
        try:
            consumer.assign([TopicPartition(self.topic, partition, start)])
            while self.limit is None or read < self.limit:
                batch = consumer.consume(min(500, self.limit - read) if self.limit else 500, self.poll_timeout_s)
                if not batch:
                    idle += 1
                    if idle >= self.idle_polls:
                        raise KafkaException(f"no data and no end-of-partition from {self.topic}[{partition}]")
                    continue
                idle, eof = 0, False
                for message in batch:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            eof = True
                            break
                        raise KafkaException(error)
                    read += 1
                    next_offset = message.offset() + 1
                    yield RawMessage(message.value() or b"", {"topic": self.topic, "partition": partition,
                                                              "offset": message.offset(),
                                                              **_healthflow_headers(message.headers())})
                if eof:
                    break
        finally:
            consumer.close()
        Metrics.distribution(METRICS, f"{NEXT_OFFSET}:{self.topic}:{partition}").update(next_offset)


class ReadKafkaBatch(beam.PTransform):
    """Everything new on ``topic`` for consumer group ``group``, as RawMessages."""

    def __init__(self, bootstrap: str, topic: str, group: str, limit_per_partition: int | None = None) -> None:
        super().__init__()
        self.bootstrap, self.topic, self.group, self.limit = bootstrap, topic, group, limit_per_partition

    def expand(self, pbegin):
        plan = plan_partitions(self.bootstrap, self.topic, self.group)
        return (pbegin
                | "Partitions" >> beam.Create(plan)
                | "SpreadPartitions" >> beam.Reshuffle()
                | "ReadPartition" >> beam.ParDo(ReadPartitionToEnd(self.bootstrap, self.topic, self.group,
                                                                   self.limit)))


def read_lines(path: str) -> Iterator[RawMessage]:
    """One JSON raw event per line of a file (blank lines skipped)."""
    with FileSystems.open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield RawMessage(line.rstrip(b"\r\n"), {"path": path, "line": number}, encoding="json")


class ReadRawFiles(beam.PTransform):
    """Raw events from JSON-lines files matching ``pattern`` (local, s3://, gs://)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        paths = sorted(m.path for m in FileSystems.match([self.pattern])[0].metadata_list)
        if not paths:
            raise FatalError(f"no input files match {self.pattern!r}")
        return pbegin | "Files" >> beam.Create(paths) | "ReadLines" >> beam.FlatMap(read_lines)
