"""Oura API v2 usercollection documents (``{"data": [...], "next_token": ...}`` pages or single documents).

Oura documents carry no user id: it comes with the raw event. Times are ISO-8601 with the user's
local offset and are kept in that offset; heartrate rows are UTC only. Every document has ``id``
and ``meta {updated_at, version}``; ``meta.updated_at`` becomes the fragment version.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from connectors.base import Fragment, MappingError, Provider, timestamp_field
from connectors.providers.oura.activity_types import terra_activity_type
from connectors.timeutil import day_bounds, format_ts, series_ts, to_ms

PROVIDER = Provider(
    "oura",
    "OURA",
    envelope="data",
    user_field=None,
    doc="Oura API v2 usercollection documents (user id comes with the raw event)",
    compacts=True,  # mappers return records as built; the framework drops None and empty parts
)

UTC_TIME, LOCAL_TIME = 0, 1  # Terra TimestampLocalization
UPLOAD_AUTOMATIC, UPLOAD_MANUAL = 1, 2  # Terra UploadType
SLEEP_UPLOAD_AUTOMATIC = 2  # Terra SleepUploadType (MANUAL/AUTOMATIC are swapped relative to UploadType)
FIVE_MINUTES = 300  # seconds per character of sleep_phase_5_min and class_5_min
SLEEP_LEVEL_BY_PHASE = {"1": 5, "2": 4, "3": 6, "4": 1}  # Oura deep/light/REM/awake → Terra SleepLevel
# Oura class_5_min (0 non-wear, 1 rest, 2 inactive, 3 low, 4 medium, 5 high) → Terra ActivityLevel
# (0 UNKNOWN, 1 REST, 2 INACTIVE, 3 LOW, 4 MEDIUM, 5 HIGH): the codes coincide, the table keeps it explicit.
ACTIVITY_LEVEL_BY_CLASS = {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
IS_NAP_BY_SLEEP_TYPE = {"long_sleep": False, "sleep": True, "late_nap": True}
REJECTED_SLEEP_TYPES = {
    "deleted": "the user deleted this sleep period",
    "rest": "Oura rejected this period as rest, not sleep",
}
HR_CONTEXT_BY_SOURCE = {"workout": 1, "rest": 2, "sleep": 2}  # Terra HeartRateContext; other sources NOT_SET (0)


def _require(doc: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if doc.get(n) is None]
    if missing:
        raise MappingError(f"missing required field(s): {', '.join(missing)}")


_timestamp = timestamp_field  # Oura's LocalizedDateTime, or UTC


def _zone_of(moment: datetime) -> timezone:
    """The fixed UTC offset a parsed timestamp was written in."""
    return timezone(moment.utcoffset() or timedelta(0))


def _day(doc: dict[str, Any]) -> date:
    try:
        return date.fromisoformat(str(doc["day"]))
    except (KeyError, ValueError) as exc:
        raise MappingError(f"day must be a YYYY-MM-DD date, got {doc.get('day')!r}") from exc


def _version_ms(doc: dict[str, Any]) -> int | None:
    """``meta.updated_at`` in epoch ms (newest wins when fragments merge)."""
    meta = doc.get("meta") or {}
    return to_ms(_timestamp(meta, "updated_at", "meta.updated_at")) if meta.get("updated_at") is not None else None


def _int(value: Any) -> int | None:
    """Terra's long fields (calories, distance, readiness) reject fractions: round to the nearest integer."""
    return None if value is None else round(value)


def _day_metadata(day: date, zone: timezone, localization: int) -> dict[str, Any]:
    start, end = day_bounds(day, zone)
    return {"start_time": start, "end_time": end, "upload_type": UPLOAD_AUTOMATIC,
            "timestamp_localization": localization}


