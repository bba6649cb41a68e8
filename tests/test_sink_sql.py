"""SqlSink against real SQLite (tmp_path), real Postgres (127.0.0.1:5432/test) and real MariaDB/MySQL
(127.0.0.1:3306/test, root without password); the servers must be up: these tests are never skipped."""

from __future__ import annotations

import dataclasses
import json
import pickle
import socket
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg
import pymysql
import pytest
from pymysql.constants.SERVER_STATUS import SERVER_STATUS_NO_BACKSLASH_ESCAPES

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from core.sql import mysql_escape
from sinks.sql import SqlSink, SupabaseSink, terra_payload_id

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
MYSQL_URL = "mysql://root@127.0.0.1:3306/test"
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
        if self.backend == "mysql":
            return mysql_query(sql.replace("?", "%s"), params)
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


def mysql_query(sql: str, params: tuple[Any, ...] = (), url: str = MYSQL_URL) -> list[tuple[Any, ...]]:
    parsed = urlparse(url)
    connection = pymysql.connect(host=parsed.hostname, port=parsed.port, user=parsed.username or "",
                                 password=parsed.password or "", database=parsed.path.lstrip("/"), autocommit=True,
                                 charset="utf8mb4")
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params or None)
            return list(cursor.fetchall())
    finally:
        connection.close()


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    prefix = f"hf_test_{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        path = tmp_path / "sink.db"
        yield Database("sqlite", f"sqlite:///{path}", prefix, path)
        return
    db = Database(request.param, POSTGRES_URL if request.param == "postgres" else MYSQL_URL, prefix)
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


def test_users_rows_of_one_batch_apply_in_order(sink: SqlSink, database: Database,
                                                make_sink_event: MakeEvent) -> None:
    """A user's rows that repeat the previous one are not sent; one that goes back to an earlier value is."""
    days = [f"2026-03-{day:02d}" for day in range(10, 16)]
    providers = ["OURA", "OURA", "WHOOP", "WHOOP", "OURA", "OURA"]
    events = [make_sink_event("u1", day, provider=provider) for day, provider in zip(days, providers, strict=True)]
    events.append(make_sink_event("u2", days[0], provider="WHOOP"))

    result = sink.write(events)

    assert result.delivered == [e.event_id for e in events] and result.failures == []
    assert sorted(database.query("SELECT user_id, provider FROM {p}users")) == [("u1", "OURA"), ("u2", "WHOOP")]
    kept = sink._layout.distinct_users([sink._layout.rows_for(e)[0] for e in events])
    assert [(user_id, provider) for user_id, provider, *_ in kept] == [
        ("u1", "OURA"), ("u1", "WHOOP"), ("u1", "OURA"), ("u2", "WHOOP")]


def test_distinct_users_compares_types_too() -> None:
    layout = SqlSink("sql", "sqlite:///x.db")._layout
    rows = [("u1", "OURA", 1, "t1"), ("u1", "OURA", 1, "t2"), ("u1", "OURA", True, "t3"), ("u1", "OURA", 1.0, "t4")]

    assert layout.distinct_users(rows) == [rows[0], rows[2], rows[3]]  # created_at (insert only) is not compared


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


def test_unencodable_payloads_are_permanent_and_the_rest_delivered(tmp_path: Path,
                                                                   make_sink_event: MakeEvent) -> None:
    database = Database("sqlite", f"sqlite:///{tmp_path / 'sink.db'}", "hf_", tmp_path / "sink.db")
    sink = database.sink()
    good = make_sink_event("u1", "2026-03-10")
    cycle_data = dict(make_sink_event("u1", "2026-03-11").data)
    cycle_data["self"] = cycle_data
    cycle = dataclasses.replace(make_sink_event("u1", "2026-03-11"), data=cycle_data)
    deep_data = dict(make_sink_event("u1", "2026-03-12").data)
    nested: dict[str, Any] = deep_data
    for _ in range(100_000):
        nested["next"] = nested = {}
    deep = dataclasses.replace(make_sink_event("u1", "2026-03-12"), data=deep_data)

    result = sink.write([good, cycle, deep])
    sink.close()

    assert result.delivered == [good.event_id]
    errors = {f.event.event_id: f.error for f in result.failures}
    assert set(errors) == {cycle.event_id, deep.event_id}
    assert all(isinstance(e, PermanentError) and "cannot map event" in str(e) for e in errors.values())
    assert set(database.records()) == {("u1", "sleep", "2026-03-10")}


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
    elif database.backend == "mysql":
        holder = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database="test")
        holder.cursor().execute(f"LOCK TABLES {database.prefix}records WRITE")
    else:
        holder = psycopg.connect(database.url)
        holder.execute(f"LOCK TABLE {database.prefix}records IN EXCLUSIVE MODE")
    try:
        [failure] = sink.write([event]).failures
        assert isinstance(failure.error, RetryableError)
        assert "lock" in str(failure.error).lower() or "busy" in str(failure.error).lower()
    finally:
        if database.backend == "sqlite":
            holder.execute("ROLLBACK")
        elif database.backend == "mysql":
            holder.cursor().execute("UNLOCK TABLES")
        else:
            holder.rollback()
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
    ("sqlite:///x.db", "", "table_prefix"),
    ("mysql://root@127.0.0.1:3306", "healthflow_", "names no database"),
    ("mysql://root@127.0.0.1:3306/test?charset=latin1", "healthflow_", "unsupported option"),
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


