"""Google Health API v4 data points (``{"dataPoints": [...], "nextPageToken": ...}`` list pages).

Sources (read 2026-06): the v4 discovery document (schemas ``DataPoint``, ``Exercise``, ``Sleep``, ``Steps``,
``HeartRate``, ``Weight``, ``BodyFat``, ``Height``, ``Daily*``, ``ObservationTimeInterval``,
``ObservationSampleTime``, ``SessionTimeInterval``), https://developers.google.com/health/reference/rest/v4/
users.dataTypes.dataPoints/list (filters, page sizes, ``nextPageToken``), https://developers.google.com/health/
endpoints, /data-types, /rate-limits, /webhooks and https://docs.tryterra.co/unified-api/supported-integrations
(Terra's enum for this source is ``GOOGLE_HEALTH``).

Guarantees: every time is the physical instant of the API (RFC 3339, ``...Z``) shown in the user's UTC offset
that the API sends with it (``startUtcOffset``, ``endUtcOffset``, ``utcOffset`` as protobuf durations, e.g.
``"-25200s"``), so Terra timestamps carry the local offset; day-scoped records span the local midnight-to-midnight
of the point's local date (timestamp_localization 1). The ``daily-*`` types carry only a ``Date`` "in the user's
timezone" and no offset: their day window is that date in UTC (localization 0; a stored local window is kept by
the merge). Units: distances and elevation in millimetres → metres, weight in grams → kg, height mm → cm,
energy kcal, durations ``"<seconds>s"``, ``int64`` values as JSON strings (numbers accepted too).
Documents carry no user id (``name`` only exists for identifiable types): it comes with the raw event.

Mapped: ``exercise`` → Activity; ``sleep`` → Sleep (stages → hypnogram, stage totals, latencies);
``steps`` and ``heart-rate`` → samples of the local day's Daily (the list API returns raw points, so no day
summary totals: those only exist through ``dailyRollUp``, a POST with a JSON body the poller cannot send; the
step samples are delivered as Terra's running totals of the day, each at its interval's end);
``daily-resting-heart-rate``, ``daily-heart-rate-variability`` (RMSSD), ``daily-oxygen-saturation`` → Daily;
``weight``, ``body-fat``, ``height`` → Body measurements.

Zero means absent, by Google's own rule (https://developers.google.com/health/data-presence-and-true-zeros): only
Altitude, Distance, Floors, Steps and Total Calories have *true zeros* (worn, nothing recorded), so a ``steps``
count of 0 is kept. Elsewhere 0 is no measurement: exercise ``averageHeartRateBeatsPerMinute`` and ``runVo2Max``
0 are left out, heart-rate zone durations all ``"0s"`` give no zones; a data point whose only value is 0
(``heart-rate``, ``daily-resting-heart-rate``, ``daily-heart-rate-variability``, ``daily-oxygen-saturation``,
``weight``, ``body-fat``, ``height``) is refused ("… 0 is not a measurement": the point holds nothing).
Plausibility: values are mapped as the API sends them; the pipeline's one plausibility stage
(``transforms.plausibility``) drops what no body can produce — a heart rate outside 1-250 bpm (that sample, or the
exercise's average), SpO2 over 100 %, body fat over 100 %, a weight outside 0.1-700 kg or height outside 20-300 cm
(that measurement), VO2 max outside 1-100, a negative RMSSD — and delivers the rest. Refused are only points that
cannot be read: a value that is not a finite number, a missing required field or offset, an unknown stage, an
interval that ends before it starts.
Calories: ``exercise.metricsSummary.caloriesKcal`` summarizes *active-energy-burned* (basal excluded,
/data-types/workouts and /data-types/calories), so it is the Activity's ``net_activity_calories``.
Time zones: points carry their UTC offset (localization 1, real offsets). A day-scoped record of a sample takes
the day window in the sample's own offset: on a DST day two samples of the same local date name windows with
different offsets (the natural key, the local date, is the same; the merge keeps the newer window).

Assumed or undocumented: sleep stage ``RESTLESS`` counts as awake (Terra has no restless level; as for Fitbit
classic sleep); exercise types without a Terra equivalent (``WORKOUT``, ``OTHER``, unspecified) map to OTHER;
heart-rate zones LIGHT/MODERATE/VIGOROUS/PEAK → Terra zones 1-4; ``recordingMethod`` MANUAL → manual upload,
everything else automatic. The docs give no maximum filter range for ``list``: the windows in the manifest are
our choice. Not mapped: total/active/basal calories (``total-calories`` exists only as a rollup), distance,
floors, altitude, active/azm minutes, respiratory rate, temperature, VO2 max series, nutrition and hydration
logs, ECG/IRN, profile (only ``age``).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from connectors.base import Fragment, IntervalSamples, MappingError, Provider, compact
from connectors.timeutil import day_bounds, format_ts, to_ms

PROVIDER = Provider(
    "google_health",
    "GOOGLE_HEALTH",
    envelope="dataPoints",
    user_field=None,
    doc="Google Health API v4 dataPoints (user id comes with the raw event)",
    # one step count per interval of varying length, each sample at its interval's end: delivered as running totals
    interval_samples={"daily": IntervalSamples(0, amounts=("distance_data.detailed.step_samples",))},
)

UTC_TIME, LOCAL_TIME = 0, 1  # Terra TimestampLocalization
UPLOAD_AUTOMATIC, UPLOAD_MANUAL = 1, 2  # Terra UploadType
SLEEP_UPLOAD_MANUAL, SLEEP_UPLOAD_AUTOMATIC = 1, 2  # Terra SleepUploadType
SLEEP_LEVEL = {"SLEEP_STAGE_TYPE_UNSPECIFIED": 0, "AWAKE": 1, "ASLEEP": 2, "LIGHT": 4, "DEEP": 5, "REM": 6,
               "RESTLESS": 1}  # Google SleepStage.type → Terra SleepLevel
OTHER_ACTIVITY = 108
ACTIVITY_TYPE = {"RUNNING": 8, "WALKING": 7, "BIKING": 1, "SWIMMING": 82, "HIKING": 35, "YOGA": 100,
                 "PILATES": 49, "HIIT": 114, "WEIGHTLIFTING": 97, "STRENGTH_TRAINING": 80,  # v4 ExerciseType
                 # v4beta adds sport types ("may receive new values"): the unambiguous ones → Terra ActivityType
                 "AEROBIC_WORKOUT": 9, "ARCHERY": 119, "BACKPACKING": 35, "BADMINTON": 10, "BALLET": 24,
                 "BALLROOM_DANCE": 24, "BASEBALL": 11, "BASKETBALL": 12, "BOXING": 20, "BREAKDANCING": 24,
                 "CALISTHENICS": 21, "CANOEING": 140, "CARDIO_WORKOUT": 123, "CIRCUIT_TRAINING": 22, "CRICKET": 23,
                 "CROSS_COUNTRY_SKI": 67, "CROSSFIT": 113, "CURLING": 106, "DANCING": 24, "DIVING": 102}
HR_ZONES = (("lightTime", 1, "LIGHT"), ("moderateTime", 2, "MODERATE"), ("vigorousTime", 3, "VIGOROUS"),
            ("peakTime", 4, "PEAK"))
HR_CONTEXT = {"ACTIVE": 1, "SEDENTARY": 2}  # HeartRateMetadata.motionContext → Terra HeartRateContext
AUTOMATIC_METHODS = {"PASSIVELY_MEASURED", "ACTIVELY_MEASURED", "DERIVED"}
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)s$")
_FRACTION = re.compile(r"(\.\d{6})\d+")


# ----------------------------------------------------------------------------------------------------------------------
# field readers: each raises MappingError naming the field
# ----------------------------------------------------------------------------------------------------------------------
def _object(value: Any, path: str, required: bool = True) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise MappingError(f"{path} must be an object, got {value!r}")
    return value


def _data(doc: dict[str, Any], field: str) -> dict[str, Any]:
    """The union member of a DataPoint (``doc[field]``): a page of another data type is refused."""
    if not isinstance(doc.get(field), dict):
        present = sorted(k for k, v in doc.items() if isinstance(v, dict) and k != "dataSource")
        raise MappingError(f"data point has no {field!r} object (has {present}): not a {field} data point")
    return doc[field]


def _number(value: Any, path: str) -> float | int | None:
    """A JSON number, or an int64/double written as a string (proto3 JSON); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MappingError(f"{path} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value) if re.fullmatch(r"-?\d+", value.strip()) else float(value)
        except ValueError as exc:
            raise MappingError(f"{path} must be a number, got {value!r}") from exc
    if not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):  # proto3 NaN
        raise MappingError(f"{path} must be a finite number, got {value!r}")
    return value


