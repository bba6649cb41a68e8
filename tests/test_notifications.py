"""Notify-only webhooks become data: a queued Oura notification is fetched for its connection."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis

from connectors.publish import publish
from controlplane.polling import (
    ConnectionPolling,
    CursorStore,
    KafkaPublisher,
    NotificationFetcher,
    Poller,
    RedisRateLimiter,
)
from core.raw import RawPayload
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api")
from servers.fake_provider import connect_provider  # noqa: E402
from servers.fake_provider_api import FakeProviderApi  # noqa: E402

READINESS = json.loads((Path(__file__).parent / "fixtures" / "oura" / "daily_readiness.json").read_text())["data"][0]
NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)


def test_a_notification_fetches_the_named_data_for_its_connection(tmp_path, fake_provider, broker, topic):
    state = f"sqlite:///{tmp_path}/state.db"
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=1)
    plane, _ = connect_provider(state, fake_provider, "oura", "oura-acct-5", reference_id="athlete-5")

    with FakeProviderApi("oura", token_validator=fake_provider.is_live) as api:
        doc = copy.deepcopy(READINESS)
        doc.update(id="readiness-3-19", day="2024-03-19", timestamp="2024-03-19T00:00:00+01:00")
        api.add("daily_readiness", [doc])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"oura": api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: NOW, overlap=timedelta(0), backoff_s=0.05)
        fetcher = NotificationFetcher(ConnectionPolling(plane, poller))
        notification = {"event_type": "update", "data_type": "daily_readiness", "object_id": "readiness-3-19",
                        "event_time": "2024-03-20T11:00:00+00:00", "user_id": "oura-acct-5"}
        stranger = dict(notification, user_id="someone-else")
        deleted_tag = dict(notification, data_type="tag")  # not a kind the manifest maps: nothing to fetch
        # a day-keyed collection's deletion is no tombstone (see the Oura notes): ignored, never fetched by id
        deleted_readiness = dict(notification, event_type="delete", object_id="readiness-3-18")
        publish(broker.bootstrap, notes, [RawPayload("oura", json.dumps(n).encode(), kind="notification",
                                                     user_id=n["user_id"])
                                          for n in (notification, stranger, deleted_tag, deleted_readiness)])

        report = fetcher.run_once(broker.bootstrap, notes, group="fetch")
        assert (report.unknown_accounts, report.ignored, report.unreadable) == (1, 2, 0)
        assert [r.kind for r in report.fetched.results] == ["daily_readiness"]
        # the notification names its document (object_id): that document is fetched, not the live window
        assert [r.path for r in api.served("daily_readiness")] == ["/v2/usercollection/daily_readiness/readiness-3-19"]
        assert fetcher.run_once(broker.bootstrap, notes, group="fetch").fetched.results == []  # committed
        publisher.close()

    summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "fetched"),
                                     [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                     state_url=state))
    assert summary.get("delivered:sql") == 1 and date(2024, 3, 19)
    plane.close()


def test_a_notification_that_cannot_be_fetched_is_queued_again(tmp_path, fake_provider, broker, topic):
    """The provider fails for the first notification: the next one is still fetched, the failed one is queued again
    with a due time, waits while not due, and is fetched once due; nothing is dropped."""
    state = f"sqlite:///{tmp_path}/state.db"
    notes = f"{topic}.notes"
    broker.create_topic(notes, partitions=1)
    plane, start = connect_provider(state, fake_provider, "oura", "oura-acct-6", reference_id="athlete-6")
    with FakeProviderApi("oura", token_validator=fake_provider.is_live) as api:
        api.add("daily_readiness", [dict(copy.deepcopy(READINESS), id="r-3-19", day="2024-03-19")])
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = Poller(cursors=CursorStore(state), publisher=publisher, manifests={"oura": api.manifest},
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic),
                        clock=lambda: NOW, overlap=timedelta(0), backoff_s=0.01, max_attempts=2)
        polling = ConnectionPolling(plane, poller)
        notes_sent = [{"event_type": "update", "data_type": kind, "user_id": "oura-acct-6"}
                      for kind in ("daily_readiness", "sleep")]
        publish(broker.bootstrap, notes, [RawPayload("oura", json.dumps(n).encode(), kind="notification",
                                                     user_id=n["user_id"]) for n in notes_sent])
        api.fail(2)  # the readiness fetch: both attempts answer 500
        clock = [datetime(2026, 11, 29, 9, 0, tzinfo=UTC)]
        fetcher = NotificationFetcher(polling, retry_base_s=30, clock=lambda: clock[0])
        first = fetcher.run_once(broker.bootstrap, notes, group="f")
        assert [(user, kind) for user, kind, _ in first.fetched.failed] == [(start.user_id, "daily_readiness")]
        assert [r.kind for r in first.fetched.results] == ["sleep"] and first.requeued == 1

        clock[0] += timedelta(seconds=10)  # not due yet: kept, not fetched
        waiting = fetcher.run_once(broker.bootstrap, notes, group="f")
        assert (waiting.deferred, waiting.fetched.results, len(api.served("daily_readiness"))) == (1, [], 0)

        clock[0] += timedelta(seconds=25)  # due (30 s after the failure): fetched, the provider answers again
        due = fetcher.run_once(broker.bootstrap, notes, group="f")
        assert (due.deferred, due.requeued) == (0, 0)
        assert [(r.kind, r.published) for r in due.fetched.results] == [("daily_readiness", 1)]
        done = fetcher.run_once(broker.bootstrap, notes, group="f")
        assert (done.deferred, done.requeued, done.fetched.results) == (0, 0, [])
        publisher.close()
    plane.close()
