"""Record state: the latest merged version of every normalized record.

Terra's destinations overwrite a record by its natural key, so every delivered record must be the
whole record. Providers send parts of one record separately and at different times (Garmin epochs
and stress details into the day's Daily, Oura heart-rate rows and scores into the Daily). The
pipeline merges each batch's fragments into the stored record and delivers the result, so a later
fragment never wipes what an earlier batch delivered.

Backends: SQLite (embedded default, one process) and PostgreSQL (shared by distributed workers).
All I/O is batched: one read and one write per group of users.
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transforms.errors import FatalError, RetryableError

Key = tuple[str, str, str]  # (user_id, type, natural_key)
TABLE = "healthflow_record_state"
CHUNK = 300


class RecordState(ABC):
    """Stored records by (user, type, natural key), with the provider version they carry."""

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def load(self, keys: Sequence[Key]) -> dict[Key, tuple[dict[str, Any], int]]:
        """Stored ``(record, version_ms)`` for the keys that exist."""

    @abstractmethod
    def save(self, rows: Iterable[tuple[Key, dict[str, Any], int]]) -> None:
        """Store merged records (overwriting); atomic for the whole call."""


def open_state(url: str) -> RecordState:
    """``sqlite:///path/state.db`` or ``postgresql://user@host:port/db``."""
    if url.startswith("sqlite:///"):
        return SqliteState(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresState(url)
    raise FatalError(f"unsupported record-state URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


def _placeholders(count: int, marker: str) -> str:
    return ", ".join(f"({marker}, {marker}, {marker})" for _ in range(count))


class SqliteState(RecordState):
    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (user_id TEXT NOT NULL, type TEXT NOT NULL, "
                          "natural_key TEXT NOT NULL, version_ms INTEGER NOT NULL, data TEXT NOT NULL, "
                          "PRIMARY KEY (user_id, type, natural_key))")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def load(self, keys: Sequence[Key]) -> dict[Key, tuple[dict[str, Any], int]]:
        assert self.conn is not None, "open() first"
        found: dict[Key, tuple[dict[str, Any], int]] = {}
        try:
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start:start + CHUNK]
                rows = self.conn.execute(
                    f"SELECT user_id, type, natural_key, data, version_ms FROM {TABLE} "
                    f"WHERE (user_id, type, natural_key) IN (VALUES {_placeholders(len(chunk), '?')})",
                    [part for key in chunk for part in key])
                for user_id, kind, key, data, version in rows:
                    found[(user_id, kind, key)] = (json.loads(data), version)
        except sqlite3.OperationalError as exc:
            raise RetryableError(f"record state read failed: {exc}") from exc
        return found

    def save(self, rows: Iterable[tuple[Key, dict[str, Any], int]]) -> None:
        assert self.conn is not None, "open() first"
        values = [(*key, version, json.dumps(data, separators=(",", ":"))) for key, data, version in rows]
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                f"INSERT INTO {TABLE} (user_id, type, natural_key, version_ms, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (user_id, type, natural_key) DO UPDATE SET version_ms = excluded.version_ms, "
                "data = excluded.data", values)
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self.conn.execute("ROLLBACK")
            raise RetryableError(f"record state write failed: {exc}") from exc


class PostgresState(RecordState):
    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None

    def open(self) -> None:
        import psycopg

        try:
            self.conn = psycopg.connect(self.url, autocommit=False)
            with self.conn.cursor() as cur:
                cur.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (user_id TEXT NOT NULL, type TEXT NOT NULL, "
                            "natural_key TEXT NOT NULL, version_ms BIGINT NOT NULL, data JSONB NOT NULL, "
                            "PRIMARY KEY (user_id, type, natural_key))")
            self.conn.commit()
        except psycopg.OperationalError as exc:
            raise FatalError(f"cannot open record state {self.url}: {exc}") from exc

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def load(self, keys: Sequence[Key]) -> dict[Key, tuple[dict[str, Any], int]]:
        import psycopg

        found: dict[Key, tuple[dict[str, Any], int]] = {}
        try:
            with self.conn.cursor() as cur:
                for start in range(0, len(keys), CHUNK):
                    chunk = keys[start:start + CHUNK]
                    cur.execute(f"SELECT user_id, type, natural_key, data, version_ms FROM {TABLE} "
                                f"WHERE (user_id, type, natural_key) IN ({_placeholders(len(chunk), '%s')})",
                                [part for key in chunk for part in key])
                    for user_id, kind, key, data, version in cur.fetchall():
                        found[(user_id, kind, key)] = (data, version)
            self.conn.commit()
        except psycopg.OperationalError as exc:
            self.conn.rollback()
            raise RetryableError(f"record state read failed: {exc}") from exc
        return found

    def save(self, rows: Iterable[tuple[Key, dict[str, Any], int]]) -> None:
        import psycopg

        values = [(*key, version, json.dumps(data)) for key, data, version in rows]
        try:
            with self.conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {TABLE} (user_id, type, natural_key, version_ms, data) "
                    "VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (user_id, type, natural_key) DO UPDATE "
                    "SET version_ms = excluded.version_ms, data = excluded.data", values)
            self.conn.commit()
        except psycopg.OperationalError as exc:
            self.conn.rollback()
            raise RetryableError(f"record state write failed: {exc}") from exc
