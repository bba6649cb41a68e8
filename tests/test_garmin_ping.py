"""Garmin Ping mode over real HTTP both ways: Garmin POSTs ``{"<type>": [{"userId", "callbackURL"}]}`` to the webhook,
the router queues the pings on the notifications topic (Tansu) and answers at once, the real ``NotificationFetcher``
GETs each callback from the fake Garmin with the connection's token (through the poller's rate limits and retries
and ``ConnectionPolling.attempt``'s 401 refresh), publishes the answer in push shape, and the Beam pipeline delivers it
into SQLite under the connection's ``user_id`` / ``reference_id``.

Callback URLs off the Garmin API are never requested (the user's token would go with them); a callback answering 410
(expired, or a file already downloaded) is counted, once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests

from connectors.publish import RawEventPublisher
from controlplane.api import BackgroundServer, create_app
from controlplane.auth import MemoryCollector
from controlplane.polling import ConnectionPolling, CursorStore, KafkaPublisher, LocalRateLimiter, NotificationFetcher
from controlplane.polling.notifications import FetchReport
from controlplane.polling.poller import ForeignURL, PollConnection, Poller, same_api
from controlplane.webhooks import router
from pipelines.embedded import LoopbackHTTPServer
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest.register_assert_rewrite("servers.fake_garmin", "servers.fake_provider", "servers.fake_provider_api")
from servers.fake_garmin import FakeGarmin, authorize_in_browser, summary  # noqa: E402
from servers.fake_provider_api import read_raw_events  # noqa: E402

MODEL = {"dailies": "daily", "sleeps": "sleep", "activities": "activity"}
ACCOUNT_1, ACCOUNT_2 = "d3315b1072421d0dd7c8f6b8e1de4df8", "4aacafe82427c251df9c9592d0c06768"
TODAY = datetime.now(UTC).date()
DAY_1, DAY_2, DAY_3 = (TODAY - timedelta(days=n) for n in (3, 2, 1))
FIXTURES = Path(__file__).parent / "fixtures" / "garmin"




def read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every raw event on ``topic`` (all partitions, from the start), with its Kafka key."""
    return read_raw_events(bootstrap, topic)


@dataclass
class Env:
    garmin: FakeGarmin
    plane: Any
    fetcher: NotificationFetcher
    bootstrap: str
    raw: str
    notes: str
    out: Path
    normalize_run: Any
    users: dict[str, str]  # Garmin account → connection user_id

    def fetch(self) -> FetchReport:
        return self.fetcher.run_once(self.bootstrap, self.notes, group="garmin-ping")

    def normalize(self) -> Any:
        summary_run = self.normalize_run()
        assert not {n: c for n, c in summary_run.counters.items() if c and "dead" in n.lower()}, summary_run.counters
        return summary_run

    def rows(self) -> set[tuple[str, str | None, str, str]]:
        if not self.out.exists():
            return set()
        with sqlite3.connect(self.out) as conn:
            return set(conn.execute("SELECT r.user_id, u.reference_id, r.type, r.natural_key FROM healthflow_records "
                                    "r JOIN healthflow_users u ON u.user_id = r.user_id").fetchall())


