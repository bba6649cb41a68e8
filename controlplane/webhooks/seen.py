"""Webhook notifications already accepted, so a replay is acknowledged without being published again.

Entries live in the control-plane store (``core.store``: SQLite embedded, PostgreSQL or MySQL shared by every API
process), one row per provider and id, until they expire. ``claim`` is atomic across processes: of two requests
carrying the same notification, exactly one gets True (a row lock or the database's serialization decides), and an
expired entry is claimed again as if it were new. ``release`` gives a claim back when the notification could not be
queued, so the provider's retry is accepted.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

from core.errors import FatalError
from core.store import Store, now_ms

DEFAULT_TABLE = "healthflow_webhook_seen"
PURGE_EVERY_S = 60.0


class SeenNotifications:
    """``claim``/``release`` notification ids per provider; safe to share between threads (one connection,
    serialized)."""

    def __init__(self, store: Store | str, table: str = DEFAULT_TABLE) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", table):
            raise FatalError(f"bad table name {table!r} for seen webhook notifications")
        self.store = (Store(store) if isinstance(store, str) else store).open()
        self.table = table
        self._lock = threading.Lock()
        self._next_purge = 0.0
        with self._lock:
            self.store.create_tables(
                f"CREATE TABLE IF NOT EXISTS {table} (provider VARCHAR(64) NOT NULL, seen_id VARCHAR(128) NOT NULL, "
                "claim VARCHAR(32) NOT NULL, expires_at_ms BIGINT NOT NULL, PRIMARY KEY (provider, seen_id))")

    def _claim_sql(self) -> str:
        t = self.table
        insert = f"INSERT INTO {t} (provider, seen_id, claim, expires_at_ms) VALUES (?, ?, ?, ?) "
        if self.store.sql_dialect.upsert_syntax == "on duplicate key":  # MySQL: assignments see the new claim
            return insert + ("ON DUPLICATE KEY UPDATE claim = IF(expires_at_ms <= ?, VALUES(claim), claim), "
                             "expires_at_ms = IF(claim = VALUES(claim), VALUES(expires_at_ms), expires_at_ms)")
        return insert + (f"ON CONFLICT (provider, seen_id) DO UPDATE SET claim = excluded.claim, "
                         f"expires_at_ms = excluded.expires_at_ms WHERE {t}.expires_at_ms <= ?")

    def claim(self, provider: str, seen_id: str, ttl_s: float) -> str | None:
        """A claim token when ``seen_id`` was not seen (or its entry expired), now kept for ``ttl_s``; None when it
        was: the notification is a replay."""
        token, now = secrets.token_hex(16), now_ms()
        with self._lock:
            with self.store.transaction() as cursor:
                cursor.execute(self._claim_sql(), [provider, seen_id, token, now + int(ttl_s * 1000), now])
                rows = cursor.execute(f"SELECT claim FROM {self.table} WHERE provider = ? AND seen_id = ?",
                                      [provider, seen_id]).fetchall()
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + PURGE_EVERY_S
                self.store.execute(f"DELETE FROM {self.table} WHERE expires_at_ms <= ?", [now])
        return token if rows and rows[0][0] == token else None

    def release(self, provider: str, seen_id: str, token: str) -> None:
        """Forget a claim (the notification was not queued): the provider's retry is accepted as new."""
        with self._lock:
            self.store.execute(f"DELETE FROM {self.table} WHERE provider = ? AND seen_id = ? AND claim = ?",
                               [provider, seen_id, token])

    def close(self) -> None:
        with self._lock:
            self.store.close()
