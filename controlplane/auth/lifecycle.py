"""A connection's life once connected: its access token (refreshed under the connection's lock), revocation by the
provider, changed scopes and disconnecting. Every state change writes its lifecycle event to the outbox in the same
transaction."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

from connectors.oauth import InvalidGrant
from controlplane.auth import events as ev
from controlplane.auth.connections import Connections
from controlplane.auth.model import (
    ACTIVE,
    DEAUTH,
    PENDING,
    REVOKED,
    Connection,
    ConnectionInactive,
    ConnectionRevoked,
    Tokens,
    UnknownUser,
)
from controlplane.auth.outbox import Outbox
from controlplane.auth.providers import Providers
from controlplane.auth.tables import Tables
from controlplane.auth.tokens import TokenStore
from core.errors import HealthflowError
from core.store import now_ms

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, tables: Tables, providers: Providers, connections: Connections, tokens: TokenStore,
                 outbox: Outbox, refresh_skew_s: float = 300.0) -> None:
        self.tables, self.providers, self.connections = tables, providers, connections
        self.tokens, self.outbox, self.refresh_skew_s = tokens, outbox, refresh_skew_s

    def _expiring(self, tokens: Tokens) -> bool:
        return tokens.expires_at_ms is not None and tokens.expires_at_ms - self.refresh_skew_s * 1000 <= now_ms()

    def access_token(self, user_id: str) -> str:
        """A usable access token, refreshed first when it expires within ``refresh_skew_s``."""
        tokens = self.tokens.tokens(user_id)
        if tokens is None:
            raise ConnectionInactive(f"user {user_id} has no tokens ({self.connections.connection(user_id).state}); "
                                     "the user must connect again")
        if not self._expiring(tokens):
            return tokens.access_token
        return self.refresh(user_id, seen_version=tokens.version).access_token

    def refresh(self, user_id: str, *, seen_version: int | None = None, force: bool = False) -> Tokens:
        """Refresh under the connection's lock.

        After the lock is held the tokens are read again: when their version differs from
        ``seen_version`` another worker refreshed meanwhile and its tokens are returned; without
        ``force`` tokens that are not expiring are returned as they are. A refresh the provider
        rejects (``invalid_grant``), or a forced refresh without a refresh token (the provider
        issues one long-lived token, as Polar does, and rejected it), marks the connection revoked,
        emits ``access_revoked`` and raises ``ConnectionRevoked``.
        """
        connection = self.connections.connection(user_id)
        oauth = self.providers.clients[connection.provider]
        revoked: str | None = None
        pending: list[dict[str, Any]] = []
        with self.tables.store.transaction() as cur:
            current = self.tokens.read(cur, user_id, lock=True)
            if current is None:
                raise ConnectionInactive(f"user {user_id} has no tokens; the user must connect again")
            if seen_version is not None and current.version != seen_version:
                return current
            if not force and not self._expiring(current):
                return current
            if not current.refresh_token:  # e.g. Polar: one long-lived token; rejected means the grant is gone
                revoked = "the provider rejected the access token and issued no refresh token"
                pending.append(self._revoke_locally(cur, connection, f"{revoked}; the user must connect again"))
            else:
                try:
                    token = oauth.refresh(current.refresh_token)
                except InvalidGrant as exc:
                    revoked = str(exc)
                    pending.append(self._revoke_locally(cur, connection, f"the provider refused the token refresh "
                                                                         f"({revoked}); the user must connect again"))
                else:
                    return self.tokens.write(cur, user_id, token, current, version=current.version + 1,
                                             insert=False)
        self.outbox.deliver(pending)
        raise ConnectionRevoked(f"user {user_id}: {revoked}")

    def _revoke_locally(self, cur: Any, connection: Connection, message: str) -> dict[str, Any]:
        self.connections.set_state(cur, connection.user_id, REVOKED, now_ms())
        self.tokens.delete(cur, connection.user_id)
        revoked = replace(connection, state=REVOKED)
        return self.outbox.add(cur, ev.access_revoked(revoked.terra_user(), message))

    def mark_revoked(self, user_id: str, message: str = "access was revoked at the provider") -> Connection:
        """The provider said the user withdrew access (e.g. a deregistration webhook). Only an active connection
        is revoked, decided under its row lock: a concurrent disconnect stays a disconnect, without an extra event."""
        with self.tables.store.transaction() as cur:
            connection = self.connections.lock(cur, user_id)
            if connection is None:
                raise UnknownUser(f"no user {user_id!r}")
            if connection.state != ACTIVE:
                return connection
            event = self._revoke_locally(cur, connection, message)
        self.outbox.deliver([event])
        return self.connections.connection(user_id)

    def revoke_account(self, provider: str, provider_user_id: str, message: str) -> list[str]:
        """The provider said the user withdrew access for this account (a deregistration or revocation notice):
        every active connection of the account is revoked (``mark_revoked``); returns their user ids."""
        user_ids = self.connections.active_of_account(self.providers.provider_slug(provider), provider_user_id)
        return [user_id for user_id in user_ids if self.mark_revoked(user_id, message).state == REVOKED]

    def update_scopes(self, user_id: str, scopes: list[str] | str | None) -> Connection:
        """The provider said what the user now shares (e.g. Garmin ``userPermissionsChange``): store it as the
        connection's scopes (Terra's comma-separated string), as it would be after a new consent."""
        self.connections.connection(user_id)  # UnknownUser when there is none
        parts = [str(s) for s in scopes] if isinstance(scopes, list) else re.split(r"[\s,]+", (scopes or "").strip())
        self.connections.set_scopes(user_id, ",".join(p for p in parts if p) or None)
        return self.connections.connection(user_id)

    def deauthenticate(self, user_id: str, dev_id: str | None = None) -> Connection:
        """Disconnect: revoke at the provider (when it has a revoke URL), delete tokens, emit ``deauth``.

        The provider call happens under the token lock so a concurrent refresh cannot leave a fresh,
        unrevoked token behind. A failed provider revocation is logged; the local disconnect stands.
        """
        connection = self.connections.connection(user_id, dev_id)
        if connection.state == DEAUTH:
            return connection
        oauth = self.providers.clients.get(connection.provider)
        with self.tables.store.transaction() as cur:
            tokens = self.tokens.read(cur, user_id, lock=True)
            if tokens is not None and oauth is not None:
                try:
                    oauth.disconnect(tokens.token, connection.provider_user_id)
                except HealthflowError as exc:
                    log.warning("could not revoke %s's grant at %s: %s", user_id, connection.provider, exc)
            self.tokens.delete(cur, user_id)
            self.connections.set_state(cur, user_id, DEAUTH, now_ms())
            done = replace(connection, state=DEAUTH)
            event = self.outbox.add(cur, ev.deauth(done.terra_user())) if connection.state != PENDING else None
        if event:
            self.outbox.deliver([event])
        return done
