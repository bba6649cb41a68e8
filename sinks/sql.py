"""SQL sink: upserts each event's record by natural key into two tables (SQLite and Postgres; MySQL-ready).

Tables (created on open if absent; names = ``table_prefix`` + ``users`` / ``records``):
- ``<prefix>users(user_id PK, provider, reference_id, created_at)``
- ``<prefix>records(user_id, type, natural_key, provider, event_id, start_time, end_time, ordering_timestamp_ms,
  payload, updated_at, PRIMARY KEY(user_id, type, natural_key))``; ``payload`` is the record (``event.data``) as
  canonical JSON text (SQLite) or JSONB (Postgres); times are ISO-8601 text exactly as in the record.

Guarantees:
- A batch is written in one transaction (executemany); a row is replaced only when the incoming
  ``ordering_timestamp_ms >= stored``: a stale redelivery never overwrites newer data, an equal one is idempotent.
- Lock waits are bounded by ``lock_timeout_s`` (SQLite busy timeout, Postgres ``lock_timeout``).
- Failures: connection loss, lock/busy timeouts, serialization failures, deadlocks -> ``RetryableError`` for the batch
  (a lost connection is reopened on the next write);
  bad data -> the batch is retried row by row and only the offending events get ``PermanentError``; bad credentials,
  missing database, missing rights -> ``FatalError`` saying what to fix.

Dialect differences live in ``_Dialect`` subclasses (connect, placeholders, column types, error classification); a
MySQL dialect needs ``ON DUPLICATE KEY UPDATE`` with the same guard and VARCHAR keys.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from sinks.base import Sink, SinkResult
from transforms.errors import FatalError, PermanentError, RetryableError
from transforms.events import NormalizedEvent

DEFAULT_TABLE_PREFIX = "healthflow_"
_PREFIX_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")

USER_COLUMNS = ("user_id", "provider", "reference_id", "created_at")
RECORD_COLUMNS = ("user_id", "type", "natural_key", "provider", "event_id", "start_time", "end_time",
                  "ordering_timestamp_ms", "payload", "updated_at")
RECORD_KEY = ("user_id", "type", "natural_key")


_Row = tuple[NormalizedEvent, tuple[Any, ...], tuple[Any, ...]]  # (event, users row, records row)


class _DataError(Exception):
    """Internal: the batch failed because of some row's data; retry row by row to find it."""


class _Dialect(ABC):
    """Everything that differs between databases. Statements use ``placeholder`` for parameters."""

    name: str
    placeholder: str
    text_type = "TEXT"  # MySQL needs VARCHAR(n) for key columns
    json_type = "TEXT"
    json_param = "{}"  # how a JSON text parameter is written in SQL, e.g. "CAST({} AS JSONB)"

    def __init__(self, lock_timeout_s: float) -> None:
        self.lock_timeout_s = lock_timeout_s

    @abstractmethod
    def connect(self, url: str) -> Any:
        """An open DB-API connection in autocommit mode (transactions are explicit)."""

    @abstractmethod
    def begin(self, connection: Any) -> None:
        """Start a write transaction."""

    @abstractmethod
    def classify(self, exc: BaseException, url: str) -> Exception:
        """The taxonomy error for a driver error; ``_DataError`` when the data of some row caused it."""

    def lock_for_ddl(self, connection: Any, lock_name: str) -> None:  # noqa: B027 - optional
        """Serialize concurrent CREATE TABLE IF NOT EXISTS from several workers (no-op where DDL is atomic)."""

    def create_tables(self, users: str, records: str) -> list[str]:
        t = self.text_type
        return [
            f"CREATE TABLE IF NOT EXISTS {users} (user_id {t} PRIMARY KEY, provider {t}, reference_id {t}, "
            f"created_at {t} NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {records} (user_id {t} NOT NULL, type {t} NOT NULL, "
            f"natural_key {t} NOT NULL, provider {t}, event_id {t} NOT NULL, start_time {t}, end_time {t}, "
            f"ordering_timestamp_ms BIGINT NOT NULL, payload {self.json_type} NOT NULL, updated_at {t} NOT NULL, "
            f"PRIMARY KEY (user_id, type, natural_key))",
        ]

    def upsert_users(self, users: str) -> str:
        """Insert users once; later events only fill a missing reference_id and refresh provider."""
        p = self.placeholder
        return (f"INSERT INTO {users} ({', '.join(USER_COLUMNS)}) VALUES ({p}, {p}, {p}, {p}) "
                f"ON CONFLICT (user_id) DO UPDATE SET provider = excluded.provider, "
                f"reference_id = COALESCE(excluded.reference_id, {users}.reference_id)")

    def upsert_records(self, records: str) -> str:
        """Insert or replace by natural key, only when the incoming ordering timestamp is >= the stored one."""
        values = ", ".join(self.json_param.format(self.placeholder) if c == "payload" else self.placeholder
                           for c in RECORD_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in RECORD_COLUMNS if c not in RECORD_KEY)
        return (f"INSERT INTO {records} ({', '.join(RECORD_COLUMNS)}) VALUES ({values}) "
                f"ON CONFLICT ({', '.join(RECORD_KEY)}) DO UPDATE SET {updates} "
                f"WHERE excluded.ordering_timestamp_ms >= {records}.ordering_timestamp_ms")


