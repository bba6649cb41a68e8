"""Fan-out delivery: each destination gets its own branch, its own retries and its own dead letters.

Input is ``(user_id, UserEvents)``: a user's events in order, with the acks of the messages they came
from (every destination takes its share of them). Failures are routed by the error taxonomy:
retryable ones are retried with capped exponential backoff (honouring ``retry_after``), then
dead-lettered with their scheduled redelivery; permanent ones are dead-lettered at once; a
FatalError fails the run. Bounded input is delivered in batches across users, retrying inside the
bundle (``DeliverToSink``); unbounded input per user, in order, retrying on processing-time timers
while that user's later events wait, the users of a delivery shard that arrive together sharing each write
(``DeliverInOrder``). A destination's acks end only once its events are delivered or their dead letters stored.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from core.dead_letters import dead_letter
from core.errors import DestinationDisabled, EndpointGone, FatalError, RetryableError, Route, route
from core.events import NormalizedEvent
from core.store import now_ms
from sinks.base import DeliveryFailure, Sink, SinkResult
from sinks.policy import Target
from sinks.status import DestinationStatus
from transforms.acks import Acks, join_acks, split_acks
from transforms.bundles import GroupWithinBundle
from transforms.normalize import UserEvents
from transforms.outputs import DEAD_LETTER, ENDED, TALLY, DeadLetterOut, Tally
from transforms.reuse import acquire, private_copy, release

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Delivered:
    destination: str
    event_id: str


@dataclass(frozen=True)
class DeadLettered:
    record: dict[str, Any]
    error: BaseException
    event: NormalizedEvent | None = None  # the event it holds (the object given to ``attempt``)


@dataclass
class Attempt:
    """One write of a batch: what was delivered, what is dead, what to retry (in order) and when."""

    delivered: list[Delivered]
    dead: list[DeadLettered]
    retry: list[NormalizedEvent]
    retry_after: float | None = None


class Delivery:
    """Delivers ordered batches to one target with its retry policy; the same logic in and out of Beam.

    ``attempt(events, n)`` is one write, routed by the error taxonomy: retryable failures are
    returned for another attempt while ``n`` is below the policy's ``max_attempts``, then
    dead-lettered with their scheduled redelivery; permanent ones are dead-lettered at once; a
    FatalError (a misconfigured destination) is raised.
    """

    def __init__(self, target: Target, on_retry: Any = None) -> None:
        self.target = target
        self.on_retry = on_retry or (lambda count: None)

    def attempt(self, events: Sequence[NormalizedEvent], attempt: int) -> Attempt:
        result = self._write(events)
        outcome = Attempt([Delivered(self.target.name, event_id) for event_id in result.delivered], [], [])
        retry: list[DeliveryFailure] = []
        for failure in result.failures:
            verdict = route(failure.error)
            if verdict is Route.FAIL:
                raise failure.error
            if verdict is Route.RETRY and attempt < self.target.retry.max_attempts:
                retry.append(failure)
            else:
                outcome.dead.append(DeadLettered(self._dead_letter(failure, attempt), failure.error, failure.event))
        if retry:
            self.on_retry(len(retry))
            hints = [h for h in (getattr(f.error, "retry_after", None) for f in retry) if h is not None]
            outcome.retry_after = max(hints, default=None)
            order = {id(e): i for i, e in enumerate(events)}
            outcome.retry = sorted((f.event for f in retry), key=lambda e: order.get(id(e), 0))
        return outcome

    def deliver(self, events: Sequence[NormalizedEvent]) -> Iterator[Delivered | DeadLettered]:
        """Every event delivered or dead-lettered, waiting between attempts (bounded runs, replay)."""
        pending, attempt = list(events), 0
        while pending:
            attempt += 1
            outcome = self.attempt(pending, attempt)
            yield from outcome.delivered
            yield from outcome.dead
            if outcome.retry:
                time.sleep(self.target.retry.delay(attempt, outcome.retry_after))
            pending = outcome.retry

    def _write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        """One write of ``events``; a batch the sink refuses as a whole for its content (an exception the taxonomy
        dead-letters) is written again event by event, in order, so only the events it cannot take fail."""
        sink = self.target.sink
        try:
            result = sink.write(events)
        except FatalError:
            raise
        except Exception as exc:  # a sink bug or an unclassified client error: route it, never drop it
            if len(events) > 1 and route(exc) is Route.DEAD_LETTER:
                return self._write_one_by_one(events)
            return SinkResult().fail_all(events, exc)
        accounted = len(result.delivered) + len(result.failures)
        if accounted != len(events):
            raise FatalError(f"sink {sink.name} accounted for {accounted} of {len(events)} events")
        return result

    def _write_one_by_one(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        combined = SinkResult()
        for event in events:
            result = self._write([event])
            combined.delivered.extend(result.delivered)
            combined.failures.extend(result.failures)
        return combined

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
    if "deleted" in envelope and "data" not in envelope:  # a tombstone: the same event, id and all
        return NormalizedEvent(record["event_id"], envelope["type"], envelope["user"], envelope["deleted"][0],
                               source["natural_key"], int(source["ordering_timestamp_ms"]), source["sequence"],
                               source.get("idempotency_key"), envelope.get("version", NormalizedEvent.version),
                               reference=source.get("reference"), deleted=True)
    if "data" not in envelope and "athlete" not in envelope:  # a lifecycle event: its body is the event
        return NormalizedEvent.lifecycle(envelope, int(source["ordering_timestamp_ms"]))
    data = envelope["athlete"] if envelope["type"] == "athlete" else envelope["data"][0]
    return NormalizedEvent(record["event_id"], envelope["type"], envelope["user"], data, source["natural_key"],
                           int(source["ordering_timestamp_ms"]), source["sequence"], source.get("idempotency_key"),
                           envelope.get("version", NormalizedEvent.version), reference=source.get("reference"))


def _opened(sink: Sink) -> Sink:
    try:
        sink.open()
    except FatalError:
        raise
    except Exception:  # momentarily unavailable: write() opens again and the taxonomy routes its errors
        pass
    return sink


class _DestinationFn(beam.DoFn):
    """What both delivery DoFns share: the sink's lifecycle, the destination's health, its tallies.

    Input: ``(user_id, UserEvents)``; this destination's share of the acks is ``index`` of
    ``fan_out`` (every destination reads the same element). With a control-plane store
    (``status_url``), a disabled destination receives nothing: its events become dead letters at
    once (``DestinationDisabled``), and a failing streak is recorded so that sustained failure (or
    a 410) disables it.
    """

    STATUS_TTL_S = 5.0

    def __init__(self, target: Target, status_url: str | None = None, index: int = 0, fan_out: int = 1) -> None:
        self.target, self.status_url, self.index, self.fan_out = target, status_url, index, fan_out

    def setup(self) -> None:
        url = self.status_url
        self.status = acquire("destination-status", url, lambda: DestinationStatus(url)) if url else None
        self._disabled_checked_at, self._disabled = 0.0, False
        self.sink = acquire("sink", self.target.sink, lambda: _opened(private_copy(self.target.sink)))
        self.delivery = Delivery(dataclasses.replace(self.target, sink=self.sink),
                                 on_retry=lambda n: self.tally.add(f"retried:{self.target.name}", n))

    def teardown(self) -> None:
        release("sink", self.target.sink, self.sink)
        if self.status is not None:
            release("destination-status", self.status_url, self.status)

    def start_bundle(self) -> None:
        self.tally = Tally()
        if not hasattr(self, "_tombstones"):  # across bundles: a held event's outcome may come in a later one
            self._tombstones: set[str] = set()  # ids of tombstones given to this destination, until their outcome

    def _wanted(self, user_events: UserEvents) -> tuple[list[NormalizedEvent], Acks]:
        events = list(user_events.events)
        if self.target.event_types is not None:
            events = [e for e in events if e.type in self.target.event_types]
            self.tally.add(f"filtered:{self.target.name}", len(user_events.events) - len(events))
        self._tombstones.update(e.event_id for e in events if e.deleted)
        return events, split_acks(user_events.acks, self.fan_out)[self.index]

    def _is_disabled(self) -> bool:
        if self.status is None:
            return False
        if time.monotonic() - self._disabled_checked_at > self.STATUS_TTL_S:
            try:
                self._disabled = self._status().get(self.target.name).disabled
            except (RetryableError, FatalError) as exc:  # the status store is away: deliver, and look again later
                self._status_failed(exc)
            self._disabled_checked_at = time.monotonic()
        return self._disabled

    def _status(self) -> DestinationStatus:
        assert self.status is not None
        if self.status.store.conn is None:
            self.status.open()
        return self.status

    def _status_failed(self, exc: BaseException) -> None:
        """Destination health is advice: a status store that failed is reconnected next time, never fatal."""
        log.warning("destination status of %s unavailable (%s); delivering meanwhile", self.target.name, exc)
        if self.status is not None:
            self.status.close()

    def _disabled_dead_letters(self, events: Sequence[NormalizedEvent]) -> list[dict[str, Any]]:
        error = DestinationDisabled(f"destination {self.target.name} is disabled; enable it, then replay")
        self._tombstones.difference_update(e.event_id for e in events)
        return [delivery_dead_letter(self.target, event, error, 0) for event in events]

    def _outcomes(self, outcomes: Sequence[Delivered | DeadLettered]) -> tuple[list[Any], list[dict[str, Any]]]:
        """Receipts to emit and dead letters to store; notes the destination's health."""
        receipts, dead, last_error = [], [], None
        for outcome in outcomes:
            if isinstance(outcome, Delivered):
                receipts.append((outcome.destination, outcome.event_id))
            else:
                dead.append(outcome.record)
                last_error = outcome.error
        self.tally.add(f"delivered:{self.target.name}", len(receipts))
        if self._tombstones:  # of which tombstones (they are delivered events too)
            self.tally.add(f"deleted:{self.target.name}", sum(1 for _, event_id in receipts
                                                              if event_id in self._tombstones))
            for outcome in outcomes:
                self._tombstones.discard(outcome.event_id if isinstance(outcome, Delivered)
                                         else outcome.record.get("event_id"))
        self._note_health(len(receipts), last_error)
        return receipts, dead

    def _settled(self, dead: list[dict[str, Any]], acks: Acks) -> Iterator[Any]:
        """Dead letters of finished work; its acks end with the last one (stored first) or now."""
        self.tally.add(f"delivery_dead_letter:{self.target.name}", len(dead))
        for number, record in enumerate(dead, start=1):
            yield pvalue.TaggedOutput(DEAD_LETTER, DeadLetterOut(record, acks if number == len(dead) else ()))
        if not dead and acks:
            yield pvalue.TaggedOutput(ENDED, acks)

    def _note_health(self, delivered: int, last_error: BaseException | None) -> None:
        if self.status is None:
            return
        try:
            if delivered:
                self._status().record_success(self.target.name)
            elif last_error is not None and (isinstance(last_error, EndpointGone) or route(last_error) is Route.RETRY):
                status = self._status().record_failure(self.target.name, last_error,
                                                       self.target.retry.disable_after_s)
                self._disabled, self._disabled_checked_at = status.disabled, time.monotonic()
        except (RetryableError, FatalError) as exc:
            self._status_failed(exc)