@pytest.fixture
def env(tmp_path, broker, topic, monkeypatch) -> Iterator[Env]:
    """Two connected Garmin users (ACCOUNT_1 → athlete-1, ACCOUNT_2 → athlete-2); dailies and sleeps by Ping."""
    monkeypatch.delenv("HEALTHFLOW_GARMIN_API_BASE", raising=False)
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", "garmin-url-t0ken")  # Garmin signs nothing: the URL's secret
    state, out = f"sqlite:///{tmp_path}/state.db", tmp_path / "out.db"
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=2)
    server = BackgroundServer()
    with FakeGarmin(webhook_url=f"{server.url}/v2/providers/garmin/webhook?token=garmin-url-t0ken",
                    ping_types=frozenset({"dailies", "sleeps"})) as garmin:
        plane = garmin.control_plane(state, public_url=server.url, emit=MemoryCollector())
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"garmin": garmin.manifest},
                        limiter=LocalRateLimiter(), backoff_s=0.05)
        polling = ConnectionPolling(plane, poller)
        app = create_app(plane, polling=polling)
        app.include_router(router(RawEventPublisher(broker.bootstrap), raw_topic=topic,
                                  notifications_topic=notes))
        server.start(app)
        try:
            dev = plane.create_developer(dev_id="lab", name="lab")
            http = requests.Session()
            http.headers.update({"dev-id": dev, "x-api-key": plane.create_api_key(dev)})
            users = {}
            for account, reference in ((ACCOUNT_1, "athlete-1"), (ACCOUNT_2, "athlete-2")):
                garmin.oauth.next_account = account
                started = http.post(f"{server.url}/v2/auth/authenticateUser", params={"resource": "GARMIN"},
                                    json={"reference_id": reference}).json()
                back = requests.get(authorize_in_browser(started["auth_url"]), allow_redirects=False, timeout=10)
                assert back.status_code == 200 and "Connected" in back.text, back.text
                users[account] = started["user_id"]
            del garmin.calls[:]  # the /user/id calls of connecting

            def normalize_run() -> Any:
                return run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "garmin-ping"),
                                              [SqlSink("sql", f"sqlite:///{out}")], str(tmp_path / "dlq"),
                                              state_url=state))

            yield Env(garmin, plane, NotificationFetcher(polling), broker.bootstrap, topic, notes, out, normalize_run,
                      users)
        finally:
            server.stop()
            publisher.close()
            plane.close()


def test_a_ping_is_answered_at_once_then_fetched_with_the_users_token_and_delivered(env):
    user = env.users[ACCOUNT_1]
    sleep = summary("sleeps", ACCOUNT_1, DAY_2)
    reply = requests.post(env.garmin.webhook_url, json={"sleeps": [env.garmin.ping_entry(ACCOUNT_1, "sleeps",
                                                                                          [sleep])]}, timeout=10)
    assert reply.status_code == 200 and reply.json() == {"status": "accepted", "raw_events": 0, "pings": 1}
    assert env.garmin.callbacks() == []  # nothing fetched while Garmin waits for the answer
    queued = read_topic(env.bootstrap, env.notes)
    assert [(e["kind"], e["user_id"], e["key"]) for e in queued] == [("notification", ACCOUNT_1,
                                                                      f"garmin:{ACCOUNT_1}".encode())]
    assert read_topic(env.bootstrap, env.raw) == []  # a ping is not data

    report = env.fetch()
    assert (report.pings, report.foreign, report.gone, report.unknown_accounts) == (1, 0, 0, 0)
    assert [(r.user_id, r.kind, r.published) for r in report.fetched.results] == [(user, "sleeps", 1)]
    [call] = env.garmin.callbacks("sleeps")
    assert (call.status, call.account, call.token) == (200, ACCOUNT_1, env.plane.access_token(user))
    [published] = read_topic(env.bootstrap, env.raw)  # in push shape, keyed like a push
    assert (published["kind"], published["user_id"], published["key"]) == (None, ACCOUNT_1,
                                                                             f"garmin:{ACCOUNT_1}".encode())
    assert json.loads(published["payload"]) == {"sleeps": [sleep]}

    assert env.normalize().get("delivered:sql") == 1
    assert env.rows() == {(user, "athlete-1", "sleep", sleep["summaryId"])}
    again = env.fetch()  # the queue's offsets were committed: nothing is fetched twice
    assert again.pings == 0 and len(env.garmin.callbacks()) == 1

    # the fake's ping mode end to end: a device sync of a ping type sends the ping itself
    assert env.garmin.sync(ACCOUNT_1, "dailies", [summary("dailies", ACCOUNT_1, DAY_3)]) == 200
    assert "callbackURL" in env.garmin.pushes[-1].body["dailies"][0]
    assert [len(r.results) for r in (env.fetch().fetched,)] == [1]
    assert env.normalize().get("delivered:sql") == 1
    assert (user, "athlete-1", "daily", DAY_3.isoformat()) in env.rows()


