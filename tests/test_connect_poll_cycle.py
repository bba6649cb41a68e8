"""The whole life of a pull connection: connect → poll → normalize → deliver → refresh → deauth.

Real OAuth client code against a fake OAuth server, a fake Oura data API that accepts exactly the
tokens that server issued and still considers live, Redis rate limits, the Tansu broker, the Beam
pipeline and a SQLite destination.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis

from controlplane.auth import MemoryCollector
from controlplane.polling import ConnectionPolling, CursorStore, KafkaPublisher, Poller, RedisRateLimiter
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api")
from servers.fake_provider import assert_disconnected, authorize, connect_provider, query_of  # noqa: E402
from servers.fake_provider_api import FakeProviderApi  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
READINESS = json.loads((FIXTURES / "oura" / "daily_readiness.json").read_text())["data"][0]
CYCLE = json.loads((FIXTURES / "whoop" / "cycle.page.json").read_text())["records"][0]
NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)


def readiness(day: date, index: int) -> dict:
    doc = copy.deepcopy(READINESS)
    doc.update(id=f"readiness-{day}", day=day.isoformat(), score=70 + index, timestamp=f"{day}T00:00:00+01:00")
    return doc


def cycle(day: date, index: int) -> dict:
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=22)
    stamp = start.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    end = (start + timedelta(hours=23)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {**copy.deepcopy(CYCLE), "id": 7000 + index, "start": stamp, "end": end, "created_at": stamp,
            "updated_at": end}


# provider, raw kind polled, provider account id (WHOOP documents carry it), document factory
PROVIDERS = [("oura", "daily_readiness", "oura-acct-9", readiness),
             ("whoop", "cycle", str(CYCLE["user_id"]), cycle)]


@pytest.mark.parametrize(("provider", "kind", "account", "document"), PROVIDERS, ids=[p[0] for p in PROVIDERS])
def test_connect_poll_deliver_refresh_deauth(tmp_path, fake_provider, broker, topic, provider, kind, account,
                                             document):
    state = f"sqlite:///{tmp_path}/state.db"
    events = MemoryCollector()
    plane, start = connect_provider(state, fake_provider, provider, account, emit=events, reference_id="athlete-9")

    clock = [NOW]
    with FakeProviderApi(provider, page_size=2, token_validator=fake_provider.is_live) as api:
        api.add(kind, [document(date(2024, 3, 14) + timedelta(days=i), i) for i in range(5)])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={provider: api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: clock[0], overlap=timedelta(0), backoff_s=0.05)
        polling = ConnectionPolling(plane, poller, kinds=lambda _: [kind])

        first = polling.poll_once()
        pages = sum(r.published for r in first.results)
        assert pages == (3 if provider == "oura" else 1)  # Oura: 2 a page here; WHOOP: the poller asks for 25
        summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                         [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                         state_url=state))
        assert summary.get("delivered:sql") == 5
        with sqlite3.connect(tmp_path / "out.db") as conn:
            rows = conn.execute("SELECT r.user_id, u.reference_id, r.type FROM healthflow_records r "
                                "JOIN healthflow_users u ON u.user_id = r.user_id").fetchall()
        assert set(rows) == {(start.user_id, "athlete-9", "daily")}

        # the access token expires at the provider: the next poll gets a 401, refreshes (rotating) and goes on
        fake_provider.expire_access_tokens()
        clock[0] = NOW + timedelta(days=1)
        api.add(kind, [document(date(2024, 3, 20), 9)])  # lands in the next window (the cursor is at NOW)
        second = polling.poll_once()
        assert second.refreshed == [start.user_id]
        assert sum(r.published for r in second.results) == 1
        assert run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                      [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                      state_url=state)).get("delivered:sql") == 1

        # the user disconnects: tokens gone, a deauth event, nothing polled any more
        plane.deauthenticate(start.user_id)
        assert_disconnected(plane, polling, api, start.user_id, events)
        publisher.close()
    plane.close()


def test_one_failing_connection_does_not_stop_the_round(tmp_path, fake_provider, broker, topic):
    """A connection whose poll fails (here: the provider answers 500 until attempts run out) is reported and left
    for the next round; the other connections of the round are still polled."""
    state = f"sqlite:///{tmp_path}/state.db"
    plane, first = connect_provider(state, fake_provider, "oura", "oura-acct-1", reference_id="athlete-1")
    fake_provider.next_account = "oura-acct-2"
    second = plane.start_auth("dev-1", "oura", reference_id="athlete-2")
    assert plane.complete_auth("oura", query_of(authorize(second.auth_url))).ok
    with FakeProviderApi("oura", token_validator=fake_provider.is_live) as api:
        api.add("daily_readiness", [readiness(date(2024, 3, 18), 0)])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"oura": api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: NOW, overlap=timedelta(0), backoff_s=0.01, max_attempts=2)
        api.fail(2)  # the first connection polled gets two 500s: its attempts run out
        report = ConnectionPolling(plane, poller, kinds=lambda _: ["daily_readiness"]).poll_once()
        publisher.close()
    assert len(report.failed) == 1 and report.failed[0][1] == "daily_readiness"
    assert "RetryableError" in report.failed[0][2] and report.revoked == []
    [done] = report.results
    assert {done.user_id, report.failed[0][0]} == {first.user_id, second.user_id} and done.published == 1
    plane.close()