class DeliverToSink(_DestinationFn):
    """Bounded input: deliver in batches of about ``batch_size`` events across users, retrying in place.

    A bounded run owns its bundle until it is done, so waiting between attempts holds nothing else
    back; each user's events stay in order inside a batch.
    """

    def start_bundle(self) -> None:
        super().start_bundle()
        self.buffer: list[NormalizedEvent] = []
        self.acks: list[Acks] = []

    def process(self, element: tuple[str, UserEvents]) -> Iterator[Any]:
        events, acks = self._wanted(element[1])
        self.buffer.extend(events)
        self.acks.append(acks)
        if len(self.buffer) >= self.target.batch_size:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        # Outputs from finish_bundle must carry their window: bounded delivery runs in the global window.
        for output in [*self._flush(), *self.tally.flush()]:
            if isinstance(output, pvalue.TaggedOutput):
                value = output.value
                yield pvalue.TaggedOutput(output.tag, value if isinstance(value, WindowedValue)
                                          else GlobalWindows.windowed_value(value))
            else:
                yield GlobalWindows.windowed_value(output)

    def _flush(self) -> Iterator[Any]:
        pending, self.buffer = self.buffer, []
        acks, self.acks = join_acks(self.acks), []
        if not pending:
            yield from self._settled([], acks)
            return
        if self._is_disabled():
            yield from self._settled(self._disabled_dead_letters(pending), acks)
            return
        receipts, dead = self._outcomes(list(self.delivery.deliver(pending)))
        yield from receipts
        yield from self._settled(dead, acks)


