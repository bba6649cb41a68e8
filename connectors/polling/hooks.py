"""Per-provider response hooks: request headers, and the context a mapper needs that the response lacks.

A hook sees every page the poller fetched (``Request``: provider, kind, endpoint, window, connection, and
``fetch`` for an extra request through the same rate limits and retries) and returns the payloads to publish
(usually the page with fields added; a bare JSON array may be split or wrapped). A provider's hook class is
``POLL_HOOK`` in its ``connectors/<slug>/client.py`` (one instance per poller); providers without one publish
pages as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Request:
    provider: str
    kind: str
    endpoint: Any  # connectors.manifest.Endpoint
    start: datetime | None  # the window, None for endpoints without one
    end: datetime | None
    connection: Any  # user_id, provider_user_id, provider
    fetch: Callable[..., Any]  # fetch(path, params=None) -> decoded JSON, rate limited and retried

    @property
    def single_day(self) -> bool:
        return "{start}" in self.endpoint.path and "{end}" not in self.endpoint.path


class ResponseHook:
    """The default: no extra headers, every page published as it is."""

    def headers(self, request: Request) -> dict[str, str]:
        return {}

    def payloads(self, request: Request, body: Any) -> list[Any]:
        return [] if body is None else [body]


def default_hooks() -> dict[str, ResponseHook]:
    """A new ``POLL_HOOK`` of every provider that has one."""
    from connectors import provider_client, registry

    return {slug: hook() for slug in registry() if (hook := getattr(provider_client(slug), "POLL_HOOK", None))}
