"""A fake OAuth 2 provider on loopback (real HTTP, ``http.server`` in a thread), plus pytest fixtures for auth tests.

Endpoints (paths configurable; the defaults match Oura's ``/oauth/authorize`` and ``/oauth/token``):

- ``GET /oauth/authorize``: auto-approves and redirects to ``redirect_uri`` with ``code`` and ``state``
  (as the account ``next_account``), or with ``error=access_denied`` while ``deny`` is set. A client
  registered with ``require_pkce`` must send ``code_challenge`` (S256).
- ``POST /oauth/token``: ``authorization_code`` (single-use code, redirect_uri must match, PKCE
  verified) and ``refresh_token``. Client authentication as registered (``basic`` header or ``body``
  fields). Access tokens expire after ``expires_in`` seconds; refresh tokens rotate (``rotate``) and a
  reused old refresh token is rejected with ``invalid_grant`` and ends the grant (reuse detection).
  ``refresh_delay_s`` slows refreshes down to widen race windows.
- ``POST /oauth/revoke``: RFC 7009; ends the grant of the token.
- ``GET /profile``: ``{"user_id": …}`` for a live bearer token, else 401.

``calls`` counts requests (``authorize``, ``token:authorization_code``, ``token:refresh_token``,
``revoke``, ``profile``); ``reused_refresh_tokens`` lists refresh tokens presented twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

from pipelines.embedded import LoopbackService, dispatching_handler, send_reply


@dataclass
class FakeClient:
    client_id: str
    client_secret: str
    client_auth: str = "body"  # "basic" | "body"
    require_pkce: bool = False


@dataclass
class _Grant:
    client_id: str
    account: str
    scope: str
    active: bool = True


@dataclass
class FakeProvider(LoopbackService):
    clients: dict[str, FakeClient] = field(default_factory=dict)
    expires_in: int = 3600
    rotate: bool = True
    include_user_id: bool = True
    refresh_delay_s: float = 0.0
    next_account: str = "acct-1"
    deny: bool = False
    authorize_path: str = "/oauth/authorize"
    token_path: str = "/oauth/token"
    revoke_path: str = "/oauth/revoke"

    def __post_init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.reused_refresh_tokens: list[str] = []
        self.revoked_tokens: list[str] = []
        self.token_requests: list[dict[str, str]] = []
        self.authorize_requests: list[dict[str, str]] = []
        self._codes: dict[str, dict[str, Any]] = {}
        self._grants: dict[str, _Grant] = {}
        self._refresh: dict[str, tuple[str, bool]] = {}  # token -> (grant id, used)
        self._access: dict[str, tuple[str, float]] = {}  # token -> (grant id, expires at)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def register(self, client_id: str, client_secret: str, client_auth: str = "body",
                 require_pkce: bool = False) -> FakeClient:
        client = FakeClient(client_id, client_secret, client_auth, require_pkce)
        self.clients[client_id] = client
        return client

    service_name = "fake-provider"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return dispatching_handler(self._handle, protocol="HTTP/1.0")

    # ------------------------------------------------------------------ test controls
    def revoke_account(self, account: str) -> None:
        """The user withdrew access at the provider: every grant of the account ends."""
        with self._lock:
            for grant in self._grants.values():
                if grant.account == account:
                    grant.active = False

    def expire_access_tokens(self) -> None:
        with self._lock:
            self._access = {token: (grant, 0.0) for token, (grant, _) in self._access.items()}

    def live_refresh_tokens(self) -> list[str]:
        with self._lock:
            return [t for t, (g, used) in self._refresh.items() if not used and self._grants[g].active]

    # ------------------------------------------------------------------ HTTP
    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        form: dict[str, str] = {}
        if method == "POST":
            length = int(request.headers.get("Content-Length") or 0)
            form = {k: v[-1] for k, v in parse_qs(request.rfile.read(length).decode()).items()}
        routes = {("GET", self.authorize_path): self._authorize, ("POST", self.token_path): self._token,
                  ("POST", self.revoke_path): self._revoke, ("GET", "/profile"): self._profile}
        handler = routes.get((method, parts.path))
        if handler is None:
            status, headers, body = 404, {}, {"error": "not_found"}
        else:
            status, headers, body = handler(query, form, request.headers)
        send_reply(request, status, json.dumps(body).encode() if body is not None else b"", "application/json", headers)

    def _authorize(self, query: dict[str, str], _form: dict[str, str], _headers: Any) -> tuple[int, dict, Any]:
        with self._lock:
            self.calls["authorize"] += 1
            self.authorize_requests.append(dict(query))
            client = self.clients.get(query.get("client_id", ""))
            redirect_uri = query.get("redirect_uri")
            if client is None or not redirect_uri or query.get("response_type") != "code":
                return 400, {}, {"error": "invalid_request", "error_description": "unknown client or no redirect_uri"}
            back = {"state": query.get("state")}
            if self.deny:
                back["error"] = "access_denied"
            elif client.require_pkce and (not query.get("code_challenge")
                                          or query.get("code_challenge_method") != "S256"):
                back.update(error="invalid_request", error_description="PKCE S256 required")
            else:
                code = secrets.token_urlsafe(16)
                self._codes[code] = {"client_id": client.client_id, "redirect_uri": redirect_uri,
                                     "challenge": query.get("code_challenge"), "scope": query.get("scope", ""),
                                     "account": self.next_account}
                back["code"] = code
        sep = "&" if "?" in redirect_uri else "?"
        return 302, {"Location": f"{redirect_uri}{sep}{urlencode({k: v for k, v in back.items() if v})}"}, None

    def _client(self, form: dict[str, str], headers: Any) -> FakeClient | None:
        auth = headers.get("Authorization") or ""
        if auth.startswith("Basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, secret, mode = unquote(client_id), unquote(secret), "basic"
        else:
            client_id, secret, mode = form.get("client_id", ""), form.get("client_secret", ""), "body"
        client = self.clients.get(client_id)
        if client is None or client.client_auth != mode or not secrets.compare_digest(client.client_secret, secret):
            return None
        return client

    def _issue(self, grant_id: str, refresh_token: str | None) -> dict[str, Any]:
        grant = self._grants[grant_id]
        access = secrets.token_urlsafe(24)
        self._access[access] = (grant_id, time.time() + self.expires_in)
        if refresh_token is None:
            refresh_token = secrets.token_urlsafe(24)
            self._refresh[refresh_token] = (grant_id, False)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": self.expires_in,
                                "refresh_token": refresh_token, "scope": grant.scope}
        if self.include_user_id:
            body["user_id"] = grant.account
        return body

    def _token(self, _query: dict[str, str], form: dict[str, str], headers: Any) -> tuple[int, dict, Any]:
        grant_type = form.get("grant_type", "")
        self.calls[f"token:{grant_type}"] += 1
        self.token_requests.append(dict(form))
        client = self._client(form, headers)
        if client is None:
            return 401, {}, {"error": "invalid_client", "error_description": "client authentication failed"}
        if grant_type == "authorization_code":
            with self._lock:
                code = self._codes.get(form.get("code", ""))
                if code is None or code["client_id"] != client.client_id:
                    return 400, {}, {"error": "invalid_grant", "error_description": "unknown or used code"}
                if code["redirect_uri"] != form.get("redirect_uri"):
                    return 400, {}, {"error": "invalid_grant", "error_description": "redirect_uri mismatch"}
                if code["challenge"]:
                    verifier = form.get("code_verifier", "")
                    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
                    if not verifier or not secrets.compare_digest(digest, code["challenge"]):
                        return 400, {}, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
                del self._codes[form["code"]]
                grant_id = secrets.token_hex(8)
                self._grants[grant_id] = _Grant(client.client_id, code["account"], code["scope"])
                return 200, {}, self._issue(grant_id, None)
        if grant_type == "refresh_token":
            token = form.get("refresh_token", "")
            with self._lock:
                found = self._refresh.get(token)
                if found is None:
                    return 400, {}, {"error": "invalid_grant", "error_description": "unknown refresh token"}
                grant_id, used = found
                grant = self._grants[grant_id]
                if used:  # reuse of a rotated token: assume theft, end the whole grant
                    self.reused_refresh_tokens.append(token)
                    grant.active = False
                    return 400, {}, {"error": "invalid_grant", "error_description": "refresh token reused"}
                if not grant.active or grant.client_id != client.client_id:
                    return 400, {}, {"error": "invalid_grant", "error_description": "grant revoked"}
                if self.rotate:
                    self._refresh[token] = (grant_id, True)
            if self.refresh_delay_s:
                time.sleep(self.refresh_delay_s)
            with self._lock:
                return 200, {}, self._issue(grant_id, None if self.rotate else token)
        return 400, {}, {"error": "unsupported_grant_type"}

    def _revoke(self, _query: dict[str, str], form: dict[str, str], headers: Any) -> tuple[int, dict, Any]:
        self.calls["revoke"] += 1
        if self._client(form, headers) is None:
            return 401, {}, {"error": "invalid_client"}
        token = form.get("token", "")
        with self._lock:
            self.revoked_tokens.append(token)
            grant_id = (self._refresh.get(token) or self._access.get(token) or (None,))[0]
            if grant_id is not None:
                self._grants[grant_id].active = False
        return 200, {}, None

    def is_live(self, access_token: str) -> bool:
        """Whether this provider would accept ``access_token`` now (issued, unexpired, grant not revoked)."""
        with self._lock:
            found = self._access.get(access_token)
            return found is not None and found[1] >= time.time() and self._grants[found[0]].active

    def _profile(self, _query: dict[str, str], _form: dict[str, str], headers: Any) -> tuple[int, dict, Any]:
        self.calls["profile"] += 1
        token = (headers.get("Authorization") or "").removeprefix("Bearer ")
        if not self.is_live(token):
            return 401, {}, {"error": "invalid_token"}
        with self._lock:
            return 200, {}, {"user_id": self._grants[self._access[token][0]].account}


def fake_manifests() -> dict[str, Any]:
    """Two providers served by FakeProvider: ``fakebody`` (client_secret in the body, no PKCE, no revoke URL) and
    ``fakepkce`` (Basic client auth, PKCE S256, comma-separated scopes, a revoke URL). Their URLs are placeholders:
    point ``ProviderSettings.oauth_base`` at the running fake."""
    from connectors.manifest import Manifest

    def manifest(slug: str, **auth: Any) -> Manifest:
        return Manifest.model_validate({
            "provider": slug, "terra_name": slug.upper(), "display_name": f"Fake {slug[4:].upper()}",
            "auth": {"type": "oauth2", "authorize_url": "https://accounts.fake.example/oauth/authorize",
                     "token_url": "https://api.fake.example/oauth/token", **auth}})

    return {"fakebody": manifest("fakebody", scopes=["daily", "sleep"], client_auth="body"),
            "fakepkce": manifest("fakepkce", scopes=["activity", "heartrate"], scope_separator=",", pkce=True,
                                 client_auth="basic", revoke_url="https://api.fake.example/oauth/revoke")}


def fake_settings(provider: FakeProvider) -> dict[str, Any]:
    """Registers both fake clients on ``provider`` and returns ``ProviderSettings`` by slug."""
    from connectors.oauth import ProviderSettings

    provider.register("body-client", "body-secret", "body")
    provider.register("pkce-client", "pkce-secret", "basic", require_pkce=True)
    return {"fakebody": ProviderSettings("body-client", "body-secret", oauth_base=provider.base_url),
            "fakepkce": ProviderSettings("pkce-client", "pkce-secret", oauth_base=provider.base_url)}


def authorize(auth_url: str) -> str:
    """Play the browser at the provider: GET the authorize URL and return where the provider redirects to."""
    import requests

    response = requests.get(auth_url, allow_redirects=False, timeout=10)
    assert response.status_code == 302, response.text
    return response.headers["Location"]


def query_of(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


# ======================================================================================================================
# pytest fixtures for tests/test_auth_*.py and tests/test_api_*.py: pytest_plugins = ("servers.fake_provider",)
# ======================================================================================================================
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def fake_provider():
    """A started FakeProvider (register clients on it)."""
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(scope="session")
def _pg_database():
    """A throwaway PostgreSQL database for the session (dropped at the end); None when PostgreSQL is absent."""
    import psycopg

    name = f"hf_auth_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        yield None
        return
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """The control-plane store URL: an SQLite file, or the session's throwaway PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/control.db"
    url = request.getfixturevalue("_pg_database")
    if url is None:
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (.ci/ensure-services starts it)")
    return url


