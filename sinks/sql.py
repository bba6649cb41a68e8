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
- A batch is written in one transaction (executemany, in the batch's order; a users row equal to its user's previous
  one in the batch is left out, since it would change nothing); a row is replaced only when the incoming
  ``ordering_timestamp_ms >= stored``: a stale redelivery never overwrites newer data, an equal one is idempotent.
  MySQL has no ``WHERE`` on ``ON DUPLICATE KEY UPDATE``: each column becomes ``IF(guard, VALUES(c), c)`` and, since
  MySQL assigns left to right and later expressions see earlier assignments, ``ordering_timestamp_ms`` is assigned
  last so every guard compares with the stored value.
- Tombstones (``event.deleted``): ``on_delete="hard"`` (default) deletes the record's row, ``on_delete="soft"`` keeps
  it and sets ``deleted_at`` (with the tombstone's ``event_id`` / ``ordering_timestamp_ms``; newer data clears it), in
  both cases only when the tombstone's ordering timestamp is >= the stored one; deleting what is gone is a no-op.
  Upserts and deletes of a batch run in the batch's order, in its one transaction. ``deleted_at`` (text in the
  healthflow layout, TIMESTAMPTZ in Terra's) is created with the tables, or added to existing ones when missing;
  wherever the table has it, every upsert clears it, in either mode (a destination switched back from soft to hard
  leaves no re-created row marked deleted).
- Lock waits are bounded by ``lock_timeout_s`` (SQLite busy timeout, Postgres ``lock_timeout``, MySQL
  ``innodb_lock_wait_timeout`` / ``lock_wait_timeout`` rounded up to whole seconds).
- Failures: connection loss, lock/busy timeouts, serialization failures, deadlocks -> ``RetryableError`` for the batch
  (a lost connection is reopened on the next write);
  bad data -> the batch is retried row by row and only the offending events get ``PermanentError``; bad credentials,
  missing database, missing rights -> ``FatalError`` saying what to fix.

Database differences (connect, transactions, column types, DDL lock, error classification, password redaction) live
in ``core.sql``'s dialects, shared with the control-plane store; this module keeps the tables: the two ``_Layout``
classes (table shapes, row mapping) and the two upsert syntaxes (``_Upsert``).
"""

from __future__ import annotations

import itertools
import json
import operator
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent, canonical_json
from core.secrets import missing, redact, resolve
from core.sql import SqlDialect, close_quietly, dialect_for, url_scheme
from sinks.base import Sink, SinkResult

DEFAULT_TABLE_PREFIX = "healthflow_"
CONNECT_TIMEOUT_S = 10
LAYOUTS = ("healthflow", "terra")
_PREFIX_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_SCHEMA_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

USER_COLUMNS = ("user_id", "provider", "reference_id", "created_at")
RECORD_COLUMNS = ("user_id", "type", "natural_key", "provider", "event_id", "start_time", "end_time",
                  "ordering_timestamp_ms", "payload", "updated_at")
RECORD_KEY = ("user_id", "type", "natural_key")
KEY_LENGTHS = {"user_id": 255, "type": 64, "natural_key": 255}  # characters, where a key column cannot be TEXT
GUARD_COLUMN = "ordering_timestamp_ms"

TERRA_USER_COLUMNS = ("user_id", "reference_id", "created_at", "granted_scopes", "provider", "state")
TERRA_PAYLOAD_COLUMNS = ("payload_id", "user_id", "data_type", "created_at", "start_time", "end_time", "payload",
                         "ordering_timestamp_ms")
_TERRA_PAYLOAD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "healthflow:terra_data_payloads")


def terra_payload_id(user_id: str, data_type: str, natural_key: str) -> str:
    """The ``terra_data_payloads.payload_id`` of a record: a UUIDv5 of (user, type, natural key), stable across
    updates and redeliveries so the row is upserted in place."""
    return str(uuid.uuid5(_TERRA_PAYLOAD_NAMESPACE, canonical_json([user_id, data_type, natural_key]).decode()))


_Row = tuple[NormalizedEvent, tuple[Any, ...] | None, tuple[Any, ...]]  # (event, users row, records row)
ON_DELETE = ("hard", "soft")
DELETED_COLUMN = "deleted_at"


# ======================================================================================================================
# Upserts: the two syntaxes (the rest of what differs between databases is core.sql's dialects)
# ======================================================================================================================
class _Upsert:
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET ... WHERE guard`` (SQLite, PostgreSQL)."""

    def __init__(self, dialect: SqlDialect) -> None:
        self.dialect = dialect

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
        placeholder, json_param = self.dialect.placeholder, self.dialect.json_param
        values = ", ".join(json_param.format(placeholder) if c in json_columns else placeholder for c in columns)
        return f"INSERT INTO {table}{alias} ({', '.join(columns)}) VALUES ({values})"


class _OnDuplicateKeyUpsert(_Upsert):
    """MySQL/MariaDB: ``ON DUPLICATE KEY UPDATE`` with ``VALUES()`` (understood by both; MySQL 8.0.20+ deprecates it
    in favour of a row alias that MariaDB lacks)."""

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


_UPSERTS: dict[str, type[_Upsert]] = {"on conflict": _Upsert, "on duplicate key": _OnDuplicateKeyUpsert}


def _upsert(dialect: SqlDialect) -> _Upsert:
    return _UPSERTS[dialect.upsert_syntax](dialect)


# ======================================================================================================================
# Layouts: which tables, and how an event maps to their rows
# ======================================================================================================================
_USER_UPDATES = {  # how a users column changes when the user exists; each is idempotent (twice = once)
    "new": "{new}",
    "new if set": "COALESCE({new}, {old})",
    "old if set": "COALESCE({old}, {new})",
}


class _Layout(ABC):
    """The two tables written and the mapping of an event to (users row, records row)."""

    user_columns: tuple[str, ...]  # user_id first
    user_updates: tuple[tuple[str, str], ...]  # (column, how: a key of _USER_UPDATES); other columns: insert only

    def __init__(self, users_table: str, records_table: str, soft_delete: bool = False) -> None:
        self.users_table = users_table
        self.records_table = records_table
        self.soft_delete = soft_delete
        self.deleted_column_present = soft_delete  # learnt by ``migrate``: upserts then clear it, in either mode
        updated = {"user_id", *(column for column, _ in self.user_updates)}
        self._user_changes = operator.itemgetter(*(i for i, c in enumerate(self.user_columns) if c in updated))

    @abstractmethod
    def create_tables(self, dialect: SqlDialect) -> list[str]:
        """CREATE TABLE IF NOT EXISTS statements, users first."""

    def migrate(self, dialect: SqlDialect, connection: Any) -> None:
        """Bring tables created by someone else (or before soft deletes) up to what ``upsert_records`` needs, inside
        the DDL transaction: with ``soft_delete``, a ``deleted_at`` column is added when missing. Notes whether the
        table has ``deleted_at`` (``deleted_column_present``)."""
        present = DELETED_COLUMN in _columns(connection, self.records_table)
        if self.soft_delete and not present:
            dialect.execute(connection, f"ALTER TABLE {self.records_table} ADD COLUMN {DELETED_COLUMN} "
                                        f"{self.deleted_type(dialect)}")
        self.deleted_column_present = self.soft_delete or present

    def deleted_type(self, dialect: SqlDialect) -> str:
        return dialect.text_type

    def deleted_column(self, dialect: SqlDialect) -> str:
        """The ``deleted_at`` column's DDL for CREATE TABLE (nothing without ``soft_delete``)."""
        return f", {DELETED_COLUMN} {self.deleted_type(dialect)}" if self.soft_delete else ""

    @abstractmethod
    def delete_records(self, dialect: SqlDialect) -> str:
        """Hard: delete the record's row; soft: set its ``deleted_at`` (and ordering timestamp); either only when the
        tombstone's ordering timestamp is >= the stored one (idempotent: a second time finds nothing or the same)."""

    @abstractmethod
    def delete_row(self, event: NormalizedEvent) -> tuple[Any, ...]:
        """The parameters of ``delete_records`` for a tombstone."""

    def upsert_users(self, dialect: SqlDialect) -> str:
        """Insert the user, or apply ``user_updates``."""
        upsert = _upsert(dialect)
        return upsert.upsert(self.users_table, self.user_columns, ("user_id",), [
            (column, _USER_UPDATES[how].format(new=upsert.new(column), old=upsert.old(column)))
            for column, how in self.user_updates])

    def distinct_users(self, users: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``users`` (in order) without the rows that cannot change anything: one equal (same values, same types)
        in its key and updated columns to the last row kept for its user. The updates are idempotent and the other
        columns are written only by the insert, which that earlier row did; a batch's events mostly repeat their
        user's row."""
        kept: list[tuple[Any, ...]] = []
        last: dict[Any, tuple[Any, ...]] = {}
        for row in users:
            values = self._user_changes(row)
            seen = (values, tuple(map(type, values)))
            if last.get(values[0]) != seen:
                last[values[0]] = seen
                kept.append(row)
        return kept

    @abstractmethod
    def upsert_records(self, dialect: SqlDialect) -> str: ...

    @abstractmethod
    def rows_for(self, event: NormalizedEvent) -> tuple[tuple[Any, ...], tuple[Any, ...]]: ...


class _HealthflowLayout(_Layout):
    user_columns = USER_COLUMNS
    user_updates = (("provider", "new"), ("reference_id", "new if set"))  # reference_id: filled once known

    def create_tables(self, dialect: SqlDialect) -> list[str]:
        t, options = dialect.text_type, dialect.table_options

        def k(column: str) -> str:
            return dialect.key_type(KEY_LENGTHS[column])

        return [
            f"CREATE TABLE IF NOT EXISTS {self.users_table} (user_id {k('user_id')} PRIMARY KEY, provider {t}, "
            f"reference_id {t}, created_at {t} NOT NULL){options}",
            f"CREATE TABLE IF NOT EXISTS {self.records_table} (user_id {k('user_id')} NOT NULL, type {k('type')} "
            f"NOT NULL, natural_key {k('natural_key')} NOT NULL, provider {t}, event_id {t} NOT NULL, start_time {t}, "
            f"end_time {t}, ordering_timestamp_ms BIGINT NOT NULL, payload {dialect.json_type} NOT NULL, "
            f"updated_at {t} NOT NULL{self.deleted_column(dialect)}, PRIMARY KEY (user_id, type, natural_key))"
            f"{options}",
        ]

    @property
    def record_columns(self) -> tuple[str, ...]:
        return (*RECORD_COLUMNS, DELETED_COLUMN) if self.deleted_column_present else RECORD_COLUMNS

    def upsert_records(self, dialect: SqlDialect) -> str:
        """Insert or replace by natural key, only when the incoming ordering timestamp is >= the stored one."""
        upsert = _upsert(dialect)
        updates = [(c, upsert.new(c)) for c in self.record_columns if c not in RECORD_KEY]
        return upsert.upsert(self.records_table, self.record_columns, RECORD_KEY, updates, guard=GUARD_COLUMN,
                              json_columns=("payload",))

    def delete_records(self, dialect: SqlDialect) -> str:
        where = f"user_id = ? AND type = ? AND natural_key = ? AND {GUARD_COLUMN} <= ?"
        if self.soft_delete:
            return dialect.placeholders(f"UPDATE {self.records_table} SET {DELETED_COLUMN} = ?, event_id = ?, "
                                        f"{GUARD_COLUMN} = ?, updated_at = ? WHERE {where}")
        return dialect.placeholders(f"DELETE FROM {self.records_table} WHERE {where}")

    def delete_row(self, event: NormalizedEvent) -> tuple[Any, ...]:
        key = (event.user_id, event.type, event.natural_key, _ordering_timestamp(event))
        if self.soft_delete:
            now = _utc_now_iso()
            return (now, event.event_id, event.ordering_timestamp_ms, now, *key)
        return key

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
    user_columns = TERRA_USER_COLUMNS
    # inserted with state 'active'; later events refresh provider, fill reference_id / granted_scopes, and leave
    # state (owned by auth events) and created_at alone
    user_updates = (("provider", "new"), ("reference_id", "new if set"), ("granted_scopes", "new if set"),
                    ("state", "old if set"))

    def create_tables(self, dialect: SqlDialect) -> list[str]:
        return [
            f"CREATE TABLE IF NOT EXISTS {self.users_table} (user_id TEXT PRIMARY KEY, reference_id TEXT, "
            f"created_at TIMESTAMPTZ, granted_scopes TEXT, provider TEXT, state TEXT)",
            f"CREATE TABLE IF NOT EXISTS {self.records_table} (payload_id TEXT PRIMARY KEY, user_id TEXT NOT NULL "
            f"REFERENCES {self.users_table} ON DELETE CASCADE ON UPDATE CASCADE, data_type TEXT, "
            f"created_at TIMESTAMPTZ, start_time TIMESTAMPTZ, end_time TIMESTAMPTZ, payload JSONB, "
            f"ordering_timestamp_ms BIGINT{self.deleted_column(dialect)})",
        ]

    def deleted_type(self, dialect: SqlDialect) -> str:
        return "TIMESTAMPTZ"

    def migrate(self, dialect: SqlDialect, connection: Any) -> None:
        """A table Terra (or an older deployment) created lacks our two extra columns: add them. Checked first so
        that the usual case takes no ACCESS EXCLUSIVE lock."""
        present = {name for (name,) in connection.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            [self.records_table]).fetchall()}
        extra = [*self.extra_columns, *([(DELETED_COLUMN, "TIMESTAMPTZ")] if self.soft_delete else [])]
        for column, column_type in extra:
            if column not in present:
                connection.execute(f"ALTER TABLE {self.records_table} ADD COLUMN IF NOT EXISTS {column} {column_type}")
        self.deleted_column_present = self.soft_delete or DELETED_COLUMN in present

    def upsert_records(self, dialect: SqlDialect) -> str:
        upsert = _upsert(dialect)
        updated = ("created_at", "start_time", "end_time", "payload", GUARD_COLUMN)
        columns = TERRA_PAYLOAD_COLUMNS
        if self.deleted_column_present:
            updated, columns = (*updated, DELETED_COLUMN), (*columns, DELETED_COLUMN)
        updates = [(c, upsert.new(c)) for c in updated]
        return upsert.upsert(self.records_table, columns, ("payload_id",), updates,
                              guard=GUARD_COLUMN, json_columns=("payload",))

    def delete_records(self, dialect: SqlDialect) -> str:
        where = f"payload_id = ? AND ({GUARD_COLUMN} IS NULL OR {GUARD_COLUMN} <= ?)"
        if self.soft_delete:
            return dialect.placeholders(f"UPDATE {self.records_table} SET {DELETED_COLUMN} = ?, {GUARD_COLUMN} = ? "
                                        f"WHERE {where}")
        return dialect.placeholders(f"DELETE FROM {self.records_table} WHERE {where}")

    def delete_row(self, event: NormalizedEvent) -> tuple[Any, ...]:
        key = (terra_payload_id(event.user_id, event.type, event.natural_key), _ordering_timestamp(event))
        return (datetime.now(UTC), event.ordering_timestamp_ms, *key) if self.soft_delete else key

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
# One name for every SQL destination's CREATE SCHEMA/TABLE in a database: destinations with different table prefixes
# may share a schema (PostgreSQL advisory locks are per database; MySQL's GET_LOCK names per server, still correct).
DDL_LOCK = "healthflow-sql-destination-ddl"


class SqlSink(Sink):
    """Upserts records by (user_id, type, natural_key) with a newest-wins guard; see the module docstring.

    ``table_prefix`` defaults to ``healthflow_`` (healthflow layout) or nothing (terra layout); ``schema`` qualifies
    the tables and is created if absent (PostgreSQL only).
    """

    ordered = True  # and order-independent: the guard keeps the newest version whatever the arrival order

    def __init__(self, name: str, url: str, table_prefix: str | None = None, lock_timeout_s: float = 10.0, *,
                 layout: str = "healthflow", schema: str | None = None, on_delete: str = "hard") -> None:
        super().__init__(name)
        known = resolve(url, f"sql sink {name!r}") if not missing(url) else url  # checks see what ${VAR} names
        scheme = url_scheme(known)
        dialect = dialect_for(url, f"sql sink {name!r}", lock_timeout_s=lock_timeout_s,
                              connect_timeout_s=CONNECT_TIMEOUT_S)
        if layout not in LAYOUTS:
            raise FatalError(f"sql sink {name!r}: layout must be one of {LAYOUTS}, got {layout!r}")
        if table_prefix is None:
            table_prefix = DEFAULT_TABLE_PREFIX if layout == "healthflow" else ""
        if not _PREFIX_PATTERN.match(table_prefix) and not (table_prefix == "" and layout == "terra"):
            raise FatalError(f"sql sink {name!r}: table_prefix must match {_PREFIX_PATTERN.pattern}, "
                             f"got {table_prefix!r}")
        if layout == "terra" and dialect.name != "postgres":
            raise FatalError(f"sql sink {name!r}: layout 'terra' (Supabase) needs a postgresql:// url, got {scheme!r}")
        if schema is not None and not (dialect.supports_schema and _SCHEMA_PATTERN.match(schema)):
            raise FatalError(f"sql sink {name!r}: schema must match {_SCHEMA_PATTERN.pattern} and needs a "
                             f"postgresql:// url; got {schema!r} for {scheme!r}")
        if on_delete not in ON_DELETE:
            raise FatalError(f"sql sink {name!r}: on_delete must be one of {ON_DELETE}, got {on_delete!r}")
        dialect.check_url(known)
        self.url = url
        self.on_delete = on_delete
        self.layout = layout
        self.schema = schema
        self.table_prefix = table_prefix
        qualifier = f"{schema}." if schema else ""
        base = ("users", "records") if layout == "healthflow" else ("terra_users", "terra_data_payloads")
        self.users_table, self.records_table = (f"{qualifier}{table_prefix}{table}" for table in base)
        layout_class = _HealthflowLayout if layout == "healthflow" else _TerraLayout
        self._layout: _Layout = layout_class(self.users_table, self.records_table, soft_delete=on_delete == "soft")
        self._dialect = dialect
        self._upserts = self._statements()
        self._connection: Any = None

    def _statements(self) -> tuple[str, str, str]:
        """(users upsert, records upsert, tombstone delete) for the tables as ``open`` found them."""
        dialect = self._dialect
        return (self._layout.upsert_users(dialect), self._layout.upsert_records(dialect),
                self._layout.delete_records(dialect))

    def local_only(self) -> str | None:
        local = self._dialect.name == "sqlite"
        return f"{redact(self.url)} is a file on one machine (give postgresql:// or mysql://)" if local else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_connection"] = None
        return state

    def open(self) -> None:
        """Connect and create the schema and tables if absent. Raises RetryableError / FatalError."""
        if self._connection is not None:
            return
        dialect = self._dialect
        connection = dialect.connect(self.url, f"destination {self.name}")
        try:
            dialect.begin(connection)  # MySQL commits implicitly at each CREATE TABLE: harmless (IF NOT EXISTS)
            with dialect.ddl_lock(connection, DDL_LOCK):
                if self.schema:
                    dialect.ensure_schema(connection, self.schema)
                for statement in self._layout.create_tables(dialect):
                    dialect.execute(connection, statement)
                self._layout.migrate(dialect, connection)
                dialect.commit(connection)
            self._upserts = self._statements()  # the records upsert clears deleted_at wherever the table has it
        except Exception as exc:
            close_quietly(connection)
            error = dialect.classify(exc, self.url)
            raise (FatalError(f"creating tables failed: {error}") if isinstance(error, PermanentError) else error
                   ) from exc
        self._connection = connection

    def close(self) -> None:
        if self._connection is not None:
            close_quietly(self._connection)
            self._connection = None

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        result = SinkResult()
        rows: list[_Row] = []
        for event in events:
            try:
                rows.append((event, None, self._layout.delete_row(event)) if event.deleted
                            else (event, *self._layout.rows_for(event)))
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                result.fail_all([event], PermanentError(f"cannot map event to a row: {type(exc).__name__}: {exc}"))
        if not rows:
            return result
        try:
            self.open()
            self._write_rows(rows)
        except (RetryableError, FatalError) as exc:
            return result.fail_all([event for event, _, _ in rows], exc)
        except PermanentError:  # some row's data: find which
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
            except PermanentError as exc:
                result.fail_all([event], PermanentError(f"rejected by {self._dialect.name}: {exc}"))
            except (RetryableError, FatalError) as exc:
                result.fail_all([event], exc)
            else:
                result.delivered.append(event.event_id)
        return result

    def _write_rows(self, rows: list[_Row]) -> None:
        """One transaction: users then records (upserts and tombstones' deletes in the batch's order); raises a
        taxonomy error after rolling back (``PermanentError``: the data of some row)."""
        connection, dialect = self._connection, self._dialect
        upsert_users, upsert_records, delete_records = self._upserts
        try:
            dialect.begin(connection)
            cursor = connection.cursor()
            users = [user for _, user, _ in rows if user is not None]
            if users:
                cursor.executemany(upsert_users, self._layout.distinct_users(users))
            clear = (None,) if self._layout.deleted_column_present else ()  # an upsert clears deleted_at
            for deleting, run in itertools.groupby(rows, key=lambda row: row[0].deleted):
                cursor.executemany(delete_records if deleting else upsert_records,
                                   [record if deleting else record + clear for _, _, record in run])
            dialect.commit(connection)
        except Exception as exc:
            error = dialect.classify(exc, self.url)
            if not self._rollback():
                self.close()  # connection is unusable: reconnect on the next write
            raise error from exc

    def _rollback(self) -> bool:
        """Roll back the failed transaction; False when the connection is no longer usable."""
        try:
            self._dialect.rollback(self._connection)
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
# The strict encoder for a payload that may hold NaN or an infinity (json.dumps with options builds one per call);
# without the circular-reference check, a cycle (or too deep nesting) fails as a RecursionError that write() reports
# as an unmappable event.
_PAYLOAD_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                                    check_circular=False)


def _payload_json(event: NormalizedEvent) -> str:
    """The record's canonical JSON, the text its id and body were made of (encoded once per event); a record that
    may hold NaN or an infinity is encoded again strictly, which refuses them (they have no JSON form)."""
    text = event.data_json.decode()
    if "NaN" in text or "Infinity" in text:
        return _PAYLOAD_ENCODER.encode(event.data)
    return text


def _columns(connection: Any, table: str) -> set[str]:
    """The column names of ``table`` (any DB-API connection: from an empty SELECT's description)."""
    cursor = connection.cursor()
    try:
        cursor.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        cursor.fetchall()
        return {column[0].lower() for column in cursor.description}
    finally:
        cursor.close()


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


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