# ======================================================================================================================
# MySQL / MariaDB specifics
# ======================================================================================================================
@pytest.fixture
def mysql_db() -> Iterator[Database]:
    db = Database("mysql", MYSQL_URL, f"hf_test_{uuid.uuid4().hex[:10]}_")
    yield db
    db.query("DROP TABLE IF EXISTS {p}records, {p}users")


def test_mysql_guard_column_is_assigned_last() -> None:
    """MySQL assigns ON DUPLICATE KEY UPDATE left to right: the guard column must come last (behaviour: below)."""
    sink = SqlSink("sql", MYSQL_URL, table_prefix="hf_x_")
    statement = sink._layout.upsert_records(sink._dialect)

    assignments = statement.split(" ON DUPLICATE KEY UPDATE ", 1)[1]
    assert assignments.rsplit(", ordering_timestamp_ms = ", 1)[1].startswith("IF(")
    assert assignments.count("ordering_timestamp_ms = ") == 1


def test_mysql_stale_then_newer_rewrites_every_column(mysql_db: Database, make_sink_event: MakeEvent) -> None:
    """Had the guard column been overwritten first, a stale write would lower it and replace the payload."""
    sink = mysql_db.sink()
    key = ("u1", "sleep", "2026-03-10")
    v5 = make_sink_event("u1", "2026-03-10", version=5, ordering_timestamp_ms=5_000, provider="OURA")
    stale = make_sink_event("u1", "2026-03-10", version=4, ordering_timestamp_ms=4_999, provider="GARMIN")
    v6 = make_sink_event("u1", "2026-03-10", version=6, ordering_timestamp_ms=6_000, provider="WHOOP")
    try:
        sink.write([v5])
        sink.write([stale])
        assert mysql_db.records()[key] | {"payload": None} == {
            "event_id": v5.event_id, "ots": 5_000, "payload": None, "provider": "OURA",
            "start_time": v5.data["metadata"]["start_time"], "end_time": v5.data["metadata"]["end_time"]}
        sink.write([v6, stale])  # one multi-row INSERT: rows apply in order, each against the previous result
        stored = mysql_db.records()[key]
        assert (stored["event_id"], stored["ots"], stored["provider"], stored["payload"]) == (
            v6.event_id, 6_000, "WHOOP", v6.data)
    finally:
        sink.close()


def test_mysql_tables_are_utf8mb4_binary_keys(mysql_db: Database, make_sink_event: MakeEvent) -> None:
    sink = mysql_db.sink()
    long_key = "🏃" * 255  # 255 four-byte characters fit the key column
    events = [make_sink_event("u1", "abc"), make_sink_event("u1", "ABC"), make_sink_event("u1", long_key),
              make_sink_event("u1", long_key + "x")]  # 256 characters: rejected (strict mode), never truncated
    try:
        result = sink.write(events)

        assert result.delivered == [e.event_id for e in events[:3]]
        [failure] = result.failures
        assert failure.event is events[3] and isinstance(failure.error, PermanentError)
        assert "too long" in str(failure.error)
        assert {k for _, _, k in mysql_db.records()} == {"abc", "ABC", long_key}  # binary collation: distinct keys
        [(_, ddl)] = mysql_db.query("SHOW CREATE TABLE {p}records")
        assert "utf8mb4_bin" in ddl and "InnoDB" in ddl
    finally:
        sink.close()


