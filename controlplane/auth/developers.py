"""Developers and their API keys (tables ``developers`` and ``api_keys``): only a salted scrypt hash of a key is
stored.

Checking a key reads its row on every call (one primary-key lookup), so a key revoked by any process is refused by
every process at its next request. scrypt runs only for a key not yet verified against that row: a verified key is
remembered by a keyed digest of ``(dev-id, key)`` next to the stored hash it matched, in a bounded per-process memo
that a changed or revoked row invalidates (``LiveKey.remembered``)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from controlplane.auth.model import UnknownUser, iso
from controlplane.auth.secrets import hash_api_key, new_api_key, parse_api_key, verify_api_key
from controlplane.auth.tables import Tables
from core.store import now_ms


@dataclass(frozen=True)
class LiveKey:
    """The stored row of a live (not revoked) key, and whether this process already verified the presented
    plaintext against exactly this hash (then no scrypt is needed)."""

    key_id: str
    salt: str
    digest: str
    remembered: bool


class Developers:
    def __init__(self, tables: Tables, verified_memo_size: int = 4096) -> None:
        self.tables, self.verified_memo_size = tables, verified_memo_size
        self._lock = threading.Lock()
        self._memo_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, str] = OrderedDict()  # digest of (dev-id, key) → stored hash it matched

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
        """Revoke a key: every process refuses it from its next request on (each check reads the row)."""
        self.tables.store.execute(f"UPDATE {self.tables.keys} SET revoked_at_ms = ? WHERE key_id = ?",
                                  [now_ms(), key_id])

    # ------------------------------------------------------------------ checking a key
    def live_key(self, dev_id: str, api_key: str) -> LiveKey | None:
        """The live key row ``api_key`` names for ``dev_id`` (one primary-key lookup; none for a malformed key),
        or None: an unknown, revoked or other developer's key. Needs no scrypt either way."""
        key_id = parse_api_key(api_key)
        if not key_id:
            return None
        rows = self.tables.store.query(f"SELECT salt, hash FROM {self.tables.keys} WHERE key_id = ? AND dev_id = ? "
                                       "AND revoked_at_ms IS NULL", [key_id, dev_id])
        if not rows:
            return None
        salt, digest = rows[0]
        memo = self._memo(dev_id, api_key)
        with self._lock:
            remembered = self._verified.get(memo)
            if remembered is not None:
                self._verified.move_to_end(memo)
        return LiveKey(key_id, salt, digest, remembered is not None and hmac.compare_digest(remembered, digest))

    def remembers(self, dev_id: str, api_key: str) -> bool:
        """Whether this process verified ``api_key`` for ``dev_id`` before (no I/O; ``live_key`` still decides)."""
        with self._lock:
            return self._memo(dev_id, api_key) in self._verified

    def verify(self, dev_id: str, api_key: str, key: LiveKey) -> bool:
        """scrypt ``api_key`` against ``key`` (constant-time compare); a match is remembered."""
        if not verify_api_key(api_key, key.salt, key.digest):
            return False
        with self._lock:
            self._verified[self._memo(dev_id, api_key)] = key.digest
            while len(self._verified) > self.verified_memo_size:
                self._verified.popitem(last=False)
        return True

    @staticmethod
    def dummy_verify(api_key: str) -> None:
        """The same scrypt work as ``verify`` against no key, so a missing key takes as long as a wrong one."""
        verify_api_key(api_key, None, None)

    def check_api_key(self, dev_id: str, api_key: str) -> bool:
        """True when ``api_key`` is a live key of ``dev_id`` (constant-time). Unthrottled: the API checks keys
        through ``guard.ApiKeyGuard``."""
        key = self.live_key(dev_id, api_key)
        if key is None:
            self.dummy_verify(api_key)
            return False
        return key.remembered or self.verify(dev_id, api_key, key)

    def _memo(self, dev_id: str, api_key: str) -> bytes:
        return hmac.new(self._memo_key, f"{dev_id}\0{api_key}".encode(), hashlib.sha256).digest()