def _daily_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """Day window of a daily_* document in the offset of its ``timestamp``.

    daily_spo2 has no timestamp at all: its window is the ``day`` in UTC (localization 0); the
    key (the date) is unaffected.
    """
    if doc.get("timestamp") is None:
        return _day_metadata(_day(doc), UTC, UTC_TIME)
    return _day_metadata(_day(doc), _zone_of(_timestamp(doc, "timestamp")), LOCAL_TIME)


def _samples(doc: dict[str, Any], name: str) -> list[tuple[str, float]]:
    """``(timestamp, value)`` of a PublicSample ``{interval, items, timestamp}``; null items are gaps and skipped."""
    sample = doc.get(name)
    if sample is None:
        return []
    if not isinstance(sample, dict) or not isinstance(sample.get("items"), list):
        raise MappingError(f"{name} must be a PublicSample object {{interval, items, timestamp}}")
    interval = sample.get("interval")
    if not isinstance(interval, int | float) or interval <= 0:
        raise MappingError(f"{name}.interval must be a positive number of seconds, got {interval!r}")
    start = _timestamp(sample, "timestamp", f"{name}.timestamp")
    present = [(index, value) for index, value in enumerate(sample["items"]) if value is not None]
    times = series_ts(start, interval, [index for index, _ in present])
    return [(at, value) for at, (_, value) in zip(times, present, strict=True)]


def _five_minute_series(codes: Any, name: str, start: datetime, table: dict[str, int]) -> list[tuple[str, int]]:
    """``(timestamp, level)`` for each character of a 5-minute code string, starting at ``start``."""
    if codes is None:
        return []
    if not isinstance(codes, str):
        raise MappingError(f"{name} must be a string of codes, got {type(codes).__name__}")
    levels = []
    for index, code in enumerate(codes):
        if code not in table:
            series_ts(start, FIVE_MINUTES, range(index))  # a time before it that overflows fails first, as always
            raise MappingError(f"{name} has unknown code {code!r} at position {index}; "
                               f"expected one of {''.join(table)}")
        levels.append(table[code])
    return list(zip(series_ts(start, FIVE_MINUTES, range(len(levels))), levels, strict=True))


@PROVIDER.kind("sleep", "sleep")
def sleep(doc: dict[str, Any]) -> Fragment:
    """A sleep period (main sleep or nap): stage totals, 5-minute hypnogram, HR/HRV samples, readiness."""
    _require(doc, "id", "type")
    sleep_type = doc["type"]
    if sleep_type in REJECTED_SLEEP_TYPES:
        raise MappingError(f"Oura sleep {doc['id']} has type {sleep_type!r} ({REJECTED_SLEEP_TYPES[sleep_type]}): "
                           "not a sleep record; a stored copy should be deleted, not updated")
    if sleep_type not in IS_NAP_BY_SLEEP_TYPE:
        raise MappingError(f"unknown Oura sleep type {sleep_type!r}; expected one of {', '.join(IS_NAP_BY_SLEEP_TYPE)}")
    start, end = _timestamp(doc, "bedtime_start"), _timestamp(doc, "bedtime_end")
    if end <= start:
        raise MappingError(f"bedtime_end {doc['bedtime_end']} is not after bedtime_start {doc['bedtime_start']}")
    hypnogram = _five_minute_series(doc.get("sleep_phase_5_min"), "sleep_phase_5_min", start, SLEEP_LEVEL_BY_PHASE)
    readiness = doc.get("readiness") or {}
    breaths = doc.get("average_breath")
    record = {
        "metadata": {
            "summary_id": str(doc["id"]),
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "upload_type": SLEEP_UPLOAD_AUTOMATIC,
            "is_nap": IS_NAP_BY_SLEEP_TYPE[sleep_type],
            "timestamp_localization": LOCAL_TIME,
        },
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": doc.get("total_sleep_duration"),
                "duration_deep_sleep_state_seconds": doc.get("deep_sleep_duration"),
                "duration_light_sleep_state_seconds": doc.get("light_sleep_duration"),
                "duration_REM_sleep_state_seconds": doc.get("rem_sleep_duration"),
            },
            "awake": {
                "duration_awake_state_seconds": doc.get("awake_time"),
                "sleep_latency_seconds": doc.get("latency"),
            },
            "other": {"duration_in_bed_seconds": doc.get("time_in_bed")},
            "sleep_efficiency": doc.get("efficiency"),  # Oura 1-100 = Terra's percentage scale (0-100)
            "hypnogram_samples": [{"timestamp": at, "level": level} for at, level in hypnogram],
        },
        "heart_rate_data": {
            "summary": {
                "avg_hr_bpm": doc.get("average_heart_rate"),
                "min_hr_bpm": doc.get("lowest_heart_rate"),
                "avg_hrv_rmssd": doc.get("average_hrv"),
            },
            "detailed": {
                "hr_samples": [{"timestamp": at, "bpm": v} for at, v in _samples(doc, "heart_rate")],
                "hrv_samples_rmssd": [{"timestamp": at, "hrv_rmssd": v} for at, v in _samples(doc, "hrv")],
            },
        },
        "respiration_data": {"breaths_data": {
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "avg_breaths_per_min": breaths,
        }} if breaths is not None else None,
        "readiness_data": {"readiness": _int(readiness.get("score"))},
        "temperature_data": {"delta": readiness.get("temperature_deviation")},
    }
    return Fragment("sleep", record, version_ms=_version_ms(doc))


