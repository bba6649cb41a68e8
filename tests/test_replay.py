"""Dead letters and replay: a failed destination is restored once its cause is fixed."""

from __future__ import annotations

import json
import sqlite3

from connectors import get_provider
from core.dead_letters import dead_letter, read_dead_letters, write_dead_letter
from core.raw import RawMessage
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from pipelines.replay import replay_deliveries, replay_ingest, replayed_message, select
from pipelines.webhook_receiver import WebhookReceiver
from sinks.policy import RetryPolicy, Target
from sinks.sql import SqlSink
from sinks.webhook import WebhookSink

FAST = RetryPolicy(max_attempts=2, initial_delay_s=0.01, max_delay_s=0.02)


def _raw_file(tmp_path, payloads) -> str:
    path = tmp_path / "raw.jsonl"
    path.write_text("\n".join(json.dumps({"provider": p.provider, "kind": p.kind, "user_id": p.user_id,
                                          "received_at": p.received_at_ms, "payload": p.payload.decode()})
                              for p in payloads) + "\n")
    return str(path)


def test_replay_restores_what_a_dead_destination_missed(tmp_path, simulated_payloads, webhook_secret):
    dlq, db = str(tmp_path / "dlq"), tmp_path / "out.db"
    with WebhookReceiver(webhook_secret) as receiver:
        targets = [Target(WebhookSink("webhook", receiver.url, webhook_secret), FAST),
                   Target(SqlSink("sql", f"sqlite:///{db}"), FAST)]
        receiver.fail_next(100_000, 500)
        summary = run_batch(NormalizeJob(FileSource(_raw_file(tmp_path, simulated_payloads)), targets, dlq,
                                         state_url=f"sqlite:///{tmp_path / 'state.db'}"))
        events = sum(summary.with_prefix("normalized:").values())
        assert summary.get("delivered:sql") == events and summary.get("delivery_dead_letter:webhook") == events
        assert len(select(dlq, destination="webhook")) == events

        still_down = replay_deliveries(dlq, targets, destination="webhook")
        assert still_down.failed_again["webhook"] == events and receiver.unique == 0
        assert {r["attempts"] for r in select(dlq, destination="webhook")} == {2 * FAST.max_attempts}

        sequence_of = {r["event_id"]: r["source"]["sequence"] for r in select(dlq, destination="webhook")}
        receiver.clear_failures()  # the endpoint is fixed
        fixed = replay_deliveries(dlq, targets, destination="webhook")
        assert fixed.delivered["webhook"] == events and fixed.failed_again["webhook"] == 0
        assert receiver.unique == events and receiver.rejected_signature == 0
        assert select(dlq, destination="webhook") == []
        for user in {e["user"]["user_id"] for e in receiver.events.values()}:  # each user's order kept
            delivered = [sequence_of[event_id] for event_id in receiver.order_for(user)]
            assert delivered == sorted(delivered)
        assert replay_deliveries(dlq, targets).delivered == {}  # nothing left: replaying again is a no-op
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM healthflow_records").fetchone()[0] == events


