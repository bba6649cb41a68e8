"""Fitbit end to end: connect → poll every endpoint → normalize → deliver → notification → refresh → deauth.

Real OAuth client code (PKCE S256, Basic client auth, Fitbit's ``user_id`` in the token answer) against the fake
OAuth server; a fake Fitbit Web API (``servers.fake_fitbit``) answering in Fitbit's shapes and accepting exactly the
tokens that server issued and still considers live; Redis rate limits; the Tansu broker; the Beam pipeline; a
SQLite destination; the API's webhook route over real HTTP. Documents are the fixtures of ``tests/fixtures/fitbit``
(a Berlin user), moved to other dates where a second night or day is needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from connectors import get_provider
from connectors.base import MappingError
from connectors.publish import RawEventPublisher
from controlplane.api.app import create_app
from controlplane.api.server import BackgroundServer
from controlplane.auth import MemoryCollector
from controlplane.polling import (
    ConnectionPolling,
    CursorStore,
    KafkaPublisher,
    NotificationFetcher,
    Poller,
    RedisRateLimiter,
)
from controlplane.polling.poller import PollConnection
from controlplane.webhooks import router
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from schemas.serde import validate_record
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api", "servers.fake_fitbit")
from servers.fake_fitbit import FakeFitbitApi  # noqa: E402
from servers.fake_provider import assert_disconnected, connect_provider  # noqa: E402
from servers.fake_provider_api import consume_raw  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "fitbit"
FITBIT = get_provider("fitbit")
ACCOUNT = "7QK2XB"  # Fitbit's encoded user id (token answer "user_id", notification "ownerId")
NOW = datetime(2024, 3, 12, 12, 0, tzinfo=UTC)
KINDS = list(FITBIT.manifest.api.endpoints)  # manifest order: sleep before spo2, hrv, br
MAIN_11, NAP_11, MAIN_12, MAIN_13 = "45012233871", "45019870112", "45020000012", "45020000013"
RUN_11 = "61234567890"


def fixture(name: str) -> Any:
    """A fixture as Fitbit sends it: without the fields the poller adds (``_profile``, ``_units``, ``_date``…)."""
    doc = json.loads((FIXTURES / name).read_text())
    return {k: v for k, v in doc.items() if not k.startswith("_")} if isinstance(doc, dict) else doc


def shifted(doc: Any, days: int, **changes: Any) -> Any:
    """``doc`` with every date in it (times, links, dateOfSleep) moved by ``days``."""
    text = re.sub(r"\d{4}-\d{2}-\d{2}", lambda m: (date.fromisoformat(m[0]) + timedelta(days=days)).isoformat(),
                  json.dumps(doc))
    return {**json.loads(text), **changes}


def night(ends: date, log_id: str) -> dict[str, Any]:
    """The fixture's main sleep (23:12 → 06:58 Berlin), moved to the night that ends on ``ends``."""
    main = fixture("sleep.json")["sleep"][0]
    return shifted(main, (ends - date(2024, 3, 11)).days, logId=int(log_id))


def load_account(api: FakeFitbitApi) -> None:
    """Two days of a Berlin user: 2024-03-11 from the fixtures, 2024-03-12 moved from them."""
    runs = fixture("activities.json")["activities"]
    api.add("activities", runs + [shifted(log, 1, logId=log["logId"] + 1_000) for log in runs[:2]])
    api.add_day("activity_summary", "2024-03-11", fixture("activity_summary.json"))
    api.add("sleep", fixture("sleep.json")["sleep"] + [night(date(2024, 3, 12), MAIN_12)])
    api.add("weight", fixture("weight.json")["weight"])
    # a fat reading of its own between the day's two weigh-ins: merged as separate lists, one would lose the other
    api.add("fat", fixture("fat.json")["fat"] + [{"date": "2024-03-11", "fat": 21.0, "logId": 1710154800000,
                                                   "source": "Web", "time": "12:00:00"}])
    api.add_day("foods", "2024-03-11", fixture("foods.json"))
    api.add_day("water", "2024-03-11", {"summary": {"water": 1750.0}, "water": [
        {"amount": 500.0, "logId": 8841203311}, {"amount": 1250.0, "logId": 8841209874}]})
    spo2 = {k: fixture("spo2.json")[k] for k in ("dateTime", "value")}
    api.add("spo2", [spo2, {"dateTime": "2024-03-12", "value": {"avg": 95.8, "min": 92.9, "max": 98.1}}])
    api.add("hrv", fixture("hrv.json")["hrv"] + [{"dateTime": "2024-03-12", "value": {"dailyRmssd": 38.7,
                                                                                       "deepRmssd": 44.0}}])
    api.add("br", fixture("br.json")["br"] + [{"dateTime": "2024-03-12", "value": {"breathingRate": 15.1}}])


