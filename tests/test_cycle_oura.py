"""Oura end to end: connect → poll every collection → normalize → deliver → webhooks (fetch by id, delete).

Real OAuth client code against the fake OAuth server; a fake Oura API v2 (``servers.fake_provider_api`` played from
Oura's manifest: ``{"data", "next_token"}`` pages and single documents by id) accepting exactly the tokens that server
issued; Redis rate limits; the Tansu broker; the Beam pipeline; a SQLite destination; the API's webhook route over
real HTTP with Oura's signature. Documents are the fixtures of ``tests/fixtures/oura``: a user in Berlin (+01:00)
whose daily_sleep/daily_readiness are written as UTC midnight and whose heart-rate rows are UTC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from connectors import get_provider
from connectors.base import Deletion
from connectors.publish import RawEventPublisher
from controlplane.api.app import create_app
from controlplane.api.server import BackgroundServer
from controlplane.polling import (
    ConnectionPolling,
    CursorStore,
    KafkaPublisher,
    NotificationFetcher,
    Poller,
    PollReport,
    RedisRateLimiter,
)
from controlplane.webhooks import router
from pipelines.normalize import KafkaSource, NormalizeJob, RunSummary, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api")
from servers.fake_provider import connect_provider  # noqa: E402
from servers.fake_provider_api import FakeProviderApi, consume_raw  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "oura"
OURA = get_provider("oura")
ACCOUNT = "e4b8f9d2-3c6a-4f7e-9d1b-2a5c8e7f6a3b"
NOW = datetime(2024, 3, 12, 12, 0, tzinfo=UTC)
KINDS = list(OURA.manifest.api.endpoints)
DAILY_SLEEP_ID = "7c3e5a1f-9b2d-4e6f-8a0c-1d3f5b7e9a2c"
CYCLING = "a1c3e5f7-0b2d-4f6a-8c0e-5f7b9d1a3c6e"


def documents(name: str) -> list[dict[str, Any]]:
    return json.loads((FIXTURES / name).read_text())["data"]


def load_account(api: FakeProviderApi) -> None:
    for kind in KINDS:
        api.add(kind, documents(f"{kind}.json" if kind.startswith("daily") or kind == "heartrate" else
                                f"{kind}.page.json"))


def poller_for(api: FakeProviderApi, publisher: KafkaPublisher, state: str, topic: str) -> Poller:
    """A poller of the fake Oura API into ``topic`` (each call: new hooks, as a restarted worker has)."""
    return Poller(cursors=CursorStore(state), publisher=publisher, manifests={"oura": api.manifest},
                  limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                  clock=lambda: NOW, initial_lookback=timedelta(days=3), overlap=timedelta(0), backoff_s=0.05)


def normalize_into(out: Path, broker: Any, topic: str, state: str, tmp_path: Path) -> RunSummary:
    """What is new on ``topic``, normalized by a batch run into the SQLite destination ``out``."""
    return run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"), [SqlSink("sql", f"sqlite:///{out}")],
                                  str(tmp_path / "dlq"), state_url=state))


def signed(body: bytes, secret: str) -> dict[str, str]:
    """Oura's signature: upper-case hex HMAC-SHA256 of the timestamp header (seconds) followed by the body."""
    stamp = str(int(time.time()))
    mac = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).hexdigest().upper()
    return {"x-oura-signature": mac, "x-oura-timestamp": stamp, "content-type": "application/json"}


