"""The normalize pipeline on Beam's local runner: graph behaviour, merging, dead letters, fan-out."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from connectors.base import terra_user_id
from core.dead_letters import read_dead_letters
from core.errors import FatalError
from core.raw import RawMessage, RawPayload
from pipelines.normalize import FileSource, MessagesSource, NormalizeJob, RunSummary, run_batch
from pipelines.webhook_receiver import WebhookReceiver
from schemas import MODEL_TYPES
from schemas.serde import encode_raw
from sinks.object_store import ObjectStoreSink
from sinks.policy import RetryPolicy
from sinks.sql import SqlSink
from sinks.webhook import WebhookSink
from transforms.normalize import (
    MergePerUser,
    Normalize,
    SplitByUser,
    UserDocuments,
    normalize_in_memory,
    pack_parts,
    unpack_parts,
)
from transforms.outputs import DEAD_LETTER, ENDED, TALLY

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.05)


def _messages(payloads) -> list[RawMessage]:
    return [RawMessage(encode_raw(p) if isinstance(p, RawPayload) else p, {"partition": 0, "offset": i})
            for i, p in enumerate(payloads)]


def _jsonl(path: Path, payloads: list[RawPayload]) -> str:
    lines = [json.dumps({"provider": p.provider, "kind": p.kind, "user_id": p.user_id,
                         "received_at": p.received_at_ms, "payload": p.payload.decode()}) for p in payloads]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _garmin_daily(user: str, steps: int, duration: int) -> RawPayload:
    body = {"dailies": [{"userId": user, "summaryId": "d1", "calendarDate": "2026-11-02", "startTimeInSeconds":
                         1793574000, "startTimeOffsetInSeconds": 3600, "durationInSeconds": duration, "steps": steps,
                         "activeKilocalories": 100, "bmrKilocalories": 500}]}
    return RawPayload("garmin", json.dumps(body).encode(), user_id=user, received_at_ms=1793600000000 + steps)


def _garmin_epoch(user: str, at: int) -> RawPayload:
    body = {"epochs": [{"userId": user, "summaryId": f"e{at}", "startTimeInSeconds": at,
                        "startTimeOffsetInSeconds": 3600, "activityType": "WALKING", "durationInSeconds": 900,
                        "met": 3.5, "intensity": "ACTIVE"}]}
    return RawPayload("garmin", json.dumps(body).encode(), user_id=user, received_at_ms=1793700000000 + at)


def test_normalize_transform_merges_per_user_and_dead_letters_with_original_bytes(tmp_path, simulated_payloads):
    messages = [*_messages(simulated_payloads), RawMessage(b"\x00garbage", {"partition": 0, "offset": 99999})]
    with BeamTestPipeline(runner=FnApiRunner()) as pipeline:
        events, dead_out, _, _ = (pipeline | beam.Create(messages)
                                  | Normalize(f"sqlite:///{tmp_path / 'state.db'}"))
        dead = dead_out | "Records" >> beam.Map(lambda d: d.record)
        keys = events | "Keys" >> beam.FlatMap(lambda ue: [(e.user_id, e.type, e.natural_key) for e in ue[1].events])
        duplicated = (keys | "CountKeys" >> beam.combiners.Count.PerElement()
                      | beam.Filter(lambda kv: kv[1] > 1) | beam.combiners.Count.Globally())
        assert_that(duplicated, equal_to([0]), label="one event per (user, type, natural key)")
        ordered = events | beam.Map(lambda ue: [e.sequence for e in ue[1].events]
                                    == sorted(e.sequence for e in ue[1].events))
        assert_that(ordered | "CountOrdered" >> beam.combiners.Count.PerElement(),
                    lambda counts: _expect([c for c in counts if c[0] is False] == []), label="per-user order")
        stages = dead | beam.Map(lambda d: (d["stage"], d["original"]))
        assert_that(stages | "Garbage" >> beam.Filter(lambda s: s[0] == "decode"),
                    equal_to([("decode", b"\x00garbage")]), label="decode dead letter keeps bytes")
        stage_counts = (dead | "Stages" >> beam.Map(lambda d: d["stage"])
                        | "CountStages" >> beam.combiners.Count.PerElement())
        assert_that(stage_counts,
                    equal_to([("decode", 1), ("parse", 2), ("normalize", 3)]), label="dead letters by stage")


def _expect(condition: bool) -> None:
    assert condition


def test_fragments_merge_across_batches_through_record_state(tmp_path):
    """A later batch holding only epochs must not wipe the day's summary delivered earlier."""
    db, state = tmp_path / "out.db", f"sqlite:///{tmp_path / 'state.db'}"
    first = _jsonl(tmp_path / "a.jsonl", [_garmin_daily("u1", 5000, 40000), _garmin_daily("u1", 9000, 86400)])
    second = _jsonl(tmp_path / "b.jsonl", [_garmin_epoch("u1", 1793610000)])
    for path in (first, second):
        summary = run_batch(NormalizeJob(FileSource(path), [SqlSink("sql", f"sqlite:///{db}")],
                                         str(tmp_path / "dlq"), state_url=state, retry=FAST_RETRY))
        assert summary.get("delivered:sql") == 1
    with sqlite3.connect(db) as conn:
        (payload,) = conn.execute("SELECT payload FROM healthflow_records WHERE type = 'daily'").fetchone()
    daily = json.loads(payload)
    assert daily["distance_data"]["steps"] == 9000  # the newest summary, kept after the epoch-only batch
    assert daily["MET_data"]["MET_samples"] == [{"timestamp": "2026-11-02T10:00:00.000000+01:00", "level": 3.5}]