def _required_number(value: Any, path: str) -> float | int:
    number = _number(value, path)
    if number is None:
        raise MappingError(f"{path} is required")
    return number


def _measured(value: Any, path: str, required: bool = False) -> float | int | None:
    """A value of a type without true zeros (see the module docstring): 0 = not measured → ``None`` (refused when
    ``required``: the point holds nothing else). An impossible value is the plausibility stage's to drop."""
    number = _number(value, path)
    if number is None and required:
        raise MappingError(f"{path} is required")
    if number == 0:
        if required:
            raise MappingError(f"{path} 0 is not a measurement")
        return None
    return number


def _scaled(value: Any, factor: float, path: str, digits: int = 3) -> float | None:
    number = _number(value, path)
    return None if number is None else round(number * factor, digits)


def _seconds(duration: Any, path: str) -> float | None:
    """A protobuf Duration in JSON (``"3600s"``, ``"-25200s"``, ``"1.5s"``) in seconds."""
    if duration is None:
        return None
    match = _DURATION.match(duration) if isinstance(duration, str) else None
    if match is None or not math.isfinite(float(match.group(1))):
        raise MappingError(f"{path} must be a duration like '3600s', got {duration!r}")
    seconds = float(match.group(1))
    return int(seconds) if seconds.is_integer() else seconds


