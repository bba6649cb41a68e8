"""Publishing raw events to the ingestion topic (what connectors, suppliers and the API do).

- ``publish``: one call, one producer of its own, flushed (the CLI, scripts).
- ``RawEventPublisher``: for a server's event loop. Awaiting it never blocks the loop: the message is produced
  into the process's long-lived ``SharedProducer`` and the caller awaits the broker's acknowledgement (``acks=all``,
  idempotent), resolved from the delivery report, for at most ``timeout_s``. ``PublishUnavailable`` (a
  ``RetryableError`` with ``retry_after``) says it was not acknowledged: the broker is down or slow, or the bounded
  local buffer is full. A server answers it with 503 and ``Retry-After``, so the sender tries again later.
  ``PayloadTooLarge`` (a ``PermanentError``) says a raw event is larger than the producer sends
  (``message.max.bytes``: ``MAX_MESSAGE_BYTES``, 33 MiB, room for the largest webhook body a route accepts, Garmin's
  32 MiB, in its envelope). It is decided before anything of the batch is produced, so the sender's retry duplicates
  nothing; a server answers it with 413. A broker whose own limit is lower (Kafka's ``message.max.bytes`` is 1 MB by
  default: raise it, or the topic's ``max.message.bytes``, to the routes' body caps) refuses such a message in its
  delivery report: also ``PayloadTooLarge``, but other raw events of that batch may have been written by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from core.errors import FatalError, PermanentError, RetryableError
from core.kafka import Headers, Message, SharedProducer, producer_config, send_all
from core.raw import RawPayload
from schemas.serde import encode_raw

PUBLISH_TIMEOUT_S = 5.0  # the longest an API request waits for the broker's acknowledgement
RETRY_AFTER_S = 10  # what a 503 for an unacknowledged publish asks the sender to wait
BUFFER_MESSAGES = 10_000  # the API producer's local buffer: full means 503 at once, not an unbounded queue
BUFFER_KBYTES = 64 * 1024
MAX_MESSAGE_BYTES = 33 * 1024 * 1024  # the largest raw event the API produces: a 32 MiB body and its envelope
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
MESSAGE_OVERHEAD_BYTES = 1024  # a record batch's framing beside the value, key and headers (generous)


def raw_message(item: RawPayload | bytes,
                key_of: Callable[[RawPayload], str] | None = None) -> tuple[bytes, str | None]:
    """A raw event's value and key: keyed by provider and user when known, so one user's payloads stay in order."""
    if isinstance(item, RawPayload):
        return encode_raw(item), (key_of(item) if key_of else f"{item.provider}:{item.user_id or ''}")
    return item, None


def publish(bootstrap: str, topic: str, payloads: Iterable[RawPayload | bytes], key_of=None) -> int:
    """Produce raw events with an idempotent producer; raises if any delivery report failed."""

    def messages() -> Iterator[Message]:
        for item in payloads:
            yield *raw_message(item, key_of), None

    sent = send_all(producer_config(bootstrap), topic, messages())
    if not sent.ok:
        raise KafkaException(f"{sent.remaining} raw events not acknowledged; errors: {sent.errors[:3]}")
    return sent.count


class PublishUnavailable(RetryableError):
    """Raw events were not acknowledged by the broker in time (or the local buffer is full): none may be taken as
    queued. Some may still have been written, so a retry can duplicate them (at least once)."""


class PayloadTooLarge(PermanentError):
    """A raw event is larger than the producer (or the broker) takes: retrying cannot help."""


def raw_event_producer(bootstrap: str, *, timeout_s: float = PUBLISH_TIMEOUT_S, buffer_messages: int = BUFFER_MESSAGES,
                       buffer_kbytes: int = BUFFER_KBYTES,
                       max_message_bytes: int = MAX_MESSAGE_BYTES) -> SharedProducer:
    """The long-lived producer of a server (created on first use): idempotent, ``acks=all``, a bounded buffer,
    messages up to ``max_message_bytes``, and messages given up after ``timeout_s`` (so a failed publish is reported,
    not kept queued behind an outage)."""
    if not timeout_s > 0:
        raise FatalError(f"the publish timeout must be a positive number of seconds, not {timeout_s!r}")
    return SharedProducer(producer_config(bootstrap, {
        "message.timeout.ms": int(timeout_s * 1000), "queue.buffering.max.messages": buffer_messages,
        "queue.buffering.max.kbytes": buffer_kbytes, "message.max.bytes": max_message_bytes}))


def _too_large(error: object) -> bool:
    code = getattr(error, "code", None)
    return callable(code) and code() in TOO_LARGE


class _Acknowledgements:
    """An ``on_delivery`` callback resolving ``future`` (on its event loop) with the errors once ``expected``
    reports came."""

    def __init__(self, expected: int, future: asyncio.Future[list[str]]) -> None:
        self.expected, self.future, self.errors = expected, future, []
        self.too_large = False  # the broker refused a message for its size
        self._lock = threading.Lock()

    def __call__(self, err: Any, _msg: Any) -> None:
        with self._lock:
            self.expected -= 1
            if err is not None:
                self.errors.append(str(err))
                self.too_large = self.too_large or _too_large(err)
            if self.expected:
                return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.future.get_loop().call_soon_threadsafe(self._resolve, list(self.errors))

    def _resolve(self, errors: list[str]) -> None:
        if not self.future.done():
            self.future.set_result(errors)


class RawEventPublisher:
    """``await publisher(topic, payloads)``: the number published once the broker acknowledged every one; else
    ``PublishUnavailable`` within ``timeout_s`` (at once when the local buffer is full or the producer refuses a
    message), or ``PayloadTooLarge`` before anything is produced when one is larger than the producer's
    ``message.max.bytes``. Never blocks the event loop.

    ``producer`` is shared (e.g. with the poller's publisher); without one, a ``raw_event_producer(bootstrap)`` of its
    own is used and ``close()`` releases it.
    """

    def __init__(self, bootstrap: str | None = None, *, producer: SharedProducer | None = None,
                 timeout_s: float = PUBLISH_TIMEOUT_S, retry_after_s: int = RETRY_AFTER_S) -> None:
        if producer is None and bootstrap is None:
            raise ValueError("give bootstrap servers or a producer")
        self._owned = producer is None
        self.producer = producer or raw_event_producer(str(bootstrap), timeout_s=timeout_s)
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.max_message_bytes = int(self.producer.config.get("message.max.bytes", 1_000_000))

    async def __call__(self, topic: str, payloads: Sequence[RawPayload], headers: Headers | None = None) -> int:
        """``headers`` go with every raw event (e.g. the replay claim of the webhook they came from)."""
        if not payloads:
            return 0
        messages = [raw_message(payload) for payload in payloads]
        for payload, (value, key) in zip(payloads, messages, strict=True):
            size = len(value) + len(key or "") + sum(len(k) + len(v or b"") for k, v in headers or ())
            if size + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes:  # checked before anything is produced, so a
                # retry duplicates nothing (the producer counts the key, headers and a record's overhead too)
                raise PayloadTooLarge(f"the {payload.provider} raw event for user {payload.user_id or '(none)'} is "
                                      f"{size:,} bytes with its key and headers; the producer takes messages of "
                                      f"at most {self.max_message_bytes:,} bytes with their framing (nothing of "
                                      f"these {len(payloads)} raw events was published)")
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        acknowledgements = _Acknowledgements(len(payloads), future)
        for produced, (value, key) in enumerate(messages):
            try:
                queued = self.producer.produce(topic, value, key=key, headers=headers, on_delivery=acknowledgements,
                                               deadline=0.0)
            except KafkaException as exc:  # refused by the client itself (e.g. it is shutting down)
                error = exc.args[0] if exc.args else exc
                if _too_large(error):
                    raise PayloadTooLarge(f"the producer refused a raw event of {len(value):,} bytes: {error}") \
                        from exc
                raise PublishUnavailable(f"the producer refused raw event {produced + 1} of {len(payloads)}: "
                                         f"{error}", self.retry_after_s) from exc
            if not queued:
                raise PublishUnavailable(f"the publish buffer is full ({produced} of {len(payloads)} raw events "
                                         f"produced, none acknowledged yet)", self.retry_after_s)
        try:
            # the producer gives a message up after timeout_s and reports it; the margin covers that report
            errors = await asyncio.wait_for(future, self.timeout_s + 1.0)
        except TimeoutError:
            raise PublishUnavailable(f"the broker did not acknowledge {len(payloads)} raw events within "
                                     f"{self.timeout_s:g}s", self.retry_after_s) from None
        if acknowledgements.too_large:
            raise PayloadTooLarge(f"the broker refused a raw event for its size (raise its message.max.bytes to the "
                                  f"webhook body caps): {errors[:3]}")
        if errors:
            raise PublishUnavailable(f"{len(errors)} of {len(payloads)} raw events not acknowledged by the broker: "
                                     f"{errors[:3]}", self.retry_after_s)
        return len(payloads)

    def close(self) -> None:
        """Release the producer when it is this publisher's own (a shared one is closed by its owner)."""
        if self._owned:
            self.producer.close()
