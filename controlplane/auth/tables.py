"""The control-plane store as the repositories share it: one connection per thread (the API serves requests from a
thread pool), and the table names, all with one prefix."""

from __future__ import annotations

import re
import threading

from core.errors import FatalError
from core.secrets import missing, private_file, resolve
from core.sql import sqlite_path
from core.store import Store

_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def check_prefix(table_prefix: str) -> str:
    if not _PREFIX.match(table_prefix):
        raise FatalError(f"table prefix {table_prefix!r} must match {_PREFIX.pattern}")
    return table_prefix


class Tables:
    """``store`` (this thread's connection), ``for_update`` (row locks where the dialect has them) and the tables:
    ``devs``, ``keys``, ``users``, ``flows``, ``sessions``, ``tokens``, ``events``."""

    def __init__(self, store_url: str, table_prefix: str) -> None:
        Store(store_url)  # validates the URL now
        self.store_url = store_url
        self._private_sqlite_file()
        p = check_prefix(table_prefix)
        self.devs, self.keys, self.users = f"{p}developers", f"{p}api_keys", f"{p}users"
        self.flows, self.sessions = f"{p}oauth_flows", f"{p}widget_sessions"
        self.tokens, self.events = f"{p}tokens", f"{p}auth_events"
        self._local = threading.local()
        self._stores: list[Store] = []
        self._lock = threading.Lock()

    def _private_sqlite_file(self) -> None:
        """A SQLite store holds encrypted tokens and API-key hashes: its file is created (or tightened to) 0600."""
        if self.store_url.startswith("sqlite:") and not missing(self.store_url):
            path = sqlite_path(resolve(self.store_url))
            if path and path != ":memory:":
                private_file(path)

    @property
    def store(self) -> Store:
        """This thread's store connection."""
        store = getattr(self._local, "store", None)
        if store is None or store.conn is None:
            store = Store(self.store_url).open()
            with self._lock:
                self._stores.append(store)
            self._local.store = store
        return store

    @property
    def for_update(self) -> str:
        return self.store.sql_dialect.for_update

    def all(self) -> tuple[str, ...]:
        return (self.devs, self.keys, self.users, self.flows, self.sessions, self.tokens, self.events)

    def close(self) -> None:
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()
