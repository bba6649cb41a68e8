"""Poison pills: a record that makes a stage after mapping fail (user resolution, merge, the state store) is
dead-lettered with its bytes and the reason, and every other record of the run is still delivered."""

from __future__ import annotations

import json
import sqlite3
import uuid

import psycopg

from core.dead_letters import read_dead_letters
from pipelines.demo_data import garmin_daily
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from sinks.sql import SqlSink


def test_a_value_the_state_store_cannot_hold_fails_that_record_alone(tmp_path):
    name = f"hf_poison_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        lines = []
        days = ["2024-03-11", "2024-03-12", "2024-03-11", "2024-03-12"]
        for index, received_at in enumerate([1_710_000_000_000, 1.5e300, 1_710_000_000_500, 1_710_000_000_900]):
            payload = garmin_daily(f"poison-{index // 2}", days[index])  # user 0's second day is the poison
            lines.append(json.dumps({"provider": "garmin", "kind": "dailies", "received_at": received_at,
                                     "payload": payload.payload.decode()}))
        (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n")
        summary = run_batch(NormalizeJob(FileSource(str(tmp_path / "raw.jsonl")),
                                         [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")], str(tmp_path / "dlq"),
                                         state_url=f"postgresql://postgres@127.0.0.1:5432/{name}"))
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    with sqlite3.connect(tmp_path / "out.db") as conn:
        delivered = {row[0] for row in conn.execute("SELECT natural_key FROM healthflow_records")}
    # user 0's good day, and both of user 1's days: one bad message fails itself, not its user's other records
    assert summary.get("delivered:sql") == 3 and delivered == {"2024-03-11", "2024-03-12"}
    (dead,) = read_dead_letters(str(tmp_path / "dlq"))
    assert dead["stage"] == "state" and "1.5e+300" in dead["original"].decode()
    assert summary.get("dead_letter:state") == 1
