"""Sustained failure disables a destination; scheduled redelivery follows each destination's schedule."""

from __future__ import annotations

import json
import time

from core.errors import RetryableError
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from pipelines.replay import replay_deliveries, select
from pipelines.webhook_receiver import WebhookReceiver
from sinks.policy import RetryPolicy, Target
from sinks.sql import SqlSink
from sinks.status import DestinationStatus
from sinks.webhook import WebhookSink


def _raw(tmp_path, payloads, name="raw.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps({"provider": p.provider, "kind": p.kind, "user_id": p.user_id,
                                          "received_at": p.received_at_ms, "payload": p.payload.decode()})
                              for p in payloads) + "\n")
    return str(path)


def _job(tmp_path, source, targets) -> NormalizeJob:
    return NormalizeJob(FileSource(source), targets, str(tmp_path / "dlq"), state_url=f"sqlite:///{tmp_path}/s.db")


def test_410_disables_the_destination_and_later_events_wait_as_dead_letters(tmp_path, simulated_payloads,
                                                                            webhook_secret):
    quick = RetryPolicy(max_attempts=2, initial_delay_s=0.01)
    state = f"sqlite:///{tmp_path}/s.db"
    with WebhookReceiver(webhook_secret) as receiver:
        targets = [Target(WebhookSink("hook", receiver.url, webhook_secret), quick),
                   Target(SqlSink("sql", f"sqlite:///{tmp_path}/out.db"), quick)]
        receiver.fail_next(1, 410)
        first = run_batch(_job(tmp_path, _raw(tmp_path, simulated_payloads[:30]), targets))
        status = DestinationStatus(state).open()
        assert status.get("hook").disabled and "endpoint gone" in status.get("hook").reason
        requests_so_far = receiver.received
        second = run_batch(_job(tmp_path, _raw(tmp_path, simulated_payloads[30:60], "more.jsonl"), targets))
        assert receiver.received == requests_so_far  # nothing sent to a disabled destination
        events_second = sum(second.with_prefix("normalized:").values())
        assert second.get("delivery_dead_letter:hook") == events_second
        assert second.get("delivered:sql") == events_second  # the other destination is unaffected
        waiting = select(str(tmp_path / "dlq"), destination="hook")
        assert {r["error_class"] for r in waiting} == {"EndpointGone", "DestinationDisabled"}

        assert replay_deliveries(str(tmp_path / "dlq"), targets, due_only=True, status_url=state).delivered == {}
        status.enable("hook")
        status.close()
        replayed = replay_deliveries(str(tmp_path / "dlq"), targets, destination="hook", status_url=state)
        total = sum(first.with_prefix("normalized:").values()) + events_second
        # an earlier version of a record the second batch updated is settled unsent (superseded), not delivered
        assert replayed.delivered["hook"] + replayed.superseded["hook"] == len(waiting)
        assert replayed.superseded["hook"] > 0 and receiver.unique == total - replayed.superseded["hook"]


def test_sustained_failure_disables_after_the_configured_time(tmp_path, simulated_payloads, webhook_secret):
    state = f"sqlite:///{tmp_path}/s.db"
    policy = RetryPolicy(max_attempts=1, disable_after_s=3600)
    status = DestinationStatus(state).open()
    two_hours_ago = int(time.time() * 1000) - 7200_000
    status.record_failure("hook", RetryableError("503"), policy.disable_after_s, at_ms=two_hours_ago)
    assert not status.get("hook").disabled  # failing for a while, not yet long enough on its own
    with WebhookReceiver(webhook_secret) as receiver:
        receiver.fail_next(10_000, 503)
        run_batch(_job(tmp_path, _raw(tmp_path, simulated_payloads[:20]),
                       [Target(WebhookSink("hook", receiver.url, webhook_secret), policy)]))
    assert status.get("hook").disabled and "failing since" in status.get("hook").reason
    status.enable("hook")
    assert not status.get("hook").disabled and status.get("hook").failing_since_ms is None
    status.close()


def test_scheduled_redelivery_rounds_and_retry_after(tmp_path, simulated_payloads, webhook_secret):
    dlq, state = str(tmp_path / "dlq"), f"sqlite:///{tmp_path}/s.db"
    with WebhookReceiver(webhook_secret) as receiver:
        hourly = Target(WebhookSink("hook", receiver.url, webhook_secret),
                        RetryPolicy(max_attempts=1, redelivery_schedule_s=(0.0, 0.0)))
        receiver.fail_next(10_000, 500)
        run_batch(_job(tmp_path, _raw(tmp_path, simulated_payloads[:20]), [hourly]))
        dead = select(dlq, destination="hook")
        assert dead and all(r["next_attempt_at"] is not None and r["redelivery_round"] == 0 for r in dead)

        again = replay_deliveries(dlq, [hourly], due_only=True, status_url=state)  # still failing: round 1
        assert again.failed_again["hook"] == len(dead)
        assert {r["redelivery_round"] for r in select(dlq, destination="hook")} == {1}
        replay_deliveries(dlq, [hourly], due_only=True, status_url=state)  # schedule spent: manual replay only
        assert {r["next_attempt_at"] for r in select(dlq, destination="hook")} == {None}
        assert replay_deliveries(dlq, [hourly], due_only=True, status_url=state).failed_again == {}

        receiver.clear_failures()
        assert replay_deliveries(dlq, [hourly], status_url=state).delivered["hook"] == len(dead)

        receiver.fail_next(10_000, 429, retry_after=3600)
        run_batch(_job(tmp_path, _raw(tmp_path, simulated_payloads[20:30], "later.jsonl"), [hourly]))
        later = select(dlq, destination="hook")
        assert later and all(r["next_attempt_at"] >= time.time() * 1000 + 3500_000 for r in later)
        assert replay_deliveries(dlq, [hourly], due_only=True, status_url=state).delivered == {}