class _SqliteDialect(_Dialect):
    name = "sqlite"
    placeholder = "?"

    def connect(self, url: str) -> Any:
        path = _sqlite_path(url)
        try:
            return sqlite3.connect(path, timeout=self.lock_timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self.classify(exc, url) from exc

    def begin(self, connection: Any) -> None:
        connection.execute("BEGIN IMMEDIATE")  # take the write lock now; waits up to lock_timeout_s

    def classify(self, exc: BaseException, url: str) -> Exception:
        message = str(exc).lower()
        if isinstance(exc, sqlite3.OperationalError):
            if "locked" in message or "busy" in message:
                return RetryableError(f"sqlite database busy: {exc}")
            if any(s in message for s in ("unable to open", "readonly", "no such table", "no such column",
                                          "not authorized", "permission")):
                return FatalError(f"sqlite {_sqlite_path(url)!r}: {exc}; check the path exists, is writable, "
                                  f"and the tables were not altered")
            return RetryableError(f"sqlite error: {exc}")
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError
                      | OverflowError | ValueError | TypeError):
            return _DataError(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in message:
            return FatalError(f"{_sqlite_path(url)!r} is not a SQLite database: {exc}")
        return RetryableError(f"sqlite error: {type(exc).__name__}: {exc}")


class _PostgresDialect(_Dialect):
    name = "postgresql"
    placeholder = "%s"
    json_type = "JSONB"
    json_param = "CAST({} AS JSONB)"
    connect_timeout_s = 10
    _FATAL_STATES = {"42501": "the role lacks a privilege (grant CREATE/INSERT/UPDATE/SELECT)",
                     "3D000": "the database does not exist", "3F000": "the schema does not exist",
                     "42P01": "a table is missing", "42703": "a column is missing (tables altered?)"}
    _CONNECT_FATAL = ("does not exist", "authentication failed", "no pg_hba.conf entry", "permission denied",
                      "password")

    def connect(self, url: str) -> Any:
        import psycopg

        try:
            connection = psycopg.connect(url, autocommit=True, connect_timeout=self.connect_timeout_s)
        except psycopg.Error as exc:
            raise self.classify(exc, url) from exc
        try:
            connection.execute(f"SET lock_timeout = {int(self.lock_timeout_s * 1000)}")
        except psycopg.Error as exc:
            _close_quietly(connection)
            raise self.classify(exc, url) from exc
        return connection

    def begin(self, connection: Any) -> None:
        connection.execute("BEGIN")

    def lock_for_ddl(self, connection: Any, lock_name: str) -> None:
        connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [lock_name])

    def classify(self, exc: BaseException, url: str) -> Exception:
        import psycopg

        where = _redact(url)
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith("28") or state in self._FATAL_STATES:
            reason = self._FATAL_STATES.get(state, "authentication failed (check user/password/pg_hba.conf)")
            return FatalError(f"postgres {where}: {reason}: {exc}")
        if state[:2] in ("08", "40", "53", "57", "58") or state == "55P03":
            return RetryableError(f"postgres {where} transient error {state}: {exc}")
        if state[:2] in ("22", "23") or isinstance(exc, psycopg.DataError | psycopg.IntegrityError
                                                   | OverflowError | ValueError | TypeError):
            return _DataError(f"{type(exc).__name__} {state}: {exc}")
        if isinstance(exc, psycopg.OperationalError):  # no sqlstate: failed to connect or connection lost
            if any(s in str(exc) for s in self._CONNECT_FATAL):
                return FatalError(f"postgres {where}: cannot connect: {exc}; fix the URL, role, password or database")
            return RetryableError(f"postgres {where} unavailable: {exc}")
        if isinstance(exc, psycopg.ProgrammingError):
            return FatalError(f"postgres {where}: statement rejected ({state}): {exc}")
        return RetryableError(f"postgres {where}: {type(exc).__name__} {state}: {exc}")


_DIALECTS: dict[str, type[_Dialect]] = {
    "sqlite": _SqliteDialect,
    "postgresql": _PostgresDialect,
    "postgres": _PostgresDialect,
}


