"""Fan-out delivery: each destination gets its own branch, its own retries and its own dead letters.

Input is ``(user_id, [NormalizedEvent…])`` in the user's order. A destination writes batches of
whole users (so one user's events keep their order inside a batch); retryable failures are retried
with capped exponential backoff (honouring ``retry_after``), then dead-lettered with the event and
the last error; permanent failures are dead-lettered at once; a FatalError fails the run. A slow or
failing destination never changes what the others receive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from core.dead_letters import dead_letter
from core.errors import DestinationDisabled, EndpointGone, FatalError, RetryableError, Route, route
from core.events import NormalizedEvent
from core.store import now_ms
from sinks.base import DeliveryFailure, SinkResult
from sinks.policy import Target
from sinks.status import DestinationStatus
from transforms.normalize import DEAD_LETTER, METRICS


@dataclass(frozen=True)
class Delivered:
    destination: str
    event_id: str


@dataclass(frozen=True)
class DeadLettered:
    record: dict[str, Any]
    error: BaseException


class Delivery:
    """Delivers ordered batches to one target with its retries; the same logic in and out of Beam.

    ``deliver(events)`` yields a ``Delivered`` or a ``DeadLettered`` for every event (never
    fewer), and raises the FatalError of a misconfigured destination.
    """

    def __init__(self, target: Target, on_retry: Any = None) -> None:
        self.target = target
        self.on_retry = on_retry or (lambda count: None)

    def deliver(self, events: Sequence[NormalizedEvent]) -> Iterator[Delivered | DeadLettered]:
        pending, attempt = list(events), 0
        while pending:
            attempt += 1
            result = self._write(pending)
            for event_id in result.delivered:
                yield Delivered(self.target.name, event_id)
            retry: list[DeliveryFailure] = []
            for failure in result.failures:
                verdict = route(failure.error)
                if verdict is Route.FAIL:
                    raise failure.error
                if verdict is Route.RETRY and attempt < self.target.retry.max_attempts:
                    retry.append(failure)
                else:
                    yield DeadLettered(self._dead_letter(failure, attempt), failure.error)
            if retry:
                self.on_retry(len(retry))
                hints = [getattr(f.error, "retry_after", None) for f in retry]
                time.sleep(self.target.retry.delay(attempt, max((h for h in hints if h is not None), default=None)))
            order = {id(e): i for i, e in enumerate(pending)}
            pending = sorted((f.event for f in retry), key=lambda e: order.get(id(e), 0))

    def _write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        sink = self.target.sink
        try:
            result = sink.write(events)
        except FatalError:
            raise
        except Exception as exc:  # a sink bug or an unclassified client error: route it, never drop it
            return SinkResult().fail_all(events, exc)
        accounted = len(result.delivered) + len(result.failures)
        if accounted != len(events):
            raise FatalError(f"sink {sink.name} accounted for {accounted} of {len(events)} events")
        return result

    def _dead_letter(self, failure: DeliveryFailure, attempts: int) -> dict[str, Any]:
        return delivery_dead_letter(self.target, failure.event, failure.error, attempts)


def delivery_dead_letter(target: Target, event: NormalizedEvent, error: BaseException, attempts: int,
                         redelivery_round: int = 0) -> dict[str, Any]:
    """The dead letter of an event a destination did not take; transient causes get a redelivery time."""
    next_at = None
    if isinstance(error, RetryableError) or route(error) is Route.RETRY:
        next_at = target.retry.next_redelivery_ms(redelivery_round, getattr(error, "retry_after", None), now_ms())
    return dead_letter(
        stage=f"deliver:{target.name}", error=error, original=event.body(), attempts=attempts,
        source=event_source(event), provider=event.provider.lower(), kind=event.type, user_id=event.user_id,
        destination=target.name, event_id=event.event_id, next_attempt_at=next_at, redelivery_round=redelivery_round)


def event_source(event: NormalizedEvent) -> dict[str, Any]:
    """What a delivery dead letter keeps besides the body, enough to rebuild the event for replay."""
    return {"sequence": event.sequence, "natural_key": event.natural_key, "type": event.type,
            "ordering_timestamp_ms": event.ordering_timestamp_ms, "idempotency_key": event.raw_idempotency_key,
            "reference": event.reference}


def event_from_dead_letter(record: dict[str, Any]) -> NormalizedEvent:
    """Rebuild the event a delivery dead letter holds (its body is the exact envelope sent)."""
    envelope = json.loads(record["original"])
    source = record["source"]
    if "data" not in envelope and "athlete" not in envelope:  # a lifecycle event: its body is the event
        return NormalizedEvent.lifecycle(envelope, int(source["ordering_timestamp_ms"]))
    data = envelope["athlete"] if envelope["type"] == "athlete" else envelope["data"][0]
    return NormalizedEvent(record["event_id"], envelope["type"], envelope["user"], data, source["natural_key"],
                           int(source["ordering_timestamp_ms"]), source["sequence"], source.get("idempotency_key"),
                           envelope.get("version", NormalizedEvent.version), reference=source.get("reference"))


class DeliverToSink(beam.DoFn):
    """Deliver users' ordered event lists to one destination, in batches of about ``batch_size`` events.

    With a control-plane store (``status_url``), a disabled destination receives nothing: its
    events become dead letters at once (``DestinationDisabled``), and the destination's failing
    streak is recorded so that sustained failure (or a 410) disables it.
    """

    STATUS_TTL_S = 5.0

    def __init__(self, target: Target, status_url: str | None = None) -> None:
        self.target = target
        self.status_url = status_url
        name = target.name
        self.delivered = Metrics.counter(METRICS, f"delivered:{name}")
        self.dead = Metrics.counter(METRICS, f"delivery_dead_letter:{name}")
        self.retried = Metrics.counter(METRICS, f"retried:{name}")
        self.filtered = Metrics.counter(METRICS, f"filtered:{name}")

    def setup(self) -> None:
        self.status = DestinationStatus(self.status_url).open() if self.status_url else None
        self._disabled_checked_at, self._disabled = 0.0, False
        try:
            self.target.sink.open()
        except FatalError:
            raise
        except Exception:  # momentarily unavailable: write() opens again and the taxonomy routes its errors
            pass
        self.delivery = Delivery(self.target, on_retry=self.retried.inc)

    def teardown(self) -> None:
        self.target.sink.close()
        if self.status:
            self.status.close()

    def _is_disabled(self) -> bool:
        if self.status is None:
            return False
        if time.monotonic() - self._disabled_checked_at > self.STATUS_TTL_S:
            self._disabled = self.status.get(self.target.name).disabled
            self._disabled_checked_at = time.monotonic()
        return self._disabled

    def start_bundle(self) -> None:
        self.buffer: list[NormalizedEvent] = []

    def process(self, element: tuple[str, list[NormalizedEvent]]) -> Iterator[Any]:
        _, events = element
        if self.target.event_types is not None:
            wanted = [e for e in events if e.type in self.target.event_types]
            self.filtered.inc(len(events) - len(wanted))
            events = wanted
        self.buffer.extend(events)
        if len(self.buffer) >= self.target.batch_size:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        # Outputs from finish_bundle must carry their window; delivery runs in the global window.
        for output in self._flush():
            if isinstance(output, pvalue.TaggedOutput):
                yield pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)

    def _flush(self) -> Iterator[Any]:
        pending, self.buffer = self.buffer, []
        if not pending:
            return
        if self._is_disabled():
            error = DestinationDisabled(f"destination {self.target.name} is disabled; enable it, then replay")
            for event in pending:
                self.dead.inc()
                yield pvalue.TaggedOutput(DEAD_LETTER, delivery_dead_letter(self.target, event, error, 0))
            return
        delivered, last_error = 0, None
        for outcome in self.delivery.deliver(pending):
            if isinstance(outcome, Delivered):
                delivered += 1
                self.delivered.inc()
                yield (outcome.destination, outcome.event_id)
            else:
                last_error = outcome.error
                self.dead.inc()
                yield pvalue.TaggedOutput(DEAD_LETTER, outcome.record)
        self._note_health(delivered, last_error)

    def _note_health(self, delivered: int, last_error: BaseException | None) -> None:
        if self.status is None:
            return
        if delivered:
            self.status.record_success(self.target.name)
        elif last_error is not None and (isinstance(last_error, EndpointGone) or route(last_error) is Route.RETRY):
            status = self.status.record_failure(self.target.name, last_error, self.target.retry.disable_after_s)
            self._disabled, self._disabled_checked_at = status.disabled, time.monotonic()


class DeliverAll(beam.PTransform):
    """Fan the per-user event lists out to every destination; returns (receipts, dead letters) per destination."""

    def __init__(self, targets: Sequence[Target], status_url: str | None = None) -> None:
        super().__init__()
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise FatalError(f"destination names must be unique, got {names}")
        self.targets, self.status_url = list(targets), status_url

    def expand(self, user_events):
        receipts, dead = [], []
        for target in self.targets:
            ok, bad = user_events | f"Deliver[{target.name}]" >> beam.ParDo(
                DeliverToSink(target, self.status_url)).with_outputs(DEAD_LETTER, main="delivered")
            receipts.append(ok)
            dead.append(bad)
        return receipts, dead
