"""SQL sink: upserts each event's record by natural key (SQLite, PostgreSQL, MySQL/MariaDB; Supabase layout).

URLs: ``sqlite:///relative.db`` / ``sqlite:////absolute.db``; ``postgresql://user:password@host:port/db`` (libpq
query options allowed); ``mysql://user:password@host:port/db`` (also ``mariadb://``, ``mysql+pymysql://``; query
options ``unix_socket``, ``ssl_ca``). Supabase is PostgreSQL: use its connection string with ``layout="terra"``
(or ``SupabaseSink``); there is no ``supabase://`` scheme.

Layouts (tables created on open if absent):

``layout="healthflow"`` (default; names = ``table_prefix`` + ``users`` / ``records``, prefix default ``healthflow_``):
- ``<prefix>users(user_id PK, provider, reference_id, created_at)``
- ``<prefix>records(user_id, type, natural_key, provider, event_id, start_time, end_time, ordering_timestamp_ms,
  payload, updated_at, PRIMARY KEY(user_id, type, natural_key))``; ``payload`` is the record (``event.data``) as
  canonical JSON text (SQLite), JSONB (Postgres) or JSON (MySQL); times are ISO-8601 text exactly as in the record.
  MySQL: key columns are ``VARCHAR`` (user_id 255, type 64, natural_key 255 characters: 2,296 bytes of utf8mb4, under
  InnoDB's 3,072-byte index limit with the DYNAMIC row format), tables are InnoDB ``utf8mb4`` with the binary collation
  so keys compare byte-wise as in SQLite/Postgres (the default ``_ci`` collation would merge ``abc`` and ``ABC``).

``layout="terra"`` (PostgreSQL/Supabase only; Terra's published Supabase tables, default prefix empty):
- ``terra_users(user_id TEXT PK, reference_id, created_at TIMESTAMPTZ, granted_scopes, provider, state)``: inserted
  with ``state = 'active'``; later events refresh ``provider`` and fill ``reference_id`` / ``granted_scopes`` but
  never change ``state`` or ``created_at`` (``state`` belongs to auth events). ``created_at`` is ``user.created_at``
  when the event carries it, else the time of the first write.
- ``terra_data_payloads(payload_id TEXT PK, user_id → terra_users ON DELETE/UPDATE CASCADE, data_type, created_at,
  start_time, end_time TIMESTAMPTZ)``: one row per (user, type, natural key), so re-sent same-day data replaces the
  row. ``payload_id = terra_payload_id(user_id, type, natural_key)``, a UUIDv5 (not the event id, which changes with
  the content). ``created_at`` = when the stored version was written.
  Deviation from Terra: Terra keeps the JSON in a ``terra-payloads`` storage bucket; we add ``payload JSONB`` (the
  record) and ``ordering_timestamp_ms BIGINT`` (the guard) columns, added with ``ALTER TABLE`` when an existing
  Terra-created table lacks them; rows without an ordering timestamp are always overwritten.
  ``start_time`` / ``end_time`` are parsed from the ISO strings in Python: an offset is honoured (``+01:00`` is stored
  as the instant); a string without an offset (user-local time, e.g. Garmin's local-midnight day starts) is stored as
  if it were UTC, so ``start_time AT TIME ZONE 'UTC'`` gives back the provider's wall-clock time and date part
  whatever the session time zone; the original strings stay in ``payload``.
- ``schema="terra"`` puts the tables in that schema (Terra's Postgres destination does), created if absent (Postgres
  only; default: the connection's search_path, ``public`` on Supabase).

Guarantees:
- A batch is written in one transaction (executemany); a row is replaced only when the incoming
  ``ordering_timestamp_ms >= stored``: a stale redelivery never overwrites newer data, an equal one is idempotent.
  MySQL has no ``WHERE`` on ``ON DUPLICATE KEY UPDATE``: each column becomes ``IF(guard, VALUES(c), c)`` and, since
  MySQL assigns left to right and later expressions see earlier assignments, ``ordering_timestamp_ms`` is assigned
  last so every guard compares with the stored value.
- Lock waits are bounded by ``lock_timeout_s`` (SQLite busy timeout, Postgres ``lock_timeout``, MySQL
  ``innodb_lock_wait_timeout`` / ``lock_wait_timeout`` rounded up to whole seconds).
- Failures: connection loss, lock/busy timeouts, serialization failures, deadlocks -> ``RetryableError`` for the batch
  (a lost connection is reopened on the next write);
  bad data -> the batch is retried row by row and only the offending events get ``PermanentError``; bad credentials,
  missing database, missing rights -> ``FatalError`` saying what to fix.

Database differences live in ``_Dialect`` subclasses (connect, statement execution, column types, upsert syntax,
error classification); table shapes and row mapping live in the two ``_Layout`` classes.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent, canonical_json
from sinks.base import Sink, SinkResult

DEFAULT_TABLE_PREFIX = "healthflow_"
LAYOUTS = ("healthflow", "terra")
_PREFIX_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_SCHEMA_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

USER_COLUMNS = ("user_id", "provider", "reference_id", "created_at")
RECORD_COLUMNS = ("user_id", "type", "natural_key", "provider", "event_id", "start_time", "end_time",
                  "ordering_timestamp_ms", "payload", "updated_at")
RECORD_KEY = ("user_id", "type", "natural_key")
GUARD_COLUMN = "ordering_timestamp_ms"

TERRA_USER_COLUMNS = ("user_id", "reference_id", "created_at", "granted_scopes", "provider", "state")
TERRA_PAYLOAD_COLUMNS = ("payload_id", "user_id", "data_type", "created_at", "start_time", "end_time", "payload",
                         "ordering_timestamp_ms")
_TERRA_PAYLOAD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "healthflow:terra_data_payloads")


def terra_payload_id(user_id: str, data_type: str, natural_key: str) -> str:
    """The ``terra_data_payloads.payload_id`` of a record: a UUIDv5 of (user, type, natural key), stable across
    updates and redeliveries so the row is upserted in place."""
    return str(uuid.uuid5(_TERRA_PAYLOAD_NAMESPACE, canonical_json([user_id, data_type, natural_key]).decode()))


_Row = tuple[NormalizedEvent, tuple[Any, ...], tuple[Any, ...]]  # (event, users row, records row)


class _DataError(Exception):
    """Internal: the batch failed because of some row's data; retry row by row to find it."""


