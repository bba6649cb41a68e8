"""The control-plane store: one small SQL interface, SQLite embedded, PostgreSQL (or MySQL/MariaDB) in production.

Record state, destination status, users, tokens and poll cursors live here. SQL is written once with ``?``
placeholders and portable types; the dialect differences live in ``core.sql``, shared with the SQL destination.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from core.errors import FatalError, HealthflowError, RetryableError
from core.secrets import redact
from core.sql import SqlDialect, close_quietly, dialect_for

DDL_LOCK = "healthflow-ddl"


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch, as the stores keep their timestamps."""
    return int(time.time() * 1000)


class Store:
    """A connection to ``sqlite:///path``, ``postgresql://user@host:port/db`` or ``mysql://user@host:port/db``;
    ``${VAR}`` references in the URL are resolved at ``open()``."""

    def __init__(self, url: str) -> None:
        self.sql_dialect: SqlDialect = dialect_for(url, "store")
        self.sql_dialect.check_url(url)
        self.url = url
        self.conn: Any = None

    @property
    def dialect(self) -> str:
        """The dialect's name: ``sqlite``, ``postgres`` or ``mysql``."""
        return self.sql_dialect.name

    @property
    def json_type(self) -> str:
        return self.sql_dialect.json_type

    def open(self) -> Store:
        """Connect. A database that is unreachable for now (refused, starting, shutting down) raises RetryableError:
        an outage, to be waited out; one that answers no to this URL (credentials, unknown database or host) raises
        FatalError saying what to fix."""
        if self.conn is not None:
            return self
        try:
            self.conn = self.sql_dialect.connect(self.url, "store", embedded=True)
        except HealthflowError as exc:
            if exc.__cause__ is None:  # not the database's answer (an unset ${VAR}): as it is
                raise
            reason = f"store {redact(self.url)}: {str(exc.__cause__).strip()}"
            if isinstance(exc, RetryableError):
                raise RetryableError(f"store unavailable: {reason}") from exc
            raise FatalError(f"cannot open {reason}") from exc
        return self

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close_quietly(self) -> None:
        """Drop the connection, whatever state it is in."""
        if self.conn is not None:
            close_quietly(self.conn)
            self.conn = None

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        """A cursor inside one transaction; the database's transient failures surface as RetryableError and its
        misconfigurations (missing table, privilege, credentials) as FatalError; other errors are raised as they are
        (the data of a row: the caller isolates it). After a transient failure the connection is dropped, and the next
        transaction connects again (RetryableError while the database is still away)."""
        if self.conn is None:
            self.open()
        dialect = self.sql_dialect
        try:
            with dialect.transaction(self.conn) as cursor:
                yield _Cursor(dialect, cursor)
        except dialect.driver_errors as exc:
            error = dialect.classify(exc, self.url)
            if isinstance(error, RetryableError):
                self.close_quietly()  # perhaps broken: connect afresh next time
                raise RetryableError(f"store {dialect.name}: {exc}") from exc
            if isinstance(error, FatalError):
                raise FatalError(f"store: {error}") from exc
            raise

    def create_tables(self, *statements: str) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements in one transaction, safe when several workers start at once
        (they take turns under the dialect's DDL lock where IF NOT EXISTS is not atomic)."""
        with self.transaction() as cursor, self.sql_dialect.ddl_lock(self.conn, DDL_LOCK):
            for statement in statements:
                cursor.execute(statement)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.transaction() as cursor:
            return cursor.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.transaction() as cursor:
            cursor.execute(sql, params)

    def load_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value


class _Cursor:
    """A driver cursor taking statements written with ``?`` placeholders."""

    def __init__(self, dialect: SqlDialect, cursor: Any) -> None:
        self.dialect, self.cursor = dialect, cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        self.cursor.execute(self.dialect.placeholders(sql), params)
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.cursor.executemany(self.dialect.placeholders(sql), rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self.cursor.fetchall())
