"""Historical requests: GET /v2/{type} answers at once with a reference; the data is fetched at low
priority in max_days windows and delivered with terra-reference = that reference."""

from __future__ import annotations

import copy
import json
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests

from controlplane.api.app import create_app
from controlplane.api.server import BackgroundServer
from controlplane.polling import ConnectionPolling, CursorStore, KafkaPublisher, Poller, RedisRateLimiter
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from pipelines.webhook_receiver import WebhookReceiver
from sinks.webhook import WebhookSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api")
from servers.fake_provider import connect_provider  # noqa: E402
from servers.fake_provider_api import FakeProviderApi  # noqa: E402

READINESS = json.loads((Path(__file__).parent / "fixtures" / "oura" / "daily_readiness.json").read_text())["data"][0]
NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)


def readiness(day: date) -> dict:
    doc = copy.deepcopy(READINESS)
    doc.update(id=f"readiness-{day}", day=day.isoformat(), timestamp=f"{day}T00:00:00+01:00")
    return doc


def test_a_historical_request_is_chunked_and_delivered_with_its_reference(tmp_path, fake_provider, broker, topic,
                                                                          webhook_secret):
    state = f"sqlite:///{tmp_path}/state.db"
    plane, user = connect_provider(state, fake_provider, "oura", "oura-acct-3", dev_id="lab",
                                   reference_id="athlete-3")
    dev = plane.create_developer(dev_id="lab", name="lab")
    key = plane.create_api_key(dev)

    with FakeProviderApi("oura", page_size=5, token_validator=fake_provider.is_live) as api, \
            WebhookReceiver(webhook_secret) as receiver:
        days = [date(2024, 1, 1) + timedelta(days=i) for i in range(45)]
        api.add("daily_readiness", [readiness(d) for d in days])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"oura": api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: NOW, backoff_s=0.05)
        server = BackgroundServer().start(create_app(plane, polling=ConnectionPolling(plane, poller)))
        try:
            http = requests.Session()
            http.headers.update({"dev-id": dev, "x-api-key": key})
            reply = http.get(f"{server.url}/v2/daily", timeout=10,
                             params={"user_id": user.user_id, "start_date": "2024-01-01", "end_date": "2024-02-15"})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert (body["status"], body["type"], body["message"]) == ("success", "daily", "Data sent to webhook")
            assert body["user"]["reference_id"] == "athlete-3"
            unknown = http.get(f"{server.url}/v2/daily", params={"user_id": user.user_id, "start_date": "nope"},
                               timeout=10)
            assert unknown.status_code == 400 and "start_date" in unknown.json()["message"]
            deadline = time.monotonic() + 30
            while len({d["day"] for r in api.served("daily_readiness") for d in json.loads(r.reply)["data"]}) < 45:
                assert time.monotonic() < deadline, "the backfill did not fetch every day"
                time.sleep(0.1)
        finally:
            server.stop()
        windows = {(r.params["start_date"], r.params["end_date"]) for r in api.served("daily_readiness")}
        assert len(windows) == 2  # 45 days in the endpoint's 30-day windows

        summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "backfill"),
                                         [WebhookSink("hook", receiver.url, webhook_secret)], str(tmp_path / "dlq"),
                                         state_url=state))
        assert summary.get("delivered:hook") == 45
        references = {headers.get("terra-reference") for headers in receiver.headers.values()}
        assert references == {body["reference"]}
        publisher.close()
    plane.close()


def wait_idle(polling: ConnectionPolling, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while polling.backfills_in_flight:
        assert time.monotonic() < deadline, "the queued historical requests did not finish"
        time.sleep(0.05)


def test_historical_requests_are_capped_and_queued_on_a_few_workers(tmp_path, fake_provider, broker, topic):
    """A range beyond the cap answers 400 saying what to do; requests run on a fixed set of workers with a bounded
    queue, and one more than that answers 503 with Retry-After at once instead of starting a thread."""
    import threading

    state = f"sqlite:///{tmp_path}/state.db"
    plane, user = connect_provider(state, fake_provider, "oura", "oura-acct-4", dev_id="lab")
    key = plane.create_api_key(plane.create_developer(dev_id="lab"))
    release = threading.Event()

    def slow(start, end, params):  # every fetch waits until the test lets it go
        release.wait(30)
        return {"data": [], "next_token": None}

    with FakeProviderApi("oura", token_validator=fake_provider.is_live) as api:
        api.respond("daily_readiness", slow)
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"oura": api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: NOW, backoff_s=0.05)
        polling = ConnectionPolling(plane, poller, max_backfill_days=365, backfill_workers=1, backfill_queue=1)
        server = BackgroundServer().start(create_app(plane, polling=polling))
        http = requests.Session()
        http.headers.update({"dev-id": "lab", "x-api-key": key})

        def ask(start_date: str, end_date: str | None = "2024-03-01") -> requests.Response:
            params = {"user_id": user.user_id, "start_date": start_date}
            return http.get(f"{server.url}/v2/daily", params={**params, "end_date": end_date} if end_date else params,
                            timeout=10)

        try:
            too_long = ask("2023-03-01")  # 366 days
            assert too_long.status_code == 400
            assert "at most 365 days" in too_long.json()["message"] and "split" in too_long.json()["message"]
            assert ask("1970-01-01", None).status_code == 400  # no end date: up to now
            earlier = {t for t in threading.enumerate() if t.name.startswith("backfill")}  # other tests' workers
            assert ask("2023-03-02").status_code == 200  # 365 days: running
            assert ask("2024-02-01").status_code == 200  # waiting
            full = ask("2024-02-15")
            assert full.status_code == 503 and full.headers["Retry-After"] == "30"
            assert "too many historical requests" in full.json()["message"]
            workers = {t for t in threading.enumerate() if t.name.startswith("backfill")} - earlier
            assert len(workers) == 1  # not a thread per request
            release.set()
            wait_idle(polling)
            assert ask("2024-02-15").status_code == 200  # room again
            wait_idle(polling)
        finally:
            release.set()
            server.stop()
            polling.close()
            publisher.close()
    plane.close()
