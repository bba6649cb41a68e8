"""WHOOP end to end: connect → poll cycle/sleep/recovery/workout → normalize → deliver → webhooks.

Real OAuth client code against the fake OAuth server; a fake WHOOP API v2 (``servers.fake_whoop``) answering
``{"records", "next_token"}`` pages and single records, accepting exactly the tokens that server issued; Redis rate
limits; the Tansu broker; the Beam pipeline; a SQLite destination; the API's webhook route over real HTTP with WHOOP's
signature. Documents are the fixtures of ``tests/fixtures/whoop`` (a user in UTC+01:00).
"""

from __future__ import annotations

import base64
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
from connectors.publish import RawEventPublisher, publish
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
from core.dead_letters import read_dead_letters
from core.raw import RawPayload
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api", "servers.fake_whoop")
from servers.fake_provider import connect_provider  # noqa: E402
from servers.fake_provider_api import consume_raw  # noqa: E402
from servers.fake_whoop import FakeWhoopApi  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "whoop"
WHOOP = get_provider("whoop")
ACCOUNT = "245199"
NOW = datetime(2024, 3, 12, 12, 0, tzinfo=UTC)
KINDS = list(WHOOP.manifest.api.endpoints)  # cycle, sleep, recovery, workout
MAIN = "3f5e1c9a-7b2d-4e8f-a1c3-9d6b2e4f7a10"  # the fixtures' night, 2024-03-10 23:12 → 03-11 06:58 (+01:00)
NAP = "8a2c4e6f-1b3d-4f5a-9c7e-0d2f4b6a8c1e"
EARLIER = "0b1d3f5a-7c9e-4b2d-8f0a-2c4e6a8b0d13"  # a night before the poll window, its recovery scored late
DELETED = "9d7b5f3a-1e2c-4a6b-8d0f-4a6c8e0b2d24"  # a night deleted at WHOOP after its recovery was listed
NEXT = "6e8a0c2e-4f6b-4d8a-9c1e-3b5d7f9a1c35"  # the night to 2024-03-12


def fixture(name: str) -> list[dict[str, Any]]:
    return json.loads((FIXTURES / name).read_text())["records"]


def night(sleep_id: str, cycle_id: int, days: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fixtures' main sleep and its recovery, moved by ``days`` (ids, cycle and times changed)."""
    sleep, recovery = fixture("sleep.page.json")[0], fixture("recovery.bad_no_sleep.json")[0]

    def moved(text: str) -> str:
        return (datetime.fromisoformat(text.replace("Z", "+00:00")) + timedelta(days=days)).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    sleep = {**sleep, "id": sleep_id, "cycle_id": cycle_id, "v1_id": None,
             **{k: moved(sleep[k]) for k in ("start", "end", "created_at", "updated_at")}}
    recovery = {**recovery, "sleep_id": sleep_id, "cycle_id": cycle_id,
                **{k: moved(recovery[k]) for k in ("created_at", "updated_at")}}
    return sleep, recovery


def load_account(api: FakeWhoopApi) -> None:
    """Two nights and a nap in the poll window (from 2024-03-10 12:00Z), one night before it whose recovery was
    scored inside it, and one recovery whose sleep is gone."""
    earlier, earlier_recovery = night(EARLIER, 1236300001, -1)
    earlier_recovery = {**earlier_recovery, "created_at": "2024-03-10T13:05:00.000Z"}  # re-scored in the window
    _, deleted_recovery = night(DELETED, 1236300002, -1)
    deleted_recovery = {**deleted_recovery, "created_at": "2024-03-10T13:06:00.000Z"}
    api.add("cycle", [c for c in fixture("cycle.page.json") if str(c["user_id"]) == ACCOUNT])
    api.add("sleep", [*fixture("sleep.page.json"), earlier])
    api.add("recovery", [*fixture("recovery.bad_no_sleep.json"), earlier_recovery, deleted_recovery])
    api.add("workout", fixture("workout.page.json")[:1])


def limiter(namespace: str) -> RedisRateLimiter:
    return RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=namespace)


def deliver(broker, topic: str, state: str, out: Path, dlq: Path) -> dict[str, int]:
    summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                     [SqlSink("sql", f"sqlite:///{out}")], str(dlq), state_url=state))
    return {name: n for name, n in summary.counters.items() if n}


def delivered(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    with sqlite3.connect(out) as conn:
        rows = conn.execute("SELECT type, natural_key, payload FROM healthflow_records").fetchall()
    return {(kind, key): json.loads(payload) for kind, key, payload in rows}


def signed(body: bytes, secret: str) -> dict[str, str]:
    """WHOOP's signature: base64 HMAC-SHA256 of the millisecond timestamp header followed by the raw body."""
    stamp = str(int(time.time() * 1000))
    mac = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).digest()
    return {"X-WHOOP-Signature": base64.b64encode(mac).decode(), "X-WHOOP-Signature-Timestamp": stamp,
            "Content-Type": "application/json"}


def sleep_fetches(api: FakeWhoopApi, sleep_id: str) -> int:
    return len([r for r in api.requests if r.path == f"/v2/activity/sleep/{sleep_id}"])


