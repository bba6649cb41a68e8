"""Kafka sink: one message per event, keyed by user, from an idempotent confluent-kafka producer.

Guarantees:
- At least once. An event is reported delivered only when its delivery report came back without error, i.e. the
  broker acknowledged it with ``acks=all``; ``write()`` produces the batch, ``flush()``es, and checks every report
  before returning. An event without a report (flush timed out) is a ``RetryableError``; what is still queued is
  purged so it cannot land after the retry, and the next write starts a fresh producer.
- Idempotence: the producer is idempotent (``enable.idempotence=True``, ``acks=all``, at most 5 in flight), so the
  client's own retries never duplicate or reorder messages. A batch written again (a retry of the pipeline) produces
  the same key, value and ``event_id`` header again: consumers dedupe on the ``event_id`` header.
- Per-user order: key = ``user_id``, so one user's events land in one partition in ``write`` order. When an event of a
  user fails with a ``RetryableError``, that user's later events of the batch are reported failed too
  (``RetryableError("blocked behind earlier failure ...")``, even when the broker acknowledged them) so the retry
  re-sends them after the earlier event; the last copy in the partition is then the newest.
- Value: ``event.body()`` (Terra JSON envelope) or, with ``value_format="avro"``, the ``normalized_event`` envelope in
  Avro single-object encoding (``schemas.serde.decode("normalized_event", value)`` reads it back).
- Headers: ``event_id``, ``type``, ``user_id``, ``provider``, ``ordering_timestamp_ms`` (UTF-8), and ``deleted`` =
  ``true`` on a tombstone (JSON value ``{type, user, deleted: [key], version}``; Avro: ``data`` empty, ``deleted``
  holding the key).
- Classification: retriable Kafka errors, timeouts, transport errors and an idempotent-producer fatal error (the
  producer is rebuilt on the next write) -> ``RetryableError``; message too large / invalid topic / invalid record ->
  ``PermanentError``; authentication, authorization and unknown topic (the broker did not auto-create it) ->
  ``FatalError``; anything else -> ``RetryableError`` (retried, then dead-lettered).
- Config that would break ordering or idempotence (``enable.idempotence`` false, ``acks`` other than all,
  more than 5 in flight, ``retries`` 0, the ``random`` partitioner) raises ``FatalError`` at construction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from core.kafka import new_producer, produce, producer_config
from core.secrets import resolve
from schemas import MODEL_TYPES
from schemas.serde import encode_event, validate_record
from sinks.base import Sink, SinkResult

VALUE_FORMATS = ("json", "avro")
DEFAULT_MESSAGE_TIMEOUT_MS = 30_000  # librdkafka's default is 300 s; a write should not block that long
MAX_IN_FLIGHT = 5
_FLUSH_MARGIN_S = 10.0

_FATAL_CODES = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError.UNSUPPORTED_SASL_MECHANISM, KafkaError.ILLEGAL_SASL_STATE,
    KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.INVALID_REQUIRED_ACKS,
    KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART,
})
_AUTH_CODES = frozenset({KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION, KafkaError._SSL,
                         KafkaError.UNSUPPORTED_SASL_MECHANISM, KafkaError.ILLEGAL_SASL_STATE})
_PERMANENT_CODES = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.TOPIC_EXCEPTION,
    KafkaError.INVALID_RECORD, KafkaError._INVALID_ARG, KafkaError.POLICY_VIOLATION,
})


def build_producer_config(bootstrap_servers: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The producer settings: user ``overrides`` on top of the ordering/idempotence defaults.

    Raises FatalError for overrides that would break idempotence or per-user ordering, and for non-scalar values
    (callbacks cannot travel with a picklable config).
    """
    config = producer_config(bootstrap_servers, {
        "max.in.flight.requests.per.connection": MAX_IN_FLIGHT,
        "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
    })
    for key, value in (overrides or {}).items():
        if not isinstance(value, str | int | float | bool):
            raise FatalError(f"kafka producer_config[{key!r}] must be a string, number or bool, got {type(value)}")
        text = str(value).strip().lower()
        if key == "enable.idempotence" and text not in ("true", "1"):
            raise FatalError("kafka producer_config: enable.idempotence must stay true (no duplicates, no reordering)")
        if key in ("acks", "request.required.acks") and text not in ("all", "-1"):
            raise FatalError(f"kafka producer_config: {key}={value!r} is not allowed; only 'all' makes a delivery "
                             "report mean durably written")
        if key in ("max.in.flight.requests.per.connection", "max.in.flight") and _as_int(key, value) > MAX_IN_FLIGHT:
            raise FatalError(f"kafka producer_config: {key}={value!r}; the idempotent producer keeps order only with "
                             f"at most {MAX_IN_FLIGHT} requests in flight")
        if key in ("retries", "message.send.max.retries") and _as_int(key, value) < 1:
            raise FatalError(f"kafka producer_config: {key}={value!r}; the idempotent producer needs retries >= 1")
        if key == "partitioner" and text == "random":
            raise FatalError("kafka producer_config: partitioner=random would scatter a user's events over partitions")
        if key == "bootstrap.servers" and value != bootstrap_servers:
            raise FatalError("kafka producer_config: set bootstrap servers with the bootstrap_servers argument only")
        if key in ("transactional.id", "delivery.report.only.error"):
            raise FatalError(f"kafka producer_config: {key} is not supported by this sink")
        config[key] = value
    if "delivery.timeout.ms" in (overrides or {}):
        config.pop("message.timeout.ms", None)  # librdkafka alias: keep the user's spelling only
    return config