@dataclass
class _Held:
    """A user's batch waiting at one destination: its events still to deliver, dead letters so far."""

    events: list[NormalizedEvent]
    acks: Acks
    attempts: int = 0
    dead: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Backlog:
    items: list[_Held]
    due: float  # epoch seconds of the next attempt


class _Owners:
    """Which batch of a write an event came from: by the object given to the sink, else by its event id."""

    def __init__(self, items: Iterable[_Held]) -> None:
        self.by_object: dict[int, _Held] = {}
        self.by_id: dict[str, _Held] = {}
        for item in items:
            for event in item.events:
                self.by_object[id(event)] = item
                self.by_id.setdefault(event.event_id, item)

    def of(self, event: NormalizedEvent | None, event_id: str | None) -> _Held:
        found = self.by_object.get(id(event)) if event is not None else None
        if found is None:
            found = self.by_id.get(event_id or "")
        if found is None:
            raise FatalError(f"a destination reported event {event_id}, which it was not given")
        return found


RETRY_STEP_S = 0.25  # retries are due on quarter seconds: the waiting users of one key share a timer's firing


def _retry_at(delay_s: float) -> float:
    """When to try again after ``delay_s``: never earlier, rounded up to ``RETRY_STEP_S`` so that users of one key
    whose retries fall due close together are retried by one firing (each reads the key's held events)."""
    return math.ceil((time.time() + delay_s) / RETRY_STEP_S) * RETRY_STEP_S


