"""Per-provider response hooks: request headers, and the context a mapper needs that the response lacks.

A hook sees every page the poller fetched (``Request``: provider, kind, endpoint, window, connection, and
``fetch`` for an extra request through the same rate limits and retries) and returns the payloads to publish
(usually the page with fields added; a bare JSON array may be split or wrapped). Implemented:

- ``fitbit``: ``_date`` (single-day endpoints: the request's ``{start}`` date), ``_units`` (the
  ``Accept-Language`` the hook sends, when configured), ``_profile`` (``GET /1/user/-/profile.json``'s ``user``,
  cached per connection), and list-shaped responses wrapped as ``{kind: [...]}``.
- ``polar``: bare JSON arrays (``/v3/exercises``) published item by item, as the Polar mappers expect.

Still needed: Fitbit ``_sleep`` for ``spo2``/``hrv``/``br``; Withings ``summary`` for ``sleep_get`` (one request per
``getsummary`` series entry) and its ``status`` field (401/601 arrive as HTTP 200); Polar ``sleep`` attached to
``nightly-recharge``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from transforms.errors import PermanentError

log = logging.getLogger(__name__)


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


class FitbitHook(ResponseHook):
    """``_date``, ``_units``, ``_profile`` (see ``connectors.fitbit``); ``locale`` is the Accept-Language sent."""

    profile_path = "/1/user/-/profile.json"

    def __init__(self, locale: str | None = None, profile: bool = True, profile_ttl_s: float = 6 * 3600) -> None:
        self.locale, self.profile, self.profile_ttl_s = locale, profile, profile_ttl_s
        self._profiles: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def headers(self, request: Request) -> dict[str, str]:
        return {"Accept-Language": self.locale} if self.locale else {}

    def _profile(self, request: Request) -> dict[str, Any] | None:
        user = request.connection.user_id
        with self._lock:
            cached = self._profiles.get(user)
        if cached and time.monotonic() - cached[0] < self.profile_ttl_s:
            return cached[1]
        try:
            response = request.fetch(self.profile_path)
        except PermanentError as exc:  # e.g. no "profile" scope: map without it (local times, no offset)
            log.warning("fitbit %s: no profile (%s); times stay local without an offset", user, exc)
            response = {}
        profile = response.get("user", response) if isinstance(response, dict) else {}
        profile = {k: profile[k] for k in ("timezone", "offsetFromUTCMillis") if k in profile}
        with self._lock:
            self._profiles[user] = (time.monotonic(), profile)
        return profile or None

    def payloads(self, request: Request, body: Any) -> list[Any]:
        if body is None:
            return []
        if isinstance(body, list):
            body = {request.kind: body}
        if not isinstance(body, dict):
            return [body]
        extra: dict[str, Any] = {}
        if request.single_day and request.start is not None:
            extra["_date"] = request.start.date().isoformat()
        if self.locale:
            extra["_units"] = self.locale
        if self.profile and (profile := self._profile(request)):
            extra["_profile"] = profile
        return [{**body, **extra}]


class PolarHook(ResponseHook):
    def payloads(self, request: Request, body: Any) -> list[Any]:
        if isinstance(body, list):
            return [item for item in body if item is not None]
        return super().payloads(request, body)


def default_hooks() -> dict[str, ResponseHook]:
    return {"fitbit": FitbitHook(), "polar": PolarHook()}
