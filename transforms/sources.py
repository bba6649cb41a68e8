"""Bounded raw sources: the ingestion topic up to its end (Kafka, confluent-kafka, no JVM) and files.

Nothing here touches Kafka or lists files while the graph is built: partitions and their start
offsets, and the files matching a pattern, are read when the job runs, on a worker.

A batch Kafka read takes, per partition, everything from the consumer group's committed offset to
the end of the partition at read time. Each message carries an ``AckToken``: the group's offset
moves past a message only once everything it became was delivered or dead-lettered
(``transforms.acks``), so a failed or killed run re-reads what had not ended (at least once).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from core.errors import FatalError, RetryableError, wait_out
from core.raw import AckToken, RawMessage
from transforms.acks import Acknowledger

log = logging.getLogger(__name__)


KAFKA_PATIENCE_S = 300.0  # how long a batch run waits for a broker that is away before it fails (committing nothing)


def kafka_consumer(bootstrap: str, group: str, **extra: Any) -> Any:
    """A consumer that reads by assignment and never commits on its own."""
    from confluent_kafka import Consumer

    return Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", **extra})


def plan_partitions(bootstrap: str, topic: str, group: str, timeout_s: float = 10.0) -> list[tuple[int, int]]:
    """``(partition, start offset)`` for every partition: the group's committed offset, else the start. Raises
    RetryableError while the broker cannot be reached, FatalError for a missing topic or a refused client."""
    from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

    from sinks.kafka import classify as classify_kafka_error

    consumer = kafka_consumer(bootstrap, group)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise topic_metadata_error(bootstrap, topic, info.error if info else None)
        partitions = [TopicPartition(topic, p) for p in sorted(info.partitions)]
        committed = consumer.committed(partitions, timeout=timeout_s)
        plan = []
        for tp in committed:
            start = tp.offset
            if start in (OFFSET_INVALID, None) or start < 0:
                start = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=timeout_s)[0]
            plan.append((tp.partition, start))
        return plan
    except KafkaException as exc:  # away for now (RetryableError), or refusing this client (FatalError)
        error = classify_kafka_error(exc.args[0]) if exc.args and isinstance(exc.args[0], KafkaError) else None
        if isinstance(error, FatalError):
            raise FatalError(f"Kafka at {bootstrap}: {error}") from exc
        raise RetryableError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    finally:
        consumer.close()


def topic_metadata_error(bootstrap: str, topic: str, error: Any) -> Exception:
    """The taxonomy error for a topic the broker's metadata does not give (``error``: its ``KafkaError``, None when
    absent): RetryableError for a transient one (``LEADER_NOT_AVAILABLE`` while a broker restarts, any the client
    marks retriable), FatalError for a missing topic or one this client may not read, with what to fix."""
    from sinks.kafka import classify as classify_kafka_error

    if error is not None and (error.retriable() or isinstance(classify_kafka_error(error), RetryableError)):
        return RetryableError(f"topic {topic!r} on {bootstrap} is not available for now: {error.str()}")
    reason = error.str() if error is not None else "missing"
    return FatalError(f"topic {topic!r} not found on {bootstrap} ({reason}): create it, fix the topic name or grant "
                      f"this client access to it")


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed next offset per partition (partitions it never committed are left out)."""
    from confluent_kafka import TopicPartition

    consumer = kafka_consumer(bootstrap, group)
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
    finally:
        consumer.close()


