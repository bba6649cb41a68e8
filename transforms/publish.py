"""Publishing raw events to the ingestion topic (what connectors and suppliers do)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException, Producer

from schemas.serde import encode


@dataclass(frozen=True)
class RawPayload:
    """A provider payload to ingest: ``kind``/``user_id`` when the payload does not carry them."""

    provider: str
    payload: bytes
    kind: str | None = None
    user_id: str | None = None
    received_at_ms: int | None = None

    def idempotency_key(self) -> str:
        digest = hashlib.sha256(b"\0".join([self.provider.encode(), (self.kind or "").encode(),
                                            (self.user_id or "").encode(), self.payload]))
        return digest.hexdigest()[:32]

    def encode(self) -> bytes:
        return encode("raw_event", {
            "idempotency_key": self.idempotency_key(), "provider": self.provider, "kind": self.kind,
            "user_id": self.user_id, "received_at": self.received_at_ms or int(time.time() * 1000),
            "content_type": "application/json", "payload": self.payload})


def publish(bootstrap: str, topic: str, payloads: Iterable[RawPayload | bytes], key_of=None) -> int:
    """Produce raw events with an idempotent producer; raises if any delivery report failed.

    Messages are keyed by provider and user when known, so one user's payloads stay in order.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5})
    errors: list[str] = []

    def report(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    count = 0
    for item in payloads:
        if isinstance(item, RawPayload):
            value, key = item.encode(), (key_of(item) if key_of else f"{item.provider}:{item.user_id or ''}")
        else:
            value, key = item, None
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        count += 1
    remaining = producer.flush(30)
    producer.close()
    if remaining or errors:
        raise KafkaException(f"{remaining} raw events not acknowledged; errors: {errors[:3]}")
    return count
