"""WebhookSink against a real WebhookReceiver on loopback: signatures, classification, order, dedup."""

from __future__ import annotations

import base64
import email.utils
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from standardwebhooks import Webhook
from terra.utils.verify_signature import verify_terra_webhook_signature

from core.errors import FatalError, PermanentError, RetryableError, Route, parse_retry_after, route
from core.events import NormalizedEvent
from pipelines.webhook_receiver import WebhookReceiver
from sinks.base import SinkResult
from sinks.webhook import EndpointGone, WebhookSink, terra_signing_key

MakeEvent = Callable[..., NormalizedEvent]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def receiver(secret: str) -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret) as running:
        yield running


@pytest.fixture
def sink(receiver: WebhookReceiver, secret: str) -> Iterator[WebhookSink]:
    webhook = WebhookSink("hook", receiver.url, secret, timeout_s=5.0)
    webhook.open()
    yield webhook
    webhook.close()


def errors_by_id(result: SinkResult) -> dict[str, BaseException]:
    return {failure.event.event_id: failure.error for failure in result.failures}


def test_delivers_signed_events_verified_by_both_libraries(sink: WebhookSink, receiver: WebhookReceiver,
                                                           secret: str, make_sink_event: MakeEvent) -> None:
    events = [make_sink_event("u1", "2026-03-10", ordering_timestamp_ms=111), make_sink_event("u2", "2026-03-10"),
              make_sink_event("u1", "2026-03-11")]

    result = sink.write(events)

    assert result.delivered == [e.event_id for e in events] and result.failures == []
    assert (receiver.received, receiver.unique, receiver.duplicates, receiver.rejected_signature) == (3, 3, 0, 0)
    assert receiver.events == {e.event_id: e.envelope() for e in events}
    headers = receiver.headers[events[0].event_id]
    assert headers["webhook-id"] == headers["x-terra-trace-id"] == events[0].event_id
    assert headers["x-terra-ordering-timestamp"] == "111"
    assert headers["content-type"] == "application/json"
    assert "terra-reference" not in headers
    assert headers["webhook-timestamp"] == headers["terra-signature"].split(",")[0].removeprefix("t=")
    # The recorded headers verify independently, with the keys the module docstring documents.
    body = events[0].body()
    Webhook(secret).verify(body, headers)
    assert verify_terra_webhook_signature(body.decode(), headers["terra-signature"], secret)


def test_terra_key_is_the_canonical_whsec_string() -> None:
    key = os.urandom(32)
    padded = "whsec_" + base64.b64encode(key).decode()
    assert terra_signing_key(padded) == padded
    assert terra_signing_key(padded.rstrip("=")) == padded  # unpadded config, same key bytes, same terra key


def test_wrong_secret_is_rejected_with_401_and_reported_permanent(receiver: WebhookReceiver,
                                                                  make_sink_event: MakeEvent) -> None:
    wrong = WebhookSink("hook", receiver.url, new_secret())
    event = make_sink_event()

    result = wrong.write([event])

    [failure] = result.failures
    assert isinstance(failure.error, PermanentError) and "HTTP 401" in str(failure.error)
    assert "invalid signature" in str(failure.error)
    assert (receiver.rejected_signature, receiver.unique) == (1, 0)
    wrong.close()


def test_tampered_body_is_rejected_with_401(sink: WebhookSink, receiver: WebhookReceiver,
                                            make_sink_event: MakeEvent) -> None:
    event = make_sink_event()
    headers = sink.headers_for(event, event.body(), int(time.time()))
    tampered = event.body().replace(b"3601", b"9999")
    assert tampered != event.body()

    response = requests.post(receiver.url, data=tampered, headers=headers, timeout=5)

    assert response.status_code == 401
    assert (receiver.rejected_signature, receiver.unique) == (1, 0)