def test_file_source_delivers_everywhere_and_rerun_duplicates_nothing(tmp_path, simulated_payloads, webhook_secret):
    source = _jsonl(tmp_path / "raw.jsonl", simulated_payloads)
    db, objects = tmp_path / "out.db", tmp_path / "objects"
    with WebhookReceiver(webhook_secret) as receiver:
        def job() -> NormalizeJob:
            sinks = [WebhookSink("webhook", receiver.url, webhook_secret), SqlSink("sql", f"sqlite:///{db}"),
                     ObjectStoreSink("objects", str(objects))]
            return NormalizeJob(FileSource(source), sinks, str(tmp_path / "dlq"),
                                state_url=f"sqlite:///{tmp_path / 'state.db'}", retry=FAST_RETRY)

        first = run_batch(job())
        events = sum(first.with_prefix("normalized:").values())
        assert events > 50
        for name in ("webhook", "sql", "objects"):
            assert first.get(f"delivered:{name}") == events
        assert receiver.unique == events and receiver.rejected_signature == 0
        second = run_batch(job())
        assert second.get("delivered:webhook") == events
        assert receiver.unique == events and receiver.duplicates == events  # same event ids: receivers dedupe
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM healthflow_records").fetchone()[0] == events
    assert sum(1 for _ in objects.rglob("*.json")) == events
    raw_outcomes = sum(first.get(f"raw_{o}") for o in ("ok", "partial", "dead", "empty"))
    assert raw_outcomes == first.get("raw_in") == len(simulated_payloads)
    assert first.get("fragments") - first.get("superseded") == events


