"""Streaming throughput: one streaming job consumes a whole pre-published ingestion topic.

The raw events are published before the job starts (Kafka: the embedded broker; Pub/Sub: the test server in its
own process); the job delivers to a webhook receiver (its own process), SQLite and an object store folder. A raw
message has *ended* once everything it became was delivered or dead-lettered: for Kafka the consumer group's
committed offsets then move past it, for Pub/Sub the server holds it no more. Polled every ``POLL_S``:

- ``startup_s``: job start → the first ended message (the runner's start-up and the first bundle's trip);
- ``total_s``: job start → every message ended; ``rate_with_startup`` = messages / ``total_s``;
- ``rate``: messages that ended after the first one was seen / the time after it (start-up excluded).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.processes import counting_pubsub_server, webhook_receiver
from core.dead_letters import read_dead_letters
from core.raw import RawPayload
from pipelines.normalize import KafkaSource, NormalizeJob, PubSubSource, Source
from pipelines.streaming import run_streaming
from schemas.serde import encode_raw
from sinks.object_store import ObjectStoreSink
from sinks.sql import SqlSink
from sinks.webhook import WebhookSink

POLL_S = 0.2
TOPIC, SUBSCRIPTION = "projects/bench/topics/drain", "projects/bench/subscriptions/drain"


@dataclass
class Drain:
    source: str
    messages: int
    launch_s: float  # run_streaming's own time (the graph built and handed to the runner)
    startup_s: float
    total_s: float
    first_ended: int  # messages ended when the first ended message was seen
    ended: int  # messages ended at the end (all of them: a drain that times out raises)
    rate: float  # raw events/s after the first ended message (start-up excluded)
    rate_with_startup: float  # raw events/s from job start
    dead_letters: int = 0  # what the job dead-lettered (the batch runs dead-letter the simulator's 5 malformed)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def drain(source: str, payloads: Sequence[RawPayload], secret: str, timeout_s: float = 600.0) -> Drain:
    """Publish ``payloads`` to ``source`` ("kafka" or "pubsub"), then time one streaming job consuming them all."""
    topic = _kafka if source == "kafka" else _pubsub
    with tempfile.TemporaryDirectory() as tmp, webhook_receiver(secret) as url, topic(payloads) as (stream, ended):
        work = Path(tmp)
        sinks = [WebhookSink("webhook", url, secret), SqlSink("sqlite", f"sqlite:///{work / 'stream.db'}"),
                 ObjectStoreSink("object_store", str(work / "objects"))]
        job_spec = NormalizeJob(stream, sinks, str(work / "dlq"), state_url=f"sqlite:///{work / 'state.db'}")
        started = time.perf_counter()
        job = run_streaming(job_spec, redeliver_every_s=None)
        launch_s = time.perf_counter() - started
        try:
            figures = _watch(source, len(payloads), ended, started, launch_s, timeout_s)
        finally:
            job.stop()
        figures.dead_letters = sum(1 for _ in read_dead_letters(str(work / "dlq")))
        return figures


def _watch(source: str, total: int, ended: Callable[[], int], started: float, launch_s: float,
           timeout_s: float) -> Drain:
    first_at, first_count, count = None, 0, 0
    now = started
    while now - started < timeout_s:
        time.sleep(POLL_S)
        count, now = ended(), time.perf_counter()
        if count and first_at is None:
            first_at, first_count = now, count
        if count >= total:
            break
    if first_at is None:
        raise RuntimeError(f"no message ended within {timeout_s:.0f} s")
    if count < total:
        raise RuntimeError(f"timed out after {timeout_s:.0f} s with {count:,} of {total:,} messages ended")
    after = (count - first_count) / (now - first_at) if now > first_at else float("nan")
    return Drain(source, total, launch_s, first_at - started, now - started, first_count, count, after,
                 total / (now - started))


@contextlib.contextmanager
def _kafka(payloads: Sequence[RawPayload]) -> Iterator[tuple[Source, Callable[[], int]]]:
    from confluent_kafka import TopicPartition

    from connectors.publish import publish
    from pipelines.embedded import EmbeddedBroker
    from transforms.sources import kafka_consumer

    with EmbeddedBroker() as broker:
        broker.create_topic("bench.drain", partitions=4)
        publish(broker.bootstrap, "bench.drain", payloads)
        consumer = kafka_consumer(broker.bootstrap, "bench-drain")  # the job's group: reads its committed offsets
        try:
            partitions = [TopicPartition("bench.drain", p)
                          for p in consumer.list_topics("bench.drain", timeout=10).topics["bench.drain"].partitions]
            low = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[0] for tp in partitions}

            def ended() -> int:
                committed = consumer.committed(partitions, timeout=10)
                return sum(tp.offset - low[tp.partition] for tp in committed if tp.offset >= 0)

            yield KafkaSource(broker.bootstrap, "bench.drain", "bench-drain"), ended
        finally:
            consumer.close()


@contextlib.contextmanager
def _pubsub(payloads: Sequence[RawPayload]) -> Iterator[tuple[Source, Callable[[], int]]]:
    with counting_pubsub_server(TOPIC, SUBSCRIPTION) as server:
        previous = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = server.host
        try:
            from google.cloud import pubsub_v1

            client = pubsub_v1.PublisherClient()
            for future in [client.publish(TOPIC, encode_raw(p)) for p in payloads]:
                future.result(timeout=60)
            client.stop()
            if server.outstanding(SUBSCRIPTION) != len(payloads):
                raise RuntimeError(f"published {len(payloads):,}, the subscription holds "
                                   f"{server.outstanding(SUBSCRIPTION):,}")
            yield PubSubSource(SUBSCRIPTION), lambda: len(payloads) - server.outstanding(SUBSCRIPTION)
        finally:
            if previous is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous


if __name__ == "__main__":
    import base64
    import secrets
    import sys

    from core.logs import configure_logging
    from pipelines.demo_data import Simulator

    configure_logging()
    key = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    data = list(Simulator(int(os.environ.get("BENCH_USERS", "300")), 4).payloads())
    for kind in sys.argv[1:] or ["kafka", "pubsub"]:
        print(drain(kind, data, key))