def test_poll_makes_local_days_and_webhooks_fetch_by_id_or_delete(tmp_path, fake_provider, broker, topic,
                                                                   monkeypatch):
    state, out = f"sqlite:///{tmp_path}/state.db", tmp_path / "out.db"
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=1)
    plane, _start = connect_provider(state, fake_provider, "oura", ACCOUNT, reference_id="athlete-4")

    with FakeProviderApi("oura", token_validator=fake_provider.is_live) as api:
        load_account(api)
        publisher = KafkaPublisher(broker.bootstrap, topic)
        polling = ConnectionPolling(plane, poller_for(api, publisher, state, topic))
        first = polling.poll_once()
        assert [r.kind for r in first.results] == KINDS and first.failed == []
        assert [r.path for r in api.requests] == [OURA.manifest.api.endpoints[k].path for k in KINDS]  # no extra

        summary = normalize_into(out, broker, topic, state, tmp_path)
        assert not {n: c for n, c in summary.counters.items() if c and "dead" in n}, summary.counters
        with sqlite3.connect(out) as conn:
            rows = conn.execute("SELECT type, natural_key, payload FROM healthflow_records").fetchall()
        records = {(kind, key): json.loads(payload) for kind, key, payload in rows}
        # one local day: the scores, SpO2 and every heart-rate row (23:50Z on the 10th is 00:50 on the 11th in
        # Berlin) share the daily_activity's window, labelled local; no UTC day 2024-03-10 appears
        assert {key for kind, key in records if kind == "daily"} == {"2024-03-11"}
        day = records[("daily", "2024-03-11")]
        assert day["metadata"] == {"start_time": "2024-03-11T00:00:00.000000+01:00",
                                   "end_time": "2024-03-12T00:00:00.000000+01:00",
                                   "upload_type": 1, "timestamp_localization": 1}
        assert day["scores"] == {"activity": 84, "sleep": 79, "recovery": 81}
        assert day["oxygen_data"]["avg_saturation_percentage"] == 96.412
        samples = day["heart_rate_data"]["detailed"]["hr_samples"]
        assert [s["timestamp"] for s in samples][:2] == ["2024-03-11T00:50:00.000000+01:00",
                                                         "2024-03-11T00:55:00.000000+01:00"]
        assert len(samples) == 6 and all(s["timestamp"].endswith("+01:00") for s in samples)

        # webhooks: an update names its document (fetched by id); a delete is a raw event, nothing fetched
        monkeypatch.setenv("HEALTHFLOW_OURA_CLIENT_SECRET", "secret")  # connect_provider's client secret
        update = {"event_type": "update", "data_type": "daily_sleep", "object_id": DAILY_SLEEP_ID,
                  "event_time": "2024-03-12T11:00:00+00:00", "user_id": ACCOUNT}
        delete = {"event_type": "delete", "data_type": "workout", "object_id": CYCLING,
                  "event_time": "2024-03-12T11:05:00+00:00", "user_id": ACCOUNT}
        app = create_app(plane)
        app.include_router(router(RawEventPublisher(broker.bootstrap), topic, notes))
        raw_before = len(consume_raw(broker.bootstrap, topic))
        with BackgroundServer() as server:
            server.start(app)
            url = f"{server.url}/v2/providers/oura/webhook"
            answers = [requests.post(url, data=json.dumps(note).encode(), timeout=10,
                                     headers=signed(json.dumps(note).encode(), "secret")).json()
                       for note in (update, delete)]
        assert answers == [{"status": "accepted"}, {"status": "accepted", "deletions": 1}]
        (gone,) = [raw for raw, _ in consume_raw(broker.bootstrap, topic)[raw_before:]]
        assert gone["kind"] == "deleted"
        assert list(OURA.normalize(json.loads(gone["payload"]), "deleted", gone["user_id"])) == [
            Deletion("activity", CYCLING, ACCOUNT, 1710241500000)]

        # fetched by a restarted worker (its hook knows no offsets yet): the document, then one daily_activity
        # request for its day, and the score lands in the local day
        served = len(api.requests)
        fetched = NotificationFetcher(ConnectionPolling(plane, poller_for(api, publisher, state, topic))).run_once(
            broker.bootstrap, notes, group="fetch")
        assert [(r.kind, r.published) for r in fetched.fetched.results] == [("daily_sleep", 1)]
        assert [(r.path, r.params) for r in api.requests[served:]] == [
            (f"/v2/usercollection/daily_sleep/{DAILY_SLEEP_ID}", {}),
            ("/v2/usercollection/daily_activity", {"start_date": "2024-03-11", "end_date": "2024-03-11"})]
        (published,) = [raw for raw, _ in consume_raw(broker.bootstrap, topic)[raw_before + 1:]]
        (fragment,) = OURA.normalize(json.loads(published["payload"]), published["kind"], published["user_id"])
        assert fragment.data["metadata"] == day["metadata"] and fragment.data["scores"] == {"sleep": 79}

        # through the pipeline: the deleted workout disappears; the day keeps its window and scores
        summary = normalize_into(out, broker, topic, state, tmp_path)
        assert summary.get("deleted:sql") == 1, summary.counters
        with sqlite3.connect(out) as conn:
            keys = set(conn.execute("SELECT type, natural_key FROM healthflow_records").fetchall())
        assert ("activity", CYCLING) not in keys and ("activity", "b2d4f6a8-1c3e-4a7b-9d1f-6a8c0e2b4d7f") in keys
        assert ("daily", "2024-03-11") in keys
        publisher.close()
    plane.close()


def test_heartrate_polled_before_daily_activity_lands_in_the_local_day(tmp_path, fake_provider, broker, topic):
    """Each kind is polled on its own timer and the hook's offsets live in memory: heartrate can come first (after
    connecting, after a restart). Its page then costs one daily_activity request, and every row is in its local day.
    """
    state, out = f"sqlite:///{tmp_path}/state.db", tmp_path / "out.db"
    plane, _start = connect_provider(state, fake_provider, "oura", ACCOUNT, reference_id="athlete-4")
    with FakeProviderApi("oura", token_validator=fake_provider.is_live) as api:
        load_account(api)
        publisher = KafkaPublisher(broker.bootstrap, topic)
        polling = ConnectionPolling(plane, poller_for(api, publisher, state, topic))
        (target,) = polling.targets()
        report = PollReport()
        for kind in ["heartrate", *(k for k in KINDS if k != "heartrate")]:
            polling.poll(target, kind, report)
        assert report.failed == []
        paths = [(r.path, r.params.get("start_date"), r.params.get("end_date")) for r in api.requests]
        # the heart-rate page, one daily_activity request for the days its rows can be on, then each kind once
        assert paths[:2] == [(OURA.manifest.api.endpoints["heartrate"].path, None, None),
                             ("/v2/usercollection/daily_activity", "2024-03-09", "2024-03-12")]
        assert [p for p, *_ in paths[2:]] == [OURA.manifest.api.endpoints[k].path for k in KINDS if k != "heartrate"]

        summary = normalize_into(out, broker, topic, state, tmp_path)
        assert not {n: c for n, c in summary.counters.items() if c and "dead" in n}, summary.counters
        with sqlite3.connect(out) as conn:
            rows = conn.execute("SELECT natural_key, payload FROM healthflow_records WHERE type = 'daily'").fetchall()
        assert [key for key, _ in rows] == ["2024-03-11"]  # no UTC day 2024-03-10
        day = json.loads(rows[0][1])
        assert day["metadata"]["start_time"] == "2024-03-11T00:00:00.000000+01:00"
        assert day["metadata"]["timestamp_localization"] == 1
        samples = [s["timestamp"] for s in day["heart_rate_data"]["detailed"]["hr_samples"]]
        assert samples == ["2024-03-11T00:50:00.000000+01:00", "2024-03-11T00:55:00.000000+01:00",
                           "2024-03-11T01:00:00.000000+01:00", "2024-03-11T01:05:00.000000+01:00",
                           "2024-03-11T01:10:00.000000+01:00", "2024-03-11T18:42:10.000000+01:00"]
        publisher.close()
    plane.close()
