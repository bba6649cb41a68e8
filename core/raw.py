"""Raw data on its way in: a provider payload to publish (``RawPayload``) and bytes read back from a source
(``RawMessage``). Their wire format is the ``raw_event`` envelope (``schemas.serde.encode_raw``)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any


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

    def record(self) -> dict[str, Any]:
        """The ``raw_event`` record (received now when ``received_at_ms`` is not known)."""
        return {
            "idempotency_key": self.idempotency_key(), "provider": self.provider, "kind": self.kind,
            "user_id": self.user_id, "received_at": self.received_at_ms or int(time.time() * 1000),
            "content_type": "application/json", "payload": self.payload}


@dataclass(frozen=True)
class AckToken:
    """How a message's source acknowledges it, once everything it became has ended.

    ``stream`` is what is acknowledged in order (a Kafka ``topic:partition``) or at all (a Pub/Sub
    subscription); ``position`` the offset or ack id. For offsets, ``previous`` is the position
    read just before on the same stream (no message lies between them), and ``first`` marks the
    first message a reader read on the stream since it started.
    """

    kind: str  # "offset" (Kafka) or "ack_id" (Pub/Sub)
    stream: str
    position: Any
    previous: int | None = None
    first: bool = False
    reader: str = ""  # which reader read it: a message read again by a new reader is tracked as its own copy


@dataclass(frozen=True)
class RawMessage:
    """Bytes as read from a source, with where they came from (topic/partition/offset, path/line).

    ``encoding`` is ``avro`` (single-object RawEvent, the ingestion-topic format) or ``json``
    (one JSON RawEvent per line: ``{"provider", "kind", "user_id", "received_at", "payload"}``).
    """

    data: bytes
    source: dict[str, Any] = field(default_factory=dict)
    encoding: str = "avro"
    ack: AckToken | None = None  # None: nothing to acknowledge (files, messages in hand)

    @property
    def position(self) -> str:
        """Sortable position within the source, used to order one user's events."""
        if "partition" in self.source:
            return f"{int(self.source['partition']):05d}-{int(self.source['offset']):012d}"
        if "publish_time_ms" in self.source:
            return f"{int(self.source['publish_time_ms']):015d}-{self.source.get('message_id', '')}"
        return f"{self.source.get('path', '')}:{int(self.source.get('line', 0)):09d}"
