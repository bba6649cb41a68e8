"""Fitbit Web API responses (legacy API, pulled by a poller after a Subscriptions notification).

Raw kinds, named after the Fitbit resource they come from; each raw payload is **one API response**:

==================== ================================================================ ==================
kind                 response of                                                      models
==================== ================================================================ ==================
activities           ``GET /1/user/-/activities/list.json`` (a page of activity logs) activity
activity_summary     ``GET /1/user/-/activities/date/{date}.json``                    daily
activity_timeseries  ``GET /1/user/-/activities/{resource}/date/…`` (steps, distance, daily
                     floors, elevation, calories, caloriesBMR, activityCalories,
                     minutes*, heart), with or without ``…-intraday``
sleep                ``GET /1.2/user/-/sleep/date/{date}.json`` (or ``…/{start}/{end}``) sleep
weight               ``GET /1/user/-/body/log/weight/date/{date}.json``               body
fat                  ``GET /1/user/-/body/log/fat/date/{date}.json``                  body
foods                ``GET /1/user/-/foods/log/date/{date}.json``                     nutrition
water                ``GET /1/user/-/foods/log/water/date/{date}.json``               nutrition
spo2                 ``GET /1/user/-/spo2/date/{date}[/all].json``                    daily (+ sleep)
hrv                  ``GET /1/user/-/hrv/date/{date}[/all].json``                     daily (+ sleep)
br                   ``GET /1/user/-/br/date/{date}[/all].json``                      sleep
==================== ================================================================ ==================

Envelope: Fitbit responses share no list field (``{"sleep": [...], "summary": …}``,
``{"activities": [...], "pagination": …}``, ``{"weight": [...]}``, a bare ``{"dateTime", "value"}`` for
SpO2), and several need response-level context (the request date, the unit system, the user's time
zone). So the whole response is one document and each mapper reads its own list from it; a payload
may also batch several responses as ``{"pages": [response, ...]}`` (the ``envelope``; no Fitbit
response has that key). A single entry (one sleep log, one activity log) is accepted as a document
too. Cost: one bad entry dead-letters its whole response. A list-shaped response (SpO2 for a date
range is a top-level JSON array) is accepted as it comes, each element one entry (without poller context:
local times, no ``_sleep``); the poll hook wraps it as ``{"spo2": [...]}`` to add context. An empty single-day
SpO2 answer (``{}``) is no data, not an error. Documents carry no user id
(``user_field=None``): the user comes with the raw event.

Poller contract — fields the poller adds at the top level of each response (in each page of a
``pages`` batch; ``_`` never collides with Fitbit's names):

- ``_profile``: the user's time zone, i.e. the ``user`` object of ``GET /1/user/-/profile.json`` (or
  the whole response), of which ``timezone`` (IANA name) and ``offsetFromUTCMillis`` are read.
  Fitbit writes sleep, body, intraday and SpO2/HRV times as local wall-clock time **without an
  offset**. With ``timezone`` every local time gets the offset in force at that instant (DST-correct:
  a night across a DST change starts at -08:00 and ends at -07:00); failing that,
  ``offsetFromUTCMillis`` (the offset when the profile was read) is applied as a fixed offset; with
  neither, times and day windows are emitted as local times without an offset, never with a guessed
  one. Every record has ``timestamp_localization`` 1 (local). Activity logs carry their own offset
  (``startTime`` ``…+01:00``), which wins over the profile.
- ``_units``: the ``Accept-Language`` the request was sent with: ``en_US`` (miles, feet, pounds,
  fl oz), ``en_GB`` (kilometres, metres, stone, ml), anything else or absent = metric (km, m, kg,
  ml). Fitbit's default without the header is assumed metric (unverified upstream). An activity
  log's own ``distanceUnit`` ("Kilometer", "Mile", "Meter") always wins for its distance, speed and
  pace; without ``_units``, a "Mile" log's elevation is taken as feet.
- ``_date``: the request's ``{date}`` (``YYYY-MM-DD``). ``water`` responses never state their date, so it
  is required there; ``activity_summary`` and ``foods`` read it from their entries (``activities[].startDate``,
  ``foods[].logDate``) when those agree on one date, and need ``_date`` only for a day without entries.
- ``_sleep``: for ``spo2``, ``hrv`` and ``br``: the sleep response (or list of sleep logs) of the
  same dates. These metrics are measured during the main sleep of their ``dateTime`` (the date the
  sleep ended); with the sleep attached they also complete that Sleep (summary_id = its ``logId``).
  Breathing rate has no place in Terra's Daily, so ``br`` requires it. The poll hook
  (``connectors.providers.fitbit.client``) attaches the main sleep logs of the response's dates, trimmed to the
  fields read here, and publishes nights without a main sleep apart, without ``_sleep``.

Without the poller (a document fetched by other means): no ``_units`` = metric, which is what Fitbit answers a
request without ``Accept-Language``; no ``_profile`` = local times without an offset (localization 1, allowed by
Terra) — except activity logs, which carry their offset. Only ``water`` (no date anywhere), ``br`` (no sleep
anywhere) and an entry-less ``activity_summary``/``foods`` are refused, with a MappingError naming the field to add.

Zero means absent (Fitbit writes 0 where it measured nothing): ``restingHeartRate`` and ``averageHeartRate`` 0;
heart-rate zones when *every* zone has 0 minutes (no heart rate that day/activity; one empty zone among others is a
real 0); weight logs' ``bmi`` and ``fat`` 0; SpO2 ``avg``/minute values 0; HRV ``dailyRmssd``/``rmssd`` 0;
breathing rate 0; ``minutesToFallAsleep`` 0 of an ``auto_detected`` sleep (Fitbit detects the onset, it measures no
latency; *assumed*, a manual log's 0 is kept). A ``weight`` of 0 is not absent but impossible: it is mapped and the
plausibility stage drops that measurement. Steps, distance, floors, elevation, calories and activity minutes of 0 are
real zeros (Fitbit cannot tell an idle day from an unworn one).
``net_activity_calories`` = ``caloriesOut`` − ``caloriesBMR``: Fitbit's ``activityCalories`` includes the BMR of the
active minutes, so it is not mapped (a time series of ``activityCalories`` alone is refused).
Plausibility: values are mapped as Fitbit sends them; the pipeline's one plausibility stage
(``transforms.plausibility``) drops what no body can produce — a heart rate outside 1-250 bpm, SpO2 over 100 %, body
fat or efficiency outside 0-100 %, a breathing rate outside 1-80/min, a weight of 0 (that measurement goes) — and the
rest of the response is delivered. A day whose ``caloriesOut`` is below its ``caloriesBMR`` (which it includes) gets
no ``net_activity_calories``; its other values are delivered. Refused are only what cannot be read: a value that is not
a number (or NaN/infinite), one that overflows its unit conversion, a missing required field, an unknown unit or
level, no date, a time span that ends before it starts.

Choices: sleep stages deep/light/rem/wake → SleepLevel 5/4/6/1; classic asleep → 2 (SLEEPING),
restless and awake → 1 (AWAKE), because Fitbit counts restless minutes in ``minutesAwake``.
``shortData`` wake periods (≤ 3 min) overlay ``data`` and become AWAKE samples; consecutive equal
levels collapse. ``isMainSleep`` false → ``is_nap``. Activity types: see ``activity_types``.
Activity logs' ``lastModified`` is the fragment version (an edited log replaces the older one).
Intraday steps/distance/floors/calories become Terra's running-total samples from local midnight,
each stamped at the end of its interval (the last one at the next midnight = the day's total), so
their datasets must cover the day from 00:00 (request ``/1d/…``, not ``/time/…``); intraday
elevation (per-interval gain, not an altitude) is not mapped. Day-scoped records use Fitbit's local
date as their key; SpO2/HRV minutes of the night can precede that day's window.
Not mapped: activity summary's embedded ``activities`` (no offset; ``activities`` has them),
Active Zone Minutes, temperature, cardio score (VO2 max ranges), ECG/IRN; Fitbit has no
menstruation endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.base import Fragment, MappingError, Provider, compact
from connectors.providers.fitbit.activity_types import terra_activity_type
from connectors.timeutil import format_ts, parse_iso, to_ms

PROVIDER = Provider(
    "fitbit",
    "FITBIT",
    envelope="pages",
    user_field=None,
    doc="Fitbit Web API responses, one response per document (user id comes with the raw event)",
)

LOCAL = 1  # Terra TimestampLocalization
UPLOAD_AUTOMATIC, UPLOAD_MANUAL = 1, 2  # Terra UploadType
SLEEP_UPLOAD = {"manual": 1, "auto_detected": 2}  # Fitbit logType → Terra SleepUploadType (0 otherwise)
AWAKE, UNKNOWN_LEVEL = 1, 0
SLEEP_LEVEL = {  # Fitbit levels.data level → Terra SleepLevel
    "wake": AWAKE, "light": 4, "deep": 5, "rem": 6,  # type "stages"
    "awake": AWAKE, "restless": AWAKE, "asleep": 2,  # type "classic": restless counts as awake time at Fitbit
}
# Fitbit intraday calories ``level`` (0 sedentary … 3 very active) → Terra ActivityLevel
ACTIVITY_LEVEL = {0: 2, 1: 3, 2: 4, 3: 5}
MEAL_TYPE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}  # Fitbit mealTypeId → Terra MealType; 7 "Anytime" → 0 UNKNOWN
NUTRITION_UNIT = {  # Fitbit food unit name → Terra NutritionUnits (0 UNKNOWN otherwise)
    "gram": 1, "grams": 1, "g": 1, "teaspoon": 2, "tsp": 2, "tablespoon": 3, "tbsp": 3, "cup": 4, "cups": 4,
    "milliliter": 8, "milliliters": 8, "ml": 8, "ounce": 9, "ounces": 9, "oz": 9, "fl oz": 12, "fluid ounce": 12,
}
METERS_PER_DISTANCE_UNIT = {"kilometer": 1000.0, "km": 1000.0, "mile": 1609.344, "mi": 1609.344, "meter": 1.0,
                            "m": 1.0}
ACTIVITY_LEVEL_FIELDS = {"sedentary": "inactivity_seconds", "lightly": "low_intensity_seconds",
                        "fairly": "moderate_intensity_seconds", "very": "vigorous_intensity_seconds"}



@dataclass(frozen=True)
class Units:
    """How a response's quantities convert to Terra's units (one unit system per response)."""

    name: str
    meters_per_distance: float
    meters_per_elevation: float
    kg_per_weight: float
    ml_per_water: float


METRIC = Units("metric", 1000.0, 1.0, 1.0, 1.0)
US = Units("en_US", 1609.344, 0.3048, 0.45359237, 29.5735295625)
UNITS_BY_LOCALE = {"en_us": US, "en_gb": Units("en_GB", 1000.0, 1.0, 6.35029318, 1.0)}


# ----------------------------------------------------------------------------------------------------------------------
# Input helpers
# ----------------------------------------------------------------------------------------------------------------------
def _require(doc: dict[str, Any], path: str, *names: str) -> None:
    missing = [n for n in names if doc.get(n) is None]
    if missing:
        raise MappingError(f"{path}: missing required field(s): {', '.join(missing)}")


def _number(value: Any, path: str) -> float | int | None:
    """A JSON number, or a number written as a string (time series values); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise MappingError(f"{path} must be a number, got {value!r}") from None
        value = int(number) if number.is_integer() and "." not in value else number
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MappingError(f"{path} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # "nan", "inf" as text: no Fitbit value
        raise MappingError(f"{path} {value!r} is not a finite number")
    return value


def _scaled(value: Any, factor: float, path: str, digits: int = 3) -> float | None:
    number = _number(value, path)
    return None if number is None else round(number * factor, digits)


def _meters(value: Any, factor: float, path: str) -> int | None:
    """A distance in whole metres (Terra's distance_meters is an integer)."""
    number = _number(value, path)
    return None if number is None else _whole(number * factor, path)


def _whole(number: float, path: str) -> int:
    """``number`` rounded to an integer; a product that overflowed (a huge value converted) names its field."""
    if not math.isfinite(number):
        raise MappingError(f"{path}: its value converted to Terra's unit is not a finite number")
    return round(number)


def _measured(value: Any, path: str) -> float | int | None:
    """A value Fitbit writes as 0 when it measured nothing (see "Zero means absent"): 0 → ``None``."""
    number = _number(value, path)
    return None if number == 0 else number


def _bpm(value: Any, path: str) -> float | int | None:
    """A heart rate in bpm; 0 = not measured (an impossible one is the plausibility stage's to drop)."""
    return _measured(value, path)


def _percentage(value: Any, path: str, zero_is_absent: bool = True) -> float | int | None:
    """A percentage; 0 = not measured unless ``zero_is_absent`` is False (sleep efficiency)."""
    return _measured(value, path) if zero_is_absent else _number(value, path)


def _seconds(minutes: Any, path: str) -> float | int | None:
    number = _number(minutes, path)
    return None if number is None else number * 60


def _object(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MappingError(f"{path} must be an object, got {type(value).__name__}")
    return value


def _list(doc: dict[str, Any], name: str, path: str | None = None) -> list[dict[str, Any]]:
    """A list of JSON objects (absent or null = empty)."""
    path = path or name
    items = doc.get(name)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise MappingError(f"{path} must be a list of objects")
    return items


def _entries(doc: dict[str, Any], name: str, marker: str) -> list[dict[str, Any]]:
    """The entries of a response (``doc[name]`` is a list), or the document itself when it is one entry."""
    if isinstance(doc.get(name), list):
        return _list(doc, name)
    if doc.get(marker) is not None:
        return [doc]
    raise MappingError(f"expected a Fitbit response with a {name!r} list, or a single entry with {marker!r}")


def _date(value: Any, path: str) -> date:
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise MappingError(f"{path} must be a YYYY-MM-DD date, got {value!r}") from None


def _request_date(doc: dict[str, Any], kind: str, entry_dates: list[date] | None = None) -> date:
    """The ``_date`` the poller added; else the single date all entries agree on."""
    if doc.get("_date") is not None:
        return _date(doc["_date"], "_date")
    if entry_dates and len(set(entry_dates)) == 1:
        return entry_dates[0]
    found = f" (its entries name {len(set(entry_dates))} dates)" if entry_dates else ""
    raise MappingError(f"{kind} response does not state its date{found}: add '_date' (the request's YYYY-MM-DD) at the "
                       "top level of the response, as the Fitbit poll hook does")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins on conflicting leaves."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _units(doc: dict[str, Any]) -> Units:
    """The unit system of a response from the poller's ``_units`` (its Accept-Language); default metric."""
    locale = doc.get("_units")
    if locale is None:
        return METRIC
    if not isinstance(locale, str):
        raise MappingError(f"_units must be the Accept-Language sent (e.g. 'en_US'), got {locale!r}")
    return UNITS_BY_LOCALE.get(locale.strip().replace("-", "_").lower(), METRIC)


# ----------------------------------------------------------------------------------------------------------------------
# Time: Fitbit's offset-less local times and the user's zone
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clock:
    """Turns Fitbit's local wall-clock times into Terra timestamps for one user.

    ``zone`` is the user's IANA zone, a fixed offset, or ``None`` (unknown: times stay offset-less).
    Aware datetimes always carry a fixed offset (the one in force at that instant), so comparing and
    adding works on instants.
    """

    zone: tzinfo | None

    def parse(self, text: Any, path: str) -> datetime:
        """An ISO-8601 time; offset-less (Fitbit's local time) → localized in the user's zone if known."""
        if not isinstance(text, str):
            raise MappingError(f"{path} must be an ISO-8601 time, got {text!r}")
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise MappingError(f"{path} must be an ISO-8601 time, got {text!r}") from None
        return moment if moment.tzinfo is not None else self._localize(moment)

    def at(self, day: date, clock_time: Any, path: str) -> datetime:
        """``day`` at a local ``HH:MM[:SS]``."""
        if not isinstance(clock_time, str):
            raise MappingError(f"{path} must be a local time HH:MM:SS, got {clock_time!r}")
        return self.parse(f"{day.isoformat()}T{clock_time}", path)

    def later(self, moment: datetime, seconds: float) -> datetime:
        """``moment`` plus elapsed ``seconds``, shown in the offset in force then (naive: wall-clock sum)."""
        shifted = _after(moment, seconds)
        if shifted.tzinfo is None or self.zone is None:
            return shifted
        return self._fixed(shifted.astimezone(self.zone))

    def text(self, moment: datetime) -> str:
        """Terra timestamp text; an unknown zone gives local time without an offset (localization 1)."""
        return format_ts(moment) if moment.tzinfo is not None else moment.isoformat(timespec="microseconds")

    def day(self, day: date) -> tuple[str, str]:
        """Local midnight of ``day`` to the next local midnight (23 or 25 h on DST days)."""
        start = self._localize(datetime.combine(day, time()))
        end = self._localize(datetime.combine(day + timedelta(days=1), time()))
        return self.text(start), self.text(end)

    def _localize(self, naive: datetime) -> datetime:
        if self.zone is None:
            return naive
        return self._fixed(naive.replace(tzinfo=self.zone))  # ambiguous/missing wall times: fold 0

    @staticmethod
    def _fixed(moment: datetime) -> datetime:
        return moment.replace(tzinfo=timezone(moment.utcoffset() or timedelta(0)))


def _after(moment: datetime, seconds: float) -> datetime:
    try:
        return moment + timedelta(seconds=seconds)
    except OverflowError:
        raise MappingError(f"{moment.isoformat()} + {seconds} s is not a representable time") from None


def _clock(doc: dict[str, Any]) -> Clock:
    """The user's zone from the poller's ``_profile`` (see the module docstring)."""
    profile = doc.get("_profile")
    if profile is None:
        return Clock(None)
    profile = _object(profile, "_profile")
    if isinstance(profile.get("user"), dict):
        profile = profile["user"]
    name, millis = profile.get("timezone"), profile.get("offsetFromUTCMillis")
    if name is not None:
        try:
            if not isinstance(name, str):
                raise ValueError(name)
            return Clock(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError, OSError):
            if millis is None:
                raise MappingError(f"_profile.timezone {name!r} is not a known IANA time zone") from None
    if millis is not None:
        offset = _number(millis, "_profile.offsetFromUTCMillis")
        if abs(offset) >= 86_400_000:
            raise MappingError(f"_profile.offsetFromUTCMillis {millis!r} is not a UTC offset")
        return Clock(timezone(timedelta(milliseconds=offset)))
    return Clock(None)


def _day_metadata(day: date, clock: Clock) -> dict[str, Any]:
    start, end = clock.day(day)
    return {"start_time": start, "end_time": end, "upload_type": UPLOAD_AUTOMATIC, "timestamp_localization": LOCAL}


def _hr_zones(zones: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """Fitbit's heart-rate zones (Out of Range, Fat Burn, Cardio, Peak, in that order) → Terra zones 0-3.

    Every zone at 0 minutes = no heart rate recorded that day or activity (Fitbit still lists the zones): no zones.
    One empty zone among others is a real 0."""
    out = [{"zone": index, "name": zone.get("name"),
            "duration_seconds": _seconds(zone["minutes"], f"{path}[{index}].minutes")}
           for index, zone in enumerate(zones) if zone.get("minutes") is not None]
    return out if any(zone["duration_seconds"] for zone in out) else []


# ----------------------------------------------------------------------------------------------------------------------
# activities
# ----------------------------------------------------------------------------------------------------------------------
def _distance_unit(log: dict[str, Any], units: Units, path: str) -> float:
    """Metres per unit of an activity log's distance: its ``distanceUnit``, else the response's unit system."""
    name = log.get("distanceUnit")
    if name is None:
        return units.meters_per_distance
    meters = METERS_PER_DISTANCE_UNIT.get(str(name).strip().lower().removesuffix("s"))
    if meters is None:
        raise MappingError(f"{path}.distanceUnit {name!r} is not one of Kilometer, Mile, Meter")
    return meters


def _version_ms(text: Any, path: str) -> int | None:
    """``lastModified`` (UTC, ``…Z``) in epoch ms: the newest version of a log wins."""
    if text is None:
        return None
    try:
        return to_ms(parse_iso(text))
    except (TypeError, ValueError, AttributeError):
        raise MappingError(f"{path} must be an ISO-8601 time with offset, got {text!r}") from None


def _activity(log: dict[str, Any], clock: Clock, units: Units, explicit_units: bool, path: str) -> Fragment:
    _require(log, path, "logId", "startTime", "duration")
    start = clock.parse(log["startTime"], f"{path}.startTime")
    duration_s = _number(log["duration"], f"{path}.duration") / 1000  # ms, pauses included
    if duration_s < 0:
        raise MappingError(f"{path}.duration is negative")
    per_unit = _distance_unit(log, units, path)
    if not explicit_units and per_unit == US.meters_per_distance:
        units = US  # a response in miles is a US-units response: elevation is in feet
    distance, speed, pace = (_number(log.get(n), f"{path}.{n}") for n in ("distance", "speed", "pace"))
    manual_values = _object(log.get("manualValuesSpecified"), f"{path}.manualValuesSpecified")
    manual = log.get("logType") == "manual" or any(v is True for v in manual_values.values())
    levels = {entry.get("name"): entry.get("minutes") for entry in _list(log, "activityLevel", f"{path}.activityLevel")}
    active_ms = _number(log.get("activeDuration"), f"{path}.activeDuration")
    source = _object(log.get("source"), f"{path}.source")
    last_modified = log.get("lastModified")
    record = compact({
        "metadata": {
            "summary_id": str(log["logId"]),
            "start_time": clock.text(start),
            "end_time": clock.text(_after(start, duration_s)),  # in the log's own offset
            "type": terra_activity_type(log.get("activityTypeId"), log.get("activityName")),
            "upload_type": UPLOAD_MANUAL if manual else UPLOAD_AUTOMATIC,
            "name": log.get("activityName"),
            "timestamp_localization": LOCAL,
        },
        "distance_data": {"summary": {
            "distance_meters": _whole(distance * per_unit, f"{path}.distance") if distance is not None else None,
            "steps": _number(log.get("steps"), f"{path}.steps"),
            "elevation": {"gain_actual_meters": _scaled(log.get("elevationGain"), units.meters_per_elevation,
                                                        f"{path}.elevationGain", 2)},
        }},
        "calories_data": {"total_burned_calories": _number(log.get("calories"), f"{path}.calories")},
        "active_durations_data": {
            "activity_seconds": active_ms / 1000 if active_ms is not None else None,  # pauses excluded
            **{field: _seconds(levels.get(name), f"{path}.activityLevel.{name}")
               for name, field in ACTIVITY_LEVEL_FIELDS.items()},
        },
        "heart_rate_data": {"summary": {
            "avg_hr_bpm": _bpm(log.get("averageHeartRate"), f"{path}.averageHeartRate"),
            "hr_zone_data": _hr_zones(_list(log, "heartRateZones", f"{path}.heartRateZones"), f"{path}.heartRateZones"),
        }},
        "movement_data": {  # speed: distance units per hour; pace: seconds per distance unit
            "avg_speed_meters_per_second": round(speed * per_unit / 3600, 3) if speed is not None else None,
            "avg_pace_minutes_per_kilometer": round(pace / 60 * 1000 / per_unit, 3) if pace else None,
        },
        "device_data": {"name": source.get("name"),
                        "manufacturer": "Fitbit" if source.get("type") == "tracker" else None},
    })
    return Fragment("activity", record, version_ms=_version_ms(last_modified, f"{path}.lastModified"))


@PROVIDER.kind("activities", "activity")
def activities(doc: dict[str, Any]) -> list[Fragment]:
    """Activity log list page: one Activity per ``logId`` (times in the log's own offset, ``lastModified`` version)."""
    clock, units, explicit = _clock(doc), _units(doc), doc.get("_units") is not None
    return [_activity(log, clock, units, explicit, f"activities[{index}]")
            for index, log in enumerate(_entries(doc, "activities", "logId"))]


# ----------------------------------------------------------------------------------------------------------------------
# activity_summary, activity_timeseries
# ----------------------------------------------------------------------------------------------------------------------
def _summary_daily(summary: dict[str, Any], day: date, clock: Clock, units: Units) -> dict[str, Any]:
    distances = {entry.get("activity"): entry.get("distance") for entry in _list(summary, "distances",
                                                                                 "summary.distances")}
    minutes = {name: _number(summary.get(f"{name}Minutes"), f"summary.{name}Minutes")
               for name in ("sedentary", "lightlyActive", "fairlyActive", "veryActive")}
    active = [minutes["lightlyActive"], minutes["fairlyActive"], minutes["veryActive"]]
    return {
        "metadata": _day_metadata(day, clock),
        "distance_data": {
            "steps": _number(summary.get("steps"), "summary.steps"),
            "distance_meters": _meters(distances.get("total"), units.meters_per_distance, "summary.distances.total"),
            "floors_climbed": _number(summary.get("floors"), "summary.floors"),
            "elevation": {"gain_actual_meters": _scaled(summary.get("elevation"), units.meters_per_elevation,
                                                        "summary.elevation", 2)},
        },
        "calories_data": {
            "total_burned_calories": _number(summary.get("caloriesOut"), "summary.caloriesOut"),
            "BMR_calories": _number(summary.get("caloriesBMR"), "summary.caloriesBMR"),
        },
        "active_durations_data": {
            "activity_seconds": sum(active) * 60 if None not in active else None,
            "low_intensity_seconds": _seconds(minutes["lightlyActive"], "summary.lightlyActiveMinutes"),
            "moderate_intensity_seconds": _seconds(minutes["fairlyActive"], "summary.fairlyActiveMinutes"),
            "vigorous_intensity_seconds": _seconds(minutes["veryActive"], "summary.veryActiveMinutes"),
            "inactivity_seconds": _seconds(minutes["sedentary"], "summary.sedentaryMinutes"),
        },
        "MET_data": {
            "num_low_intensity_minutes": minutes["lightlyActive"],
            "num_moderate_intensity_minutes": minutes["fairlyActive"],
            "num_high_intensity_minutes": minutes["veryActive"],
            "num_inactive_minutes": minutes["sedentary"],
        },
        "heart_rate_data": {"summary": {
            "resting_hr_bpm": _bpm(summary.get("restingHeartRate"), "summary.restingHeartRate"),
            "hr_zone_data": _hr_zones(_list(summary, "heartRateZones", "summary.heartRateZones"),
                                      "summary.heartRateZones"),
        }},
    }


def _day_value(resource: str, value: Any, units: Units, path: str) -> dict[str, Any] | None:
    """One day's value of an ``activities-<resource>`` time series → the Daily fields it fills."""
    if resource == "heart":
        value = _object(value, path)
        summary = compact({
            "resting_hr_bpm": _bpm(value.get("restingHeartRate"), f"{path}.restingHeartRate"),
            "hr_zone_data": _hr_zones(_list(value, "heartRateZones", f"{path}.heartRateZones"),
                                      f"{path}.heartRateZones"),
        })
        return {"heart_rate_data": {"summary": summary}} if summary else None  # a day without heart rate: no Daily
    number = _number(value, path)
    if number is None:
        return None
    minutes_fields = {"minutesSedentary": ("inactivity_seconds", "num_inactive_minutes"),
                      "minutesLightlyActive": ("low_intensity_seconds", "num_low_intensity_minutes"),
                      "minutesFairlyActive": ("moderate_intensity_seconds", "num_moderate_intensity_minutes"),
                      "minutesVeryActive": ("vigorous_intensity_seconds", "num_high_intensity_minutes")}
    if resource in minutes_fields:
        seconds_field, minutes_field = minutes_fields[resource]
        return {"active_durations_data": {seconds_field: number * 60}, "MET_data": {minutes_field: number}}
    return {
        "steps": {"distance_data": {"steps": number}},
        "distance": {"distance_data": {"distance_meters": _whole(number * units.meters_per_distance, path)}},
        "floors": {"distance_data": {"floors_climbed": number}},
        "elevation": {"distance_data": {"elevation": {"gain_actual_meters": round(
            number * units.meters_per_elevation, 2)}}},
        "calories": {"calories_data": {"total_burned_calories": number}},
        "caloriesBMR": {"calories_data": {"BMR_calories": number}},
    }.get(resource)  # activityCalories includes the BMR of active minutes: net comes from calories − caloriesBMR


CUMULATIVE_SAMPLES = {  # intraday resource → (Terra sample list path, value name): running totals from midnight
    "steps": (("distance_data", "detailed", "step_samples"), "steps"),
    "distance": (("distance_data", "detailed", "distance_samples"), "distance_meters"),
    "floors": (("distance_data", "detailed", "floors_climbed_samples"), "floors_climbed"),
    "calories": (("calories_data", "calorie_samples"), "calories"),
}


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


def _intraday(resource: str, block: Any, day: date, clock: Clock, units: Units, path: str) -> dict[str, Any] | None:
    """An ``activities-<resource>-intraday`` dataset of ``day`` → Daily samples."""
    block = _object(block, path)
    dataset = _list(block, "dataset", f"{path}.dataset")
    points = [(clock.at(day, point.get("time"), f"{path}.dataset[{i}].time"), point) for i, point in enumerate(dataset)]
    values = [_number(point.get("value"), f"{path}.dataset[{i}].value") for i, (_, point) in enumerate(points)]
    if resource == "heart":
        samples = [{"timestamp": clock.text(at), "bpm": bpm} for (at, _), bpm in zip(points, values, strict=True)
                   if bpm is not None]
        bpms = [s["bpm"] for s in samples]
        return {"heart_rate_data": {
            "summary": {"avg_hr_bpm": round(sum(bpms) / len(bpms), 2) if bpms else None,
                        "min_hr_bpm": min(bpms, default=None), "max_hr_bpm": max(bpms, default=None)},
            "detailed": {"hr_samples": samples},
        }}
    if resource not in CUMULATIVE_SAMPLES:
        return None
    if dataset and dataset[0].get("time") not in ("00:00:00", "00:00"):
        raise MappingError(f"{path} starts at {dataset[0].get('time')!r}, not 00:00:00: Terra's {resource} samples are "
                           "running totals of the day, so request the whole day (/1d/…), not a time window")
    interval = _number(block.get("datasetInterval") or 1, f"{path}.datasetInterval")
    interval_s = interval * (1 if block.get("datasetType") == "second" else 60)
    sample_path, name = CUMULATIVE_SAMPLES[resource]
    factor = units.meters_per_distance if resource == "distance" else 1
    total, samples = 0.0, []
    for (at, _), value in zip(points, values, strict=True):
        total += (value or 0) * factor  # the total at the end of the interval that starts at ``at``
        samples.append({"timestamp": clock.text(clock.later(at, interval_s)),
                        name: round(total, 2) if resource in ("distance", "calories") else _whole(total, path)})
    fields = _nest(sample_path, samples)
    if resource == "calories":  # each point also carries its activity level (0-3) and METs × 10
        levels = [{"timestamp": clock.text(at), "level": ACTIVITY_LEVEL[point["level"]]}
                  for at, point in points if point.get("level") in ACTIVITY_LEVEL]
        mets = [{"timestamp": clock.text(at), "level": _number(point["mets"], f"{path}.mets") / 10}
                for at, point in points if point.get("mets") is not None]
        fields = _merge(fields, {"active_durations_data": {"activity_levels_samples": levels},
                                 "MET_data": {"MET_samples": mets}})
    return fields


def _timeseries(doc: dict[str, Any], clock: Clock, units: Units) -> dict[date, dict[str, Any]]:
    """Every ``activities-<resource>`` series and ``…-intraday`` dataset of a document, by day."""
    days: dict[date, dict[str, Any]] = {}

    def add(day: date, fields: dict[str, Any] | None) -> None:
        if fields:
            days[day] = _merge(days.get(day) or {"metadata": _day_metadata(day, clock)}, fields)

    for key, series in doc.items():
        if not key.startswith("activities-") or key.endswith("-intraday"):
            continue
        resource = key.removeprefix("activities-")
        if not isinstance(series, list) or not all(isinstance(point, dict) for point in series):
            raise MappingError(f"{key} must be a list of {{dateTime, value}}")
        for index, point in enumerate(series):
            add(_date(point.get("dateTime"), f"{key}[{index}].dateTime"),
                _day_value(resource, point.get("value"), units, f"{key}[{index}].value"))
    for key, block in doc.items():
        if not key.startswith("activities-") or not key.endswith("-intraday"):
            continue
        resource = key.removeprefix("activities-").removesuffix("-intraday")
        series = doc.get(f"activities-{resource}")
        dates = [point.get("dateTime") for point in series] if isinstance(series, list) else []
        if len(dates) == 1:
            day = _date(dates[0], f"activities-{resource}[0].dateTime")
        elif not dates:
            day = _request_date(doc, key)
        else:
            raise MappingError(f"{key} belongs to one day, but activities-{resource} holds {len(dates)} days")
        add(day, _intraday(resource, block, day, clock, units, key))
    return days


def _with_net_calories(record: dict[str, Any]) -> dict[str, Any]:
    """``net_activity_calories`` = total − BMR (Fitbit's ``activityCalories`` also counts the BMR of active minutes);
    absent when either is, or when the total is below the BMR it includes (no net value can be told)."""
    calories = record.get("calories_data") or {}
    total, bmr = calories.get("total_burned_calories"), calories.get("BMR_calories")
    if total is None or bmr is None or total < bmr:
        return record
    return _merge(record, {"calories_data": {"net_activity_calories": round(total - bmr, 2)}})


@PROVIDER.kind("activity_summary", "daily")
def activity_summary(doc: dict[str, Any]) -> list[Fragment]:
    """The day's activity summary (``_date`` required): steps, distance, floors, calories, activity minutes,
    resting HR and HR zones; time series or intraday blocks the poller added to the document merge in."""
    summary = doc.get("summary")
    if not isinstance(summary, dict):
        raise MappingError("activity_summary response has no 'summary' object")
    clock, units = _clock(doc), _units(doc)
    logged = [_date(log.get("startDate"), f"activities[{i}].startDate")
              for i, log in enumerate(_list(doc, "activities")) if log.get("startDate") is not None]
    day = _request_date(doc, "activity_summary", logged)
    days = _timeseries(doc, clock, units)
    days[day] = _merge(days.get(day) or {}, _summary_daily(summary, day, clock, units))
    return [Fragment("daily", compact(_with_net_calories(record))) for _, record in sorted(days.items())]


@PROVIDER.kind("activity_timeseries", "daily")
def activity_timeseries(doc: dict[str, Any]) -> list[Fragment]:
    """``activities-<resource>`` time series (one Daily per ``dateTime``) with their intraday datasets, if any."""
    if not any(key.startswith("activities-") for key in doc):
        raise MappingError("activity_timeseries response has no 'activities-<resource>' series")
    days = _timeseries(doc, _clock(doc), _units(doc))
    if not days:
        raise MappingError(f"no mappable resource among {', '.join(k for k in doc if k.startswith('activities-'))} "
                           "(activityCalories includes BMR of active minutes: request calories and caloriesBMR)")
    return [Fragment("daily", compact(_with_net_calories(record))) for _, record in sorted(days.items())]


# ----------------------------------------------------------------------------------------------------------------------
# sleep
# ----------------------------------------------------------------------------------------------------------------------
def _sleep_metadata(log: dict[str, Any], clock: Clock, path: str) -> tuple[dict[str, Any], datetime, datetime]:
    _require(log, path, "logId", "startTime", "endTime")
    start, end = clock.parse(log["startTime"], f"{path}.startTime"), clock.parse(log["endTime"], f"{path}.endTime")
    if end < start:
        raise MappingError(f"{path}: endTime {log['endTime']} is before startTime {log['startTime']}")
    main = log.get("isMainSleep")
    metadata = {
        "summary_id": str(log["logId"]),
        "start_time": clock.text(start),
        "end_time": clock.text(end),
        "upload_type": SLEEP_UPLOAD.get(log.get("logType"), 0),
        "is_nap": not main if isinstance(main, bool) else None,
        "timestamp_localization": LOCAL,
    }
    return metadata, start, end


def _spans(entries: list[dict[str, Any]], clock: Clock, path: str) -> Iterator[tuple[datetime, datetime, int]]:
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        _require(entry, where, "dateTime", "level", "seconds")
        if entry["level"] not in SLEEP_LEVEL:
            raise MappingError(f"{where}.level {entry['level']!r} is not a Fitbit sleep level "
                               f"({', '.join(SLEEP_LEVEL)})")
        start = clock.parse(entry["dateTime"], f"{where}.dateTime")
        yield start, clock.later(start, _number(entry["seconds"], f"{where}.seconds")), SLEEP_LEVEL[entry["level"]]


def _hypnogram(levels: dict[str, Any], clock: Clock, path: str) -> list[dict[str, Any]]:
    """``levels.data`` with ``levels.shortData`` wake periods laid over it → level-change samples."""
    spans = list(_spans(_list(levels, "data", f"{path}.data"), clock, f"{path}.data"))
    wakes = list(_spans(_list(levels, "shortData", f"{path}.shortData"), clock, f"{path}.shortData"))
    if not spans:
        return []
    night_end = max(end for _, end, _ in spans)
    cuts = sorted({t for start, end, _ in spans + wakes for t in (start, end)})
    samples: list[dict[str, Any]] = []
    previous = None
    for cut in cuts:
        if any(start <= cut < end for start, end, _ in wakes):
            level = AWAKE
        else:
            level = next((lv for start, end, lv in spans if start <= cut < end), None)
            if level is None:
                if cut >= night_end:
                    continue
                level = UNKNOWN_LEVEL  # a gap between Fitbit's stage intervals
        if level != previous:
            samples.append({"timestamp": clock.text(cut), "level": level})
            previous = level
    return samples


def _sleep_record(log: dict[str, Any], clock: Clock, path: str) -> dict[str, Any]:
    metadata, start, end = _sleep_metadata(log, clock, path)
    levels = _object(log.get("levels"), f"{path}.levels")
    summary = _object(levels.get("summary"), f"{path}.levels.summary")

    def stage(name: str, field: str = "minutes") -> Any:
        value = _object(summary.get(name), f"{path}.levels.summary.{name}").get(field)
        number = _number(value, f"{path}.levels.summary.{name}.{field}")
        return number * 60 if field == "minutes" and number is not None else number

    duration = _number(log.get("duration"), f"{path}.duration")
    wake_level = "wake" if "wake" in summary else "awake"
    latency = _seconds(log.get("minutesToFallAsleep"), f"{path}.minutesToFallAsleep")
    if latency == 0 and log.get("logType") == "auto_detected":
        latency = None  # Fitbit writes 0 for every auto-detected sleep: the onset is detected, no latency measured
    return compact({
        "metadata": metadata,
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": _seconds(log.get("minutesAsleep"), f"{path}.minutesAsleep"),
                "duration_deep_sleep_state_seconds": stage("deep"),
                "duration_light_sleep_state_seconds": stage("light"),
                "duration_REM_sleep_state_seconds": stage("rem"),
                "num_REM_events": stage("rem", "count"),
            },
            "awake": {
                "duration_awake_state_seconds": _seconds(log.get("minutesAwake"), f"{path}.minutesAwake"),
                "sleep_latency_seconds": latency,
                "wake_up_latency_seconds": _seconds(log.get("minutesAfterWakeup"), f"{path}.minutesAfterWakeup"),
                "num_wakeup_events": stage(wake_level, "count"),
            },
            "other": {"duration_in_bed_seconds": duration / 1000 if duration is not None
                      else (end - start).total_seconds()},
            "sleep_efficiency": _percentage(log.get("efficiency"), f"{path}.efficiency", False),  # Terra's scale
            "hypnogram_samples": _hypnogram(levels, clock, f"{path}.levels"),
        },
    })


@PROVIDER.kind("sleep", "sleep")
def sleep(doc: dict[str, Any]) -> list[Fragment]:
    """Sleep logs (v1.2): stage or classic totals, hypnogram with short wakes, efficiency, nap flag."""
    clock = _clock(doc)
    return [Fragment("sleep", _sleep_record(log, clock, f"sleep[{index}]"))
            for index, log in enumerate(_entries(doc, "sleep", "logId"))]


# ----------------------------------------------------------------------------------------------------------------------
# spo2, hrv, br: nightly metrics → the Daily of their date and, with ``_sleep``, the main sleep
# ----------------------------------------------------------------------------------------------------------------------
def _attached_sleeps(doc: dict[str, Any]) -> list[dict[str, Any]] | None:
    attached = doc.get("_sleep")
    if attached is None:
        return None
    if isinstance(attached, dict):
        return _list(attached, "sleep", "_sleep.sleep") if "sleep" in attached else [attached]
    if isinstance(attached, list) and all(isinstance(log, dict) for log in attached):
        return attached
    raise MappingError("_sleep must be a sleep response, a list of sleep logs or one sleep log")


def _main_sleep(sleeps: list[dict[str, Any]], day: date, clock: Clock, path: str) -> dict[str, Any]:
    """Sleep metadata of the main sleep that ended on ``day`` (the metric's ``dateTime``)."""
    mains = [log for log in sleeps if log.get("dateOfSleep") == day.isoformat() and log.get("isMainSleep") is True]
    if len(mains) != 1:
        raise MappingError(f"{path}: the attached _sleep holds {len(mains)} main sleeps ending {day}; expected one")
    return _sleep_metadata(mains[0], clock, f"{path}._sleep")[0]


def _nightly(doc: dict[str, Any], name: str) -> Iterator[tuple[str, dict[str, Any], date, Clock]]:
    clock = _clock(doc)
    if not any(not key.startswith("_") for key in doc):
        return  # ``{}``: Fitbit's single-day answer for a night without a reading
    for index, entry in enumerate(_entries(doc, name, "dateTime")):
        path = f"{name}[{index}]"
        yield path, entry, _date(entry.get("dateTime"), f"{path}.dateTime"), clock


@PROVIDER.kind("spo2", "daily", "sleep")
def spo2(doc: dict[str, Any]) -> list[Fragment]:
    """Nightly SpO2 (% average, and per-minute values from ``/all``) → the Daily of its date (+ its main sleep)."""
    sleeps, out = _attached_sleeps(doc), []
    for path, entry, day, clock in _nightly(doc, "spo2"):
        average = _percentage(_object(entry.get("value"), f"{path}.value").get("avg"), f"{path}.value.avg")
        samples = [{"timestamp": clock.text(clock.parse(minute.get("minute"), f"{path}.minutes[{i}].minute")),
                    "percentage": percentage, "type": 0}
                   for i, minute in enumerate(_list(entry, "minutes", f"{path}.minutes"))
                   if (percentage := _percentage(minute.get("value"), f"{path}.minutes[{i}].value")) is not None]
        if average is None and not samples:
            raise MappingError(f"{path} has neither value.avg nor minutes")
        out.append(Fragment("daily", compact({
            "metadata": _day_metadata(day, clock),
            "oxygen_data": {"avg_saturation_percentage": average, "saturation_samples": samples},
        })))
        if sleeps is not None:
            metadata = _main_sleep(sleeps, day, clock, path)
            out.append(Fragment("sleep", compact({"metadata": metadata, "respiration_data": {"oxygen_saturation_data": {
                "start_time": metadata["start_time"], "end_time": metadata["end_time"],
                "avg_saturation_percentage": average, "samples": samples}}})))
    return out


@PROVIDER.kind("hrv", "daily", "sleep")
def hrv(doc: dict[str, Any]) -> list[Fragment]:
    """Nightly HRV (RMSSD, ms; 5-minute values from ``/all``) → the Daily of its date (+ its main sleep)."""
    sleeps, out = _attached_sleeps(doc), []
    for path, entry, day, clock in _nightly(doc, "hrv"):
        rmssd = _measured(_object(entry.get("value"), f"{path}.value").get("dailyRmssd"), f"{path}.value.dailyRmssd")
        samples = []
        for i, minute in enumerate(_list(entry, "minutes", f"{path}.minutes")):
            where = f"{path}.minutes[{i}]"
            value = _measured(_object(minute.get("value"), f"{where}.value").get("rmssd"), f"{where}.value.rmssd")
            if value is not None:
                samples.append({"timestamp": clock.text(clock.parse(minute.get("minute"), f"{where}.minute")),
                                "hrv_rmssd": value})
        if rmssd is None and not samples:
            raise MappingError(f"{path} has neither value.dailyRmssd nor minutes")
        heart = {"summary": {"avg_hrv_rmssd": rmssd}, "detailed": {"hrv_samples_rmssd": samples}}
        out.append(Fragment("daily", compact({"metadata": _day_metadata(day, clock), "heart_rate_data": heart})))
        if sleeps is not None:
            out.append(Fragment("sleep", compact({"metadata": _main_sleep(sleeps, day, clock, path),
                                                  "heart_rate_data": heart})))
    return out


@PROVIDER.kind("br", "sleep")
def br(doc: dict[str, Any]) -> list[Fragment]:
    """Nightly breathing rate (breaths/min) → the main sleep of its date, which ``_sleep`` must carry.

    Terra's Daily has no respiration field. The per-stage rates of ``/all`` have no Terra field
    either: the full-sleep rate is used.
    """
    sleeps = _attached_sleeps(doc)
    if sleeps is None:
        raise MappingError("br belongs to the night's main sleep, which a br response does not name: the poller must "
                           "attach the sleep response of the same dates as '_sleep'")
    out = []
    for path, entry, day, clock in _nightly(doc, "br"):
        value = _object(entry.get("value"), f"{path}.value")
        rate = value.get("breathingRate")
        if rate is None:
            rate = _object(value.get("fullSleepSummary"), f"{path}.value.fullSleepSummary").get("breathingRate")
        rate = _measured(rate, f"{path}.value.breathingRate")
        if rate is None:
            raise MappingError(f"{path} has no breathingRate")
        metadata = _main_sleep(sleeps, day, clock, path)
        out.append(Fragment("sleep", {"metadata": metadata, "respiration_data": {"breaths_data": {
            "start_time": metadata["start_time"], "end_time": metadata["end_time"], "avg_breaths_per_min": rate}}}))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# weight, fat
# ----------------------------------------------------------------------------------------------------------------------
def _body(doc: dict[str, Any], kind: str) -> list[Fragment]:
    """Weight and body-fat logs (either list, or both when the poller combines them) → one Body per local date.

    A fat log at the same date and time as a weight log fills that weight measurement's body fat.
    """
    clock, units = _clock(doc), _units(doc)
    lists = {name: _list(doc, name) for name in ("weight", "fat") if isinstance(doc.get(name), list)}
    if not lists:
        lists = {kind: _entries(doc, kind, "logId")}
    measurements: dict[date, dict[datetime, dict[str, Any]]] = {}
    for name in ("weight", "fat"):
        for index, log in enumerate(lists.get(name, [])):
            path = f"{name}[{index}]"
            _require(log, path, "logId", "date", "time", name)
            day = _date(log["date"], f"{path}.date")
            at = clock.at(day, log["time"], f"{path}.time")
            sample = measurements.setdefault(day, {}).setdefault(at, {"measurement_time": clock.text(at)})
            if name == "weight":
                sample.update(compact({
                    "weight_kg": _scaled(log["weight"], units.kg_per_weight, f"{path}.weight"),
                    "BMI": _measured(log.get("bmi"), f"{path}.bmi"),
                    "bodyfat_percentage": _percentage(log.get("fat"), f"{path}.fat"),
                }))
            elif (body_fat := _percentage(log["fat"], f"{path}.fat")) is not None:
                sample.setdefault("bodyfat_percentage", body_fat)
    out = []
    for day, samples in sorted(measurements.items()):
        start, end = clock.day(day)
        out.append(Fragment("body", {
            "metadata": {"start_time": start, "end_time": end, "timestamp_localization": LOCAL},
            "measurements_data": {"measurements": [samples[at] for at in sorted(samples)]},
        }))
    return out


@PROVIDER.kind("weight", "body")
def weight(doc: dict[str, Any]) -> list[Fragment]:
    """Weight logs (kg, lb or stone by ``_units``) with BMI and body fat %; a ``fat`` list alongside is joined."""
    return _body(doc, "weight")


@PROVIDER.kind("fat", "body")
def fat(doc: dict[str, Any]) -> list[Fragment]:
    """Body-fat logs (%). Polled, they come inside the weight page of their window (the poll hook fetches both), so a
    day's Body holds every weight and fat reading; a fat list alone (e.g. a file import) maps the same way."""
    return _body(doc, "fat")


# ----------------------------------------------------------------------------------------------------------------------
# foods, water
# ----------------------------------------------------------------------------------------------------------------------
def _macros(values: dict[str, Any], path: str) -> dict[str, Any]:
    return compact({
        "calories": _number(values.get("calories"), f"{path}.calories"),
        "carbohydrates_g": _number(values.get("carbs"), f"{path}.carbs"),
        "fat_g": _number(values.get("fat"), f"{path}.fat"),
        "fiber_g": _number(values.get("fiber"), f"{path}.fiber"),
        "protein_g": _number(values.get("protein"), f"{path}.protein"),
        "sodium_mg": _number(values.get("sodium"), f"{path}.sodium"),
    })


def _meal(entry: dict[str, Any], day: date, at: str, path: str) -> dict[str, Any]:
    _require(entry, path, "logId", "loggedFood")
    food = _object(entry["loggedFood"], f"{path}.loggedFood")
    _require(food, f"{path}.loggedFood", "name", "amount")
    if entry.get("logDate") is not None and _date(entry["logDate"], f"{path}.logDate") != day:
        raise MappingError(f"{path}.logDate {entry['logDate']} is not the response's date {day}")
    unit = _object(food.get("unit"), f"{path}.loggedFood.unit")
    return {
        "id": str(entry["logId"]),
        "name": food["name"],
        "timestamp": at,  # Fitbit food logs have a date, no time: the day's local midnight
        "type": MEAL_TYPE.get(food.get("mealTypeId"), 0),
        "quantity": {"unit": NUTRITION_UNIT.get(str(unit.get("name") or "").strip().lower(), 0),
                     "amount": _number(food["amount"], f"{path}.loggedFood.amount")},
        "macros": _macros(_object(entry.get("nutritionalValues"), f"{path}.nutritionalValues"),
                          f"{path}.nutritionalValues"),
        "micros": {},
    }


def _nutrition_metadata(day: date, clock: Clock) -> dict[str, Any]:
    start, end = clock.day(day)
    return {"start_time": start, "end_time": end, "timestamp_localization": LOCAL}


@PROVIDER.kind("foods", "nutrition")
def foods(doc: dict[str, Any]) -> Fragment:
    """The day's food log: one meal per logged food (macros in g, sodium mg, kcal) and the day's totals and water."""
    clock, units = _clock(doc), _units(doc)
    entries = _list(doc, "foods")
    day = _request_date(doc, "foods", [_date(e["logDate"], f"foods[{i}].logDate")
                                       for i, e in enumerate(entries) if e.get("logDate") is not None])
    midnight = clock.day(day)[0]
    summary = _object(doc.get("summary"), "summary")
    meals = [_meal(entry, day, midnight, f"foods[{index}]") for index, entry in enumerate(entries)]
    if not meals and not summary:
        raise MappingError("foods response has neither food entries nor a summary")
    record = compact({
        "metadata": _nutrition_metadata(day, clock),
        "summary": {"macros": _macros(summary, "summary"),
                    "water_ml": _scaled(summary.get("water"), units.ml_per_water, "summary.water", 1)},
    })
    if meals:
        record["meals"] = meals  # after compact: a meal's (empty) micros is a required field
    return Fragment("nutrition", record)


@PROVIDER.kind("water", "nutrition")
def water(doc: dict[str, Any]) -> Fragment:
    """The day's water log (``_date`` required) → Nutrition ``summary.water_ml`` (fl oz converted for en_US)."""
    clock, units = _clock(doc), _units(doc)
    day = _request_date(doc, "water")
    entries = _list(doc, "water")
    total = _object(doc.get("summary"), "summary").get("water")
    if total is None:
        if not entries:
            raise MappingError("water response has neither summary.water nor water entries")
        total = sum(_number(entry.get("amount"), f"water[{i}].amount") or 0 for i, entry in enumerate(entries))
    return Fragment("nutrition", {"metadata": _nutrition_metadata(day, clock),
                                  "summary": {"water_ml": _scaled(total, units.ml_per_water, "summary.water", 1)}})