# ======================================================================================================================
# Dialects: what differs between databases
# ======================================================================================================================
class _Dialect(ABC):
    """Everything that differs between databases. Statements use ``placeholder`` for parameters."""

    name: str
    placeholder: str
    text_type = "TEXT"
    json_type = "TEXT"
    json_param = "{}"  # how a JSON text parameter is written in SQL, e.g. "CAST({} AS JSONB)"
    table_options = ""  # appended to CREATE TABLE
    supports_schema = False

    def __init__(self, lock_timeout_s: float) -> None:
        self.lock_timeout_s = lock_timeout_s

    def check_url(self, url: str) -> None:  # noqa: B027 - optional
        """Raise ``FatalError`` for a URL that can never work (called by the constructor)."""

    @abstractmethod
    def connect(self, url: str) -> Any:
        """An open DB-API connection in autocommit mode (transactions are explicit)."""

    @abstractmethod
    def begin(self, connection: Any) -> None:
        """Start a write transaction."""

    @abstractmethod
    def classify(self, exc: BaseException, url: str) -> Exception:
        """The taxonomy error for a driver error; ``_DataError`` when the data of some row caused it."""

    def execute(self, connection: Any, sql: str, params: Sequence[Any] = ()) -> None:
        connection.execute(sql, params)

    def lock_for_ddl(self, connection: Any, lock_name: str) -> None:  # noqa: B027 - optional
        """Serialize concurrent CREATE TABLE IF NOT EXISTS from several workers (no-op where DDL is atomic)."""

    def ensure_schema(self, connection: Any, schema: str) -> None:
        raise NotImplementedError(f"{self.name} has no schema option")

    def key_type(self, column: str) -> str:
        """Column type of an indexed text column (MySQL cannot index TEXT without a length)."""
        return self.text_type

    def new(self, column: str) -> str:
        """The incoming value of ``column`` inside the upsert's update clause."""
        return f"excluded.{column}"

    def old(self, column: str) -> str:
        """The stored value of ``column`` inside the upsert's update clause."""
        return f"cur.{column}"

    def upsert(self, table: str, columns: Sequence[str], key: Sequence[str], assignments: Sequence[tuple[str, str]],
               guard: str | None = None, json_columns: Sequence[str] = ()) -> str:
        """``INSERT`` one row, or on a key conflict apply ``assignments`` (column, expression over ``new``/``old``),
        only when the incoming ``guard`` column is >= the stored one (or the stored one is NULL)."""
        condition = f" WHERE {self.guard_condition(guard)}" if guard else ""
        sets = ", ".join(f"{column} = {expression}" for column, expression in assignments)
        return (f"{self._insert(table, columns, json_columns, alias=' AS cur')} "
                f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}{condition}")

    def guard_condition(self, guard: str) -> str:
        return f"({self.old(guard)} IS NULL OR {self.new(guard)} >= {self.old(guard)})"

    def _insert(self, table: str, columns: Sequence[str], json_columns: Sequence[str], alias: str = "") -> str:
        values = ", ".join(self.json_param.format(self.placeholder) if c in json_columns else self.placeholder
                           for c in columns)
        return f"INSERT INTO {table}{alias} ({', '.join(columns)}) VALUES ({values})"


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
    supports_schema = True
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

    def ensure_schema(self, connection: Any, schema: str) -> None:
        """Create it only when absent: CREATE SCHEMA IF NOT EXISTS needs the database's CREATE right even when the
        schema exists, which a role limited to an existing schema lacks."""
        if connection.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is None:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")

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


