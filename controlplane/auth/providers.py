"""The providers a connection can be made to: their manifests by slug and an OAuth 2 client for each OAuth 2 one."""

from __future__ import annotations

from collections.abc import Mapping

from connectors.manifest import Manifest, OAuth2
from connectors.oauth import ProfileFetcher, ProviderOAuth, ProviderSettings, oauth_class
from controlplane.auth.model import UnknownProvider
from core.errors import PermanentError


class Providers:
    """``manifests`` defaults to every provider of ``connectors.registry()``; ``settings`` (client credentials and URL
    overrides by provider slug) defaults to ``HEALTHFLOW_<PROVIDER>_*`` from ``environ`` (``os.environ``)."""

    def __init__(self, manifests: Mapping[str, Manifest] | None = None,
                 settings: Mapping[str, ProviderSettings] | None = None, environ: Mapping[str, str] | None = None,
                 profile_fetchers: Mapping[str, ProfileFetcher] | None = None, http_timeout_s: float = 15.0) -> None:
        if manifests is None:
            from connectors import registry

            manifests = {slug: provider.manifest for slug, provider in registry().items()}
        self.manifests: dict[str, Manifest] = dict(manifests)
        fetchers = dict(profile_fetchers or {})
        self.clients: dict[str, ProviderOAuth] = {
            slug: oauth_class(slug)(manifest, (settings or {}).get(slug) or ProviderSettings.from_env(slug, environ),
                                    fetchers.get(slug), http_timeout_s)
            for slug, manifest in self.manifests.items() if isinstance(manifest.auth, OAuth2)}

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
        if slug not in self.clients:
            raise PermanentError(f"{self.manifests[slug].terra_name} uses {self.manifests[slug].auth.type} auth; "
                                 "only OAuth 2 providers connect through this API")
        return self.clients[slug]

    def connectable(self) -> list[str]:
        """Slugs of the OAuth 2 providers that have client credentials."""
        return sorted(slug for slug, oauth in self.clients.items() if oauth.configured)
