"""The keyed state of streaming delivery (``DeliverInOrder``), driven directly against a real webhook receiver.

State and timer are stand-ins that encode every value with the state's coder (as a runner stores it) and count what
is read and written; the bag hands its entries back in reverse, as a runner whose bags are unordered may. What is
checked: an element's state cost does not grow with the events held, the bag is never read by an element, a user's
held batches are delivered in order after an outage with every ack ended once, state written by the per-user version
(``_Backlog`` under "backlog") is taken over, and unusable delivery shard counts are refused.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from core.errors import FatalError
from core.events import NormalizedEvent
from core.raw import AckToken
from pipelines.normalize import FileSource, NormalizeJob
from pipelines.webhook_receiver import WebhookReceiver
from sinks.policy import RetryPolicy, Target
from sinks.webhook import WebhookSink
from transforms.acks import Acks, root_acks
from transforms.deliver import DeliverAll, DeliverInOrder, ToShards, _Backlog, _Held
from transforms.normalize import UserEvents
from transforms.outputs import DEAD_LETTER, ENDED

QUICK = RetryPolicy(max_attempts=10**6, initial_delay_s=0.05, max_delay_s=0.05, jitter=0.0)


class CountedValue:
    """Read-modify-write state as a runner keeps it: encoded; bytes read and written are counted."""

    coder = PickleCoder()

    def __init__(self) -> None:
        self.encoded: bytes | None = None
        self.read_bytes = self.written_bytes = self.writes = 0

    def read(self) -> Any:
        if self.encoded is None:
            return None
        self.read_bytes += len(self.encoded)
        return self.coder.decode(self.encoded)

    def write(self, value: Any) -> None:
        self.encoded = self.coder.encode(value)
        self.written_bytes += len(self.encoded)
        self.writes += 1

    def clear(self) -> None:
        self.encoded = None


class CountedBag:
    """Bag state as a runner keeps it: encoded entries, handed back in reverse (bags are unordered)."""

    coder = PickleCoder()

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.reads = self.read_bytes = self.added_bytes = 0

    def read(self) -> Iterable[Any]:
        self.reads += 1
        self.read_bytes += sum(len(e) for e in self.entries)
        return [self.coder.decode(e) for e in reversed(self.entries)]

    def add(self, value: Any) -> None:
        encoded = self.coder.encode(value)
        self.entries.append(encoded)
        self.added_bytes += len(encoded)

    def clear(self) -> None:
        self.entries = []


class Timer:
    def __init__(self) -> None:
        self.at: float | None = None

    def set(self, timestamp: Any) -> None:
        self.at = timestamp.micros / 1e6


class Key:
    """One delivery key's state, as the DoFn's parameters."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.index, self.held, self.legacy, self.retry = CountedValue(), CountedBag(), CountedValue(), Timer()

    def state(self) -> dict[str, Any]:
        return {"index": self.index, "held": self.held, "legacy": self.legacy, "retry": self.retry}


class Outputs:
    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.dead: list[dict[str, Any]] = []
        self.ended: list[Acks] = []

    def take(self, outputs: Iterator[Any]) -> None:
        for output in outputs:
            if not isinstance(output, pvalue.TaggedOutput):
                self.delivered.append(output[1])
            elif output.tag == ENDED:
                self.ended.append(output.value)
            elif output.tag == DEAD_LETTER:
                self.dead.append(output.value.record)
                if output.value.acks:
                    self.ended.append(output.value.acks)


def event(user: str, n: int, pad: int = 0) -> NormalizedEvent:
    return NormalizedEvent.create(
        type="daily", user={"user_id": user, "provider": "OURA"}, natural_key=f"{user}-{n}",
        ordering_timestamp_ms=n, sequence=f"{n:05d}", raw_idempotency_key=f"raw-{user}-{n}",
        data={"metadata": {"start_time": "2024-01-01T00:00:00+00:00", "end_time": "2024-01-02T00:00:00+00:00",
                           "upload_type": 1}, "note": "x" * pad})