class _MysqlDialect(_Dialect):
    """MySQL 5.7+/8 and MariaDB 10.2+ through PyMySQL: ``ON DUPLICATE KEY UPDATE`` with ``VALUES()`` (understood by
    both; MySQL 8.0.20+ deprecates it in favour of a row alias that MariaDB lacks)."""

    name = "mysql"
    placeholder = "%s"  # plain placeholders only: PyMySQL then sends an executemany as one multi-row INSERT
    json_type = "JSON"  # MySQL validates natively; MariaDB: LONGTEXT CHECK (JSON_VALID(...))
    table_options = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    connect_timeout_s = 10
    key_lengths = {"user_id": 255, "type": 64, "natural_key": 255}
    # Strict: an over-long key or out-of-range number is an error (isolated as permanent), never silently truncated.
    sql_mode = "STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION"
    url_options = ("unix_socket", "ssl_ca")
    _RETRYABLE = {1040: "too many connections", 1053: "server shutting down", 1205: "lock wait timeout",
                  1213: "deadlock", 1317: "query interrupted", 1927: "connection killed", 2002: "cannot connect",
                  2003: "cannot connect", 2006: "server has gone away", 2013: "lost connection",
                  2055: "lost connection", 4031: "disconnected by the server"}
    _FATAL = {1044: "the user has no rights on this database (GRANT CREATE, SELECT, INSERT, UPDATE ON db.*)",
              1045: "access denied: check the user and password in the URL",
              1046: "no database selected: put it in the URL path (mysql://user@host:port/db)",
              1049: "the database does not exist: create it (CREATE DATABASE) or fix the URL path",
              1054: "a column is missing (tables altered?)",
              1071: "index too long: use the DYNAMIC row format (MySQL >= 5.7.9, MariaDB >= 10.2.2)",
              1130: "this host may not connect: grant the user access from this address",
              1142: "the user lacks a table privilege (GRANT CREATE, SELECT, INSERT, UPDATE ON db.*)",
              1143: "the user lacks a column privilege (GRANT SELECT, INSERT, UPDATE ON db.*)",
              1146: "a table is missing (dropped while running?)", 1227: "the user lacks a privilege",
              1286: "the InnoDB storage engine is not available", 1698: "access denied: check the user and password",
              2059: "the server's authentication plugin is not supported by PyMySQL"}
    # Row data rejected: out of range, too long, bad value/charset, NULL, invalid JSON (MySQL 3140, MariaDB 4025).
    _DATA = {1048, 1062, 1264, 1265, 1292, 1300, 1366, 1367, 1406, 1452, 3140, 3141, 3146, 4025}

    def check_url(self, url: str) -> None:
        self._connect_args(url)

    def connect(self, url: str) -> Any:
        import pymysql

        try:
            connection = pymysql.connect(**self._connect_args(url), charset="utf8mb4", autocommit=True,
                                         connect_timeout=self.connect_timeout_s)
        except pymysql.Error as exc:
            raise self.classify(exc, url) from exc
        lock_wait_s = max(1, math.ceil(self.lock_timeout_s))  # both variables take whole seconds
        try:
            self.execute(connection, f"SET SESSION sql_mode = '{self.sql_mode}', "
                                     f"innodb_lock_wait_timeout = {lock_wait_s}, lock_wait_timeout = {lock_wait_s}")
        except pymysql.Error as exc:
            _close_quietly(connection)
            raise self.classify(exc, url) from exc
        return connection

    def _connect_args(self, url: str) -> dict[str, Any]:
        parsed = urlparse(url)
        database = unquote(parsed.path.lstrip("/"))
        if not database:
            raise FatalError(f"mysql url {_redact(url)!r} names no database; use mysql://user:password@host:port/db")
        options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(options) - set(self.url_options)
        if unknown:
            raise FatalError(f"mysql url {_redact(url)!r}: unsupported option(s) {sorted(unknown)}; "
                             f"supported: {', '.join(self.url_options)}")
        args: dict[str, Any] = {"host": parsed.hostname or "localhost", "port": parsed.port or 3306,
                                "user": unquote(parsed.username or ""), "password": unquote(parsed.password or ""),
                                "database": database, "unix_socket": options.get("unix_socket")}
        if "ssl_ca" in options:
            args["ssl"] = {"ca": options["ssl_ca"]}
        return args

    def begin(self, connection: Any) -> None:
        self.execute(connection, "START TRANSACTION")

    def execute(self, connection: Any, sql: str, params: Sequence[Any] = ()) -> None:
        with connection.cursor() as cursor:
            cursor.execute(sql, tuple(params) or None)  # None: no %-interpolation of the statement

    def key_type(self, column: str) -> str:
        return f"VARCHAR({self.key_lengths[column]})"

    def new(self, column: str) -> str:
        return f"VALUES({column})"

    def old(self, column: str) -> str:
        return column  # inside ON DUPLICATE KEY UPDATE a bare column is the stored value (until it is assigned)

    def upsert(self, table: str, columns: Sequence[str], key: Sequence[str], assignments: Sequence[tuple[str, str]],
               guard: str | None = None, json_columns: Sequence[str] = ()) -> str:
        """No WHERE here: guard each assignment, and assign the guard column LAST. MySQL evaluates the assignments
        left to right and a later expression sees the columns already assigned, so assigning it earlier would make
        the remaining guards compare the incoming value with itself (always true)."""
        if guard:
            condition = self.guard_condition(guard)
            ordered = [a for a in assignments if a[0] != guard] + [a for a in assignments if a[0] == guard]
            assignments = [(column, f"IF({condition}, {expression}, {column})") for column, expression in ordered]
        sets = ", ".join(f"{column} = {expression}" for column, expression in assignments)
        return f"{self._insert(table, columns, json_columns)} ON DUPLICATE KEY UPDATE {sets}"

    def classify(self, exc: BaseException, url: str) -> Exception:
        import pymysql

        where = _redact(url)
        code = exc.args[0] if isinstance(exc, pymysql.Error) and exc.args and isinstance(exc.args[0], int) else None
        if code in self._FATAL:
            return FatalError(f"mysql {where}: {self._FATAL[code]}: {exc}")
        if code in self._RETRYABLE:
            return RetryableError(f"mysql {where} transient error ({self._RETRYABLE[code]}): {exc}")
        if code in self._DATA or isinstance(exc, pymysql.DataError | pymysql.IntegrityError | OverflowError
                                            | ValueError | TypeError | UnicodeError):
            return _DataError(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, pymysql.InterfaceError):  # used after the connection broke: reconnect
            return RetryableError(f"mysql {where} connection unusable: {exc!r}")
        if isinstance(exc, pymysql.ProgrammingError | pymysql.NotSupportedError):
            return FatalError(f"mysql {where}: statement rejected: {exc}")
        return RetryableError(f"mysql {where}: {type(exc).__name__}: {exc}")


