"""The whole life of a Garmin (push) connection, over real HTTP both ways:
connect (OAuth 2 PKCE + ``/user/id``) → pushes → Tansu → normalize → SQL rows of the connection → token expiry →
backfill request (refresh, 202 windows, 409) → backfilled data pushed → delivered → deauth (``DELETE
/user/registration``) → a second user deregistered by a ``deregistrations`` push → later pushes for that account.

Garmin's backfill pushes carry nothing that ties them to the request, so they are delivered as normal data
(no ``terra-reference``). Data pushed for an account whose connection ended is still delivered, under the
account's derived user id (``terra_user_id``), never under the ended connection.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from connectors.base import terra_user_id
from connectors.publish import RawEventPublisher
from controlplane.api import BackgroundServer, create_app
from controlplane.auth import MemoryCollector
from controlplane.polling import ConnectionPolling, CursorStore, KafkaPublisher, LocalRateLimiter, Poller
from controlplane.webhooks import router
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest.register_assert_rewrite("servers.fake_garmin", "servers.fake_provider")
from servers.fake_garmin import FakeGarmin, authorize_in_browser, summary  # noqa: E402

MODEL = {"dailies": "daily", "sleeps": "sleep", "activities": "activity"}
ACCOUNT_1, ACCOUNT_2 = "d3315b1072421d0dd7c8f6b8e1de4df8", "4aacafe82427c251df9c9592d0c06768"




def rows(path: Path) -> set[tuple[str, str | None, str, str]]:
    with sqlite3.connect(path) as conn:
        return set(conn.execute("SELECT r.user_id, u.reference_id, r.type, r.natural_key FROM healthflow_records r "
                                "JOIN healthflow_users u ON u.user_id = r.user_id").fetchall())


def wait_for(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_garmin_connect_push_backfill_deauth_deregistration(tmp_path, broker, topic, caplog, monkeypatch):
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", "garmin-url-t0ken")  # Garmin signs nothing: the URL's secret
    state, out = f"sqlite:///{tmp_path}/state.db", tmp_path / "out.db"
    events = MemoryCollector()
    server = BackgroundServer()
    today = datetime.now(UTC).date()

    def normalize() -> Any:
        return run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "garmin-cycle"),
                                      [SqlSink("sql", f"sqlite:///{out}")], str(tmp_path / "dlq"), state_url=state))

    with FakeGarmin(webhook_url=f"{server.url}/v2/providers/garmin/webhook?token=garmin-url-t0ken") as garmin:
        plane = garmin.control_plane(state, public_url=server.url, emit=events)
        dev = plane.create_developer(dev_id="lab", name="lab")
        http = requests.Session()
        http.headers.update({"dev-id": dev, "x-api-key": plane.create_api_key(dev)})
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"garmin": garmin.manifest},
                        limiter=LocalRateLimiter(), backoff_s=0.05)
        app = create_app(plane, polling=ConnectionPolling(plane, poller))
        app.include_router(router(RawEventPublisher(broker.bootstrap), raw_topic=topic))
        server.start(app)
        try:
            # ---- connect two users through the API, the browser and Garmin's OAuth 2 (PKCE), then GET /user/id
            def connect(account: str, reference_id: str) -> str:
                garmin.oauth.next_account = account
                started = http.post(f"{server.url}/v2/auth/authenticateUser", params={"resource": "GARMIN"},
                                    json={"reference_id": reference_id}).json()
                back = requests.get(authorize_in_browser(started["auth_url"]), allow_redirects=False, timeout=10)
                assert back.status_code == 200 and "Connected" in back.text, back.text
                assert garmin.oauth.token_requests[-1]["code_verifier"]  # PKCE: the verifier went to the token call
                return started["user_id"]

            user_1, user_2 = connect(ACCOUNT_1, "athlete-1"), connect(ACCOUNT_2, "athlete-2")
            assert [(c.path, c.account) for c in garmin.calls] == [("/user/id", ACCOUNT_1), ("/user/id", ACCOUNT_2)]
            assert plane.connection(user_1).provider_user_id == ACCOUNT_1

            # ---- the devices sync: Garmin pushes each account's summaries
            live_days = [today - timedelta(days=3), today - timedelta(days=2)]
            for kind in ("dailies", "sleeps", "activities"):
                assert garmin.sync(ACCOUNT_1, kind, [summary(kind, ACCOUNT_1, d) for d in live_days]) == 200
            assert garmin.sync(ACCOUNT_2, "dailies", [summary("dailies", ACCOUNT_2, live_days[0])]) == 200
            assert normalize().get("delivered:sql") == 7
            expected = {(user_1, "athlete-1", MODEL[kind], d.isoformat()) for kind in ("dailies",) for d in live_days}
            assert expected | {(user_2, "athlete-2", "daily", live_days[0].isoformat())} <= rows(out)
            assert {u for u, *_ in rows(out)} == {user_1, user_2}

            # ---- historical data for user 1: its token has expired at Garmin meanwhile
            old_days = [today - timedelta(days=n) for n in (70, 45, 20)]
            for kind in ("dailies", "activities"):  # history Garmin holds from before the connection
                garmin.store(ACCOUNT_1, kind, [summary(kind, ACCOUNT_1, d) for d in old_days])
            garmin.oauth.expire_access_tokens()
            pushed_before = len(garmin.pushes)
            window = {"user_id": user_1, "start_date": (today - timedelta(days=100)).isoformat(),
                      "end_date": (today - timedelta(days=5)).isoformat()}
            caplog.set_level(logging.INFO, logger="controlplane.polling.service")
            for data_type, kind, windows in (("daily", "dailies", 2), ("activity", "activities", 4)):
                reply = http.get(f"{server.url}/v2/{data_type}", params=window)
                assert reply.status_code == 200, reply.text
                assert reply.json()["reference"] and reply.json()["user"]["user_id"] == user_1
                wait_for(lambda k=kind, n=windows: len([c for c in garmin.backfills(k) if c.status == 202]) == n,
                         f"{kind} backfill windows")
            daily_calls, activity_calls = garmin.backfills("dailies"), garmin.backfills("activities")
            assert [c.status for c in daily_calls] == [401, 202, 202]  # expired → refreshed → retried
            assert [c.status for c in activity_calls] == [202] * 4  # Garmin allows 30 days here, 90 for dailies
            assert garmin.oauth.calls["token:refresh_token"] == 1
            spans = [(int(c.params["summaryStartTimeInSeconds"]), int(c.params["summaryEndTimeInSeconds"]))
                     for c in activity_calls]
            assert spans[0][0] == int(datetime.combine(today - timedelta(days=100), datetime.min.time(),
                                                       UTC).timestamp())
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, no gaps
            garmin.drain()
            backfilled = garmin.pushes[pushed_before:]  # one push per window holding data, like Garmin
            assert [(kind, len(docs), p.status) for p in backfilled for kind, docs in p.body.items()] == [
                ("dailies", 3, 200), ("activities", 2, 200), ("activities", 1, 200)]
            assert normalize().get("delivered:sql") == 6
            assert {(user_1, "athlete-1", "daily", d.isoformat()) for d in old_days} <= rows(out)
            assert len({r for r in rows(out) if r[0] == user_1 and r[2] == "activity"}) == 5

            # ---- the same history asked again after the cursors were lost: Garmin's 409 is not an error
            poller.cursors.reset(user_1)
            caplog.clear()
            reply = http.get(f"{server.url}/v2/daily", params={**window, "end_date": (today - timedelta(days=4))
                                                                .isoformat()})
            assert reply.status_code == 200, reply.text
            wait_for(lambda: len(garmin.backfills("dailies")) == 5, "the repeated daily backfill")
            assert [c.status for c in garmin.backfills("dailies")[3:]] == [409, 202]  # the next window still asked
            time.sleep(0.2)
            assert not [r for r in caplog.records if r.name == "controlplane.polling.service"
                        and r.levelno >= logging.WARNING], caplog.text
            assert "already requested (409)" in caplog.text

            # ---- user 1 disconnects here (its token expired again): Garmin's registration is deleted
            garmin.oauth.expire_access_tokens()
            gone = http.delete(f"{server.url}/v2/auth/deauthenticateUser", params={"user_id": user_1})
            assert gone.status_code == 200, gone.text
            deletes = [c for c in garmin.calls if c.path == "/user/registration"]
            assert [(c.method, c.status) for c in deletes] == [("DELETE", 401), ("DELETE", 204)]
            assert deletes[-1].account == ACCOUNT_1 and garmin.oauth.calls["token:refresh_token"] == 2
            garmin.drain()  # Garmin's final deregistration for user 1 arrives: already deauthenticated, no event
            assert garmin.pushes[-1].body == {"deregistrations": [{"userId": ACCOUNT_1}]}
            assert garmin.pushes[-1].status == 200
            assert plane.tokens(user_1) is None and plane.connection(user_1).state == "deauth"

            # ---- user 2 narrows what they share, then removes the app in Garmin Connect
            assert garmin.change_permissions(ACCOUNT_2, ["HEALTH_EXPORT"]) == 200
            assert plane.connection(user_2).active and plane.connection(user_2).scopes == "HEALTH_EXPORT"
            assert garmin.disconnect_in_connect(ACCOUNT_2) == 200
            info = http.get(f"{server.url}/v2/userInfo", params={"user_id": user_2}).json()
            assert info["is_authenticated"] is False and info["user"]["active"] is False
            assert plane.connection(user_2).state == "revoked" and plane.tokens(user_2) is None
            refused = http.get(f"{server.url}/v2/daily", params={**window, "user_id": user_2})
            assert refused.status_code == 400 and "not connected" in refused.json()["message"]

            # ---- a late push for user 2's account (e.g. a retried notification) is not delivered as user 2
            late = today - timedelta(days=1)
            assert garmin.push({"dailies": [summary("dailies", ACCOUNT_2, late)]}) == 200
            summary_run = normalize()
            assert summary_run.get("delivered:sql") == 1
            assert not [k for k, v in summary_run.counters.items() if "dead" in k.lower() and v], summary_run.counters
            late_rows = {r for r in rows(out) if r[3] == late.isoformat()}
            assert late_rows == {(terra_user_id("garmin", ACCOUNT_2), None, "daily", late.isoformat())}
        finally:
            server.stop()
            publisher.close()
            plane.close()

    assert [e["type"] for e in events.events] == ["auth", "auth", "deauth", "access_revoked"]
    assert [e["user"]["user_id"] for e in events.events] == [user_1, user_2, user_1, user_2]
    assert "deregistrations" in events.events[3]["message"]
