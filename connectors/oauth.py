"""OAuth 2 against one provider, driven by its manifest (requests-oauthlib underneath).

Client credentials come from the environment, one pair per provider::

    HEALTHFLOW_<PROVIDER>_CLIENT_ID, HEALTHFLOW_<PROVIDER>_CLIENT_SECRET
    HEALTHFLOW_<PROVIDER>_OAUTH_BASE   optional: replaces scheme://host[:port] of the authorize, token and
                                       revoke URLs (a path is prefixed), e.g. a fake provider on loopback
    HEALTHFLOW_<PROVIDER>_API_BASE     optional: replaces the manifest's api.base_url (profile calls)

Every URL must be https, except plain http on a loopback host (tests, local fakes).

Provider errors map onto healthflow's taxonomy: ``invalid_grant`` → ``InvalidGrant`` (the user's
grant is gone: revoked, expired or a reused refresh token), ``invalid_client`` → ``FatalError``
(our credentials are wrong), other 4xx → ``PermanentError``, network/5xx/429 → ``RetryableError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from oauthlib.oauth2 import WebApplicationClient
from oauthlib.oauth2.rfc6749 import errors as oauth_errors
from requests.auth import HTTPBasicAuth
from requests_oauthlib import OAuth2Session

from connectors.manifest import Manifest, OAuth2
from core.errors import FatalError, PermanentError, RetryableError, parse_retry_after

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Token-response fields that carry the provider's user id (Fitbit user_id, Withings userid, Polar x_user_id).
TOKEN_USER_ID_FIELDS = ("user_id", "userid", "x_user_id", "sub")


class InvalidGrant(PermanentError):
    """The provider refused the grant (revoked by the user, expired, or a refresh token used twice)."""


class ProviderNotConfigured(FatalError):
    """No client credentials for the provider."""


def env_prefix(slug: str) -> str:
    return f"HEALTHFLOW_{slug.upper()}_"


@dataclass(frozen=True)
class ProviderSettings:
    """Client credentials and URL overrides of one provider."""

    client_id: str | None = None
    client_secret: str | None = None
    oauth_base: str | None = None
    api_base: str | None = None

    @classmethod
    def from_env(cls, slug: str, environ: Mapping[str, str] | None = None) -> ProviderSettings:
        env = os.environ if environ is None else environ
        prefix = env_prefix(slug)
        return cls(*(env.get(prefix + name) or None for name in ("CLIENT_ID", "CLIENT_SECRET", "OAUTH_BASE",
                                                                  "API_BASE")))


ProfileFetcher = Callable[["ProviderOAuth", dict[str, Any]], "str | None"]


def get_json(oauth: ProviderOAuth, token: dict[str, Any], path: str) -> Any:
    """GET ``api_base + path`` with the new token (for profile fetchers)."""
    if oauth.api_base is None:
        raise PermanentError(f"{oauth.slug}: the manifest has no api.base_url for a profile call")
    session = OAuth2Session(oauth.settings.client_id, token=dict(token))
    try:
        response = session.get(oauth.api_base.rstrip("/") + path, timeout=oauth.timeout_s)
    except requests.RequestException as exc:
        raise RetryableError(f"{oauth.slug} profile call: {exc}") from exc
    _raise_for_status(oauth.slug, "profile call", response)
    return response.json()


def dotted(document: Any, path: str) -> Any:
    """``document["a"]["b"]`` for ``"a.b"``; None when a step is missing."""
    for part in path.split("."):
        if not isinstance(document, dict):
            return None
        document = document.get(part)
    return document


def _override(url: str, base: str | None) -> str:
    if not base:
        return url
    target, replacement = urlsplit(url), urlsplit(base)
    return urlunsplit((replacement.scheme, replacement.netloc, replacement.path.rstrip("/") + target.path,
                       target.query, target.fragment))


def check_transport(url: str, what: str) -> None:
    """https everywhere; plain http only on loopback (then oauthlib's https-only check is relaxed)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        # oauthlib has only this process-wide switch; non-loopback http URLs are refused above and here.
        os.environ.setdefault("OAUTHLIB_INSECURE_TRANSPORT", "1")
        return
    raise FatalError(f"{what} {url!r} must use https (plain http is accepted on loopback only)")


def _raise_for_status(slug: str, what: str, response: requests.Response) -> None:
    if response.status_code == 429 or response.status_code >= 500:
        raise RetryableError(f"{slug} {what}: HTTP {response.status_code}",
                             parse_retry_after(response.headers.get("Retry-After")))
    if response.status_code >= 400:
        raise PermanentError(f"{slug} {what}: HTTP {response.status_code}: {response.text[:300]}")


class ProviderOAuth:
    """Authorize URL, code exchange, refresh, revocation and user lookup for one OAuth 2 provider.

    What the manifest declares (endpoints, client auth, PKCE, ``authorize_params``, ``token_params``, ``profile``)
    is handled here. A provider whose OAuth needs code subclasses this in ``connectors/providers/<slug>/client.py``
    (named in its manifest's ``hooks.oauth``) and overrides the hooks: ``token_response`` (a non-standard token
    answer), ``after_connect`` (registration at the provider) and ``disconnect`` (deregistration).
    """

    def __init__(self, manifest: Manifest, settings: ProviderSettings, profile_fetcher: ProfileFetcher | None = None,
                 timeout_s: float = 15.0) -> None:
        if not isinstance(manifest.auth, OAuth2):
            raise PermanentError(f"{manifest.provider} uses {manifest.auth.type} auth; only oauth2 connects here")
        self.manifest, self.settings, self.timeout_s = manifest, settings, timeout_s
        self.slug = manifest.provider
        self.auth: OAuth2 = manifest.auth
        self.profile_fetcher = profile_fetcher
        self.authorize_url = _override(str(self.auth.authorize_url), settings.oauth_base)
        self.token_url = _override(str(self.auth.token_url), settings.oauth_base)
        self.revoke_url = _override(str(self.auth.revoke_url), settings.oauth_base) if self.auth.revoke_url else None
        base = settings.api_base or (str(manifest.api.base_url) if manifest.api else None)
        self.api_base = base
        for what, url in (("authorize_url", self.authorize_url), ("token_url", self.token_url),
                          ("revoke_url", self.revoke_url), ("api base", self.api_base)):
            if url:
                check_transport(url, f"{self.slug} {what}")

    @property
    def configured(self) -> bool:
        return bool(self.settings.client_id)

    def _require_client(self) -> str:
        if not self.settings.client_id:
            prefix = env_prefix(self.slug)
            raise ProviderNotConfigured(f"provider {self.manifest.terra_name} has no OAuth client: set "
                                        f"{prefix}CLIENT_ID and {prefix}CLIENT_SECRET")
        return self.settings.client_id

    @property
    def scope(self) -> str | None:
        return self.auth.scope_separator.join(self.auth.scopes) if self.auth.scopes else None

    def new_code_verifier(self) -> str | None:
        """A PKCE verifier when the manifest asks for PKCE, else None."""
        return WebApplicationClient(None).create_code_verifier(64) if self.auth.pkce else None

    def authorization_url(self, redirect_uri: str, state: str, code_verifier: str | None) -> str:
        client = WebApplicationClient(self._require_client())
        session = OAuth2Session(client=client, redirect_uri=redirect_uri, scope=self.scope)
        extra = {}
        if code_verifier:
            extra = {"code_challenge": client.create_code_challenge(code_verifier, "S256"),
                     "code_challenge_method": "S256"}
        url, _ = session.authorization_url(self.authorize_url, state=state, **extra, **self.auth.authorize_params)
        return url

    def _client_auth(self) -> dict[str, Any]:
        if self.auth.client_auth == "basic":
            return {"auth": HTTPBasicAuth(self._require_client(), self.settings.client_secret or "")}
        return {}

    def _call(self, what: str, call: Callable[[], Any]) -> dict[str, Any]:
        try:
            return dict(call())
        except Warning as exc:  # oauthlib: the granted scope differs from the requested one; keep what was granted
            return dict(exc.token)  # type: ignore[attr-defined]
        except oauth_errors.InvalidGrantError as exc:
            raise InvalidGrant(f"{self.slug} {what}: invalid_grant: {exc.description}") from exc
        except (oauth_errors.InvalidClientError, oauth_errors.UnauthorizedClientError) as exc:
            hint = f"check {env_prefix(self.slug)}CLIENT_ID and _CLIENT_SECRET"
            raise FatalError(f"{self.slug} {what}: the provider rejected our client credentials "
                             f"({exc.error}: {exc.description}); {hint}") from exc
        except oauth_errors.OAuth2Error as exc:
            raise PermanentError(f"{self.slug} {what}: {exc.error}: {exc.description}") from exc
        except requests.RequestException as exc:
            raise RetryableError(f"{self.slug} {what}: {exc}") from exc

    def _status_hook(self, what: str) -> Callable[[requests.Response], requests.Response]:
        def hook(response: requests.Response) -> requests.Response:
            if response.status_code == 429 or response.status_code >= 500:
                _raise_for_status(self.slug, what, response)
            return response

        return hook

    def exchange_code(self, code: str, redirect_uri: str, code_verifier: str | None) -> dict[str, Any]:
        """The token response (oauthlib adds ``expires_at``, epoch seconds)."""
        client_id = self._require_client()
        session = OAuth2Session(client=WebApplicationClient(client_id), redirect_uri=redirect_uri, scope=self.scope)
        for hook in (self._status_hook("token exchange"), self.token_response):
            session.register_compliance_hook("access_token_response", hook)
        kwargs: dict[str, Any] = self._client_auth() or {"include_client_id": True,
                                                         "client_secret": self.settings.client_secret}
        kwargs.update(self.auth.token_params)
        if code_verifier:
            kwargs["code_verifier"] = code_verifier
        return self._call("token exchange", lambda: session.fetch_token(self.token_url, code=code,
                                                                         timeout=self.timeout_s, **kwargs))

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        """New tokens; the old refresh token is kept when the provider sends none back."""
        client_id = self._require_client()
        session = OAuth2Session(client=WebApplicationClient(client_id))
        for hook in (self._status_hook("token refresh"), self.token_response):
            session.register_compliance_hook("refresh_token_response", hook)
        kwargs: dict[str, Any] = self._client_auth() or {"client_id": client_id,
                                                         "client_secret": self.settings.client_secret}
        kwargs.update(self.auth.token_params)
        return self._call("token refresh", lambda: session.refresh_token(
            self.token_url, refresh_token=refresh_token, timeout=self.timeout_s, **kwargs))

    def token_response(self, response: requests.Response) -> requests.Response:
        """Hook: turn a non-standard token answer into an RFC 6749 one (default: unchanged)."""
        return response

    def after_connect(self, token: dict[str, Any], provider_user_id: str) -> None:
        """Hook: called once the grant is known and before the connection is active; raise to refuse it."""

    def disconnect(self, token: dict[str, Any], provider_user_id: str | None) -> None:
        """Hook: end the grant at the provider (default: RFC 7009 revocation when there is a revoke URL)."""
        if not self.revoke_url:
            return
        if token.get("refresh_token"):
            self.revoke(token["refresh_token"], "refresh_token")
        self.revoke(token["access_token"], "access_token")

    def revoke(self, token: str, hint: str) -> None:
        """RFC 7009 revocation; an unknown or already revoked token counts as revoked."""
        if not self.revoke_url:
            return
        data = {"token": token, "token_type_hint": hint}
        kwargs = self._client_auth()
        if not kwargs:
            data.update(client_id=self._require_client(), client_secret=self.settings.client_secret or "")
        try:
            response = requests.post(self.revoke_url, data=data, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as exc:
            raise RetryableError(f"{self.slug} revoke: {exc}") from exc
        if response.status_code == 400 and "invalid_token" in response.text:
            return
        _raise_for_status(self.slug, "revoke", response)

    def provider_user_id(self, token: dict[str, Any]) -> str | None:
        """From the token response when it names the user, else from the provider's profile call."""
        for name in TOKEN_USER_ID_FIELDS:
            if token.get(name) not in (None, ""):
                return str(token[name])
        if self.profile_fetcher is not None:
            found = self.profile_fetcher(self, token)
        elif self.auth.profile is not None:
            found = dotted(get_json(self, token, self.auth.profile.path), self.auth.profile.user_field)
        else:
            return None
        return None if found in (None, "") else str(found)


def oauth_class(slug: str) -> type[ProviderOAuth]:
    """The provider's ``hooks.oauth`` (named in its manifest) when it has one, else ``ProviderOAuth``."""
    from connectors import provider_hook

    return provider_hook(slug, "oauth") or ProviderOAuth