class Feed:
    """Users' events, one message (and ack) each, in the order they are made."""

    def __init__(self) -> None:
        self.position = 0
        self.acks: list[Acks] = []
        self.sent: dict[str, list[str]] = {}

    def of(self, user: str, pad: int = 0) -> tuple[str, UserEvents]:
        self.position += 1
        made = event(user, self.position, pad)
        acks = root_acks(AckToken("offset", "raw:0", self.position, self.position - 1))
        self.acks.append(acks)
        self.sent.setdefault(user, []).append(made.event_id)
        return user, UserEvents((made,), acks)


@pytest.fixture
def receiver(webhook_secret):
    with WebhookReceiver(webhook_secret) as running:
        yield running


def deliverer(receiver: WebhookReceiver, policy: RetryPolicy = QUICK) -> DeliverInOrder:
    fn = DeliverInOrder(Target(WebhookSink("hook", receiver.url, receiver.secret), policy, batch_size=200))
    fn.setup()
    fn.start_bundle()
    return fn


def fire_when_due(fn: DeliverInOrder, key: Key, out: Outputs) -> None:
    assert key.retry.at is not None
    time.sleep(max(0.0, key.retry.at - time.time()) + 0.01)
    out.take(fn.on_retry(key=key.key, **key.state()))


def test_an_elements_state_cost_does_not_grow_with_what_is_held(receiver):
    fn, key, feed, out = deliverer(receiver), Key("0"), Feed(), Outputs()
    users = [f"user-{n}" for n in range(10)]
    receiver.fail_next(10**6, 503)  # the destination is down
    cost: list[int] = []
    for _ in range(60):
        for user in users:
            before = key.index.read_bytes + key.index.written_bytes + key.held.read_bytes + key.held.added_bytes
            out.take(fn.process((key.key, (feed.of(user, pad=500),)), **key.state()))
            cost.append(key.index.read_bytes + key.index.written_bytes + key.held.read_bytes + key.held.added_bytes
                        - before)
    held_bytes = sum(len(e) for e in key.held.entries)
    assert len(key.held.entries) == 600 and held_bytes > 500_000 and key.held.reads == 0  # appended, never read
    early, late = cost[20:40], cost[-20:]  # 20-40 and 580-600 events held
    assert max(late) <= 1.1 * max(early) and max(late) < 5_000  # the index and this element's batch, not the backlog
    assert out.delivered == [] and out.ended == []

    receiver.clear_failures()
    for _ in range(4):  # users whose first failure fell in another quarter second are due at a later firing
        fire_when_due(fn, key, out)
        if key.index.encoded is None:
            break
    assert key.index.encoded is None and key.held.entries == []
    for user in users:
        assert receiver.order_for(user) == feed.sent[user]
    assert Counter(out.ended) == Counter(feed.acks) and len(set(feed.acks)) == len(feed.acks)  # each once
    assert receiver.duplicates == 0 and out.dead == []
    fn.teardown()


def test_a_waiting_users_new_events_wait_behind_its_held_ones_and_others_go_on(receiver):
    fn, key, feed, out = deliverer(receiver), Key("0"), Feed(), Outputs()
    receiver.fail_next(1, 503)
    out.take(fn.process((key.key, (feed.of("a"),)), **key.state()))  # refused: a waits
    out.take(fn.process((key.key, (feed.of("a"), feed.of("b"), feed.of("a"))), **key.state()))
    assert receiver.order_for("b") == feed.sent["b"] and receiver.order_for("a") == []
    assert len(out.ended) == 1 and key.held.reads == 0
    fire_when_due(fn, key, out)
    assert receiver.order_for("a") == feed.sent["a"]
    assert Counter(out.ended) == Counter(feed.acks) and key.index.encoded is None and key.held.entries == []
    fn.teardown()


