"""Publishing raw events to the ingestion topic (what connectors and suppliers do)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from confluent_kafka import KafkaException

from core.kafka import Message, producer_config, send_all
from core.raw import RawPayload
from schemas.serde import encode_raw


def publish(bootstrap: str, topic: str, payloads: Iterable[RawPayload | bytes], key_of=None) -> int:
    """Produce raw events with an idempotent producer; raises if any delivery report failed.

    Messages are keyed by provider and user when known, so one user's payloads stay in order.
    """

    def messages() -> Iterator[Message]:
        for item in payloads:
            if isinstance(item, RawPayload):
                yield encode_raw(item), (key_of(item) if key_of else f"{item.provider}:{item.user_id or ''}"), None
            else:
                yield item, None, None

    sent = send_all(producer_config(bootstrap), topic, messages())
    if not sent.ok:
        raise KafkaException(f"{sent.remaining} raw events not acknowledged; errors: {sent.errors[:3]}")
    return sent.count