@pytest.mark.parametrize(("status", "expected"), [
    (500, RetryableError), (502, RetryableError), (503, RetryableError), (504, RetryableError),
    (408, RetryableError), (400, PermanentError), (404, PermanentError), (422, PermanentError),
    (302, PermanentError), (301, PermanentError),
])
def test_status_classification(sink: WebhookSink, receiver: WebhookReceiver, make_sink_event: MakeEvent,
                               status: int, expected: type[Exception]) -> None:
    receiver.fail_next(1, status)
    event = make_sink_event()

    [failure] = sink.write([event]).failures

    assert type(failure.error) is expected
    assert f"HTTP {status}" in str(failure.error)
    if expected is PermanentError:
        assert f"injected failure {status}" in str(failure.error)  # response body prefix in the message
    assert sink.write([event]).delivered == [event.event_id]  # next attempt succeeds
    assert receiver.unique == 1


def test_500_is_retryable_then_delivered(sink: WebhookSink, receiver: WebhookReceiver,
                                         make_sink_event: MakeEvent) -> None:
    receiver.fail_next(1, 500)
    event = make_sink_event()

    [failure] = sink.write([event]).failures

    assert isinstance(failure.error, RetryableError) and failure.error.retry_after is None
    assert route(failure.error) is Route.RETRY
    assert sink.write([event]).delivered == [event.event_id]


def test_429_retry_after_seconds_and_rest_of_batch_not_sent(sink: WebhookSink, receiver: WebhookReceiver,
                                                           make_sink_event: MakeEvent) -> None:
    receiver.fail_next(1, 429, retry_after=7)
    events = [make_sink_event("u1"), make_sink_event("u2"), make_sink_event("u3")]

    result = sink.write(events)

    assert result.delivered == [] and receiver.received == 1
    errors = errors_by_id(result)
    assert all(isinstance(e, RetryableError) and e.retry_after == 7 for e in errors.values())
    assert len(errors) == 3


def test_retry_after_http_date(sink: WebhookSink, receiver: WebhookReceiver, make_sink_event: MakeEvent) -> None:
    receiver.fail_next(1, 503, retry_after=email.utils.formatdate(time.time() + 120, usegmt=True))

    [failure] = sink.write([make_sink_event()]).failures

    assert isinstance(failure.error, RetryableError)
    assert failure.error.retry_after is not None and 115 <= failure.error.retry_after <= 121


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 30) == 0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_410_is_permanent_endpoint_gone_and_stops_the_batch(sink: WebhookSink, receiver: WebhookReceiver,
                                                            make_sink_event: MakeEvent) -> None:
    receiver.fail_next(1, 410)
    events = [make_sink_event("u1"), make_sink_event("u2")]

    result = sink.write(events)

    assert result.delivered == [] and receiver.received == 1
    errors = errors_by_id(result)
    assert all(isinstance(e, EndpointGone) and isinstance(e, PermanentError) for e in errors.values())
    assert "endpoint gone" in str(errors[events[0].event_id]) and len(errors) == 2
    assert route(errors[events[0].event_id]) is Route.DEAD_LETTER


def test_per_user_order_kept_and_later_events_of_failed_user_blocked(
        sink: WebhookSink, receiver: WebhookReceiver, make_sink_event: MakeEvent) -> None:
    a0 = make_sink_event("alice", "2026-03-01")
    assert sink.write([a0]).delivered == [a0.event_id]
    a1, a2, a3 = (make_sink_event("alice", f"2026-03-0{d}") for d in (2, 3, 4))
    b1, b2 = (make_sink_event("bob", f"2026-03-0{d}") for d in (2, 3))
    receiver.fail_next(1, 500)  # hits a1

    result = sink.write([a1, b1, a2, b2, a3])

    assert result.delivered == [b1.event_id, b2.event_id]
    errors = errors_by_id(result)
    assert set(errors) == {a1.event_id, a2.event_id, a3.event_id}
    assert all(isinstance(e, RetryableError) for e in errors.values())
    assert "blocked behind earlier failure of " + a1.event_id in str(errors[a2.event_id])
    assert receiver.received == 4  # a2, a3 were never sent
    assert receiver.order_for("alice") == [a0.event_id]

    retry = sink.write([a1, a2, a3])

    assert retry.failures == []
    assert receiver.order_for("alice") == [a0.event_id, a1.event_id, a2.event_id, a3.event_id]
    assert receiver.order_for("bob") == [b1.event_id, b2.event_id]


