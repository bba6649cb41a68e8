"""The SQL dialect layer: what differs between SQLite, PostgreSQL and MySQL/MariaDB, in one place.

Every SQL user builds on it: the control-plane store (``core.store.Store``: record state, destination status, user
directory, control plane, poll cursors) and the SQL destination (``sinks.sql``). ``dialect_for(url)`` picks the
dialect by URL scheme:

- ``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite:///:memory:`` (SQLAlchemy convention);
- ``postgresql://user:password@host:port/db`` (also ``postgres://``; libpq query options allowed);
- ``mysql://user:password@host:port/db`` (also ``mariadb://``, ``mysql+pymysql://``; query options ``unix_socket``,
  ``ssl_ca``) through PyMySQL: MySQL 5.7+/8 and MariaDB 10.2+.

A dialect knows how to connect (``${VAR}`` references in the URL are resolved then, from this process's environment,
see ``core.secrets``; connections are in autocommit mode and transactions explicit: ``begin``/``commit``/``rollback``
or ``transaction``), its parameter placeholder (``?`` or ``%s``; ``placeholders`` rewrites ``?``), column types (text,
JSON, indexed key), ``FOR UPDATE``, its upsert syntax, how concurrent ``CREATE ... IF NOT EXISTS`` are serialized
(``ddl_lock``), and how a driver error maps onto the taxonomy of ``core.errors`` (``classify``):

- ``RetryableError``: connection refused or lost, lock/busy timeouts, serialization failures, deadlocks, a host name
  that does not resolve once its URL has connected in this process (a database restarting under docker compose stops
  resolving for a moment) or whose resolver says to try again (``EAI_AGAIN``);
- ``PermanentError``: the data of some row (out of range, too long, bad value, constraint violated, a value over a
  limit of the database such as PostgreSQL's index row size);
- ``FatalError``: bad credentials, missing database, table, column or privilege, a host name that does not resolve
  on its URL's first connection in this process, with what to fix.

Passwords never appear in a message (``core.secrets.redact``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from core.errors import FatalError, PermanentError, RetryableError
from core.secrets import PRIVATE_MODE, missing, redact, resolve

URL_FORMS = "sqlite:///path.db, postgresql://user@host:port/db or mysql://user@host:port/db"

_connected_urls: set[str] = set()  # URLs (as configured, ${VAR} unresolved) that have connected in this process
_NAME_NOT_RESOLVED = ("could not translate host name", "failed to resolve host", "Name or service not known",
                      "nodename nor servname", "No address associated with hostname", "Unknown MySQL server host",
                      "Temporary failure in name resolution")
_RESOLVER_SAYS_RETRY = "Temporary failure in name resolution"  # EAI_AGAIN: the resolver itself is away


def host_not_resolved(exc: BaseException, database: str, where: str, url: str) -> Exception | None:
    """The taxonomy error for a failure to resolve the database's host name, None when ``exc`` is something else.

    A name that never resolved is a typo in the URL: FatalError on its first connection in this process. Once the
    URL has connected, the name going away is an outage (the database's container restarting): RetryableError, as is
    a resolver answering "try again" (``EAI_AGAIN``) at any time."""
    message = str(exc)
    if not any(marker in message for marker in _NAME_NOT_RESOLVED):
        return None
    if _RESOLVER_SAYS_RETRY in message or url in _connected_urls:
        return RetryableError(f"{database} {where} unavailable: its host name does not resolve for now: {exc}")
    return FatalError(f"{database} {where}: cannot resolve the host name: {exc}; fix the host in the URL")


def url_scheme(url: str) -> str:
    """The database part of the URL's scheme: ``mysql+pymysql://`` is ``mysql``."""
    return urlparse(url or "").scheme.split("+")[0]


def dialect_for(url: str, where: str = "database", *, lock_timeout_s: float | None = None,
                connect_timeout_s: int | None = None) -> SqlDialect:
    """The dialect of ``url``'s scheme (nothing is contacted); FatalError for a scheme no dialect speaks.

    ``lock_timeout_s`` bounds lock waits (SQLite busy timeout, PostgreSQL ``lock_timeout``, MySQL
    ``innodb_lock_wait_timeout``/``lock_wait_timeout``); None keeps the server's own (SQLite, which does not wait
    at all without one, then waits ``SqliteDialect.default_busy_timeout_s``). ``connect_timeout_s``: None keeps the
    driver's default."""
    scheme = url_scheme(resolve(url, where) if url and not missing(url) else url)  # ${VAR}: the value's scheme
    if scheme not in DIALECTS:
        raise FatalError(f"{where}: unsupported url scheme {scheme!r} in {redact(url or '')!r}; use {URL_FORMS}")
    return DIALECTS[scheme](lock_timeout_s, connect_timeout_s)


class SqlDialect(ABC):
    """Everything that differs between databases; statements written for a dialect use its ``placeholder``."""

    name: str  # sqlite | postgres | mysql
    placeholder: str
    text_type = "TEXT"
    json_type = "TEXT"
    json_param = "{}"  # how a JSON text parameter is written in SQL, e.g. "CAST({} AS JSONB)"
    table_options = ""  # appended to CREATE TABLE
    for_update = ""  # appended to a SELECT that locks the rows it reads, where the database has row locks
    upsert_syntax = "on conflict"  # INSERT ... ON CONFLICT (key) DO UPDATE; MySQL: "on duplicate key"
    supports_schema = False

    def __init__(self, lock_timeout_s: float | None = None, connect_timeout_s: int | None = None) -> None:
        self.lock_timeout_s = lock_timeout_s
        self.connect_timeout_s = connect_timeout_s

    # ------------------------------------------------------------------ connections
    @property
    @abstractmethod
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception classes (what ``classify`` is for)."""

    def check_url(self, url: str) -> None:  # noqa: B027 - optional
        """Raise ``FatalError`` for a URL that can never work (nothing is contacted)."""

    def connect(self, url: str, where: str = "database", *, embedded: bool = False) -> Any:
        """An open DB-API connection in autocommit mode. ``${VAR}`` references in ``url`` are resolved here (an unset
        one is a FatalError naming ``where``); a failure raises its ``classify`` error. ``embedded``: the caller owns
        an embedded database (SQLite: create the file's directory, and WAL so readers never wait for the writer)."""
        resolved = resolve(url, where)
        try:
            connection = self._open(resolved, embedded)
        except self.driver_errors as exc:
            raise self.classify(exc, url) from exc
        try:
            self._configure(connection, embedded)
        except self.driver_errors as exc:
            close_quietly(connection)
            raise self.classify(exc, url) from exc
        _connected_urls.add(url)
        return connection

    @abstractmethod
    def _open(self, url: str, embedded: bool) -> Any: ...

    def _configure(self, connection: Any, embedded: bool) -> None:  # noqa: B027 - optional
        """Session settings, right after connecting."""

    # ------------------------------------------------------------------ statements and transactions
    def placeholders(self, sql: str) -> str:
        """``sql`` written with ``?`` placeholders, in this dialect's style."""
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def execute(self, connection: Any, sql: str, params: Sequence[Any] = ()) -> None:
        connection.execute(sql, params)

    def begin(self, connection: Any) -> None:
        """Start a write transaction."""
        self.execute(connection, "BEGIN")

    def commit(self, connection: Any) -> None:
        self.execute(connection, "COMMIT")

    def rollback(self, connection: Any) -> None:
        self.execute(connection, "ROLLBACK")

    @contextmanager
    def transaction(self, connection: Any) -> Iterator[Any]:
        """A cursor inside one write transaction: committed when the block ends, rolled back when it raises (a
        failing rollback, e.g. on a lost connection, never masks the error)."""
        self.begin(connection)
        try:
            with contextlib.closing(connection.cursor()) as cursor:
                yield cursor
            self.commit(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                self.rollback(connection)
            raise

    @contextmanager
    def ddl_lock(self, connection: Any, lock_name: str) -> Iterator[None]:
        """Around ``CREATE ... IF NOT EXISTS`` (and migrations) inside a transaction: several workers creating the same
        tables at once take turns (nothing to do where DDL is atomic or writers are serialized anyway, as SQLite's
        ``BEGIN IMMEDIATE``)."""
        yield

    def ensure_schema(self, connection: Any, schema: str) -> None:
        raise NotImplementedError(f"{self.name} has no schema option")

    # ------------------------------------------------------------------ types
    def key_type(self, max_length: int) -> str:
        """Column type of an indexed text column of at most ``max_length`` characters (MySQL cannot index TEXT)."""
        return self.text_type

    # ------------------------------------------------------------------ errors
    @abstractmethod
    def classify(self, exc: BaseException, url: str) -> Exception:
        """The taxonomy error for a driver error (``PermanentError`` when the data of some row caused it); ``url``
        only names the database in the message, redacted."""


class SqliteDialect(SqlDialect):
    name = "sqlite"
    placeholder = "?"
    default_busy_timeout_s = 30.0

    @property
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def check_url(self, url: str) -> None:
        if urlparse(url).netloc:  # sqlite://x.db would silently open a temporary database
            raise FatalError(f"sqlite url {redact(url)!r} names a host; use sqlite:///relative.db or "
                             f"sqlite:////absolute.db")

    def _open(self, url: str, embedded: bool) -> Any:
        path = sqlite_path(url)
        if embedded:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
            # health data and record state: a database this process creates is its owner's alone (0600)
            with contextlib.suppress(FileExistsError, FileNotFoundError):  # a racing worker made it; no folder:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))  # sqlite says so
        timeout = self.default_busy_timeout_s if self.lock_timeout_s is None else self.lock_timeout_s
        return sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)

    def _configure(self, connection: Any, embedded: bool) -> None:
        if embedded:
            connection.execute("PRAGMA journal_mode=WAL")

    def begin(self, connection: Any) -> None:
        connection.execute("BEGIN IMMEDIATE")  # take the write lock now; waits up to the busy timeout

    def classify(self, exc: BaseException, url: str) -> Exception:
        message = str(exc).lower()
        if isinstance(exc, sqlite3.OperationalError):
            if "locked" in message or "busy" in message:
                return RetryableError(f"sqlite database busy: {exc}")
            if any(s in message for s in ("unable to open", "readonly", "no such table", "no such column",
                                          "not authorized", "permission")):
                return FatalError(f"sqlite {sqlite_path(url)!r}: {exc}; check the path exists, is writable, "
                                  f"and the tables were not altered")
            return RetryableError(f"sqlite error: {exc}")
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError
                      | OverflowError | ValueError | TypeError):
            return PermanentError(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in message:
            return FatalError(f"{sqlite_path(url)!r} is not a SQLite database: {exc}")
        return RetryableError(f"sqlite error: {type(exc).__name__}: {exc}")


class PostgresDialect(SqlDialect):
    name = "postgres"
    placeholder = "%s"
    json_type = "JSONB"
    json_param = "CAST({} AS JSONB)"
    for_update = " FOR UPDATE"
    supports_schema = True
    _FATAL_STATES = {"42501": "the role lacks a privilege (grant CREATE/INSERT/UPDATE/SELECT)",
                     "3D000": "the database does not exist", "3F000": "the schema does not exist",
                     "42P01": "a table is missing", "42703": "a column is missing (tables altered?)"}
    _CONNECT_FATAL = ("does not exist", "authentication failed", "no pg_hba.conf entry", "permission denied",
                      "password", "invalid connection option", "invalid integer value")  # others: outages

    @property
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)

    def _open(self, url: str, embedded: bool) -> Any:
        import psycopg

        timeout = {} if self.connect_timeout_s is None else {"connect_timeout": self.connect_timeout_s}
        return psycopg.connect(url, autocommit=True, **timeout)

    def _configure(self, connection: Any, embedded: bool) -> None:
        if self.lock_timeout_s is not None:
            connection.execute(f"SET lock_timeout = {int(self.lock_timeout_s * 1000)}")

    @contextmanager
    def ddl_lock(self, connection: Any, lock_name: str) -> Iterator[None]:
        """PostgreSQL's IF NOT EXISTS is not atomic: concurrent creators collide in its catalog, so they take turns
        under a transaction-level advisory lock (released when the transaction ends)."""
        connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [lock_name])
        yield

    def ensure_schema(self, connection: Any, schema: str) -> None:
        """Create it only when absent: CREATE SCHEMA IF NOT EXISTS needs the database's CREATE right even when the
        schema exists, which a role limited to an existing schema lacks."""
        if connection.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is None:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")

    def classify(self, exc: BaseException, url: str) -> Exception:
        import psycopg

        where = redact(url)
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith("28") or state in self._FATAL_STATES:
            reason = self._FATAL_STATES.get(state, "authentication failed (check user/password/pg_hba.conf)")
            return FatalError(f"postgres {where}: {reason}: {exc}")
        if state[:2] in ("08", "40", "53", "57", "58") or state == "55P03":
            return RetryableError(f"postgres {where} transient error {state}: {exc}")
        if state[:2] in ("22", "23", "54") or isinstance(exc, psycopg.DataError | psycopg.IntegrityError
                                                   | OverflowError | ValueError | TypeError):
            return PermanentError(f"{type(exc).__name__} {state}: {exc}")
        if isinstance(exc, psycopg.OperationalError):  # no sqlstate: failed to connect or connection lost
            if (unresolved := host_not_resolved(exc, "postgres", where, url)) is not None:
                return unresolved
            if any(s in str(exc) for s in self._CONNECT_FATAL):
                return FatalError(f"postgres {where}: cannot connect: {exc}; fix the URL, role, password or database")
            return RetryableError(f"postgres {where} unavailable: {exc}")
        if isinstance(exc, psycopg.ProgrammingError):
            return FatalError(f"postgres {where}: statement rejected ({state}): {exc}")
        return RetryableError(f"postgres {where}: {type(exc).__name__} {state}: {exc}")


