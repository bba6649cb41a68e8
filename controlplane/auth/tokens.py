"""The connections' OAuth tokens (table ``tokens``), encrypted at rest (``TokenCipher``) and versioned: a refresh
reads them under the row lock and writes the next version (``cur`` methods take part in the caller's transaction)."""

from __future__ import annotations

from typing import Any

from controlplane.auth.model import Tokens
from controlplane.auth.secrets import TokenCipher
from controlplane.auth.tables import Tables
from core.store import now_ms


class TokenStore:
    def __init__(self, tables: Tables, cipher: TokenCipher) -> None:
        self.tables, self.cipher = tables, cipher

    def ddl(self) -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS {self.tables.tokens} (user_id TEXT PRIMARY KEY, secret TEXT NOT NULL, "
                "expires_at_ms BIGINT, version INTEGER NOT NULL, updated_at_ms BIGINT NOT NULL)"]

    def write(self, cur: Any, user_id: str, token: dict[str, Any], previous: Tokens | None, *, version: int,
              insert: bool) -> Tokens:
        expires_at = token.get("expires_at")
        tokens = Tokens(str(token["access_token"]),
                        token.get("refresh_token") or (previous.refresh_token if previous else None),
                        str(token.get("token_type") or "Bearer"),
                        int(float(expires_at) * 1000) if expires_at else None, version)
        secret = self.cipher.encrypt(user_id, {"access_token": tokens.access_token,
                                               "refresh_token": tokens.refresh_token, "token_type": tokens.token_type})
        if insert:
            cur.execute(f"INSERT INTO {self.tables.tokens} (user_id, secret, expires_at_ms, version, updated_at_ms) "
                        "VALUES (?, ?, ?, ?, ?)", [user_id, secret, tokens.expires_at_ms, version, now_ms()])
        else:
            cur.execute(f"UPDATE {self.tables.tokens} SET secret = ?, expires_at_ms = ?, version = ?, "
                        "updated_at_ms = ? WHERE user_id = ?",
                        [secret, tokens.expires_at_ms, version, now_ms(), user_id])
        return tokens

    def read(self, cur: Any, user_id: str, lock: bool) -> Tokens | None:
        rows = cur.execute(f"SELECT secret, expires_at_ms, version FROM {self.tables.tokens} WHERE user_id = ?"
                           f"{self.tables.for_update if lock else ''}", [user_id]).fetchall()
        if not rows:
            return None
        secret, expires_at_ms, version = rows[0]
        value = self.cipher.decrypt(user_id, secret)
        return Tokens(value["access_token"], value.get("refresh_token"), value.get("token_type") or "Bearer",
                      expires_at_ms, version)

    def tokens(self, user_id: str) -> Tokens | None:
        """The stored (decrypted) tokens, as they are: no refresh."""
        with self.tables.store.transaction() as cur:
            return self.read(cur, user_id, lock=False)

    def delete(self, cur: Any, user_id: str) -> None:
        cur.execute(f"DELETE FROM {self.tables.tokens} WHERE user_id = ?", [user_id])
