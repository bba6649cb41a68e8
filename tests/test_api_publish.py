"""The API never blocks on the broker: webhooks publish without blocking the event loop (real uvicorn, real Tansu).

A webhook is answered 2xx only once the broker acknowledged its raw events; when the broker is down, slow or the
local buffer is full it gets 503 with Retry-After within the publish timeout, while ``/healthz`` keeps answering
fast. A broker restart (which loses the producer ids it knew) is ridden out without restarting the API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet
from fastapi import FastAPI

from connectors.publish import RawEventPublisher, raw_event_producer
from controlplane.api.server import BackgroundServer
from controlplane.polling import KafkaPublisher, PublishFailed
from controlplane.webhooks import router
from controlplane.webhooks.seen import SeenNotifications
from core.raw import RawPayload
from pipelines.embedded import EmbeddedBroker, free_port

pytest.register_assert_rewrite("servers.fake_provider_api")
from servers.fake_provider_api import read_raw_events  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTES = "healthflow.notifications"  # where the API queues notify-only webhooks (WHOOP)
HEALTHZ_BOUND_S = 1.0  # far under the publish timeout a blocked loop would show; loose for a busy CI machine


def whoop_webhook(base: str, event_id: str) -> requests.Response:
    """A signed WHOOP notification naming ``event_id``."""
    body = json.dumps({"user_id": 10129, "id": event_id, "type": "sleep.updated",
                       "trace_id": f"trace-{event_id}"}).encode()
    millis = str(int(time.time() * 1000))
    mac = base64.b64encode(hmac.new(b"whoop-secret", millis.encode() + body, hashlib.sha256).digest()).decode()
    return requests.post(f"{base}/v2/providers/whoop/webhook", data=body, timeout=30,
                         headers={"X-WHOOP-Signature": mac, "X-WHOOP-Signature-Timestamp": millis})


def queued_ids(bootstrap: str) -> list[str]:
    return [json.loads(e["payload"])["id"] for e in read_raw_events(bootstrap, NOTES)]


class HealthProbe:
    """``GET /healthz`` every 20 ms on a thread of its own while the block runs: each answer's latency."""

    def __init__(self, base: str) -> None:
        self.base, self.latencies, self.failures = base, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():  # a connection each (kept-alive ones add ~40 ms of delayed ACK on loopback)
            started = time.perf_counter()
            try:
                requests.get(f"{self.base}/healthz", timeout=5).raise_for_status()
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_fast(self) -> None:
        assert not self.failures, self.failures[:3]
        assert len(self.latencies) >= 5, "the probe hardly ran"
        assert max(self.latencies) < HEALTHZ_BOUND_S, (
            f"/healthz max {max(self.latencies):.3f}s, p50 {statistics.median(self.latencies):.3f}s")


@pytest.fixture
def api(tmp_path) -> Iterator[Callable[..., str]]:
    """``api(bootstrap, publish_timeout_s)``: ``healthflow serve --bootstrap-servers …`` in a process of its own (so
    the test's client threads do not share its interpreter); its base URL. Stopped with SIGINT, as Ctrl-C would: it
    must close its producer and exit 0."""
    started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(bootstrap: str, publish_timeout_s: float) -> str:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "HEALTHFLOW_SECRET_KEY": Fernet.generate_key().decode(),
               "HEALTHFLOW_WHOOP_CLIENT_SECRET": "whoop-secret"}
        log = (tmp_path / f"serve-{len(started)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "runners.cli", "serve", "--port", str(port), "--state",
             f"sqlite:///{tmp_path}/state-{len(started)}.db", "--bootstrap-servers", bootstrap,
             "--publish-timeout", str(publish_timeout_s)], env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append((process, log))
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / f"serve-{len(started) - 1}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "healthflow serve did not answer within 60 s"
            try:
                requests.get(f"{base}/healthz", timeout=1).raise_for_status()
                return base
            except requests.RequestException:
                time.sleep(0.1)

    yield start
    for process, log in started:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(15) == 0, "healthflow serve did not stop cleanly on SIGINT"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


def test_with_the_broker_down_a_webhook_gets_503_quickly_and_healthz_stays_fast(api):
    base = api(f"127.0.0.1:{free_port()}", publish_timeout_s=1.5)  # nothing listens there
    with HealthProbe(base) as probe, ThreadPoolExecutor(4) as pool:
        started = time.perf_counter()
        answers = list(pool.map(lambda i: whoop_webhook(base, f"down-{i}"), range(4)))
        elapsed = time.perf_counter() - started
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) > 0
        assert "retry later" in answer.json()["detail"]
    assert elapsed < 1.5 + 1.5, f"503 after {elapsed:.2f}s"
    probe.assert_fast()


def test_with_the_broker_up_healthz_stays_fast_while_webhooks_are_in_flight(api, broker):
    broker.create_topic(NOTES, partitions=2)
    base = api(broker.bootstrap, publish_timeout_s=5.0)
    ids = [f"up-{i}" for i in range(40)]
    with HealthProbe(base) as probe, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda event_id: whoop_webhook(base, event_id), ids))
    assert [a.status_code for a in answers] == [200] * len(ids)
    probe.assert_fast()
    assert sorted(queued_ids(broker.bootstrap)) == sorted(ids)  # accepted means on the topic


