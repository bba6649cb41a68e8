"""Destination health: a destination failing for too long (or answering 410 Gone) is disabled.

While disabled, its events go straight to its dead letters (nothing is sent, nothing is lost)
and scheduled redelivery skips it; ``healthflow destinations enable NAME`` turns it back on, after
which ``healthflow deadletters replay --destination NAME`` delivers what it missed. Any success
clears the failing streak. Kept in the control-plane store, so every worker sees the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import EndpointGone
from core.store import Store, now_ms

TABLE = "healthflow_destination_status"
DEFAULT_DISABLE_AFTER_S = 5 * 24 * 3600  # Svix disables after five days of continuous failure


@dataclass(frozen=True)
class Status:
    name: str
    disabled: bool = False
    failing_since_ms: int | None = None
    reason: str | None = None


class DestinationStatus:
    def __init__(self, url: str) -> None:
        self.store = Store(url)

    def open(self) -> DestinationStatus:
        self.store.open()
        self.store.create_tables(f"CREATE TABLE IF NOT EXISTS {TABLE} (name TEXT PRIMARY KEY, disabled INTEGER NOT "
                                 "NULL, failing_since_ms BIGINT, reason TEXT, updated_at_ms BIGINT NOT NULL)")
        return self

    def close(self) -> None:
        self.store.close()

    def get(self, name: str) -> Status:
        rows = self.store.query(f"SELECT disabled, failing_since_ms, reason FROM {TABLE} WHERE name = ?", [name])
        if not rows:
            return Status(name)
        disabled, failing_since, reason = rows[0]
        return Status(name, bool(disabled), failing_since, reason)

    def all(self) -> list[Status]:
        rows = self.store.query(f"SELECT name, disabled, failing_since_ms, reason FROM {TABLE} ORDER BY name")
        return [Status(name, bool(disabled), since, reason) for name, disabled, since, reason in rows]

    def _put(self, status: Status, at_ms: int) -> None:
        self.store.execute(
            f"INSERT INTO {TABLE} (name, disabled, failing_since_ms, reason, updated_at_ms) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET disabled = excluded.disabled, failing_since_ms = "
            "excluded.failing_since_ms, reason = excluded.reason, updated_at_ms = excluded.updated_at_ms",
            [status.name, int(status.disabled), status.failing_since_ms, status.reason, at_ms])

    def record_success(self, name: str) -> None:
        """Clear the failing streak; never re-enables a destination another worker just disabled."""
        self.store.execute(f"UPDATE {TABLE} SET failing_since_ms = NULL, reason = NULL, updated_at_ms = ? "
                           "WHERE name = ? AND disabled = 0 AND failing_since_ms IS NOT NULL", [now_ms(), name])

    def record_failure(self, name: str, error: BaseException, disable_after_s: float,
                       at_ms: int | None = None) -> Status:
        """Note a batch in which nothing could be delivered; returns the new status."""
        at_ms = now_ms() if at_ms is None else at_ms
        current = self.get(name)
        if current.disabled:
            return current
        since = current.failing_since_ms if current.failing_since_ms is not None else at_ms
        if isinstance(error, EndpointGone):
            status = Status(name, True, since, f"endpoint gone: {error}")
        elif at_ms - since >= disable_after_s * 1000:
            status = Status(name, True, since, f"failing since {since} ms (over {disable_after_s:.0f} s): {error}")
        else:
            status = Status(name, False, since, str(error)[:500])
        self._put(status, at_ms)
        return status

    def enable(self, name: str) -> None:
        self._put(Status(name), now_ms())

    def disable(self, name: str, reason: str) -> None:
        self._put(Status(name, True, None, reason), now_ms())