def test_one_ping_for_a_multi_day_sync_answers_a_bare_array_of_every_day(env):
    """A watch synced after three days: one ping per type, each callback answering a JSON array of every day's
    summary. Every day is delivered, and the hrv of a day joins that day's Daily (no row of its own)."""
    user = env.users[ACCOUNT_2]
    dailies = [summary("dailies", ACCOUNT_2, day) for day in (DAY_1, DAY_2, DAY_3)]
    nights = [summary("hrv", ACCOUNT_2, day) for day in (DAY_2, DAY_3)]
    assert env.garmin.sync(ACCOUNT_2, "dailies", dailies) == 200  # dailies are configured for Ping
    assert env.garmin.ping(ACCOUNT_2, "hrv", nights) == 200
    report = env.fetch()
    assert sorted((r.kind, r.published) for r in report.fetched.results) == [("dailies", 1), ("hrv", 1)]
    answers = [json.loads(e["payload"]) for e in read_topic(env.bootstrap, env.raw)]
    assert sorted((kind, len(docs)) for body in answers for kind, docs in body.items()) == [("dailies", 3), ("hrv", 2)]
    assert env.normalize().get("delivered:sql") == 3
    assert env.rows() == {(user, "athlete-2", "daily", day.isoformat()) for day in (DAY_1, DAY_2, DAY_3)}
    with sqlite3.connect(env.out) as conn:
        hrv = {key: json.loads(payload).get("heart_rate_data", {}).get("summary", {}).get("avg_hrv_rmssd")
               for key, payload in conn.execute("SELECT natural_key, payload FROM healthflow_records")}
    assert hrv == {DAY_1.isoformat(): None, DAY_2.isoformat(): 44, DAY_3.isoformat(): 44}


def test_a_body_mixing_pushed_data_pings_files_and_lifecycle(env):
    garmin = env.garmin
    user_1, user_2 = env.users[ACCOUNT_1], env.users[ACCOUNT_2]
    pushed_daily, pushed_activity = summary("dailies", ACCOUNT_1, DAY_1), summary("activities", ACCOUNT_2, DAY_2)
    pinged_daily, pinged_sleep = summary("dailies", ACCOUNT_1, DAY_2), summary("sleeps", ACCOUNT_2, DAY_3)
    later_daily = summary("dailies", ACCOUNT_1, DAY_3)
    skin_temp = dict(json.loads((FIXTURES / "skinTemp.json").read_text())["skinTemp"][0], userId=ACCOUNT_1)
    body = {"dailies": [pushed_daily, garmin.ping_entry(ACCOUNT_1, "dailies", [pinged_daily]),
                        garmin.ping_entry(ACCOUNT_1, "dailies", [later_daily])],
            "sleeps": [garmin.ping_entry(ACCOUNT_2, "sleeps", [pinged_sleep])],
            "activities": [pushed_activity],
            "activityFiles": [garmin.ping_file(ACCOUNT_1, 14562379901, b".FIT-bytes")],
            "skinTemp": [garmin.ping_entry(ACCOUNT_1, "skinTemp", [skin_temp])],  # a kind healthflow ignores
            "userPermissionsChange": [{"userId": ACCOUNT_2, "permissions": ["HEALTH_EXPORT", "ACTIVITY_EXPORT"]}]}
    reply = requests.post(garmin.webhook_url, json=body, timeout=10)
    assert reply.status_code == 200
    assert reply.json() == {"status": "accepted", "raw_events": 2, "lifecycle": 1, "pings": 5}
    assert env.plane.connection(user_2).scopes == "HEALTH_EXPORT,ACTIVITY_EXPORT"
    assert garmin.calls == []  # nothing fetched in the request

    queued = {e["user_id"]: e for e in read_topic(env.bootstrap, env.notes)}
    assert set(queued) == {ACCOUNT_1, ACCOUNT_2}  # one queued event per account, keyed by it, entries in order
    assert queued[ACCOUNT_1]["key"] == f"garmin:{ACCOUNT_1}".encode()
    assert json.loads(queued[ACCOUNT_1]["payload"]) == {"dailies": body["dailies"][1:],
                                                        "activityFiles": body["activityFiles"],
                                                        "skinTemp": body["skinTemp"]}
    assert json.loads(queued[ACCOUNT_2]["payload"]) == {"sleeps": body["sleeps"]}
    pushed = {e["user_id"]: json.loads(e["payload"]) for e in read_topic(env.bootstrap, env.raw)}
    assert pushed == {ACCOUNT_1: {"dailies": [pushed_daily]}, ACCOUNT_2: {"activities": [pushed_activity]}}

    report = env.fetch()
    assert (report.pings, report.ignored, report.foreign, report.gone) == (5, 2, 0, 0)  # file, skinTemp: not fetched
    calls = garmin.callbacks()
    assert sorted((c.path, c.account, c.status) for c in calls) == [
        ("/dailies", ACCOUNT_1, 200), ("/dailies", ACCOUNT_1, 200), ("/sleeps", ACCOUNT_2, 200)]
    starts = [int(c.params["uploadStartTimeInSeconds"]) for c in calls if c.account == ACCOUNT_1]
    assert starts == sorted(starts)  # one account's pings in the order Garmin sent them
    assert not garmin.callbacks("activityFiles") and not garmin.callbacks("skinTemp")

    assert env.normalize().get("delivered:sql") == 5
    assert {(u, r, t) for u, r, t, _ in env.rows()} == {(user_1, "athlete-1", "daily"),
                                                       (user_2, "athlete-2", "activity"),
                                                       (user_2, "athlete-2", "sleep")}
    assert {k for u, _, t, k in env.rows() if t == "daily"} == {d.isoformat() for d in (DAY_1, DAY_2, DAY_3)}
    assert {k for u, _, t, k in env.rows() if t == "sleep"} == {pinged_sleep["summaryId"]}


