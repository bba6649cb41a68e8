"""Who a provider account belongs to: provider user id → the connection's Terra user.

Connections are made through the auth API (``controlplane/auth``), which gives each one its own
``user_id`` and the developer's ``reference_id``. The pipeline looks connections up here, in the
control-plane store, so delivered events carry that user. Data for an account with no active
connection (a push racing its ``auth`` event, or data loaded from files) keeps a stable user id
derived from the account, as before; it is never dropped.
"""

from __future__ import annotations

import time
from typing import Any

from core.store import Store

CACHE_TTL_S = 5.0  # a connection made or revoked in the API is seen by every worker within this


class UserDirectory:
    """Cached, read-only view of the control plane's connections table."""

    def __init__(self, url: str, table: str = "healthflow_cp_users", ttl_s: float = CACHE_TTL_S) -> None:
        self.store, self.table, self.ttl_s = Store(url), table, ttl_s
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._exists = False

    def open(self) -> UserDirectory:
        self.store.open()
        return self

    def close(self) -> None:
        self.store.close()

    def _table_exists(self) -> bool:
        if not self._exists:  # once it exists it stays; until then, ask again (the API may create it)
            if self.store.dialect == "sqlite":
                sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
            else:
                sql = "SELECT 1 FROM information_schema.tables WHERE table_name = ? AND table_schema = current_schema()"
            self._exists = bool(self.store.query(sql, [self.table]))
        return self._exists

    def resolve(self, provider: str, provider_user_id: str, terra_name: str) -> dict[str, Any] | None:
        """The TerraUser of the active connection of this account, or None when there is none."""
        key = (provider, provider_user_id)
        cached = self._cache.get(key)
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        user = None
        if self._table_exists():
            rows = self.store.query(
                f"SELECT user_id, reference_id, scopes FROM {self.table} WHERE provider = ? AND provider_user_id = ? "
                "AND state = 'active' ORDER BY created_at_ms DESC LIMIT 1", [provider, provider_user_id])
            if rows:
                user_id, reference_id, scopes = rows[0]
                user = {"user_id": user_id, "provider": terra_name, "reference_id": reference_id, "scopes": scopes,
                        "active": True}
        self._cache[key] = (time.monotonic(), user)
        return user