def test_ingest_replay_after_a_mapper_fix(tmp_path, simulated_payloads):
    dlq, db = str(tmp_path / "dlq"), tmp_path / "out.db"
    targets = [Target(SqlSink("sql", f"sqlite:///{db}"), FAST)]
    run_batch(NormalizeJob(FileSource(_raw_file(tmp_path, simulated_payloads)), targets, dlq,
                           state_url=f"sqlite:///{tmp_path / 'state.db'}"))
    unknown_kind = [r for r in select(dlq, ingest=True) if r["error_class"] == "UnknownKind"]
    assert len(unknown_kind) == 1 and b"futureSummaryType" in unknown_kind[0]["original"]
    before = len(select(dlq, ingest=True))

    garmin = get_provider("garmin")

    def new_kind(doc):  # the "fix": a mapper for the kind that was missing
        return {"metadata": {"summary_id": doc["summaryId"], "start_time": "2026-11-01T08:00:00.000000+00:00",
                             "end_time": "2026-11-01T08:30:00.000000+00:00", "type": 7, "upload_type": 1}}

    garmin.kind("futureSummaryType", "activity")(new_kind)
    try:
        result = replay_ingest(dlq, targets, f"sqlite:///{tmp_path / 'state.db'}")
    finally:
        del garmin.kinds["futureSummaryType"]
    assert result.ingest.get("raw_in") == before
    assert result.ingest.get("delivered:sql") == 1
    remaining = select(dlq, ingest=True)
    assert len(remaining) == before - 1  # everything else still fails, and is still kept
    assert all(r["error_class"] != "UnknownKind" for r in remaining)
    assert not any(".replay-" in str(p) for p in (tmp_path / "dlq").rglob("*"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM healthflow_records WHERE natural_key = 'm1'").fetchone()[0] == 1
    assert sum(1 for _ in read_dead_letters(dlq)) == len(remaining)


def test_dead_letters_holding_the_same_event_are_settled_together(tmp_path, simulated_payloads, webhook_secret):
    dlq = str(tmp_path / "dlq")
    payload = next(p for p in simulated_payloads if p.provider == "whoop" and p.kind == "cycle")
    with WebhookReceiver(webhook_secret) as receiver:
        targets = [Target(WebhookSink("webhook", receiver.url, webhook_secret), FAST)]
        receiver.fail_next(100, 503)
        for name, received in (("a.jsonl", 1), ("b.jsonl", 2)):  # the provider re-sends the same record
            (tmp_path / name).write_text(json.dumps({"provider": "whoop", "kind": "cycle", "received_at": received,
                                                     "payload": payload.payload.decode()}) + "\n")
            run_batch(NormalizeJob(FileSource(str(tmp_path / name)), targets, dlq,
                                   state_url=f"sqlite:///{tmp_path / 'state.db'}"))
        dead = select(dlq, destination="webhook")
        assert len(dead) == 2 and len({r["event_id"] for r in dead}) == 1
        receiver.clear_failures()
        result = replay_deliveries(dlq, targets, destination="webhook")
        assert result.delivered["webhook"] == 1 and select(dlq, destination="webhook") == []
        assert receiver.unique == 1


def test_a_dead_letter_that_goes_while_they_are_read_is_left_out(tmp_path, monkeypatch):
    """A running job's redelivery (or a replay) removes a dead letter between the listing and its read: the others
    are read, not a FileNotFoundError."""
    from apache_beam.io.filesystems import FileSystems

    from core.dead_letters import dead_letter, delete_dead_letter, write_dead_letter

    root = str(tmp_path / "dlq")
    letters = [dead_letter(stage="deliver", error=RuntimeError(f"down {n}"), original=b"{}",
                           source={"n": n}) for n in range(3)]
    for letter in letters:
        write_dead_letter(root, letter)
    listing = FileSystems.match([f"{root}/**.json"])
    delete_dead_letter(root, letters[1])
    monkeypatch.setattr(FileSystems, "match", lambda patterns, limits=None: listing)  # listed before it went
    assert sorted(d["error_message"] for d in read_dead_letters(root)) == ["down 0", "down 2"]


def test_an_ingest_dead_letter_replays_at_its_place_in_its_source(tmp_path):
    """A user's messages of one arrival time merge in their source's order (``RawMessage.position``): a replayed
    message keeps its place, a Pub/Sub message's publish time and id included (not its acknowledgement handle)."""
    sources = [{"subscription": "ingest", "message_id": "17", "publish_time_ms": 1_793_550_000_123, "ack_id": "gone"},
               {"topic": "raw", "partition": 3, "offset": 42}, {"path": "raw.jsonl", "line": 7}]
    for source in sources:
        write_dead_letter(str(tmp_path), dead_letter(stage="decode", error=ValueError("not JSON"), original=b"{",
                                                     source={**source, "encoding": "json"}))
    replayed = sorted(replayed_message(record).position for record in select(str(tmp_path), ingest=True))
    assert replayed == sorted(RawMessage(b"{", source, encoding="json").position for source in sources)
    assert all("ack_id" not in replayed_message(record).source for record in select(str(tmp_path), ingest=True))