def commit_offsets(bootstrap: str, topic: str, group: str, next_offsets: dict[int, int]) -> None:
    """Commit the group's position (synchronously)."""
    from confluent_kafka import TopicPartition

    if not next_offsets:
        return
    consumer = kafka_consumer(bootstrap, group)
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in next_offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def healthflow_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """The ``healthflow-*`` headers a raw event carries (backfill marker, request reference)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in headers or () if k.startswith("healthflow-")}


class KafkaOffsets(Acknowledger):
    """Commits a group's offsets (the group reads by assignment, so any client may commit for it)."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self.consumer: Any = None

    def open(self) -> None:
        if self.consumer is None:
            self.consumer = kafka_consumer(self.bootstrap, self.group)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None

    def commit(self, positions: dict[str, int]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        self.open()
        offsets = [TopicPartition(stream.rsplit(":", 1)[0], int(stream.rsplit(":", 1)[1]), position)
                   for stream, position in positions.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # a later commit covers this one; until then a restart re-reads more
            log.warning("offset commit to %s failed (a later one covers it): %s", self.bootstrap, exc)


# How long the broker may hold a fetch that finds nothing new. A read to the end learns that it is there from such an
# empty fetch, so this is what reaching the end of each partition costs (librdkafka's default is 500 ms).
BATCH_FETCH_WAIT_MS = 10


class ReadPartitionToEnd(beam.DoFn):
    """Read one partition from a start offset to its end (partition EOF), at most ``limit`` messages.

    A broker that goes away mid-read is an outage: after ``idle_polls`` polls with neither data nor the end of the
    partition, the read waits it out (``core.errors.wait_out``, warnings in the log) for up to ``patience_s``, then
    raises RetryableError (the run fails and commits nothing past what was delivered)."""

    def __init__(self, bootstrap: str, topic: str, group: str, limit: int | None = None,
                 poll_timeout_s: float = 0.1, idle_polls: int = 300, patience_s: float = KAFKA_PATIENCE_S) -> None:
        self.bootstrap, self.topic, self.group, self.limit = bootstrap, topic, group, limit
        self.poll_timeout_s, self.idle_polls, self.patience_s = poll_timeout_s, idle_polls, patience_s

    def process(self, element: tuple[int, int]) -> Iterator[RawMessage]:
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        partition, start = element
        consumer = kafka_consumer(self.bootstrap, f"{self.group}.reader", **{
            "enable.partition.eof": True, "fetch.wait.max.ms": BATCH_FETCH_WAIT_MS})
        previous, read = start - 1, 0

        def next_batch() -> list[Any]:
            """Messages (or the end of the partition) as soon as one is there, with the rest already fetched;
            RetryableError after ``idle_polls`` polls of nothing."""
            wanted = min(500, self.limit - read) if self.limit else 500
            for _ in range(self.idle_polls):
                head = consumer.poll(self.poll_timeout_s)
                if head is not None:
                    return [head, *consumer.consume(wanted - 1, 0)] if wanted > 1 else [head]
            raise RetryableError(f"no data and no end of partition from {self.topic}[{partition}] for "
                                 f"{self.idle_polls * self.poll_timeout_s:.0f} s")

        try:
            consumer.assign([TopicPartition(self.topic, partition, start)])
            while self.limit is None or read < self.limit:
                batch = wait_out(next_batch, f"Kafka {self.bootstrap}", self.patience_s, log=log)
                eof = False
                for message in batch:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            eof = True
                            break
                        raise KafkaException(error)
                    offset = message.offset()
                    yield RawMessage(message.value() or b"", {"topic": self.topic, "partition": partition,
                                                              "offset": offset,
                                                              **healthflow_headers(message.headers())},
                                     ack=AckToken("offset", f"{self.topic}:{partition}", offset, previous,
                                                  first=read == 0))
                    read += 1
                    previous = offset
                if eof:
                    break
        finally:
            consumer.close()


class PlanPartitions(beam.DoFn):
    """Impulse → (partition, start offset) for every partition, read when the job runs (never while building)."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap, self.topic, self.group = bootstrap, topic, group

    def process(self, _: Any) -> Iterator[tuple[int, int]]:
        yield from wait_out(lambda: plan_partitions(self.bootstrap, self.topic, self.group), f"Kafka {self.bootstrap}",
                            KAFKA_PATIENCE_S, log=log)


class ReadKafkaBatch(beam.PTransform):
    """Everything new on ``topic`` for consumer group ``group``, as RawMessages (planned at run time)."""

    def __init__(self, bootstrap: str, topic: str, group: str, limit_per_partition: int | None = None) -> None:
        super().__init__()
        self.bootstrap, self.topic, self.group, self.limit = bootstrap, topic, group, limit_per_partition

    def expand(self, pbegin):
        return (pbegin
                | "Impulse" >> beam.Impulse()
                | "Partitions" >> beam.ParDo(PlanPartitions(self.bootstrap, self.topic, self.group))
                | "SpreadPartitions" >> beam.Reshuffle()
                | "ReadPartition" >> beam.ParDo(ReadPartitionToEnd(self.bootstrap, self.topic, self.group,
                                                                   self.limit)))


def read_lines(path: str) -> Iterator[RawMessage]:
    """One JSON raw event per line of a file (blank lines skipped)."""
    with FileSystems.open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield RawMessage(line.rstrip(b"\r\n"), {"path": path, "line": number}, encoding="json")


def match_files(pattern: str) -> Iterator[str]:
    """The files matching ``pattern``, sorted; no match at all is a configuration error."""
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not paths:
        raise FatalError(f"no input files match {pattern!r}")
    yield from paths


class ReadRawFiles(beam.PTransform):
    """Raw events from JSON-lines files matching ``pattern`` (local, s3://, gs://), listed at run time."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        return (pbegin
                | "Pattern" >> beam.Create([self.pattern])
                | "Match" >> beam.FlatMap(match_files)
                | "ReadLines" >> beam.FlatMap(read_lines))
