"""The control-plane store: one small SQL interface, SQLite embedded, PostgreSQL in production.

Record state, destination status (and later users, tokens, contracts) live here. SQL is written
once with ``?`` placeholders and portable types; the dialect differences stay in this file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import FatalError, RetryableError


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch, as the stores keep their timestamps."""
    return int(time.time() * 1000)


class Store:
    """A connection to ``sqlite:///path`` or ``postgresql://user@host:port/db``."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
        elif url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgres"
        else:
            raise FatalError(f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
        self.url = url
        self.conn: Any = None

    @property
    def json_type(self) -> str:
        return "JSONB" if self.dialect == "postgres" else "TEXT"

    def open(self) -> Store:
        if self.conn is not None:
            return self
        if self.dialect == "sqlite":
            path = self.url.removeprefix("sqlite:///")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
                self.conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as exc:
                raise FatalError(f"cannot open store {path}: {exc}") from exc
        else:
            import psycopg

            try:
                self.conn = psycopg.connect(self.url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise FatalError(f"cannot open store {self.url}: {str(exc).strip()}") from exc
        return self

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction; transient failures surface as RetryableError."""
        assert self.conn is not None, "open() first"
        transient = _transient_errors(self.dialect)
        try:
            if self.dialect == "sqlite":
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _Cursor(self, self.conn.cursor())
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
            else:
                with self.conn.transaction(), self.conn.cursor() as cursor:
                    yield _Cursor(self, cursor)
        except transient as exc:
            raise RetryableError(f"store {self.dialect}: {exc}") from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.transaction() as cursor:
            return cursor.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.transaction() as cursor:
            cursor.execute(sql, params)

    def load_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value


class _Cursor:
    def __init__(self, store: Store, cursor: Any) -> None:
        self.store, self.cursor = store, cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        self.cursor.execute(self.store._sql(sql), params)
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.cursor.executemany(self.store._sql(sql), rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.cursor.fetchall()


def _transient_errors(dialect: str) -> tuple[type[BaseException], ...]:
    if dialect == "sqlite":
        return (sqlite3.OperationalError,)
    import psycopg

    return (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
