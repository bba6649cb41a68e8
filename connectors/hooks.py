"""Per-provider response hooks: request headers, and the context a mapper needs that the response lacks.

A hook sees every page the poller fetched (``Request``: provider, kind, endpoint, window, connection, and
``fetch`` for an extra request through the same rate limits and retries) and returns the payloads to publish
(usually the page with fields added; a bare JSON array may be split or wrapped). ``status`` lets a provider that
reports errors inside an HTTP 200 answer (Withings ``{"status": 401, ...}``) name the HTTP status they mean, so the
poller refreshes, pauses, retries or fails exactly as for a real one. A provider's hook class is
named in its manifest (``hooks: {poll: client.<Class>}``; one instance per poller); providers without one publish
pages as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar


@dataclass(frozen=True)
class Request:
    provider: str
    kind: str
    endpoint: Any  # connectors.manifest.Endpoint
    start: datetime | None  # the window, None for endpoints without one
    end: datetime | None
    connection: Any  # user_id, provider_user_id, provider
    fetch: Callable[..., Any]  # fetch(path, params=None, method="GET") -> decoded JSON, rate limited and retried

    @property
    def single_day(self) -> bool:
        return "{start}" in self.endpoint.path and "{end}" not in self.endpoint.path


class ResponseHook:
    """The default: no extra headers, HTTP statuses taken as they are, every page published as it is.

    ``attaches`` declares, per raw kind, the document fields the hook adds (the ``context`` a mapper declares it
    needs); the registry checks every polled or notified kind's context is attached."""

    attaches: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def headers(self, request: Request) -> dict[str, str]:
        return {}

    def status(self, status: int, body: Any) -> int:
        """The HTTP status the poller acts on for an answer with HTTP ``status`` and decoded JSON ``body`` (None when
        the answer is empty, not JSON, or an HTTP error): 401 → ``TokenRejected``, 429 → pause and retry, 5xx/408 →
        back off and retry, other 4xx → ``PermanentError``, 2xx → data. Called for every request, ``fetch`` too."""
        return status

    def payloads(self, request: Request, body: Any) -> list[Any]:
        return [] if body is None else [body]


def default_hooks() -> dict[str, ResponseHook]:
    """A new instance of every provider's ``hooks.poll`` (named in its manifest)."""
    from connectors import provider_hook, registry

    return {slug: hook() for slug in registry() if (hook := provider_hook(slug, "poll")) is not None}