def test_state_written_by_per_user_delivery_is_taken_over_before_new_events(receiver):
    """Per-user delivery kept a user's batches as one ``_Backlog`` under "backlog" with the user as key."""
    fn, key, feed, out = deliverer(receiver), Key("a"), Feed(), Outputs()
    old = [feed.of("a"), feed.of("a")]
    key.legacy.write(_Backlog([_Held(list(ue.events), ue.acks, attempts=1) for _, ue in old], time.time() + 0.05))
    out.take(fn.process((key.key, (feed.of("a"),)), **key.state()))  # the new event waits behind the old ones
    assert receiver.received == 0 and key.legacy.encoded is None and key.retry.at is not None
    fire_when_due(fn, key, out)
    assert receiver.order_for("a") == feed.sent["a"]
    assert out.ended == feed.acks  # in order, each once
    assert key.index.encoded is None and key.held.entries == [] and key.legacy.encoded is None
    fn.teardown()


def test_an_element_of_the_per_user_version_in_flight_is_delivered_in_order(receiver):
    fn, key, feed, out = deliverer(receiver), Key("a"), Feed(), Outputs()
    receiver.fail_next(1, 503)
    out.take(fn.process(feed.of("a"), **key.state()))  # (user_id, UserEvents), as shuffled before ToShards
    out.take(fn.process(feed.of("a"), **key.state()))
    assert receiver.order_for("a") == [] and out.ended == []
    fire_when_due(fn, key, out)
    assert receiver.order_for("a") == feed.sent["a"] and out.ended == feed.acks
    fn.teardown()


def test_a_per_user_timer_takes_over_the_old_state_and_keeps_its_attempts(receiver):
    fn = deliverer(receiver, RetryPolicy(max_attempts=3, initial_delay_s=0.05, max_delay_s=0.05, jitter=0.0))
    key, feed, out = Key("a"), Feed(), Outputs()
    (_, first), (_, second) = feed.of("a"), feed.of("a")
    key.legacy.write(_Backlog([_Held(list(first.events), first.acks, attempts=2),
                               _Held(list(second.events), second.acks)], time.time() - 1))
    receiver.fail_next(1, 503)  # the first batch's third attempt, its last: dead-lettered
    out.take(fn.on_retry(key=key.key, **key.state()))
    assert [record["event_id"] for record in out.dead] == feed.sent["a"][:1] and out.dead[0]["attempts"] == 3
    assert receiver.order_for("a") == feed.sent["a"][1:]
    assert out.ended == feed.acks and key.index.encoded is None and key.legacy.encoded is None
    fn.teardown()


def test_timer_that_fires_early_changes_no_state(receiver):
    fn = deliverer(receiver, RetryPolicy(max_attempts=5, initial_delay_s=60, max_delay_s=60, jitter=0.0))
    key, feed, out = Key("0"), Feed(), Outputs()
    receiver.fail_next(1, 503)
    out.take(fn.process((key.key, (feed.of("a"),)), **key.state()))
    writes, held = key.index.writes, list(key.held.entries)
    out.take(fn.on_retry(key=key.key, **key.state()))
    assert key.index.writes == writes and key.held.entries == held and key.held.reads == 0 and out.ended == []
    fn.teardown()


@pytest.mark.parametrize("shards", [0, -1, 1.5, True])
def test_unusable_delivery_shard_counts_are_refused(tmp_path, shards):
    target = Target(WebhookSink("hook", "https://example.invalid/hook", "whsec_" + "A" * 44))
    for make in (lambda: ToShards(shards), lambda: DeliverAll([target], shards=shards),
                 lambda: NormalizeJob(FileSource("unused"), [target], str(tmp_path), delivery_shards=shards)):
        with pytest.raises(FatalError, match="at least 1"):
            make()


def test_without_shards_each_user_is_its_own_key():
    to_shards = ToShards(None)
    to_shards.start_bundle()
    feed = Feed()
    for element in (feed.of("a"), feed.of("b"), feed.of("a")):
        assert list(to_shards.process(element, GlobalWindow(), Timestamp(0))) == []
    keyed = {out.value[0]: [user for user, _ in out.value[1]] for out in to_shards.finish_bundle()}
    assert keyed == {"a": ["a", "a"], "b": ["b"]}