def test_failing_destination_is_dead_lettered_without_touching_the_others(tmp_path, simulated_payloads,
                                                                          webhook_secret):
    source = _jsonl(tmp_path / "raw.jsonl", simulated_payloads[:40])
    db = tmp_path / "out.db"
    with WebhookReceiver(webhook_secret) as receiver:
        receiver.fail_next(10_000, 503)
        summary = run_batch(NormalizeJob(
            FileSource(source), [WebhookSink("webhook", receiver.url, webhook_secret), SqlSink("sql", f"sqlite:///{db}")],
            str(tmp_path / "dlq"), state_url=f"sqlite:///{tmp_path / 'state.db'}", retry=FAST_RETRY))
    events = sum(summary.with_prefix("normalized:").values())
    assert summary.get("delivered:sql") == events
    assert summary.get("delivered:webhook") == 0
    assert summary.get("delivery_dead_letter:webhook") == events
    dead = [d for d in read_dead_letters(str(tmp_path / "dlq")) if d["stage"] == "deliver:webhook"]
    assert len(dead) == events
    assert {(d["destination"], d["attempts"]) for d in dead} == {("webhook", FAST_RETRY.max_attempts)}
    assert {json.loads(d["original"])["type"] for d in dead} <= set(MODEL_TYPES)
    assert Counter(d["error_class"] for d in dead).most_common(1)[0][0] == "RetryableError"


def test_a_destination_recovering_within_its_retries_loses_nothing(tmp_path, simulated_payloads, webhook_secret):
    source = _jsonl(tmp_path / "raw.jsonl", simulated_payloads[:40])
    with WebhookReceiver(webhook_secret) as receiver:
        receiver.fail_next(2, 429, retry_after=0)
        summary = run_batch(NormalizeJob(FileSource(source), [WebhookSink("webhook", receiver.url, webhook_secret)],
                                         str(tmp_path / "dlq"), state_url=f"sqlite:///{tmp_path / 's.db'}",
                                         retry=FAST_RETRY))
        events = sum(summary.with_prefix("normalized:").values())
        assert summary.get("delivered:webhook") == events == receiver.unique
        assert summary.get("retried:webhook") >= 1
        assert summary.get("delivery_dead_letter:webhook") == 0


def test_a_job_without_destinations_fails_at_start(tmp_path):
    with pytest.raises(FatalError, match="no destinations"):
        NormalizeJob(FileSource(str(tmp_path / "*.jsonl")), [], str(tmp_path))


