"""Publishing polled pages to the ingestion topic, with Kafka headers, in acknowledged batches.

``transforms.publish.publish`` opens a producer per call and takes no headers; the poller publishes a window's pages
through one long-lived idempotent producer and needs the backfill marker header, so it has this small publisher
(same encoding — ``RawPayload.encode()`` — and the same message key ``provider:user_id``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Producer

from transforms.errors import RetryableError
from transforms.publish import RawPayload

BACKFILL_HEADER = "healthflow-backfill"  # value b"true" on raw events of a backfill; absent on live polls
REFERENCE_HEADER = "healthflow-reference"  # the backfill request's reference, delivered as terra-reference


class PublishFailed(RetryableError):
    """Some raw events of a batch were not acknowledged by the broker: the batch must be published again."""


class Batch:
    """The messages of one window: ``wait()`` returns once the broker acknowledged every one, else raises."""

    def __init__(self, publisher: KafkaPublisher, headers: Sequence[tuple[str, bytes]]) -> None:
        self.publisher, self.headers = publisher, list(headers)
        self.sent = self.acked = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _report(self, err: Any, _msg: Any) -> None:
        with self._lock:
            if err is None:
                self.acked += 1
            else:
                self.errors.append(str(err))

    def add(self, payload: RawPayload) -> None:
        producer = self.publisher.producer
        key = f"{payload.provider}:{payload.user_id or ''}"
        while True:
            try:
                producer.produce(self.publisher.topic, value=payload.encode(), key=key, headers=self.headers or None,
                                 on_delivery=self._report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        self.sent += 1

    def wait(self) -> int:
        """Flush; return how many messages were acknowledged (all of them), or raise PublishFailed."""
        remaining = self.publisher.producer.flush(self.publisher.flush_timeout_s)
        with self._lock:
            if self.errors or self.acked != self.sent:
                raise PublishFailed(f"{self.sent - self.acked} of {self.sent} raw events not acknowledged by "
                                    f"{self.publisher.bootstrap} ({remaining} still queued); errors: {self.errors[:3]}")
            return self.acked


class KafkaPublisher:
    """One idempotent producer (``acks=all``) for a topic; thread-safe, each caller acknowledges its own batch."""

    def __init__(self, bootstrap: str, topic: str, *, flush_timeout_s: float = 30.0,
                 config: dict[str, Any] | None = None) -> None:
        self.bootstrap, self.topic, self.flush_timeout_s = bootstrap, topic, flush_timeout_s
        self.config = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                       "message.timeout.ms": int(flush_timeout_s * 1000), **(config or {}), "error_cb": self._error}
        self._fatal = threading.Event()
        self._lock = threading.Lock()
        self.producer = Producer(self.config)

    def _error(self, err: Any) -> None:
        if err.fatal():  # an idempotent producer can fail for good (e.g. a sequence gap): use a new one
            self._fatal.set()

    def batch(self, headers: Sequence[tuple[str, bytes]] = ()) -> Batch:
        with self._lock:
            if self._fatal.is_set():
                self._fatal.clear()
                self.producer = Producer(self.config)
        return Batch(self, headers)

    def close(self) -> None:
        """Flush what is queued, then release the producer (its threads and connections)."""
        self.producer.flush(self.flush_timeout_s)
        self.producer.close()

    def __enter__(self) -> KafkaPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
