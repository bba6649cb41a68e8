"""The whole life of a Google Health connection: connect → poll → normalize → deliver → refresh → deauth.

The real OAuth client code (``connectors.providers.google_health.client``: offline access) against the fake OAuth
server, the account named by the real profile call (``/v4/users/me/identity``) and the data read from a fake Google
Health API (``servers.fake_google_health``: filter expressions, ``pageToken`` pagination) that accepts exactly the
tokens the OAuth server issued and still considers live; Redis rate limits, the test broker, the Beam pipeline
and a SQLite destination.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, date, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from controlplane.auth import MemoryCollector
from controlplane.polling import ConnectionPolling, CursorStore, KafkaPublisher, Poller, RedisRateLimiter
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_google_health")
from servers.fake_google_health import FakeGoogleHealth  # noqa: E402
from servers.fake_provider import assert_disconnected, connect_provider  # noqa: E402

NOW = datetime(2026, 4, 12, 18, 0, tzinfo=UTC)
PDT = "-25200s"
ACCOUNT = "hU7x9Kq2Lm"
KINDS = ["steps", "daily-heart-rate-variability"]


def steps(at: datetime, count: int) -> dict:
    end = at + timedelta(minutes=1)
    return {"steps": {"interval": {"startTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "startUtcOffset": PDT,
                                   "endTime": end.strftime("%Y-%m-%dT%H:%M:%SZ"), "endUtcOffset": PDT},
                      "count": str(count)}}


def hrv(day: date, rmssd: float) -> dict:
    return {"dailyHeartRateVariability": {"date": {"year": day.year, "month": day.month, "day": day.day},
                                          "averageHeartRateVariabilityMilliseconds": rmssd}}


def normalize(broker, topic: str, tmp_path, state: str) -> dict:
    return run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                  [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                  state_url=state))


def test_connect_poll_deliver_refresh_deauth(tmp_path, fake_provider, broker, topic):
    state = f"sqlite:///{tmp_path}/state.db"
    events = MemoryCollector()
    fake_provider.include_user_id = False  # Google's token answer does not name the user: the identity call does
    fake_provider.rotate = False  # Google keeps the refresh token
    with FakeGoogleHealth(account=ACCOUNT, token_validator=fake_provider.is_live, max_page=2) as api:
        plane, start = connect_provider(state, fake_provider, "google_health", "google-account", emit=events,
                                        reference_id="athlete-7", api_base=api.base_url)
        authorize = parse_qs(urlsplit(start.auth_url).query)
        assert authorize["access_type"] == ["offline"] and authorize["prompt"] == ["consent"]
        assert authorize["code_challenge_method"] == ["S256"]
        assert set(authorize["scope"][0].split()) == {
            f"https://www.googleapis.com/auth/googlehealth.{scope}.readonly"
            for scope in ("activity_and_fitness", "health_metrics_and_measurements", "sleep")}
        assert plane.tokens(start.user_id) is not None
        assert api.requests[0][0] == "/v4/users/me/identity"

        # 13:05Z is 06:05 PDT: five mornings, the last one today; HRV for the three days before today
        api.add("steps", [steps(datetime(2026, 4, 8 + i, 13, 5, tzinfo=UTC), 100 + i) for i in range(5)])
        api.add("daily-heart-rate-variability", [hrv(date(2026, 4, 9 + i), 40.5 + i) for i in range(3)])
        clock = [NOW]
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"google_health": api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: clock[0], overlap=timedelta(0), backoff_s=0.05)
        polling = ConnectionPolling(plane, poller, kinds=lambda _: KINDS)

        first = polling.poll_once()
        assert {r.kind: r.published for r in first.results} == {"steps": 3, "daily-heart-rate-variability": 2}
        step_filters = [p["filter"] for p in api.served("steps")]
        assert step_filters[0] == ('steps.interval.start_time >= "2026-04-05T18:00:00.000Z" AND '
                                   'steps.interval.start_time < "2026-04-12T18:00:00.000Z"')
        assert [p.get("pageToken") is not None for p in api.served("steps")] == [False, True, True]
        assert api.served("daily-heart-rate-variability")[0]["filter"] == \
            'daily_heart_rate_variability.date >= "2026-04-05"'

        assert normalize(broker, topic, tmp_path, state).get("delivered:sql") == 5
        with sqlite3.connect(tmp_path / "out.db") as conn:
            rows = conn.execute("SELECT r.user_id, u.reference_id, r.type, r.natural_key, r.payload "
                                "FROM healthflow_records r JOIN healthflow_users u ON u.user_id = r.user_id").fetchall()
        assert {(user, ref, kind) for user, ref, kind, _, _ in rows} == {(start.user_id, "athlete-7", "daily")}
        days = {key: json.loads(payload) for *_, key, payload in rows}
        assert sorted(days) == ["2026-04-08", "2026-04-09", "2026-04-10", "2026-04-11", "2026-04-12"]
        assert days["2026-04-10"]["metadata"]["start_time"] == "2026-04-10T00:00:00.000000-07:00"
        assert days["2026-04-10"]["distance_data"]["detailed"]["step_samples"] == [
            {"timestamp": "2026-04-10T06:06:00.000000-07:00", "steps": 102}]  # the running total at the minute's end
        assert days["2026-04-10"]["heart_rate_data"]["summary"]["avg_hrv_rmssd"] == 41.5  # merged with the steps

        # the access token expires at Google: the next poll gets a 401, refreshes (same refresh token) and goes on
        fake_provider.expire_access_tokens()
        clock[0] = NOW + timedelta(days=1)
        api.add("steps", [steps(datetime(2026, 4, 13, 13, 5, tzinfo=UTC), 777)])
        api.add("daily-heart-rate-variability", [hrv(date(2026, 4, 12), 39.0)])  # the date filter is open-ended
        second = polling.poll_once()
        assert second.refreshed == [start.user_id]
        assert {r.kind: r.published for r in second.results} == {"steps": 1, "daily-heart-rate-variability": 1}
        assert api.served("daily-heart-rate-variability")[-1]["filter"] == \
            'daily_heart_rate_variability.date >= "2026-04-12"'
        assert fake_provider.calls["token:refresh_token"] == 1 and not fake_provider.reused_refresh_tokens
        assert normalize(broker, topic, tmp_path, state).get("delivered:sql") == 2  # 04-13 steps, 04-12 HRV

        # the user disconnects: Google's revoke endpoint is called, a deauth event, nothing polled any more
        refresh_token = plane.tokens(start.user_id).refresh_token
        plane.deauthenticate(start.user_id)
        assert fake_provider.calls["revoke"] >= 1 and refresh_token in fake_provider.revoked_tokens
        assert_disconnected(plane, polling, api, start.user_id, events)
        publisher.close()
    plane.close()
