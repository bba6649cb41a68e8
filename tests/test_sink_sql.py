"""SqlSink against real SQLite (tmp_path) and real Postgres (127.0.0.1:5432/test, must be up: never skipped)."""

from __future__ import annotations

import json
import pickle
import socket
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sinks.sql import SqlSink
from transforms.errors import FatalError, PermanentError, RetryableError
from transforms.events import NormalizedEvent

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
MakeEvent = Callable[..., NormalizedEvent]


@dataclass
class Database:
    """One isolated destination: its URL, table prefix and a raw reader for assertions."""

    backend: str
    url: str
    prefix: str
    path: Path | None = None

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        sql = sql.replace("{p}", self.prefix)
        if self.backend == "sqlite":
            with sqlite3.connect(str(self.path)) as connection:
                return connection.execute(sql, params).fetchall()
        with psycopg.connect(self.url, autocommit=True) as connection:
            cursor = connection.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def records(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        rows = self.query("SELECT user_id, type, natural_key, event_id, ordering_timestamp_ms, payload, start_time, "
                          "end_time, provider FROM {p}records")
        return {(u, t, k): {"event_id": e, "ots": o, "payload": p if isinstance(p, dict) else json.loads(p),
                            "start_time": s, "end_time": end, "provider": prov}
                for u, t, k, e, o, p, s, end, prov in rows}

    def sink(self, **kwargs: Any) -> SqlSink:
        return SqlSink("sql", self.url, table_prefix=self.prefix, **kwargs)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    prefix = f"hf_test_{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        path = tmp_path / "sink.db"
        yield Database("sqlite", f"sqlite:///{path}", prefix, path)
        return
    db = Database("postgres", POSTGRES_URL, prefix)
    yield db
    db.query("DROP TABLE IF EXISTS {p}records, {p}users")


@pytest.fixture
def sink(database: Database) -> Iterator[SqlSink]:
    opened = database.sink()
    opened.open()
    yield opened
    opened.close()


def test_writing_a_batch_twice_leaves_one_row_per_record(sink: SqlSink, database: Database,
                                                         make_sink_event: MakeEvent) -> None:
    events = [make_sink_event("u1", "2026-03-10"), make_sink_event("u1", "2026-03-11"),
              make_sink_event("u2", "2026-03-10")]

    first = sink.write(events)
    second = sink.write(events)

    assert first.delivered == second.delivered == [e.event_id for e in events]
    assert first.failures == second.failures == []
    assert database.query("SELECT COUNT(*) FROM {p}records") == [(3,)]
    assert database.query("SELECT COUNT(*) FROM {p}users") == [(2,)]


def test_payload_and_columns_round_trip(sink: SqlSink, database: Database, make_sink_event: MakeEvent) -> None:
    event = make_sink_event("u1", "2026-03-10", ordering_timestamp_ms=1_700_000_000_123, note="naïve ✓ \"quoted\"")

    sink.write([event])

    stored = database.records()[("u1", "sleep", "2026-03-10")]
    assert stored["payload"] == event.data
    assert stored["event_id"] == event.event_id and stored["ots"] == 1_700_000_000_123
    assert stored["start_time"] == event.data["metadata"]["start_time"]
    assert stored["end_time"] == event.data["metadata"]["end_time"]
    assert stored["provider"] == "OURA"


def test_newer_overwrites_stale_does_not_equal_is_idempotent(sink: SqlSink, database: Database,
                                                            make_sink_event: MakeEvent) -> None:
    key = ("u1", "sleep", "2026-03-10")
    v1 = make_sink_event("u1", "2026-03-10", version=1, ordering_timestamp_ms=1_000)
    v2 = make_sink_event("u1", "2026-03-10", version=2, ordering_timestamp_ms=2_000)
    stale = make_sink_event("u1", "2026-03-10", version=3, ordering_timestamp_ms=1_500)

    sink.write([v1])
    sink.write([v2])
    assert database.records()[key]["event_id"] == v2.event_id

    result = sink.write([stale])  # a stale redelivery is accepted (delivered) but changes nothing
    assert result.delivered == [stale.event_id]
    assert database.records()[key]["event_id"] == v2.event_id
    assert database.records()[key]["payload"] == v2.data

    assert sink.write([v2]).delivered == [v2.event_id]
    assert database.records()[key]["ots"] == 2_000
    assert database.query("SELECT COUNT(*) FROM {p}records") == [(1,)]


def test_newest_wins_inside_one_batch(sink: SqlSink, database: Database, make_sink_event: MakeEvent) -> None:
    v1 = make_sink_event("u1", "2026-03-10", version=1, ordering_timestamp_ms=1_000)
    v2 = make_sink_event("u1", "2026-03-10", version=2, ordering_timestamp_ms=3_000)
    stale = make_sink_event("u1", "2026-03-10", version=3, ordering_timestamp_ms=2_000)

    assert sink.write([v1, v2, stale]).failures == []

    assert database.records()[("u1", "sleep", "2026-03-10")]["event_id"] == v2.event_id


def test_reference_id_is_kept_once_known(sink: SqlSink, database: Database) -> None:
    def event(reference_id: str | None, day: str) -> NormalizedEvent:
        user = {"user_id": "u1", "provider": "OURA", **({"reference_id": reference_id} if reference_id else {})}
        return NormalizedEvent.create(type="sleep", user=user, data={"metadata": {"start_time": day}},
                                      natural_key=day, ordering_timestamp_ms=1, sequence="0")

    sink.write([event(None, "2026-03-01"), event("ref-9", "2026-03-02"), event(None, "2026-03-03")])

    assert database.query("SELECT user_id, provider, reference_id FROM {p}users") == [("u1", "OURA", "ref-9")]


def test_bad_rows_are_isolated_as_permanent(sink: SqlSink, database: Database, make_sink_event: MakeEvent) -> None:
    good1 = make_sink_event("u1", "2026-03-10")
    overflow = make_sink_event("u1", "2026-03-11", ordering_timestamp_ms=2**64)  # no 64-bit column holds it
    not_json = make_sink_event("u2", "2026-03-10", score=float("nan"))  # NaN is not JSON
    good2 = make_sink_event("u2", "2026-03-11")

    result = sink.write([good1, overflow, not_json, good2])

    assert sorted(result.delivered) == sorted([good1.event_id, good2.event_id])
    errors = {f.event.event_id: f.error for f in result.failures}
    assert set(errors) == {overflow.event_id, not_json.event_id}
    assert all(isinstance(error, PermanentError) for error in errors.values())
    assert set(database.records()) == {("u1", "sleep", "2026-03-10"), ("u2", "sleep", "2026-03-11")}


def test_postgres_rejected_text_is_isolated(tmp_path: Path, make_sink_event: MakeEvent) -> None:
    database = Database("postgres", POSTGRES_URL, f"hf_test_{uuid.uuid4().hex[:10]}_")
    sink = database.sink()
    try:
        good = make_sink_event("u1", "2026-03-10")
        nul = make_sink_event("u1", "2026-03-11", note="a\x00b")  # jsonb cannot hold \u0000

        result = sink.write([good, nul])

        assert result.delivered == [good.event_id]
        [failure] = result.failures
        assert failure.event is nul and isinstance(failure.error, PermanentError)
    finally:
        sink.close()
        database.query("DROP TABLE IF EXISTS {p}records, {p}users")


def test_lock_timeout_is_retryable(database: Database, make_sink_event: MakeEvent) -> None:
    sink = database.sink(lock_timeout_s=0.2)
    sink.open()
    event = make_sink_event()
    if database.backend == "sqlite":
        holder: Any = sqlite3.connect(str(database.path), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    else:
        holder = psycopg.connect(database.url)
        holder.execute(f"LOCK TABLE {database.prefix}records IN EXCLUSIVE MODE")
    try:
        [failure] = sink.write([event]).failures
        assert isinstance(failure.error, RetryableError)
    finally:
        holder.rollback() if database.backend == "postgres" else holder.execute("ROLLBACK")
        holder.close()
    assert sink.write([event]).delivered == [event.event_id]
    sink.close()


def test_lost_postgres_connection_is_retryable_then_reopened(make_sink_event: MakeEvent) -> None:
    prefix = f"hf_test_{uuid.uuid4().hex[:10]}_"
    database = Database("postgres", f"{POSTGRES_URL}?application_name={prefix}", prefix)
    sink = database.sink()
    try:
        sink.open()
        [(pid,)] = database.query("SELECT pid FROM pg_stat_activity WHERE application_name = ? "
                                  "AND pid <> pg_backend_pid()", (prefix,))
        database.query("SELECT pg_terminate_backend(?)", (pid,))
        event = make_sink_event()

        [failure] = sink.write([event]).failures

        assert isinstance(failure.error, RetryableError)
        assert sink.write([event]).delivered == [event.event_id]
    finally:
        sink.close()
        database.query("DROP TABLE IF EXISTS {p}records, {p}users")


def test_postgres_down_is_retryable(make_sink_event: MakeEvent) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = SqlSink("sql", f"postgresql://postgres@127.0.0.1:{port}/test")

    [failure] = sink.write([make_sink_event()]).failures

    assert isinstance(failure.error, RetryableError)


@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:5432/no_such_db_hf",
                                 "postgresql://no_such_role_hf@127.0.0.1:5432/test"])
