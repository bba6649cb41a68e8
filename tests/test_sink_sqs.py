"""SqsSink against a real moto_server process, with boto3 exactly as against AWS."""

from __future__ import annotations

import json
import pickle
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import boto3
import pytest
import requests

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.large_payloads import LargePayloadS3
from sinks.s3 import EndpointUnreachable
from sinks.sqs import SqsSink

try:  # `python -m pytest` puts the repo root on sys.path, plain `pytest` puts tests/ there
    from tests.servers.moto import MOTO_REGION, free_port, moto_endpoint
except ModuleNotFoundError:
    from servers.moto import MOTO_REGION, free_port, moto_endpoint  # noqa: F401 - pytest fixture

Factory = Callable[..., NormalizedEvent]


@pytest.fixture
def sqs(moto_endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=moto_endpoint, region_name=MOTO_REGION)


@pytest.fixture
def fifo_url(sqs: Any) -> str:
    return sqs.create_queue(QueueName=f"hf-{uuid.uuid4().hex[:10]}.fifo",
                            Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"})["QueueUrl"]


@pytest.fixture
def standard_url(sqs: Any) -> str:
    return sqs.create_queue(QueueName=f"hf-{uuid.uuid4().hex[:10]}")["QueueUrl"]


def make_sink(endpoint: str, queue_url: str, **options: Any) -> SqsSink:
    sink = SqsSink("sqs-test", queue_url, endpoint_url=endpoint, region=MOTO_REGION, **options)
    sink.open()
    return sink


def drain(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Receive (and delete) every message, in the order SQS hands them out."""
    received: list[dict[str, Any]] = []
    empty = 0
    while empty < 2:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                       MessageAttributeNames=["All"], MessageSystemAttributeNames=["All"]
                                       ).get("Messages", [])
        if not messages:
            empty += 1
            continue
        received.extend(messages)
        sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])
    return received


def attr(message: dict[str, Any], name: str) -> str:
    return message["MessageAttributes"][name]["StringValue"]


def interleaved_events(make_sink_event: Factory, users: int = 4, per_user: int = 3) -> list[NormalizedEvent]:
    return [make_sink_event(f"user-{u}", f"2026-03-1{d}", ordering_timestamp_ms=1_000 + d, sequence=str(d),
                            type=("sleep", "daily")[(u + d) % 2])
            for d in range(per_user) for u in range(users)]


def count_batches(sink: SqsSink) -> list[list[dict[str, Any]]]:
    calls: list[list[dict[str, Any]]] = []
    sink._sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch",
                                   lambda params, **_: calls.append(list(params["Entries"])))
    return calls


def test_fifo_dedup_order_and_attributes(moto_endpoint: str, sqs: Any, fifo_url: str,
                                         make_sink_event: Factory) -> None:
    events = interleaved_events(make_sink_event, users=12, per_user=3)
    sink = make_sink(moto_endpoint, fifo_url)
    calls = count_batches(sink)
    for _ in range(2):  # forced redelivery inside SQS's 5-minute deduplication window
        result = sink.write(events)
        assert not result.failures, result.failures
        assert sorted(result.delivered) == sorted(e.event_id for e in events)
    for entries in calls:  # <= 10 per call, never two events of one user in one call
        assert len(entries) <= 10
        assert len({e["MessageGroupId"] for e in entries}) == len(entries)

    received = drain(sqs, fifo_url)
    assert Counter(attr(m, "event_id") for m in received) == Counter({e.event_id: 1 for e in events})
    by_id = {e.event_id: e for e in events}
    per_group: dict[str, list[str]] = defaultdict(list)
    for message in received:
        event = by_id[attr(message, "event_id")]
        assert message["Body"].encode() == event.body()
        assert message["Attributes"]["MessageGroupId"] == event.user_id
        assert message["Attributes"]["MessageDeduplicationId"] == event.event_id
        assert (attr(message, "type"), attr(message, "user_id"), attr(message, "provider")) == (
            event.type, event.user_id, event.provider)
        assert attr(message, "ordering_timestamp_ms") == str(event.ordering_timestamp_ms)
        per_group[message["Attributes"]["MessageGroupId"]].append(event.event_id)
    expected: dict[str, list[str]] = defaultdict(list)
    for event in events:
        expected[event.user_id].append(event.event_id)
    assert per_group == expected


def test_standard_queue_refused_unless_allowed(moto_endpoint: str, sqs: Any, standard_url: str,
                                               make_sink_event: Factory) -> None:
    with pytest.raises(FatalError, match="FIFO"):
        SqsSink("sqs", standard_url, endpoint_url=moto_endpoint)
    sink = make_sink(moto_endpoint, standard_url, fifo_required=False)
    assert sink.ordered is False
    events = interleaved_events(make_sink_event, users=2, per_user=2)
    result = sink.write(events)
    assert not result.failures
    received = drain(sqs, standard_url)
    assert sorted(attr(m, "event_id") for m in received) == sorted(e.event_id for e in events)
    assert all("MessageGroupId" not in m["Attributes"] for m in received)


def test_oversize_without_s3_is_permanent_and_blocks_only_that_user(moto_endpoint: str, sqs: Any, fifo_url: str,
                                                                    make_sink_event: Factory) -> None:
    big = make_sink_event("user-1", "2026-03-10", blob="x" * 300_000)
    later = make_sink_event("user-1", "2026-03-11")
    other = make_sink_event("user-2", "2026-03-11")
    result = make_sink(moto_endpoint, fifo_url).write([big, later, other])
    assert result.delivered == [other.event_id]
    errors = {f.event.event_id: f.error for f in result.failures}
    assert isinstance(errors[big.event_id], PermanentError) and "too large for SQS" in str(errors[big.event_id])
    assert type(errors[later.event_id]) is RetryableError and "blocked behind" in str(errors[later.event_id])
    assert [attr(m, "event_id") for m in drain(sqs, fifo_url)] == [other.event_id]


def test_oversize_with_s3_sends_presigned_pointer(moto_endpoint: str, sqs: Any, fifo_url: str,
                                                  make_sink_event: Factory) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=MOTO_REGION)
    bucket = f"hf-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    big = make_sink_event("user-1", "2026-03-10", blob="x" * 300_000)
    small = make_sink_event("user-1", "2026-03-11")
    sink = make_sink(moto_endpoint, fifo_url,
                     large_payload_s3=LargePayloadS3(bucket, prefix="payloads", endpoint_url=moto_endpoint))
    for _ in range(2):
        result = sink.write([big, small])
        assert not result.failures and result.delivered == [big.event_id, small.event_id]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [sink.payload_key(big)]

    received = drain(sqs, fifo_url)
    assert [attr(m, "event_id") for m in received] == [big.event_id, small.event_id]
    pointer = json.loads(received[0]["Body"])
    assert {k: v for k, v in pointer.items() if k != "url"} == {
        "status": "success", "type": "s3_payload", "expires_in": 600, "user_id": "user-1",
        "event_id": big.event_id, "payload_type": "sleep"}
    session = requests.Session()
    session.trust_env = False  # loopback, no proxy
    response = session.get(pointer["url"], timeout=10)
    assert response.status_code == 200 and response.content == big.body()
    assert received[1]["Body"].encode() == small.body()


def test_invalid_entry_fails_alone_and_blocks_its_user(moto_endpoint: str, sqs: Any, fifo_url: str,
                                                       make_sink_event: Factory) -> None:
    """moto rejects the whole call for one invalid FIFO entry (DelaySeconds); the sink retries entry by entry."""
    events = interleaved_events(make_sink_event, users=3, per_user=3)
    poisoned = events[4]  # user-1's second event
    sink = make_sink(moto_endpoint, fifo_url)

    def poison(params: dict[str, Any], **_: Any) -> None:
        for entry in params["Entries"]:
            if entry["MessageDeduplicationId"] == poisoned.event_id:
                entry["DelaySeconds"] = 5  # not allowed per message on FIFO queues

    sink._sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch", poison)
    result = sink.write(events)
    errors = {f.event.event_id: f.error for f in result.failures}
    user1 = [e.event_id for e in events if e.user_id == "user-1"]
    assert set(errors) == {poisoned.event_id, user1[2]}
    assert isinstance(errors[poisoned.event_id], PermanentError)
    assert type(errors[user1[2]]) is RetryableError and "blocked behind" in str(errors[user1[2]])
    sent = [e.event_id for e in events if e.event_id not in errors]
    assert sorted(result.delivered) == sorted(sent)
    assert [attr(m, "event_id") for m in drain(sqs, fifo_url) if attr(m, "user_id") == "user-1"] == [user1[0]]


def test_per_entry_failed_results_are_classified(moto_endpoint: str, sqs: Any, standard_url: str,
                                                 make_sink_event: Factory) -> None:
    """A real per-entry ``Failed`` from moto (DelaySeconds > 900 on a standard queue) -> PermanentError."""
    events = [make_sink_event("user-1", "2026-03-10"), make_sink_event("user-2", "2026-03-10")]
    sink = make_sink(moto_endpoint, standard_url, fifo_required=False)
    sink._sqs.meta.events.register(
        "provide-client-params.sqs.SendMessageBatch",
        lambda params, **_: params["Entries"][0].update(DelaySeconds=1000))
    result = sink.write(events)
    assert result.delivered == [events[1].event_id]
    assert [f.event for f in result.failures] == [events[0]]
    assert isinstance(result.failures[0].error, PermanentError)


def test_server_side_entry_failure_is_retryable_and_blocks_later_events(moto_endpoint: str, fifo_url: str,
                                                                        make_sink_event: Factory) -> None:
    """moto never reports SenderFault=false; rewrite one parsed result to check the mapping and blocking."""
    first, second = make_sink_event("user-1", "2026-03-10"), make_sink_event("user-1", "2026-03-11")
    sink = make_sink(moto_endpoint, fifo_url)

    def fail_first(parsed: dict[str, Any], **_: Any) -> None:
        if parsed.get("Successful"):
            ok = parsed["Successful"].pop(0)
            parsed.setdefault("Failed", []).append(
                {"Id": ok["Id"], "SenderFault": False, "Code": "InternalError", "Message": "simulated"})

    sink._sqs.meta.events.register("after-call.sqs.SendMessageBatch", fail_first)
    result = sink.write([first, second])
    assert result.delivered == []
    errors = {f.event.event_id: f.error for f in result.failures}
    assert type(errors[first.event_id]) is RetryableError and "InternalError" in str(errors[first.event_id])
    assert "blocked behind" in str(errors[second.event_id])


def test_missing_queue_is_fatal(moto_endpoint: str, fifo_url: str, make_sink_event: Factory) -> None:
    missing = fifo_url.rsplit("/", 1)[0] + f"/missing-{uuid.uuid4().hex[:6]}.fifo"
    events = [make_sink_event("user-1"), make_sink_event("user-2"), make_sink_event("user-1", "2026-03-13")]
    result = make_sink(moto_endpoint, missing).write(events)
    assert result.delivered == []
    assert len(result.failures) == 3
    assert all(isinstance(f.error, FatalError) for f in result.failures)
    assert "queue does not exist" in str(result.failures[0].error)


def test_unreachable_endpoint_is_retryable(make_sink_event: Factory, moto_endpoint: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    sink = make_sink(endpoint, f"{endpoint}/123456789012/q.fifo", max_attempts=1, connect_timeout_s=1)
    events = interleaved_events(make_sink_event, users=2, per_user=2)
    result = sink.write(events)
    assert result.delivered == [] and len(result.failures) == 4
    assert all(isinstance(f.error, EndpointUnreachable) for f in result.failures)


def test_sink_pickles_without_clients(moto_endpoint: str, fifo_url: str, make_sink_event: Factory) -> None:
    copy = pickle.loads(pickle.dumps(make_sink(moto_endpoint, fifo_url)))
    assert copy._sqs is None
    event = make_sink_event()
    assert copy.write([event]).delivered == [event.event_id]
    copy.close()


def test_region_from_queue_url() -> None:
    sink = SqsSink("sqs", "https://sqs.eu-west-1.amazonaws.com/123456789012/q.fifo")
    assert sink.region == "eu-west-1"
    with pytest.raises(FatalError):
        SqsSink("sqs", "q.fifo")
