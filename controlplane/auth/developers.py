"""Developers and their API keys (tables ``developers`` and ``api_keys``): only a salted scrypt hash of a key is
stored; verified keys are cached briefly."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from controlplane.auth.model import UnknownUser, iso
from controlplane.auth.secrets import hash_api_key, new_api_key, parse_api_key, sha256_hex, verify_api_key
from controlplane.auth.tables import Tables
from core.store import now_ms


class Developers:
    def __init__(self, tables: Tables, api_key_cache_s: float = 60.0) -> None:
        self.tables, self.api_key_cache_s = tables, api_key_cache_s
        self._lock = threading.Lock()
        self._key_cache: dict[str, float] = {}

    def ddl(self) -> list[str]:
        return [
            f"CREATE TABLE IF NOT EXISTS {self.tables.devs} (dev_id TEXT PRIMARY KEY, name TEXT, created_at_ms BIGINT "
            "NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self.tables.keys} (key_id TEXT PRIMARY KEY, dev_id TEXT NOT NULL, salt TEXT "
            "NOT NULL, hash TEXT NOT NULL, created_at_ms BIGINT NOT NULL, revoked_at_ms BIGINT)",
        ]

    def create_developer(self, dev_id: str | None = None, name: str | None = None) -> str:
        dev_id = dev_id or f"dev-{uuid.uuid4().hex[:12]}"
        self.tables.store.execute(f"INSERT INTO {self.tables.devs} (dev_id, name, created_at_ms) VALUES (?, ?, ?)",
                                  [dev_id, name, now_ms()])
        return dev_id

    def developer_exists(self, dev_id: str) -> bool:
        return bool(self.tables.store.query(f"SELECT 1 FROM {self.tables.devs} WHERE dev_id = ?", [dev_id]))

    def create_api_key(self, dev_id: str) -> str:
        """A new API key for ``dev_id``; the plaintext is returned once and only its scrypt hash is stored."""
        if not self.developer_exists(dev_id):
            raise UnknownUser(f"no developer {dev_id!r}")
        key_id, plaintext = new_api_key()
        salt, digest = hash_api_key(plaintext)
        self.tables.store.execute(f"INSERT INTO {self.tables.keys} (key_id, dev_id, salt, hash, created_at_ms) "
                                  "VALUES (?, ?, ?, ?, ?)", [key_id, dev_id, salt, digest, now_ms()])
        return plaintext

    def api_keys(self, dev_id: str) -> list[dict[str, Any]]:
        rows = self.tables.store.query(f"SELECT key_id, created_at_ms, revoked_at_ms FROM {self.tables.keys} WHERE "
                                       "dev_id = ? ORDER BY created_at_ms", [dev_id])
        return [{"key_id": k, "created_at": iso(c), "revoked_at": iso(r)} for k, c, r in rows]

    def revoke_api_key(self, key_id: str) -> None:
        self.tables.store.execute(f"UPDATE {self.tables.keys} SET revoked_at_ms = ? WHERE key_id = ?",
                                  [now_ms(), key_id])
        with self._lock:
            self._key_cache.clear()

    def check_api_key(self, dev_id: str, api_key: str) -> bool:
        """True when ``api_key`` is a live key of ``dev_id`` (constant-time; verified keys are cached briefly)."""
        cache_key = sha256_hex(f"{dev_id}\0{api_key}")
        with self._lock:
            if self._key_cache.get(cache_key, 0.0) > time.monotonic():
                return True
        key_id = parse_api_key(api_key)
        rows = self.tables.store.query(f"SELECT salt, hash FROM {self.tables.keys} WHERE key_id = ? AND dev_id = ? "
                                       "AND revoked_at_ms IS NULL", [key_id or "", dev_id]) if key_id else []
        salt, digest = rows[0] if rows else (None, None)
        ok = verify_api_key(api_key, salt, digest)
        if ok and self.api_key_cache_s > 0:
            with self._lock:
                self._key_cache[cache_key] = time.monotonic() + self.api_key_cache_s
        return ok