class Recorder(BaseHTTPRequestHandler):
    """A server a forged callback URL could point at: records whatever reaches it."""

    hits: list[tuple[str, str | None]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        Recorder.hits.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"[]")


def test_callback_urls_off_the_garmin_api_are_never_requested(env, caplog):
    garmin = env.garmin
    Recorder.hits = []
    evil = LoopbackHTTPServer(Recorder, 0, "recorder").start()
    try:
        real = garmin.ping_entry(ACCOUNT_1, "dailies", [summary("dailies", ACCOUNT_1, DAY_1)])["callbackURL"]
        query = real.split("?", 1)[1]
        api_origin = garmin.api_base.removesuffix("/wellness-api/rest")
        forged = [f"{evil.base_url}/wellness-api/rest/dailies?{query}",  # another host
                  f"{api_origin.replace('http://', 'https://')}/wellness-api/rest/dailies?{query}",  # other scheme
                  f"http://{api_origin.removeprefix('http://')}@{evil.base_url.removeprefix('http://')}"
                  f"/wellness-api/rest/dailies?{query}",  # userinfo trick: the host is the recorder
                  f"{api_origin}/elsewhere/dailies?{query}",  # the API's origin, not its path
                  f"{garmin.api_base}/../../elsewhere?{query}",  # climbing out of the base path
                  "file:///etc/passwd"]
        body = {"dailies": [{"userId": ACCOUNT_1, "callbackURL": url} for url in forged]}
        assert garmin.push(body) == 200
        report = env.fetch()
        assert (report.pings, report.foreign) == (len(forged), len(forged))
        assert report.fetched.results == [] and report.fetched.failed == []
        assert Recorder.hits == [] and garmin.calls == []
        assert query.split("token=")[1] not in caplog.text  # the pull token is not logged
        assert "not fetched" in caplog.text

        # the poller refuses them as well, before any request
        poller = env.fetcher.polling.poller
        connection = PollConnection(env.users[ACCOUNT_1], "garmin", ACCOUNT_1)
        for url in forged:
            with pytest.raises(ForeignURL):
                poller.fetch_url(connection, "dailies", url, lambda: "token", envelope="dailies")
        assert Recorder.hits == []

        # a ping for an account without a connection is not fetched either
        assert garmin.push({"dailies": [garmin.ping_entry("not-connected", "dailies", [])]}) == 200
        assert env.fetch().unknown_accounts == 1 and garmin.calls == []
    finally:
        evil.stop()


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://apis.garmin.com/wellness-api/rest/sleeps?uploadStartTimeInSeconds=1&token=x", True),
    ("https://APIS.garmin.com:443/wellness-api/rest/activityFile?id=1&token=x", True),
    ("https://apis.garmin.com/wellness-api/rest", True),
    ("http://apis.garmin.com/wellness-api/rest/sleeps", False),
    ("https://apis.garmin.com:8443/wellness-api/rest/sleeps", False),
    ("https://apis.garmin.com.evil.example/wellness-api/rest/sleeps", False),
    ("https://evil.example/wellness-api/rest/sleeps", False),
    ("https://apis.garmin.com@evil.example/wellness-api/rest/sleeps", False),
    ("https://user:pw@apis.garmin.com/wellness-api/rest/sleeps", False),
    ("https://apis.garmin.com/wellness-api/rest-other/sleeps", False),
    ("https://apis.garmin.com/wellness-api/rest/../../oauth", False),
    ("https://apis.garmin.com/wellness-api/rest/%2e%2e/%2E%2E/oauth", False),
    ("https://apis.garmin.com:notaport/wellness-api/rest/sleeps", False),
    ("//apis.garmin.com/wellness-api/rest/sleeps", False),
    ("/wellness-api/rest/sleeps", False),
])
def test_same_api(url, allowed):
    assert same_api(url, "https://apis.garmin.com/wellness-api/rest") is allowed