def limiter(namespace: str) -> RedisRateLimiter:
    return RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=namespace)


def mapped(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A published raw event through the Fitbit mappers; every record must pass the Avro schema."""
    fragments = FITBIT.normalize(json.loads(raw["payload"]), kind=raw["kind"], user_id=raw["user_id"])
    return [(f.type, validate_record(f.type, f.data)) for f in fragments]


# ----------------------------------------------------------------------------------------------------------------------
# every kind of the manifest, polled, maps
# ----------------------------------------------------------------------------------------------------------------------
def test_every_manifest_kind_maps_from_what_the_poller_publishes(tmp_path, broker, topic):
    with FakeFitbitApi(activities_page_cap=2) as api:
        load_account(api)
        # a night Fitbit has metrics for but no main sleep (the sleep log was deleted)
        api.add("spo2", [{"dateTime": "2024-03-10", "value": {"avg": 96.0, "min": 93.0, "max": 98.0}}])
        api.add("br", [{"dateTime": "2024-03-10", "value": {"breathingRate": 14.0}}])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(f"sqlite:///{tmp_path}/state.db"), publisher=publisher,
                        manifests={"fitbit": api.manifest}, limiter=limiter(topic), clock=lambda: NOW,
                        initial_lookback=timedelta(days=2), backoff_s=0.05)
        connection = PollConnection("hf-fitbit-user", "fitbit", ACCOUNT)
        for kind in KINDS:
            poller.poll(connection, kind, lambda: "token-1")
        publisher.close()

        # the activity list pages by offset until pagination.next is empty; the profile is read once
        assert [r.params["offset"] for r in api.served("activities")] == ["0", "2", "4"]
        assert {r.params["afterDate"] for r in api.served("activities")} == {"2024-03-10"}
        assert len([r for r in api.requests if r.path == "/1/user/-/profile.json"]) == 1
        # spo2/hrv/br reuse the main sleeps the sleep poll saw; only the night without one is asked again
        assert [r.path for r in api.served("sleep")] == ["/1.2/user/-/sleep/date/2024-03-10/2024-03-12.json"] + \
            ["/1.2/user/-/sleep/date/2024-03-10/2024-03-10.json"] * 2  # spo2, br

    events = [raw for raw, _ in consume_raw(broker.bootstrap, topic)]
    assert {e["user_id"] for e in events} == {ACCOUNT}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_kind.setdefault(event["kind"], []).append(json.loads(event["payload"]))
    assert set(by_kind) == set(KINDS)
    for payloads in by_kind.values():
        assert all(p["_profile"] == {"timezone": "Europe/Berlin", "offsetFromUTCMillis": 3600000} for p in payloads)
    assert sorted(p["_date"] for p in by_kind["activity_summary"]) == ["2024-03-10", "2024-03-11", "2024-03-12"]

    # the nightly values carry only what the mappers read of their main sleeps; a night without one goes apart
    with_sleep, without = by_kind["br"]
    assert [log["logId"] for log in with_sleep["_sleep"]] == [int(MAIN_11), int(MAIN_12)]
    assert set(with_sleep["_sleep"][0]) == {"logId", "dateOfSleep", "startTime", "endTime", "isMainSleep", "logType"}
    assert "_sleep" not in without and [e["dateTime"] for e in without["br"]] == ["2024-03-10"]
    with pytest.raises(MappingError, match="attach the sleep response"):
        mapped(next(e for e in events if e["kind"] == "br" and "_sleep" not in json.loads(e["payload"])))

    records: dict[str, set[tuple[str, str]]] = {}
    for event in events:
        if event["kind"] == "br" and "_sleep" not in json.loads(event["payload"]):
            continue
        for model, record in mapped(event):
            assert model in FITBIT.kinds[event["kind"]].models
            key = record["metadata"].get("summary_id") or record["metadata"]["start_time"][:10]
            records.setdefault(event["kind"], set()).add((model, key))
    days = {("daily", d) for d in ("2024-03-10", "2024-03-11", "2024-03-12")}
    assert records == {
        "activities": {("activity", RUN_11), ("activity", "61234600112"), ("activity", "61235044871"),
                       ("activity", "61234568890"), ("activity", "61234601112")},
        "activity_summary": days,
        "sleep": {("sleep", MAIN_11), ("sleep", NAP_11), ("sleep", MAIN_12)},
        "weight": {("body", "2024-03-11"), ("body", "2024-03-12")},
        "foods": {("nutrition", d) for _, d in days},
        "water": {("nutrition", d) for _, d in days},
        "spo2": days | {("sleep", MAIN_11), ("sleep", MAIN_12)},  # 03-10: its Daily only
        "hrv": {("daily", "2024-03-11"), ("daily", "2024-03-12"), ("sleep", MAIN_11), ("sleep", MAIN_12)},
        "br": {("sleep", MAIN_11), ("sleep", MAIN_12)},
    }


# ----------------------------------------------------------------------------------------------------------------------
# the whole life of a Fitbit connection
# ----------------------------------------------------------------------------------------------------------------------
def signed(body: bytes, client_secret: str) -> dict[str, str]:
    """Fitbit's subscription signature: base64 HMAC-SHA1 of the body, keyed with the client secret and "&"."""
    mac = hmac.new(f"{client_secret}&".encode(), body, hashlib.sha1).digest()
    return {"X-Fitbit-Signature": base64.b64encode(mac).decode(), "Content-Type": "application/json"}


def deliver(broker, topic: str, state: str, out: Path, dlq: Path) -> int:
    summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                     [SqlSink("sql", f"sqlite:///{out}")], str(dlq), state_url=state))
    failed = {name: n for name, n in summary.counters.items() if n and ("dead" in name or name == "raw_partial")}
    assert not failed, summary.counters
    return summary.get("delivered:sql")