def test_postgres_misconfiguration_is_fatal(url: str, make_sink_event: MakeEvent) -> None:
    sink = SqlSink("sql", url)

    with pytest.raises(FatalError, match="does not exist"):
        sink.open()
    [failure] = sink.write([make_sink_event()]).failures
    assert isinstance(failure.error, FatalError)


def test_sqlite_unopenable_path_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(FatalError, match="unable to open"):
        SqlSink("sql", f"sqlite:///{tmp_path}/missing-dir/sink.db").open()


@pytest.mark.parametrize(("url", "prefix", "message"), [
    ("mongodb://localhost/db", "healthflow_", "unsupported url scheme"),
    ("sqlite:///x.db", "bad-prefix; DROP", "table_prefix"),
])
def test_bad_config_is_fatal(url: str, prefix: str, message: str) -> None:
    with pytest.raises(FatalError, match=message):
        SqlSink("sql", url, table_prefix=prefix)


def test_default_table_names_and_pickling(tmp_path: Path, make_sink_event: MakeEvent) -> None:
    sink = SqlSink("sql", f"sqlite:///{tmp_path}/default.db")
    sink.open()
    copy = pickle.loads(pickle.dumps(sink))

    assert copy.write([make_sink_event()]).failures == []

    with sqlite3.connect(tmp_path / "default.db") as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"healthflow_users", "healthflow_records"}
    sink.close()
    copy.close()
