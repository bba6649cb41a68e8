"""Unbounded raw sources: the ingestion topics on Kafka and on Pub/Sub, read as one stream each.

``ReadStream(source)`` is one transform with two executions:
- on Dataflow, Flink and other portable runners it expands to Beam transforms those runners run:
  Pub/Sub through Beam's ``ReadFromPubSub`` (the runner acknowledges after its checkpoint), Kafka
  through a splittable DoFn per partition that starts at the consumer group's committed offset
  (read when the job starts, never while the graph is built);
- on the local streaming runner (``pipelines.launch``), which cannot run unbounded splittable
  DoFns, it expands to a root read that polls the source between bundles.

Every message carries an ``AckToken``; ``transforms.acks.Acknowledge`` acknowledges it (Pub/Sub)
or commits past it (Kafka) only after every destination delivered or dead-lettered what it became.
Nothing is acknowledged on read: a crash re-reads whatever had not ended (at least once).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.pipeline import PipelineVisitor
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Duration, Timestamp

from core.errors import FatalError, wait_out
from core.raw import AckToken, RawMessage
from transforms.acks import Acknowledger
from transforms.sources import KafkaOffsets, PlanPartitions, healthflow_headers, kafka_consumer, plan_partitions

POLL_MAX_MESSAGES = 500

log = logging.getLogger(__name__)


class StreamReader(ABC):
    """An open connection to a stream: ``poll`` returns what is there (possibly nothing) quickly."""

    @abstractmethod
    def poll(self, max_messages: int, timeout_s: float) -> list[RawMessage]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class StreamSource(ABC):
    """A stream's configuration (picklable, no connections, no secrets)."""

    @abstractmethod
    def reader(self) -> StreamReader:
        """Connect (on the worker, at run time)."""

    @abstractmethod
    def acknowledger(self) -> Acknowledger: ...

    @abstractmethod
    def portable_read(self, pbegin: Any) -> Any:
        """The read as transforms every portable runner runs: PCollection[RawMessage]."""


# --- Kafka ----------------------------------------------------------------------------------------


class KafkaStream(StreamSource):
    """The ingestion topic on Kafka, for consumer group ``group`` (offsets committed after delivery)."""

    def __init__(self, bootstrap: str, topic: str = "healthflow.raw", group: str = "healthflow-normalize",
                 fetch_wait_ms: int = 10) -> None:
        self.bootstrap, self.topic, self.group, self.fetch_wait_ms = bootstrap, topic, group, fetch_wait_ms

    def reader(self) -> StreamReader:
        return _KafkaReader(self)

    def acknowledger(self) -> Acknowledger:
        return KafkaOffsets(self.bootstrap, self.topic, self.group)

    def portable_read(self, pbegin: Any) -> Any:
        return (pbegin
                | "Impulse" >> beam.Impulse()
                | "Partitions" >> beam.ParDo(PlanPartitions(self.bootstrap, self.topic, self.group))
                | "ReadPartitions" >> beam.ParDo(_ReadPartition(self)))

    def message(self, record: Any, previous: int, first: bool, reader: str = "") -> RawMessage:
        partition, offset = record.partition(), record.offset()
        return RawMessage(record.value() or b"", {"topic": self.topic, "partition": partition, "offset": offset,
                                                   **healthflow_headers(record.headers())},
                          ack=AckToken("offset", f"{self.topic}:{partition}", offset, previous, first, reader))


class _KafkaReader(StreamReader):
    def __init__(self, source: KafkaStream) -> None:
        from confluent_kafka import TopicPartition

        self.source = source
        plan = wait_out(lambda: plan_partitions(source.bootstrap, source.topic, source.group),
                        f"Kafka {source.bootstrap}", None, log=log)  # a stream waits for its broker however long
        self.consumer = kafka_consumer(source.bootstrap, source.group, **{
            "fetch.wait.max.ms": source.fetch_wait_ms, "fetch.min.bytes": 1})
        self.consumer.assign([TopicPartition(source.topic, p, start) for p, start in plan])
        self.previous = {p: start - 1 for p, start in plan}
        self.started = {p for p, _ in plan}
        self.incarnation = uuid.uuid4().hex[:12]

    def poll(self, max_messages: int, timeout_s: float) -> list[RawMessage]:
        from confluent_kafka import KafkaException

        out = []
        try:
            head = self.consumer.poll(timeout_s)  # returns as soon as one message is there; the rest without waiting
            records = [head, *self.consumer.consume(max_messages - 1, 0)] if head is not None else []
        except KafkaException as exc:  # the client reconnects by itself: poll again later
            log.warning("Kafka %s: %s (retrying)", self.source.bootstrap, exc)
            time.sleep(min(timeout_s, 1.0))
            return []
        for record in records:
            if record.error() is not None:
                if record.error().fatal():
                    raise KafkaException(record.error())
                log.warning("Kafka %s: %s (retrying)", self.source.bootstrap, record.error())  # broker away: wait
                continue
            partition = record.partition()
            first = partition in self.started
            self.started.discard(partition)
            out.append(self.source.message(record, self.previous[partition], first, self.incarnation))
            self.previous[partition] = record.offset()
        return out

    def close(self) -> None:
        self.consumer.close()