_DIALECTS: dict[str, type[_Dialect]] = {
    "sqlite": _SqliteDialect,
    "postgresql": _PostgresDialect,
    "postgres": _PostgresDialect,
    "mysql": _MysqlDialect,
    "mariadb": _MysqlDialect,
}


# ======================================================================================================================
# Layouts: which tables, and how an event maps to their rows
# ======================================================================================================================
class _Layout(ABC):
    """The two tables written and the mapping of an event to (users row, records row)."""

    def __init__(self, users_table: str, records_table: str) -> None:
        self.users_table = users_table
        self.records_table = records_table

    @abstractmethod
    def create_tables(self, dialect: _Dialect) -> list[str]:
        """CREATE TABLE IF NOT EXISTS statements, users first."""

    def migrate(self, dialect: _Dialect, connection: Any) -> None:  # noqa: B027 - optional
        """Bring tables created by someone else up to what ``upsert_records`` needs (inside the DDL transaction)."""

    @abstractmethod
    def upsert_users(self, dialect: _Dialect) -> str: ...

    @abstractmethod
    def upsert_records(self, dialect: _Dialect) -> str: ...

    @abstractmethod
    def rows_for(self, event: NormalizedEvent) -> tuple[tuple[Any, ...], tuple[Any, ...]]: ...