def test_poll_attaches_each_recovery_sleep_and_webhooks_fetch_or_delete(tmp_path, fake_provider, broker, topic,
                                                                         monkeypatch):
    state, out, dlq = f"sqlite:///{tmp_path}/state.db", tmp_path / "out.db", tmp_path / "dlq"
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=1)
    plane, _start = connect_provider(state, fake_provider, "whoop", ACCOUNT, reference_id="athlete-3")

    with FakeWhoopApi(token_validator=fake_provider.is_live) as api:
        load_account(api)
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"whoop": api.manifest},
                        limiter=limiter(topic), clock=lambda: NOW, initial_lookback=timedelta(days=2),
                        overlap=timedelta(0), backoff_s=0.05)
        polling = ConnectionPolling(plane, poller)

        first = polling.poll_once()
        assert [r.kind for r in first.results] == KINDS and first.failed == []
        # the sleep page polled before the recoveries already had MAIN: the sleeps not seen are listed by window
        # (one request: EARLIER is there), and only what that misses (DELETED) is asked by id
        assert (sleep_fetches(api, MAIN), sleep_fetches(api, EARLIER), sleep_fetches(api, DELETED)) == (0, 0, 1)
        assert len([r for r in api.requests if r.path == "/v2/activity/sleep"]) == 2  # the poll's and the hook's
        collections = {endpoint.path for endpoint in WHOOP.manifest.api.endpoints.values()}
        assert {r.params.get("limit") for r in api.served() if r.path in collections} == {"25"}

        counters = deliver(broker, topic, state, out, dlq)
        records = delivered(out)
        # the cycle opened by the 2024-03-10 23:12 (+01:00) sleep covers (and is the Daily of) 2024-03-11
        assert set(records) == {("daily", "2024-03-11"), ("sleep", MAIN), ("sleep", NAP), ("sleep", EARLIER),
                                ("activity", "ecfc6a15-4661-442f-a9a4-f160dd7afae8")}
        main = records[("sleep", MAIN)]
        assert main["metadata"]["start_time"] == "2024-03-10T23:12:00.000000+01:00"
        assert main["readiness_data"] == {"readiness": 67}
        assert main["heart_rate_data"]["summary"] == {"resting_hr_bpm": 51.0, "avg_hrv_rmssd": 58.403}
        assert main["respiration_data"]["oxygen_saturation_data"]["avg_saturation_percentage"] == 95.6875
        assert main["sleep_durations_data"]["asleep"]["duration_deep_sleep_state_seconds"] == 5400.0
        assert records[("sleep", EARLIER)]["metadata"]["start_time"] == "2024-03-09T23:12:00.000000+01:00"
        assert records[("sleep", EARLIER)]["readiness_data"] == {"readiness": 67}
        # the recovery whose sleep is gone is dead-lettered with its bytes and the reason, not dropped
        (letter,) = list(read_dead_letters(str(dlq)))
        assert counters.get("delivered:sql") == 5, counters
        assert letter["kind"] == "recovery" and "the sleep was deleted at WHOOP" in letter["error_message"]
        assert DELETED.encode() in letter["original"]

        # webhooks: recovery.updated names the sleep's UUID; sleep.deleted / workout.deleted name gone records
        monkeypatch.setenv("HEALTHFLOW_WHOOP_CLIENT_SECRET", "secret")  # connect_provider's client secret
        next_sleep, next_recovery = night(NEXT, 1236731499, 1)
        api.add("sleep", [next_sleep])
        api.add("recovery", [{**next_recovery, "score": {**next_recovery["score"], "recovery_score": 34.0}}])
        bodies = [{"user_id": int(ACCOUNT), "id": NEXT, "type": "recovery.updated", "trace_id": "t-1"},
                  {"user_id": int(ACCOUNT), "id": NAP, "type": "sleep.deleted", "trace_id": "t-2"},
                  {"user_id": int(ACCOUNT), "id": "ecfc6a15-4661-442f-a9a4-f160dd7afae8", "type": "workout.deleted",
                   "trace_id": "t-3"}]
        app = create_app(plane)
        raw_before = len(consume_raw(broker.bootstrap, topic))
        app.include_router(router(RawEventPublisher(broker.bootstrap), topic, notes))
        with BackgroundServer() as server:
            server.start(app)
            url = f"{server.url}/v2/providers/whoop/webhook"
            answers = []
            for body in bodies:
                data = json.dumps(body).encode()
                answers.append(requests.post(url, data=data, headers=signed(data, "secret"), timeout=10).json())
        assert answers == [{"status": "accepted"}, {"status": "accepted", "deletions": 1},
                           {"status": "accepted", "deletions": 1}]

        # deletions are raw events of kind "deleted" (nothing fetched) that map to the records' keys
        gone = [raw for raw, _ in consume_raw(broker.bootstrap, topic)[raw_before:]]
        assert [(g["kind"], g["user_id"]) for g in gone] == [("deleted", ACCOUNT)] * 2
        assert [item for g in gone for item in WHOOP.normalize(json.loads(g["payload"]), g["kind"], g["user_id"])] \
            == [Deletion("sleep", NAP, ACCOUNT), Deletion("activity", "ecfc6a15-4661-442f-a9a4-f160dd7afae8",
                                                          ACCOUNT)]

        # the recovery notification fetches that sleep and its cycle's recovery, not the recovery collection
        served = len(api.requests)
        fetched = NotificationFetcher(polling).run_once(broker.bootstrap, notes, group="fetch")
        assert [(r.kind, r.published) for r in fetched.fetched.results] == [("recovery", 1)]
        assert [r.path for r in api.requests[served:]] == [f"/v2/activity/sleep/{NEXT}",
                                                          "/v2/cycle/1236731499/recovery"]
        (published,) = [raw for raw, _ in consume_raw(broker.bootstrap, topic)[raw_before + 2:]]
        assert published["kind"] == "recovery"
        (fragment,) = WHOOP.normalize(json.loads(published["payload"]), "recovery", published["user_id"])
        assert fragment.data["metadata"]["summary_id"] == NEXT
        assert fragment.data["metadata"]["start_time"] == "2024-03-11T23:12:00.000000+01:00"
        assert fragment.data["readiness_data"] == {"readiness": 34}

        # through the pipeline: the deleted nap and workout disappear, the new night arrives with its recovery
        counters = deliver(broker, topic, state, out, dlq)
        assert counters.get("deleted:sql") == 2, counters
        records = delivered(out)
        assert ("sleep", NAP) not in records and ("activity", "ecfc6a15-4661-442f-a9a4-f160dd7afae8") not in records
        assert records[("sleep", NEXT)]["readiness_data"] == {"readiness": 34}
        assert records[("sleep", MAIN)]["readiness_data"] == {"readiness": 67}

        # recovery.deleted: the sleep is fetched again with its cycle's recovery (none left) and replaces the Sleep
        api.delete("recovery", MAIN)
        note = {"user_id": int(ACCOUNT), "id": MAIN, "type": "recovery.deleted", "trace_id": "t-4"}
        publish(broker.bootstrap, notes, [RawPayload("whoop", json.dumps(note).encode(), kind="notification",
                                                     user_id=ACCOUNT)])
        served = len(api.requests)
        fetched = NotificationFetcher(polling).run_once(broker.bootstrap, notes, group="fetch")
        assert [(r.kind, r.published) for r in fetched.fetched.results] == [("sleep", 1)]
        assert [r.path for r in api.requests[served:]] == [f"/v2/activity/sleep/{MAIN}",
                                                          "/v2/cycle/1236731435/recovery"]
        deliver(broker, topic, state, out, dlq)
        main = delivered(out)[("sleep", MAIN)]
        assert "readiness_data" not in main and "heart_rate_data" not in main
        assert main["metadata"]["start_time"] == "2024-03-10T23:12:00.000000+01:00"
        assert main["sleep_durations_data"]["asleep"]["duration_deep_sleep_state_seconds"] == 5400.0
        publisher.close()
    plane.close()


