"""Raw data in: providers (one folder each), and later suppliers, mobile ingest and auth.

``registry()`` discovers every provider folder: adding a provider means adding a folder whose
``__init__.py`` defines ``PROVIDER`` (a ``connectors.base.Provider``).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from connectors.base import Provider


@cache
def registry() -> dict[str, Provider]:
    found: dict[str, Provider] = {}
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not module.ispkg:
            continue
        provider = getattr(importlib.import_module(f"connectors.{module.name}"), "PROVIDER", None)
        if isinstance(provider, Provider):
            found[provider.slug] = provider
    return found


def get_provider(slug: str) -> Provider:
    providers = registry()
    try:
        return providers[slug.lower()]
    except KeyError:
        raise KeyError(f"unknown provider {slug!r}; known: {', '.join(sorted(providers))}") from None
