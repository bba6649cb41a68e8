"""WebhookSink against a real WebhookReceiver on loopback: signatures, classification, order, dedup."""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import gzip
import json
import os
import pickle
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from standardwebhooks import Webhook
from terra.utils.verify_signature import verify_terra_webhook_signature

from core.errors import FatalError, PermanentError, RetryableError, Route, parse_retry_after, route
from core.events import NormalizedEvent
from pipelines.embedded import LoopbackHTTPServer, send_reply
from pipelines.webhook_receiver import WebhookReceiver
from sinks.base import SinkResult
from sinks.webhook import MAX_LANES, EndpointGone, WebhookSink, terra_signing_key

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


def test_a_receiver_parsing_on_read_observes_what_one_parsing_on_receipt_does(secret: str,
                                                                              make_sink_event: MakeEvent) -> None:
    events = [make_sink_event("u1", "2026-03-10"), make_sink_event("u2", "2026-03-10"),
              make_sink_event("u1", "2026-03-11")]
    observed = []
    for parse_on_read in (False, True):
        with WebhookReceiver(secret, parse_on_read=parse_on_read) as receiver:
            sink = WebhookSink("hook", receiver.url, secret, lanes=1)
            sink.write(events)
            sink.write(events[:1])
            sink.close()
            assert receiver.unique == 3  # counted before anything was parsed
            arrivals = receiver.arrivals
            observed.append((receiver.events, {k: v["webhook-id"] for k, v in receiver.headers.items()},
                             receiver.order_for("u1"), receiver.order_for("u2"), sorted(arrivals),
                             (receiver.received, receiver.unique, receiver.duplicates)))
            assert arrivals["u1"] <= arrivals["u2"]  # the first event of u1 came first

    assert observed[0] == observed[1]
    assert observed[1][0] == {e.event_id: e.envelope() for e in events}
    assert observed[1][2] == [events[0].event_id, events[2].event_id]


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


# ======================================================================================================================
# The keep-alive client and its lanes, against loopback endpoints that record what arrives
# ======================================================================================================================
Reply = tuple[int, dict[str, str], bytes]
HANG_UP = (0, {}, b"")  # close the connection without answering


class Endpoint:
    """A loopback HTTP/1.1 endpoint: answers each POST with ``respond(endpoint, user_id, event_id)`` (200 "ok" by
    default) and records what arrived: request heads and bodies, each user's event ids in order of arrival, TCP
    connections accepted, the most requests in flight at once (overall and per user)."""

    def __init__(self, respond: Callable[[Endpoint, str, str], Reply] | None = None,
                 idle_timeout_s: float = 30.0) -> None:
        self.respond = respond or (lambda endpoint, user, event_id: (200, {}, b"ok"))
        self.lock = threading.Lock()
        self.heads: list[tuple[str, list[tuple[str, str]]]] = []
        self.bodies: list[bytes] = []
        self.arrivals: list[str] = []  # event ids in order of arrival
        self.order: dict[str, list[str]] = {}
        self.connections = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.in_flight_by_user: dict[str, int] = {}
        self.most_in_flight_per_user = 0
        self.unfinished_replies = 0  # replies the client hung up on before reading them
        self._server = LoopbackHTTPServer(self._handler(idle_timeout_s), name="test-endpoint")

    def __enter__(self) -> Endpoint:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        return f"{self._server.base_url}/hook"

    def _handler(self, idle_timeout_s: float) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            timeout = idle_timeout_s

            def setup(self) -> None:
                super().setup()
                with endpoint.lock:
                    endpoint.connections += 1

            def do_POST(self) -> None:  # http.server dispatches on this name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                envelope = json.loads(body)
                user, event_id = envelope["user"]["user_id"], self.headers["webhook-id"]
                with endpoint.lock:
                    endpoint.heads.append((self.requestline, list(self.headers.items())))
                    endpoint.bodies.append(body)
                    endpoint.arrivals.append(event_id)
                    endpoint.order.setdefault(user, []).append(event_id)
                    endpoint.in_flight += 1
                    endpoint.most_in_flight = max(endpoint.most_in_flight, endpoint.in_flight)
                    endpoint.in_flight_by_user[user] = endpoint.in_flight_by_user.get(user, 0) + 1
                    endpoint.most_in_flight_per_user = max(endpoint.most_in_flight_per_user,
                                                           endpoint.in_flight_by_user[user])
                try:
                    status, headers, reply = endpoint.respond(endpoint, user, event_id)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1
                        endpoint.in_flight_by_user[user] -= 1
                if (status, headers, reply) == HANG_UP:
                    self.close_connection = True
                    return
                try:
                    send_reply(self, status, reply, "text/plain", headers)
                    self.wfile.flush()
                except OSError:
                    with endpoint.lock:
                        endpoint.unfinished_replies += 1
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def interleaved(make_sink_event: MakeEvent, users: int, per_user: int, seed: int = 7) -> list[NormalizedEvent]:
    """``per_user`` events for each of ``users`` users, shuffled so users interleave (each user's own order is the
    order in the list)."""
    events = [make_sink_event(f"user-{u}", f"2026-03-{d + 1:02d}") for u in range(users) for d in range(per_user)]
    random.Random(seed).shuffle(events)
    return events