class _FromOffset(RestrictionProvider):
    def initial_restriction(self, element: tuple[int, int]) -> OffsetRange:
        return OffsetRange(element[1], 2**63 - 1)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element: Any, restriction: OffsetRange) -> int:
        return 1

    def split(self, element: Any, restriction: OffsetRange) -> Iterator[OffsetRange]:
        yield restriction  # one reader per partition: its order is the order users' events arrive in


FROM_OFFSET = _FromOffset()


class _ReadPartition(beam.DoFn):
    """Splittable read of one partition from an offset, forever; resumes where it deferred."""

    SLICE_S = 1.0

    def __init__(self, source: KafkaStream) -> None:
        self.source = source

    @beam.DoFn.unbounded_per_element()
    def process(self, element: tuple[int, int], tracker=beam.DoFn.RestrictionParam(FROM_OFFSET)
                ) -> Iterator[RawMessage]:
        from confluent_kafka import TopicPartition

        partition, initial = element
        start = tracker.current_restriction().start
        consumer = kafka_consumer(self.source.bootstrap, self.source.group,
                                  **{"fetch.wait.max.ms": self.source.fetch_wait_ms})
        try:
            consumer.assign([TopicPartition(self.source.topic, partition, start)])
            previous, first = start - 1, start == initial
            deadline = time.monotonic() + self.SLICE_S
            while time.monotonic() < deadline:
                for record in consumer.consume(POLL_MAX_MESSAGES, 0.1):
                    if record.error() is not None:
                        log.warning("Kafka %s: %s (retrying)", self.source.bootstrap, record.error())
                        continue
                    if not tracker.try_claim(record.offset()):
                        return
                    yield self.source.message(record, previous, first)
                    previous, first = record.offset(), False
        finally:
            consumer.close()
        tracker.defer_remainder(Duration.of(0.05))


# --- Pub/Sub --------------------------------------------------------------------------------------


class PubSubStream(StreamSource):
    """A Pub/Sub subscription of an ingestion topic (``projects/P/subscriptions/S``).

    Messages are acknowledged after delivery; one that is not acknowledged within the
    subscription's ack deadline is delivered again by Pub/Sub (at least once). The client follows
    ``PUBSUB_EMULATOR_HOST`` like every Pub/Sub client.
    """

    def __init__(self, subscription: str) -> None:
        if not subscription.startswith("projects/") or "/subscriptions/" not in subscription:
            raise FatalError(f"Pub/Sub subscription {subscription!r}: give projects/PROJECT/subscriptions/NAME")
        self.subscription = subscription

    def reader(self) -> StreamReader:
        return _PubSubReader(self.subscription)

    def acknowledger(self) -> Acknowledger:
        return PubSubAcks()

    def portable_read(self, pbegin: Any) -> Any:
        return (pbegin
                | "ReadFromPubSub" >> beam.io.ReadFromPubSub(subscription=self.subscription, with_attributes=True)
                | "AsRawMessages" >> beam.Map(_pubsub_message, self.subscription))


def _pubsub_message(message: Any, subscription: str, ack_id: str | None = None) -> RawMessage:
    attributes = dict(message.attributes or {})
    published = getattr(message, "publish_time", None)
    source = {"subscription": subscription, "message_id": getattr(message, "message_id", None) or "",
              "publish_time_ms": int(published.timestamp() * 1000) if published is not None else 0,
              **{k: v for k, v in attributes.items() if k.startswith("healthflow-")}}
    return RawMessage(bytes(message.data), source, encoding=attributes.get("healthflow-encoding", "avro"),
                      ack=None if ack_id is None else AckToken("ack_id", subscription, ack_id))


class _Leases:
    """Pub/Sub messages this process has pulled and not acknowledged yet, per reader that pulled them.

    The local reader adds what it pulls, ``PubSubAcks`` removes what it acknowledges; the reader's keeper thread
    extends the rest before their ack deadline, so a message held back (a user's earlier event being retried, a
    slow destination) is not delivered again by Pub/Sub while it is still being worked on. A reader that closes
    releases its own (``release``): no later reader keeps them, and Pub/Sub delivers them again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[object, set[str]] = {}  # reader → its ack ids
        self._reader: dict[str, object] = {}  # ack id → the reader that pulled it

    def add(self, reader: object, ack_ids: list[str]) -> None:
        with self._lock:
            self._held.setdefault(reader, set()).update(ack_ids)
            self._reader.update(dict.fromkeys(ack_ids, reader))

    def remove(self, ack_ids: Sequence[str]) -> None:
        with self._lock:
            for ack_id in ack_ids:
                reader = self._reader.pop(ack_id, None)
                if reader is not None:
                    self._held[reader].discard(ack_id)

    def held(self, reader: object) -> list[str]:
        with self._lock:
            return list(self._held.get(reader, ()))

    def release(self, reader: object) -> list[str]:
        """``reader``'s ack ids, no longer held."""
        with self._lock:
            ack_ids = self._held.pop(reader, set())
            for ack_id in ack_ids:
                self._reader.pop(ack_id, None)
            return list(ack_ids)


