"""Deletions as tombstone events: the merge and record state order them against data, and the real pipeline
delivers them to every destination type, where the deleted workout disappears (SQL, object stores) or its tombstone
arrives after its data (webhook, SQS, Kafka, Pub/Sub); a tombstone a destination missed is replayed like data.

The provider side is WHOOP's ``workout.deleted`` webhook (``{"user_id", "id", "type", "trace_id"}``) as the webhook
receiver publishes it (raw kind ``deleted``), mapped by WHOOP's own mapper to a ``connectors.base.Deletion``."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import json
import secrets
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apache_beam.testing.test_stream import TestStream as BeamTestStream

from connectors import get_provider
from connectors.base import Deletion, KindSpec, terra_user_id
from core.events import NormalizedEvent, canonical_json
from core.raw import RawMessage, RawPayload
from pipelines.launch import make_pipeline
from pipelines.normalize import FileSource, NormalizeJob, RunSummary, build_from, run_batch
from pipelines.replay import replay_deliveries, select
from pipelines.webhook_receiver import WebhookReceiver
from schemas.serde import encode_raw
from sinks.object_store import ObjectStoreSink
from sinks.policy import RetryPolicy, Target
from sinks.sql import SqlSink
from sinks.webhook import WebhookSink
from transforms.normalize import Keyed, merge_user_events, normalize_in_memory
from transforms.record_state import TOMBSTONE_FIELD, state_row

try:  # pytest puts tests/ on sys.path while tests/ has no __init__.py ...
    from servers.pubsub_server import PubSubTestServer
    from test_delivery_e2e import ALL_DESTINATIONS, SQL_DESTINATIONS, Deployment, Stack, expected_events
except ImportError:  # ... and the repository root once it has one
    from tests.servers.pubsub_server import PubSubTestServer
    from tests.test_delivery_e2e import ALL_DESTINATIONS, SQL_DESTINATIONS, Deployment, Stack, expected_events

FIXTURES = Path(__file__).parent / "fixtures" / "whoop"
WHOOP_USER = "245199"
USER_ID = terra_user_id("whoop", WHOOP_USER)
DELETED_WORKOUT = "ecfc6a15-4661-442f-a9a4-f160dd7afae8"
KEPT_WORKOUT = "5b7d9f1a-3c5e-4a7b-8d9f-1a3c5e7b9d2f"
CREATED_AT_MS = 1_710_200_000_000  # after both workouts' updated_at
DELETED_AT_MS = 1_710_300_000_000


# ======================================================================================================================
# Merge and record state: deletions fold with fragments by version
# ======================================================================================================================
USER = {"user_id": "u", "provider": "WHOOP"}


def _data(version: int, sequence: str, **fields: Any) -> Keyed:
    record = {"metadata": {"summary_id": "w1", "start_time": "2024-03-11T17:30:00+01:00"}, **fields}
    return Keyed("activity", "w1", record, version, sequence, USER, f"raw-{sequence}")


def _deletion(version: int, sequence: str) -> Keyed:
    return Keyed("activity", "w1", {}, version, sequence, USER, f"raw-{sequence}", deleted=True)


def test_a_deletion_newer_than_the_data_makes_a_tombstone_naming_the_records_start() -> None:
    [event] = merge_user_events("u", [_data(10, "1", device_data={"name": "WHOOP 4.0"}), _deletion(20, "2")])

    assert event.deleted and event.type == "activity" and event.ordering_timestamp_ms == 20
    assert event.envelope() == {"type": "activity", "user": USER, "version": "2022-03-16", "deleted": [
        {"natural_key": "w1", "summary_id": "w1", "start_time": "2024-03-11T17:30:00+01:00"}]}
    assert event.event_id == NormalizedEvent.tombstone(type="activity", user=USER, natural_key="w1",
                                                       ordering_timestamp_ms=20, sequence="x").event_id


def test_data_newer_than_a_deletion_recreates_the_record_fresh() -> None:
    stored = {("activity", "w1"): ({"metadata": {"summary_id": "w1"}, "device_data": {"name": "old"}}, 5)}
    fragments = [_deletion(20, "2"), _data(30, "3", calories_data={"total_burned_calories": 576})]

    [event] = merge_user_events("u", fragments, stored)

    assert not event.deleted and event.ordering_timestamp_ms == 30
    assert event.data == {"metadata": {"summary_id": "w1", "start_time": "2024-03-11T17:30:00+01:00"},
                          "calories_data": {"total_burned_calories": 576}}  # nothing of the deleted record


def test_at_equal_versions_the_deletion_wins_whatever_the_arrival_order() -> None:
    [after_data] = merge_user_events("u", [_data(20, "1"), _deletion(20, "2")])
    [before_data] = merge_user_events("u", [_deletion(20, "1"), _data(20, "2")])

    assert after_data.deleted and after_data.ordering_timestamp_ms == 21  # above the data's: no sink guard undoes it
    assert before_data.deleted and before_data.ordering_timestamp_ms == 20  # the data is not newer: stale


def test_a_deletion_of_a_stored_record_of_its_own_version_is_ordered_after_it() -> None:
    stored = {("activity", "w1"): ({"metadata": {"summary_id": "w1", "start_time": "2024-03-11T17:30:00+01:00"}}, 20)}

    [event] = merge_user_events("u", [_deletion(20, "2")], stored)

    assert event.deleted and event.ordering_timestamp_ms == 21


def test_data_of_a_stored_deletions_own_version_stays_deleted() -> None:
    stored = {("activity", "w1"): ({TOMBSTONE_FIELD: {"natural_key": "w1", "summary_id": "w1"}}, 20)}

    [event] = merge_user_events("u", [_data(20, "5", device_data={"name": "WHOOP 4.0"})], stored)

    assert event.deleted and event.ordering_timestamp_ms == 20


def test_an_unversioned_deletion_comes_after_whatever_is_stored() -> None:
    stored = {("activity", "w1"): ({"metadata": {"summary_id": "w1"}}, 1_710_000_000_000)}  # provider's updated_at
    received = Keyed("activity", "w1", {}, 1_700_000_000_000, "2", USER, "raw-2", deleted=True, unversioned=True)

    [event] = merge_user_events("u", [received], stored)  # our clock is behind the provider's version

    assert event.deleted and event.ordering_timestamp_ms == 1_710_000_000_001
    again = {("activity", "w1"): ({TOMBSTONE_FIELD: event.data}, event.ordering_timestamp_ms)}
    assert merge_user_events("u", [received], again)[0].event_id == event.event_id  # redelivered: the same


def test_a_record_recreated_after_a_deletion_never_reuses_an_id_seen_before_it() -> None:
    record = {"metadata": {"summary_id": "w1", "start_time": "2024-03-11T17:30:00+01:00"}}
    [before] = merge_user_events("u", [_data(10, "1")])
    digest = hashlib.sha256(canonical_json(["u", "activity", "w1", record])).hexdigest()[:32]
    assert before.event_id == f"evt_{digest}" and before.generation is None  # never deleted: the id as ever

    [in_batch] = merge_user_events("u", [_data(10, "1"), _deletion(20, "2"), _data(30, "3")])
    stored_deletion = {("activity", "w1"): ({TOMBSTONE_FIELD: {"natural_key": "w1", "summary_id": "w1"}}, 20)}
    [after_stored] = merge_user_events("u", [_data(30, "3")], stored_deletion)

    assert in_batch.data == after_stored.data == before.data
    assert in_batch.generation == after_stored.generation == 20
    assert in_batch.event_id == after_stored.event_id != before.event_id
    stored = {("activity", "w1"): (json.loads(state_row(after_stored)), 30)}  # the generation stays with the record
    [redelivered] = merge_user_events("u", [_data(30, "3")], stored)
    assert redelivered.event_id == after_stored.event_id and redelivered.data == record


def test_data_older_than_a_stored_deletion_does_not_resurrect_the_record() -> None:
    stored = {("activity", "w1"): ({TOMBSTONE_FIELD: {"natural_key": "w1", "summary_id": "w1",
                                                      "start_time": "2024-03-11T17:30:00+01:00"}}, 20)}

    [event] = merge_user_events("u", [_data(10, "5", device_data={"name": "WHOOP 4.0"})], stored)

    assert event.deleted and event.ordering_timestamp_ms == 20
    assert event.data == {"natural_key": "w1", "summary_id": "w1", "start_time": "2024-03-11T17:30:00+01:00"}


def test_a_deletion_older_than_the_stored_record_changes_nothing() -> None:
    stored = {("activity", "w1"): ({"metadata": {"summary_id": "w1"}, "device_data": {"name": "new"}}, 30)}

    [event] = merge_user_events("u", [_deletion(20, "2")], stored)

    assert not event.deleted and event.data == stored[("activity", "w1")][0]


def test_a_deletion_of_a_record_never_seen_is_still_a_tombstone() -> None:
    [event] = merge_user_events("u", [_deletion(20, "2")])

    assert event.deleted and event.data == {"natural_key": "w1", "summary_id": "w1"}


def _saved(events: list[NormalizedEvent]) -> dict:
    """The record state after ``events``: what ``MergePerUser`` saves (``state_row``) at each ordering timestamp."""
    return {(e.type, e.natural_key): (json.loads(state_row(e)), e.ordering_timestamp_ms) for e in events}


def test_data_from_before_a_deletion_never_refills_the_record_recreated_after_it() -> None:
    """Data at 10, a deletion at 20, the record re-created at 30: the data at 10 redelivered late is older than the
    deletion (the generation the record keeps), so it fills no gap of the new record."""
    state = _saved(merge_user_events("u", [_data(10, "1", device_data={"name": "WHOOP 4.0"})]))
    state = _saved(merge_user_events("u", [_deletion(20, "2")], state))
    [recreated] = merge_user_events("u", [_data(30, "3", calories_data={"total_burned_calories": 576})], state)
    assert recreated.generation == 20
    [late] = merge_user_events("u", [_data(10, "1", device_data={"name": "WHOOP 4.0"})], _saved([recreated]))

    assert "device_data" not in late.data and late.event_id == recreated.event_id
    assert late.ordering_timestamp_ms == 30
    [newer] = merge_user_events("u", [_data(25, "4", device_data={"name": "WHOOP 4.0"})], _saved([recreated]))
    assert newer.data["device_data"] == {"name": "WHOOP 4.0"}  # after the deletion: fills the gap as any stale data


def test_a_redelivered_unversioned_deletion_does_not_delete_the_record_recreated_after_it() -> None:
    """An unversioned deletion (version: its arrival time) redelivered with the same arrival time after the record
    was re-created is the deletion the record's generation names: stale."""
    received = Keyed("activity", "w1", {}, 20, "2", USER, "raw-2", deleted=True, unversioned=True)
    state = _saved(merge_user_events("u", [_data(10, "1")]))
    state = _saved(merge_user_events("u", [received], state))
    [recreated] = merge_user_events("u", [_data(30, "3")], state)
    [again] = merge_user_events("u", [received], _saved([recreated]))

    assert not again.deleted and again.event_id == recreated.event_id and again.ordering_timestamp_ms == 30
    later = dataclasses.replace(received, version_ms=40, sequence="4")  # a new deletion: received after it
    [deleted] = merge_user_events("u", [later], _saved([recreated]))
    assert deleted.deleted and deleted.ordering_timestamp_ms == 40


