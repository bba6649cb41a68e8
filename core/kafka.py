"""The one Kafka producer of healthflow: idempotent settings, produce under back-pressure, delivery reports, flush.

Every producer is built from these pieces (raw-event publishing, the poller's publisher, the notification queue,
the Kafka sink): ``producer_config`` (idempotent, ``acks=all``), ``new_producer``, ``produce`` (serves delivery
reports while librdkafka's local queue is full instead of failing with ``BufferError``), ``DeliveryReports`` (an
``on_delivery`` callback counting acknowledgements and keeping errors) and ``send_all`` (produce a batch through a
producer of its own, flush, close; the caller decides what a ``Sent`` with errors or unflushed messages means).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer

Headers = Sequence[tuple[str, bytes]]
Message = tuple[bytes, "str | bytes | None", "Headers | None"]  # value, key, headers

IDEMPOTENT = {"enable.idempotence": True, "acks": "all", "linger.ms": 5}


def producer_config(bootstrap: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Idempotent producer settings for ``bootstrap`` (no duplicates or reordering from the client's own retries,
    a delivery report means durably written), with ``settings`` on top."""
    return {"bootstrap.servers": bootstrap, **IDEMPOTENT, **(settings or {})}


def new_producer(config: Mapping[str, Any]) -> Producer:
    return Producer(dict(config))


def produce(producer: Producer, topic: str, value: bytes, *, key: str | bytes | None = None,
            headers: Headers | None = None, on_delivery: Callable[[Any, Any], None] | None = None,
            deadline: float | None = None) -> bool:
    """Produce one message. While the local queue is full, serve delivery reports and try again, until ``deadline``
    (a ``time.monotonic()`` value) when one is given: False when the queue stayed full until then (nothing was
    produced). Delivery reports already due are served before returning. A ``KafkaException`` is raised as is."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
            break
        except BufferError:
            if deadline is not None and time.monotonic() >= deadline:
                producer.poll(0)
                return False
            producer.poll(0.1)
    producer.poll(0)
    return True


class DeliveryReports:
    """An ``on_delivery`` callback: counts the acknowledged messages and keeps the errors (thread-safe)."""

    def __init__(self) -> None:
        self.acked = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, err: Any, _msg: Any) -> None:
        with self._lock:
            if err is None:
                self.acked += 1
            else:
                self.errors.append(str(err))

    def snapshot(self) -> tuple[int, list[str]]:
        """(acknowledged, errors) as they are now."""
        with self._lock:
            return self.acked, list(self.errors)


@dataclass(frozen=True)
class Sent:
    count: int  # messages produced
    remaining: int  # still queued when the flush timed out
    errors: list[str]  # failed delivery reports

    @property
    def ok(self) -> bool:
        return not self.remaining and not self.errors


def send_all(config: Mapping[str, Any], topic: str, messages: Iterable[Message],
             flush_timeout_s: float = 30.0) -> Sent:
    """Produce ``messages`` through a new producer, flush it and close it."""
    producer = new_producer(config)
    reports = DeliveryReports()
    count = 0
    try:
        for value, key, headers in messages:
            produce(producer, topic, value, key=key, headers=headers, on_delivery=reports)
            count += 1
        remaining = producer.flush(flush_timeout_s)
    finally:
        producer.close()
    return Sent(count, remaining, reports.snapshot()[1])
