"""PubSubSink driven through the real google-cloud-pubsub client against the in-process gRPC test server."""

from __future__ import annotations

import pickle
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from core.errors import FatalError, PermanentError, RetryableError, Route, route
from core.events import NormalizedEvent
from pipelines.embedded import free_port
from sinks.pubsub import PubSubSink

try:  # pytest puts tests/ on sys.path while tests/ has no __init__.py ...
    from servers.pubsub_server import PubSubTestServer
except ImportError:  # ... and the repository root once it has one
    from tests.servers.pubsub_server import PubSubTestServer

MakeEvent = Callable[..., NormalizedEvent]
PROJECT = "healthflow-test"
TOPIC = f"projects/{PROJECT}/topics/events"
SUBSCRIPTION = f"projects/{PROJECT}/subscriptions/events-sub"


@pytest.fixture
def server() -> Iterator[PubSubTestServer]:
    with PubSubTestServer() as running:
        yield running


@pytest.fixture
def subscriber(server: PubSubTestServer) -> Iterator[pubsub_v1.SubscriberClient]:
    """Topic and ordered subscription created through the real clients; yields the subscriber."""
    publisher = pubsub_v1.PublisherClient(
        transport=PublisherGrpcTransport(host=server.host, channel=grpc.insecure_channel(server.host)))
    publisher.create_topic(name=TOPIC)
    publisher.transport.close()
    client = pubsub_v1.SubscriberClient(
        transport=SubscriberGrpcTransport(host=server.host, channel=grpc.insecure_channel(server.host)))
    client.create_subscription(request={"name": SUBSCRIPTION, "topic": TOPIC, "enable_message_ordering": True})
    yield client
    client.close()


@pytest.fixture
def sink(server: PubSubTestServer, subscriber: pubsub_v1.SubscriberClient) -> Iterator[PubSubSink]:
    pubsub = PubSubSink("pubsub", PROJECT, "events", emulator_host=server.host, timeout_s=5.0)
    pubsub.open()
    yield pubsub
    pubsub.close()


def user_events(make_sink_event: MakeEvent, users: int = 3, per_user: int = 3) -> list[NormalizedEvent]:
    return [make_sink_event(f"u{u}", f"2026-03-{10 + d:02d}", sequence=f"{d:04d}", ordering_timestamp_ms=1000 + d)
            for d in range(per_user) for u in range(users)]


def pull_all(subscriber: pubsub_v1.SubscriberClient, expected: int, timeout_s: float = 10.0) -> list[Any]:
    """Pull and acknowledge until ``expected`` messages arrived; then check nothing else is pending."""
    messages: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < expected and time.monotonic() < deadline:
        response = subscriber.pull(subscription=SUBSCRIPTION, max_messages=100, timeout=5)
        if response.received_messages:
            subscriber.acknowledge(subscription=SUBSCRIPTION,
                                   ack_ids=[r.ack_id for r in response.received_messages])
        messages.extend(r.message for r in response.received_messages)
    assert len(messages) == expected
    assert not subscriber.pull(subscription=SUBSCRIPTION, max_messages=100, timeout=5).received_messages
    return messages


def errors_by_id(result) -> dict[str, BaseException]:
    return {failure.event.event_id: failure.error for failure in result.failures}


def test_publishes_ordered_with_attributes_across_redelivery(sink: PubSubSink, subscriber: pubsub_v1.SubscriberClient,
                                                             make_sink_event: MakeEvent) -> None:
    events = user_events(make_sink_event)
    for _ in range(2):  # forced redelivery
        result = sink.write(events)
        assert result.failures == []
        assert result.delivered == [e.event_id for e in events]

    messages = pull_all(subscriber, expected=2 * len(events))
    by_id = {e.event_id: e for e in events}
    assert {m.attributes["event_id"] for m in messages} == set(by_id)
    order: dict[str, list[str]] = defaultdict(list)
    for message in messages:
        event = by_id[message.attributes["event_id"]]
        assert dict(message.attributes) == {"event_id": event.event_id, "type": "sleep", "user_id": event.user_id,
                                            "provider": "OURA",
                                            "ordering_timestamp_ms": str(event.ordering_timestamp_ms)}
        assert message.ordering_key == event.user_id
        assert message.data == event.body()
        assert message.message_id
        order[event.user_id].append(event.event_id)
    for user in {e.user_id for e in events}:
        written = [e.event_id for e in events if e.user_id == user]
        assert order[user] == written + written