def test_a_broker_restart_is_ridden_out_without_restarting_the_api_and_nothing_acked_is_lost(api):
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    try:
        broker.create_topic(NOTES, partitions=2)
        base = api(broker.bootstrap, publish_timeout_s=2.0)
        before = [f"before-{i}" for i in range(5)]
        assert [whoop_webhook(base, i).status_code for i in before] == [200] * 5
        assert sorted(queued_ids(broker.bootstrap)) == sorted(before)  # read now: memory storage forgets them

        broker.stop()
        with HealthProbe(base) as probe:
            down = whoop_webhook(base, "while-down")
        assert down.status_code == 503 and down.headers["Retry-After"]
        probe.assert_fast()

        broker = EmbeddedBroker(port=port).start()  # a new broker: the producer id the API had is unknown to it
        broker.create_topic(NOTES, partitions=2)
        accepted, refused, deadline = [], 0, time.monotonic() + 30
        while len(accepted) < 10:
            assert time.monotonic() < deadline, f"not recovered: {refused} refused, {len(accepted)} accepted"
            event_id = f"after-{len(accepted) + refused}"
            answer = whoop_webhook(base, event_id)
            if answer.status_code == 200:
                accepted.append(event_id)
            else:
                assert answer.status_code == 503, answer.text
                refused += 1
        retried = whoop_webhook(base, "while-down")  # the provider's retry of the one refused: accepted now
        assert retried.status_code == 200 and "duplicate" not in retried.json()
        on_topic = set(queued_ids(broker.bootstrap))
        assert set(accepted) | {"while-down"} <= on_topic  # every webhook answered 200 is on the topic
    finally:
        broker.stop()


def test_a_full_publish_buffer_answers_503_at_once(tmp_path, monkeypatch):
    """The producer's local buffer is bounded: when it is full (the broker unreachable), 503 without waiting."""
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", "garmin-t0ken")
    producer = raw_event_producer(f"127.0.0.1:{free_port()}", timeout_s=30.0, buffer_messages=2)
    app = FastAPI()
    app.include_router(router(RawEventPublisher(producer=producer, timeout_s=30.0),
                              seen=SeenNotifications(f"sqlite:///{tmp_path}/seen.db")))
    body = {"dailies": [{"userId": f"u{i}", "summaryId": f"s{i}", "calendarDate": "2026-11-02"} for i in range(3)]}
    try:
        with BackgroundServer() as server:
            server.start(app)
            started = time.perf_counter()
            answer = requests.post(f"{server.url}/v2/providers/garmin/webhook?token=garmin-t0ken", json=body,
                                   timeout=30)
            elapsed = time.perf_counter() - started
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert elapsed < 1.0, f"503 after {elapsed:.2f}s"
    finally:
        producer.close(timeout_s=0)


def test_the_pollers_publisher_recovers_after_a_broker_restart():
    """Historical requests and polls publish through KafkaPublisher: after a restart it publishes again."""
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    publisher = KafkaPublisher(broker.bootstrap, "raw.restart", flush_timeout_s=2.0, config={"log_level": 0})
    page = RawPayload("oura", b'{"data":[]}', kind="daily_readiness", user_id="a")
    try:
        broker.create_topic("raw.restart", partitions=2)
        batch = publisher.batch()
        batch.add(page)
        assert batch.wait() == 1
        broker.stop()
        broker = EmbeddedBroker(port=port).start()
        broker.create_topic("raw.restart", partitions=2)
        deadline, failed = time.monotonic() + 30, 0
        while True:
            assert time.monotonic() < deadline, f"still failing after {failed} batches"
            batch = publisher.batch()
            batch.add(page)
            try:
                assert batch.wait() == 1
                break
            except PublishFailed:
                failed += 1
        assert len(read_raw_events(broker.bootstrap, "raw.restart")) >= 1
    finally:
        publisher.close()
        broker.stop()


def test_the_reporting_thread_survives_a_delivery_callback_that_raises(broker, caplog):
    """A callback raising on the reporting thread (confluent-kafka re-raises it from poll) is logged; later publishes
    still get their reports, instead of every webhook waiting out its timeout forever."""
    from core.kafka import DeliveryReports, SharedProducer, producer_config

    topic = f"reports.{time.time_ns()}"
    broker.create_topic(topic, 1)
    raised = threading.Event()

    def broken_callback(err: Any, msg: Any) -> None:
        raised.set()
        raise RuntimeError("a caller's callback failed")

    producer = SharedProducer(producer_config(broker.bootstrap, {"message.timeout.ms": 5000}))
    try:
        assert producer.produce(topic, b"first", on_delivery=broken_callback)
        assert raised.wait(10)
        reports = DeliveryReports()
        for n in range(3):
            assert producer.produce(topic, f"later-{n}".encode(), on_delivery=reports)
        assert reports.wait(3, 10), "the reporting thread died: later publishes get no delivery report"
        assert reports.snapshot() == (3, [])
    finally:
        producer.close()
    assert "still serving" in caplog.text