LEASES = _Leases()
MAX_IN_FLIGHT = 2000  # pulled and not yet acknowledged: pulling stops above this (flow control)


class _PubSubReader(StreamReader):
    def __init__(self, subscription: str) -> None:
        from google.api_core import exceptions
        from google.cloud import pubsub_v1

        self.subscription = subscription
        self.client = pubsub_v1.SubscriberClient()
        try:
            self.deadline_s = self.client.get_subscription(subscription=subscription).ack_deadline_seconds or 10
        except exceptions.NotFound as exc:
            raise FatalError(f"Pub/Sub subscription {subscription} does not exist: create it first") from exc
        self._closed = threading.Event()
        self._keeper = threading.Thread(target=self._keep_leases, daemon=True, name=f"leases {subscription}")
        self._keeper.start()

    def _keep_leases(self) -> None:
        """Extend the deadline of every message this reader pulled that is still in flight, every third of the
        deadline."""
        while not self._closed.wait(max(self.deadline_s / 3, 0.5)):
            for extended in _chunks(LEASES.held(self)):
                try:
                    self.client.modify_ack_deadline(subscription=self.subscription, ack_ids=extended,
                                                    ack_deadline_seconds=self.deadline_s)
                except Exception as exc:  # expired or acknowledged meanwhile, or Pub/Sub away: redelivery covers it
                    log.warning("extending %d leases of %s failed: %s", len(extended), self.subscription, exc)
                still = set(LEASES.held(self))
                # given back while this extension was on its way (a failed acknowledgement): given back again
                _give_back(self.client, self.subscription, [ack_id for ack_id in extended if ack_id not in still])

    def poll(self, max_messages: int, timeout_s: float) -> list[RawMessage]:
        from google.api_core import exceptions

        room = MAX_IN_FLIGHT - len(LEASES.held(self))
        if room <= 0:  # enough in flight: let delivery catch up
            time.sleep(timeout_s)
            return []
        try:
            response = self.client.pull(subscription=self.subscription, max_messages=min(max_messages, room),
                                        timeout=max(timeout_s, 1.0))
        except exceptions.DeadlineExceeded:
            return []
        except (exceptions.ServiceUnavailable, exceptions.InternalServerError, exceptions.Aborted,
                exceptions.Unknown, exceptions.RetryError) as exc:  # Pub/Sub away for a moment: the next poll retries
            log.warning("Pub/Sub pull from %s failed (retrying): %s", self.subscription, exc)
            time.sleep(0.5)
            return []
        except exceptions.NotFound as exc:
            raise FatalError(f"Pub/Sub subscription {self.subscription} does not exist: create it first") from exc
        LEASES.add(self, [received.ack_id for received in response.received_messages])
        return [_pubsub_message(received.message, self.subscription, received.ack_id)
                for received in response.received_messages]

    def close(self) -> None:
        """Stop, handing back what was pulled and not acknowledged: Pub/Sub delivers it again now."""
        self._closed.set()
        self._keeper.join(GIVE_BACK_TIMEOUT_S)  # no extension after the hand-back (one stuck in a retry: its deadline)
        try:
            _give_back(self.client, self.subscription, LEASES.release(self))
        finally:
            self.client.close()


GIVE_BACK_TIMEOUT_S = 5.0  # handing messages back is best effort: Pub/Sub away, their deadline runs out instead


def _give_back(client: Any, subscription: str, ack_ids: Sequence[str]) -> None:
    """Ask Pub/Sub to deliver ``ack_ids`` again now (a zero ack deadline); if it cannot be told, their deadline, no
    longer extended, runs out and it delivers them then."""
    for chunk in _chunks(ack_ids):
        try:
            client.modify_ack_deadline(subscription=subscription, ack_ids=chunk, ack_deadline_seconds=0, retry=None,
                                       timeout=GIVE_BACK_TIMEOUT_S)
        except Exception as exc:  # expired or acknowledged meanwhile, or Pub/Sub away: the deadline runs out anyway
            log.warning("handing back %d messages of %s failed: %s", len(chunk), subscription, exc)