class SqlSink(Sink):
    """Upserts records by (user_id, type, natural_key) with a newest-wins guard; see the module docstring."""

    ordered = True  # and order-independent: the guard keeps the newest version whatever the arrival order

    def __init__(self, name: str, url: str, table_prefix: str = DEFAULT_TABLE_PREFIX,
                 lock_timeout_s: float = 10.0) -> None:
        super().__init__(name)
        scheme = urlparse(url or "").scheme.split("+")[0]
        if scheme not in _DIALECTS:
            raise FatalError(f"sql sink {name!r}: unsupported url scheme {scheme!r} in {_redact(url)!r}; "
                             f"use sqlite:///path.db or postgresql://user@host:port/db")
        if not _PREFIX_PATTERN.match(table_prefix):
            raise FatalError(f"sql sink {name!r}: table_prefix must match {_PREFIX_PATTERN.pattern}, "
                             f"got {table_prefix!r}")
        self.url = url
        self.table_prefix = table_prefix
        self.users_table = f"{table_prefix}users"
        self.records_table = f"{table_prefix}records"
        self._dialect = _DIALECTS[scheme](lock_timeout_s)
        self._connection: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_connection"] = None
        return state

    def open(self) -> None:
        """Connect and create the tables if absent. Raises RetryableError / FatalError."""
        if self._connection is not None:
            return
        connection = self._dialect.connect(self.url)
        try:
            self._dialect.begin(connection)
            self._dialect.lock_for_ddl(connection, self.records_table)
            for statement in self._dialect.create_tables(self.users_table, self.records_table):
                connection.execute(statement)
            connection.execute("COMMIT")
        except Exception as exc:
            _close_quietly(connection)
            error = self._dialect.classify(exc, self.url)
            raise (FatalError(f"creating tables failed: {error}") if isinstance(error, _DataError) else error) from exc
        self._connection = connection

    def close(self) -> None:
        if self._connection is not None:
            _close_quietly(self._connection)
            self._connection = None

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        result = SinkResult()
        rows: list[_Row] = []
        for event in events:
            try:
                rows.append((event, *self._rows_for(event)))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                result.fail_all([event], PermanentError(f"cannot map event to a row: {type(exc).__name__}: {exc}"))
        if not rows:
            return result
        try:
            self.open()
            self._write_rows(rows)
        except (RetryableError, FatalError) as exc:
            return result.fail_all([event for event, _, _ in rows], exc)
        except _DataError:
            return self._write_one_by_one(rows, result)
        result.delivered.extend(event.event_id for event, _, _ in rows)
        return result

    def _write_one_by_one(self, rows: list[_Row], result: SinkResult) -> SinkResult:
        """After a data error, isolate the bad rows: each row in its own transaction."""
        for row in rows:
            event = row[0]
            try:
                self.open()
                self._write_rows([row])
            except _DataError as exc:
                result.fail_all([event], PermanentError(f"rejected by {self._dialect.name}: {exc}"))
            except (RetryableError, FatalError) as exc:
                result.fail_all([event], exc)
            else:
                result.delivered.append(event.event_id)
        return result

    def _write_rows(self, rows: list[_Row]) -> None:
        """One transaction: users then records; raises a taxonomy error or ``_DataError`` after rolling back."""
        connection = self._connection
        try:
            self._dialect.begin(connection)
            cursor = connection.cursor()
            cursor.executemany(self._dialect.upsert_users(self.users_table), [user for _, user, _ in rows])
            cursor.executemany(self._dialect.upsert_records(self.records_table), [record for _, _, record in rows])
            connection.execute("COMMIT")
        except Exception as exc:
            error = self._dialect.classify(exc, self.url)
            if not self._rollback():
                self.close()  # connection is unusable: reconnect on the next write
            raise error from exc

    def _rollback(self) -> bool:
        """Roll back the failed transaction; False when the connection is no longer usable."""
        try:
            self._connection.execute("ROLLBACK")
            return True
        except Exception:  # connection lost, or no transaction was open (then reconnecting is harmless)
            return False

    def _rows_for(self, event: NormalizedEvent) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        now = _utc_now_iso()
        metadata = event.data.get("metadata") or {}
        payload = json.dumps(event.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        user = (event.user_id, event.provider, event.user.get("reference_id"), now)
        record = (event.user_id, event.type, event.natural_key, event.provider, event.event_id,
                  metadata.get("start_time"), metadata.get("end_time"), event.ordering_timestamp_ms, payload, now)
        return user, record


def _sqlite_path(url: str) -> str:
    """SQLAlchemy convention: ``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite:///:memory:``."""
    path = urlparse(url).path
    return path[1:] if path.startswith("/") else path


def _redact(url: str) -> str:
    parsed = urlparse(url or "")
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _close_quietly(connection: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection must not mask the original error
        connection.close()