def assert_reported_once(result: SinkResult, events: list[NormalizedEvent]) -> None:
    reported = result.delivered + [f.event.event_id for f in result.failures]
    assert sorted(reported) == sorted(e.event_id for e in events)
    assert len(set(reported)) == len(reported)


def test_what_is_sent_is_what_a_requests_session_sent(monkeypatch: pytest.MonkeyPatch, secret: str,
                                                      make_sink_event: MakeEvent) -> None:
    """Request line, header names, values and order, and body: byte for byte what the sink sent with requests,
    including URL credentials, a cookie the endpoint set, a terra-reference, and a proxy from the environment."""
    def set_cookie_once(endpoint: Endpoint, user: str, event_id: str) -> Reply:
        return 200, ({"Set-Cookie": "lb=abc; Path=/"} if len(endpoint.arrivals) % 2 == 1 else {}), b"ok"

    with Endpoint(set_cookie_once) as endpoint:
        port = endpoint.url.split(":")[2].split("/")[0]
        events = [make_sink_event("u1"), dataclasses.replace(make_sink_event("u1", "2026-03-13"), reference="bf-1")]
        for url, proxy in [(f"http://alice:s%40cret@127.0.0.1:{port}/hook?x=1#part", None),
                           ("http://hooks.example.test:8080/terra", f"http://pu:pp@127.0.0.1:{port}")]:
            for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
                monkeypatch.delenv(name, raising=False)
            if proxy:
                monkeypatch.setenv("HTTP_PROXY", proxy)
            start = len(endpoint.heads)
            sink = WebhookSink("hook", url, secret, lanes=1)
            assert sink.write(events).delivered == [e.event_id for e in events]
            sink.close()
            with requests.Session() as session:
                session.headers["user-agent"] = "healthflow-webhooks/1"
                for event, (_, sent) in zip(events, endpoint.heads[start:], strict=True):
                    timestamp = int(dict(sent)["webhook-timestamp"])
                    session.post(url, data=event.body(), headers=sink.headers_for(event, event.body(), timestamp),
                                 timeout=5, allow_redirects=False)
            heads = endpoint.heads[start:]
            assert heads[:2] == heads[2:]
            names = [name for name, _ in heads[1][1]]
            assert names == ["Host", "user-agent", "Accept-Encoding", "Accept", "Connection", "content-type",
                             "webhook-id", "webhook-timestamp", "webhook-signature", "terra-signature",
                             "X-Terra-Trace-Id", "X-Terra-Ordering-Timestamp", "terra-reference", "Cookie",
                             "Content-Length", "Authorization" if not proxy else "Proxy-Authorization"]
            assert endpoint.bodies[start:] == [e.body() for e in events] * 2
        assert endpoint.heads[-1][0].startswith("POST http://hooks.example.test:8080/terra ")


def test_connections_are_kept_and_reused_across_events_and_batches(secret: str, make_sink_event: MakeEvent) -> None:
    with Endpoint() as endpoint:
        for lanes in (1, 4):
            before = endpoint.connections
            sink = WebhookSink("hook", endpoint.url, secret, lanes=lanes)
            for batch in range(3):
                events = interleaved(make_sink_event, users=10, per_user=6, seed=batch)
                assert len(sink.write(events).delivered) == len(events)
            sink.close()
            assert 1 <= endpoint.connections - before <= lanes  # 180 events
        assert len(endpoint.arrivals) == 360