def _minutes(value: Any, path: str) -> int | float | None:
    number = _number(value, path)
    return None if number is None else number * 60


def _instant(obj: dict[str, Any], name: str, path: str) -> datetime:
    text = obj.get(name)
    if not isinstance(text, str):
        raise MappingError(f"{path}.{name} must be an RFC 3339 timestamp, got {text!r}")
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", text).replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise MappingError(f"{path}.{name}: {exc}") from exc
    if moment.tzinfo is None:
        raise MappingError(f"{path}.{name} {text!r} has no UTC offset")
    return moment


def _offset(obj: dict[str, Any], name: str, path: str) -> timezone:
    seconds = _seconds(obj.get(name), f"{path}.{name}")
    if seconds is None:
        raise MappingError(f"{path}.{name} (the user's UTC offset) is required")
    if abs(seconds) > 18 * 3600:
        raise MappingError(f"{path}.{name} {obj[name]!r} is not a UTC offset (beyond ±18 h)")
    return timezone(timedelta(seconds=seconds))


def _local(obj: dict[str, Any], time_name: str, offset_name: str, path: str) -> datetime:
    """``obj[time_name]`` shown in the offset ``obj[offset_name]``."""
    return _instant(obj, time_name, path).astimezone(_offset(obj, offset_name, path))


def _span(interval: Any, path: str) -> tuple[datetime, datetime]:
    """An Observation/SessionTimeInterval: local start and end; end before start is refused."""
    interval = _object(interval, path)
    start = _local(interval, "startTime", "startUtcOffset", path)
    end = _local(interval, "endTime", "endUtcOffset", path)
    if end < start:
        raise MappingError(f"{path}.endTime {interval['endTime']} is before startTime {interval['startTime']}")
    return start, end


def _sample_time(data: dict[str, Any], path: str) -> datetime:
    sample = _object(data.get("sampleTime"), f"{path}.sampleTime")
    return _local(sample, "physicalTime", "utcOffset", f"{path}.sampleTime")


