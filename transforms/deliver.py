"""Fan-out delivery: each destination gets its own branch, its own retries and its own dead letters.

Input is ``(user_id, [NormalizedEvent…])`` in the user's order. A destination writes batches of
whole users (so one user's events keep their order inside a batch); retryable failures are retried
with capped exponential backoff (honouring ``retry_after``), then dead-lettered with the event and
the last error; permanent failures are dead-lettered at once; a FatalError fails the run. A slow or
failing destination never changes what the others receive.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from sinks.base import DeliveryFailure, Sink, SinkResult
from transforms.dead_letters import dead_letter
from transforms.errors import FatalError, Route, route
from transforms.events import NormalizedEvent
from transforms.normalize import DEAD_LETTER, METRICS


@dataclass(frozen=True)
class RetryPolicy:
    """In-pipeline retries for one destination (the dead-letter store and replay cover the rest)."""

    max_attempts: int = 4
    initial_delay_s: float = 0.2
    max_delay_s: float = 5.0
    jitter: float = 0.2

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        base = min(self.max_delay_s, self.initial_delay_s * (2 ** (attempt - 1)))
        base *= 1 + random.uniform(-self.jitter, self.jitter)
        if retry_after is not None:  # clamp the server's wish to [delay, 2 × delay], capped
            base = min(max(base, retry_after), 2 * base if base > 0 else retry_after, self.max_delay_s * 2)
        return max(0.0, base)


class DeliverToSink(beam.DoFn):
    """Deliver users' ordered event lists to one sink, in batches of about ``batch_size`` events."""

    def __init__(self, sink: Sink, batch_size: int = 200, retry: RetryPolicy | None = None) -> None:
        self.sink = sink
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self.delivered = Metrics.counter(METRICS, f"delivered:{sink.name}")
        self.dead = Metrics.counter(METRICS, f"delivery_dead_letter:{sink.name}")
        self.retried = Metrics.counter(METRICS, f"retried:{sink.name}")

    def setup(self) -> None:
        self.sink.open()

    def teardown(self) -> None:
        self.sink.close()

    def start_bundle(self) -> None:
        self.buffer: list[NormalizedEvent] = []

    def process(self, element: tuple[str, list[NormalizedEvent]]) -> Iterator[Any]:
        _, events = element
        self.buffer.extend(events)
        if len(self.buffer) >= self.batch_size:
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
        attempt = 0
        while pending:
            attempt += 1
            result = self._write(pending)
            for event_id in result.delivered:
                self.delivered.inc()
                yield (self.sink.name, event_id)
            retry: list[DeliveryFailure] = []
            for failure in result.failures:
                verdict = route(failure.error)
                if verdict is Route.FAIL:
                    raise failure.error
                if verdict is Route.RETRY and attempt < self.retry.max_attempts:
                    retry.append(failure)
                else:
                    self.dead.inc()
                    yield pvalue.TaggedOutput(DEAD_LETTER, self._dead_letter(failure, attempt))
            if retry:
                self.retried.inc(len(retry))
                hints = [getattr(f.error, "retry_after", None) for f in retry]
                time.sleep(self.retry.delay(attempt, max((h for h in hints if h is not None), default=None)))
            order = {id(e): i for i, e in enumerate(pending)}
            pending = sorted((f.event for f in retry), key=lambda e: order.get(id(e), 0))

    def _write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        try:
            result = self.sink.write(events)
        except FatalError:
            raise
        except Exception as exc:  # a sink bug or an unclassified client error: route it, never drop it
            return SinkResult().fail_all(events, exc)
        accounted = len(result.delivered) + len(result.failures)
        if accounted != len(events):
            raise FatalError(f"sink {self.sink.name} accounted for {accounted} of {len(events)} events")
        return result

    def _dead_letter(self, failure: DeliveryFailure, attempts: int) -> dict[str, Any]:
        event = failure.event
        return dead_letter(
            stage=f"deliver:{self.sink.name}", error=failure.error, original=event.body(), attempts=attempts,
            source={"sequence": event.sequence, "natural_key": event.natural_key, "type": event.type,
                    "ordering_timestamp_ms": event.ordering_timestamp_ms,
                    "idempotency_key": event.raw_idempotency_key},
            provider=event.provider.lower(), kind=event.type, user_id=event.user_id, destination=self.sink.name,
            event_id=event.event_id)


class DeliverAll(beam.PTransform):
    """Fan the per-user event lists out to every sink; returns (receipts, dead letters) per sink."""

    def __init__(self, sinks: Sequence[Sink], batch_size: int = 200, retry: RetryPolicy | None = None) -> None:
        super().__init__()
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise FatalError(f"destination names must be unique, got {names}")
        self.sinks, self.batch_size, self.retry = list(sinks), batch_size, retry

    def expand(self, user_events):
        receipts, dead = [], []
        for sink in self.sinks:
            ok, bad = user_events | f"Deliver[{sink.name}]" >> beam.ParDo(
                DeliverToSink(sink, self.batch_size, self.retry)).with_outputs(DEAD_LETTER, main="delivered")
            receipts.append(ok)
            dead.append(bad)
        return receipts, dead