def test_mysql_escape_is_pymysqls() -> None:
    """core.sql quotes strings itself (faster); the text must be PyMySQL's, character for character."""
    samples = ["".join(map(chr, range(128))), "naïve ✓ 🏃 \\' \\\" \\\\ \\0", "\\\\0\\n\x00\x1a", "", "plain"]
    samples += [chr(c) + chr(d) for c in range(128) for d in (0, 10, 39, 92, 0x1A)]

    assert [mysql_escape(s) for s in samples] == [pymysql.converters.escape_string(s) for s in samples]


@pytest.mark.parametrize("no_backslash_escapes", [False, True])
def test_mysql_awkward_text_round_trips(mysql_db: Database, make_sink_event: MakeEvent,
                                        no_backslash_escapes: bool) -> None:
    sink = mysql_db.sink()
    awkward = "".join(map(chr, range(128))) + " naïve ✓ 🏃 \\' \\\\ end"  # raw in provider, JSON-escaped in payload
    event = make_sink_event("u'1\\", "2026-03-10", provider=awkward, note=awkward)
    try:
        sink.open()
        if no_backslash_escapes:  # PyMySQL's own quoting ('' for ') then applies
            sink._dialect.execute(sink._connection,
                                  "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        assert bool(sink._connection.server_status & SERVER_STATUS_NO_BACKSLASH_ESCAPES) == no_backslash_escapes

        assert sink.write([event]).delivered == [event.event_id]

        stored = mysql_db.records()[("u'1\\", "sleep", "2026-03-10")]
        assert (stored["provider"], stored["payload"]) == (awkward, event.data)
        assert mysql_db.query("SELECT provider FROM {p}users") == [(awkward,)]
    finally:
        sink.close()


def test_lost_mysql_connection_is_retryable_then_reopened(mysql_db: Database, make_sink_event: MakeEvent) -> None:
    sink = mysql_db.sink()
    try:
        sink.open()
        mysql_db.query(f"KILL {sink._connection.thread_id()}")
        event = make_sink_event()

        [failure] = sink.write([event]).failures

        assert isinstance(failure.error, RetryableError)
        assert sink.write([event]).delivered == [event.event_id]
    finally:
        sink.close()


def test_mysql_down_is_retryable(make_sink_event: MakeEvent) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = SqlSink("sql", f"mysql://root@127.0.0.1:{port}/test")

    [failure] = sink.write([make_sink_event()]).failures

    assert isinstance(failure.error, RetryableError) and "2003" in str(failure.error)


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://no_such_user_hf@127.0.0.1:3306/test", "check the user and password"),
    ("mysql://root:wrong%40pw@127.0.0.1:3306/test", "check the user and password"),
    ("mysql://root@127.0.0.1:3306/no_such_db_hf", "database does not exist"),
])
def test_mysql_misconfiguration_is_fatal(url: str, message: str, make_sink_event: MakeEvent) -> None:
    sink = SqlSink("sql", url)

    with pytest.raises(FatalError, match=message) as raised:
        sink.open()
    assert "wrong" not in str(raised.value)  # the password is redacted
    [failure] = sink.write([make_sink_event()]).failures
    assert isinstance(failure.error, FatalError)