def test_an_idle_connection_the_server_closed_is_replaced_not_reported(secret: str,
                                                                       make_sink_event: MakeEvent) -> None:
    with Endpoint(idle_timeout_s=0.1) as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret, lanes=2)
        assert sink.write([make_sink_event("u1"), make_sink_event("u2")]).failures == []
        time.sleep(0.5)  # the endpoint closes the idle connections

        result = sink.write([make_sink_event("u1", "2026-03-13"), make_sink_event("u2", "2026-03-13")])

        assert result.failures == [] and len(result.delivered) == 2
        sink.close()


def test_per_user_order_is_kept_while_users_go_out_concurrently(secret: str, make_sink_event: MakeEvent) -> None:
    delays = random.Random(3)

    def jitter(endpoint: Endpoint, user: str, event_id: str) -> Reply:
        time.sleep(delays.random() * 0.004)
        return 200, {}, b"ok"

    events = interleaved(make_sink_event, users=12, per_user=10)
    with Endpoint(jitter) as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret, lanes=6)

        result = sink.write(events)

        sink.close()
    assert result.delivered == [e.event_id for e in events] and result.failures == []
    for user in {e.user_id for e in events}:
        assert endpoint.order[user] == [e.event_id for e in events if e.user_id == user]
    assert endpoint.most_in_flight_per_user == 1
    assert 1 < endpoint.most_in_flight <= 6
    assert len(endpoint.arrivals) == len(events)  # each sent once


def test_different_users_are_sent_at_the_same_time(secret: str, make_sink_event: MakeEvent) -> None:
    """After the first delivery, four users' events must be in flight together or the endpoint answers 500."""
    together = threading.Barrier(4, timeout=5)

    def wait_for_four(endpoint: Endpoint, user: str, event_id: str) -> Reply:
        if user == "first":
            return 200, {}, b"ok"
        try:
            together.wait()
        except threading.BrokenBarrierError:
            return 500, {}, b"alone"
        return 200, {}, b"ok"

    events = [make_sink_event("first")] + [make_sink_event(f"u{n}") for n in range(4)]
    with Endpoint(wait_for_four) as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret, lanes=4)

        result = sink.write(events)

        sink.close()
    assert result.failures == [] and result.delivered == [e.event_id for e in events]
    assert endpoint.most_in_flight == 4


def test_an_empty_batch_sends_nothing(secret: str) -> None:
    with Endpoint() as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret)

        assert sink.write([]) == SinkResult()

        sink.close()
    assert endpoint.connections == 0


def test_one_lane_sends_one_event_at_a_time_in_the_given_order(secret: str, make_sink_event: MakeEvent) -> None:
    events = interleaved(make_sink_event, users=5, per_user=4)
    with Endpoint() as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret, lanes=1)

        assert sink.write(events).delivered == [e.event_id for e in events]

        sink.close()
    assert endpoint.arrivals == [e.event_id for e in events] and endpoint.most_in_flight == 1


def test_a_batch_starts_with_one_request_until_one_is_delivered(secret: str, make_sink_event: MakeEvent) -> None:
    def first_two_fail(endpoint: Endpoint, user: str, event_id: str) -> Reply:
        time.sleep(0.05)
        return (503, {}, b"warming up") if len(endpoint.arrivals) <= 2 else (200, {}, b"ok")

    events = [make_sink_event(f"u{n}") for n in range(8)]
    with Endpoint(first_two_fail) as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret, lanes=4)

        result = sink.write(events)

        sink.close()
    assert endpoint.arrivals[:3] == [e.event_id for e in events[:3]]
    assert [f.event.event_id for f in result.failures] == [e.event_id for e in events[:2]]
    assert result.delivered == [e.event_id for e in events[2:]]
    assert endpoint.most_in_flight > 1


