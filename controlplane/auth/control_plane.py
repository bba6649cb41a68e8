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
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from connectors.manifest import Manifest, OAuth2
from connectors.oauth import InvalidGrant, ProfileFetcher, ProviderOAuth, ProviderSettings, oauth_class
from controlplane.auth import events as ev
from controlplane.auth.secrets import TokenCipher, hash_api_key, new_api_key, parse_api_key, sha256_hex, verify_api_key
from core.errors import FatalError, HealthflowError, PermanentError
from core.store import Store, now_ms

log = logging.getLogger(__name__)

PENDING, ACTIVE, DEAUTH, REVOKED = "pending", "active", "deauth", "revoked"
WIDGET_SESSION_TTL_S = 900
_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_REASON = re.compile(r"^[a-z0-9_.-]{1,64}$")

Emit = Callable[[dict[str, Any]], None]


def iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="microseconds")


class UnknownUser(KeyError):
    """No such connection (or it belongs to another developer)."""


class UnknownProvider(KeyError):
    """No provider of that name."""


class ConnectionInactive(PermanentError):
    """The connection has no usable tokens (pending, deauthenticated or revoked)."""


class ConnectionRevoked(ConnectionInactive):
    """The provider refused the refresh: the user must connect again."""


@dataclass(frozen=True)
class Connection:
    user_id: str
    dev_id: str
    provider: str  # slug
    terra_name: str
    reference_id: str | None
    provider_user_id: str | None
    scopes: str | None
    state: str
    widget_session_id: str | None
    created_at_ms: int
    last_webhook_update_ms: int | None

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def terra_user(self) -> dict[str, Any]:
        """Terra's ``TerraUser``."""
        return {"user_id": self.user_id, "provider": self.terra_name, "reference_id": self.reference_id,
                "scopes": self.scopes, "created_at": iso(self.created_at_ms),
                "last_webhook_update": iso(self.last_webhook_update_ms), "active": self.active}


@dataclass(frozen=True)
class Tokens:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    token_type: str
    expires_at_ms: int | None
    version: int

    @property
    def token(self) -> dict[str, Any]:
        """The RFC 6749 token fields, as the OAuth client takes them."""
        found = {"access_token": self.access_token, "token_type": self.token_type}
        return found | ({"refresh_token": self.refresh_token} if self.refresh_token else {})


@dataclass(frozen=True)
class WidgetSession:
    session_id: str
    dev_id: str
    reference_id: str | None
    providers: tuple[str, ...]  # slugs
    language: str | None
    success_url: str | None
    failure_url: str | None
    expires_at_ms: int

    @property
    def expired(self) -> bool:
        return now_ms() >= self.expires_at_ms


@dataclass(frozen=True)
class AuthStart:
    user_id: str
    auth_url: str
    flow_id: str


@dataclass(frozen=True)
class AuthOutcome:
    """How a callback ended: where to send the browser (None: nowhere known) and why."""

    ok: bool
    redirect_url: str | None
    connection: Connection | None = None
    reason: str | None = None
    message: str = ""


@dataclass
class _Flow:
    flow_id: str
    state_hash: str
    user_id: str
    dev_id: str
    provider: str
    reference_id: str | None
    widget_session_id: str | None
    redirect_uri: str
    success_url: str | None
    failure_url: str | None
    verifier: str | None
    expires_at_ms: int
    used_at_ms: int | None


_USER_COLUMNS = ("user_id, dev_id, provider, reference_id, provider_user_id, scopes, state, widget_session_id, "
                 "created_at_ms, last_webhook_update_ms")
_FLOW_COLUMNS = ("flow_id, state_hash, user_id, dev_id, provider, reference_id, widget_session_id, redirect_uri, "
                 "success_url, failure_url, verifier, expires_at_ms, used_at_ms")


def check_redirect_url(url: str | None, what: str) -> str | None:
    """Absolute http(s) URLs only (never ``javascript:`` and the like)."""
    if url in (None, ""):
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an absolute http(s) URL, got {url!r}")
    return url