# ======================================================================================================================
# Through the real pipeline
# ======================================================================================================================
@pytest.mark.parametrize("day", ["2024-03", "2024-03-1*", "2024-03-11T00:00:00Z"])
def test_a_day_scoped_deletion_must_name_a_day(monkeypatch: pytest.MonkeyPatch, day: str) -> None:
    monkeypatch.setitem(get_provider("whoop").kinds, "cycle.deleted", KindSpec(
        "cycle.deleted", ("daily",), lambda doc: Deletion("daily", doc["day"], str(doc["user_id"])), "a deleted cycle"))
    raw = RawPayload("whoop", json.dumps({"user_id": int(WHOOP_USER), "day": day}).encode(), kind="cycle.deleted",
                     received_at_ms=DELETED_AT_MS)

    events, [failed] = normalize_in_memory([RawMessage(encode_raw(raw), {"path": "raw", "line": 0})])

    assert events == [] and failed.stage == "validate"  # where mapped records are checked
    assert failed.record["error_class"] == "MappingError" and "must name its day (YYYY-MM-DD)" in failed.record[
        "error_message"]


def _raw_file(path: Path, kind: str, payload: dict[str, Any], received_at_ms: int) -> str:
    path.write_text(json.dumps({"provider": "whoop", "kind": kind, "user_id": None, "received_at": received_at_ms,
                                "payload": json.dumps(payload)}) + "\n")
    return str(path)


