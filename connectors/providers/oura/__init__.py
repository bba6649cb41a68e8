"""Oura API v2 usercollection documents (``{"data": [...], "next_token": ...}`` pages or single documents).

Oura documents carry no user id: it comes with the raw event. Times are ISO-8601 with the user's
local offset and are kept in that offset. Every document has ``id`` and ``meta {updated_at, version}``;
``meta.updated_at`` becomes the fragment version.

Time zones are always real. sleep, workout and daily_activity carry the user's offset (``daily_activity.timestamp``
is 4 a.m. local). daily_sleep and daily_readiness only carry ``timestamp`` ``<day>T00:00:00+00:00`` (a date written as
UTC midnight, not the user's offset; a non-zero offset there would be the user's and is used), daily_spo2 no
timestamp, heartrate rows UTC only. For those the user's offset
on that day comes from the user's own documents: the poll hook (``client.py``) attaches ``_offset`` (``"-05:00"``),
learned from the sleep, daily_activity and workout documents of the same day. With it the day window, the samples
and the day key are local (timestamp_localization 1) and heart-rate rows land in their local day; without it the
window is the ``day`` in UTC, labelled UTC (timestamp_localization 0), never a UTC window marked local.

Zero means absent: heart rates (average, lowest), HRV, breathing rate, SpO2 averages and Oura's scores and sleep
efficiency (1–100) of 0 are not measurements and are left out; a workout ``distance`` of 0 is an activity Oura
measures no distance for. Durations, steps, calories and counts of 0 are real and kept. A sleep's null
``total_sleep_duration`` (as in Oura's docs example) is deep + light + REM when all three are sent, else absent.

Deletions: a webhook ``{"event_type": "delete", "data_type", "object_id", "user_id", "event_time"}`` (raw kind
``deleted``) and a sleep with ``type`` ``deleted`` (or ``rest``: Oura rejected the period as sleep) become
``Deletion``s of the Sleep / Activity keyed by the document id. A deleted daily_* document is no tombstone: its Daily
is keyed by day (the notification names only the document id) and is merged from several collections, so the deletion
of one part is not a tombstone of the day. The manifest therefore publishes only sleep and workout deletions as raw
kind ``deleted``; the others are counted as ignored by the notification fetcher (``webhooks.ignored``), and this
mapper refuses them if they come anyway.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from connectors.base import Deletion, Fragment, MappingError, Provider, timestamp_field
from connectors.providers.oura.activity_types import terra_activity_type
from connectors.timeutil import day_bounds, format_ts, parse_offset, series_ts, to_ms

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


def _known_offset(doc: dict[str, Any]) -> timezone | None:
    """The user's offset the poll hook attached (``_offset``), else None."""
    text = doc.get("_offset")
    if text is None:
        return None
    try:
        return parse_offset(str(text))
    except ValueError as exc:
        raise MappingError(f"_offset: {exc}") from exc


def _daily_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """Day window of a daily_sleep/daily_readiness/daily_spo2 document: local in the user's known offset
    (``_offset``), else the ``day`` in UTC labelled UTC (see the module docstring). Their ``timestamp`` is Oura's
    ``T00:00:00+00:00``: a +00:00 there says nothing about the user, so only a non-zero offset in it is used."""
    zone = _known_offset(doc)
    if doc.get("timestamp") is not None:
        written = _zone_of(_timestamp(doc, "timestamp"))
        if zone is None and written.utcoffset(None):
            zone = written
    return _day_metadata(_day(doc), zone, LOCAL_TIME) if zone is not None else _day_metadata(_day(doc), UTC, UTC_TIME)