def with_query(url: str, params: Mapping[str, str | None]) -> str:
    parts = urlsplit(url)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, f"{parts.query}&{extra}" if parts.query else extra,
                       parts.fragment))


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
                 profile_fetchers: Mapping[str, ProfileFetcher] | None = None, http_timeout_s: float = 15.0,
                 api_key_cache_s: float = 60.0) -> None:
        if not _PREFIX.match(table_prefix):
            raise FatalError(f"table prefix {table_prefix!r} must match {_PREFIX.pattern}")
        self.cipher = TokenCipher(secret_key, environ)
        Store(store_url)  # validates the URL now
        self.store_url, self.public_url, self.emit = store_url, public_url.rstrip("/"), emit
        self.refresh_skew_s, self.state_ttl_s = refresh_skew_s, state_ttl_s
        self.api_key_cache_s = api_key_cache_s
        if manifests is None:
            from connectors import registry

            manifests = {slug: provider.manifest for slug, provider in registry().items()}
        self.manifests: dict[str, Manifest] = dict(manifests)
        fetchers = dict(profile_fetchers or {})
        self._oauth = {
            slug: oauth_class(slug)(manifest, (settings or {}).get(slug) or ProviderSettings.from_env(slug, environ),
                                    fetchers.get(slug), http_timeout_s)
            for slug, manifest in self.manifests.items() if isinstance(manifest.auth, OAuth2)}
        p = table_prefix
        self.t_devs, self.t_keys, self.t_users = f"{p}developers", f"{p}api_keys", f"{p}users"
        self.t_flows, self.t_sessions = f"{p}oauth_flows", f"{p}widget_sessions"
        self.t_tokens, self.t_events = f"{p}tokens", f"{p}auth_events"
        self._local = threading.local()
        self._stores: list[Store] = []
        self._lock = threading.Lock()
        self._key_cache: dict[str, float] = {}

    # ------------------------------------------------------------------ store
    @property
    def store(self) -> Store:
        """This thread's store connection."""
        store = getattr(self._local, "store", None)
        if store is None or store.conn is None:
            store = Store(self.store_url).open()
            with self._lock:
                self._stores.append(store)
            self._local.store = store
        return store

    @property
    def _for_update(self) -> str:
        return " FOR UPDATE" if self.store.dialect == "postgres" else ""

    def open(self) -> ControlPlane:
        store, j = self.store, self.store.json_type
        for ddl in (
            f"CREATE TABLE IF NOT EXISTS {self.t_devs} (dev_id TEXT PRIMARY KEY, name TEXT, created_at_ms BIGINT "
            "NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self.t_keys} (key_id TEXT PRIMARY KEY, dev_id TEXT NOT NULL, salt TEXT NOT "
            "NULL, hash TEXT NOT NULL, created_at_ms BIGINT NOT NULL, revoked_at_ms BIGINT)",
            f"CREATE TABLE IF NOT EXISTS {self.t_users} (user_id TEXT PRIMARY KEY, dev_id TEXT NOT NULL, provider TEXT "
            "NOT NULL, reference_id TEXT, provider_user_id TEXT, scopes TEXT, state TEXT NOT NULL, widget_session_id "
            "TEXT, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL, last_webhook_update_ms BIGINT)",
            f"CREATE INDEX IF NOT EXISTS {self.t_users}_account ON {self.t_users} (provider, provider_user_id)",
            f"CREATE INDEX IF NOT EXISTS {self.t_users}_reference ON {self.t_users} (dev_id, reference_id)",
            f"CREATE TABLE IF NOT EXISTS {self.t_flows} (flow_id TEXT PRIMARY KEY, state_hash TEXT NOT NULL, user_id "
            "TEXT NOT NULL, dev_id TEXT NOT NULL, provider TEXT NOT NULL, reference_id TEXT, widget_session_id TEXT, "
            "redirect_uri TEXT NOT NULL, success_url TEXT, failure_url TEXT, verifier TEXT, created_at_ms BIGINT NOT "
            "NULL, expires_at_ms BIGINT NOT NULL, used_at_ms BIGINT)",
            f"CREATE TABLE IF NOT EXISTS {self.t_sessions} (session_id TEXT PRIMARY KEY, dev_id TEXT NOT NULL, "
            "reference_id TEXT, providers TEXT NOT NULL, language TEXT, success_url TEXT, failure_url TEXT, "
            "created_at_ms BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self.t_tokens} (user_id TEXT PRIMARY KEY, secret TEXT NOT NULL, "
            "expires_at_ms BIGINT, version INTEGER NOT NULL, updated_at_ms BIGINT NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self.t_events} (event_id TEXT PRIMARY KEY, created_at_ms BIGINT NOT NULL, "
            f"body {j} NOT NULL, emitted_at_ms BIGINT)",
        ):
            store.execute(ddl)
        return self

    def close(self) -> None:
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()

    def __enter__(self) -> ControlPlane:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop_tables(self) -> None:
        """Remove every control-plane table (tests, teardown)."""
        for table in (self.t_devs, self.t_keys, self.t_users, self.t_flows, self.t_sessions, self.t_tokens,
                      self.t_events):
            self.store.execute(f"DROP TABLE IF EXISTS {table}")

    # ------------------------------------------------------------------ developers and API keys
    def create_developer(self, dev_id: str | None = None, name: str | None = None) -> str:
        dev_id = dev_id or f"dev-{uuid.uuid4().hex[:12]}"
        self.store.execute(f"INSERT INTO {self.t_devs} (dev_id, name, created_at_ms) VALUES (?, ?, ?)",
                           [dev_id, name, now_ms()])
        return dev_id

    def developer_exists(self, dev_id: str) -> bool:
        return bool(self.store.query(f"SELECT 1 FROM {self.t_devs} WHERE dev_id = ?", [dev_id]))

    def create_api_key(self, dev_id: str) -> str:
        """A new API key for ``dev_id``; the plaintext is returned once and only its scrypt hash is stored."""
        if not self.developer_exists(dev_id):
            raise UnknownUser(f"no developer {dev_id!r}")
        key_id, plaintext = new_api_key()
        salt, digest = hash_api_key(plaintext)
        self.store.execute(f"INSERT INTO {self.t_keys} (key_id, dev_id, salt, hash, created_at_ms) VALUES "
                           "(?, ?, ?, ?, ?)", [key_id, dev_id, salt, digest, now_ms()])
        return plaintext

    def api_keys(self, dev_id: str) -> list[dict[str, Any]]:
        rows = self.store.query(f"SELECT key_id, created_at_ms, revoked_at_ms FROM {self.t_keys} WHERE dev_id = ? "
                                "ORDER BY created_at_ms", [dev_id])
        return [{"key_id": k, "created_at": iso(c), "revoked_at": iso(r)} for k, c, r in rows]

    def revoke_api_key(self, key_id: str) -> None:
        self.store.execute(f"UPDATE {self.t_keys} SET revoked_at_ms = ? WHERE key_id = ?", [now_ms(), key_id])
        with self._lock:
            self._key_cache.clear()

    def check_api_key(self, dev_id: str, api_key: str) -> bool:
        """True when ``api_key`` is a live key of ``dev_id`` (constant-time; verified keys are cached briefly)."""
        cache_key = sha256_hex(f"{dev_id}\0{api_key}")
        with self._lock:
            if self._key_cache.get(cache_key, 0.0) > time.monotonic():
                return True
        key_id = parse_api_key(api_key)
        rows = self.store.query(f"SELECT salt, hash FROM {self.t_keys} WHERE key_id = ? AND dev_id = ? AND "
                                "revoked_at_ms IS NULL", [key_id or "", dev_id]) if key_id else []
        salt, digest = rows[0] if rows else (None, None)
        ok = verify_api_key(api_key, salt, digest)
        if ok and self.api_key_cache_s > 0:
            with self._lock:
                self._key_cache[cache_key] = time.monotonic() + self.api_key_cache_s
        return ok

    # ------------------------------------------------------------------ providers
    def provider_slug(self, name: str) -> str:
        """Slug of a provider given as slug or Terra name (``oura``, ``OURA``)."""
        wanted = (name or "").strip().lower()
        for slug, manifest in self.manifests.items():
            if wanted in (slug, manifest.terra_name.lower()):
                return slug
        raise UnknownProvider(f"unknown provider {name!r}; known: "
                              f"{', '.join(sorted(m.terra_name for m in self.manifests.values()))}")

    def oauth(self, provider: str) -> ProviderOAuth:
        slug = self.provider_slug(provider)
        if slug not in self._oauth:
            raise PermanentError(f"{self.manifests[slug].terra_name} uses {self.manifests[slug].auth.type} auth; "
                                 "only OAuth 2 providers connect through this API")
        return self._oauth[slug]

    def connectable(self) -> list[str]:
        """Slugs of the OAuth 2 providers that have client credentials."""
        return sorted(slug for slug, oauth in self._oauth.items() if oauth.configured)

    def callback_url(self, slug: str) -> str:
        return f"{self.public_url}/v2/auth/callback/{slug}"

    # ------------------------------------------------------------------ widget sessions
    def create_widget_session(self, dev_id: str, *, reference_id: str | None = None,
                              providers: Iterable[str] | None = None, language: str | None = None,
                              success_url: str | None = None, failure_url: str | None = None,
                              ttl_s: int = WIDGET_SESSION_TTL_S) -> WidgetSession:
        slugs = tuple(dict.fromkeys(self.provider_slug(p) for p in providers)) if providers else tuple(
            self.connectable())
        for slug in slugs:
            self.oauth(slug)._require_client()
        session = WidgetSession(secrets.token_urlsafe(24), dev_id, reference_id, slugs, language,
                                check_redirect_url(success_url, "auth_success_redirect_url"),
                                check_redirect_url(failure_url, "auth_failure_redirect_url"),
                                now_ms() + ttl_s * 1000)
        self.store.execute(
            f"INSERT INTO {self.t_sessions} (session_id, dev_id, reference_id, providers, language, success_url, "
            "failure_url, created_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [session.session_id, dev_id, reference_id, ",".join(slugs), language, session.success_url,
             session.failure_url, now_ms(), session.expires_at_ms])
        return session

    def widget_session(self, session_id: str) -> WidgetSession | None:
        rows = self.store.query(f"SELECT session_id, dev_id, reference_id, providers, language, success_url, "
                                f"failure_url, expires_at_ms FROM {self.t_sessions} WHERE session_id = ?", [session_id])
        if not rows:
            return None
        sid, dev, ref, providers, language, ok_url, fail_url, expires = rows[0]
        return WidgetSession(sid, dev, ref, tuple(p for p in providers.split(",") if p), language, ok_url, fail_url,
                             expires)

    # ------------------------------------------------------------------ authentication
    def start_auth(self, dev_id: str, provider: str, *, reference_id: str | None = None,
                   success_url: str | None = None, failure_url: str | None = None,
                   widget_session_id: str | None = None) -> AuthStart:
        """Create a pending connection and the provider's authorize URL (with a single-use state)."""
        oauth = self.oauth(provider)
        slug = oauth.slug
        success_url = check_redirect_url(success_url, "auth_success_redirect_url")
        failure_url = check_redirect_url(failure_url, "auth_failure_redirect_url")
        user_id, flow_id, secret = str(uuid.uuid4()), uuid.uuid4().hex, secrets.token_urlsafe(32)
        state = f"{flow_id}.{secret}"
        verifier = oauth.new_code_verifier()
        redirect_uri = self.callback_url(slug)
        auth_url = oauth.authorization_url(redirect_uri, state, verifier)
        at = now_ms()
        with self.store.transaction() as cur:
            cur.execute(f"INSERT INTO {self.t_users} (user_id, dev_id, provider, reference_id, state, "
                        "widget_session_id, created_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [user_id, dev_id, slug, reference_id, PENDING, widget_session_id, at, at])
            cur.execute(f"INSERT INTO {self.t_flows} ({_FLOW_COLUMNS}, created_at_ms) VALUES "
                        f"({', '.join('?' * 14)})",
                        [flow_id, sha256_hex(secret), user_id, dev_id, slug, reference_id, widget_session_id,
                         redirect_uri, success_url, failure_url,
                         self.cipher.encrypt(flow_id, verifier) if verifier else None,
                         at + int(self.state_ttl_s * 1000), None, at])
        return AuthStart(user_id, auth_url, flow_id)

    def complete_auth(self, provider: str, params: Mapping[str, str]) -> AuthOutcome:
        """Handle the provider's redirect back (``code``/``state`` or ``error``)."""
        slug = self.provider_slug(provider)
        flow_id, _, secret = (params.get("state") or "").partition(".")
        at = now_ms()
        pending: list[dict[str, Any]] = []
        with self.store.transaction() as cur:
            rows = cur.execute(f"SELECT {_FLOW_COLUMNS} FROM {self.t_flows} WHERE flow_id = ?{self._for_update}",
                               [flow_id]).fetchall()
            if not rows:
                return AuthOutcome(False, None, reason="invalid_state",
                                   message="unknown or malformed state: start the connection again")
            flow = _Flow(*rows[0])
            reason, message = self._check_callback(flow, slug, secret, params, at)
            if flow.used_at_ms is None:
                cur.execute(f"UPDATE {self.t_flows} SET used_at_ms = ? WHERE flow_id = ?", [at, flow.flow_id])
            if reason:
                if reason != "state_reused":
                    cur.execute(f"DELETE FROM {self.t_users} WHERE user_id = ? AND state = ?", [flow.user_id, PENDING])
                pending.append(self._outbox(cur, self._cancelled(flow, reason, message)))
        if reason:
            self._deliver(pending)
            return self._failure(flow, reason, message)
        oauth = self._oauth[slug]
        try:
            verifier = self.cipher.decrypt(flow.flow_id, flow.verifier) if flow.verifier else None
            token = oauth.exchange_code(params["code"], flow.redirect_uri, verifier)
            provider_user_id = oauth.provider_user_id(token)
            if not provider_user_id:
                raise PermanentError(f"{slug}: cannot tell which provider account connected (no user id in the "
                                     "token response and no profile call)")
            oauth.after_connect(token, provider_user_id)
        except HealthflowError as exc:
            log.warning("auth %s for %s failed: %s", flow.flow_id, slug, exc)
            return self._abandon(flow, "token_exchange_failed", f"the provider did not grant access: {exc}")
        return self._activate(flow, token, provider_user_id)

    def _check_callback(self, flow: _Flow, slug: str, secret: str, params: Mapping[str, str],
                        at: int) -> tuple[str | None, str]:
        if flow.used_at_ms is not None:
            return "state_reused", "this authorization was already completed or abandoned; start again"
        if not hmac.compare_digest(sha256_hex(secret), flow.state_hash) or flow.provider != slug:
            return "state_mismatch", "the state sent back does not match the one issued"
        if at > flow.expires_at_ms:
            return "state_expired", "the authorization took too long; start again"
        if params.get("error"):
            error = params["error"]
            return (error if _REASON.match(error) else "provider_error"), (
                f"the provider answered {error[:64]}: {(params.get('error_description') or '')[:200]}".rstrip(": "))
        if not params.get("code"):
            return "missing_code", "the provider sent neither a code nor an error"
        return None, ""

    def _cancelled(self, flow: _Flow, reason: str, message: str) -> dict[str, Any]:
        return ev.auth_cancelled(reason, self.manifests[flow.provider].terra_name, flow.reference_id,
                                 flow.widget_session_id, flow.flow_id, message)

    def _failure(self, flow: _Flow, reason: str, message: str) -> AuthOutcome:
        url = flow.failure_url and with_query(flow.failure_url, {
            "reason": reason, "resource": self.manifests[flow.provider].terra_name, "reference_id": flow.reference_id})
        return AuthOutcome(False, url, reason=reason, message=message)

    def _abandon(self, flow: _Flow, reason: str, message: str) -> AuthOutcome:
        with self.store.transaction() as cur:
            cur.execute(f"DELETE FROM {self.t_users} WHERE user_id = ? AND state = ?", [flow.user_id, PENDING])
            event = self._outbox(cur, self._cancelled(flow, reason, message))
        self._deliver([event])
        return self._failure(flow, reason, message)

    def _activate(self, flow: _Flow, token: dict[str, Any], provider_user_id: str) -> AuthOutcome:
        at = now_ms()
        scopes = _scopes(token.get("scope"), self._oauth[flow.provider])
        pending: list[dict[str, Any]] = []
        with self.store.transaction() as cur:
            rows = cur.execute(f"SELECT state FROM {self.t_users} WHERE user_id = ?{self._for_update}",
                               [flow.user_id]).fetchall()
            if not rows or rows[0][0] != PENDING:
                return self._failure(flow, "state_expired", "the pending connection no longer exists; start again")
            olds = [self._connection(row) for row in cur.execute(
                f"SELECT {_USER_COLUMNS} FROM {self.t_users} WHERE dev_id = ? AND provider = ? AND provider_user_id "
                f"= ? AND user_id <> ? AND state IN (?, ?)",
                [flow.dev_id, flow.provider, provider_user_id, flow.user_id, ACTIVE, REVOKED]).fetchall()]
            for old in olds:  # superseded locally; not revoked at the provider, which could end the new grant too
                cur.execute(f"UPDATE {self.t_users} SET state = ?, updated_at_ms = ? WHERE user_id = ?",
                            [DEAUTH, at, old.user_id])
                cur.execute(f"DELETE FROM {self.t_tokens} WHERE user_id = ?", [old.user_id])
            cur.execute(f"UPDATE {self.t_users} SET state = ?, provider_user_id = ?, scopes = ?, updated_at_ms = ? "
                        "WHERE user_id = ?", [ACTIVE, provider_user_id, scopes, at, flow.user_id])
            self._write_tokens(cur, flow.user_id, token, None, version=1, insert=True)
            connection = self._connection(cur.execute(f"SELECT {_USER_COLUMNS} FROM {self.t_users} WHERE user_id "
                                                      "= ?", [flow.user_id]).fetchall()[0])
            for old in olds:
                superseded = replace(old, state=DEAUTH)
                pending.append(self._outbox(cur, ev.user_reauth(connection.terra_user(), superseded.terra_user())))
            pending.append(self._outbox(cur, ev.auth_success(connection.terra_user(), flow.widget_session_id,
                                                             flow.flow_id)))
        self._deliver(pending)
        url = flow.success_url and with_query(flow.success_url, {
            "user_id": connection.user_id, "resource": connection.terra_name, "reference_id": connection.reference_id})
        return AuthOutcome(True, url, connection, message="connected")

    # ------------------------------------------------------------------ connections
    def _connection(self, row: tuple[Any, ...]) -> Connection:
        user_id, dev_id, provider, ref, puid, scopes, state, wsid, created, webhook = row
        manifest = self.manifests.get(provider)
        return Connection(user_id, dev_id, provider, manifest.terra_name if manifest else provider.upper(), ref, puid,
                          scopes, state, wsid, created, webhook)

    def connection(self, user_id: str, dev_id: str | None = None) -> Connection:
        """The connection ``user_id`` (of ``dev_id`` when given), else UnknownUser."""
        rows = self.store.query(f"SELECT {_USER_COLUMNS} FROM {self.t_users} WHERE user_id = ?", [user_id])
        if not rows or (dev_id is not None and rows[0][1] != dev_id):
            raise UnknownUser(f"no user {user_id!r}")
        return self._connection(rows[0])

    def connections(self, dev_id: str, reference_id: str) -> list[Connection]:
        rows = self.store.query(f"SELECT {_USER_COLUMNS} FROM {self.t_users} WHERE dev_id = ? AND reference_id = ? "
                                "ORDER BY created_at_ms", [dev_id, reference_id])
        return [self._connection(row) for row in rows]

    def active_connections(self) -> list[Connection]:
        """Every active connection (what the poller polls)."""
        rows = self.store.query(f"SELECT {_USER_COLUMNS} FROM {self.t_users} WHERE state = ? ORDER BY created_at_ms",
                                [ACTIVE])
        return [self._connection(row) for row in rows]

    def resolve_user(self, provider: str, provider_user_id: str) -> Connection | None:
        """The active connection of a provider account (for mapping provider pushes to ``user_id``)."""
        rows = self.store.query(f"SELECT {_USER_COLUMNS} FROM {self.t_users} WHERE provider = ? AND "
                                "provider_user_id = ? AND state = ? ORDER BY created_at_ms DESC",
                                [self.provider_slug(provider), provider_user_id, ACTIVE])
        return self._connection(rows[0]) if rows else None

    def touch_webhook(self, user_id: str, at_ms: int | None = None) -> None:
        self.store.execute(f"UPDATE {self.t_users} SET last_webhook_update_ms = ? WHERE user_id = ?",
                           [at_ms or now_ms(), user_id])

    # ------------------------------------------------------------------ tokens
    def _write_tokens(self, cur: Any, user_id: str, token: dict[str, Any], previous: Tokens | None, *, version: int,
                      insert: bool) -> Tokens:
        expires_at = token.get("expires_at")
        tokens = Tokens(str(token["access_token"]),
                        token.get("refresh_token") or (previous.refresh_token if previous else None),
                        str(token.get("token_type") or "Bearer"),
                        int(float(expires_at) * 1000) if expires_at else None, version)
        secret = self.cipher.encrypt(user_id, {"access_token": tokens.access_token,
                                               "refresh_token": tokens.refresh_token, "token_type": tokens.token_type})
        if insert:
            cur.execute(f"INSERT INTO {self.t_tokens} (user_id, secret, expires_at_ms, version, updated_at_ms) VALUES "
                        "(?, ?, ?, ?, ?)", [user_id, secret, tokens.expires_at_ms, version, now_ms()])
        else:
            cur.execute(f"UPDATE {self.t_tokens} SET secret = ?, expires_at_ms = ?, version = ?, updated_at_ms = ? "
                        "WHERE user_id = ?", [secret, tokens.expires_at_ms, version, now_ms(), user_id])
        return tokens

    def _read_tokens(self, cur: Any, user_id: str, lock: bool) -> Tokens | None:
        rows = cur.execute(f"SELECT secret, expires_at_ms, version FROM {self.t_tokens} WHERE user_id = ?"
                           f"{self._for_update if lock else ''}", [user_id]).fetchall()
        if not rows:
            return None
        secret, expires_at_ms, version = rows[0]
        value = self.cipher.decrypt(user_id, secret)
        return Tokens(value["access_token"], value.get("refresh_token"), value.get("token_type") or "Bearer",
                      expires_at_ms, version)

    def tokens(self, user_id: str) -> Tokens | None:
        """The stored (decrypted) tokens, as they are: no refresh."""
        with self.store.transaction() as cur:
            return self._read_tokens(cur, user_id, lock=False)

    def _expiring(self, tokens: Tokens) -> bool:
        return tokens.expires_at_ms is not None and tokens.expires_at_ms - self.refresh_skew_s * 1000 <= now_ms()

    def access_token(self, user_id: str) -> str:
        """A usable access token, refreshed first when it expires within ``refresh_skew_s``."""
        tokens = self.tokens(user_id)
        if tokens is None:
            raise ConnectionInactive(f"user {user_id} has no tokens ({self.connection(user_id).state}); "
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
        connection = self.connection(user_id)
        oauth = self._oauth[connection.provider]
        revoked: str | None = None
        pending: list[dict[str, Any]] = []
        with self.store.transaction() as cur:
            current = self._read_tokens(cur, user_id, lock=True)
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
                    return self._write_tokens(cur, user_id, token, current, version=current.version + 1,
                                              insert=False)
        self._deliver(pending)
        raise ConnectionRevoked(f"user {user_id}: {revoked}")

    def _revoke_locally(self, cur: Any, connection: Connection, message: str) -> dict[str, Any]:
        cur.execute(f"UPDATE {self.t_users} SET state = ?, updated_at_ms = ? WHERE user_id = ?",
                    [REVOKED, now_ms(), connection.user_id])
        cur.execute(f"DELETE FROM {self.t_tokens} WHERE user_id = ?", [connection.user_id])
        revoked = replace(connection, state=REVOKED)
        return self._outbox(cur, ev.access_revoked(revoked.terra_user(), message))

    def mark_revoked(self, user_id: str, message: str = "access was revoked at the provider") -> Connection:
        """The provider said the user withdrew access (e.g. a deregistration webhook). Only an active connection
        is revoked, decided under its row lock: a concurrent disconnect stays a disconnect, without an extra event."""
        with self.store.transaction() as cur:
            rows = cur.execute(f"SELECT {_USER_COLUMNS} FROM {self.t_users} WHERE user_id = ?{self._for_update}",
                               [user_id]).fetchall()
            if not rows:
                raise UnknownUser(f"no user {user_id!r}")
            connection = self._connection(rows[0])
            if connection.state != ACTIVE:
                return connection
            event = self._revoke_locally(cur, connection, message)
        self._deliver([event])
        return self.connection(user_id)

    def revoke_account(self, provider: str, provider_user_id: str, message: str) -> list[str]:
        """The provider said the user withdrew access for this account (a deregistration or revocation notice):
        every active connection of the account is revoked (``mark_revoked``); returns their user ids."""
        rows = self.store.query(f"SELECT user_id FROM {self.t_users} WHERE provider = ? AND provider_user_id = ? "
                                "AND state = ? ORDER BY created_at_ms DESC",
                                [self.provider_slug(provider), provider_user_id, ACTIVE])
        return [user_id for (user_id,) in rows if self.mark_revoked(user_id, message).state == REVOKED]

    def update_scopes(self, user_id: str, scopes: list[str] | str | None) -> Connection:
        """The provider said what the user now shares (e.g. Garmin ``userPermissionsChange``): store it as the
        connection's scopes (Terra's comma-separated string), as it would be after a new consent."""
        self.connection(user_id)  # UnknownUser when there is none
        parts = [str(s) for s in scopes] if isinstance(scopes, list) else re.split(r"[\s,]+", (scopes or "").strip())
        self.store.execute(f"UPDATE {self.t_users} SET scopes = ?, updated_at_ms = ? WHERE user_id = ?",
                           [",".join(p for p in parts if p) or None, now_ms(), user_id])
        return self.connection(user_id)

    def deauthenticate(self, user_id: str, dev_id: str | None = None) -> Connection:
        """Disconnect: revoke at the provider (when it has a revoke URL), delete tokens, emit ``deauth``.

        The provider call happens under the token lock so a concurrent refresh cannot leave a fresh,
        unrevoked token behind. A failed provider revocation is logged; the local disconnect stands.
        """
        connection = self.connection(user_id, dev_id)
        if connection.state == DEAUTH:
            return connection
        oauth = self._oauth.get(connection.provider)
        with self.store.transaction() as cur:
            tokens = self._read_tokens(cur, user_id, lock=True)
            if tokens is not None and oauth is not None:
                try:
                    oauth.disconnect(tokens.token, connection.provider_user_id)
                except HealthflowError as exc:
                    log.warning("could not revoke %s's grant at %s: %s", user_id, connection.provider, exc)
            cur.execute(f"DELETE FROM {self.t_tokens} WHERE user_id = ?", [user_id])
            cur.execute(f"UPDATE {self.t_users} SET state = ?, updated_at_ms = ? WHERE user_id = ?",
                        [DEAUTH, now_ms(), user_id])
            done = replace(connection, state=DEAUTH)
            event = self._outbox(cur, ev.deauth(done.terra_user())) if connection.state != PENDING else None
        if event:
            self._deliver([event])
        return done

    # ------------------------------------------------------------------ events and housekeeping
    def _outbox(self, cur: Any, event: dict[str, Any]) -> dict[str, Any]:
        event_id = uuid.uuid4().hex
        cur.execute(f"INSERT INTO {self.t_events} (event_id, created_at_ms, body) VALUES (?, ?, ?)",
                    [event_id, now_ms(), json.dumps(event, separators=(",", ":"))])
        return {"event_id": event_id, "event": event}

    def _deliver(self, pending: list[dict[str, Any]]) -> int:
        if self.emit is None:
            return 0
        done = 0
        for item in pending:
            try:
                self.emit(item["event"])
            except Exception:
                log.exception("emit failed for a %s event; kept in the outbox for flush_events()",
                              item["event"].get("type"))
                continue
            self.store.execute(f"UPDATE {self.t_events} SET emitted_at_ms = ? WHERE event_id = ?",
                               [now_ms(), item["event_id"]])
            done += 1
        return done

    def flush_events(self) -> int:
        """Hand over events a failing ``emit`` did not take, oldest first; returns how many were taken."""
        rows = self.store.query(f"SELECT event_id, body FROM {self.t_events} WHERE emitted_at_ms IS NULL "
                                "ORDER BY created_at_ms, event_id")
        return self._deliver([{"event_id": eid, "event": self.store.load_json(body)} for eid, body in rows])

    def purge_expired(self, older_than_s: float = 86_400) -> int:
        """Delete expired flows and widget sessions, and pending connections that never completed."""
        cutoff = now_ms() - int(older_than_s * 1000)
        with self.store.transaction() as cur:
            stale = cur.execute(f"SELECT user_id FROM {self.t_users} WHERE state = ? AND created_at_ms < ?",
                                [PENDING, cutoff]).fetchall()
            cur.execute(f"DELETE FROM {self.t_users} WHERE state = ? AND created_at_ms < ?", [PENDING, cutoff])
            cur.execute(f"DELETE FROM {self.t_flows} WHERE expires_at_ms < ? OR user_id NOT IN "
                        f"(SELECT user_id FROM {self.t_users})", [cutoff])
            cur.execute(f"DELETE FROM {self.t_sessions} WHERE expires_at_ms < ?", [cutoff])
            cur.execute(f"DELETE FROM {self.t_events} WHERE emitted_at_ms IS NOT NULL AND emitted_at_ms < ?", [cutoff])
        return len(stale)


def _scopes(granted: Any, oauth: ProviderOAuth) -> str | None:
    """Terra's comma-separated scope string: what the provider granted, else what was asked for."""
    if isinstance(granted, list | tuple):
        parts = [str(s) for s in granted]
    elif isinstance(granted, str) and granted.strip():
        parts = re.split(r"[\s,]+", granted.strip())
    else:
        parts = list(oauth.auth.scopes)
    return ",".join(p for p in parts if p) or None
