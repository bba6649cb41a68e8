"""Fitbit Web API client code the manifest cannot express: the poll hook adding mapper context."""

from __future__ import annotations

import logging
import threading
import time
from datetime import date, timedelta
from typing import Any

from connectors.hooks import Request, ResponseHook
from connectors.timeutil import format_bound
from core.errors import PermanentError

log = logging.getLogger(__name__)

NIGHTLY = frozenset({"spo2", "hrv", "br"})  # measured during the main sleep of their date: they get ``_sleep``
SLEEP_FIELDS = ("logId", "dateOfSleep", "startTime", "endTime", "isMainSleep", "logType")  # what the mappers read
SLEEP_RANGE_DAYS = 100  # Fitbit's longest sleep date range


class FitbitHook(ResponseHook):
    """Adds ``_date``, ``_units``, ``_profile``, to ``spo2``/``hrv``/``br`` ``_sleep``, and to ``weight`` the window's
    ``fat`` logs (see ``connectors.providers.fitbit``).

    ``locale`` is the Accept-Language sent. Extra requests (profile, sleep logs) go through ``request.fetch``: the
    same rate limits, retries and 401 handling as the page itself.

    ``_sleep`` holds the main sleep logs (only the fields the mappers read) of the dates a nightly response names.
    Main sleeps are cached per user and date for ``sleep_ttl_s``, filled by polled ``sleep`` pages too, so a poll
    round that polls ``sleep`` first costs no extra request. A date whose cached entry has no main sleep is fetched
    again (the sleep may have synced since). Dates without a main sleep even then are published in a separate
    payload without ``_sleep``: SpO2/HRV still reach the Daily, breathing rate (which only has a place on a Sleep) is
    dead-lettered with its bytes — one night never takes the other nights of the response down with it.
    """

    profile_path = "/1/user/-/profile.json"
    sleep_path = "/1.2/user/-/sleep/date/{start}/{end}.json"
    fat_path = "/1/user/-/body/log/fat/date/{start}/{end}.json"

    def __init__(self, locale: str | None = None, profile: bool = True, profile_ttl_s: float = 6 * 3600,
                 sleep_ttl_s: float = 600) -> None:
        self.locale, self.profile, self.profile_ttl_s, self.sleep_ttl_s = locale, profile, profile_ttl_s, sleep_ttl_s
        self._profiles: dict[str, tuple[float, dict[str, Any]]] = {}
        self._sleeps: dict[str, dict[date, tuple[float, list[dict[str, Any]]]]] = {}  # user → date → (at, mains)
        self._lock = threading.Lock()

    def headers(self, request: Request) -> dict[str, str]:
        return {"Accept-Language": self.locale} if self.locale else {}

    # ------------------------------------------------------------------------------------------------ profile
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

    # ------------------------------------------------------------------------------------------------ body fat
    def _with_fat(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        """The weight page with the same window's body-fat logs: one document per window, so the Body record of a day
        is built from both lists at once (merged separately, the later list would own the day's span and drop
        readings of the other taken at other instants). Without access to fat logs, weight goes alone."""
        if request.start is None or request.end is None or not isinstance(body.get("weight"), list):
            return body
        path = self.fat_path.format(start=format_bound(request.start, "date", False),
                                    end=format_bound(request.end, "date", True))
        try:
            response = request.fetch(path)
        except PermanentError as exc:
            log.warning("fitbit %s: no body-fat logs (%s); weight goes without them", request.connection.user_id, exc)
            return body
        fat = response.get("fat") if isinstance(response, dict) else None
        return {**body, "fat": fat} if isinstance(fat, list) and fat else body

    # ------------------------------------------------------------------------------------------------ sleep
    def _remember(self, user: str, first: date, last: date, response: Any) -> None:
        """The main sleeps of every date of ``[first, last]`` that a sleep response covers (none is an answer too)."""
        logs = response.get("sleep") if isinstance(response, dict) else None
        if not isinstance(logs, list):
            return
        mains: dict[date, list[dict[str, Any]]] = {}
        for entry in logs:
            day = _day(entry.get("dateOfSleep")) if isinstance(entry, dict) else None
            if day is not None and entry.get("isMainSleep") is True:
                mains.setdefault(day, []).append({k: entry[k] for k in SLEEP_FIELDS if k in entry})
        now = time.monotonic()
        with self._lock:
            cache = self._sleeps.setdefault(user, {})
            for stale in [d for d, (at, _) in cache.items() if now - at >= self.sleep_ttl_s]:
                del cache[stale]
            day = first
            while day <= last:
                cache[day] = (now, mains.get(day, []))
                day += timedelta(days=1)

    def _main_sleeps(self, request: Request, days: list[date]) -> dict[date, list[dict[str, Any]]]:
        """The main sleeps that ended on each of ``days``: from the cache, else fetched (one request per 100 days)."""
        user = request.connection.user_id
        now = time.monotonic()
        with self._lock:
            cache = dict(self._sleeps.get(user, {}))
        missing = sorted(d for d in days if d not in cache or now - cache[d][0] >= self.sleep_ttl_s or not cache[d][1])
        found = {d: cache[d][1] for d in days if d in cache and d not in missing}
        while missing:
            first = missing[0]
            last = max(d for d in missing if d < first + timedelta(days=SLEEP_RANGE_DAYS))
            try:
                response = request.fetch(self.sleep_path.format(start=first.isoformat(), end=last.isoformat()))
            except PermanentError as exc:  # e.g. no "sleep" scope: the nightly values stay without their sleep
                log.warning("fitbit %s: no sleep logs for %s–%s (%s); %s is published without _sleep",
                            user, first, last, exc, request.kind)
                return found
            self._remember(user, first, last, response)
            with self._lock:
                cache = self._sleeps.get(user, {})
                found.update({d: cache[d][1] for d in missing if d <= last and d in cache})
            missing = [d for d in missing if d > last]
        return found

    def _nightly(self, request: Request, body: dict[str, Any], extra: dict[str, Any]) -> list[Any]:
        """A ``spo2``/``hrv``/``br`` response with the main sleeps of its dates (nights without one apart)."""
        kind = request.kind
        entries = body[kind] if isinstance(body.get(kind), list) else [body] if "dateTime" in body else []
        if not entries:
            return [{**body, **extra}]
        dated = [(_day(entry.get("dateTime")) if isinstance(entry, dict) else None, entry) for entry in entries]
        mains = self._main_sleeps(request, sorted({day for day, _ in dated if day is not None}))
        asleep = [entry for day, entry in dated if day is None or mains.get(day)]
        apart = [entry for day, entry in dated if day is not None and not mains.get(day)]
        out: list[Any] = []
        if asleep:
            logs = [main for day in sorted(mains) for main in mains[day]]
            out.append({kind: asleep, **extra, "_sleep": logs})
        if apart:
            nights = sorted({str(day) for day, _ in dated if day is not None and not mains.get(day)})
            log.info("fitbit %s %s: no main sleep ends on %s; published without _sleep", request.connection.user_id,
                     kind, ", ".join(nights))
            out.append({kind: apart, **extra})
        return out

    # ------------------------------------------------------------------------------------------------ pages
    def payloads(self, request: Request, body: Any) -> list[Any]:
        if body is None:
            return []
        if isinstance(body, list):
            body = {request.kind: body}
        if not isinstance(body, dict):
            return [body]
        if request.kind == "sleep" and request.start is not None and request.end is not None:
            first = date.fromisoformat(format_bound(request.start, "date", False))
            self._remember(request.connection.user_id, first,
                           date.fromisoformat(format_bound(request.end, "date", True)), body)
        extra: dict[str, Any] = {}
        if request.single_day and request.start is not None:
            extra["_date"] = request.start.date().isoformat()
        if self.locale:
            extra["_units"] = self.locale
        if self.profile and (profile := self._profile(request)):
            extra["_profile"] = profile
        if request.kind in NIGHTLY:
            return self._nightly(request, body, extra)
        if request.kind == "weight":
            body = self._with_fat(request, body)
        return [{**body, **extra}]


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
