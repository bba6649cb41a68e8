"""Fitbit Web API client code the manifest cannot express: the poll hook adding mapper context."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from connectors.polling.hooks import Request, ResponseHook
from transforms.errors import PermanentError

log = logging.getLogger(__name__)


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


POLL_HOOK = FitbitHook