class _HealthflowLayout(_Layout):
    def create_tables(self, dialect: _Dialect) -> list[str]:
        t, k, options = dialect.text_type, dialect.key_type, dialect.table_options
        return [
            f"CREATE TABLE IF NOT EXISTS {self.users_table} (user_id {k('user_id')} PRIMARY KEY, provider {t}, "
            f"reference_id {t}, created_at {t} NOT NULL){options}",
            f"CREATE TABLE IF NOT EXISTS {self.records_table} (user_id {k('user_id')} NOT NULL, type {k('type')} "
            f"NOT NULL, natural_key {k('natural_key')} NOT NULL, provider {t}, event_id {t} NOT NULL, start_time {t}, "
            f"end_time {t}, ordering_timestamp_ms BIGINT NOT NULL, payload {dialect.json_type} NOT NULL, "
            f"updated_at {t} NOT NULL, PRIMARY KEY (user_id, type, natural_key)){options}",
        ]

    def upsert_users(self, dialect: _Dialect) -> str:
        """Insert users once; later events only fill a missing reference_id and refresh provider."""
        return dialect.upsert(self.users_table, USER_COLUMNS, ("user_id",), [
            ("provider", dialect.new("provider")),
            ("reference_id", f"COALESCE({dialect.new('reference_id')}, {dialect.old('reference_id')})"),
        ])

    def upsert_records(self, dialect: _Dialect) -> str:
        """Insert or replace by natural key, only when the incoming ordering timestamp is >= the stored one."""
        updates = [(c, dialect.new(c)) for c in RECORD_COLUMNS if c not in RECORD_KEY]
        return dialect.upsert(self.records_table, RECORD_COLUMNS, RECORD_KEY, updates, guard=GUARD_COLUMN,
                              json_columns=("payload",))

    def rows_for(self, event: NormalizedEvent) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        now = _utc_now_iso()
        metadata = event.data.get("metadata") or {}
        user = (event.user_id, event.provider, event.user.get("reference_id"), now)
        record = (event.user_id, event.type, event.natural_key, event.provider, event.event_id,
                  metadata.get("start_time"), metadata.get("end_time"), _ordering_timestamp(event),
                  _payload_json(event), now)
        return user, record