def delivery_shard(user_id: str, shards: int) -> str:
    """The delivery key of ``user_id`` among ``shards``: the same on every worker and in every run (CRC-32)."""
    return str(zlib.crc32(user_id.encode()) % shards)


def checked_shards(shards: int | None) -> int | None:
    """``shards`` if it is a usable count of delivery shards (None: the runner's default); else a FatalError."""
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise FatalError(f"delivery shards must be a whole number of at least 1, got {shards!r}: give 1 or more, "
                         "or leave it unset for the runner's default (one key per user; one shard locally)")
    return shards


class ToShards(GroupWithinBundle):
    """(user_id, UserEvents) → (key, ((user_id, UserEvents), ...)): the users of a bundle that share a delivery key,
    together, in the order they came; flushed every ``users_per_flush`` users and at the end of the bundle. The key
    is the user id itself with ``shards=None`` (one key per user), else its ``delivery_shard``. A user's elements keep
    their order (one list, emitted in order)."""

    def __init__(self, shards: int | None, users_per_flush: int = 500) -> None:
        super().__init__(users_per_flush)
        self.shards = checked_shards(shards)

    def process(self, element: tuple[str, UserEvents], window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam) -> Iterator[WindowedValue]:
        key = element[0] if self.shards is None else delivery_shard(element[0], self.shards)
        self.gather(key, (element,), window, timestamp)
        yield from self.gathered()


@dataclass
class _Waiting:
    """A user of a delivery key whose batches wait: when to try again, and the sequence number its next held batch
    gets (its batches in ``DeliverInOrder.HELD`` are delivered in that order)."""

    due: float  # epoch seconds of the next attempt
    next_seq: int = 0