ACK_IDS_PER_CALL = 1000  # the most ack ids Pub/Sub takes in one acknowledge or modify_ack_deadline call


def _chunks(ack_ids: Sequence[str]) -> Iterator[list[str]]:
    """``ack_ids`` in lists of at most ``ACK_IDS_PER_CALL``, in order."""
    for start in range(0, len(ack_ids), ACK_IDS_PER_CALL):
        yield list(ack_ids[start:start + ACK_IDS_PER_CALL])


class PubSubAcks(Acknowledger):
    def __init__(self) -> None:
        self.client: Any = None

    def open(self) -> None:
        if self.client is None:
            from google.cloud import pubsub_v1

            self.client = pubsub_v1.SubscriberClient()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def acknowledge(self, stream: str, ids: Sequence[Any]) -> None:
        self.open()
        for chunk in _chunks(ids):
            try:
                self.client.acknowledge(subscription=stream, ack_ids=chunk)
            except Exception as exc:  # GoogleAPIError, a closed channel...: not acknowledged, delivered again
                log.warning("acknowledging %d messages of %s failed (they will be delivered again): %s", len(chunk),
                            stream, exc)
                LEASES.remove(chunk)  # no longer extended: they must not stay leased for good
                _give_back(self.client, stream, chunk)
            else:
                LEASES.remove(chunk)


# --- the transform, and its execution on the local streaming runner ---------------------------------


class ReadStream(beam.PTransform):
    """PBegin → unbounded PCollection[RawMessage] from ``source``."""

    def __init__(self, source: StreamSource) -> None:
        super().__init__()
        self.source = source
        self.read_id = uuid.uuid4().hex  # names this read's connection on the local runner

    def expand(self, pbegin):
        if getattr(pbegin.pipeline.runner, "executes_local_stream_reads", False):
            return pbegin | "Poll" >> LocalStreamRead(self.source, self.read_id)
        return self.source.portable_read(pbegin)


class LocalStreamRead(beam.PTransform):
    """``ReadStream`` as a root of the local streaming runner (polled by ``LocalStreamReadEvaluator``)."""

    def __init__(self, source: StreamSource, read_id: str) -> None:
        super().__init__()
        self.source, self.read_id = source, read_id

    def expand(self, pbegin):
        return pvalue.PCollection(pbegin.pipeline, is_bounded=False)

    def get_windowing(self, inputs: Any) -> beam.Windowing:
        return beam.Windowing(GlobalWindows())


def register_local_stream_read() -> None:
    """Teach the local (bundle-based) streaming runner to execute ``LocalStreamRead``."""
    from apache_beam.runners.direct import transform_evaluator

    transform_evaluator.TransformEvaluatorRegistry._test_evaluators_overrides[LocalStreamRead] = (
        _local_stream_evaluator())


_readers: dict[str, StreamReader] = {}  # read id → its open reader (the local runner polls from one thread)
_readers_lock = threading.Lock()


def close_local_readers(pipeline: beam.Pipeline) -> None:
    """Close the readers the local streaming runner opened for ``pipeline``'s reads (when its job stops)."""
    read_ids: list[str] = []

    class _Reads(PipelineVisitor):
        def enter_composite_transform(self, node: Any) -> None:
            if isinstance(node.transform, ReadStream):
                read_ids.append(node.transform.read_id)

    pipeline.visit(_Reads())
    with _readers_lock:
        readers = [_readers.pop(read_id) for read_id in read_ids if read_id in _readers]
    for reader in readers:
        reader.close()


def _local_stream_evaluator() -> type:
    from apache_beam.runners.direct.transform_evaluator import TransformResult, _TransformEvaluator

    class LocalStreamReadEvaluator(_TransformEvaluator):
        """Polls the source once per bundle and reschedules itself (like Beam's own Pub/Sub read)."""

        POLL_TIMEOUT_S = 0.05

        def start_bundle(self) -> None:
            pass

        def process_element(self, element: Any) -> None:
            pass

        def _reader(self) -> StreamReader:
            transform = self._applied_ptransform.transform
            with _readers_lock:
                reader = _readers.get(transform.read_id)
                if reader is None:
                    reader = _readers[transform.read_id] = transform.source.reader()
            return reader

        def finish_bundle(self) -> Any:
            messages = self._reader().poll(POLL_MAX_MESSAGES, self.POLL_TIMEOUT_S)
            bundles = []
            now = Timestamp.of(time.time())
            if messages:
                bundle = self._evaluation_context.create_bundle(next(iter(self._outputs)))
                for message in messages:
                    bundle.output(GlobalWindows.windowed_value(message, timestamp=now))
                bundles.append(bundle)
            again = self._evaluation_context.create_bundle(pvalue.PBegin(self._applied_ptransform.transform.pipeline))
            return TransformResult(self, bundles, [again], None, {None: now})

    return LocalStreamReadEvaluator