def test_api_base_override_is_allowed(monkeypatch):
    poller = Poller(cursors=None, publisher=None, limiter=LocalRateLimiter())  # type: ignore[arg-type]
    local = "http://127.0.0.1:9/wellness-api/rest/sleeps?token=x"
    assert poller.api_url("garmin", "https://apis.garmin.com/wellness-api/rest/sleeps?token=x")
    assert not poller.api_url("garmin", local)
    monkeypatch.setenv("HEALTHFLOW_GARMIN_API_BASE", "http://127.0.0.1:9/wellness-api/rest")
    assert poller.api_url("garmin", local)


def test_an_expired_token_at_callback_time_is_refreshed_then_fetched(env):
    garmin, user = env.garmin, env.users[ACCOUNT_2]
    garmin.oauth.expire_access_tokens()
    refreshes = garmin.oauth.calls["token:refresh_token"]
    sleep = summary("sleeps", ACCOUNT_2, DAY_1)
    assert garmin.sync(ACCOUNT_2, "sleeps", [sleep]) == 200
    report = env.fetch()
    assert [c.status for c in garmin.callbacks("sleeps")] == [401, 200]
    assert garmin.oauth.calls["token:refresh_token"] == refreshes + 1 and report.fetched.refreshed == [user]
    first, second = garmin.callbacks("sleeps")
    assert first.token != second.token == env.plane.access_token(user)
    assert [r.published for r in report.fetched.results] == [1] and report.fetched.failed == []
    assert env.normalize().get("delivered:sql") == 1
    assert env.rows() == {(user, "athlete-2", "sleep", sleep["summaryId"])}


def test_a_callback_answering_410_is_counted_and_not_asked_again(env):
    garmin = env.garmin
    assert garmin.sync(ACCOUNT_1, "dailies", [summary("dailies", ACCOUNT_1, DAY_1)]) == 200
    garmin.expire_callbacks()  # more than 24 h later
    report = env.fetch()
    assert report.gone == 1 and report.fetched.results == [] and report.fetched.failed == []
    assert [c.status for c in garmin.callbacks()] == [410]  # once: a 4xx is not retried
    assert env.fetch().gone == 0 and len(garmin.callbacks()) == 1
    assert env.normalize().get("delivered:sql") == 0 and env.rows() == set()

    # a file's callback serves one download (the fake models Garmin's rule; healthflow does not fetch files)
    url = garmin.ping_file(ACCOUNT_1, 7, b".FIT")["callbackURL"]
    token = env.plane.access_token(env.users[ACCOUNT_1])
    statuses = [requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code
                for _ in range(2)]
    assert statuses == [200, 410]
