"""Polar AccessLink's whole life of a connection, with Polar's rules: connect → register the user → poll →
normalize → deliver → the token is rejected (no refresh token: the connection is revoked) → deauth (deregistered).

Real OAuth client code (``PolarOAuth``) against a fake Polar OAuth server (one long-lived token, no refresh token,
``x_user_id``), a fake AccessLink that only serves registered users and only the live tokens that server issued,
the real poll hook (``PolarHook``), Redis rate limits, the Tansu broker, the Beam pipeline and a SQLite destination.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from connectors import registry
from connectors.oauth import ProviderSettings, oauth_class
from connectors.providers.polar.client import PolarOAuth
from connectors.publish import publish
from controlplane.auth import MemoryCollector
from controlplane.polling import (
    ConnectionPolling,
    CursorStore,
    KafkaPublisher,
    NotificationFetcher,
    Poller,
    RedisRateLimiter,
)
from core.errors import PermanentError, RetryableError
from core.raw import RawPayload
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api", "servers.fake_polar")
from servers.fake_polar import FakePolarApi, FakePolarAuth  # noqa: E402
from servers.fake_provider import authorize, connect_provider, query_of  # noqa: E402
from servers.fake_provider_api import consume_raw  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "polar"
ATHLETE, TRAVELLER = "45395466", "61209842"  # the Polar users the fixtures belong to
NOW = datetime(2024, 3, 13, 12, 0, tzinfo=UTC)  # the fixtures' data is of 2024-03-11 and 2024-03-12
KINDS = ["exercises", "sleep", "nightly-recharge", "continuous-heart-rate", "activities",
         "physical-info"]  # every endpoint of the manifest


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def polar():
    with FakePolarAuth() as auth, FakePolarApi(auth=auth) as api:
        yield auth, api


def make_polling(plane: Any, api: FakePolarApi, state: str, publisher: KafkaPublisher, topic: str
                 ) -> ConnectionPolling:
    """Every Polar kind of every active connection, through the real Polar hook (the default hooks)."""
    poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"polar": api.manifest},
                    limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                    clock=lambda: NOW, backoff_s=0.05)
    return ConnectionPolling(plane, poller)


def deliver(broker: Any, topic: str, tmp_path: Path, state: str) -> dict[str, int]:
    """Run the normalize job over the topic; its counters."""
    return run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                  [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                  state_url=state)).counters


def delivered(tmp_path: Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """(user_id, reference_id, type, natural_key) → payload of every row at the destination."""
    with sqlite3.connect(tmp_path / "out.db") as conn:
        rows = conn.execute("SELECT r.user_id, u.reference_id, r.type, r.natural_key, r.payload FROM "
                            "healthflow_records r JOIN healthflow_users u ON u.user_id = r.user_id").fetchall()
    return {(user, ref, kind, key): json.loads(payload) for user, ref, kind, key, payload in rows}


def test_connect_register_poll_deliver_token_rejected_deauth(tmp_path, polar, broker, topic):
    auth, api = polar
    state = f"sqlite:///{tmp_path}/state.db"
    events = MemoryCollector()

    # connect: the code exchange, then the user is registered with the new token before the connection is active
    plane, athlete = connect_provider(state, auth, "polar", ATHLETE, emit=events, reference_id="athlete-9",
                                      api_base=api.base_url)
    assert api.registration_requests == [{"account": ATHLETE, "member-id": ATHLETE, "accept": "application/json"}]
    assert api.registered == {ATHLETE: ATHLETE}
    connection = plane.connection(athlete.user_id)
    assert (connection.state, connection.provider_user_id) == ("active", ATHLETE)  # from x_user_id
    assert plane.tokens(athlete.user_id).refresh_token is None  # Polar issues none
    athlete_token = plane.tokens(athlete.user_id).access_token

    # a second Polar user connects through the same control plane
    auth.next_account = TRAVELLER
    traveller = plane.start_auth("dev-1", "polar", reference_id="athlete-2")
    assert plane.complete_auth("polar", query_of(authorize(traveller.auth_url))).ok
    assert api.registered == {ATHLETE: ATHLETE, TRAVELLER: TRAVELLER}
    traveller_token = plane.tokens(traveller.user_id).access_token

    api.add_user_data(ATHLETE, "exercises", [load("exercises.json")])
    api.add_user_data(ATHLETE, "sleep", load("sleep.json")["nights"])
    api.add_user_data(ATHLETE, "nightly-recharge", load("nightly-recharge.json")["recharges"])
    api.add_user_data(ATHLETE, "continuous-heart-rate", load("continuous-heart-rate.range.json")["heart_rates"])
    api.add_user_data(ATHLETE, "activities", [load("activities.json")])
    api.add_user_data(ATHLETE, "physical-info", [load("physical-info.json")])
    api.add_user_data(TRAVELLER, "exercises", [load("exercises.denver.json")])
    api.add_user_data(TRAVELLER, "physical-info", [dict(load("physical-info.json"), weight=81.3, height=184.0,
                                                        modified="2024-03-12T06:10:00Z")])

    publisher = KafkaPublisher(broker.bootstrap, topic)
    polling = make_polling(plane, api, state, publisher, topic)
    first = polling.poll_once()
    assert first.revoked == [] and first.refreshed == []
    assert sorted((r.user_id, r.kind) for r in first.results) == sorted(
        (user, kind) for user in (athlete.user_id, traveller.user_id) for kind in KINDS)
    # continuous heart rate: the 7-day lookback from midnight in two ranges, the days read with from/to
    ranges = [(r.params["from"], r.params["to"]) for r in api.data_requests(athlete_token)
              if r.kind == "continuous-heart-rate"]
    assert ranges == [("2024-03-06", "2024-03-12"), ("2024-03-13", "2024-03-13")]

    # the hook attached each recharge's night (fetched from /v3/users/sleep) to the published page
    raw = [(event, json.loads(event["payload"])) for event, _ in consume_raw(broker.bootstrap, topic)]
    (recharges,) = [payload for event, payload in raw
                    if event["kind"] == "nightly-recharge" and event["user_id"] == ATHLETE]
    assert [(r["date"], r["sleep"]["date"]) for r in recharges["recharges"]] == [("2024-03-11", "2024-03-11"),
                                                                                 ("2024-03-12", "2024-03-12")]
    assert {(e["user_id"], e["kind"]) for e, p in raw if e["kind"] == "exercises"} == {(ATHLETE, "exercises"),
                                                                                         (TRAVELLER, "exercises")}

    summary = deliver(broker, topic, tmp_path, state)
    rows = delivered(tmp_path)
    athlete_rows = {(kind, key) for user, ref, kind, key in rows if (user, ref) == (athlete.user_id, "athlete-9")}
    assert athlete_rows == {("activity", "Zk3qP9"), ("sleep", "2024-03-11"), ("sleep", "2024-03-12"),
                            ("daily", "2024-03-11"), ("daily", "2024-03-12"), ("body", "2024-03-09")}
    assert {(kind, key) for user, ref, kind, key in rows if (user, ref) == (traveller.user_id, "athlete-2")} == {
        ("activity", "Lq8W2c"), ("body", "2024-03-12")}
    assert len(rows) == summary["delivered:sql"] == 8
    assert not [name for name in summary if "dead_letter" in name]
    # the night completed by its recharge (recovery level), the day's HRV at the night's offset, the day's heart rate
    night = rows[(athlete.user_id, "athlete-9", "sleep", "2024-03-11")]
    assert night["readiness_data"] == {"recovery_level": 4}
    assert night["sleep_durations_data"]["asleep"]["duration_deep_sleep_state_seconds"] == 4140
    day = rows[(athlete.user_id, "athlete-9", "daily", "2024-03-11")]
    assert day["heart_rate_data"]["detailed"]["hrv_samples_rmssd"][0] == {
        "timestamp": "2024-03-10T23:45:00.000000+01:00", "hrv_rmssd": 44}
    assert len(day["heart_rate_data"]["detailed"]["hr_samples"]) == 271
    assert day["distance_data"]["steps"] == 15697  # the daily activity summary, polled from /v3/users/activities
    assert day["calories_data"]["total_burned_calories"] == 2921
    body = rows[(traveller.user_id, "athlete-2", "body", "2024-03-12")]
    assert body["measurements_data"]["measurements"][0]["weight_kg"] == 81.3

    # Polar's webhook says the athlete's night and heart rate of 03-12 changed: both are fetched for the connection
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=1)
    publish(broker.bootstrap, notes, [RawPayload("polar", json.dumps(note).encode(), kind="notification",
                                                 user_id=str(note.get("user_id")))
                                      for note in ({"event": "PING", "timestamp": "2024-03-13T07:00:00Z"},
                                                   {"event": "SLEEP", "user_id": int(ATHLETE), "date": "2024-03-12",
                                                    "timestamp": "2024-03-13T07:01:00Z"},
                                                   {"event": "CONTINUOUS_HEART_RATE", "user_id": int(ATHLETE),
                                                    "date": "2024-03-12", "timestamp": "2024-03-13T07:02:00Z"},
                                                   {"event": "ACTIVITY_SUMMARY", "user_id": int(ATHLETE),
                                                    "date": "2024-03-12", "timestamp": "2024-03-13T07:03:00Z"})])
    fetched = NotificationFetcher(polling).run_once(broker.bootstrap, notes, group="fetch")
    assert fetched.ignored == 1 and fetched.fetched.failed == []  # the PING
    assert [(r.user_id, r.kind) for r in fetched.fetched.results] == [
        (athlete.user_id, "sleep"), (athlete.user_id, "nightly-recharge"), (athlete.user_id, "continuous-heart-rate"),
        (athlete.user_id, "activities")]
    assert [(r.params["from"], r.params["to"]) for r in api.data_requests(athlete_token)
            if r.kind == "continuous-heart-rate"][-1] == ("2024-03-12", "2024-03-12")  # the day it named
    assert [(r.params["from"], r.params["to"]) for r in api.data_requests(athlete_token)
            if r.kind == "activities"][-1] == ("2024-03-12", "2024-03-12")

    # the traveller disconnects: Polar deregisters them (DELETE /v3/users/{id}) and their token dies
    plane.deauthenticate(traveller.user_id)
    assert api.deregistration_requests == [TRAVELLER]
    assert api.registered == {ATHLETE: ATHLETE} and not auth.is_live(traveller_token)
    assert plane.connection(traveller.user_id).state == "deauth" and plane.tokens(traveller.user_id) is None

    # the athlete withdraws access at Polar: the next poll's 401 cannot be refreshed away, the connection is revoked
    auth.revoke_account(ATHLETE)
    served = len(api.data_requests(traveller_token))
    second = polling.poll_once()
    assert second.revoked == [athlete.user_id] and second.results == []
    assert len(api.data_requests(traveller_token)) == served  # the deauthenticated connection was not polled
    assert plane.connection(athlete.user_id).state == "revoked" and plane.tokens(athlete.user_id) is None

    # nothing is polled any more
    requests_before = len(api.requests)
    assert polling.poll_once().results == [] and len(api.requests) == requests_before
    publisher.close()
    assert [e["type"] for e in events.events] == ["auth", "auth", "deauth", "access_revoked"]
    assert events.events[-1]["user"]["user_id"] == athlete.user_id
    assert events.events[2]["user"]["user_id"] == traveller.user_id
    plane.close()


@pytest.mark.parametrize("status", [403, 500])
def test_a_refused_registration_leaves_no_active_connection(tmp_path, polar, status):
    """403 (the user has not accepted Polar's consents) or 500: the connection is abandoned, never active."""
    auth, api = polar
    events = MemoryCollector()
    plane, athlete = connect_provider(f"sqlite:///{tmp_path}/state.db", auth, "polar", ATHLETE, emit=events,
                                      api_base=api.base_url)
    api.refuse_registration(status)
    auth.next_account = TRAVELLER
    start = plane.start_auth("dev-1", "polar", reference_id="athlete-2")
    outcome = plane.complete_auth("polar", query_of(authorize(start.auth_url)))
    assert not outcome.ok and outcome.reason == "token_exchange_failed"
    assert f"HTTP {status}" in outcome.message
    assert [c.user_id for c in plane.active_connections()] == [athlete.user_id]
    assert plane.tokens(start.user_id) is None
    assert TRAVELLER not in api.registered
    assert [e["type"] for e in events.events] == ["auth", "auth_cancelled"]
    plane.close()


def test_reconnecting_a_registered_user_is_fine(tmp_path, polar):
    """409 (already registered, e.g. a second connection of the same Polar user) still connects."""
    auth, api = polar
    plane, first = connect_provider(f"sqlite:///{tmp_path}/state.db", auth, "polar", ATHLETE, api_base=api.base_url)
    again = plane.start_auth("dev-1", "polar", reference_id="athlete-1")
    assert plane.complete_auth("polar", query_of(authorize(again.auth_url))).ok
    assert [r["account"] for r in api.registration_requests] == [ATHLETE, ATHLETE]
    assert [c.user_id for c in plane.active_connections()] == [again.user_id]  # the new one supersedes the old
    assert plane.connection(first.user_id).state == "deauth"
    plane.close()


def test_users_calls_follow_the_error_taxonomy(tmp_path, polar):
    """Registration and deregistration with the real client: 409 and 404 are fine; 429/5xx/network retryable, other
    4xx permanent."""
    auth, api = polar
    assert oauth_class("polar") is PolarOAuth
    plane, athlete = connect_provider(f"sqlite:///{tmp_path}/state.db", auth, "polar", ATHLETE, api_base=api.base_url)
    token = plane.tokens(athlete.user_id).token
    oauth = PolarOAuth(registry()["polar"].manifest, ProviderSettings("polar-client", "secret", api_base=api.base_url))
    oauth.after_connect(token, ATHLETE)  # 409: already registered
    for status, error in ((500, RetryableError), (429, RetryableError), (403, PermanentError)):
        api.refuse_registration(status)
        with pytest.raises(error, match=f"HTTP {status}"):
            oauth.after_connect(token, ATHLETE)
    unreachable = PolarOAuth(registry()["polar"].manifest,
                             ProviderSettings("polar-client", "secret", api_base="http://127.0.0.1:9"))
    with pytest.raises(RetryableError, match="user registration"):
        unreachable.after_connect(token, ATHLETE)

    with pytest.raises(PermanentError, match="HTTP 403"):
        oauth.disconnect(token, TRAVELLER)  # another user's id
    del api.registered[ATHLETE]
    oauth.disconnect(token, ATHLETE)  # 404: not registered (any more) is fine too
    api.registered[ATHLETE] = ATHLETE
    oauth.disconnect(token, ATHLETE)  # 204: deregistered, and the token revoked by Polar
    assert api.deregistration_requests == [TRAVELLER, ATHLETE, ATHLETE] and ATHLETE not in api.registered
    with pytest.raises(PermanentError, match="HTTP 401"):
        oauth.disconnect(token, ATHLETE)  # the token died with the registration
    plane.close()
