"""Connections ("users", as Terra calls them; table ``users``): rows read as ``Connection``s, lookups, and the state
changes the lifecycle makes (``cur`` methods take part in the caller's transaction)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors.manifest import Manifest
from controlplane.auth.model import ACTIVE, PENDING, REVOKED, Connection, UnknownUser
from controlplane.auth.tables import Tables
from core.store import now_ms

_USER_COLUMNS = ("user_id, dev_id, provider, reference_id, provider_user_id, scopes, state, widget_session_id, "
                 "created_at_ms, last_webhook_update_ms")


class Connections:
    def __init__(self, tables: Tables, manifests: Mapping[str, Manifest]) -> None:
        self.tables, self.manifests = tables, manifests

    def ddl(self) -> list[str]:
        t = self.tables.users
        return [
            f"CREATE TABLE IF NOT EXISTS {t} (user_id TEXT PRIMARY KEY, dev_id TEXT NOT NULL, provider TEXT "
            "NOT NULL, reference_id TEXT, provider_user_id TEXT, scopes TEXT, state TEXT NOT NULL, widget_session_id "
            "TEXT, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL, last_webhook_update_ms BIGINT)",
            f"CREATE INDEX IF NOT EXISTS {t}_account ON {t} (provider, provider_user_id)",
            f"CREATE INDEX IF NOT EXISTS {t}_reference ON {t} (dev_id, reference_id)",
        ]

    def from_row(self, row: tuple[Any, ...]) -> Connection:
        user_id, dev_id, provider, ref, puid, scopes, state, wsid, created, webhook = row
        manifest = self.manifests.get(provider)
        return Connection(user_id, dev_id, provider, manifest.terra_name if manifest else provider.upper(), ref, puid,
                          scopes, state, wsid, created, webhook)

    # ------------------------------------------------------------------ reads
    def connection(self, user_id: str, dev_id: str | None = None) -> Connection:
        """The connection ``user_id`` (of ``dev_id`` when given), else UnknownUser."""
        rows = self.tables.store.query(f"SELECT {_USER_COLUMNS} FROM {self.tables.users} WHERE user_id = ?", [user_id])
        if not rows or (dev_id is not None and rows[0][1] != dev_id):
            raise UnknownUser(f"no user {user_id!r}")
        return self.from_row(rows[0])

    def connections(self, dev_id: str, reference_id: str) -> list[Connection]:
        rows = self.tables.store.query(f"SELECT {_USER_COLUMNS} FROM {self.tables.users} WHERE dev_id = ? AND "
                                       "reference_id = ? ORDER BY created_at_ms", [dev_id, reference_id])
        return [self.from_row(row) for row in rows]

    def active_connections(self) -> list[Connection]:
        """Every active connection (what the poller polls)."""
        rows = self.tables.store.query(f"SELECT {_USER_COLUMNS} FROM {self.tables.users} WHERE state = ? ORDER BY "
                                       "created_at_ms", [ACTIVE])
        return [self.from_row(row) for row in rows]

    def resolve_user(self, slug: str, provider_user_id: str) -> Connection | None:
        """The active connection of a provider account (for mapping provider pushes to ``user_id``)."""
        rows = self.tables.store.query(f"SELECT {_USER_COLUMNS} FROM {self.tables.users} WHERE provider = ? AND "
                                       "provider_user_id = ? AND state = ? ORDER BY created_at_ms DESC",
                                       [slug, provider_user_id, ACTIVE])
        return self.from_row(rows[0]) if rows else None

    def active_of_account(self, slug: str, provider_user_id: str) -> list[str]:
        """The user ids of every active connection of a provider account, newest first."""
        rows = self.tables.store.query(f"SELECT user_id FROM {self.tables.users} WHERE provider = ? AND "
                                       "provider_user_id = ? AND state = ? ORDER BY created_at_ms DESC",
                                       [slug, provider_user_id, ACTIVE])
        return [user_id for (user_id,) in rows]

    # ------------------------------------------------------------------ writes
    def touch_webhook(self, user_id: str, at_ms: int | None = None) -> None:
        self.tables.store.execute(f"UPDATE {self.tables.users} SET last_webhook_update_ms = ? WHERE user_id = ?",
                                  [at_ms or now_ms(), user_id])

    def set_scopes(self, user_id: str, scopes: str | None) -> None:
        self.tables.store.execute(f"UPDATE {self.tables.users} SET scopes = ?, updated_at_ms = ? WHERE user_id = ?",
                                  [scopes, now_ms(), user_id])

    # ------------------------------------------------------------------ inside the caller's transaction
    def insert_pending(self, cur: Any, user_id: str, dev_id: str, slug: str, reference_id: str | None,
                       widget_session_id: str | None, at: int) -> None:
        cur.execute(f"INSERT INTO {self.tables.users} (user_id, dev_id, provider, reference_id, state, "
                    "widget_session_id, created_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [user_id, dev_id, slug, reference_id, PENDING, widget_session_id, at, at])

    def delete_pending(self, cur: Any, user_id: str) -> None:
        cur.execute(f"DELETE FROM {self.tables.users} WHERE user_id = ? AND state = ?", [user_id, PENDING])

    def lock_state(self, cur: Any, user_id: str) -> str | None:
        """The connection's state, its row locked; None when there is no such connection."""
        rows = cur.execute(f"SELECT state FROM {self.tables.users} WHERE user_id = ?{self.tables.for_update}",
                           [user_id]).fetchall()
        return rows[0][0] if rows else None

    def lock(self, cur: Any, user_id: str) -> Connection | None:
        """The connection, its row locked; None when there is no such connection."""
        rows = cur.execute(f"SELECT {_USER_COLUMNS} FROM {self.tables.users} WHERE user_id = ?"
                           f"{self.tables.for_update}", [user_id]).fetchall()
        return self.from_row(rows[0]) if rows else None

    def read(self, cur: Any, user_id: str) -> Connection:
        return self.from_row(cur.execute(f"SELECT {_USER_COLUMNS} FROM {self.tables.users} WHERE user_id = ?",
                                         [user_id]).fetchall()[0])

    def others_of_account(self, cur: Any, dev_id: str, slug: str, provider_user_id: str,
                          user_id: str) -> list[Connection]:
        """The developer's other active or revoked connections of the same provider account."""
        return [self.from_row(row) for row in cur.execute(
            f"SELECT {_USER_COLUMNS} FROM {self.tables.users} WHERE dev_id = ? AND provider = ? AND provider_user_id "
            f"= ? AND user_id <> ? AND state IN (?, ?)",
            [dev_id, slug, provider_user_id, user_id, ACTIVE, REVOKED]).fetchall()]

    def set_state(self, cur: Any, user_id: str, state: str, at: int) -> None:
        cur.execute(f"UPDATE {self.tables.users} SET state = ?, updated_at_ms = ? WHERE user_id = ?",
                    [state, at, user_id])

    def activate(self, cur: Any, user_id: str, provider_user_id: str, scopes: str | None, at: int) -> None:
        cur.execute(f"UPDATE {self.tables.users} SET state = ?, provider_user_id = ?, scopes = ?, updated_at_ms = ? "
                    "WHERE user_id = ?", [ACTIVE, provider_user_id, scopes, at, user_id])

    def purge_pending(self, cur: Any, cutoff: int) -> int:
        """Delete pending connections created before ``cutoff`` (never completed); returns how many."""
        stale = cur.execute(f"SELECT user_id FROM {self.tables.users} WHERE state = ? AND created_at_ms < ?",
                            [PENDING, cutoff]).fetchall()
        cur.execute(f"DELETE FROM {self.tables.users} WHERE state = ? AND created_at_ms < ?", [PENDING, cutoff])
        return len(stale)
