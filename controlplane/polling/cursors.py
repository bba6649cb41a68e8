"""Poll cursors in the control-plane store: the end of the last window fully published, per connection and kind.

``track`` separates the live cursor (``live``) from each backfill (``backfill:<start>/<end>``), so a backfill never
moves the live cursor and a crashed backfill resumes where it stopped. A cursor only moves forward.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime

from core.errors import FatalError
from core.store import Store

DEFAULT_TABLE = "poll_cursors"
LIVE_TRACK = "live"


def backfill_track(start: datetime, end: datetime) -> str:
    return f"backfill:{start.isoformat()}/{end.isoformat()}"


class CursorStore:
    """``get``/``advance`` cursors; safe to share between threads (one store connection, serialized)."""

    def __init__(self, store: Store | str, table: str = DEFAULT_TABLE) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", table):
            raise FatalError(f"bad cursor table name {table!r}")
        self.store = (Store(store) if isinstance(store, str) else store).open()
        self.table = table
        self._lock = threading.Lock()
        with self._lock:
            self.store.create_tables(
                f"CREATE TABLE IF NOT EXISTS {table} (user_id TEXT NOT NULL, kind TEXT NOT NULL, track TEXT NOT NULL, "
                "window_end_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL, PRIMARY KEY (user_id, kind, track))")

    def get(self, user_id: str, kind: str, track: str = LIVE_TRACK) -> datetime | None:
        with self._lock:
            rows = self.store.query(f"SELECT window_end_ms FROM {self.table} WHERE user_id = ? AND kind = ? "
                                    "AND track = ?", [user_id, kind, track])
        return datetime.fromtimestamp(rows[0][0] / 1000, UTC) if rows else None

    def advance(self, user_id: str, kind: str, window_end: datetime, track: str = LIVE_TRACK) -> None:
        """Move the cursor to ``window_end`` (never backwards: concurrent pollers cannot rewind it)."""
        end_ms = int(window_end.timestamp() * 1000)
        with self._lock:
            self.store.execute(
                f"INSERT INTO {self.table} (user_id, kind, track, window_end_ms, updated_at_ms) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (user_id, kind, track) DO UPDATE SET "
                f"window_end_ms = CASE WHEN excluded.window_end_ms > {self.table}.window_end_ms "
                f"THEN excluded.window_end_ms ELSE {self.table}.window_end_ms END, "
                "updated_at_ms = excluded.updated_at_ms",
                [user_id, kind, track, end_ms, int(time.time() * 1000)])

    def reset(self, user_id: str, kind: str | None = None, track: str | None = None) -> None:
        """Forget cursors (a reconnected user is polled from scratch)."""
        sql, params = f"DELETE FROM {self.table} WHERE user_id = ?", [user_id]
        if kind is not None:
            sql, params = sql + " AND kind = ?", [*params, kind]
        if track is not None:
            sql, params = sql + " AND track = ?", [*params, track]
        with self._lock:
            self.store.execute(sql, params)