def test_unavailable_fails_the_user_then_resumes(sink: PubSubSink, server: PubSubTestServer,
                                                 subscriber: pubsub_v1.SubscriberClient,
                                                 make_sink_event: MakeEvent) -> None:
    events = user_events(make_sink_event)
    u1 = [e for e in events if e.user_id == "u1"]
    server.fail_publish(grpc.StatusCode.UNAVAILABLE, times=1, ordering_key="u1")

    result = sink.write(events)

    assert result.delivered == [e.event_id for e in events if e.user_id != "u1"]
    errors = errors_by_id(result)
    assert list(errors) == [e.event_id for e in u1]
    assert all(isinstance(error, RetryableError) for error in errors.values())
    assert "UNAVAILABLE" in str(errors[u1[0].event_id])
    assert all("blocked behind an earlier failure" in str(errors[e.event_id]) for e in u1[1:])
    assert not [m for m in server.messages(TOPIC) if m.ordering_key == "u1"]

    newer = make_sink_event("u1", "2026-03-20", sequence="0009")
    retry = sink.write([*u1, newer])  # the paused ordering key is resumed first
    assert retry.failures == [] and retry.delivered == [e.event_id for e in [*u1, newer]]

    pulled = [m.attributes["event_id"] for m in pull_all(subscriber, expected=len(events) + 1)
              if m.ordering_key == "u1"]
    assert pulled == [e.event_id for e in [*u1, newer]]


def test_unknown_topic_is_fatal(server: PubSubTestServer, subscriber: pubsub_v1.SubscriberClient,
                                make_sink_event: MakeEvent) -> None:
    sink = PubSubSink("pubsub", PROJECT, "no-such-topic", emulator_host=server.host, timeout_s=5.0)
    events = user_events(make_sink_event, users=2, per_user=2)
    try:
        result = sink.write(events)
    finally:
        sink.close()
    assert result.delivered == []
    errors = errors_by_id(result)
    firsts = [events[0], events[1]]
    assert all(isinstance(errors[e.event_id], FatalError) and route(errors[e.event_id]) is Route.FAIL for e in firsts)
    assert all(isinstance(errors[e.event_id], RetryableError) for e in events[2:])


@pytest.mark.parametrize(("code", "expected"), [
    (grpc.StatusCode.DEADLINE_EXCEEDED, RetryableError), (grpc.StatusCode.RESOURCE_EXHAUSTED, RetryableError),
    (grpc.StatusCode.ABORTED, RetryableError), (grpc.StatusCode.INTERNAL, RetryableError),
    (grpc.StatusCode.PERMISSION_DENIED, FatalError), (grpc.StatusCode.UNAUTHENTICATED, FatalError),
    (grpc.StatusCode.INVALID_ARGUMENT, PermanentError), (grpc.StatusCode.FAILED_PRECONDITION, PermanentError),
])
def test_classification_of_server_errors(sink: PubSubSink, server: PubSubTestServer, make_sink_event: MakeEvent,
                                         code: grpc.StatusCode, expected: type) -> None:
    server.fail_publish(code, times=1, ordering_key="u1")
    failing, other = make_sink_event("u1"), make_sink_event("u2")
    result = sink.write([failing, other])
    assert result.delivered == [other.event_id]
    assert type(errors_by_id(result)[failing.event_id]) is expected
    assert sink.write([failing]).delivered == [failing.event_id]  # resumed after the failure


def test_message_too_large_is_permanent_and_blocks_nothing(sink: PubSubSink, server: PubSubTestServer,
                                                           make_sink_event: MakeEvent) -> None:
    big = make_sink_event("u1", "2026-03-10", padding="x" * 10_000_001)
    later = make_sink_event("u1", "2026-03-11")
    result = sink.write([big, later])
    assert result.delivered == [later.event_id]  # never handed to the client: the ordering key is not paused
    [failure] = result.failures
    assert failure.event is big and isinstance(failure.error, PermanentError)
    assert [m.attributes["event_id"] for m in server.messages(TOPIC)] == [later.event_id]


def test_unreachable_server_is_retryable(make_sink_event: MakeEvent) -> None:
    sink = PubSubSink("pubsub", PROJECT, "events", emulator_host=f"127.0.0.1:{free_port()}", timeout_s=2.0)
    events = user_events(make_sink_event, users=2, per_user=2)
    try:
        result = sink.write(events)
    finally:
        sink.close()
    assert result.delivered == []
    assert len(result.failures) == len(events)
    assert all(isinstance(f.error, RetryableError) for f in result.failures)


def test_uses_pubsub_emulator_host_from_the_environment(server: PubSubTestServer,
                                                        subscriber: pubsub_v1.SubscriberClient,
                                                        make_sink_event: MakeEvent,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", server.host)
    sink = PubSubSink("pubsub", PROJECT, "events", timeout_s=5.0)
    event = make_sink_event()
    try:
        assert sink.write([event]).delivered == [event.event_id]
    finally:
        sink.close()
    [message] = pull_all(subscriber, expected=1)
    assert message.attributes["event_id"] == event.event_id


def test_config_errors_are_fatal() -> None:
    for args in [("", "t"), ("p", ""), ("p", "projects/p/topics/t")]:
        with pytest.raises(FatalError):
            PubSubSink("pubsub", *args)


def test_pickles_without_the_client(sink: PubSubSink, make_sink_event: MakeEvent) -> None:
    sink.write([make_sink_event()])
    clone = pickle.loads(pickle.dumps(sink))
    assert clone._client is None and clone.topic_path == sink.topic_path
    try:
        assert clone.write([make_sink_event("u9")]).failures == []
    finally:
        clone.close()
