"""The ``/v2`` HTTP API (FastAPI): ``create_app(control_plane)``, ``serve(port, store_url)``, ``BackgroundServer``.

Exports are loaded lazily, so importing the package does not import FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"create_app": "app", "serve": "server", "BackgroundServer": "server", "log_event": "server"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