@pytest.mark.parametrize("halt", ["429", "410", "hang up"])
def test_an_endpoint_failure_mid_batch_stops_every_lane(halt: str, secret: str, make_sink_event: MakeEvent) -> None:
    """From the 25th request on the endpoint fails; lanes stop taking events, every event is reported once, and
    those never sent carry the batch-wide error."""
    def fail_from_25th(endpoint: Endpoint, user: str, event_id: str) -> Reply:
        arrived_before = endpoint.arrivals.index(event_id)
        time.sleep(0.005)
        if arrived_before < 24:
            return 200, {}, b"ok"
        return {"429": (429, {"Retry-After": "7"}, b"slow down"), "410": (410, {}, b"gone"), "hang up": HANG_UP}[halt]

    events = interleaved(make_sink_event, users=20, per_user=6)
    lanes = 4
    with Endpoint(fail_from_25th) as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret, lanes=lanes)

        result = sink.write(events)

        sink.close()
        arrived = list(endpoint.arrivals)
    assert_reported_once(result, events)
    delivered, failed = set(result.delivered), errors_by_id(result)
    assert delivered == set(arrived[:24])
    answered_failures = arrived[24:]  # the first failure, and requests other lanes had already started
    assert 1 <= len(answered_failures) <= lanes
    first_error = {"429": "throttled: HTTP 429", "410": "endpoint gone: HTTP 410", "hang up": "cannot reach"}[halt]
    assert all(first_error in str(failed[event_id]) for event_id in answered_failures)
    not_sent = set(failed) - set(answered_failures)
    assert len(not_sent) == len(events) - len(arrived) > 0
    for event_id in not_sent:
        error = failed[event_id]
        assert "not sent" in str(error) or "blocked behind" in str(error)
        if halt == "410":
            assert isinstance(error, EndpointGone)
        else:
            assert isinstance(error, RetryableError) and (error.retry_after == 7) is (halt == "429")
    for user in {e.user_id for e in events}:  # nothing of a user was delivered after one of its events failed
        outcomes = [e.event_id in delivered for e in events if e.user_id == user]
        assert outcomes == sorted(outcomes, reverse=True)


def test_reading_a_response_is_bounded_and_decoded(secret: str, make_sink_event: MakeEvent) -> None:
    huge = b"x" * (32 * 1024 * 1024)

    def replies(endpoint: Endpoint, user: str, event_id: str) -> Reply:
        if user == "big-ok":
            return 200, {}, huge
        if user == "big-error":
            return 400, {}, b"E" * 600 + huge
        if user == "gzip-error":
            return 422, {"Content-Encoding": "gzip"}, gzip.compress(b"field 'x' is invalid; " * 50)
        return 200, {}, b"ok"

    with Endpoint(replies) as endpoint:
        sink = WebhookSink("hook", endpoint.url, secret, lanes=1)
        events = [make_sink_event(user) for user in ("big-ok", "big-error", "gzip-error", "after")]

        result = sink.write(events)

        sink.close()
        deadline = time.monotonic() + 10
        while endpoint.unfinished_replies < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        unfinished, url = endpoint.unfinished_replies, endpoint.url
    assert result.delivered == [events[0].event_id, events[3].event_id]
    errors = errors_by_id(result)
    assert str(errors[events[1].event_id]) == f"HTTP 400 from {url}: {'E' * 500!r}"
    assert "field 'x' is invalid; field 'x'" in str(errors[events[2].event_id])
    assert unfinished == 2  # the client closed both huge replies instead of reading them


@pytest.mark.parametrize("lanes", [0, MAX_LANES + 1, 2.5, True, "8", None])
def test_lanes_must_be_a_whole_number_in_range(lanes: object, secret: str) -> None:
    with pytest.raises(FatalError, match="lanes must be a whole number from 1 to 64"):
        WebhookSink("hook", "https://example.test/hook", secret, lanes=lanes)  # type: ignore[arg-type]


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "https://proxy.example.test:3128"])
def test_a_proxy_it_cannot_use_is_a_fatal_error_at_open(proxy: str, monkeypatch: pytest.MonkeyPatch,
                                                        secret: str) -> None:
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", proxy)
    sink = WebhookSink("hook", "https://hooks.example.test/terra", secret)

    with pytest.raises(FatalError, match=r"webhook sink 'hook': proxy .* is not supported"):
        sink.open()


def test_https_is_verified_against_the_configured_ca_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            secret: str, make_sink_event: MakeEvent) -> None:
    cert, key = self_signed_certificate(tmp_path)
    with Endpoint() as endpoint:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = endpoint._server._server
        assert server is not None
        server.socket = context.wrap_socket(server.socket, server_side=True)
        url = endpoint.url.replace("http://", "https://")
        untrusted = WebhookSink("hook", url, secret)

        [failure] = untrusted.write([make_sink_event()]).failures

        assert isinstance(failure.error, RetryableError) and "cannot reach" in str(failure.error)
        assert "CERTIFICATE_VERIFY_FAILED" in str(failure.error)
        untrusted.close()
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        trusted = WebhookSink("hook", url, secret)

        assert trusted.write([make_sink_event("u1"), make_sink_event("u2")]).failures == []

        trusted.close()
    assert len(endpoint.arrivals) == 2


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