@PROVIDER.kind("daily_activity", "daily")
def daily_activity(doc: dict[str, Any]) -> Fragment:
    """Oura's activity day (24 h from 4 a.m. local): steps, calories, intensity times, MET and class samples.

    The Daily window is local midnight to midnight of ``day`` (Terra's day key); the samples keep
    Oura's 4 a.m. anchor, so the last four hours of samples fall after the window's end.
    """
    _require(doc, "id", "day", "timestamp")
    activity_day_start = _timestamp(doc, "timestamp")
    levels = _five_minute_series(doc.get("class_5_min"), "class_5_min", activity_day_start, ACTIVITY_LEVEL_BY_CLASS)
    total, active = doc.get("total_calories"), doc.get("active_calories")
    high, medium, low = doc.get("high_activity_time"), doc.get("medium_activity_time"), doc.get("low_activity_time")
    sedentary = doc.get("sedentary_time")

    def minutes(seconds: int | None) -> float | None:
        return None if seconds is None else seconds / 60

    record = {
        "metadata": _day_metadata(_day(doc), _zone_of(activity_day_start), LOCAL_TIME),
        "distance_data": {
            "steps": _int(doc.get("steps")),
            "distance_meters": _int(doc.get("equivalent_walking_distance")),
        },
        "calories_data": {
            "total_burned_calories": _int(total),
            "net_activity_calories": _int(active),
            # Oura's total_calories = active calories + basal metabolism.
            "BMR_calories": _int(total - active) if total is not None and active is not None else None,
        },
        "active_durations_data": {
            "activity_seconds": high + medium + low if None not in (high, medium, low) else None,
            "vigorous_intensity_seconds": high,
            "moderate_intensity_seconds": medium,
            "low_intensity_seconds": low,
            "inactivity_seconds": sedentary,
            "rest_seconds": doc.get("resting_time"),
            "num_continuous_inactive_periods": doc.get("inactivity_alerts"),
            "activity_levels_samples": [{"timestamp": at, "level": level} for at, level in levels],
        },
        "MET_data": {
            "avg_level": doc.get("average_met_minutes"),  # despite the name, Oura's average MET level
            "num_high_intensity_minutes": minutes(high),
            "num_moderate_intensity_minutes": minutes(medium),
            "num_low_intensity_minutes": minutes(low),
            "num_inactive_minutes": minutes(sedentary),
            "MET_samples": [{"timestamp": at, "level": v} for at, v in _samples(doc, "met")],
        },
        "scores": {"activity": doc.get("score")},
    }
    return Fragment("daily", record, version_ms=_version_ms(doc))


