"""Bounded raw sources: the ingestion topic up to its end (Kafka, confluent-kafka, no JVM) and files.

Nothing here touches Kafka or lists files while the graph is built: partitions and their start
offsets, and the files matching a pattern, are read when the job runs, on a worker.

A batch Kafka read takes, per partition, everything from the consumer group's committed offset to
the end of the partition at read time. Each message carries an ``AckToken``: the group's offset
moves past a message only once everything it became was delivered or dead-lettered
(``transforms.acks``), so a failed or killed run re-reads what had not ended (at least once).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
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


RANGES_PER_FILE = 32  # an uncompressed file is read in about this many byte ranges, in parallel ...
RANGE_BYTES = (1 << 20, 64 << 20)  # ... each of at least 1 MiB (local files) and about 64 MiB at most
REMOTE_RANGE_BYTES = 32 << 20  # at least this on s3://, gs://, ...: each opened range fills Beam's 16 MiB read buffer
SCAN_BLOCK = 8 << 20  # planning reads a file in blocks of this size
LINE_BUFFER_BYTES = 1 << 20  # lines of a handle that cannot peek are read through a buffer of this size


@dataclass(frozen=True)
class FileRange:
    """The lines of ``path`` from byte ``start`` (the first byte of a line, numbered ``first_line``) up to byte
    ``end``, exclusive (a line's first byte; None: the end of the file as it is when read, which must reach
    ``planned_size``, the size the file had when its ranges were planned: it may have grown since, not shrunk)."""

    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1
    planned_size: int = 0


def read_range(file_range: FileRange) -> Iterator[RawMessage]:
    """One JSON raw event per line of a range of a file (blank lines skipped), each with its file's line number.

    A file rewritten since its ranges were planned so that a planned cut no longer follows a newline, or shortened
    below its planned size, raises FileChanged rather than read lines cut in two or lose lines. (A rewrite that keeps
    the size and the bytes before each cut but moves other newlines is not detected: files must stay as they are
    while a run reads them; appending is fine.)"""
    path, end = file_range.path, file_range.end
    with FileSystems.open(path) as handle:
        if file_range.start:
            handle.seek(file_range.start - 1)
            if handle.read(1) != b"\n":
                raise FileChanged(path, file_range.start)
        position = file_range.start
        lines = _lines_of(handle)
        for number, line in enumerate(lines, start=file_range.first_line):
            if end is not None and position >= end:
                break
            position += len(line)
            if line.strip():
                yield RawMessage(line.rstrip(b"\r\n"), {"path": path, "line": number}, encoding="json")
        if position != end and (end is not None or position < file_range.planned_size):
            raise FileChanged(path, position)


def _lines_of(handle: Any) -> Iterator[bytes]:
    """The lines of an open file from where it stands. A handle without ``peek`` (Google Cloud Storage's BlobReader)
    would be read one byte per call to find each newline: it is read through a buffer; Beam's CompressedFile, which
    cannot be iterated, by its own ``readline``."""
    if not hasattr(handle, "__iter__"):
        return iter(handle.readline, b"")
    if not hasattr(handle, "peek"):
        return iter(io.BufferedReader(handle, LINE_BUFFER_BYTES))
    return iter(handle)


class FileChanged(FatalError):
    """An input file changed between planning its ranges and reading one: the run fails rather than read lines cut
    in two or lose lines (retrying cannot help: the plan is the run's)."""

    def __init__(self, path: str, offset: int) -> None:
        super().__init__(f"{path} changed while this run read it: at byte {offset} it no longer matches the plan made "
                         "at the start of the run (lines cut there, or the file shorter); input files must stay as "
                         "they are while a run reads them (appending is fine): re-run once the file is written")


def read_lines(path: str) -> Iterator[RawMessage]:
    """One JSON raw event per line of a file (blank lines skipped)."""
    return read_range(FileRange(path))


def plan_ranges(path: str, size: int | None) -> Iterator[FileRange]:
    """``path`` (of ``size`` bytes) as consecutive ranges that together hold every line once, each cut after a
    newline and numbered from the newlines before it: the whole file as one range when it is compressed (it cannot
    be read from the middle) or small, else ranges of about ``size / RANGES_PER_FILE`` bytes (within RANGE_BYTES).

    Line numbers are counted by reading the file once here (a newline count; files are planned in parallel, but one
    file's count is one stream: on s3:// or gs:// one more download of it). Remote ranges are at least
    ``REMOTE_RANGE_BYTES``, as each range opened fills a read buffer of 16 MiB whatever its size."""
    low, high = RANGE_BYTES
    if "://" in path:
        low = max(low, REMOTE_RANGE_BYTES)
    range_bytes = min(max(-(-(size or 0) // RANGES_PER_FILE), low), high)
    compressed = CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED
    if compressed or size is None or size <= range_bytes:
        yield FileRange(path)
        return
    start, first_line, newlines, offset = 0, 1, 0, 0  # offset: where the block read last starts in the file
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while block := handle.read(SCAN_BLOCK):
            counted = 0  # the newlines of block[:counted] are in ``newlines``
            while (cut := block.find(b"\n", max(counted, start + range_bytes - 1 - offset))) >= 0:
                newlines += block.count(b"\n", counted, cut + 1)
                counted = cut + 1
                yield FileRange(path, start, offset + counted, first_line)
                start, first_line = offset + counted, newlines + 1
            newlines += block.count(b"\n", counted)
            offset += len(block)
    yield FileRange(path, start, None, first_line, offset)  # the rest (none when the file ends at a cut), to the end


def match_file_sizes(pattern: str) -> Iterator[tuple[str, int | None]]:
    """``(path, size in bytes)`` of the files matching ``pattern``, sorted by path; no match at all is a
    configuration error."""
    found = sorted((m.path, m.size_in_bytes) for m in FileSystems.match([pattern])[0].metadata_list)
    if not found:
        raise FatalError(f"no input files match {pattern!r}")
    yield from found


class ReadRawFiles(beam.PTransform):
    """Raw events from JSON-lines files matching ``pattern`` (local, s3://, gs://), listed at run time.

    Each file is planned into byte ranges (``plan_ranges``) spread over workers before they are read, so even one
    large file is read, parsed and split by user in parallel; every line keeps its file's line number."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        return (pbegin
                | "Pattern" >> beam.Create([self.pattern])
                | "Match" >> beam.FlatMap(match_file_sizes)
                | "SpreadFiles" >> beam.Reshuffle()  # files are planned (their newlines counted) in parallel
                | "PlanRanges" >> beam.FlatMapTuple(plan_ranges)
                | "SpreadRanges" >> beam.Reshuffle()
                | "ReadRanges" >> beam.FlatMap(read_range))