class _TerraLayout(_Layout):
    """Terra's Supabase tables plus ``payload`` / ``ordering_timestamp_ms`` (see the module docstring)."""

    extra_columns = (("payload", "JSONB"), ("ordering_timestamp_ms", "BIGINT"))

    def create_tables(self, dialect: _Dialect) -> list[str]:
        return [
            f"CREATE TABLE IF NOT EXISTS {self.users_table} (user_id TEXT PRIMARY KEY, reference_id TEXT, "
            f"created_at TIMESTAMPTZ, granted_scopes TEXT, provider TEXT, state TEXT)",
            f"CREATE TABLE IF NOT EXISTS {self.records_table} (payload_id TEXT PRIMARY KEY, user_id TEXT NOT NULL "
            f"REFERENCES {self.users_table} ON DELETE CASCADE ON UPDATE CASCADE, data_type TEXT, "
            f"created_at TIMESTAMPTZ, start_time TIMESTAMPTZ, end_time TIMESTAMPTZ, payload JSONB, "
            f"ordering_timestamp_ms BIGINT)",
        ]

    def migrate(self, dialect: _Dialect, connection: Any) -> None:
        """A table Terra (or an older deployment) created lacks our two extra columns: add them. Checked first so
        that the usual case takes no ACCESS EXCLUSIVE lock."""
        present = {name for (name,) in connection.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            [self.records_table]).fetchall()}
        for column, column_type in self.extra_columns:
            if column not in present:
                connection.execute(f"ALTER TABLE {self.records_table} ADD COLUMN IF NOT EXISTS {column} {column_type}")

    def upsert_users(self, dialect: _Dialect) -> str:
        """Insert with state 'active'; later events refresh provider, fill reference_id / granted_scopes, and leave
        state (owned by auth events) and created_at alone."""
        new, old = dialect.new, dialect.old
        return dialect.upsert(self.users_table, TERRA_USER_COLUMNS, ("user_id",), [
            ("provider", new("provider")),
            ("reference_id", f"COALESCE({new('reference_id')}, {old('reference_id')})"),
            ("granted_scopes", f"COALESCE({new('granted_scopes')}, {old('granted_scopes')})"),
            ("state", f"COALESCE({old('state')}, {new('state')})"),
        ])

    def upsert_records(self, dialect: _Dialect) -> str:
        updates = [(c, dialect.new(c)) for c in ("created_at", "start_time", "end_time", "payload", GUARD_COLUMN)]
        return dialect.upsert(self.records_table, TERRA_PAYLOAD_COLUMNS, ("payload_id",), updates,
                              guard=GUARD_COLUMN, json_columns=("payload",))

    def rows_for(self, event: NormalizedEvent) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        now = datetime.now(UTC)
        metadata = event.data.get("metadata") or {}
        scopes = event.user.get("scopes")
        if isinstance(scopes, list | tuple):  # V3 connections list them; TerraUser has a comma-separated string
            scopes = ",".join(scopes)
        user = (event.user_id, event.user.get("reference_id"), _timestamptz(event.user.get("created_at")) or now,
                scopes, event.provider, "active")
        record = (terra_payload_id(event.user_id, event.type, event.natural_key), event.user_id, event.type, now,
                  _timestamptz(metadata.get("start_time")), _timestamptz(metadata.get("end_time")),
                  _payload_json(event), _ordering_timestamp(event))
        return user, record


