"""The connection lifecycle: developers and API keys, widget sessions, OAuth flows, connections, tokens.

Everything lives in the control-plane store (``core.store``: SQLite embedded, PostgreSQL
shared by every worker), in tables named ``<prefix>developers``, ``api_keys``, ``users``,
``oauth_flows``, ``widget_sessions``, ``tokens`` and ``auth_events`` (the event outbox).

A connection ("user", as Terra calls it) gets its ``user_id`` when authentication starts and moves
``pending`` → ``active`` → ``deauth`` (disconnected here) or ``revoked`` (the provider refused its
grant). Tokens are encrypted at rest (``TokenCipher``). Refreshing is serialized per connection:
the token row is locked (``SELECT … FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite)
and re-read, so when two workers race only one spends the refresh token and the other uses the
result. Lifecycle events are written to the outbox in the transaction that changes the state, then
handed to ``emit``.

Each thread gets its own store connection (the API serves requests from a thread pool).

``ControlPlane`` is the facade over the repositories that do the work, one per table or concern:

- ``tables.Tables``: the shared store (one connection per thread) and the table names;
- ``developers.Developers``: developers and API keys;
- ``providers.Providers``: provider manifests and OAuth 2 clients;
- ``connections.Connections``: connections (``users``); ``tokens.TokenStore``: their encrypted tokens;
- ``sessions.WidgetSessions`` and ``sessions.AuthFlows``: widget sessions and pending authorizations;
- ``outbox.Outbox``: the lifecycle-event outbox;
- ``connect.Connect``: the OAuth connect flow; ``lifecycle.Lifecycle``: refresh, revocation, scopes, disconnect.

The types (``Connection``, ``Tokens``, ``WidgetSession``, ``AuthStart``, ``AuthOutcome``, the states and the errors)
live in ``model`` and are importable from here as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from connectors.manifest import Manifest
from connectors.oauth import ProfileFetcher, ProviderOAuth, ProviderSettings
from controlplane.auth.connect import Connect
from controlplane.auth.connections import Connections
from controlplane.auth.developers import Developers
from controlplane.auth.lifecycle import Lifecycle
from controlplane.auth.model import (
    ACTIVE,
    DEAUTH,
    PENDING,
    REVOKED,
    WIDGET_SESSION_TTL_S,
    AuthOutcome,
    AuthStart,
    Connection,
    ConnectionInactive,
    ConnectionRevoked,
    Emit,
    Tokens,
    UnknownProvider,
    UnknownUser,
    WidgetSession,
    check_redirect_url,
    iso,
    with_query,
)
from controlplane.auth.outbox import Outbox
from controlplane.auth.providers import Providers
from controlplane.auth.secrets import TokenCipher
from controlplane.auth.sessions import AuthFlows, WidgetSessions
from controlplane.auth.tables import Tables, check_prefix
from controlplane.auth.tokens import TokenStore
from core.store import Store, now_ms

__all__ = [
    "ACTIVE", "DEAUTH", "PENDING", "REVOKED", "WIDGET_SESSION_TTL_S", "AuthOutcome", "AuthStart", "Connection",
    "ConnectionInactive", "ConnectionRevoked", "ControlPlane", "Emit", "Tokens", "UnknownProvider", "UnknownUser",
    "WidgetSession", "check_redirect_url", "iso", "with_query",
]


class ControlPlane:
    """Developers, connections and their tokens; see the module docstring.

    ``manifests`` defaults to every provider of ``connectors.registry()``; ``settings`` (client
    credentials and URL overrides by provider slug) defaults to ``HEALTHFLOW_<PROVIDER>_*`` from
    ``environ`` (``os.environ``); ``secret_key`` defaults to ``HEALTHFLOW_SECRET_KEY``.
    ``public_url`` is where this server is reached by browsers (callback and widget URLs).
    """

    def __init__(self, store_url: str, secret_key: str | None = None, *, public_url: str = "http://127.0.0.1:8080",
                 emit: Emit | None = None, manifests: Mapping[str, Manifest] | None = None,
                 settings: Mapping[str, ProviderSettings] | None = None, environ: Mapping[str, str] | None = None,
                 table_prefix: str = "healthflow_cp_", refresh_skew_s: float = 300.0, state_ttl_s: float = 900.0,
                 profile_fetchers: Mapping[str, ProfileFetcher] | None = None, http_timeout_s: float = 15.0) -> None:
        check_prefix(table_prefix)
        self.cipher = TokenCipher(secret_key, environ)
        self.tables = Tables(store_url, table_prefix)  # validates the URL now
        self.store_url, self.public_url = store_url, public_url.rstrip("/")
        self.refresh_skew_s, self.state_ttl_s = refresh_skew_s, state_ttl_s
        self.providers = Providers(manifests, settings, environ, profile_fetchers, http_timeout_s)
        self.manifests: dict[str, Manifest] = self.providers.manifests
        t = self.tables
        self.t_devs, self.t_keys, self.t_users = t.devs, t.keys, t.users
        self.t_flows, self.t_sessions, self.t_tokens, self.t_events = t.flows, t.sessions, t.tokens, t.events

        self.developers = Developers(t)
        self.connections_repo = Connections(t, self.manifests)
        self.token_store = TokenStore(t, self.cipher)
        self.widget_sessions = WidgetSessions(t, self.providers)
        self.auth_flows = AuthFlows(t)
        self.outbox = Outbox(t, emit)
        self.connect = Connect(t, self.providers, self.connections_repo, self.token_store, self.auth_flows,
                               self.outbox, self.cipher, self.public_url, state_ttl_s)
        self.lifecycle = Lifecycle(t, self.providers, self.connections_repo, self.token_store, self.outbox,
                                   refresh_skew_s)

    # ------------------------------------------------------------------ store
    @property
    def store(self) -> Store:
        """This thread's store connection."""
        return self.tables.store

    @property
    def emit(self) -> Emit | None:
        return self.outbox.emit

    @emit.setter
    def emit(self, emit: Emit | None) -> None:
        self.outbox.emit = emit

    def open(self) -> ControlPlane:
        ddl = [*self.developers.ddl(), *self.connections_repo.ddl(), *self.auth_flows.ddl(),
               *self.widget_sessions.ddl(), *self.token_store.ddl(), *self.outbox.ddl(self.store.json_type)]
        self.store.create_tables(*ddl)
        return self

    def close(self) -> None:
        self.tables.close()

    def __enter__(self) -> ControlPlane:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop_tables(self) -> None:
        """Remove every control-plane table (tests, teardown)."""
        for table in self.tables.all():
            self.store.execute(f"DROP TABLE IF EXISTS {table}")

    # ------------------------------------------------------------------ developers and API keys
    def create_developer(self, dev_id: str | None = None, name: str | None = None) -> str:
        return self.developers.create_developer(dev_id, name)

    def developer_exists(self, dev_id: str) -> bool:
        return self.developers.developer_exists(dev_id)

    def create_api_key(self, dev_id: str) -> str:
        """A new API key for ``dev_id``; the plaintext is returned once and only its scrypt hash is stored."""
        return self.developers.create_api_key(dev_id)

    def api_keys(self, dev_id: str) -> list[dict[str, Any]]:
        return self.developers.api_keys(dev_id)

    def revoke_api_key(self, key_id: str) -> None:
        self.developers.revoke_api_key(key_id)

    def check_api_key(self, dev_id: str, api_key: str) -> bool:
        """True when ``api_key`` is a live key of ``dev_id`` (constant-time; a revoked key is refused at once, by every
        process). Unthrottled: the API checks keys through ``guard.ApiKeyGuard``."""
        return self.developers.check_api_key(dev_id, api_key)

    # ------------------------------------------------------------------ providers
    def provider_slug(self, name: str) -> str:
        """Slug of a provider given as slug or Terra name (``oura``, ``OURA``)."""
        return self.providers.provider_slug(name)

    def oauth(self, provider: str) -> ProviderOAuth:
        return self.providers.oauth(provider)

    def connectable(self) -> list[str]:
        """Slugs of the OAuth 2 providers that have client credentials."""
        return self.providers.connectable()

    def callback_url(self, slug: str) -> str:
        return self.connect.callback_url(slug)

    # ------------------------------------------------------------------ widget sessions
    def create_widget_session(self, dev_id: str, *, reference_id: str | None = None,
                              providers: Iterable[str] | None = None, language: str | None = None,
                              success_url: str | None = None, failure_url: str | None = None,
                              ttl_s: int = WIDGET_SESSION_TTL_S) -> WidgetSession:
        return self.widget_sessions.create_widget_session(dev_id, reference_id=reference_id, providers=providers,
                                                          language=language, success_url=success_url,
                                                          failure_url=failure_url, ttl_s=ttl_s)

    def widget_session(self, session_id: str) -> WidgetSession | None:
        return self.widget_sessions.widget_session(session_id)

    # ------------------------------------------------------------------ authentication
    def start_auth(self, dev_id: str, provider: str, *, reference_id: str | None = None,
                   success_url: str | None = None, failure_url: str | None = None,
                   widget_session_id: str | None = None) -> AuthStart:
        """Create a pending connection and the provider's authorize URL (with a single-use state)."""
        return self.connect.start_auth(dev_id, provider, reference_id=reference_id, success_url=success_url,
                                       failure_url=failure_url, widget_session_id=widget_session_id)

    def complete_auth(self, provider: str, params: Mapping[str, str]) -> AuthOutcome:
        """Handle the provider's redirect back (``code``/``state`` or ``error``)."""
        return self.connect.complete_auth(provider, params)

    # ------------------------------------------------------------------ connections
    def connection(self, user_id: str, dev_id: str | None = None) -> Connection:
        """The connection ``user_id`` (of ``dev_id`` when given), else UnknownUser."""
        return self.connections_repo.connection(user_id, dev_id)

    def connections(self, dev_id: str, reference_id: str) -> list[Connection]:
        return self.connections_repo.connections(dev_id, reference_id)

    def active_connections(self) -> list[Connection]:
        """Every active connection (what the poller polls)."""
        return self.connections_repo.active_connections()

    def resolve_user(self, provider: str, provider_user_id: str) -> Connection | None:
        """The active connection of a provider account (for mapping provider pushes to ``user_id``)."""
        return self.connections_repo.resolve_user(self.provider_slug(provider), provider_user_id)

    def touch_webhook(self, user_id: str, at_ms: int | None = None) -> None:
        self.connections_repo.touch_webhook(user_id, at_ms)

    # ------------------------------------------------------------------ tokens and the lifecycle
    def tokens(self, user_id: str) -> Tokens | None:
        """The stored (decrypted) tokens, as they are: no refresh."""
        return self.token_store.tokens(user_id)

    def access_token(self, user_id: str) -> str:
        """A usable access token, refreshed first when it expires within ``refresh_skew_s``."""
        return self.lifecycle.access_token(user_id)

    def refresh(self, user_id: str, *, seen_version: int | None = None, force: bool = False) -> Tokens:
        """Refresh under the connection's lock (see ``Lifecycle.refresh``); a refused refresh revokes the
        connection and raises ``ConnectionRevoked``."""
        return self.lifecycle.refresh(user_id, seen_version=seen_version, force=force)

    def mark_revoked(self, user_id: str, message: str = "access was revoked at the provider") -> Connection:
        """The provider said the user withdrew access (e.g. a deregistration webhook). Only an active connection
        is revoked, decided under its row lock: a concurrent disconnect stays a disconnect, without an extra event."""
        return self.lifecycle.mark_revoked(user_id, message)

    def revoke_account(self, provider: str, provider_user_id: str, message: str) -> list[str]:
        """The provider said the user withdrew access for this account (a deregistration or revocation notice):
        every active connection of the account is revoked (``mark_revoked``); returns their user ids."""
        return self.lifecycle.revoke_account(provider, provider_user_id, message)

    def update_scopes(self, user_id: str, scopes: list[str] | str | None) -> Connection:
        """The provider said what the user now shares (e.g. Garmin ``userPermissionsChange``): store it as the
        connection's scopes (Terra's comma-separated string), as it would be after a new consent."""
        return self.lifecycle.update_scopes(user_id, scopes)

    def deauthenticate(self, user_id: str, dev_id: str | None = None) -> Connection:
        """Disconnect: revoke at the provider (when it has a revoke URL), delete tokens, emit ``deauth``."""
        return self.lifecycle.deauthenticate(user_id, dev_id)

    # ------------------------------------------------------------------ events and housekeeping
    def flush_events(self) -> int:
        """Hand over events a failing ``emit`` did not take, oldest first; returns how many were taken."""
        return self.outbox.flush()

    def purge_expired(self, older_than_s: float = 86_400) -> int:
        """Delete expired flows and widget sessions, and pending connections that never completed."""
        cutoff = now_ms() - int(older_than_s * 1000)
        with self.store.transaction() as cur:
            stale = self.connections_repo.purge_pending(cur, cutoff)
            self.auth_flows.purge(cur, cutoff)
            self.widget_sessions.purge(cur, cutoff)
            self.outbox.purge(cur, cutoff)
        return stale