def _workouts() -> dict[str, Any]:
    return json.loads((FIXTURES / "workout.page.json").read_text())


def _deletion_webhook() -> dict[str, Any]:
    return {"user_id": int(WHOOP_USER), "id": DELETED_WORKOUT, "type": "workout.deleted",
            "trace_id": "d3c4a8f2-1b6e-4c9d-9a7f-2e5b8c1d4f60"}


def _tombstone_id(ordering_timestamp_ms: int = DELETED_AT_MS) -> str:
    return NormalizedEvent.tombstone(type="activity", user={"user_id": USER_ID}, natural_key=DELETED_WORKOUT,
                                     ordering_timestamp_ms=ordering_timestamp_ms, sequence="").event_id


@pytest.fixture
def stack(broker, moto_endpoint: str, tmp_path: Path) -> Iterator[Stack]:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with contextlib.ExitStack() as exit_stack, PubSubTestServer() as pubsub:
        yield Stack(broker, moto_endpoint, pubsub, secret, tmp_path, exit_stack)


def test_a_deleted_workout_disappears_from_every_destination(stack: Stack, tmp_path: Path) -> None:
    deployment: Deployment = stack.deploy("tomb")
    created = _raw_file(tmp_path / "created.jsonl", "workout", _workouts(), CREATED_AT_MS)
    expected = expected_events(created)
    [data_ids] = expected.order.values()
    kept_id = next(i for i in data_ids if expected.events[i].natural_key == KEPT_WORKOUT)
    tombstone_id = _tombstone_id()

    first = deployment.run(created)
    second = deployment.run(_raw_file(tmp_path / "deleted.jsonl", "deleted", _deletion_webhook(),
                                      DELETED_AT_MS))

    for name in ALL_DESTINATIONS:
        assert first.get(f"delivered:{name}") == 2 and first.get(f"deleted:{name}") == 0, name
        assert second.get(f"delivered:{name}") == 1 and second.get(f"deleted:{name}") == 1, name
        assert second.get(f"delivery_dead_letter:{name}") == 0, name
    assert second.get("tombstones:whoop:activity") == 1 and second.get("normalized:whoop:activity") == 1

    for name in SQL_DESTINATIONS:  # the workout's row is gone, the other stays
        assert deployment.sql_event_ids(name) == [kept_id], name
    assert deployment.sql_count("supabase", "terra_data_payloads") == 1
    assert [b["data"][0]["metadata"]["summary_id"] for b in deployment.object_store_bodies()] == [KEPT_WORKOUT]
    assert deployment.s3_json_event_ids() == [kept_id]
    assert Counter(deployment.s3_parquet_event_ids()) == Counter([*data_ids, tombstone_id])

    in_order = [*data_ids, tombstone_id]  # the tombstone after the data, per user
    tombstone_body = {"type": "activity", "user": {"user_id": USER_ID, "provider": "WHOOP"}, "version": "2022-03-16",
                      "deleted": [{"natural_key": DELETED_WORKOUT, "summary_id": DELETED_WORKOUT,
                                   "start_time": "2024-03-11T17:30:00.000000+01:00"}]}
    receiver = deployment.receiver
    assert receiver.order_for(USER_ID) == in_order and receiver.rejected_signature == 0
    assert receiver.events[tombstone_id] == tombstone_body
    assert receiver.headers[tombstone_id]["x-healthflow-deleted"] == "true"
    assert "x-healthflow-deleted" not in receiver.headers[kept_id]

    messages = deployment.sqs_messages()
    assert [m["MessageAttributes"]["event_id"]["StringValue"] for m in messages] == in_order
    assert json.loads(messages[-1]["Body"]) == tombstone_body
    assert messages[-1]["MessageAttributes"]["deleted"]["StringValue"] == "true"
    assert "deleted" not in messages[0]["MessageAttributes"]

    by_partition = deployment.kafka_messages()
    assert [event_id for messages in by_partition.values() for _, event_id in messages] == in_order

    pubsub = deployment.pubsub_messages(expected=3)
    assert [m.attributes["event_id"] for m in pubsub] == in_order
    assert json.loads(pubsub[-1].data) == tombstone_body and pubsub[-1].attributes["deleted"] == "true"


