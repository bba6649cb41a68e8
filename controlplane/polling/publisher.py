"""Publishing polled pages to the ingestion topic, with Kafka headers, in acknowledged batches.

``connectors.publish.publish`` opens a producer per call and takes no headers; the poller publishes a window's pages
through one long-lived idempotent producer (``core.kafka.SharedProducer``, which the API shares with its webhooks) and
needs the backfill marker header, so it has this small publisher (same encoding and message key as every raw event:
``connectors.publish.raw_message``). It runs on the poller's threads (and the API's historical-request threads), never
on an event loop: a batch waits for its own acknowledgements, at most ``flush_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connectors.publish import raw_message
from core.errors import RetryableError
from core.kafka import DeliveryReports, SharedProducer, producer_config
from core.raw import RawPayload

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
        value, key = raw_message(payload)
        self.publisher.producer.produce(self.publisher.topic, value, key=key, headers=self.headers or None,
                                        on_delivery=self.reports)
        self.sent += 1

    def wait(self) -> int:
        """Wait for this batch's reports; return how many messages were acknowledged (all of them), or raise
        PublishFailed."""
        self.reports.wait(self.sent, self.publisher.flush_timeout_s)
        acked, errors = self.reports.snapshot()
        if errors or acked != self.sent:
            raise PublishFailed(f"{self.sent - acked} of {self.sent} raw events not acknowledged by "
                                f"{self.publisher.bootstrap} ({self.sent - acked - len(errors)} without a report "
                                f"after {self.publisher.flush_timeout_s:g}s); errors: {errors[:3]}")
        return acked


class KafkaPublisher:
    """Publishes to a topic through one idempotent producer (``acks=all``); thread-safe, each caller acknowledges its
    own batch. ``producer`` is a shared one (the API's); without it the publisher has its own, created on first use,
    replaced after a fatal error (``SharedProducer``) and released by ``close()``."""

    def __init__(self, bootstrap: str, topic: str, *, flush_timeout_s: float = 30.0,
                 config: dict[str, Any] | None = None, producer: SharedProducer | None = None) -> None:
        self.bootstrap, self.topic, self.flush_timeout_s = bootstrap, topic, flush_timeout_s
        self._owned = producer is None
        self.producer = producer or SharedProducer(producer_config(
            bootstrap, {"message.timeout.ms": int(flush_timeout_s * 1000), **(config or {})}))

    def batch(self, headers: Sequence[tuple[str, bytes]] = ()) -> Batch:
        return Batch(self, headers)

    def close(self) -> None:
        """Deliver what is queued, then release the producer when it is this publisher's own."""
        if self._owned:
            self.producer.close(self.flush_timeout_s)

    def __enter__(self) -> KafkaPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
