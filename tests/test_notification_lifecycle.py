"""Provider notifications beyond "poll now": revocation notices, and fetching the dates a notification names.

Real OAuth client code against the fake OAuth servers, signed notifications over real HTTP into the webhook router,
queued on the Tansu broker, read by the real ``NotificationFetcher`` with the real poller against the fake Fitbit and
Withings APIs, and (for data) through the Beam pipeline into a SQLite destination.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import sqlite3
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from fastapi import FastAPI

from connectors.publish import RawEventPublisher
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
from controlplane.webhooks import router
from controlplane.webhooks.seen import SeenNotifications
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api", "servers.fake_fitbit",
                               "servers.fake_withings")
from servers.fake_fitbit import FakeFitbitApi  # noqa: E402
from servers.fake_provider import connect_provider  # noqa: E402
from servers.fake_provider_api import read_raw_events  # noqa: E402
from servers.fake_withings import FakeWithings, FakeWithingsApi  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
ACCOUNT = "7QK2XB"  # the Fitbit account (token "user_id", notification "ownerId")
WITHINGS_USER = "12345678"
NOW = datetime(2024, 3, 12, 12, 0, tzinfo=UTC)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def night(ends: date, log_id: int) -> dict[str, Any]:
    """The Fitbit fixture's main sleep, moved to the night that ends on ``ends``."""
    main = json.loads((FIXTURES / "fitbit" / "sleep.json").read_text())["sleep"][0]
    text = re.sub(r"\d{4}-\d{2}-\d{2}", lambda m: (date.fromisoformat(m[0]) + (ends - date(2024, 3, 11))).isoformat(),
                  json.dumps(main))
    return {**json.loads(text), "logId": log_id}


WITHINGS_URL_TOKEN = "withings-url-t0ken"


def fitbit_signed(body: bytes, secret: str = "secret") -> dict[str, str]:
    mac = hmac.new(f"{secret}&".encode(), body, hashlib.sha1).digest()
    return {"X-Fitbit-Signature": base64.b64encode(mac).decode(), "Content-Type": "application/json"}


def fitbit_note(collection: str, owner: str = ACCOUNT, day: str | None = "2024-03-12") -> dict[str, Any]:
    note = {"collectionType": collection, "ownerId": owner, "ownerType": "user", "subscriptionId": "hf-1"}
    return {**note, "date": day} if day else note


@pytest.fixture
def webhook(broker, topic, monkeypatch, tmp_path) -> Iterator[tuple[str, str]]:
    """The webhook router over HTTP, queueing notifications on ``<topic>.notes``: ``(base URL, notes topic)``."""
    monkeypatch.setenv("HEALTHFLOW_FITBIT_CLIENT_SECRET", "secret")  # connect_provider's client secret
    monkeypatch.setenv("HEALTHFLOW_WITHINGS_WEBHOOK_TOKEN", WITHINGS_URL_TOKEN)  # Withings signs nothing
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=2)
    app = FastAPI()
    app.include_router(router(RawEventPublisher(broker.bootstrap), topic, notes,
                              seen=SeenNotifications(f"sqlite:///{tmp_path}/seen.db")))
    with BackgroundServer() as server:
        server.start(app)
        yield f"{server.url}/v2/providers", notes


def limiter(namespace: str) -> RedisRateLimiter:
    return RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=namespace)