@PROVIDER.kind("daily_sleep", "daily")
def daily_sleep(doc: dict[str, Any]) -> Fragment:
    """The day's sleep score → Daily ``scores.sleep``.

    Oura scores the day (all its sleep periods), not one sleep document, and daily_sleep names no
    sleep id: the score belongs to the day's Daily, merged with daily_activity by date.
    """
    _require(doc, "id", "day")
    record = {"metadata": _daily_metadata(doc), "scores": {"sleep": doc.get("score")}}
    return Fragment("daily", record, version_ms=_version_ms(doc))


@PROVIDER.kind("daily_readiness", "daily")
def daily_readiness(doc: dict[str, Any]) -> Fragment:
    """The day's readiness score → Daily ``scores.recovery``."""
    _require(doc, "id", "day")
    record = {"metadata": _daily_metadata(doc), "scores": {"recovery": doc.get("score")}}
    return Fragment("daily", record, version_ms=_version_ms(doc))


@PROVIDER.kind("daily_spo2", "daily")
def daily_spo2(doc: dict[str, Any]) -> Fragment:
    """The night's average SpO2 (%) → Daily ``oxygen_data``; the document has no timestamp, see _daily_metadata."""
    _require(doc, "id", "day")
    average = (doc.get("spo2_percentage") or {}).get("average")
    record = {"metadata": _daily_metadata(doc), "oxygen_data": {"avg_saturation_percentage": average}}
    return Fragment("daily", record, version_ms=_version_ms(doc))


@PROVIDER.kind("workout", "activity")
def workout(doc: dict[str, Any]) -> Fragment:
    """A workout (autodetected, confirmed or manual): type, times, calories (kcal) and distance (m)."""
    _require(doc, "id", "activity")
    start, end = _timestamp(doc, "start_datetime"), _timestamp(doc, "end_datetime")
    if end < start:
        raise MappingError(f"end_datetime {doc['end_datetime']} is before start_datetime {doc['start_datetime']}")
    record = {
        "metadata": {
            "summary_id": str(doc["id"]),
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "type": terra_activity_type(doc["activity"]),
            "upload_type": UPLOAD_MANUAL if doc.get("source") == "manual" else UPLOAD_AUTOMATIC,
            "name": doc.get("label") or doc["activity"],
            "timestamp_localization": LOCAL_TIME,
        },
        "calories_data": {"total_burned_calories": _int(doc.get("calories"))},
        "distance_data": {"summary": {"distance_meters": _int(doc.get("distance"))}},
    }
    return Fragment("activity", record, version_ms=_version_ms(doc))


@PROVIDER.kind("heartrate", "daily")
def heartrate(doc: dict[str, Any]) -> Fragment:
    """One heart-rate row ``{bpm, source, timestamp, timestamp_unix}`` → a sample in its day's Daily.

    Oura heartrate rows carry a UTC timestamp and no local offset, so the sample, the day window and
    the day key are all UTC (timestamp_localization 0): for a user far from UTC, a sample near local
    midnight lands in the neighbouring local day's Daily.
    """
    _require(doc, "bpm")
    if doc.get("timestamp") is not None:
        at = _timestamp(doc, "timestamp").astimezone(UTC)
    elif doc.get("timestamp_unix") is not None:
        at = datetime.fromtimestamp(doc["timestamp_unix"] / 1000, tz=UTC)  # ms
    else:
        raise MappingError("heartrate row has neither timestamp nor timestamp_unix")
    sample = {"timestamp": format_ts(at), "bpm": doc["bpm"], "context": HR_CONTEXT_BY_SOURCE.get(doc.get("source"), 0)}
    record = {
        "metadata": _day_metadata(at.date(), UTC, UTC_TIME),
        "heart_rate_data": {"detailed": {"hr_samples": [sample]}},
    }
    return Fragment("daily", record)
