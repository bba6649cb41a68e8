"""KafkaSink against the embedded Kafka-protocol broker (Tansu): keys, order, headers, Avro, failures."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from core.errors import FatalError, PermanentError, RetryableError, Route, route
from core.events import NormalizedEvent
from pipelines.embedded import EmbeddedBroker, free_port
from schemas.serde import decode
from sinks.base import SinkResult
from sinks.kafka import KafkaSink, _result, build_producer_config, classify

MakeEvent = Callable[..., NormalizedEvent]
FAST = {"message.timeout.ms": 3000}


@pytest.fixture
def sink(broker: EmbeddedBroker, topic: str) -> Iterator[KafkaSink]:
    kafka = KafkaSink("kafka", broker.bootstrap, topic, producer_config=FAST)
    kafka.open()
    yield kafka
    kafka.close()


def user_events(make_sink_event: MakeEvent, users: int = 4, per_user: int = 3) -> list[NormalizedEvent]:
    """Interleaved events: u0 d0, u1 d0, ..., u0 d1, ...; sequences increase per user."""
    return [make_sink_event(f"u{u}", f"2026-03-{10 + d:02d}", sequence=f"{d:04d}", ordering_timestamp_ms=1000 + d)
            for d in range(per_user) for u in range(users)]


def consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[Message]:
    """Every message of the topic's 3 partitions from the beginning, sorted by (partition, offset)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            messages.append(message)
        extra = consumer.poll(1.0)  # nothing beyond what we expect
        assert extra is None or extra.error(), "more messages than written"
    finally:
        consumer.close()
    assert len(messages) == expected
    return sorted(messages, key=lambda m: (m.partition(), m.offset()))


def headers(message: Message) -> dict[str, str]:
    return {key: value.decode() for key, value in message.headers() or []}


def test_keyed_ordered_with_headers_across_redelivery(sink: KafkaSink, broker: EmbeddedBroker, topic: str,
                                                      make_sink_event: MakeEvent) -> None:
    events = user_events(make_sink_event)
    for _ in range(2):  # forced redelivery of the whole batch
        result = sink.write(events)
        assert result.failures == []
        assert result.delivered == [e.event_id for e in events]

    messages = consume(broker.bootstrap, topic, expected=2 * len(events))
    by_id = {e.event_id: e for e in events}
    assert {headers(m)["event_id"] for m in messages} == set(by_id)
    partitions: dict[str, set[int]] = defaultdict(set)
    order: dict[str, list[str]] = defaultdict(list)
    for message in messages:
        meta = headers(message)
        event = by_id[meta["event_id"]]
        assert meta == {"event_id": event.event_id, "type": "sleep", "user_id": event.user_id, "provider": "OURA",
                        "ordering_timestamp_ms": str(event.ordering_timestamp_ms)}
        assert message.key() == event.user_id.encode()
        assert message.value() == event.body()
        partitions[event.user_id].add(message.partition())
        order[event.user_id].append(event.event_id)
    for user in {e.user_id for e in events}:
        written = [e.event_id for e in events if e.user_id == user]
        assert len(partitions[user]) == 1, f"{user} spread over partitions {partitions[user]}"
        assert order[user] == written + written


def test_avro_value_decodes_as_normalized_event(broker: EmbeddedBroker, topic: str,
                                                make_sink_event: MakeEvent) -> None:
    sink = KafkaSink("kafka-avro", broker.bootstrap, topic, value_format="avro", producer_config=FAST)
    events = [make_sink_event("u1", "2026-03-10"), make_sink_event("u2", "2026-03-11", type="sleep")]
    try:
        result = sink.write(events)
    finally:
        sink.close()
    assert result.failures == [] and len(result.delivered) == 2

    decoded = {headers(m)["event_id"]: decode("normalized_event", m.value())
               for m in consume(broker.bootstrap, topic, expected=2)}
    for event in events:
        record = decoded[event.event_id]
        assert record["event_id"] == event.event_id and record["type"] == "sleep"
        assert record["user"]["user_id"] == event.user_id and record["user"]["provider"] == "OURA"
        assert record["natural_key"] == event.natural_key and record["sequence"] == event.sequence
        assert record["ordering_timestamp_ms"] == event.ordering_timestamp_ms
        assert record["version"] == event.version
        [data] = record["data"]
        assert data["metadata"]["summary_id"] == event.data["metadata"]["summary_id"]
        assert data["sleep_durations_data"]["asleep"]["duration_asleep_state_seconds"] == 3601