_HeldEntry = tuple[str, int, _Held]  # (user, seq, batch): one entry of DeliverInOrder.HELD


class DeliverInOrder(_DestinationFn):
    """Unbounded input: deliver each user's events as they come, retrying on timers, never out of order.

    Keyed by delivery key (``ToShards``): the user id (one key per user, as before sharing), or a delivery shard.
    An element is the users of a key that came together. Their events go in one write (``batch_size`` events or so
    each), so a destination pays its fixed costs (a transaction, a round trip) once for them all and spreads them
    over its lanes. A retryable failure keeps that user's batch (and every later batch of that user) in the key's
    state and sets a processing-time timer for the policy's backoff (``Retry-After`` honoured); other users, of this
    key too, and other destinations go on meanwhile. When attempts run out, the events are dead-lettered with their
    scheduled redelivery and the user's later events proceed.

    State: ``INDEX`` (small: each waiting user's due time and next sequence number) is read by every element and
    written only when it changes; ``HELD`` (a bag of ``(user, seq, batch)``) is only appended to by elements, so an
    element's cost does not grow with what is held. The timer reads the bag, delivers the due users' batches in
    ``seq`` order and stores what still waits. State written before (``LEGACY``, a user's ``_Backlog`` under the
    user's key) is taken over on the key's next element or timer: its batches come before the user's others; an
    element of that version, ``(user_id, UserEvents)``, is taken as that user's alone.
    """

    INDEX = userstate.ReadModifyWriteStateSpec("waiting", PickleCoder())  # user → _Waiting (users that wait)
    HELD = userstate.BagStateSpec("held", PickleCoder())  # _HeldEntry, appended in process, rewritten by on_retry
    LEGACY = userstate.ReadModifyWriteStateSpec("backlog", PickleCoder())  # the key's _Backlog (per-user keys)
    RETRY = userstate.TimerSpec("retry", TimeDomain.REAL_TIME)  # the earliest due of the key's waiting users

    def process(self, element: tuple[str, Sequence[tuple[str, UserEvents]] | UserEvents],
                index=beam.DoFn.StateParam(INDEX),
                held=beam.DoFn.StateParam(HELD), legacy=beam.DoFn.StateParam(LEGACY),
                retry=beam.DoFn.TimerParam(RETRY)) -> Iterator[Any]:
        waiting: dict[str, _Waiting] = index.read() or {}
        taken_over = self._take_over(element[0], legacy, waiting)
        for entry in taken_over:
            held.add(entry)
        changed = bool(taken_over)
        users = element[1]
        if isinstance(users, UserEvents):  # (user_id, UserEvents): keyed per user before ToShards, across an update
            users = ((element[0], users),)
        fresh: dict[str, list[_Held]] = {}  # users with nothing waiting: their batches of this element, in order
        for user, user_events in users:
            events, acks = self._wanted(user_events)
            if user in waiting:
                state = waiting[user]
                held.add((user, state.next_seq, _Held(events, acks)))
                state.next_seq += 1
                changed = True
                self.tally.add(f"held:{self.target.name}", len(events))
            else:
                fresh.setdefault(user, []).append(_Held(events, acks))
        started: dict[str, _Backlog] = {}  # users of ``fresh`` that wait from now on
        yield from self._deliver_fresh(fresh, started)
        for user, backlog in started.items():
            for seq, item in enumerate(backlog.items):
                held.add((user, seq, item))
            waiting[user] = _Waiting(backlog.due, len(backlog.items))
        if changed or started:
            index.write(waiting)
        if taken_over or started:
            retry.set(Timestamp.of(min(state.due for state in waiting.values())))

    @userstate.on_timer(RETRY)
    def on_retry(self, key=beam.DoFn.KeyParam, index=beam.DoFn.StateParam(INDEX), held=beam.DoFn.StateParam(HELD),
                 legacy=beam.DoFn.StateParam(LEGACY), retry=beam.DoFn.TimerParam(RETRY)) -> Iterator[Any]:
        waiting: dict[str, _Waiting] = index.read() or {}
        taken_over = self._take_over(key, legacy, waiting)
        if not waiting:
            return
        now = time.time()
        due = [user for user, state in waiting.items() if now >= state.due - 0.002]  # a timer may fire early
        if not due:
            for entry in taken_over:
                held.add(entry)
        else:
            batches: dict[str, list[tuple[int, _Held]]] = {}
            for user, seq, item in [*held.read(), *taken_over]:
                batches.setdefault(user, []).append((seq, item))
            for user in batches.keys() - waiting.keys():  # held with no index entry (never made so): due now, not lost
                waiting[user] = _Waiting(now, len(batches[user]))
                due.append(user)
            for user in due:
                items = [item for _, item in sorted(batches.pop(user, []), key=lambda entry: entry[0])]
                next_due = yield from self._drain(items)
                if next_due is None:
                    del waiting[user]
                else:
                    waiting[user] = _Waiting(next_due, len(items))
                    batches[user] = list(enumerate(items))
            held.clear()
            for user, entries in batches.items():
                for seq, item in entries:
                    held.add((user, seq, item))
        if not waiting:
            index.clear()
            return
        if due or taken_over:
            index.write(waiting)
        retry.set(Timestamp.of(min(state.due for state in waiting.values())))

    def _take_over(self, key: str, legacy: Any, waiting: dict[str, _Waiting]) -> list[_HeldEntry]:
        """The batches of state written before (``LEGACY``: ``_Backlog`` of the key's user, or ``{user: _Backlog}``)
        as held entries ordered before the user's others, their users noted as waiting in ``waiting``; the old state
        is cleared. Empty if there is none."""
        old = legacy.read()
        if old is None:
            return []
        legacy.clear()
        backlogs: dict[str, _Backlog] = old if isinstance(old, dict) else {key: old}
        entries: list[_HeldEntry] = []
        for user, backlog in backlogs.items():
            if not backlog.items:
                continue
            first = -len(backlog.items)  # before the seq of anything held since (0 and up)
            entries.extend((user, first + n, item) for n, item in enumerate(backlog.items))
            state = waiting.get(user)
            waiting[user] = _Waiting(backlog.due if state is None else min(state.due, backlog.due),
                                     0 if state is None else state.next_seq)
        return entries

    def _deliver_fresh(self, fresh: dict[str, list[_Held]], started: dict[str, _Backlog]) -> Iterator[Any]:
        """Each user's first batch, all users together in writes of about ``batch_size`` events; a user whose batch
        must be retried starts waiting: noted in ``started`` (its batches from then on, and when to try again); a
        user's later batches of the element follow its first."""
        firsts = [(user, items[0]) for user, items in fresh.items()]
        chunk: list[tuple[str, _Held]] = []
        size = 0
        for number, (user, item) in enumerate(firsts, start=1):
            chunk.append((user, item))
            size += len(item.events)
            if size >= self.target.batch_size or number == len(firsts):
                yield from self._attempt_together(chunk, started)
                chunk, size = [], 0
        for user, items in fresh.items():
            rest = items[1:]
            if not rest:
                continue
            if user in started:
                started[user].items.extend(rest)
                self.tally.add(f"held:{self.target.name}", sum(len(item.events) for item in rest))
                continue
            due = yield from self._drain(rest)
            if due is not None:
                started[user] = _Backlog(rest, due)

    def _attempt_together(self, chunk: list[tuple[str, _Held]], started: dict[str, _Backlog]) -> Iterator[Any]:
        """One write of the first attempt of several users' batches; each batch settles, or its user starts waiting
        (noted in ``started``)."""
        if self._is_disabled():
            for _, item in chunk:
                self._dead_letter_disabled(item)
        elif any(item.events for _, item in chunk):
            owner = _Owners(item for _, item in chunk)
            for _, item in chunk:
                item.attempts += 1
            outcome = self.delivery.attempt([event for _, item in chunk for event in item.events], 1)
            receipts, _ = self._outcomes([*outcome.delivered, *outcome.dead])
            yield from receipts
            for dead in outcome.dead:
                owner.of(dead.event, dead.record.get("event_id")).dead.append(dead.record)
            retry: dict[int, list[NormalizedEvent]] = {}
            for event in outcome.retry:
                retry.setdefault(id(owner.of(event, event.event_id)), []).append(event)
            for _, item in chunk:
                item.events = retry.get(id(item), [])
            if retry:
                due = _retry_at(self.target.retry.delay(1, outcome.retry_after))
                for user, item in chunk:
                    if item.events:
                        started[user] = _Backlog([item], due)
        for _, item in chunk:
            if not item.events:
                yield from self._settled(item.dead, item.acks)

    def _drain(self, items: list[_Held]) -> Generator[Any, None, float | None]:
        """Deliver one user's ``items`` in order, each to its end; returns None when all are settled (``items`` is
        then empty), or when to try again (the first of ``items`` is to be retried)."""
        while items:
            item = items[0]
            if item.events and self._is_disabled():
                self._dead_letter_disabled(item)
            if item.events:
                item.attempts += 1
                outcome = self.delivery.attempt(item.events, item.attempts)
                receipts, dead = self._outcomes([*outcome.delivered, *outcome.dead])
                yield from receipts
                item.dead.extend(dead)
                item.events = outcome.retry
                if item.events:
                    return _retry_at(self.target.retry.delay(item.attempts, outcome.retry_after))
            yield from self._settled(item.dead, item.acks)
            items.pop(0)
        return None

    def _dead_letter_disabled(self, item: _Held) -> None:
        """The destination is disabled: ``item``'s events become its dead letters, none left to deliver."""
        item.dead.extend(self._disabled_dead_letters(item.events))
        item.events = []

    def finish_bundle(self) -> Iterator[Any]:
        yield from self.tally.flush()