def delivered(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``(type, natural key) → payload`` of every delivered record, with the connection's ids checked by the caller."""
    with sqlite3.connect(out) as conn:
        rows = conn.execute("SELECT r.user_id, u.reference_id, r.type, r.natural_key, r.payload "
                            "FROM healthflow_records r JOIN healthflow_users u ON u.user_id = r.user_id").fetchall()
    return {(kind, key): {"user": (user, reference), **json.loads(payload)} for user, reference, kind, key, payload
            in rows}


def test_connect_poll_notify_refresh_deauth(tmp_path, fake_provider, broker, topic, monkeypatch):
    state, out, dlq = f"sqlite:///{tmp_path}/state.db", tmp_path / "out.db", tmp_path / "dlq"
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=1)
    events = MemoryCollector()

    # connect: the real OAuth client, with PKCE S256 and the client secret in a Basic header
    plane, start = connect_provider(state, fake_provider, "fitbit", ACCOUNT, emit=events, reference_id="athlete-7")
    (asked,) = fake_provider.authorize_requests
    assert asked["code_challenge_method"] == "S256" and asked["code_challenge"]
    (exchange,) = fake_provider.token_requests
    assert exchange["grant_type"] == "authorization_code" and exchange["code_verifier"]
    assert "client_secret" not in exchange  # the fake only accepts it in the Basic header for this client
    connection = plane.connection(start.user_id)
    assert (connection.provider, connection.provider_user_id) == ("fitbit", ACCOUNT)  # from the token's user_id

    clock = [NOW]
    with FakeFitbitApi(activities_page_cap=2, token_validator=fake_provider.is_live) as api:
        load_account(api)
        publisher = KafkaPublisher(broker.bootstrap, topic)
        # the real per-user limit (150/h); a large burst share, since one round here asks ~20 pages at once
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"fitbit": api.manifest},
                        limiter=limiter(topic), clock=lambda: clock[0], initial_lookback=timedelta(days=2),
                        overlap=timedelta(0), backoff_s=0.05, burst_fraction=0.9)
        polling = ConnectionPolling(plane, poller)

        # poll: every endpoint of the manifest, with the connection's token
        first = polling.poll_once()
        assert [r.kind for r in first.results] == KINDS and first.refreshed == []
        assert {r.token for r in api.requests} == {plane.tokens(start.user_id).token["access_token"]}
        assert deliver(broker, topic, state, out, dlq) > 0
        records = delivered(out)
        assert {r["user"] for r in records.values()} == {(start.user_id, "athlete-7")}
        assert set(records) == {
            ("activity", RUN_11), ("activity", "61234600112"), ("activity", "61235044871"),
            ("activity", "61234568890"), ("activity", "61234601112"),
            ("sleep", MAIN_11), ("sleep", NAP_11), ("sleep", MAIN_12),
            ("daily", "2024-03-10"), ("daily", "2024-03-11"), ("daily", "2024-03-12"),
            ("nutrition", "2024-03-10"), ("nutrition", "2024-03-11"), ("nutrition", "2024-03-12"),
            ("body", "2024-03-11"), ("body", "2024-03-12")}
        # the night's SpO2, HRV and breathing rate completed the sleep they were measured in
        main = records[("sleep", MAIN_11)]
        assert main["metadata"]["start_time"] == "2024-03-10T23:12:00.000000+01:00"
        assert main["respiration_data"]["breaths_data"]["avg_breaths_per_min"] == 14.6
        assert main["respiration_data"]["oxygen_saturation_data"]["avg_saturation_percentage"] == 96.4
        assert main["heart_rate_data"]["summary"]["avg_hrv_rmssd"] == 41.2
        assert main["sleep_durations_data"]["asleep"]["duration_asleep_state_seconds"] == 418 * 60
        assert records[("sleep", MAIN_12)]["respiration_data"]["breaths_data"]["avg_breaths_per_min"] == 15.1
        day = records[("daily", "2024-03-11")]
        assert day["distance_data"]["steps"] == 12873 and day["oxygen_data"]["avg_saturation_percentage"] == 96.4
        assert records[("nutrition", "2024-03-11")]["summary"]["water_ml"] == 1750.0
        weights = records[("body", "2024-03-11")]["measurements_data"]["measurements"]
        assert [(m.get("weight_kg"), m.get("bodyfat_percentage")) for m in weights] == [
            (72.4, 21.3), (None, 21.0), (71.9, None)]

        # a signed subscription notification, over HTTP into the API, queued, then fetched for this connection
        monkeypatch.setenv("HEALTHFLOW_FITBIT_CLIENT_SECRET", "secret")  # connect_provider's client secret
        clock[0] = NOW + timedelta(days=1)
        api.add("sleep", [night(date(2024, 3, 13), MAIN_13)])
        note = json.dumps([{"collectionType": "sleep", "date": "2024-03-13", "ownerId": ACCOUNT, "ownerType": "user",
                            "subscriptionId": "hf-1"}]).encode()
        app = create_app(plane)
        app.include_router(router(RawEventPublisher(broker.bootstrap), topic, notes))
        with BackgroundServer() as server:
            server.start(app)
            url = f"{server.url}/v2/providers/fitbit/webhook"
            forged = requests.post(url, data=note, headers=signed(note, "not-the-secret"), timeout=10)
            assert forged.status_code == 401
            assert requests.post(url, data=note, headers=signed(note, "secret"), timeout=10).status_code == 204
        sleep_pages = len(api.served("sleep"))
        fetched = NotificationFetcher(polling).run_once(broker.bootstrap, notes, group="fetch")
        assert [r.kind for r in fetched.fetched.results] == ["sleep"] and fetched.fetched.results[0].published == 1
        assert fetched.ignored == 0 and fetched.revoked == []  # revocations: test_notification_lifecycle
        assert [r.path for r in api.served("sleep")[sleep_pages:]] == [
            "/1.2/user/-/sleep/date/2024-03-13/2024-03-13.json"]  # the date the notification names
        assert deliver(broker, topic, state, out, dlq) >= 1  # the new night
        assert delivered(out)[("sleep", MAIN_13)]["metadata"]["end_time"] == "2024-03-13T06:58:00.000000+01:00"

        # the access token expires at Fitbit: 401, one refresh (the refresh token rotates), the poll goes on
        refresh_token = plane.tokens(start.user_id).token["refresh_token"]
        fake_provider.expire_access_tokens()
        clock[0] = NOW + timedelta(days=2)
        api.add("activities", [shifted(fixture("activities.json")["activities"][0], 3, logId=61234599999)])
        second = polling.poll_once()
        assert second.refreshed == [start.user_id] and [r.kind for r in second.results] == KINDS
        assert fake_provider.calls["token:refresh_token"] == 1 and fake_provider.reused_refresh_tokens == []
        assert plane.tokens(start.user_id).token["refresh_token"] != refresh_token
        assert deliver(broker, topic, state, out, dlq) > 0
        assert ("activity", "61234599999") in delivered(out)

        # the user disconnects: the grant is revoked at Fitbit, tokens gone, a deauth event, nothing polled any more
        live_refresh = plane.tokens(start.user_id).token["refresh_token"]
        plane.deauthenticate(start.user_id)
        assert fake_provider.calls["revoke"] == 2 and live_refresh in fake_provider.revoked_tokens
        assert fake_provider.live_refresh_tokens() == []
        assert_disconnected(plane, polling, api, start.user_id, events)
        publisher.close()
    plane.close()
