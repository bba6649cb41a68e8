"""Webhook notifications already accepted, so a replay is acknowledged without being published again.

Entries live in the control-plane store (``core.store``: SQLite embedded, PostgreSQL or MySQL shared by every API
process), one row per provider and id, until they expire. A claim has two phases:

- ``claim`` is atomic across processes: of two requests carrying the same notification, exactly one holds the claim
  (a row lock or the database's serialization decides). It starts *pending* for ``pending_s`` (the longest its holder
  can take to queue the notification): a pending claim older than that is abandoned (its holder died, or could not
  give it back) and claimed again as if it were new, like an expired entry.
- ``accept`` marks it *accepted* once the notification is queued (the broker acknowledged it), kept for the replay
  window: only then is a copy a replay. A copy arriving while the claim is pending is told so (``Claim.pending``),
  so it is answered "retry later", never acknowledged: if the first one then fails, the provider's retry goes through.
- ``release`` gives a pending claim back when the notification could not be queued, so the provider's retry is
  accepted. ``forget`` drops an accepted one (the notification fetcher does, once it has fetched what a
  content-hashed notification named: a later identical notification may name newer data).

The phase is kept in the claim column itself (``p``/``a`` and the holder's token), so tables created before keep
working.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass

from core.errors import FatalError
from core.store import Store, now_ms

DEFAULT_TABLE = "healthflow_webhook_seen"
PURGE_EVERY_S = 60.0
# on the raw events of a notification claimed by its content (no event id or timestamp: Fitbit, Polar): the fetcher
# forgets the claim once it fetched, so a later identical notification (another sync of the same day) is fetched too
CLAIM_HEADER = "healthflow-replay-claim"
PENDING, ACCEPTED = "p", "a"  # the claim column: phase letter + the holder's token (31 characters of 32)


@dataclass(frozen=True)
class Claim:
    """What ``claim`` found: ``token`` when this caller now holds the claim (to ``accept`` or ``release``); else
    another holds it, still ``pending`` (its notification not queued yet: ask the sender to retry in
    ``retry_after_s``) or accepted (a replay)."""

    token: str | None
    pending: bool = False
    retry_after_s: float = 0.0

    @property
    def replay(self) -> bool:
        return self.token is None and not self.pending


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

    def claim(self, provider: str, seen_id: str, pending_s: float) -> Claim:
        """Claim ``seen_id``: held by this caller (pending for ``pending_s``) when it was not seen, or its entry
        expired, or a pending claim was abandoned; else who holds it (see ``Claim``)."""
        token, now = secrets.token_hex(15), now_ms()
        with self._lock:
            with self.store.transaction() as cursor:
                cursor.execute(self._claim_sql(), [provider, seen_id, PENDING + token, now + int(pending_s * 1000),
                                                   now])
                rows = cursor.execute(f"SELECT claim, expires_at_ms FROM {self.table} WHERE provider = ? AND "
                                      "seen_id = ?", [provider, seen_id]).fetchall()
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + PURGE_EVERY_S
                self.store.execute(f"DELETE FROM {self.table} WHERE expires_at_ms <= ?", [now])
        if not rows or rows[0][0] == PENDING + token:
            return Claim(token)
        held, expires_at_ms = rows[0]
        if str(held).startswith(PENDING):
            return Claim(None, pending=True, retry_after_s=max(1.0, (int(expires_at_ms) - now) / 1000))
        return Claim(None)

    def accept(self, provider: str, seen_id: str, token: str, window_s: float) -> None:
        """The claimed notification is queued: copies are replays for ``window_s`` from now."""
        with self._lock:
            self.store.execute(f"UPDATE {self.table} SET claim = ?, expires_at_ms = ? WHERE provider = ? AND "
                               "seen_id = ? AND claim = ?",
                               [ACCEPTED + token, now_ms() + int(window_s * 1000), provider, seen_id, PENDING + token])

    def release(self, provider: str, seen_id: str, token: str) -> None:
        """Give a pending claim back (the notification was not queued): the provider's retry is accepted as new."""
        with self._lock:
            self.store.execute(f"DELETE FROM {self.table} WHERE provider = ? AND seen_id = ? AND claim = ?",
                               [provider, seen_id, PENDING + token])

    def forget(self, provider: str, seen_id: str) -> None:
        """Drop ``seen_id``'s claim, in either phase: the next identical notification is accepted as new. (The fetcher
        forgets what it fetched; the API may not have marked that claim accepted yet, and a late ``accept`` finds no
        row and does nothing, so it cannot bring the claim back.)"""
        with self._lock:
            self.store.execute(f"DELETE FROM {self.table} WHERE provider = ? AND seen_id = ?", [provider, seen_id])

    def close(self) -> None:
        with self._lock:
            self.store.close()