def _date(value: Any, path: str) -> date:
    """A google.type.Date ``{year, month, day}`` (full dates only)."""
    value = _object(value, path)
    try:
        return date(int(value["year"]), int(value["month"]), int(value["day"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MappingError(f"{path} must be a full date {{year, month, day}}, got {value!r}") from exc


def _point_id(doc: dict[str, Any], kind: str) -> str:
    """The ``{data_point}`` segment of ``users/{user}/dataTypes/{kind}/dataPoints/{data_point}``."""
    name = doc.get("name")
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 6 or parts[0] != "users" or parts[2] != "dataTypes" or parts[4] != "dataPoints" or not parts[5]:
        raise MappingError(f"{kind} data point name must be users/{{user}}/dataTypes/{kind}/dataPoints/{{id}}, "
                           f"got {name!r}")
    if parts[3] != kind:
        raise MappingError(f"data point {name} is of data type {parts[3]!r}, not {kind!r}")
    return parts[5]


def _version_ms(data: dict[str, Any], path: str) -> int | None:
    return to_ms(_instant(data, "updateTime", path)) if data.get("updateTime") is not None else None


def _device(doc: dict[str, Any]) -> dict[str, Any]:
    device = _object(_object(doc.get("dataSource"), "dataSource", False).get("device"), "dataSource.device", False)
    return {"name": device.get("displayName"), "manufacturer": device.get("manufacturer")}


def _manual(doc: dict[str, Any]) -> bool | None:
    method = _object(doc.get("dataSource"), "dataSource", False).get("recordingMethod")
    return True if method == "MANUAL" else False if method in AUTOMATIC_METHODS else None


def _day_metadata(moment: datetime) -> dict[str, Any]:
    """The local day of ``moment`` (in its own offset), midnight to midnight."""
    zone = timezone(moment.utcoffset() or timedelta(0))
    start, end = day_bounds(moment.date(), zone)
    return {"start_time": start, "end_time": end, "upload_type": UPLOAD_AUTOMATIC, "timestamp_localization": LOCAL_TIME}


def _date_metadata(day: date) -> dict[str, Any]:
    start, end = day_bounds(day, UTC)
    return {"start_time": start, "end_time": end, "upload_type": UPLOAD_AUTOMATIC, "timestamp_localization": UTC_TIME}


# ----------------------------------------------------------------------------------------------------------------------
# exercise → Activity
# ----------------------------------------------------------------------------------------------------------------------
def _hr_zones(zones: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """Time in zones; every zone at 0 s = no heart rate during the exercise → no zones."""
    out = [{"zone": zone, "name": name, "duration_seconds": _seconds(zones[field], f"{path}.{field}")}
           for field, zone, name in HR_ZONES if zones.get(field) is not None]
    return out if any(zone["duration_seconds"] for zone in out) else []


def _lap(split: Any, path: str) -> dict[str, Any]:
    split = _object(split, path)
    start, end = _span(split, path)
    metrics = _object(split.get("metricsSummary"), f"{path}.metricsSummary", False)
    where = f"{path}.metricsSummary"
    return compact({
        "start_time": format_ts(start),
        "end_time": format_ts(end),
        "distance_meters": _scaled(metrics.get("distanceMillimeters"), 0.001, f"{where}.distanceMillimeters"),
        "calories": _number(metrics.get("caloriesKcal"), f"{where}.caloriesKcal"),
        "avg_hr_bpm": _measured(metrics.get("averageHeartRateBeatsPerMinute"),
                                f"{where}.averageHeartRateBeatsPerMinute"),
        "avg_speed_meters_per_second": _scaled(metrics.get("averageSpeedMillimetersPerSecond"), 0.001,
                                               f"{where}.averageSpeedMillimetersPerSecond"),
    })


@PROVIDER.kind("exercise", "activity")
def exercise(doc: dict[str, Any]) -> Fragment:
    """An exercise session: type, local times, active duration, calories, distance, steps, HR, zones, laps."""
    data = _data(doc, "exercise")
    summary_id = _point_id(doc, "exercise")
    start, end = _span(data.get("interval"), "exercise.interval")
    kind = data.get("exerciseType")
    if not isinstance(kind, str):
        raise MappingError(f"exercise.exerciseType must be an ExerciseType name, got {kind!r}")
    metrics = _object(data.get("metricsSummary"), "exercise.metricsSummary", False)
    where = "exercise.metricsSummary"
    pace = _number(metrics.get("averagePaceSecondsPerMeter"), f"{where}.averagePaceSecondsPerMeter")
    laps = [_lap(split, f"exercise.splitSummaries[{i}]") for i, split in enumerate(data.get("splitSummaries") or [])]
    record = compact({
        "metadata": {
            "summary_id": summary_id,
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "type": ACTIVITY_TYPE.get(kind, OTHER_ACTIVITY),
            "upload_type": UPLOAD_MANUAL if _manual(doc) else UPLOAD_AUTOMATIC,
            "name": data.get("displayName") or kind,
            "timestamp_localization": LOCAL_TIME,
        },
        "active_durations_data": {"activity_seconds": _seconds(data.get("activeDuration"), "exercise.activeDuration")},
        # caloriesKcal summarizes active-energy-burned, which excludes basal energy (data-types/workouts)
        "calories_data": {"net_activity_calories": _number(metrics.get("caloriesKcal"), f"{where}.caloriesKcal")},
        "distance_data": {"summary": {
            "distance_meters": _scaled(metrics.get("distanceMillimeters"), 0.001, f"{where}.distanceMillimeters"),
            "steps": _number(metrics.get("steps"), f"{where}.steps"),
            "elevation": {"gain_actual_meters": _scaled(metrics.get("elevationGainMillimeters"), 0.001,
                                                        f"{where}.elevationGainMillimeters")},
        }},
        "heart_rate_data": {"summary": {
            "avg_hr_bpm": _measured(metrics.get("averageHeartRateBeatsPerMinute"),
                                    f"{where}.averageHeartRateBeatsPerMinute"),
            "hr_zone_data": _hr_zones(_object(metrics.get("heartRateZoneDurations"),
                                              f"{where}.heartRateZoneDurations", False),
                                      f"{where}.heartRateZoneDurations"),
        }},
        "movement_data": {
            "avg_speed_meters_per_second": _scaled(metrics.get("averageSpeedMillimetersPerSecond"), 0.001,
                                                   f"{where}.averageSpeedMillimetersPerSecond"),
            "avg_pace_minutes_per_kilometer": round(pace * 1000 / 60, 3) if pace is not None else None,
        },
        "oxygen_data": {"vo2max_ml_per_min_per_kg": _measured(metrics.get("runVo2Max"), f"{where}.runVo2Max")},
        "lap_data": {"laps": laps},
        "device_data": _device(doc),
    })
    return Fragment("activity", record, version_ms=_version_ms(data, "exercise"))


# ----------------------------------------------------------------------------------------------------------------------
# sleep → Sleep
# ----------------------------------------------------------------------------------------------------------------------
def _hypnogram(stages: list[Any], path: str) -> list[dict[str, Any]]:
    """Stage segments → level-change samples at each segment's local start (equal neighbours collapse)."""
    spans = []
    for index, stage in enumerate(stages):
        where = f"{path}[{index}]"
        stage = _object(stage, where)
        if stage.get("type") not in SLEEP_LEVEL:
            raise MappingError(f"{where}.type {stage.get('type')!r} is not a sleep stage ({', '.join(SLEEP_LEVEL)})")
        start, _ = _span(stage, where)
        spans.append((start, SLEEP_LEVEL[stage["type"]]))
    samples: list[dict[str, Any]] = []
    for start, level in sorted(spans, key=lambda pair: pair[0]):
        if not samples or samples[-1]["level"] != level:
            samples.append({"timestamp": format_ts(start), "level": level})
    return samples


@PROVIDER.kind("sleep", "sleep")
def sleep(doc: dict[str, Any]) -> Fragment:
    """A sleep session: local times, nap flag, stage totals and latencies from ``summary``, stage hypnogram."""
    data = _data(doc, "sleep")
    summary_id = _point_id(doc, "sleep")
    start, end = _span(data.get("interval"), "sleep.interval")
    metadata = _object(data.get("metadata"), "sleep.metadata", False)
    summary = _object(data.get("summary"), "sleep.summary", False)
    stages = data.get("stages") or []
    if not isinstance(stages, list):
        raise MappingError("sleep.stages must be a list")
    totals: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(summary.get("stagesSummary") or []):
        item = _object(item, f"sleep.summary.stagesSummary[{index}]")
        totals[str(item.get("type"))] = item

    def stage(name: str, field: str = "minutes") -> Any:
        value = _number(totals.get(name, {}).get(field), f"sleep.summary.stagesSummary[{name}].{field}")
        return value * 60 if field == "minutes" and value is not None else value

    manual = _manual(doc)
    where = "sleep.summary"
    record = compact({
        "metadata": {
            "summary_id": summary_id,
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "upload_type": SLEEP_UPLOAD_MANUAL if manual else SLEEP_UPLOAD_AUTOMATIC if manual is False else 0,
            "is_nap": metadata.get("nap") if isinstance(metadata.get("nap"), bool) else None,
            "timestamp_localization": LOCAL_TIME,
        },
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": _minutes(summary.get("minutesAsleep"), f"{where}.minutesAsleep"),
                "duration_deep_sleep_state_seconds": stage("DEEP"),
                "duration_light_sleep_state_seconds": stage("LIGHT"),
                "duration_REM_sleep_state_seconds": stage("REM"),
                "num_REM_events": stage("REM", "count"),
            },
            "awake": {
                "duration_awake_state_seconds": _minutes(summary.get("minutesAwake"), f"{where}.minutesAwake"),
                "sleep_latency_seconds": _minutes(summary.get("minutesToFallAsleep"), f"{where}.minutesToFallAsleep"),
                "wake_up_latency_seconds": _minutes(summary.get("minutesAfterWakeUp"), f"{where}.minutesAfterWakeUp"),
                "num_wakeup_events": stage("AWAKE", "count"),
                "num_out_of_bed_events": len(data["outOfBedSegments"]) if data.get("outOfBedSegments") else None,
            },
            "other": {"duration_in_bed_seconds": _minutes(summary.get("minutesInSleepPeriod"),
                                                          f"{where}.minutesInSleepPeriod")},
            "hypnogram_samples": _hypnogram(stages, "sleep.stages"),
        },
        "device_data": _device(doc),
    })
    return Fragment("sleep", record, version_ms=_version_ms(data, "sleep"))


# ----------------------------------------------------------------------------------------------------------------------
# intraday points → the local day's Daily
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("steps", "daily")
def steps(doc: dict[str, Any]) -> Fragment:
    """A step count over an interval → the steps of its local day's Daily, at the interval's end (delivered as the
    day's running total there: ``PROVIDER.interval_samples``; intervals vary in length, so each sample is placed at
    its end here)."""
    data = _data(doc, "steps")
    start, end = _span(data.get("interval"), "steps.interval")
    sample = {"timestamp": format_ts(end), "steps": _required_number(data.get("count"), "steps.count")}
    return Fragment("daily", {"metadata": _day_metadata(start),
                              "distance_data": {"detailed": {"step_samples": [sample]}}})


@PROVIDER.kind("heart-rate", "daily")
def heart_rate(doc: dict[str, Any]) -> Fragment:
    """A heart-rate sample (bpm, motion context) → one HR sample of its local day's Daily."""
    data = _data(doc, "heartRate")
    at = _sample_time(data, "heartRate")
    context = _object(data.get("metadata"), "heartRate.metadata", False).get("motionContext")
    bpm = _measured(data.get("beatsPerMinute"), "heartRate.beatsPerMinute", required=True)
    sample = {"timestamp": format_ts(at), "bpm": bpm, "context": HR_CONTEXT.get(context, 0)}
    return Fragment("daily", {"metadata": _day_metadata(at), "heart_rate_data": {"detailed": {"hr_samples": [sample]}}})


# ----------------------------------------------------------------------------------------------------------------------
# daily summaries → Daily of their date
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("daily-resting-heart-rate", "daily")
def daily_resting_heart_rate(doc: dict[str, Any]) -> Fragment:
    """The day's resting heart rate (bpm) → Daily ``heart_rate_data.summary.resting_hr_bpm``."""
    data = _data(doc, "dailyRestingHeartRate")
    bpm = _measured(data.get("beatsPerMinute"), "dailyRestingHeartRate.beatsPerMinute", required=True)
    return Fragment("daily", {"metadata": _date_metadata(_date(data.get("date"), "dailyRestingHeartRate.date")),
                              "heart_rate_data": {"summary": {"resting_hr_bpm": bpm}}})


@PROVIDER.kind("daily-heart-rate-variability", "daily")
def daily_heart_rate_variability(doc: dict[str, Any]) -> Fragment:
    """The day's average HRV (RMSSD, ms) → Daily ``heart_rate_data.summary.avg_hrv_rmssd``."""
    data = _data(doc, "dailyHeartRateVariability")
    rmssd = _measured(data.get("averageHeartRateVariabilityMilliseconds"),
                      "dailyHeartRateVariability.averageHeartRateVariabilityMilliseconds")
    if rmssd is None:
        others = sorted(k for k in data if k not in ("date", "averageHeartRateVariabilityMilliseconds"))
        raise MappingError("dailyHeartRateVariability has no averageHeartRateVariabilityMilliseconds (or 0); its "
                           f"other fields ({', '.join(others) or 'none'}) have no Terra field")
    return Fragment("daily", {"metadata": _date_metadata(_date(data.get("date"), "dailyHeartRateVariability.date")),
                              "heart_rate_data": {"summary": {"avg_hrv_rmssd": rmssd}}})


@PROVIDER.kind("daily-oxygen-saturation", "daily")
def daily_oxygen_saturation(doc: dict[str, Any]) -> Fragment:
    """The night's average SpO2 (%) → Daily ``oxygen_data.avg_saturation_percentage`` of its date."""
    data = _data(doc, "dailyOxygenSaturation")
    average = _measured(data.get("averagePercentage"), "dailyOxygenSaturation.averagePercentage", required=True)
    return Fragment("daily", {"metadata": _date_metadata(_date(data.get("date"), "dailyOxygenSaturation.date")),
                              "oxygen_data": {"avg_saturation_percentage": average}})


# ----------------------------------------------------------------------------------------------------------------------
# samples → Body measurements of the local day
# ----------------------------------------------------------------------------------------------------------------------
def _measurement(doc: dict[str, Any], field: str, values: dict[str, Any]) -> Fragment:
    data = _data(doc, field)
    at = _sample_time(data, field)
    start, end = day_bounds(at.date(), timezone(at.utcoffset() or timedelta(0)))
    sample = compact({"measurement_time": format_ts(at), **values, "user_notes": data.get("notes")})
    if len(sample) < 2:
        raise MappingError(f"{field} data point has no value")
    return Fragment("body", {"metadata": {"start_time": start, "end_time": end, "timestamp_localization": LOCAL_TIME},
                             "measurements_data": {"measurements": [sample]}})


@PROVIDER.kind("weight", "body")
def weight(doc: dict[str, Any]) -> Fragment:
    """A weight sample (grams → kg) → a measurement of its local day's Body."""
    grams = _measured(_data(doc, "weight").get("weightGrams"), "weight.weightGrams", required=True)
    return _measurement(doc, "weight", {"weight_kg": round(grams / 1000, 3)})


@PROVIDER.kind("body-fat", "body")
def body_fat(doc: dict[str, Any]) -> Fragment:
    """A body-fat sample (%) → a measurement of its local day's Body (merged with a weight at the same instant)."""
    percentage = _measured(_data(doc, "bodyFat").get("percentage"), "bodyFat.percentage", required=True)
    return _measurement(doc, "bodyFat", {"bodyfat_percentage": percentage})


@PROVIDER.kind("height", "body")
def height(doc: dict[str, Any]) -> Fragment:
    """A height sample (mm → cm) → a measurement of its local day's Body."""
    millimeters = _measured(_data(doc, "height").get("heightMillimeters"), "height.heightMillimeters", required=True)
    return _measurement(doc, "height", {"height_cm": round(millimeters / 10, 1)})