def _measured(value: Any) -> Any:
    """A rate, average or 1–100 score: 0 means Oura measured nothing (see the module docstring)."""
    return None if value == 0 else value


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
def sleep(doc: dict[str, Any]) -> Fragment | Deletion:
    """A sleep period (main sleep or nap): stage totals, 5-minute hypnogram, HR/HRV samples, readiness; a sleep of
    type ``deleted`` (or ``rest``) is the Deletion of that Sleep. Time asleep is ``total_sleep_duration``, or deep +
    light + REM when it is null and all three stages are sent."""
    _require(doc, "id", "type")
    sleep_type = doc["type"]
    if sleep_type in REJECTED_SLEEP_TYPES:  # not (or no longer) a sleep: a stored copy is deleted
        return Deletion("sleep", str(doc["id"]), version_ms=_version_ms(doc))
    if sleep_type not in IS_NAP_BY_SLEEP_TYPE:
        raise MappingError(f"unknown Oura sleep type {sleep_type!r}; expected one of {', '.join(IS_NAP_BY_SLEEP_TYPE)}")
    start, end = _timestamp(doc, "bedtime_start"), _timestamp(doc, "bedtime_end")
    if end <= start:
        raise MappingError(f"bedtime_end {doc['bedtime_end']} is not after bedtime_start {doc['bedtime_start']}")
    hypnogram = _five_minute_series(doc.get("sleep_phase_5_min"), "sleep_phase_5_min", start, SLEEP_LEVEL_BY_PHASE)
    readiness = doc.get("readiness") or {}
    breaths = _measured(doc.get("average_breath"))
    stages = [doc.get(f"{stage}_sleep_duration") for stage in ("deep", "light", "rem")]
    asleep = doc.get("total_sleep_duration")
    if asleep is None and None not in stages:  # Oura's docs example sends null: asleep is the sum of the stages
        asleep = sum(stages)
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
                "duration_asleep_state_seconds": asleep,
                "duration_deep_sleep_state_seconds": doc.get("deep_sleep_duration"),
                "duration_light_sleep_state_seconds": doc.get("light_sleep_duration"),
                "duration_REM_sleep_state_seconds": doc.get("rem_sleep_duration"),
            },
            "awake": {
                "duration_awake_state_seconds": doc.get("awake_time"),
                "sleep_latency_seconds": doc.get("latency"),
            },
            "other": {"duration_in_bed_seconds": doc.get("time_in_bed")},
            "sleep_efficiency": _measured(doc.get("efficiency")),  # Oura 1-100 = Terra's percentage scale (0-100)
            "hypnogram_samples": [{"timestamp": at, "level": level} for at, level in hypnogram],
        },
        "heart_rate_data": {
            "summary": {
                "avg_hr_bpm": _measured(doc.get("average_heart_rate")),
                "min_hr_bpm": _measured(doc.get("lowest_heart_rate")),
                "avg_hrv_rmssd": _measured(doc.get("average_hrv")),
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
        "readiness_data": {"readiness": _int(_measured(readiness.get("score")))},
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
        "scores": {"activity": _measured(doc.get("score"))},
    }
    return Fragment("daily", record, version_ms=_version_ms(doc))


@PROVIDER.kind("daily_sleep", "daily")
def daily_sleep(doc: dict[str, Any]) -> Fragment:
    """The day's sleep score → Daily ``scores.sleep``.

    Oura scores the day (all its sleep periods), not one sleep document, and daily_sleep names no
    sleep id: the score belongs to the day's Daily, merged with daily_activity by date.
    """
    _require(doc, "id", "day")
    record = {"metadata": _daily_metadata(doc), "scores": {"sleep": _measured(doc.get("score"))}}
    return Fragment("daily", record, version_ms=_version_ms(doc))


@PROVIDER.kind("daily_readiness", "daily")
def daily_readiness(doc: dict[str, Any]) -> Fragment:
    """The day's readiness score → Daily ``scores.recovery``."""
    _require(doc, "id", "day")
    record = {"metadata": _daily_metadata(doc), "scores": {"recovery": _measured(doc.get("score"))}}
    return Fragment("daily", record, version_ms=_version_ms(doc))


@PROVIDER.kind("daily_spo2", "daily")
def daily_spo2(doc: dict[str, Any]) -> Fragment:
    """The night's average SpO2 (%) → Daily ``oxygen_data``; the day window as _daily_metadata says."""
    _require(doc, "id", "day")
    average = _measured((doc.get("spo2_percentage") or {}).get("average"))
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
        "distance_data": {"summary": {"distance_meters": _int(_measured(doc.get("distance")))}},
    }
    return Fragment("activity", record, version_ms=_version_ms(doc))


@PROVIDER.kind("heartrate", "daily")
def heartrate(doc: dict[str, Any]) -> Fragment:
    """One heart-rate row ``{bpm, source, timestamp, timestamp_unix}`` → a sample in its day's Daily.

    Rows are UTC. With the user's offset attached (``_offset``, see the module docstring) the sample, its day window
    and day key are local (a row at 01:45Z is 20:45 the day before at -05:00, in that day's Daily); without it all
    three are UTC (timestamp_localization 0).
    """
    _require(doc, "bpm")
    if doc.get("timestamp") is not None:
        at = _timestamp(doc, "timestamp").astimezone(UTC)
    elif doc.get("timestamp_unix") is not None:
        at = datetime.fromtimestamp(doc["timestamp_unix"] / 1000, tz=UTC)  # ms
    else:
        raise MappingError("heartrate row has neither timestamp nor timestamp_unix")
    zone = _known_offset(doc)
    local = at.astimezone(zone) if zone is not None else at
    sample = {"timestamp": format_ts(local), "bpm": doc["bpm"],
              "context": HR_CONTEXT_BY_SOURCE.get(doc.get("source"), 0)}
    record = {
        "metadata": _day_metadata(local.date(), zone or UTC, LOCAL_TIME if zone is not None else UTC_TIME),
        "heart_rate_data": {"detailed": {"hr_samples": [sample]}},
    }
    return Fragment("daily", record)


DELETED_MODEL_BY_DATA_TYPE = {"sleep": "sleep", "workout": "activity"}
DAY_KEYED_DATA_TYPES = ("daily_activity", "daily_sleep", "daily_readiness", "daily_spo2")


@PROVIDER.kind("deleted", "sleep", "activity")
def deleted(doc: dict[str, Any]) -> Deletion:
    """A delete webhook ``{event_type: delete, data_type, object_id, user_id, event_time}`` → the Deletion of the
    Sleep or Activity keyed by ``object_id`` (versioned by ``event_time``); day-keyed data types are refused (see the
    module docstring)."""
    _require(doc, "event_type", "data_type", "object_id")
    if doc["event_type"] != "delete":
        raise MappingError(f"Oura webhook event_type {doc['event_type']!r} is not a deletion")
    data_type = str(doc["data_type"])
    if data_type in DAY_KEYED_DATA_TYPES:
        raise MappingError(f"deleted Oura {data_type} {doc['object_id']}: its Daily is keyed by day, which the "
                           "notification does not name, and merges several collections, so one part's deletion is no "
                           "tombstone of the day; the next poll of that day carries what remains")
    model = DELETED_MODEL_BY_DATA_TYPE.get(data_type)
    if model is None:
        raise MappingError(f"deleted Oura {data_type} is not mapped; mapped deletions: "
                           f"{', '.join(DELETED_MODEL_BY_DATA_TYPE)}")
    version = to_ms(_timestamp(doc, "event_time")) if doc.get("event_time") is not None else None
    return Deletion(model, str(doc["object_id"]), version_ms=version)