class LocalRun:
    """Batch runs into one SQLite destination and one local object store, on one record state."""

    def __init__(self, root: Path) -> None:
        self.root, self.database, self.objects = root, root / "out.db", root / "objects"

    def __call__(self, name: str, kind: str, payload: dict[str, Any], received_at_ms: int) -> RunSummary:
        sinks = [SqlSink("sql", f"sqlite:///{self.database}"), ObjectStoreSink("objects", str(self.objects))]
        return run_batch(NormalizeJob(FileSource(_raw_file(self.root / name, kind, payload, received_at_ms)), sinks,
                                      str(self.root / "dlq"), state_url=f"sqlite:///{self.root / 'state.db'}"))

    def rows(self) -> dict[str, dict[str, Any]]:
        """The SQL destination's records by natural key."""
        with contextlib.closing(sqlite3.connect(self.database)) as connection:
            rows = connection.execute("SELECT natural_key, payload FROM healthflow_records").fetchall()
        return {key: json.loads(payload) for key, payload in rows}

    def object_names(self) -> list[str]:
        return sorted(path.name for path in self.objects.rglob("*.json"))


def test_state_keeps_the_deletion_older_data_stays_deleted_and_newer_data_comes_back_fresh(
        tmp_path: Path) -> None:
    run = LocalRun(tmp_path)
    workouts = _workouts()
    run("created.jsonl", "workout", workouts, CREATED_AT_MS)
    run("deleted.jsonl", "deleted", _deletion_webhook(), DELETED_AT_MS)

    resent = run("resent.jsonl", "workout", workouts, DELETED_AT_MS + 1_000)  # the old version, sent again

    assert set(run.rows()) == {KEPT_WORKOUT}
    assert resent.get("tombstones:whoop:activity") == 1  # the stored deletion again, not the old workout
    assert run.object_names() == [f"{USER_ID}-2024-03-12T12:15:00.000000+01:00.json"]

    edited = copy.deepcopy(workouts["records"][0])  # the workout comes back later, without its distance
    edited["updated_at"] = "2024-03-14T08:00:00.000Z"
    del edited["score"]["distance_meter"]
    recreated = run("recreated.jsonl", "workout", {"records": [edited]}, DELETED_AT_MS + 2_000)

    assert recreated.get("tombstones:whoop:activity") == 0
    rows = run.rows()
    assert set(rows) == {KEPT_WORKOUT, DELETED_WORKOUT}
    assert rows[DELETED_WORKOUT]["distance_data"] == {"summary": {"elevation": {"gain_actual_meters": 46.2}}}  # fresh
    assert rows[DELETED_WORKOUT]["calories_data"] == {"total_burned_calories": 576}
    assert len(run.object_names()) == 2