def test_redelivery_is_deduplicated_by_webhook_id(sink: WebhookSink, receiver: WebhookReceiver,
                                                  make_sink_event: MakeEvent) -> None:
    events = [make_sink_event("u1", "2026-03-10"), make_sink_event("u1", "2026-03-11")]
    sink.write(events)

    result = sink.write(events)

    assert result.delivered == [e.event_id for e in events]
    assert (receiver.unique, receiver.duplicates, receiver.received) == (2, 2, 4)
    assert receiver.order_for("u1") == [e.event_id for e in events]


def test_timeout_is_retryable_and_the_retry_is_a_duplicate(receiver: WebhookReceiver, secret: str,
                                                           make_sink_event: MakeEvent) -> None:
    impatient = WebhookSink("hook", receiver.url, secret, timeout_s=0.3)
    receiver.stall_next(1, 1.0)
    event = make_sink_event()

    [failure] = impatient.write([event]).failures

    assert isinstance(failure.error, RetryableError) and "timed out" in str(failure.error)
    time.sleep(1.0)  # the receiver still accepts the slow request after the sink gave up
    assert impatient.write([event]).delivered == [event.event_id]
    assert (receiver.unique, receiver.duplicates) == (1, 1)
    impatient.close()


def test_unreachable_endpoint_fails_whole_batch_retryable(secret: str, make_sink_event: MakeEvent) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: connection refused
    sink = WebhookSink("hook", f"http://127.0.0.1:{port}/", secret, timeout_s=2)
    events = [make_sink_event("u1"), make_sink_event("u2")]

    result = sink.write(events)

    assert result.delivered == [] and len(result.failures) == 2
    assert all(isinstance(f.error, RetryableError) for f in result.failures)
    assert "cannot reach" in str(result.failures[0].error)
    sink.close()


def test_oversized_body_is_permanent_and_not_sent(receiver: WebhookReceiver, secret: str,
                                                  make_sink_event: MakeEvent) -> None:
    small = WebhookSink("hook", receiver.url, secret, max_body_bytes=100)

    [failure] = small.write([make_sink_event()]).failures

    assert isinstance(failure.error, PermanentError) and "exceeds max_body_bytes=100" in str(failure.error)
    assert receiver.received == 0
    small.close()


@pytest.mark.parametrize(("url", "signing_secret", "message"), [
    ("ftp://example.com/hook", new_secret(), "http(s)"),
    ("example.com/hook", new_secret(), "http(s)"),
    ("https://example.com/hook", "", "missing"),
    ("https://example.com/hook", "not-a-whsec", "whsec_"),
    ("https://example.com/hook", "whsec_!!!", "base64"),
    ("https://example.com/hook", "whsec_" + base64.b64encode(b"short").decode(), "at least 24"),
])
def test_bad_config_is_fatal(url: str, signing_secret: str, message: str) -> None:
    with pytest.raises(FatalError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WebhookSink("hook", url, signing_secret)


def test_sink_pickles_without_its_session(sink: WebhookSink, make_sink_event: MakeEvent) -> None:
    copy = pickle.loads(pickle.dumps(sink))

    assert copy.write([make_sink_event()]).failures == []
    copy.close()


def test_an_infinite_retry_after_is_ignored_not_a_crash():
    from core.errors import MAX_RETRY_AFTER_S

    assert parse_retry_after("inf") is None and parse_retry_after("nan") is None
    assert parse_retry_after("1e308") == MAX_RETRY_AFTER_S
