"""Connecting users to providers: developers and API keys, OAuth 2 flows, tokens, lifecycle events.

    from connectors.auth import ControlPlane, MemoryCollector

    events = MemoryCollector()
    with ControlPlane("sqlite:///.healthflow/state.db", public_url="https://hf.example", emit=events) as cp:
        dev = cp.create_developer(name="acme"); key = cp.create_api_key(dev)   # key shown once
        start = cp.start_auth(dev, "OURA", reference_id="u-1", success_url=..., failure_url=...)
        # browser → start.auth_url → provider → /v2/auth/callback/oura → cp.complete_auth("oura", query)
        token = cp.access_token(start.user_id)   # refreshed under a per-connection lock when expiring

Exports are loaded lazily, so ``connectors.registry()`` can scan this package cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ControlPlane": "control_plane", "Connection": "control_plane", "Tokens": "control_plane",
    "WidgetSession": "control_plane", "AuthStart": "control_plane", "AuthOutcome": "control_plane",
    "UnknownUser": "control_plane", "UnknownProvider": "control_plane", "ConnectionInactive": "control_plane",
    "ConnectionRevoked": "control_plane", "PENDING": "control_plane", "ACTIVE": "control_plane",
    "DEAUTH": "control_plane", "REVOKED": "control_plane",
    "ProviderOAuth": "oauth", "ProviderSettings": "oauth", "InvalidGrant": "oauth", "ProviderNotConfigured": "oauth",
    "oauth_class": "oauth",
    "TokenCipher": "secrets", "SECRET_KEY_ENV": "secrets",
    "MemoryCollector": "events",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