def _as_int(key: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FatalError(f"kafka producer_config[{key!r}] must be an integer, got {value!r}") from None


def classify(error: KafkaError, auth_failure: KafkaError | None = None) -> Exception:
    """Map one delivery-report or produce error to the healthflow taxonomy (see module docstring)."""
    code = error.code()
    detail = f"kafka {error.name()}: {error.str()}"
    if code in _FATAL_CODES:
        if code in (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART):
            return FatalError(f"{detail} (the topic does not exist and the broker did not auto-create it)")
        return FatalError(detail)
    if code in _PERMANENT_CODES:
        return PermanentError(detail)
    if code == KafkaError._MSG_TIMED_OUT and auth_failure is not None:
        return FatalError(f"{detail}; the client could not authenticate: {auth_failure.str()}")
    return RetryableError(detail)


class KafkaSink(Sink):
    """Produces each event to ``topic`` keyed by ``user_id`` (see module docstring for the guarantees)."""

    ordered = True

    def __init__(self, name: str, bootstrap_servers: str, topic: str, value_format: str = "json",
                 producer_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(name)
        if not bootstrap_servers:
            raise FatalError(f"kafka sink {name!r}: bootstrap_servers is required")
        if not topic:
            raise FatalError(f"kafka sink {name!r}: topic is required")
        if value_format not in VALUE_FORMATS:
            raise FatalError(f"kafka sink {name!r}: value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.value_format = value_format
        self.producer_config = dict(producer_config or {})
        self.config = build_producer_config(bootstrap_servers, self.producer_config)
        timeout_ms = self.config.get("delivery.timeout.ms", self.config.get("message.timeout.ms"))
        self.flush_timeout_s = _as_int("message.timeout.ms", timeout_ms) / 1000 + _FLUSH_MARGIN_S
        self._producer: Producer | None = None
        self._auth_failure: KafkaError | None = None
        self._broken: KafkaError | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_producer"] = None  # connections never travel with the pickled config
        state["_auth_failure"] = state["_broken"] = None
        return state

    def open(self) -> None:
        if self._producer is None:
            config = {key: resolve(value, f"kafka sink {self.name!r} producer_config[{key!r}]")
                      if isinstance(value, str) else value for key, value in self.config.items()}
            try:
                self._producer = new_producer({**config, "error_cb": self._on_client_error})
            except (KafkaException, ValueError, TypeError) as exc:
                raise FatalError(f"kafka sink {self.name!r}: invalid producer config: {exc}") from exc
            self._broken = None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.flush_timeout_s)
            self._producer.close()
            self._producer = None

    def _on_client_error(self, error: KafkaError) -> None:
        if error.code() in _AUTH_CODES:
            self._auth_failure = error
        if error.fatal():
            self._broken = error

    def value_of(self, event: NormalizedEvent) -> bytes:
        """The message value; PermanentError when the event does not fit the Avro schema or cannot be encoded (a
        number no double holds: OverflowError), so it is dead-lettered alone."""
        try:
            if self.value_format == "json":
                return event.body()
            if event.type not in MODEL_TYPES:
                raise PermanentError(f"event type {event.type!r} has no Avro model; known: {', '.join(MODEL_TYPES)}")
            if event.deleted:
                return encode_event(event.to_dict())
            return encode_event(dict(event.to_dict(), data=validate_record(event.type, event.data)))
        except (ValueError, TypeError, KeyError, ArithmeticError) as exc:  # SchemaMismatch is a ValueError
            raise PermanentError(f"event {event.event_id} does not fit the normalized_event schema: "
                                 f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def headers_of(event: NormalizedEvent) -> list[tuple[str, bytes]]:
        return [("event_id", event.event_id.encode()), ("type", event.type.encode()),
                ("user_id", event.user_id.encode()), ("provider", event.provider.encode()),
                ("ordering_timestamp_ms", str(event.ordering_timestamp_ms).encode()),
                *([("deleted", b"true")] if event.deleted else [])]

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        """Produce the batch, flush, and report each event from its own delivery report."""
        self.open()
        producer = self._producer
        assert producer is not None
        outcome: dict[int, Exception | None] = {}  # index -> None (acknowledged) or the classified error
        reports: dict[int, KafkaError | None] = {}
        deadline = time.monotonic() + self.flush_timeout_s

        def on_delivery(index: int, error: KafkaError | None, _message: Message) -> None:
            reports[index] = error

        for index, event in enumerate(events):
            try:
                key, value, headers = event.user_id.encode(), self.value_of(event), self.headers_of(event)
            except PermanentError as exc:
                outcome[index] = exc
                continue
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # malformed event: cannot be sent
                outcome[index] = PermanentError(f"event {event.event_id} cannot be encoded: {exc!r}")
                continue
            try:  # a full local queue: delivery reports are served until there is room, or the deadline
                if not produce(producer, self.topic, value, key=key, headers=headers,
                               on_delivery=partial(on_delivery, index), deadline=deadline):
                    outcome[index] = RetryableError("kafka producer queue stayed full; not sent")
            except KafkaException as exc:
                outcome[index] = classify(exc.args[0], self._auth_failure)
                producer.poll(0)
        if producer.flush(max(0.0, deadline - time.monotonic())):
            # Reports still missing: drop what is queued so it cannot land after a retry, and start afresh next time.
            producer.purge(in_queue=True, in_flight=False)
            producer.poll(0)
            self._producer = None

        for index in range(len(events)):
            if index in outcome:
                continue
            if index not in reports:
                outcome[index] = RetryableError(
                    f"no delivery report within {self.flush_timeout_s:.0f}s: not acknowledged by {self.topic}")
            elif reports[index] is None:
                outcome[index] = None
            else:
                outcome[index] = classify(reports[index], self._auth_failure)
        if any(error is None for error in outcome.values()):
            self._auth_failure = None  # the broker accepted us: an older authentication error is stale
        if self._broken is not None:  # an idempotent-producer fatal error: start a fresh producer next time
            self._producer = None
        return _result(events, outcome)


def _result(events: Sequence[NormalizedEvent], outcome: dict[int, Exception | None]) -> SinkResult:
    """Delivered / failed per event; acknowledged events behind a user's retryable failure are reported blocked."""
    result = SinkResult()
    blocked_by: dict[str, tuple[str, RetryableError]] = {}
    for index, event in enumerate(events):
        error = outcome[index]
        blocker = blocked_by.get(event.user_id)
        if error is None and blocker is None:
            result.delivered.append(event.event_id)
            continue
        if error is None:
            blocked_id, cause = blocker  # type: ignore[misc]
            error = RetryableError(f"blocked behind earlier failure of {blocked_id} for user {event.user_id} "
                                   f"(acknowledged; re-sent after it to keep order): {cause}", cause.retry_after)
        elif isinstance(error, RetryableError) and blocker is None:
            blocked_by[event.user_id] = (event.event_id, error)
        result.fail_all([event], error)
    return result