def test_a_tombstone_a_destination_missed_is_dead_lettered_and_replayed(tmp_path: Path,
                                                                        webhook_secret: str) -> None:
    dlq, state = str(tmp_path / "dlq"), f"sqlite:///{tmp_path / 'state.db'}"
    fast = RetryPolicy(max_attempts=2, initial_delay_s=0.01, max_delay_s=0.02)
    with WebhookReceiver(webhook_secret) as receiver:
        targets = [Target(WebhookSink("webhook", receiver.url, webhook_secret), fast)]
        run_batch(NormalizeJob(FileSource(_raw_file(tmp_path / "c.jsonl", "workout", _workouts(), CREATED_AT_MS)),
                               targets, dlq, state_url=state))
        receiver.fail_next(100, 503)
        summary = run_batch(NormalizeJob(FileSource(_raw_file(tmp_path / "d.jsonl", "deleted",
                                                              _deletion_webhook(), DELETED_AT_MS)),
                                         targets, dlq, state_url=state))
        assert summary.get("delivery_dead_letter:webhook") == 1 and summary.get("deleted:webhook") == 0
        [dead] = select(dlq, destination="webhook")
        assert dead["event_id"] == _tombstone_id()

        receiver.clear_failures()
        replayed = replay_deliveries(dlq, targets, destination="webhook", status_url=state)

        assert replayed.delivered == Counter({"webhook": 1}) and not replayed.failed_again
        assert receiver.order_for(USER_ID)[-1] == _tombstone_id()
        assert receiver.events[_tombstone_id()]["deleted"][0]["summary_id"] == DELETED_WORKOUT
        assert receiver.headers[_tombstone_id()]["x-healthflow-deleted"] == "true"
        assert select(dlq, destination="webhook") == []