def deliver(tmp_path: Path, broker: Any, topic: str, state: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Run the pipeline over the ingestion topic; every delivered record as (user, type, natural key, payload)."""
    summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "lifecycle"),
                                     [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                     state_url=state))
    assert not {n: c for n, c in summary.counters.items() if c and "dead" in n}, summary.counters
    with sqlite3.connect(tmp_path / "out.db") as conn:
        rows = conn.execute("SELECT user_id, type, natural_key, payload FROM healthflow_records").fetchall()
    return [(user, kind, key, json.loads(payload)) for user, kind, key, payload in rows]


# ----------------------------------------------------------------------------------------------------------------------
# Fitbit
# ----------------------------------------------------------------------------------------------------------------------
def test_a_revocation_notice_ends_the_connection(tmp_path, fake_provider, broker, topic, webhook):
    base, notes = webhook
    state = f"sqlite:///{tmp_path}/state.db"
    events = MemoryCollector()
    plane, start = connect_provider(state, fake_provider, "fitbit", ACCOUNT, emit=events)
    with FakeFitbitApi(token_validator=fake_provider.is_live) as api:
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"fitbit": api.manifest},
                        limiter=limiter(topic), clock=lambda: NOW, backoff_s=0.05)
        polling = ConnectionPolling(plane, poller, kinds=lambda _: ["sleep"])
        fetcher = NotificationFetcher(polling)
        assert [r.kind for r in polling.poll_once().results] == ["sleep"]  # connected: polled

        bodies = [[fitbit_note("userRevokedAccess")], [fitbit_note("userRevokedAccess", owner="SOMEONE")],
                  [fitbit_note("sleep")]]  # data named after the revocation: no connection to fetch it with
        for body in (json.dumps(b).encode() for b in bodies):
            reply = requests.post(f"{base}/fitbit/webhook", data=body, headers=fitbit_signed(body), timeout=10)
            assert reply.status_code == 204
        served = len(api.requests)
        report = fetcher.run_once(broker.bootstrap, notes, group="fetch")
        assert report.revoked == [start.user_id]
        assert (report.unknown_accounts, report.ignored, report.unreadable) == (2, 0, 0)
        assert report.fetched.results == [] and len(api.requests) == served

        connection = plane.connection(start.user_id)
        assert connection.state == "revoked" and plane.tokens(start.user_id) is None
        assert plane.resolve_user("fitbit", ACCOUNT) is None
        assert [e["type"] for e in events.events] == ["auth", "access_revoked"]
        # no longer polled, and the notices were committed (a repeat revokes nothing, emits nothing)
        assert polling.poll_once().results == [] and len(api.requests) == served
        again = fetcher.run_once(broker.bootstrap, notes, group="fetch")
        assert again.revoked == [] and again.unknown_accounts == 0
        assert [e["type"] for e in events.events] == ["auth", "access_revoked"]
        publisher.close()
    plane.close()


def test_a_notification_fetches_the_date_it_names(tmp_path, fake_provider, broker, topic, webhook):
    base, notes = webhook
    state = f"sqlite:///{tmp_path}/state.db"
    plane, start = connect_provider(state, fake_provider, "fitbit", ACCOUNT)
    with FakeFitbitApi(token_validator=fake_provider.is_live) as api:
        api.add("sleep", [night(date(2024, 3, 11), 45000000011), night(date(2024, 3, 12), 45000000012)])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        cursors = CursorStore(state)
        poller = Poller(cursors=cursors, publisher=publisher, manifests={"fitbit": api.manifest},
                        limiter=limiter(topic), clock=lambda: NOW, initial_lookback=timedelta(days=2),
                        overlap=timedelta(0), backoff_s=0.05)
        polling = ConnectionPolling(plane, poller, kinds=lambda _: ["sleep"])
        assert [r.published for r in polling.poll_once().results] == [1]
        live = cursors.get(start.user_id, "sleep")
        assert live == NOW

        # a night logged by hand a week late, and a backdated activity: notified with their (old) dates
        api.add("sleep", [night(date(2024, 3, 5), 45000000005)])
        api.add_day("activity_summary", "2024-03-05",
                    json.loads((FIXTURES / "fitbit" / "activity_summary.json").read_text()))
        body = json.dumps([fitbit_note("sleep", day="2024-03-05"), fitbit_note("activities", day="2024-03-05")])
        reply = requests.post(f"{base}/fitbit/webhook", data=body.encode(), headers=fitbit_signed(body.encode()),
                              timeout=10)
        assert reply.status_code == 204
        sleep_asked, summary_asked = len(api.served("sleep")), len(api.served("activity_summary"))
        report = NotificationFetcher(polling).run_once(broker.bootstrap, notes, group="fetch")
        assert [r.kind for r in report.fetched.results] == ["sleep", "activities", "activity_summary"]
        assert [r.path for r in api.served("sleep")[sleep_asked:]] == [
            "/1.2/user/-/sleep/date/2024-03-05/2024-03-05.json"]
        assert [r.path for r in api.served("activity_summary")[summary_asked:]] == [
            "/1/user/-/activities/date/2024-03-05.json"]
        assert [r.params["afterDate"] for r in api.served("activities")] == ["2024-03-05"]
        assert report.fetched.results[0].published == 1
        # the live cursors are untouched: the next scheduled poll goes on from where it was
        assert cursors.get(start.user_id, "sleep") == live
        assert cursors.get(start.user_id, "activity_summary") is None

        # a notification without a date: a live poll from the cursor, as before
        undated = json.dumps([fitbit_note("sleep", day=None)]).encode()
        assert requests.post(f"{base}/fitbit/webhook", data=undated, headers=fitbit_signed(undated),
                             timeout=10).status_code == 204
        sleep_asked = len(api.served("sleep"))
        report = NotificationFetcher(polling).run_once(broker.bootstrap, notes, group="fetch")
        assert [r.track for r in report.fetched.results] == ["live"]
        assert [r.path for r in api.served("sleep")[sleep_asked:]] == [
            "/1.2/user/-/sleep/date/2024-03-12/2024-03-12.json"]
        publisher.close()

    rows = deliver(tmp_path, broker, topic, state)
    sleeps = {key for user, kind, key, _ in rows if kind == "sleep" and user == start.user_id}
    assert {"45000000005", "45000000011", "45000000012"} <= sleeps  # the old night arrived downstream
    assert ("daily", "2024-03-05") in {(kind, payload["metadata"]["start_time"][:10]) for _, kind, _, payload in rows}
    plane.close()


def test_an_identical_notification_after_the_fetch_is_fetched_again_but_not_while_the_first_is_queued(
        tmp_path, fake_provider, broker, topic, monkeypatch):
    """Fitbit notifications carry no id or timestamp: a second sync of the same day is byte-identical. Taken for a
    replay only while the first is not fetched yet; after the fetch it is fetched again (the day's newer data)."""
    monkeypatch.setenv("HEALTHFLOW_FITBIT_CLIENT_SECRET", "secret")
    state = f"sqlite:///{tmp_path}/state.db"
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=2)
    plane, _start = connect_provider(state, fake_provider, "fitbit", ACCOUNT)
    app = FastAPI()  # the API keeps its replay claims in the control plane's store, where the fetcher finds them
    app.include_router(router(RawEventPublisher(broker.bootstrap), topic, notes, seen=SeenNotifications(state)))
    body = json.dumps([fitbit_note("sleep", day="2024-03-12")]).encode()
    with BackgroundServer() as server, FakeFitbitApi(token_validator=fake_provider.is_live) as api:
        server.start(app)

        def notify() -> int:
            return requests.post(f"{server.url}/v2/providers/fitbit/webhook", data=body, headers=fitbit_signed(body),
                                 timeout=10).status_code

        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"fitbit": api.manifest},
                        limiter=limiter(topic), clock=lambda: NOW, backoff_s=0.05)
        fetcher = NotificationFetcher(ConnectionPolling(plane, poller, kinds=lambda _: ["sleep"]))
        api.add("sleep", [night(date(2024, 3, 12), 45000000012)])
        assert notify() == 204
        assert [r.kind for r in fetcher.run_once(broker.bootstrap, notes, group="fetch").fetched.results] == ["sleep"]

        api.add("sleep", [night(date(2024, 3, 12), 45000000013)])  # synced again: the same notification
        assert notify() == 204
        assert notify() == 204  # a replay while it is queued: acknowledged, queued once
        asked = len(api.served("sleep"))
        again = fetcher.run_once(broker.bootstrap, notes, group="fetch")
        assert [r.kind for r in again.fetched.results] == ["sleep"], "the second sync's notification was dropped"
        assert len(api.served("sleep")) == asked + 1  # fetched once, not once per copy
        publisher.close()
    assert len(read_raw_events(broker.bootstrap, notes)) == 2
    plane.close()