@pytest.fixture
def table_prefix() -> str:
    """Unique table names per test (several tests share the PostgreSQL database)."""
    return f"hf_{secrets.token_hex(4)}_"


def connect_provider(store_url: str, provider: FakeProvider, slug: str, account: str, *, emit: Any = None,
                     dev_id: str = "dev-1", reference_id: str = "athlete-1", api_base: str | None = None,
                     secret_key: str | None = None) -> tuple[Any, Any]:
    """A ControlPlane for the real provider ``slug`` whose OAuth is played by ``provider``, and one
    connection of ``account`` made through the real OAuth client code: ``(control_plane, start)``.
    ``api_base`` points the provider's API calls made by the OAuth client (profile, registration) at a fake;
    ``secret_key`` is the Fernet key tokens are encrypted with (default: a new one)."""
    from cryptography.fernet import Fernet

    from connectors import registry
    from connectors.oauth import ProviderSettings
    from controlplane.auth import ControlPlane, MemoryCollector

    manifest = registry()[slug].manifest
    provider.register(f"{slug}-client", "secret", manifest.auth.client_auth, require_pkce=manifest.auth.pkce)
    provider.next_account = account
    # the provider's real manifest, its OAuth paths as the fake serves them (its base URL replaces the host)
    urls = {"authorize_url": provider.authorize_path, "token_url": provider.token_path}
    if manifest.auth.revoke_url:
        urls["revoke_url"] = provider.revoke_path
    auth = manifest.auth.model_copy(update={name: f"https://{slug}.example{path}" for name, path in urls.items()})
    plane = ControlPlane(store_url, secret_key or Fernet.generate_key().decode(), public_url="http://127.0.0.1:9",
                         environ={},
                         manifests={slug: manifest.model_copy(update={"auth": auth})},
                         emit=emit if emit is not None else MemoryCollector(),
                         settings={slug: ProviderSettings(f"{slug}-client", "secret", oauth_base=provider.base_url,
                                                         api_base=api_base)},
                         profile_fetchers={}).open()
    start = plane.start_auth(dev_id, slug, reference_id=reference_id)
    assert plane.complete_auth(slug, query_of(authorize(start.auth_url))).ok
    return plane, start


def assert_disconnected(plane: Any, polling: Any, api: Any, user_id: str, events: Any) -> None:
    """After a deauth: a poll round reaches the provider's API with no request and polls nothing, the tokens are
    gone, and the connection's lifecycle was exactly ``auth`` then ``deauth``."""
    served = len(api.requests)
    assert polling.poll_once().results == [] and len(api.requests) == served
    assert plane.tokens(user_id) is None
    assert [e["type"] for e in events.events] == ["auth", "deauth"]