def test_replay_settles_dead_letters_older_than_the_record_as_superseded(tmp_path: Path,
                                                                         webhook_secret: str) -> None:
    """The data dead-lettered before the deletion is not sent after the tombstone; the tombstone dead-lettered before
    the workout came back is not sent after the re-created record."""
    dlq, state = str(tmp_path / "dlq"), f"sqlite:///{tmp_path / 'state.db'}"
    fast = RetryPolicy(max_attempts=1, initial_delay_s=0.01, max_delay_s=0.02)
    workouts = _workouts()
    with WebhookReceiver(webhook_secret) as receiver:
        targets = [Target(WebhookSink("webhook", receiver.url, webhook_secret), fast)]

        def run(name: str, kind: str, payload: dict[str, Any], at_ms: int) -> RunSummary:
            return run_batch(NormalizeJob(FileSource(_raw_file(tmp_path / name, kind, payload, at_ms)), targets, dlq,
                                          state_url=state))

        receiver.fail_next(2, 503)
        assert run("c.jsonl", "workout", workouts, CREATED_AT_MS).get("delivery_dead_letter:webhook") == 2
        receiver.clear_failures()
        run("d.jsonl", "deleted", _deletion_webhook(), DELETED_AT_MS)  # delivered
        kept_id = next(r["event_id"] for r in select(dlq) if r["source"]["natural_key"] == KEPT_WORKOUT)

        replayed = replay_deliveries(dlq, targets, destination="webhook", status_url=state)

        assert replayed.delivered == Counter({"webhook": 1}) and replayed.superseded == Counter({"webhook": 1})
        assert receiver.order_for(USER_ID) == [_tombstone_id(), kept_id]  # the deleted workout's data never came
        assert select(dlq) == []

        receiver.fail_next(1, 503)
        run("d2.jsonl", "deleted", dict(_deletion_webhook(), id=KEPT_WORKOUT), DELETED_AT_MS)
        receiver.clear_failures()
        back = copy.deepcopy(workouts["records"][1])
        back["updated_at"] = "2024-03-14T08:00:00.000Z"
        run("back.jsonl", "workout", {"records": [back]}, DELETED_AT_MS + 2_000)  # re-created, delivered
        [dead_tombstone] = select(dlq)
        assert dead_tombstone["source"]["natural_key"] == KEPT_WORKOUT

        replayed = replay_deliveries(dlq, targets, destination="webhook", status_url=state)

        assert replayed.superseded == Counter({"webhook": 1}) and not replayed.delivered
        assert receiver.order_for(USER_ID)[-1] != dead_tombstone["event_id"] and select(dlq) == []


