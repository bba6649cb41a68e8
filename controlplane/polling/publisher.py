"""Publishing polled pages to the ingestion topic, with Kafka headers, in acknowledged batches.

``connectors.publish.publish`` opens a producer per call and takes no headers; the poller publishes a window's pages
through one long-lived idempotent producer (``core.kafka``) and needs the backfill marker header, so it has this small
publisher (same encoding — ``schemas.serde.encode_raw`` — and the same message key ``provider:user_id``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from core.errors import RetryableError
from core.kafka import DeliveryReports, new_producer, produce, producer_config
from core.raw import RawPayload
from schemas.serde import encode_raw

BACKFILL_HEADER = "healthflow-backfill"  # value b"true" on raw events of a backfill; absent on live polls
REFERENCE_HEADER = "healthflow-reference"  # the backfill request's reference, delivered as terra-reference


class PublishFailed(RetryableError):
    """Some raw events of a batch were not acknowledged by the broker: the batch must be published again."""


class Batch:
    """The messages of one window: ``wait()`` returns once the broker acknowledged every one, else raises."""

    def __init__(self, publisher: KafkaPublisher, headers: Sequence[tuple[str, bytes]]) -> None:
        self.publisher, self.headers = publisher, list(headers)
        self.sent = 0
        self.reports = DeliveryReports()

    def add(self, payload: RawPayload) -> None:
        key = f"{payload.provider}:{payload.user_id or ''}"
        produce(self.publisher.producer, self.publisher.topic, encode_raw(payload), key=key,
                headers=self.headers or None, on_delivery=self.reports)
        self.sent += 1

    def wait(self) -> int:
        """Flush; return how many messages were acknowledged (all of them), or raise PublishFailed."""
        remaining = self.publisher.producer.flush(self.publisher.flush_timeout_s)
        acked, errors = self.reports.snapshot()
        if errors or acked != self.sent:
            raise PublishFailed(f"{self.sent - acked} of {self.sent} raw events not acknowledged by "
                                f"{self.publisher.bootstrap} ({remaining} still queued); errors: {errors[:3]}")
        return acked


class KafkaPublisher:
    """One idempotent producer (``acks=all``) for a topic; thread-safe, each caller acknowledges its own batch."""

    def __init__(self, bootstrap: str, topic: str, *, flush_timeout_s: float = 30.0,
                 config: dict[str, Any] | None = None) -> None:
        self.bootstrap, self.topic, self.flush_timeout_s = bootstrap, topic, flush_timeout_s
        self.config = producer_config(bootstrap, {"message.timeout.ms": int(flush_timeout_s * 1000), **(config or {}),
                                                  "error_cb": self._error})
        self._fatal = threading.Event()
        self._lock = threading.Lock()
        self.producer = new_producer(self.config)

    def _error(self, err: Any) -> None:
        if err.fatal():  # an idempotent producer can fail for good (e.g. a sequence gap): use a new one
            self._fatal.set()

    def batch(self, headers: Sequence[tuple[str, bytes]] = ()) -> Batch:
        with self._lock:
            if self._fatal.is_set():
                self._fatal.clear()
                self.producer = new_producer(self.config)
        return Batch(self, headers)

    def close(self) -> None:
        """Flush what is queued, then release the producer (its threads and connections)."""
        self.producer.flush(self.flush_timeout_s)
        self.producer.close()

    def __enter__(self) -> KafkaPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