def test_messages_of_several_users_are_mapped_once_and_every_record_reaches_its_user(tmp_path):
    """A Garmin push of several users, and a Polar page whose nights link to different users than the raw
    event's, give the same events through the pipeline as mapping each message whole (tests/golden covers the
    one-user messages); each such message is tallied raw_split, every other raw outcome adds up."""
    polar_page = json.loads((Path(__file__).parent / "fixtures" / "polar" / "sleep.json").read_text())
    night, other = polar_page["nights"]
    polar_page["nights"] = [night, {k: v for k, v in other.items() if k != "polar_user"}]  # links to 45395466; none
    garmin_push = {"dailies": [{"userId": f"user-{n}", "summaryId": f"d{n}", "calendarDate": "2026-11-02",
                                "startTimeInSeconds": 1793574000, "startTimeOffsetInSeconds": 3600,
                                "durationInSeconds": 86400, "steps": 1000 * n} for n in range(3)]
                   + [{"summaryId": "no-user", "calendarDate": "2026-11-02"}]}  # no user: its own dead letter
    payloads = [RawPayload("garmin", json.dumps(garmin_push).encode(), received_at_ms=1793600000000),
                RawPayload("polar", json.dumps(polar_page).encode(), kind="sleep", user_id="222",
                           received_at_ms=1793600000001)]
    expected, failed = normalize_in_memory(_messages(payloads))
    assert {e.user_id for e in expected} >= {terra_user_id("polar", "45395466"), terra_user_id("polar", "222")}
    assert len({e.user_id for e in expected}) == 5 and len(failed) == 1

    summary = run_batch(NormalizeJob(MessagesSource(_messages(payloads)),
                                     [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")], str(tmp_path / "dlq"),
                                     state_url=f"sqlite:///{tmp_path / 'state.db'}", retry=FAST_RETRY))
    with sqlite3.connect(tmp_path / "out.db") as db:
        rows = sorted(db.execute("SELECT user_id, event_id FROM healthflow_records").fetchall())
    assert rows == sorted((e.user_id, e.event_id) for e in expected)
    assert summary.get("raw_in") == 2 and summary.get("raw_split") == 2 and summary.get("dead_letter:normalize") == 1
    assert [d["stage"] for d in read_dead_letters(str(tmp_path / "dlq"))] == ["normalize"]


def _garmin_dailies(*docs: tuple[str, str], received_at_ms: int = 1793600000000) -> RawPayload:
    """One Garmin dailies push of (user, summary id) documents; no user with the raw event (each names its own)."""
    body = {"dailies": [{"userId": user, "summaryId": summary, "calendarDate": "2026-11-02",
                         "startTimeInSeconds": 1793574000, "startTimeOffsetInSeconds": 3600,
                         "durationInSeconds": 86400, "steps": 1000 + n} for n, (user, summary) in enumerate(docs)]}
    return RawPayload("garmin", json.dumps(body).encode(), received_at_ms=received_at_ms)


def test_a_value_out_of_bounds_is_dead_lettered_once_on_every_path_a_message_takes(tmp_path):
    """A NUL (which no store holds) in one document is dead-lettered at stage validate with the original bytes and its
    document index, and the message's other documents are delivered, on each path: one user's documents (checked
    where the message is split, not again where they are mapped), a push of several users and a Polar page whose
    records name their user (both mapped, and checked, before the shuffle)."""
    polar_page = json.loads((Path(__file__).parent / "fixtures" / "polar" / "sleep.json").read_text())
    polar_page["nights"][1]["device_id"] = "B7C1\x00D2E3"
    payloads = [_garmin_dailies(("one", "d0"), ("one", "d1\x00")),
                _garmin_dailies(("a", "d0"), ("b", "d1"), ("c", "d2\x00"), received_at_ms=1793600000001),
                RawPayload("polar", json.dumps(polar_page).encode(), kind="sleep", user_id="222",
                           received_at_ms=1793600000002)]
    messages = _messages(payloads)
    expected, failed = normalize_in_memory(messages)
    assert len(failed) == 3 and len({e.user_id for e in expected}) == 4

    summary = _run_into_sqlite(messages, tmp_path)
    assert _rows(tmp_path) == sorted((e.user_id, e.event_id) for e in expected)
    dead = sorted((d["original"], d["stage"], d["source"]["document_index"])
                  for d in read_dead_letters(str(tmp_path / "dlq")))
    assert dead == sorted([(messages[0].data, "validate", "1"), (messages[1].data, "validate", "2"),
                           (messages[2].data, "validate", "1")])
    assert summary.get("dead_letter:validate") == 3
    assert summary.get("raw_partial") == 2 and summary.get("raw_split") == 1  # the push of several users: split


def _run_into_sqlite(messages: list[RawMessage], tmp_path: Path) -> RunSummary:
    """A batch run of ``messages`` into SQLite (out.db), dead letters under dlq: its summary."""
    return run_batch(NormalizeJob(MessagesSource(messages), [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")],
                                  str(tmp_path / "dlq"), state_url=f"sqlite:///{tmp_path / 'state.db'}",
                                  retry=FAST_RETRY))


def _rows(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "out.db") as db:
        return sorted(db.execute("SELECT user_id, event_id FROM healthflow_records").fetchall())


def test_documents_split_by_user_cross_the_shuffle_checked_and_unchecked_ones_are_checked_where_mapped(tmp_path):
    """``SplitByUser`` marks one user's documents as bounds-checked (``UserDocuments.checked``) so ``MergePerUser``
    does not check them again; a part not marked so is checked where it is mapped: its document out of bounds is
    dead-lettered (stage validate, its index, the original bytes) and the other delivered."""
    message = _messages([_garmin_dailies(("one", "d0"), ("one", "d1\x00"))])[0]
    unchecked = UserDocuments(message, (0, 1))
    assert not unchecked.checked
    with BeamTestPipeline(runner=FnApiRunner()) as pipeline:
        split = pipeline | "Message" >> beam.Create([message]) | beam.ParDo(SplitByUser()).with_outputs(
            DEAD_LETTER, ENDED, TALLY, main="keyed")
        assert_that(split.keyed | beam.FlatMap(lambda item: [(p.checked, p.documents) for p in unpack_parts(item[1])]),
                    equal_to([(True, (0,))]), label="checked where split")  # the NUL document: dead-lettered there
        merged = (pipeline | "Part" >> beam.Create([(terra_user_id("garmin", "one"), pack_parts([unchecked]))])
                  | beam.GroupByKey()
                  | beam.ParDo(MergePerUser(f"sqlite:///{tmp_path / 'state.db'}")).with_outputs(
                      DEAD_LETTER, ENDED, TALLY, main="events"))
        assert_that(merged[DEAD_LETTER] | beam.Map(lambda d: (d.record["stage"], d.record["source"]["document_index"],
                                                               d.record["original"])),
                    equal_to([("validate", "1", message.data)]), label="checked where mapped")
        assert_that(merged.events | beam.Map(lambda item: [e.natural_key for e in item[1].events]),
                    equal_to([["2026-11-02"]]), label="the other document delivered")


def test_a_payload_orjson_does_not_read_is_read_where_it_is_mapped_as_where_it_was_split(tmp_path):
    """Where a message is mapped, orjson alone reads it again only if orjson read it where it was split
    (``UserDocuments.orjson_read``): a payload behind a UTF-8 byte-order mark (the standard library reads it, orjson
    refuses it) is delivered as the mapper loop delivers it, from an Avro raw event and from a JSON line."""
    body = (Path(__file__).parent / "fixtures" / "oura" / "heartrate.json").read_bytes()
    payload = RawPayload("oura", b"\xef\xbb\xbf" + body, "heartrate", "oura-bom", 1_710_000_000_000)
    line = json.dumps({"provider": "oura", "kind": "heartrate", "user_id": "oura-bom-line",
                       "received_at": 1_710_000_000_001, "payload": "\ufeff" + body.decode()}).encode()
    messages = [RawMessage(encode_raw(payload), {"partition": 0, "offset": 0}),
                RawMessage(line, {"path": "raw.jsonl", "line": 1}, "json")]
    expected, failed = normalize_in_memory(messages)
    assert not failed and len({e.user_id for e in expected}) == 2

    summary = _run_into_sqlite(messages, tmp_path)
    assert _rows(tmp_path) == sorted((e.user_id, e.event_id) for e in expected)
    assert not summary.with_prefix("dead_letter:") and summary.get("raw_ok") == 2


def test_a_part_packed_before_the_split_carried_its_proofs_is_checked_where_it_is_mapped():
    """A pack in the earlier layout (no ``checked``, no ``orjson_read``: in flight across an update) unpacks with both
    False, so its documents are checked and read in full where they are mapped."""
    import pickle
    import zlib

    message = _messages([_garmin_dailies(("one", "d0"))])[0]
    earlier = [(message.data, message.source, message.encoding, message.ack, (0,), (), 0, True, None)]
    [part] = unpack_parts(zlib.compress(pickle.dumps(earlier)))
    assert part == UserDocuments(message, (0,)) and not part.checked and not part.orjson_read
    proven = UserDocuments(message, (0,), checked=True, orjson_read=True)
    assert unpack_parts(pack_parts([proven, UserDocuments(message, (0,))])) == [proven, UserDocuments(message, (0,))]


def test_a_part_packed_with_fields_a_later_version_added_unpacks_without_them():
    """A pack from a later layout (in flight across a rollback) does not jam the job: the fields after the ones known
    here are left out."""
    import pickle
    import zlib

    message = _messages([_garmin_dailies(("one", "d0"))])[0]
    later = [(message.data, message.source, message.encoding, message.ack, (0,), (), 0, True, None, True, True,
              "a later hint")]
    [part] = unpack_parts(zlib.compress(pickle.dumps(later)))
    assert part == UserDocuments(message, (0,), checked=True, orjson_read=True)