class DeliverAll(beam.PTransform):
    """Fan ``(user_id, UserEvents)`` out to every destination, each on its own.

    Returns (receipts, dead letters, ended acks, tallies), each a list with one PCollection per
    destination. Bounded input is delivered in batches across users (``DeliverToSink``), unbounded
    input per user in order with timer-driven retries (``DeliverInOrder``), keyed by ``shards`` delivery shards
    (``ToShards``). Default (None): one shard on the local runner, which runs one step at a time anyway, so that a
    bundle's users share each write; elsewhere one key per user (the user id, as before delivery shards: a runner
    such as Dataflow gives a work item one key, so sharing would rarely happen, while fewer keys would cap
    parallelism and let one user's slow retry hold back its whole shard). Changing the keys (``shards``) across an
    update of a running job re-keys users: a user waiting for a retry then may not hold its new events back.
    """

    def __init__(self, targets: Sequence[Target], status_url: str | None = None, shards: int | None = None) -> None:
        super().__init__()
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise FatalError(f"destination names must be unique, got {names}")
        self.targets, self.status_url, self.shards = list(targets), status_url, checked_shards(shards)

    def expand(self, user_events):
        kind = DeliverToSink if user_events.is_bounded else DeliverInOrder
        if not user_events.is_bounded:
            local = getattr(user_events.pipeline.runner, "executes_local_stream_reads", False)
            shards = 1 if self.shards is None and local else self.shards
            user_events = user_events | "ToShards" >> beam.ParDo(ToShards(shards)).with_input_types(
                tuple[str, Any]).with_output_types(tuple[str, Any])
        receipts, dead, ended, tallies = [], [], [], []
        for index, target in enumerate(self.targets):
            deliver = beam.ParDo(kind(target, self.status_url, index, len(self.targets)))
            out = user_events | f"Deliver[{target.name}]" >> deliver.with_input_types(tuple[str, Any]).with_outputs(
                DEAD_LETTER, ENDED, TALLY, main="delivered")
            receipts.append(out.delivered)
            dead.append(out[DEAD_LETTER])
            ended.append(out[ENDED])
            tallies.append(out[TALLY])
        return receipts, dead, ended, tallies