def test_recoveries_polled_before_their_sleeps_cost_one_windowed_sleep_request(tmp_path, fake_provider, broker,
                                                                               topic):
    """First poll after connecting (or a restart), recovery polled before sleep: the sleeps of the recovery page are
    listed with one windowed GET /v2/activity/sleep, not one GET per recovery; only a sleep it misses (deleted at
    WHOOP) is asked by id. WHOOP allows 100 requests a minute, app-wide."""
    state = f"sqlite:///{tmp_path}/state.db"
    plane, _start = connect_provider(state, fake_provider, "whoop", ACCOUNT, reference_id="athlete-3")
    nights = [night(f"{n:08x}-7b2d-4e8f-a1c3-9d6b2e4f7a10", 1236731435 - n, -n) for n in range(12)]
    _, deleted_recovery = night(DELETED, 1236300002, -3)
    with FakeWhoopApi(token_validator=fake_provider.is_live) as api:
        api.add("sleep", [sleep for sleep, _ in nights])
        api.add("recovery", [*(recovery for _, recovery in nights), deleted_recovery])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"whoop": api.manifest},
                        limiter=limiter(topic), clock=lambda: NOW, initial_lookback=timedelta(days=14),
                        overlap=timedelta(0), backoff_s=0.05)
        polling = ConnectionPolling(plane, poller)
        (target,) = polling.targets()
        report = PollReport()
        polling.poll(target, "recovery", report)
        assert report.failed == []
        assert [(r.path, r.params.get("start"), r.params.get("end")) for r in api.requests] == [
            ("/v2/recovery", "2024-02-27T12:00:00.000Z", "2024-03-12T12:00:00.000Z"),
            ("/v2/activity/sleep", "2024-02-28T06:15:20.684Z", "2024-03-11T06:16:20.684Z"),
            (f"/v2/activity/sleep/{DELETED}", None, None)]
        (page,) = [json.loads(raw["payload"]) for raw, _ in consume_raw(broker.bootstrap, topic)]
        assert {r["sleep_id"]: r.get("sleep", {}).get("id") for r in page["records"]} == {
            **{sleep["id"]: sleep["id"] for sleep, _ in nights}, DELETED: None}
        publisher.close()
    plane.close()