def test_mysql_missing_table_privilege_is_fatal(mysql_db: Database) -> None:
    user = f"hf_ro_{uuid.uuid4().hex[:8]}"
    mysql_db.query(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
    try:
        mysql_db.query(f"GRANT SELECT ON test.* TO '{user}'@'%'")
        sink = SqlSink("sql", f"mysql://{user}:pw@127.0.0.1:3306/test", table_prefix=mysql_db.prefix)

        with pytest.raises(FatalError, match=r"lacks a table privilege \(GRANT CREATE"):
            sink.open()
    finally:
        mysql_db.query(f"DROP USER '{user}'@'%'")


# ======================================================================================================================
# Terra / Supabase layout (PostgreSQL)
# ======================================================================================================================
@dataclass
class TerraDatabase:
    schema: str

    def query(self, sql: str, params: tuple[Any, ...] = (), timezone_name: str = "UTC") -> list[tuple[Any, ...]]:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(f"SET TimeZone = '{timezone_name}'")
            cursor = connection.execute(sql.replace("{s}", self.schema), params)
            return cursor.fetchall() if cursor.description else []

    def sink(self, **kwargs: Any) -> SqlSink:
        return SqlSink("supabase", POSTGRES_URL, layout="terra", schema=self.schema, **kwargs)

    def payloads(self) -> dict[str, tuple[Any, ...]]:
        rows = self.query("SELECT payload_id, user_id, data_type, created_at, start_time, end_time, payload, "
                          "ordering_timestamp_ms FROM {s}.terra_data_payloads")
        return {row[0]: row[1:] for row in rows}


@pytest.fixture
def terra() -> Iterator[TerraDatabase]:
    db = TerraDatabase(f"hf_terra_{uuid.uuid4().hex[:10]}")
    yield db
    db.query("DROP SCHEMA IF EXISTS {s} CASCADE")


def _day_event(user: str, start_time: str, *, version: int = 1, ordering_timestamp_ms: int = 1_000,
               type: str = "daily", **user_fields: Any) -> NormalizedEvent:
    end = (datetime.fromisoformat(start_time) + timedelta(days=1)).isoformat(timespec="microseconds")
    data = {"metadata": {"start_time": start_time, "end_time": end, "upload_type": 1, "timestamp_localization": 1},
            "distance_data": {"steps": 1000 * version}}
    return NormalizedEvent.create(type=type, user={"user_id": user, "provider": "GARMIN", **user_fields}, data=data,
                                  natural_key=start_time[:10], ordering_timestamp_ms=ordering_timestamp_ms,
                                  sequence="0")


def test_terra_layout_creates_schema_and_terra_tables(terra: TerraDatabase) -> None:
    sink = terra.sink()
    sink.open()
    sink.close()

    columns = terra.query("SELECT table_name, column_name, data_type FROM information_schema.columns "
                          "WHERE table_schema = %s ORDER BY table_name, ordinal_position", (terra.schema,))
    assert columns == [
        ("terra_data_payloads", "payload_id", "text"), ("terra_data_payloads", "user_id", "text"),
        ("terra_data_payloads", "data_type", "text"),
        ("terra_data_payloads", "created_at", "timestamp with time zone"),
        ("terra_data_payloads", "start_time", "timestamp with time zone"),
        ("terra_data_payloads", "end_time", "timestamp with time zone"),
        ("terra_data_payloads", "payload", "jsonb"), ("terra_data_payloads", "ordering_timestamp_ms", "bigint"),
        ("terra_users", "user_id", "text"), ("terra_users", "reference_id", "text"),
        ("terra_users", "created_at", "timestamp with time zone"), ("terra_users", "granted_scopes", "text"),
        ("terra_users", "provider", "text"), ("terra_users", "state", "text")]
    payloads_table = f"{terra.schema}.terra_data_payloads"
    [(rules,)] = terra.query("SELECT confupdtype::text || confdeltype::text FROM pg_constraint "
                             "WHERE contype = 'f' AND conrelid = %s::regclass", (payloads_table,))
    assert rules == "cc"  # ON UPDATE CASCADE, ON DELETE CASCADE


def test_terra_rows_as_specified(terra: TerraDatabase) -> None:
    sink = terra.sink()
    event = _day_event("u1", "2026-04-02T00:00:00.000000+01:00", reference_id="ref-1",
                       scopes=["fitness.activity.read", "fitness.sleep.read"],
                       created_at="2026-01-05T10:00:00.000000+00:00")
    before = datetime.now(UTC)
    try:
        assert sink.write([event]).delivered == [event.event_id]
    finally:
        sink.close()

    assert terra.query("SELECT user_id, reference_id, created_at, granted_scopes, provider, state "
                       "FROM {s}.terra_users") == [
        ("u1", "ref-1", datetime(2026, 1, 5, 10, tzinfo=UTC), "fitness.activity.read,fitness.sleep.read", "GARMIN",
         "active")]
    payload_id = terra_payload_id("u1", "daily", "2026-04-02")
    assert payload_id != event.event_id and str(uuid.UUID(payload_id)) == payload_id
    [(user_id, data_type, created_at, start, end, payload, ots)] = terra.payloads().values()
    assert list(terra.payloads()) == [payload_id]
    assert (user_id, data_type, payload, ots) == ("u1", "daily", event.data, 1_000)
    assert before <= created_at <= datetime.now(UTC)
    assert start == datetime(2026, 4, 1, 23, tzinfo=UTC)  # +01:00 honoured: the instant is stored
    assert end == datetime(2026, 4, 2, 23, tzinfo=UTC)
    assert start.utcoffset() == timedelta(0)


def test_terra_offsetless_local_time_is_stored_as_utc_wall_clock(terra: TerraDatabase) -> None:
    """Garmin day starts are local midnight without an offset: stored as that wall-clock time in UTC."""
    sink = terra.sink()
    event = _day_event("u1", "2026-04-02T00:00:00.000000")
    try:
        sink.write([event])
    finally:
        sink.close()

    [(start,)] = terra.query("SELECT start_time FROM {s}.terra_data_payloads")
    assert start == datetime(2026, 4, 2, tzinfo=UTC)
    # whatever the reader's session time zone, AT TIME ZONE 'UTC' gives back the provider's string and date part
    [(wall_clock, day)] = terra.query("SELECT to_char(start_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS'), "
                                      "(start_time AT TIME ZONE 'UTC')::date::text FROM {s}.terra_data_payloads",
                                      timezone_name="Pacific/Kiritimati")
    assert (wall_clock, day) == ("2026-04-02T00:00:00", "2026-04-02")


def test_terra_redelivery_newer_stale_equal(terra: TerraDatabase) -> None:
    sink = terra.sink()
    day = "2026-03-10T00:00:00.000000+02:00"
    v1 = _day_event("u1", day, version=1, ordering_timestamp_ms=1_000)
    v2 = _day_event("u1", day, version=2, ordering_timestamp_ms=2_000)
    stale = _day_event("u1", day, version=3, ordering_timestamp_ms=1_500)
    others = [_day_event("u1", "2026-03-11T00:00:00.000000+02:00"), _day_event("u2", day),
              _day_event("u1", day, type="body")]
    try:
        batch = [v1, *others]
        assert sink.write(batch).delivered == sink.write(batch).delivered == [e.event_id for e in batch]
        assert terra.query("SELECT COUNT(*) FROM {s}.terra_data_payloads") == [(4,)]
        assert terra.query("SELECT COUNT(*) FROM {s}.terra_users") == [(2,)]

        payload_id = terra_payload_id("u1", "daily", "2026-03-10")
        sink.write([v2])
        assert terra.payloads()[payload_id][5:] == (v2.data, 2_000)
        assert sink.write([stale]).delivered == [stale.event_id]
        assert terra.payloads()[payload_id][5:] == (v2.data, 2_000)
        [(created_before,)] = terra.query("SELECT created_at FROM {s}.terra_data_payloads WHERE payload_id = %s",
                                          (payload_id,))
        assert sink.write([v2]).delivered == [v2.event_id]  # equal: rewritten with the same content
        assert terra.payloads()[payload_id][5:] == (v2.data, 2_000)
        assert terra.payloads()[payload_id][2] >= created_before
        assert terra.query("SELECT COUNT(*) FROM {s}.terra_data_payloads") == [(4,)]
    finally:
        sink.close()


def test_terra_users_keep_state_and_fill_reference_id(terra: TerraDatabase) -> None:
    sink = terra.sink()
    try:
        sink.write([_day_event("u1", "2026-03-10")])
        [(created_at,)] = terra.query("SELECT created_at FROM {s}.terra_users")
        terra.query("UPDATE {s}.terra_users SET state = 'deauth'")  # an auth event's doing, not ours

        sink.write([_day_event("u1", "2026-03-11", reference_id="ref-7", scopes="a,b")])

        assert terra.query("SELECT reference_id, granted_scopes, state, created_at FROM {s}.terra_users") == [
            ("ref-7", "a,b", "deauth", created_at)]
        sink.write([_day_event("u1", "2026-03-12")])
        assert terra.query("SELECT reference_id, granted_scopes FROM {s}.terra_users") == [("ref-7", "a,b")]
        terra.query("DELETE FROM {s}.terra_users")  # ON DELETE CASCADE
        assert terra.query("SELECT COUNT(*) FROM {s}.terra_data_payloads") == [(0,)]
    finally:
        sink.close()


def test_terra_bad_rows_are_isolated(terra: TerraDatabase) -> None:
    sink = terra.sink()
    good = _day_event("u1", "2026-03-10")
    bad_time = _day_event("u1", "2026-03-11")
    bad_time.data["metadata"]["start_time"] = "yesterday-ish"
    nul = NormalizedEvent.create(type="daily", user={"user_id": "u2", "provider": "OURA"},
                                 data={"metadata": {"start_time": "2026-03-10"}, "note": "a\x00b"},
                                 natural_key="2026-03-10", ordering_timestamp_ms=1, sequence="0")
    overflow = _day_event("u3", "2026-03-10", ordering_timestamp_ms=2**63)
    try:
        result = sink.write([good, bad_time, nul, overflow])
    finally:
        sink.close()

    assert result.delivered == [good.event_id]
    errors = {f.event.event_id: f.error for f in result.failures}
    assert set(errors) == {bad_time.event_id, nul.event_id, overflow.event_id}
    assert all(isinstance(error, PermanentError) for error in errors.values())
    assert "cannot map event" in str(errors[bad_time.event_id])
    assert list(terra.payloads()) == [terra_payload_id("u1", "daily", "2026-03-10")]


def test_terra_layout_adds_our_columns_to_terra_created_tables(terra: TerraDatabase) -> None:
    terra.query("CREATE SCHEMA {s}")
    terra.query("CREATE TABLE {s}.terra_users (user_id VARCHAR(36) PRIMARY KEY, reference_id TEXT DEFAULT NULL, "
                "created_at TIMESTAMPTZ, granted_scopes TEXT, provider TEXT, state TEXT)")
    terra.query("CREATE TABLE {s}.terra_data_payloads (payload_id TEXT PRIMARY KEY, user_id TEXT NOT NULL "
                "REFERENCES {s}.terra_users ON DELETE CASCADE ON UPDATE CASCADE, data_type TEXT, "
                "created_at TIMESTAMPTZ, start_time TIMESTAMPTZ, end_time TIMESTAMPTZ)")
    payload_id = terra_payload_id("u1", "daily", "2026-03-10")
    terra.query("INSERT INTO {s}.terra_users VALUES ('u1', NULL, now(), NULL, 'GARMIN', 'active')")
    terra.query("INSERT INTO {s}.terra_data_payloads VALUES (%s, 'u1', 'daily', now(), NULL, NULL)", (payload_id,))
    sink = terra.sink()
    event = _day_event("u1", "2026-03-10")
    try:
        assert sink.write([event]).delivered == [event.event_id]
    finally:
        sink.close()

    assert terra.payloads()[payload_id][5:] == (event.data, 1_000)  # a row without a guard value is overwritten


def test_supabase_sink_without_schema_uses_search_path(make_sink_event: MakeEvent) -> None:
    prefix = f"hf_test_{uuid.uuid4().hex[:10]}_"
    sink = SupabaseSink("supabase", POSTGRES_URL, table_prefix=prefix)
    copy = pickle.loads(pickle.dumps(sink))
    try:
        event = make_sink_event("u1", "2026-03-10")
        assert copy.write([event]).delivered == [event.event_id]
        assert (sink.users_table, sink.records_table) == (f"{prefix}terra_users", f"{prefix}terra_data_payloads")
        db = Database("postgres", POSTGRES_URL, prefix)
        assert db.query("SELECT payload_id, data_type, payload FROM public.{p}terra_data_payloads") == [
            (terra_payload_id("u1", "sleep", "2026-03-10"), "sleep", event.data)]
    finally:
        copy.close()
        Database("postgres", POSTGRES_URL, prefix).query("DROP TABLE IF EXISTS {p}terra_data_payloads, {p}terra_users")


@pytest.mark.parametrize(("url", "kwargs", "message"), [
    (MYSQL_URL, {"layout": "terra"}, "needs a postgresql:// url"),
    ("sqlite:///x.db", {"layout": "terra"}, "needs a postgresql:// url"),
    ("sqlite:///x.db", {"schema": "terra"}, "schema must match"),
    (POSTGRES_URL, {"schema": "terra; DROP"}, "schema must match"),
    (POSTGRES_URL, {"layout": "supabase"}, "layout must be one of"),
])
def test_bad_layout_config_is_fatal(url: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FatalError, match=message):
        SqlSink("sql", url, **kwargs)


def test_terra_schema_option_with_the_terra_schema_name() -> None:
    """Terra's Postgres destination uses a schema named ``terra``: created when absent (left as found)."""
    [(existed,)] = TerraDatabase("terra").query("SELECT COUNT(*) FROM pg_namespace WHERE nspname = 'terra'")
    prefix = f"hf_test_{uuid.uuid4().hex[:10]}_"
    sink = SqlSink("supabase", POSTGRES_URL, table_prefix=prefix, layout="terra", schema="terra")
    try:
        sink.open()
        assert sink.records_table == f"terra.{prefix}terra_data_payloads"
        assert TerraDatabase("terra").query("SELECT to_regclass(%s) IS NOT NULL", (sink.records_table,)) == [(True,)]
    finally:
        sink.close()
        db = TerraDatabase("terra")
        db.query(f"DROP TABLE IF EXISTS terra.{prefix}terra_data_payloads, terra.{prefix}terra_users")
        if not existed:
            db.query("DROP SCHEMA IF EXISTS terra")


def test_terra_schema_that_exists_needs_no_database_create_right(terra: TerraDatabase) -> None:
    """A role limited to an existing schema (no CREATE on the database) can still use schema=..."""
    role = f"hf_role_{uuid.uuid4().hex[:8]}"
    terra.query("CREATE SCHEMA {s}")
    terra.query(f"CREATE ROLE {role} LOGIN")
    try:
        terra.query(f"GRANT USAGE, CREATE ON SCHEMA {{s}} TO {role}")
        sink = SqlSink("supabase", f"postgresql://{role}@127.0.0.1:5432/test", layout="terra", schema=terra.schema)
        event = _day_event("u1", "2026-03-10")
        try:
            assert sink.write([event]).delivered == [event.event_id]
        finally:
            sink.close()
    finally:
        terra.query("DROP SCHEMA IF EXISTS {s} CASCADE")
        terra.query(f"DROP OWNED BY {role}")
        terra.query(f"DROP ROLE {role}")


# ======================================================================================================================
# Tombstones: a deleted record's row goes (hard, the default) or is marked deleted_at (on_delete="soft")
# ======================================================================================================================
def _tombstone(event: NormalizedEvent, ordering_timestamp_ms: int, sequence: str = "1") -> NormalizedEvent:
    return NormalizedEvent.tombstone(type=event.type, user=event.user, natural_key=event.natural_key,
                                     ordering_timestamp_ms=ordering_timestamp_ms, sequence=sequence)


def test_a_tombstone_deletes_the_row_and_deleting_twice_is_fine(sink: SqlSink, database: Database,
                                                                make_sink_event: MakeEvent) -> None:
    kept, gone = make_sink_event("u1", "2026-03-10"), make_sink_event("u1", "2026-03-11")
    sink.write([kept, gone])
    tombstone = _tombstone(gone, 2_000)

    first, second = sink.write([tombstone]), sink.write([tombstone])

    assert first.delivered == second.delivered == [tombstone.event_id] and not first.failures + second.failures
    assert set(database.records()) == {("u1", "sleep", "2026-03-10")}
    assert database.query("SELECT COUNT(*) FROM {p}users") == [(1,)]


def test_a_tombstone_older_than_the_row_leaves_it(sink: SqlSink, database: Database,
                                                  make_sink_event: MakeEvent) -> None:
    newer = make_sink_event("u1", "2026-03-10", ordering_timestamp_ms=5_000)
    sink.write([newer])

    assert sink.write([_tombstone(newer, 4_999)]).failures == []

    assert database.records()[("u1", "sleep", "2026-03-10")]["event_id"] == newer.event_id


def test_upserts_and_deletes_of_one_batch_apply_in_order(sink: SqlSink, database: Database,
                                                         make_sink_event: MakeEvent) -> None:
    created = make_sink_event("u1", "2026-03-10", ordering_timestamp_ms=1_000)
    recreated = make_sink_event("u1", "2026-03-10", version=2, ordering_timestamp_ms=3_000, sequence="2")
    other = make_sink_event("u1", "2026-03-11", ordering_timestamp_ms=1_000)

    result = sink.write([created, other, _tombstone(created, 2_000), recreated, _tombstone(other, 2_000)])

    assert len(result.delivered) == 5 and not result.failures
    assert {key: row["event_id"] for key, row in database.records().items()} == {
        ("u1", "sleep", "2026-03-10"): recreated.event_id}


def test_soft_delete_keeps_the_row_with_deleted_at_until_newer_data(database: Database,
                                                                    make_sink_event: MakeEvent) -> None:
    sink = database.sink(on_delete="soft")
    try:
        event = make_sink_event("u1", "2026-03-10", ordering_timestamp_ms=1_000)
        tombstone = _tombstone(event, 2_000)
        sink.write([event])
        assert sink.write([tombstone]).delivered == [tombstone.event_id]
        assert sink.write([tombstone]).delivered == [tombstone.event_id]  # twice: the same row
        [(event_id, ots, deleted_at)] = database.query("SELECT event_id, ordering_timestamp_ms, deleted_at "
                                                       "FROM {p}records")
        assert (event_id, ots) == (tombstone.event_id, 2_000) and deleted_at

        sink.write([event])  # older data (a stale redelivery) does not bring it back
        assert database.query("SELECT event_id FROM {p}records WHERE deleted_at IS NOT NULL") == [
            (tombstone.event_id,)]

        recreated = make_sink_event("u1", "2026-03-10", version=2, ordering_timestamp_ms=3_000)
        sink.write([recreated])
        assert database.query("SELECT event_id, deleted_at FROM {p}records") == [(recreated.event_id, None)]
    finally:
        sink.close()


def test_soft_delete_adds_deleted_at_to_an_existing_table(sink: SqlSink, database: Database,
                                                          make_sink_event: MakeEvent) -> None:
    event = make_sink_event("u1", "2026-03-10")
    sink.write([event])  # the table as hard-delete destinations (and earlier releases) made it
    sink.close()
    soft = database.sink(on_delete="soft")
    try:
        assert soft.write([_tombstone(event, 2_000)]).failures == []
        assert database.query("SELECT natural_key FROM {p}records WHERE deleted_at IS NOT NULL") == [("2026-03-10",)]
    finally:
        soft.close()
    again = database.sink(on_delete="soft")  # the column is there now: opening again changes nothing
    again.open()
    again.close()


def test_switching_back_to_hard_clears_deleted_at_on_recreated_rows(database: Database,
                                                                    make_sink_event: MakeEvent) -> None:
    event = make_sink_event("u1", "2026-03-10", ordering_timestamp_ms=1_000)
    soft = database.sink(on_delete="soft")
    try:
        soft.write([event, _tombstone(event, 2_000)])
    finally:
        soft.close()
    hard = database.sink()  # on_delete: hard again; the table keeps its deleted_at column
    try:
        recreated = make_sink_event("u1", "2026-03-10", version=2, ordering_timestamp_ms=3_000)
        assert hard.write([recreated]).failures == []
        assert database.query("SELECT event_id, deleted_at FROM {p}records") == [(recreated.event_id, None)]
    finally:
        hard.close()


def test_sql_on_delete_must_be_hard_or_soft() -> None:
    with pytest.raises(FatalError, match="on_delete must be one of"):
        SqlSink("sql", "sqlite:///x.db", on_delete="archive")


def test_terra_layout_tombstones_hard_and_soft(terra: TerraDatabase) -> None:
    day = _day_event("u1", "2026-03-10T00:00:00.000000+01:00", ordering_timestamp_ms=1_000)
    other = _day_event("u1", "2026-03-11T00:00:00.000000+01:00", ordering_timestamp_ms=1_000)
    hard = terra.sink()
    try:
        hard.write([day, other])
        assert hard.write([_tombstone(day, 2_000)]).failures == []
        assert set(terra.payloads()) == {terra_payload_id("u1", "daily", "2026-03-11")}
    finally:
        hard.close()
    soft = terra.sink(on_delete="soft")  # the same tables: deleted_at is added
    try:
        assert soft.write([_tombstone(other, 2_000)]).failures == []
        [(payload_id, ots, deleted_at)] = terra.query("SELECT payload_id, ordering_timestamp_ms, deleted_at "
                                                      "FROM {s}.terra_data_payloads")
        assert (payload_id, ots) == (terra_payload_id("u1", "daily", "2026-03-11"), 2_000) and deleted_at
    finally:
        soft.close()
    hard = terra.sink()  # back to hard: a re-created record is no longer marked deleted
    try:
        assert hard.write([_day_event("u1", "2026-03-11T00:00:00.000000+01:00", ordering_timestamp_ms=3_000)]
                          ).failures == []
        assert terra.query("SELECT deleted_at FROM {s}.terra_data_payloads") == [(None,)]
    finally:
        hard.close()