# ======================================================================================================================
# The sink
# ======================================================================================================================
class SqlSink(Sink):
    """Upserts records by (user_id, type, natural_key) with a newest-wins guard; see the module docstring.

    ``table_prefix`` defaults to ``healthflow_`` (healthflow layout) or nothing (terra layout); ``schema`` qualifies
    the tables and is created if absent (PostgreSQL only).
    """

    ordered = True  # and order-independent: the guard keeps the newest version whatever the arrival order

    def __init__(self, name: str, url: str, table_prefix: str | None = None, lock_timeout_s: float = 10.0, *,
                 layout: str = "healthflow", schema: str | None = None) -> None:
        super().__init__(name)
        scheme = urlparse(url or "").scheme.split("+")[0]
        if scheme not in _DIALECTS:
            raise FatalError(f"sql sink {name!r}: unsupported url scheme {scheme!r} in {_redact(url)!r}; use "
                             f"sqlite:///path.db, postgresql://user@host:port/db or mysql://user@host:port/db")
        if layout not in LAYOUTS:
            raise FatalError(f"sql sink {name!r}: layout must be one of {LAYOUTS}, got {layout!r}")
        if table_prefix is None:
            table_prefix = DEFAULT_TABLE_PREFIX if layout == "healthflow" else ""
        if not _PREFIX_PATTERN.match(table_prefix) and not (table_prefix == "" and layout == "terra"):
            raise FatalError(f"sql sink {name!r}: table_prefix must match {_PREFIX_PATTERN.pattern}, "
                             f"got {table_prefix!r}")
        dialect = _DIALECTS[scheme](lock_timeout_s)
        if layout == "terra" and dialect.name != "postgresql":
            raise FatalError(f"sql sink {name!r}: layout 'terra' (Supabase) needs a postgresql:// url, got {scheme!r}")
        if schema is not None and not (dialect.supports_schema and _SCHEMA_PATTERN.match(schema)):
            raise FatalError(f"sql sink {name!r}: schema must match {_SCHEMA_PATTERN.pattern} and needs a "
                             f"postgresql:// url; got {schema!r} for {scheme!r}")
        dialect.check_url(url)
        self.url = url
        self.layout = layout
        self.schema = schema
        self.table_prefix = table_prefix
        qualifier = f"{schema}." if schema else ""
        base = ("users", "records") if layout == "healthflow" else ("terra_users", "terra_data_payloads")
        self.users_table, self.records_table = (f"{qualifier}{table_prefix}{table}" for table in base)
        layout_class = _HealthflowLayout if layout == "healthflow" else _TerraLayout
        self._layout: _Layout = layout_class(self.users_table, self.records_table)
        self._dialect = dialect
        self._connection: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_connection"] = None
        return state

    def open(self) -> None:
        """Connect and create the schema and tables if absent. Raises RetryableError / FatalError."""
        if self._connection is not None:
            return
        dialect = self._dialect
        connection = dialect.connect(self.url)
        try:
            dialect.begin(connection)  # MySQL commits implicitly at each CREATE TABLE: harmless (IF NOT EXISTS)
            dialect.lock_for_ddl(connection, self.records_table)
            if self.schema:
                dialect.ensure_schema(connection, self.schema)
            for statement in self._layout.create_tables(dialect):
                dialect.execute(connection, statement)
            self._layout.migrate(dialect, connection)
            dialect.execute(connection, "COMMIT")
        except Exception as exc:
            _close_quietly(connection)
            error = dialect.classify(exc, self.url)
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
                rows.append((event, *self._layout.rows_for(event)))
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
        connection, dialect = self._connection, self._dialect
        try:
            dialect.begin(connection)
            cursor = connection.cursor()
            cursor.executemany(self._layout.upsert_users(dialect), [user for _, user, _ in rows])
            cursor.executemany(self._layout.upsert_records(dialect), [record for _, _, record in rows])
            dialect.execute(connection, "COMMIT")
        except Exception as exc:
            error = dialect.classify(exc, self.url)
            if not self._rollback():
                self.close()  # connection is unusable: reconnect on the next write
            raise error from exc

    def _rollback(self) -> bool:
        """Roll back the failed transaction; False when the connection is no longer usable."""
        try:
            self._dialect.execute(self._connection, "ROLLBACK")
            return True
        except Exception:  # connection lost, or no transaction was open (then reconnecting is harmless)
            return False


class SupabaseSink(SqlSink):
    """``SqlSink`` with Terra's Supabase layout: ``SupabaseSink(name, postgresql_url, schema=None)``."""

    def __init__(self, name: str, url: str, table_prefix: str | None = None, lock_timeout_s: float = 10.0, *,
                 schema: str | None = None) -> None:
        super().__init__(name, url, table_prefix, lock_timeout_s, layout="terra", schema=schema)


# ======================================================================================================================
# Helpers
# ======================================================================================================================
def _payload_json(event: NormalizedEvent) -> str:
    return json.dumps(event.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _ordering_timestamp(event: NormalizedEvent) -> int:
    value = event.ordering_timestamp_ms
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"ordering_timestamp_ms must be an integer, got {value!r}")
    return value


def _timestamptz(value: Any) -> datetime | None:
    """An ISO-8601 string as an aware datetime; without an offset (user-local time) it is taken as UTC."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"timestamp must be an ISO-8601 string, got {value!r}")
    parsed = datetime.fromisoformat(value)  # ValueError -> the event is dead-lettered as unmappable
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


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
