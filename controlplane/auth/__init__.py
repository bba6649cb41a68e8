"""Connecting users to providers: developers and API keys, OAuth 2 flows, tokens, lifecycle events.

    from controlplane.auth import ControlPlane, MemoryCollector

    events = MemoryCollector()
    with ControlPlane("sqlite:///.healthflow/state.db", public_url="https://hf.example", emit=events) as cp:
        dev = cp.create_developer(name="acme"); key = cp.create_api_key(dev)   # key shown once
        start = cp.start_auth(dev, "OURA", reference_id="u-1", success_url=..., failure_url=...)
        # browser → start.auth_url → provider → /v2/auth/callback/oura → cp.complete_auth("oura", query)
        token = cp.access_token(start.user_id)   # refreshed under a per-connection lock when expiring

The OAuth 2 client of each provider (``ProviderOAuth``) is part of the provider framework: ``connectors.oauth``.

Exports are loaded lazily, so importing the package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ControlPlane": "control_plane", "Connection": "model", "Tokens": "model",
    "WidgetSession": "model", "AuthStart": "model", "AuthOutcome": "model",
    "UnknownUser": "model", "UnknownProvider": "model", "ConnectionInactive": "model",
    "ConnectionRevoked": "model", "PENDING": "model", "ACTIVE": "model",
    "DEAUTH": "model", "REVOKED": "model",
    "TokenCipher": "secrets", "SECRET_KEY_ENV": "secrets",
    "MemoryCollector": "events",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