class MysqlDialect(SqlDialect):
    """MySQL 5.7+/8 and MariaDB 10.2+ through PyMySQL. Tables are InnoDB ``utf8mb4`` with the binary collation, so
    keys compare byte-wise as in SQLite/PostgreSQL (the default ``_ci`` collation would merge ``abc`` and ``ABC``);
    the session is strict, so an over-long or out-of-range value is an error, never silently truncated."""

    name = "mysql"
    placeholder = "%s"  # plain placeholders only: PyMySQL then sends an executemany as one multi-row INSERT
    json_type = "JSON"  # MySQL validates natively; MariaDB: LONGTEXT CHECK (JSON_VALID(...))
    table_options = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    for_update = " FOR UPDATE"
    upsert_syntax = "on duplicate key"
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
              1146: "a table is missing (dropped while running?)",
              1170: "a key column is TEXT (a bug: key columns must use key_type)", 1227: "the user lacks a privilege",
              1286: "the InnoDB storage engine is not available", 1698: "access denied: check the user and password",
              2059: "the server's authentication plugin is not supported by PyMySQL"}
    # Row data rejected: out of range, too long, bad value/charset, NULL, invalid JSON (MySQL 3140, MariaDB 4025).
    _DATA = {1048, 1062, 1264, 1265, 1292, 1300, 1366, 1367, 1406, 1452, 3140, 3141, 3146, 4025}

    @property
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        import pymysql

        return (pymysql.Error,)

    def check_url(self, url: str) -> None:
        self._connect_args(url)

    def _open(self, url: str, embedded: bool) -> Any:
        timeout = {} if self.connect_timeout_s is None else {"connect_timeout": self.connect_timeout_s}
        return _mysql_connection_class()(**self._connect_args(url), charset="utf8mb4", autocommit=True, **timeout)

    def _configure(self, connection: Any, embedded: bool) -> None:
        settings = f"sql_mode = '{self.sql_mode}'"
        if self.lock_timeout_s is not None:
            lock_wait_s = max(1, math.ceil(self.lock_timeout_s))  # both variables take whole seconds
            settings += f", innodb_lock_wait_timeout = {lock_wait_s}, lock_wait_timeout = {lock_wait_s}"
        self.execute(connection, f"SET SESSION {settings}")

    def _connect_args(self, url: str) -> dict[str, Any]:
        parsed = urlparse(url)
        database = unquote(parsed.path.lstrip("/"))
        if not database:
            raise FatalError(f"mysql url {redact(url)!r} names no database; use mysql://user:password@host:port/db")
        options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(options) - set(self.url_options)
        if unknown:
            raise FatalError(f"mysql url {redact(url)!r}: unsupported option(s) {sorted(unknown)}; "
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

    def key_type(self, max_length: int) -> str:
        return f"VARCHAR({max_length})"

    DDL_LOCK_WAIT_S = 60

    @contextmanager
    def ddl_lock(self, connection: Any, lock_name: str) -> Iterator[None]:
        """Each CREATE/ALTER commits on its own in MySQL, so a transaction cannot hold them together: concurrent
        creators take turns under a named session lock (``GET_LOCK``), released when the block ends."""
        with connection.cursor() as cursor:
            cursor.execute("SELECT GET_LOCK(%s, %s)", (lock_name[:64], self.DDL_LOCK_WAIT_S))
            (granted,) = cursor.fetchone()
        if granted != 1:
            raise RetryableError(f"mysql: another worker held the DDL lock {lock_name!r} for "
                                 f"{self.DDL_LOCK_WAIT_S} s")
        try:
            yield
        finally:
            with contextlib.suppress(Exception), connection.cursor() as cursor:
                cursor.execute("SELECT RELEASE_LOCK(%s)", (lock_name[:64],))

    def classify(self, exc: BaseException, url: str) -> Exception:
        import pymysql

        where = redact(url)
        code = exc.args[0] if isinstance(exc, pymysql.Error) and exc.args and isinstance(exc.args[0], int) else None
        if code in (2003, 2005) and (unresolved := host_not_resolved(exc, "mysql", where, url)) is not None:
            return unresolved
        if code in self._FATAL:
            return FatalError(f"mysql {where}: {self._FATAL[code]}: {exc}")
        if code in self._RETRYABLE:
            return RetryableError(f"mysql {where} transient error ({self._RETRYABLE[code]}): {exc}")
        if code in self._DATA or isinstance(exc, pymysql.DataError | pymysql.IntegrityError | OverflowError
                                            | ValueError | TypeError | UnicodeError):
            return PermanentError(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, pymysql.InterfaceError):  # used after the connection broke: reconnect
            return RetryableError(f"mysql {where} connection unusable: {exc!r}")
        if isinstance(exc, pymysql.ProgrammingError | pymysql.NotSupportedError):
            return FatalError(f"mysql {where}: statement rejected: {exc}")
        return RetryableError(f"mysql {where}: {type(exc).__name__}: {exc}")


def mysql_escape(text: str) -> str:
    """``pymysql.converters.escape_string(text)`` (the same characters, the same escapes), several times faster on
    long strings: PyMySQL's ``str.translate`` with multi-character replacements looks every character up in Python,
    each ``str.replace`` is one C scan. The backslash goes first, so the ones added after are not doubled."""
    return (text.replace("\\", "\\\\").replace("\0", "\\0").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\032", "\\Z").replace('"', '\\"').replace("'", "\\'"))


@functools.cache
def _mysql_connection_class() -> type:
    """PyMySQL's connection quoting ``str`` parameters with ``mysql_escape``: a JSON payload of some kilobytes
    otherwise costs more to escape than to encode. The SQL sent is the same text."""
    import pymysql
    from pymysql.constants.SERVER_STATUS import SERVER_STATUS_NO_BACKSLASH_ESCAPES

    class Connection(pymysql.connections.Connection):
        def escape(self, obj: Any, mapping: Any = None) -> str:
            if isinstance(obj, str) and not self.server_status & SERVER_STATUS_NO_BACKSLASH_ESCAPES:
                return f"'{mysql_escape(obj)}'"
            return super().escape(obj, mapping)  # other types, and the NO_BACKSLASH_ESCAPES quoting

    return Connection


DIALECTS: dict[str, type[SqlDialect]] = {
    "sqlite": SqliteDialect,
    "postgresql": PostgresDialect,
    "postgres": PostgresDialect,
    "mysql": MysqlDialect,
    "mariadb": MysqlDialect,
}


def sqlite_path(url: str) -> str:
    """SQLAlchemy convention: ``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite:///:memory:``."""
    path = urlparse(url).path
    return path[1:] if path.startswith("/") else path


def close_quietly(connection: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection must not mask the original error
        connection.close()
