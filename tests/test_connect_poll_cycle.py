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
from cryptography.fernet import Fernet

from connectors import registry
from connectors.auth import ControlPlane, MemoryCollector
from connectors.auth.oauth import ProviderSettings
from connectors.polling import ConnectionPolling, CursorStore, KafkaPublisher, Poller, RedisRateLimiter
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api")
from servers.fake_provider import authorize, query_of  # noqa: E402
from servers.fake_provider_api import FakeProviderApi  # noqa: E402

READINESS = json.loads((Path(__file__).parent / "fixtures" / "oura" / "daily_readiness.json").read_text())["data"][0]
NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)


def readiness(day: date, score: int) -> dict:
    doc = copy.deepcopy(READINESS)
    doc.update(id=f"readiness-{day}", day=day.isoformat(), score=score, timestamp=f"{day}T00:00:00+01:00")
    return doc


def test_connect_poll_deliver_refresh_deauth(tmp_path, fake_provider, broker, topic):
    state = f"sqlite:///{tmp_path}/state.db"
    fake_provider.register("oura-client", "oura-secret", "body")
    fake_provider.next_account = "oura-acct-9"
    oura = registry()["oura"].manifest
    auth = oura.auth.model_copy(update={"authorize_url": "https://oura.example/oauth/authorize",
                                        "token_url": "https://oura.example/oauth/token"})
    events = MemoryCollector()
    plane = ControlPlane(state, Fernet.generate_key().decode(), public_url="http://127.0.0.1:9", environ={},
                         manifests={"oura": oura.model_copy(update={"auth": auth})}, emit=events,
                         settings={"oura": ProviderSettings("oura-client", "oura-secret",
                                                            oauth_base=fake_provider.base_url)},
                         profile_fetchers={}).open()
    start = plane.start_auth("dev-1", "oura", reference_id="athlete-9")
    assert plane.complete_auth("oura", query_of(authorize(start.auth_url))).ok

    clock = [NOW]
    with FakeProviderApi("oura", page_size=2, token_validator=fake_provider.is_live) as api:
        api.add("daily_readiness", [readiness(date(2024, 3, 14) + timedelta(days=i), 70 + i) for i in range(5)])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"oura": api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: clock[0], overlap=timedelta(0), backoff_s=0.05)
        polling = ConnectionPolling(plane, poller)

        first = polling.poll_once()
        assert sum(r.published for r in first.results if r.kind == "daily_readiness") == 3  # 5 documents, 2 a page
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
        api.add("daily_readiness", [readiness(date(2024, 3, 21), 90)])
        second = polling.poll_once()
        assert second.refreshed == [start.user_id]
        assert sum(r.published for r in second.results) == 1
        assert run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                      [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                      state_url=state)).get("delivered:sql") == 1

        # the user disconnects: tokens gone, a deauth event, nothing polled any more
        plane.deauthenticate(start.user_id)
        served = len(api.requests)
        assert polling.poll_once().results == [] and len(api.requests) == served
        publisher.close()
    assert [e["type"] for e in events.events] == ["auth", "deauth"]
    assert plane.tokens(start.user_id) is None
    plane.close()