# ----------------------------------------------------------------------------------------------------------------------
# Withings: form-encoded notifications with a start and end date; appli 46 user events
# ----------------------------------------------------------------------------------------------------------------------
def test_withings_form_notifications_fetch_their_span_and_unlink_revokes(tmp_path, broker, topic, webhook):
    base, notes = webhook
    state = f"sqlite:///{tmp_path}/state.db"
    events = MemoryCollector()
    with FakeWithings() as oauth:
        plane, start = connect_provider(state, oauth, "withings", WITHINGS_USER, emit=events)
        with FakeWithingsApi(page_size=10, token_validator=oauth.is_live) as api:
            group = copy.deepcopy(json.loads((FIXTURES / "withings" / "getmeas.json").read_text())["body"]
                                  ["measuregrps"][0])
            weighed = int((NOW - timedelta(days=20)).timestamp())  # long before any live window
            group.update(grpid=9100000001, date=weighed, created=weighed + 30, modified=weighed + 30)
            api.add("getmeas", [group])
            publisher = KafkaPublisher(broker.bootstrap, topic)
            cursors = CursorStore(state)
            poller = Poller(cursors=cursors, publisher=publisher, manifests={"withings": api.manifest},
                            limiter=limiter(topic), clock=lambda: NOW, overlap=timedelta(0), backoff_s=0.05)
            fetcher = NotificationFetcher(ConnectionPolling(plane, poller))

            def notify(**fields: Any) -> None:
                reply = requests.post(f"{base}/withings/webhook?token={WITHINGS_URL_TOKEN}", timeout=10,
                                      data=urllib.parse.urlencode(fields),
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
                assert reply.status_code == 200 and reply.json() == {"status": "accepted"}

            notify(userid=WITHINGS_USER, appli=1, startdate=weighed - 60, enddate=weighed)
            notify(userid=WITHINGS_USER, appli=46, action="update")  # a profile change: nothing to do
            report = fetcher.run_once(broker.bootstrap, notes, group="fetch")
            assert [(r.kind, r.published) for r in report.fetched.results] == [("getmeas", 1)]
            (asked,) = [r.params for r in api.served("getmeas")]
            assert (asked["startdate"], asked["enddate"]) == (str(weighed - 60), str(weighed + 1))  # end inclusive
            assert cursors.get(start.user_id, "getmeas") is None  # the live cursor: untouched
            assert (report.ignored, report.revoked) == (1, [])
            rows = deliver(tmp_path, broker, topic, state)  # the old weigh-in arrived downstream
            assert [(user, kind) for user, kind, _, _ in rows] == [(start.user_id, "body")]

            notify(userid=WITHINGS_USER, appli=46, action="unlink")
            report = fetcher.run_once(broker.bootstrap, notes, group="fetch")
            assert report.revoked == [start.user_id] and report.fetched.results == []
            assert plane.connection(start.user_id).state == "revoked"
            assert [e["type"] for e in events.events] == ["auth", "access_revoked"]
            publisher.close()
        plane.close()