def test_a_tombstone_follows_its_data_marked_deleted_in_json_and_avro(broker: EmbeddedBroker, topic: str,
                                                                      make_sink_event: MakeEvent) -> None:
    event = make_sink_event("u1", "2026-03-10")
    tombstone = NormalizedEvent.tombstone(type="sleep", user=event.user, natural_key="u1-2026-03-10",
                                          ordering_timestamp_ms=2_000, sequence="1")
    for value_format in ("json", "avro"):
        sink = KafkaSink(f"kafka-{value_format}", broker.bootstrap, topic, value_format=value_format,
                         producer_config=FAST)
        try:
            assert sink.write([event, tombstone]).delivered == [event.event_id, tombstone.event_id]
        finally:
            sink.close()

    messages = consume(broker.bootstrap, topic, expected=4)
    assert [(headers(m)["event_id"], headers(m).get("deleted")) for m in messages] == [
        (event.event_id, None), (tombstone.event_id, "true")] * 2
    assert json.loads(messages[1].value()) == tombstone.envelope() == {
        "type": "sleep", "user": {"user_id": "u1", "provider": "OURA"}, "version": "2022-03-16",
        "deleted": [{"natural_key": "u1-2026-03-10", "summary_id": "u1-2026-03-10"}]}
    avro = decode("normalized_event", messages[3].value())
    assert (avro["event_id"], avro["data"], avro["deleted"]) == (tombstone.event_id, [], [
        {"natural_key": "u1-2026-03-10", "summary_id": "u1-2026-03-10", "date": None, "start_time": None}])
    assert decode("normalized_event", messages[2].value())["deleted"] is None


def test_avro_rejects_records_outside_the_schema(broker: EmbeddedBroker, topic: str,
                                                 make_sink_event: MakeEvent) -> None:
    sink = KafkaSink("kafka-avro", broker.bootstrap, topic, value_format="avro", producer_config=FAST)
    bad = make_sink_event("u1", "2026-03-10", not_a_field=1)
    good = make_sink_event("u2", "2026-03-10")
    try:
        result = sink.write([bad, good])
    finally:
        sink.close()
    assert result.delivered == [good.event_id]
    [failure] = result.failures
    assert failure.event is bad and isinstance(failure.error, PermanentError)
    assert "not_a_field" in str(failure.error)


def test_message_too_large_is_permanent_and_blocks_nothing(broker: EmbeddedBroker, topic: str,
                                                           make_sink_event: MakeEvent) -> None:
    sink = KafkaSink("kafka", broker.bootstrap, topic, producer_config={**FAST, "message.max.bytes": 2000})
    big = make_sink_event("u1", "2026-03-10", padding="x" * 5000)
    later = make_sink_event("u1", "2026-03-11")
    try:
        result = sink.write([big, later])
    finally:
        sink.close()
    assert result.delivered == [later.event_id]  # a dead-lettered event does not hold back the user's next one
    [failure] = result.failures
    assert failure.event is big and isinstance(failure.error, PermanentError)
    assert route(failure.error) is Route.DEAD_LETTER


def test_broker_down_reports_retryable_and_nothing_delivered(make_sink_event: MakeEvent) -> None:
    events = user_events(make_sink_event, users=2, per_user=2)
    with EmbeddedBroker() as doomed:
        doomed.create_topic("down", partitions=3)
        sink = KafkaSink("kafka", doomed.bootstrap, "down", producer_config=FAST)
        assert sink.write(events[:1]).delivered == [events[0].event_id]  # connected and working
        doomed.stop()
        started = time.monotonic()
        result = sink.write(events)
    sink._producer = None  # the broker is gone: nothing to flush
    assert result.delivered == []
    assert [f.event for f in result.failures] == events
    assert all(isinstance(f.error, RetryableError) for f in result.failures)
    assert time.monotonic() - started < 3 + 10 + 5  # bounded by message.timeout.ms + flush margin


def test_closed_port_reports_retryable(make_sink_event: MakeEvent) -> None:
    sink = KafkaSink("kafka", f"127.0.0.1:{free_port()}", "nowhere", producer_config=FAST)
    events = user_events(make_sink_event, users=2, per_user=1)
    result = sink.write(events)
    sink._producer = None
    assert result.delivered == []
    assert len(result.failures) == 2 and all(isinstance(f.error, RetryableError) for f in result.failures)