def test_the_streaming_job_delivers_the_tombstone_after_the_data(tmp_path: Path,
                                                                 webhook_secret: str) -> None:
    """The unbounded graph (keyed-state merge, in-order delivery per user) on Beam's TestStream."""
    created = RawPayload("whoop", json.dumps(_workouts()).encode(), kind="workout", received_at_ms=CREATED_AT_MS)
    deleted = RawPayload("whoop", json.dumps(_deletion_webhook()).encode(), kind="deleted",
                         received_at_ms=DELETED_AT_MS)
    stream = (BeamTestStream()
              .add_elements([RawMessage(encode_raw(created), {"path": "stream", "line": 0})])
              .advance_processing_time(1)
              .add_elements([RawMessage(encode_raw(deleted), {"path": "stream", "line": 1})])
              .advance_watermark_to_infinity())
    database = tmp_path / "out.db"
    with WebhookReceiver(webhook_secret) as receiver:
        job = NormalizeJob(FileSource("unused"), [SqlSink("sql", f"sqlite:///{database}"),
                                                  WebhookSink("webhook", receiver.url, webhook_secret)],
                           str(tmp_path / "dlq"), state_url=f"sqlite:///{tmp_path / 'state.db'}")
        pipeline = make_pipeline(streaming=True)
        build_from(pipeline | stream, job, streaming=True)
        pipeline.run().wait_until_finish()

        order = receiver.order_for(USER_ID)
        assert len(order) == 3 and order[-1] == _tombstone_id()
        assert receiver.events[_tombstone_id()]["deleted"][0]["summary_id"] == DELETED_WORKOUT
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT natural_key FROM healthflow_records").fetchall() == [(KEPT_WORKOUT,)]


def test_a_deleted_recovery_leaves_its_sleep_without_the_recovery_fields_in_later_runs(tmp_path: Path) -> None:
    """WHOOP recovery.deleted: the sleep fetched again comes with its cycle's recovery (none left, ``_recovery``
    null) and replaces the stored Sleep, so the deleted recovery's fields are cleared, not kept by the merge."""
    run = LocalRun(tmp_path)
    recovery = json.loads((FIXTURES / "recovery.single.json").read_text())
    sleep_id = recovery["sleep_id"]
    run("recovery.jsonl", "recovery", recovery, CREATED_AT_MS)
    stored = run.rows()[sleep_id]
    assert stored["readiness_data"] == {"readiness": 67}
    assert stored["heart_rate_data"]["summary"] == {"resting_hr_bpm": 51.0, "avg_hrv_rmssd": 58.403}

    refetched = run("refetched.jsonl", "sleep", {**recovery["sleep"], "_recovery": None}, DELETED_AT_MS)

    assert refetched.get("delivered:sql") == 1, refetched.counters
    sleep = run.rows()[sleep_id]
    assert "readiness_data" not in sleep and "heart_rate_data" not in sleep
    assert "oxygen_saturation_data" not in sleep.get("respiration_data", {})
    assert {k: sleep["metadata"][k] for k in ("start_time", "end_time")} == {
        k: stored["metadata"][k] for k in ("start_time", "end_time")}
    assert sleep["sleep_durations_data"] == stored["sleep_durations_data"]
