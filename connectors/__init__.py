"""Raw data in: the provider framework and the providers (one folder each), and later suppliers and mobile ingest.

``registry()`` discovers every provider folder under ``providers/``: adding a provider means adding a folder whose
``__init__.py`` defines ``PROVIDER`` (a ``connectors.base.Provider``, with its mappers) next to a
``manifest.yaml`` (``connectors.manifest.Manifest``: auth, API endpoints, pagination, rate
limits, webhooks). Both are checked against each other when the registry loads.

What the manifest cannot say is code in the folder, named in the manifest's ``hooks`` (never found by
convention, so a hook that is missing fails the registry at start instead of silently doing nothing):
``oauth`` (a ``connectors.oauth.ProviderOAuth`` subclass for non-standard token answers, registration at
connect, deregistration at disconnect) and ``poll`` (a ``connectors.hooks.ResponseHook`` subclass adding
request headers or the context a mapper needs to polled pages, or reading statuses a provider sends inside
HTTP 200 answers), usually in the folder's ``client.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path
from types import ModuleType

from connectors.base import Provider
from connectors.manifest import Manifest, load_manifest
from core.errors import FatalError

PROVIDERS = "connectors.providers"  # one package per provider
PROVIDERS_DIR = Path(__file__).parent / "providers"


@cache
def registry() -> dict[str, Provider]:
    found: dict[str, Provider] = {}
    for module in pkgutil.iter_modules([str(PROVIDERS_DIR)]):
        if not module.ispkg:
            continue
        provider = getattr(importlib.import_module(f"{PROVIDERS}.{module.name}"), "PROVIDER", None)
        if isinstance(provider, Provider):
            provider.manifest = _checked_manifest(provider, PROVIDERS_DIR / module.name / "manifest.yaml")
            found[provider.slug] = provider
    return found


def _checked_manifest(provider: Provider, path: Path) -> Manifest:
    if not path.exists():
        raise FatalError(f"provider {provider.slug} has no manifest: add {path}")
    manifest = load_manifest(path)
    if (manifest.provider, manifest.terra_name) != (provider.slug, provider.terra_name):
        raise FatalError(f"{path}: provider/terra_name {manifest.provider}/{manifest.terra_name} do not match "
                         f"the PROVIDER in code ({provider.slug}/{provider.terra_name})")
    unmapped = sorted(set(manifest.api.endpoints if manifest.api else {}) - set(provider.kinds))
    if unmapped:
        raise FatalError(f"{path}: endpoints for kinds without a mapper: {', '.join(unmapped)}")
    for role, name in manifest.hooks:
        if name is not None:
            _resolve_hook(provider.slug, role, name, path)
    _check_context(provider, manifest, path)
    notified = {kind for kinds in (manifest.webhooks.kinds.values() if manifest.webhooks else ()) for kind in kinds}
    unfetchable = sorted(notified - set(manifest.api.endpoints if manifest.api else {}))
    if unfetchable:
        raise FatalError(f"{path}: webhooks.kinds names kinds without an api endpoint: {', '.join(unfetchable)}")
    return manifest


def _check_context(provider: Provider, manifest: Manifest, path: Path) -> None:
    """Every kind fetched from the API (polled or notified) whose mapper needs context gets it from the poll hook."""
    fetched = set(manifest.api.endpoints if manifest.api else {})
    hook = _resolve_hook(provider.slug, "poll", manifest.hooks.poll, path) if manifest.hooks.poll else None
    for name, spec in provider.kinds.items():
        missing = set(spec.context) - set((hook.attaches if hook else {}).get(name, ()))
        if name in fetched and missing:
            lacking = "no poll hook is named (hooks.poll)" if hook is None else f"{hook.__name__}.attaches lacks it"
            raise FatalError(f"{path}: kind {name!r} needs {', '.join(sorted(missing))} attached to what the API "
                             f"answers, but {lacking}")


def get_provider(slug: str) -> Provider:
    providers = registry()
    try:
        return providers[slug.lower()]
    except KeyError:
        raise KeyError(f"unknown provider {slug!r}; known: {', '.join(sorted(providers))}") from None


def provider_hook(slug: str, role: str) -> type | None:
    """The class the provider's manifest names as its ``hooks.<role>`` (``oauth`` or ``poll``), or None (also for a
    slug that is no registered provider: a manifest built in code names no hooks)."""
    provider = registry().get(slug.lower())
    if provider is None:
        return None
    name = getattr(provider.manifest.hooks, role)
    return None if name is None else _resolve_hook(provider.slug, role, name, PROVIDERS_DIR / slug / "manifest.yaml")


@cache
def _resolve_hook(slug: str, role: str, name: str, path: Path) -> type:
    """Import ``module.Attribute`` of the provider's folder and check it is a hook of ``role``; FatalError otherwise."""
    from connectors.hooks import ResponseHook
    from connectors.oauth import ProviderOAuth

    module_name, _, attribute = name.partition(".")
    base = {"oauth": ProviderOAuth, "poll": ResponseHook}[role]
    try:
        module: ModuleType = importlib.import_module(f"{PROVIDERS}.{slug}.{module_name}")
    except ModuleNotFoundError as exc:
        raise FatalError(f"{path}: hooks.{role} names {name!r} but {PROVIDERS_DIR / slug / module_name}.py "
                         f"cannot be imported: {exc}") from exc
    hook = getattr(module, attribute, None)
    if not (isinstance(hook, type) and issubclass(hook, base)):
        raise FatalError(f"{path}: hooks.{role} names {name!r}, which is not a {base.__module__}.{base.__name__} "
                         f"subclass in {module.__file__}")
    return hook