def test_a_firing_for_one_user_keeps_the_held_batches_of_users_not_due_yet(receiver):
    """Two users of one key wait with different due times: the firing for the first delivers it and keeps the second's
    held batches (re-added to the bag), which the next firing delivers, in order, each ack ended once."""
    fn = deliverer(receiver, RetryPolicy(max_attempts=10**6, initial_delay_s=0.3, max_delay_s=0.3, jitter=0.0))
    key, feed, out = Key("0"), Feed(), Outputs()
    receiver.fail_next(1, 503)
    out.take(fn.process((key.key, (feed.of("a"),)), **key.state()))  # a waits
    time.sleep(0.3)  # b's retry falls due a step or more after a's
    receiver.fail_next(1, 503)
    out.take(fn.process((key.key, (feed.of("b"), feed.of("a"))), **key.state()))  # b waits; a's new event is held
    fire_when_due(fn, key, out)  # a is due, b is not
    assert receiver.order_for("a") == feed.sent["a"] and receiver.order_for("b") == []
    assert [entry[0] for entry in (key.held.coder.decode(e) for e in key.held.entries)] == ["b"]
    out.take(fn.process((key.key, (feed.of("b"),)), **key.state()))  # behind b's held one
    fire_when_due(fn, key, out)
    assert receiver.order_for("b") == feed.sent["b"]
    assert Counter(out.ended) == Counter(feed.acks) and len(out.ended) == len(feed.acks)
    assert key.index.encoded is None and key.held.entries == []
    fn.teardown()


def test_old_state_taken_over_by_an_early_firing_is_delivered_first(receiver):
    """A timer fires before the old state's due time: its batches move into the bag (nothing is due yet), new events
    wait behind them, and the next firing delivers all of them in order."""
    fn, key, feed, out = deliverer(receiver), Key("a"), Feed(), Outputs()
    old = [feed.of("a"), feed.of("a")]
    key.legacy.write(_Backlog([_Held(list(ue.events), ue.acks, attempts=1) for _, ue in old], time.time() + 0.3))
    out.take(fn.on_retry(key=key.key, **key.state()))  # early: nothing due
    assert key.legacy.encoded is None and len(key.held.entries) == 2 and receiver.received == 0
    out.take(fn.process((key.key, (feed.of("a"),)), **key.state()))
    assert receiver.received == 0
    fire_when_due(fn, key, out)
    assert receiver.order_for("a") == feed.sent["a"] and out.ended == feed.acks
    assert key.index.encoded is None and key.held.entries == []
    fn.teardown()


def test_held_batches_of_a_user_missing_from_the_index_are_delivered_not_kept_forever(receiver):
    """Should the bag ever hold a user the index does not name, the next firing delivers that user's batches."""
    fn, key, feed, out = deliverer(receiver), Key("0"), Feed(), Outputs()
    receiver.fail_next(1, 503)
    out.take(fn.process((key.key, (feed.of("a"),)), **key.state()))  # a waits: the index names it, the timer is set
    _, orphan = feed.of("z")
    key.held.add(("z", 0, _Held(list(orphan.events), orphan.acks)))
    fire_when_due(fn, key, out)
    assert receiver.order_for("z") == feed.sent["z"] and receiver.order_for("a") == feed.sent["a"]
    assert Counter(out.ended) == Counter(feed.acks) and key.index.encoded is None and key.held.entries == []
    fn.teardown()


def test_retries_fall_due_on_steps_never_early():
    from transforms.deliver import RETRY_STEP_S, _retry_at

    for delay in (0.0, 0.01, 0.2, 1.0, 4.9):
        before = time.time()
        at = _retry_at(delay)
        assert before + delay <= at <= time.time() + delay + RETRY_STEP_S
        assert abs(at / RETRY_STEP_S - round(at / RETRY_STEP_S)) < 1e-6
