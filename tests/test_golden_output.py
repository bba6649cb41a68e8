"""Speed never changes what users receive: on the bench data every event id, ordering timestamp and body
is byte-identical to what landed main produced before the speed work (``tests/golden``)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter

from golden_events import bench_payloads, fingerprints, normalized_in_memory, recorded

from pipelines.normalize import FileSource, NormalizeJob, run_batch
from sinks.object_store import ObjectStoreSink
from sinks.sql import SqlSink


def test_the_mapper_loop_gives_the_recorded_events_byte_for_byte():
    assert fingerprints(normalized_in_memory(bench_payloads())) == recorded()


def test_the_pipeline_delivers_the_recorded_events_byte_for_byte(tmp_path):
    lines = [json.dumps({"provider": p.provider, "kind": p.kind, "user_id": p.user_id,
                         "received_at": p.received_at_ms, "payload": p.payload.decode(errors="replace")})
             for p in bench_payloads()]
    (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_batch(NormalizeJob(
        FileSource(str(tmp_path / "raw.jsonl")),
        [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}"), ObjectStoreSink("objects", str(tmp_path / "objects"))],
        str(tmp_path / "dead"), state_url=f"sqlite:///{tmp_path / 'state.db'}"))
    expected = [line.split("\t") for line in recorded()]
    assert summary.get("delivered:sql") == summary.get("delivered:objects") == len(expected)
    assert summary.get("rows_joined") == 29_664 and not summary.get("rows_one_by_one")  # epochs, heart-rate rows

    with sqlite3.connect(tmp_path / "out.db") as db:
        rows = db.execute("SELECT event_id, ordering_timestamp_ms FROM healthflow_records").fetchall()
    assert sorted(f"{event_id}\t{ordering}" for event_id, ordering in rows) == sorted(
        f"{event_id}\t{ordering}" for event_id, ordering, _ in expected)
    bodies = Counter(hashlib.sha256(path.read_bytes()).hexdigest() for path in (tmp_path / "objects").rglob("*.json"))
    assert bodies == Counter(digest for _, _, digest in expected)
