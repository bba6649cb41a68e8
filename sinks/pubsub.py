"""Google Cloud Pub/Sub sink: one message per event, ordering key = user id.

Guarantees:
- At least once. ``write()`` publishes the batch and waits on every publish future before returning; an event is
  reported delivered only when its future resolved to a server-assigned message id. A future that does not resolve
  within the wait budget is a ``RetryableError`` (the message may still arrive: a duplicate at worst).
- Idempotence: Pub/Sub has no server-side dedup; a re-written event carries the same ``event_id`` attribute and the
  same bytes, and subscribers dedupe on ``event_id``.
- Per-user order: ``PublisherOptions(enable_message_ordering=True)`` and ``ordering_key = user_id``. After a failed
  publish the client pauses that key and fails its queued messages; the sink reports the user's first failed event
  with its classified error and every later event of that user in the batch as
  ``RetryableError("blocked behind an earlier failure ...")``, and calls ``resume_publish`` for the key at the start
  of the next write. Subscribers must enable message ordering on their subscription to receive in that order.
- Publish RPCs are made once per attempt (``retry=None``, bounded ``timeout_s``): with ordering enabled the client
  would otherwise retry transient errors forever and ``write()`` would never return. Retries belong to the pipeline.
- Message: data = ``event.body()`` (Terra JSON envelope); attributes ``event_id``, ``type``, ``user_id``,
  ``provider``, ``ordering_timestamp_ms``, and ``deleted`` = ``true`` on a tombstone.
- Classification of a failed future by gRPC code: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED,
  INTERNAL -> ``RetryableError``; NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED -> ``FatalError`` (topic or
  credentials misconfigured); other codes -> ``PermanentError``; non-gRPC errors (transport, retry budget) ->
  ``RetryableError``; a message over the size limit -> ``PermanentError``.

Emulator / test server: ``emulator_host="127.0.0.1:8085"`` is passed explicitly — the client gets its own
``PublisherGrpcTransport`` over ``grpc.insecure_channel(emulator_host)`` — so nothing depends on (or changes) the
process-wide ``PUBSUB_EMULATOR_HOST``. Without ``emulator_host`` the client uses Application Default Credentials, or
``PUBSUB_EMULATOR_HOST`` when that is set in the environment (the client library's own behaviour).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

import grpc
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher import exceptions as publisher_exceptions
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.base import Sink, SinkResult

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL})
FATAL_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                         grpc.StatusCode.UNAUTHENTICATED})


def classify(exc: BaseException) -> Exception:
    """Map a publish failure to the healthflow taxonomy (see module docstring)."""
    if isinstance(exc, publisher_exceptions.MessageTooLargeError):
        return PermanentError(f"pubsub message too large: {exc}")
    if isinstance(exc, api_exceptions.GoogleAPICallError) and exc.grpc_status_code is not None:
        code = exc.grpc_status_code
        detail = f"pubsub publish failed: {code.name}: {exc.message}"
        if code in RETRYABLE_CODES:
            return RetryableError(detail)
        if code in FATAL_CODES:
            return FatalError(detail)
        return PermanentError(detail)
    if isinstance(exc, publisher_exceptions.PublishToPausedOrderingKeyException):
        return RetryableError(f"pubsub ordering key paused by an earlier failure: {exc}")
    return RetryableError(f"pubsub publish failed: {type(exc).__name__}: {exc}")


class PubSubSink(Sink):
    """Publishes each event to ``projects/<project>/topics/<topic>`` (see module docstring for the guarantees)."""

    ordered = True

    def __init__(self, name: str, project: str, topic: str, emulator_host: str | None = None,
                 timeout_s: float = 30.0) -> None:
        super().__init__(name)
        if not project:
            raise FatalError(f"pubsub sink {name!r}: project is required")
        if not topic or "/" in topic:
            raise FatalError(f"pubsub sink {name!r}: topic must be a bare topic id, got {topic!r}")
        if timeout_s <= 0:
            raise FatalError(f"pubsub sink {name!r}: timeout_s must be > 0, got {timeout_s}")
        self.project = project
        self.topic = topic
        self.topic_path = f"projects/{project}/topics/{topic}"
        self.emulator_host = emulator_host
        self.timeout_s = timeout_s
        self._client: pubsub_v1.PublisherClient | None = None
        self._paused: set[str] = set()  # ordering keys that failed in an earlier write

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # connections never travel with the pickled config
        state["_paused"] = set()
        return state

    def open(self) -> None:
        if self._client is not None:
            return
        options = pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
        try:
            if self.emulator_host:
                transport = PublisherGrpcTransport(host=self.emulator_host,
                                                   channel=grpc.insecure_channel(self.emulator_host))
                self._client = pubsub_v1.PublisherClient(publisher_options=options, transport=transport)
            else:
                self._client = pubsub_v1.PublisherClient(publisher_options=options)
        except auth_exceptions.DefaultCredentialsError as exc:
            raise FatalError(f"pubsub sink {self.name!r}: no Google credentials: {exc}") from exc
        self._paused.clear()

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.stop()
            finally:
                client.transport.close()

    @staticmethod
    def attributes_of(event: NormalizedEvent) -> dict[str, str]:
        return {"event_id": event.event_id, "type": event.type, "user_id": event.user_id,
                "provider": event.provider, "ordering_timestamp_ms": str(event.ordering_timestamp_ms),
                **({"deleted": "true"} if event.deleted else {})}

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        """Publish the batch, wait on every future, report each event (see module docstring)."""
        self.open()
        client = self._client
        assert client is not None
        for key in sorted(self._paused):
            with contextlib.suppress(RuntimeError):  # not paused (e.g. the failure was local)
                client.resume_publish(self.topic_path, key)
        self._paused.clear()

        pending: list[tuple[NormalizedEvent, Any]] = []  # (event, future) or (event, the synchronous error)
        for event in events:
            future: Any
            try:
                data, attributes = event.body(), self.attributes_of(event)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # malformed event: never handed over
                pending.append((event, PermanentError(f"event {event.event_id} cannot be encoded: {exc!r}")))
                continue
            try:
                future = client.publish(self.topic_path, data, ordering_key=event.user_id, retry=None,
                                        timeout=self.timeout_s, **attributes)
            except RuntimeError as exc:  # publisher stopped: start a fresh client next time
                self._client = None
                future = RetryableError(f"pubsub publisher unusable: {exc}")
            except Exception as exc:  # e.g. MessageTooLargeError, raised before anything is sent
                future = classify(exc)
            pending.append((event, future))

        # One RPC per ordered batch, at most ``timeout_s`` each; batches of one key go one after another.
        budget = self.timeout_s * 2 + 5.0
        deadline = time.monotonic() + budget
        result = SinkResult()
        first_failure: dict[str, tuple[str, Exception]] = {}
        for event, future in pending:
            blocks = True  # a failed future pauses the key: everything after it for the user was not sent
            if isinstance(future, Exception):
                error: Exception | None = future
                blocks = not isinstance(error, PermanentError)  # never handed over: the key is not paused
            else:
                try:
                    future.result(timeout=max(0.0, deadline - time.monotonic()))
                    error = None
                except FutureTimeoutError:
                    error = RetryableError(f"pubsub publish not acknowledged within the wait budget ({budget:.0f}s)")
                except Exception as exc:
                    error = classify(exc)
            blocker = first_failure.get(event.user_id)
            if blocker is not None:
                blocked_id, cause = blocker
                result.fail_all([event], RetryableError(
                    f"blocked behind an earlier failure of {blocked_id} for user {event.user_id}: {cause}"))
            elif error is None:
                result.delivered.append(event.event_id)
            else:
                result.fail_all([event], error)
                if blocks:
                    first_failure[event.user_id] = (event.event_id, error)
        self._paused.update(first_failure)
        return result
