"""Streaming latency: publish → webhook, through the long-running streaming job on the local runner.

Raw events are published at a steady rate to an ingestion topic (the Pub/Sub test server, or the embedded
Kafka broker); the streaming job delivers each to a webhook receiver running in its own process, which
notes when each user's first event arrived. Each message is a different user, so latency is that arrival
time minus the publish time (one machine, one clock).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.processes import pubsub_server, webhook_receiver
from connectors.base import terra_user_id
from core.raw import RawPayload
from pipelines.demo_data import garmin_daily
from pipelines.normalize import KafkaSource, NormalizeJob, PubSubSource
from pipelines.streaming import run_streaming
from schemas.serde import encode_raw
from sinks.webhook import WebhookSink

TOPIC, SUBSCRIPTION = "projects/bench/topics/raw", "projects/bench/subscriptions/normalize"


@dataclass
class Latency:
    source: str
    rate: float
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@contextlib.contextmanager
def _pubsub() -> Iterator[tuple[object, Callable[[RawPayload], None], Callable[[], None]]]:
    with pubsub_server(TOPIC, subscriptions=(SUBSCRIPTION,)) as host:
        previous = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        try:
            from google.cloud import pubsub_v1

            client = pubsub_v1.PublisherClient()
            yield PubSubSource(SUBSCRIPTION), lambda p: client.publish(TOPIC, encode_raw(p)), lambda: None
        finally:
            if previous is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous


@contextlib.contextmanager
def _kafka() -> Iterator[tuple[object, Callable[[RawPayload], None], Callable[[], None]]]:
    from core.kafka import new_producer, produce, producer_config
    from pipelines.embedded import EmbeddedBroker

    with EmbeddedBroker() as broker:
        broker.create_topic("bench.latency", partitions=4)
        producer = new_producer(producer_config(broker.bootstrap, {"linger.ms": 0}))

        def send(payload: RawPayload) -> None:
            produce(producer, "bench.latency", encode_raw(payload), key=payload.provider)

        yield KafkaSource(broker.bootstrap, "bench.latency", "bench"), send, lambda: producer.flush(10)


def measure(source: str, secret: str, rate: float = 50.0, seconds: float = 20.0, warmup_s: float = 3.0) -> Latency:
    """p50/p99 publish → webhook at ``rate`` events/s for ``seconds``, after ``warmup_s`` of the same load."""
    topic = _pubsub if source == "pubsub" else _kafka
    arrivals: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, webhook_receiver(secret) as url, topic() as (stream, send, flush):
        job = run_streaming(NormalizeJob(stream, [WebhookSink("webhook", url, secret)], str(Path(tmp) / "dlq"),
                                         state_url=f"sqlite:///{Path(tmp) / 'state.db'}"), redeliver_every_s=None)
        try:
            _publish_steadily(send, rate, warmup_s, prefix="warm")
            sent = _publish_steadily(send, rate, seconds, prefix="lat")
            flush()
            deadline = time.time() + 30
            while time.time() < deadline:
                arrivals = _arrivals(url)
                if all(user in arrivals for user in sent):
                    break
                time.sleep(0.5)
        finally:
            job.stop()
    latencies = sorted((arrivals[user] - at) * 1000 for user, at in sent.items() if user in arrivals)
    if not latencies:
        return Latency(source, rate, len(sent), 0, float("nan"), float("nan"), float("nan"))
    return Latency(source, rate, len(sent), len(latencies), statistics.median(latencies),
                   latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], latencies[-1])


def _publish_steadily(send: Callable[[RawPayload], None], rate: float, seconds: float,
                      prefix: str) -> dict[str, float]:
    """Publish one new user's daily every 1/rate s; returns terra user id → publish time."""
    sent: dict[str, float] = {}
    start = time.time()
    for index in range(int(rate * seconds)):
        pause = start + index / rate - time.time()
        if pause > 0:
            time.sleep(pause)
        user = f"{prefix}-{index}"
        sent[terra_user_id("garmin", user)] = time.time()
        send(garmin_daily(user))
    return sent


def _arrivals(receiver_url: str) -> dict[str, float]:
    with urllib.request.urlopen(receiver_url.rstrip("/") + "/arrivals", timeout=10) as response:
        return json.loads(response.read())


if __name__ == "__main__":
    import base64
    import secrets
    import sys

    from core.logs import configure_logging

    configure_logging()
    key = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    for kind in sys.argv[1:] or ["pubsub", "kafka"]:
        print(measure(kind, key, seconds=float(os.environ.get("LATENCY_SECONDS", "10"))))
