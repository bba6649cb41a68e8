"""A fake Fitbit Web API on loopback: ``FakeProviderApi`` played from Fitbit's manifest, answering in Fitbit's shapes.

    with FakeFitbitApi(token_validator=fake_provider.is_live) as api:
        api.add("sleep", logs)                          # sleep logs, served by dateOfSleep (the date the sleep ended)
        api.add("spo2", [{"dateTime": "2024-03-11", "value": {...}}])   # spo2/hrv/br by dateTime, weight/fat by date
        api.add_day("activity_summary", "2024-03-11", response)          # single-date responses, as Fitbit sends them
        api.add("activities", logs)                     # activity log list: afterDate, sort=asc, offset/limit paging

Shapes (https://dev.fitbit.com/build/reference/web-api/): date-range sleep ``{"sleep": [...], "summary": {...}}``;
SpO2 for a date range is a top-level JSON array; HRV ``{"hrv": [...]}``, breathing rate ``{"br": [...]}``, body logs
``{"weight": [...]}`` / ``{"fat": [...]}``; single-date endpoints (``activity_summary``, ``foods``, ``water``) answer
their day's response, or Fitbit's all-zero response for a day without data. The activity list pages by
``offset``/``limit`` with ``pagination.next`` (an URL, or ``""`` on the last page); ``activities_page_cap`` serves
shorter pages than the ``limit`` asked for, so a few logs exercise the paging (clients must follow ``next``).
``GET /1/user/-/profile.json`` answers ``{"user": profile}``. Auth, 429s and failures work as in ``FakeProviderApi``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from connectors.manifest import Endpoint, Manifest, Window
from servers.fake_provider_api import FakeProviderApi, _path_pattern

PROFILE_PATH = "/1/user/-/profile.json"
# not polled on its own (the poll hook fetches it with each weight window), so not in the manifest
FAT = Endpoint(path="/1/user/-/body/log/fat/date/{start}/{end}.json", window=Window(max_days=31))
DATE_FIELD = {"sleep": "dateOfSleep", "spo2": "dateTime", "hrv": "dateTime", "br": "dateTime", "weight": "date",
              "fat": "date"}
SINGLE_DAY = ("activity_summary", "foods", "water")


def empty_day(kind: str) -> dict[str, Any]:
    """Fitbit's answer for a date without data (zeros, not an error)."""
    if kind == "activity_summary":
        return {"activities": [], "goals": {"activeMinutes": 30, "caloriesOut": 2500, "distance": 8.05, "floors": 10,
                                            "steps": 10000},
                "summary": {"activityCalories": 0, "caloriesBMR": 1602, "caloriesOut": 1602,
                            "distances": [{"activity": "total", "distance": 0}], "elevation": 0,
                            "fairlyActiveMinutes": 0, "floors": 0, "lightlyActiveMinutes": 0, "marginalCalories": 0,
                            "sedentaryMinutes": 1440, "steps": 0, "veryActiveMinutes": 0}}
    if kind == "foods":
        return {"foods": [], "goals": {"calories": 2200},
                "summary": {"calories": 0, "carbs": 0, "fat": 0, "fiber": 0, "protein": 0, "sodium": 0, "water": 0}}
    if kind == "water":
        return {"summary": {"water": 0}, "water": []}
    raise ValueError(f"{kind} is not a single-date endpoint")


@dataclass
class FakeFitbitApi(FakeProviderApi):
    provider: str | Manifest = "fitbit"
    profile: dict[str, Any] = field(default_factory=lambda: {"encodedId": "7QK2XB", "timezone": "Europe/Berlin",
                                                             "offsetFromUTCMillis": 3600000})
    activities_page_cap: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.days: dict[str, dict[str, dict[str, Any]]] = {}
        self.route(PROFILE_PATH, lambda _params: {"user": copy.deepcopy(self.profile)})
        self._patterns.append(("fat", FAT, _path_pattern(FAT.path)))

    def add_day(self, kind: str, day: str, response: dict[str, Any]) -> None:
        """``response`` is what Fitbit answers for ``kind`` on ``day`` (``YYYY-MM-DD``)."""
        assert kind in SINGLE_DAY, kind
        with self._lock:
            self.days.setdefault(kind, {})[day] = copy.deepcopy(response)

    def _dated(self, kind: str, start: datetime | None, end: datetime | None) -> list[dict[str, Any]]:
        """Documents whose Fitbit date lies in ``[start, end)``, in date order."""
        assert start is not None and end is not None
        first, stop = start.date(), end.date()
        with self._lock:
            docs = list(self.documents.get(kind, []))
        return sorted((d for d in docs if first <= date.fromisoformat(d[DATE_FIELD[kind]]) < stop),
                      key=lambda d: (d[DATE_FIELD[kind]], str(d.get("startTime") or d.get("time") or "")))

    def _page(self, kind: str, endpoint: Endpoint, params: dict[str, str], start: datetime | None,
              end: datetime | None) -> tuple[int, dict[str, str], Any]:
        if kind == "activities":
            if self.activities_page_cap is not None and "limit" in params:
                params = {**params, "limit": str(min(int(params["limit"]), self.activities_page_cap))}
            return super()._page(kind, endpoint, params, start, end)
        if kind in SINGLE_DAY:
            assert start is not None and end == start + timedelta(days=1), (start, end)
            with self._lock:
                found = self.days.get(kind, {}).get(start.date().isoformat())
            return 200, {}, copy.deepcopy(found) if found is not None else empty_day(kind)
        docs = copy.deepcopy(self._dated(kind, start, end))
        if kind == "spo2":
            return 200, {}, docs  # a date range of SpO2 summaries is a bare JSON array
        if kind == "sleep":
            main = [log for log in docs if log.get("isMainSleep")]
            return 200, {}, {"sleep": docs, "summary": {
                "totalMinutesAsleep": sum(log.get("minutesAsleep", 0) for log in main),
                "totalSleepRecords": len(docs), "totalTimeInBed": sum(log.get("timeInBed", 0) for log in main)}}
        return 200, {}, {kind: docs}