@pytest.mark.parametrize("overrides", [
    {"enable.idempotence": False}, {"acks": "1"}, {"acks": 0}, {"request.required.acks": "1"},
    {"max.in.flight.requests.per.connection": 6}, {"retries": 0}, {"partitioner": "random"},
    {"bootstrap.servers": "elsewhere:9092"}, {"transactional.id": "x"}, {"error_cb": print},
])
def test_config_that_breaks_order_or_idempotence_is_fatal(overrides: dict) -> None:
    with pytest.raises(FatalError):
        KafkaSink("kafka", "127.0.0.1:9092", "t", producer_config=overrides)


def test_config_defaults_and_allowed_overrides() -> None:
    config = build_producer_config("127.0.0.1:9092", {"linger.ms": 20, "acks": -1, "compression.type": "zstd"})
    assert config["enable.idempotence"] is True and config["max.in.flight.requests.per.connection"] == 5
    assert config["acks"] == -1 and config["linger.ms"] == 20 and config["compression.type"] == "zstd"
    with pytest.raises(FatalError):
        KafkaSink("kafka", "127.0.0.1:9092", "t", value_format="protobuf")
    with pytest.raises(FatalError):
        KafkaSink("kafka", "", "t")


@pytest.mark.parametrize(("code", "expected"), [
    (KafkaError._MSG_TIMED_OUT, RetryableError), (KafkaError.REQUEST_TIMED_OUT, RetryableError),
    (KafkaError._TRANSPORT, RetryableError), (KafkaError.NOT_ENOUGH_REPLICAS, RetryableError),
    (KafkaError._FATAL, RetryableError),
    (KafkaError.MSG_SIZE_TOO_LARGE, PermanentError), (KafkaError.TOPIC_EXCEPTION, PermanentError),
    (KafkaError.RECORD_LIST_TOO_LARGE, PermanentError),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, FatalError), (KafkaError.CLUSTER_AUTHORIZATION_FAILED, FatalError),
    (KafkaError.SASL_AUTHENTICATION_FAILED, FatalError), (KafkaError._UNKNOWN_TOPIC, FatalError),
    (KafkaError.UNKNOWN_TOPIC_OR_PART, FatalError),
])
def test_classification(code: int, expected: type) -> None:
    assert type(classify(KafkaError(code))) is expected


def test_timeouts_after_an_authentication_failure_are_fatal() -> None:
    error = classify(KafkaError(KafkaError._MSG_TIMED_OUT), auth_failure=KafkaError(KafkaError._AUTHENTICATION))
    assert isinstance(error, FatalError)


def test_acknowledged_events_behind_a_retryable_failure_are_resent(make_sink_event: MakeEvent) -> None:
    e1, e2, other = make_sink_event("u1", "2026-03-10"), make_sink_event("u1", "2026-03-11"), make_sink_event("u2")
    result: SinkResult = _result([e1, e2, other], {0: RetryableError("timed out"), 1: None, 2: None})
    assert result.delivered == [other.event_id]
    errors = {f.event.event_id: f.error for f in result.failures}
    assert isinstance(errors[e2.event_id], RetryableError) and "blocked behind" in str(errors[e2.event_id])


def test_pickles_without_the_producer(sink: KafkaSink, make_sink_event: MakeEvent) -> None:
    sink.write([make_sink_event()])
    clone = pickle.loads(pickle.dumps(sink))
    assert clone._producer is None and clone.config == sink.config
    try:
        assert clone.write([make_sink_event("u9")]).failures == []
    finally:
        clone.close()


def test_a_number_no_double_holds_is_dead_lettered_alone(broker: EmbeddedBroker, topic: str,
                                                          make_sink_event: MakeEvent) -> None:
    """An integer of 400 digits in a double field overflows the Avro encoder: that event alone is dead-lettered."""
    sink = KafkaSink("kafka-avro", broker.bootstrap, topic, value_format="avro", producer_config=FAST)
    huge = make_sink_event("u1", "2026-03-10", heart_rate_data={"summary": {"avg_hr_bpm": 10**400}})
    good = make_sink_event("u1", "2026-03-11")
    try:
        result = sink.write([huge, good])
    finally:
        sink.close()
    assert result.delivered == [good.event_id]
    [failure] = result.failures
    assert failure.event is huge and isinstance(failure.error, PermanentError) and "Overflow" in str(failure.error)
    assert route(failure.error) is Route.DEAD_LETTER


def test_an_overflow_is_dead_lettered_not_retried() -> None:
    assert route(OverflowError("int too large to convert to float")) is Route.DEAD_LETTER
    assert route(ZeroDivisionError("division by zero")) is Route.DEAD_LETTER
