"""Garmin Connect Health, Activity and Women's Health API summaries.

Accepted forms: a push body ``{"<summary type>": [summaries]}`` (the key names the kind); and, when the raw event
names its kind (a Ping callback's or a backfill/pull answer, a replayed file), the bare JSON array of summaries Garmin
answers, or a single summary. Every summary carries ``userId``. Times are unix seconds UTC plus
``startTimeOffsetInSeconds`` (the device's display offset), which healthflow keeps as the UTC offset of every emitted
timestamp (``timestamp_localization`` 1): Garmin gives no other zone, and its days (``calendarDate``) are in that
offset. Day-scoped records use ``calendarDate``.

Zero (or a negative code) that means "not measured", per field; these map to absent, never to a value:

- heart rate: ``restingHeartRateInBeatsPerMinute``, ``min``/``maxHeartRateInBeatsPerMinute``,
  ``averageHeartRateInBeatsPerMinute`` (activities) and heart-rate samples ≤ 0 (no sensor, not worn); a
  blood-pressure ``pulse`` of 0;
- stress: levels < 0 are Garmin's codes (-1 off wrist, -2 large motion, -3 not enough data, -4 recovering,
  -5 unidentified); 0 is a real (restful) level. Body Battery values < 0 are codes; 0 is a real (empty) level;
- SpO2 and respiration values ≤ 0 (a reading is never 0 %), HRV (RMSSD) values ≤ 0, ``vo2Max`` ≤ 0, ``met`` ≤ 0,
  cadences and paces ≤ 0 (no cadence sensor; a pace of 0 min/km is no pace), body composition values ≤ 0
  (``weightInGrams``, ``bodyFatInPercent``, ``bodyMassIndex``, ``muscleMassInGrams``, ``boneMassInGrams``,
  ``bodyWaterInPercent``), ``overallSleepScore.value`` 0;
- an ``OFF_WRIST`` sleep's stage durations (Garmin sends them all 0): nothing was measured;
- kept as real zeros: steps, distance, floors, calories and durations of days and activities (a still day or a
  yoga session), and speeds.

Kinds Garmin sends that healthflow knowingly does not map (Terra's model has no field for them): ``skinTemp``
(skin-temperature deviations: Sleep.temperature_data.delta would need a sleep id Garmin does not give),
``allDayRespiration`` (Daily has no respiration field) and ``moveIQActivities`` (auto-detected spans already counted in
epochs and dailies). Their documents are acknowledged and counted as ``ignored:garmin:<kind>``, never dead-lettered.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from connectors.base import Fragment, IntervalSamples, MappingError, Provider
from connectors.providers.garmin.activity_types import terra_activity_type
from connectors.timeutil import day_bounds, format_ts, offset_tz, unix_date, unix_ts

PROVIDER = Provider(
    "garmin",
    "GARMIN",
    envelope="keyed",
    user_field="userId",
    doc="Garmin Connect push bodies (Health, Activity and Women's Health APIs)",
    compacts=True,  # mappers return records as built; the framework drops None and empty parts
    interval_samples={"daily": IntervalSamples(  # epochs: one per activity type per 15-minute slice (``epochs``)
        seconds=900,
        amounts=("distance_data.detailed.step_samples", "distance_data.detailed.distance_samples",
                 "calories_data.calorie_samples"),
        levels=("MET_data.MET_samples", "active_durations_data.activity_levels_samples"),
    )},
)

LOCAL = 1  # TimestampLocalization.LOCAL: timestamps carry the user's display offset
UPLOAD_AUTOMATIC, UPLOAD_MANUAL = 1, 2
SLEEP_UPLOAD = {  # Garmin sleep `validation` → Terra SleepUploadType
    "MANUAL": 1, "DEVICE": 2, "AUTO_FINAL": 2, "AUTO_MANUAL": 2, "ENHANCED_FINAL": 2,
    "AUTO_TENTATIVE": 3, "ENHANCED_TENTATIVE": 3, "OFF_WRIST": 4,
}
SLEEP_LEVEL = {"awake": 1, "light": 4, "deep": 5, "rem": 6, "unmeasurable": 0}  # Terra SleepLevel
PLAUSIBLE_BPM = (1, 250)  # what a heart can beat (transforms.plausibility drops the rest from the series)
UNKNOWN_LEVEL = 0  # Terra SleepLevel.UNKNOWN: a span Garmin staged as nothing (a gap in sleepLevelsMap)
STRESS_RATING = {"calm": 1, "balanced": 2, "stressful": 3, "very_stressful": 4}  # Terra StressLevel
EPOCH_INTENSITY = {"SEDENTARY": 2, "ACTIVE": 4, "HIGHLY_ACTIVE": 5}  # Terra ActivityLevel
MCT_PHASE = {  # Garmin currentPhaseType → Terra MenstruationInterval
    "MENSTRUAL": 1, "FOLLICULAR": 2, "FERTILE_WINDOW": 3, "FERTILE": 3, "OVULATION": 4, "LUTEAL": 5,
    "PMS": 6, "FIRST_TRIMESTER": 7, "SECOND_TRIMESTER": 8, "THIRD_TRIMESTER": 9,
}


def _measured(value: Any) -> Any:
    """``value`` when it is a measurement, ``None`` for Garmin's 0 / negative "not measured" (module docstring)."""
    return value if _is_number(value) and value > 0 else None


def _sleep_upload_type(validation: Any) -> int:
    """Garmin sleep ``validation`` → Terra SleepUploadType, whatever its case; an unknown value maps by its
    ``_FINAL`` / ``_TENTATIVE`` suffix, else UNKNOWN (0)."""
    name = str(validation or "").strip().upper()
    if name in SLEEP_UPLOAD:
        return SLEEP_UPLOAD[name]
    return 2 if name.endswith("_FINAL") else 3 if name.endswith("_TENTATIVE") else 0


# after 1970-01-01 (0 is a placeholder; a weight or activity entered by hand may be decades old) and before 2100:
# Garmin's plausible unix seconds (a value in milliseconds lands far beyond 2100)
EARLIEST_S, LATEST_S = 86_400, 4_102_444_800


def _require(doc: dict[str, Any], *names: str) -> None:
    """The fields are present; a ``…TimeInSeconds`` one must be plausible unix seconds (Garmin itself refuses
    milliseconds: a value in ms would put the record in another millennium), a ``durationInSeconds`` ≥ 0."""
    missing = [n for n in names if doc.get(n) is None]
    if missing:
        raise MappingError(f"missing required field(s): {', '.join(missing)}")
    for name in names:
        value = doc[name]
        if name.endswith("TimeInSeconds") and (not _is_number(value) or not EARLIEST_S <= value < LATEST_S):
            hint = " (milliseconds? Garmin sends unix seconds)" if _is_number(value) and value >= LATEST_S else ""
            raise MappingError(f"{name} must be unix seconds between 1970-01-02 and 2100, got {value!r}{hint}")
        if name == "durationInSeconds" and (not _is_number(value) or value < 0):
            raise MappingError(f"durationInSeconds must be a number of seconds ≥ 0, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _offset(doc: dict[str, Any], name: str = "startTimeOffsetInSeconds") -> int:
    """The display offset (Health Snapshot spells it ``offsetStartTimeInSeconds``); within ±24 h, else MappingError."""
    value = doc.get(name)
    if value is None:
        value = doc.get("offsetStartTimeInSeconds")
    if value is None:
        return 0
    if not _is_number(value) or not -86_400 < value < 86_400:
        raise MappingError(f"{name} must be a display offset in seconds within ±24 h, got {value!r}")
    return int(value)


def _local_day(doc: dict[str, Any], time_field: str = "startTimeInSeconds",
               offset_field: str = "startTimeOffsetInSeconds") -> tuple[str, str]:
    """Day window of a summary: its ``calendarDate`` if given, else the local date of its start."""
    offset = _offset(doc, offset_field)
    day = doc.get("calendarDate") or unix_date(doc[time_field], offset)
    return day_bounds(day, offset_tz(offset))


def _offset_samples(doc: dict[str, Any], field: str, value_name: str, offset: int,
                    skip_negative: bool = False, skip_zero: bool = False) -> list[dict[str, Any]]:
    """Garmin ``{"<seconds from start>": value}`` maps → time-ordered Terra samples; ``skip_negative`` drops values
    < 0 (codes), ``skip_zero`` values ≤ 0 (not measured)."""
    start = doc["startTimeInSeconds"]
    samples = []
    by_second = sorted([(int(key), value) for key, value in (doc.get(field) or {}).items()], key=itemgetter(0))
    for second, value in by_second:
        if value is None or (skip_negative and value < 0) or (skip_zero and _measured(value) is None):
            continue
        samples.append({"timestamp": unix_ts(start + second, offset), value_name: value})
    return samples


def _day_metadata(doc: dict[str, Any], **kw: str) -> dict[str, Any]:
    start, end = _local_day(doc, **kw)
    return {"start_time": start, "end_time": end, "upload_type": UPLOAD_AUTOMATIC, "timestamp_localization": LOCAL}


def _stress_level(value: Any) -> Any:
    return value if value is not None and value >= 0 else None


@PROVIDER.kind("dailies", "daily")
def dailies(doc: dict[str, Any]) -> dict[str, Any]:
    """Daily summary; re-sent through the day, each a superset of the last."""
    _require(doc, "startTimeInSeconds")
    offset = _offset(doc)
    hr_samples = _offset_samples(doc, "timeOffsetHeartRateSamples", "bpm", offset, skip_zero=True)
    bpms = [s["bpm"] for s in hr_samples if PLAUSIBLE_BPM[0] <= s["bpm"] <= PLAUSIBLE_BPM[1]]  # the mean's inputs
    active, bmr = doc.get("activeKilocalories"), doc.get("bmrKilocalories")
    # Stress levels are 0-100; negative values are Garmin's "not enough data" codes, not levels.
    stress_avg, stress_max = (_stress_level(doc.get(n)) for n in ("averageStressLevel", "maxStressLevel"))
    return {
        "metadata": _day_metadata(doc),
        "distance_data": {
            "steps": doc.get("steps"),
            "distance_meters": doc.get("distanceInMeters"),
            "floors_climbed": doc.get("floorsClimbed"),
        },
        "calories_data": {
            "net_activity_calories": active,
            "BMR_calories": bmr,
            "total_burned_calories": active + bmr if active is not None and bmr is not None else None,
        },
        "active_durations_data": {
            "activity_seconds": doc.get("activeTimeInSeconds"),
            "moderate_intensity_seconds": doc.get("moderateIntensityDurationInSeconds"),
            "vigorous_intensity_seconds": doc.get("vigorousIntensityDurationInSeconds"),
        },
        "heart_rate_data": {
            "summary": {
                # Garmin's averageHeartRateInBeatsPerMinute is a 7-day average: use the day's samples.
                "avg_hr_bpm": round(sum(bpms) / len(bpms), 2) if bpms else None,
                "min_hr_bpm": _measured(doc.get("minHeartRateInBeatsPerMinute")),
                "max_hr_bpm": _measured(doc.get("maxHeartRateInBeatsPerMinute")),
                "resting_hr_bpm": _measured(doc.get("restingHeartRateInBeatsPerMinute")),
            },
            "detailed": {"hr_samples": hr_samples},
        },
        "stress_data": {
            "avg_stress_level": stress_avg,
            "max_stress_level": stress_max,
            "stress_rating": STRESS_RATING.get(str(doc.get("stressQualifier") or "").strip().lower().removesuffix(
                "_awake")),
            "stress_duration_seconds": doc.get("stressDurationInSeconds"),
            "rest_stress_duration_seconds": doc.get("restStressDurationInSeconds"),
            "activity_stress_duration_seconds": doc.get("activityStressDurationInSeconds"),
            "low_stress_duration_seconds": doc.get("lowStressDurationInSeconds"),
            "medium_stress_duration_seconds": doc.get("mediumStressDurationInSeconds"),
            "high_stress_duration_seconds": doc.get("highStressDurationInSeconds"),
        },
    }


def _epoch_sample(at: str, name: str, value: Any) -> list[dict[str, Any]]:
    return [{"timestamp": at, name: value}] if value is not None else []


UNKNOWN_ACTIVITY = "UNKNOWN"  # the part of an epoch whose activityType is blank


@PROVIDER.kind("epochs", "daily")
def epochs(doc: dict[str, Any]) -> Fragment:
    """A 15-minute epoch of one activity type: steps, distance, active kcal, MET and activity-level samples of the
    day's Daily, as one part (its ``activityType``) of the slice.

    The Daily delivered has Terra's running totals since the start of the day: each step, distance and calorie
    sample at a slice's end (the slice start + 15 min: what was done by then) holds the day's total up to it, the
    activity types of each slice added up; MET and activity level stay at the slice start, the highest of its
    activity types (the slice's most intense activity; a time-weighted MET would need ``activeTimeInSeconds`` kept).

    The mapper itself makes each sample at the epoch's start holding the epoch's own amount: a day's epochs arrive in
    many pushes, each mapped alone. The record state keeps them so, one per (slice start, activity type)
    (``PROVIDER.interval_samples``, ``Fragment.part``): an update of an epoch (``durationInSeconds`` 720 → 900, same
    start and activity type) replaces it alone, another activity type of the slice stays beside it, and the running
    totals are made from them whenever the Daily is delivered. An epoch whose ``activityType`` is blank is the part
    ``UNKNOWN_ACTIVITY`` (never merged into another activity type's sample of the slice)."""
    _require(doc, "startTimeInSeconds")
    offset = _offset(doc)
    at = unix_ts(doc["startTimeInSeconds"], offset)
    intensity = EPOCH_INTENSITY.get(str(doc.get("intensity") or "").upper())
    activity = str(doc.get("activityType") or "").strip().upper()
    return Fragment("daily", {
        "metadata": _day_metadata(doc),
        "distance_data": {"detailed": {
            "step_samples": _epoch_sample(at, "steps", doc.get("steps")),
            "distance_samples": _epoch_sample(at, "distance_meters", doc.get("distanceInMeters")),
        }},
        "calories_data": {"calorie_samples": _epoch_sample(at, "calories", doc.get("activeKilocalories"))},
        "MET_data": {"MET_samples": _epoch_sample(at, "level", _measured(doc.get("met")))},
        "active_durations_data": {"activity_levels_samples": _epoch_sample(at, "level", intensity)},
    }, part=activity or UNKNOWN_ACTIVITY)


def _unmeasurable(doc: dict[str, Any]) -> Any:
    """Unmeasurable seconds, under either of Garmin's spellings."""
    return doc.get("unmeasurableSleepInSeconds", doc.get("unmeasurableSleepDurationInSeconds"))


STAGE_TOTALS = ("deepSleepDurationInSeconds", "lightSleepDurationInSeconds", "remSleepInSeconds")


def _sleep_end(doc: dict[str, Any]) -> int:
    """The night's end: where Garmin's staging ends (the last ``sleepLevelsMap`` segment's end, or start + the stage
    totals deep + light + REM + awake + unmeasurable when they reach further: a partial map, or none), never past
    start + ``durationInSeconds`` + awake + unmeasurable (Garmin's published example has a deep segment running 16 h
    past a 4.4-hour night: cut there). A sleep with no stages at all (entered by hand) ends at start + its duration.

    ``durationInSeconds`` alone is no measure of the night: Garmin's spec examples count awake in it, its recorded
    sleeps count unmeasurable instead (26,460 = deep + light + REM + unmeasurable, the map ending 12 min later); so
    adding awake and unmeasurable to it only bounds the night. With neither map nor totals (an OFF_WRIST night) the
    bound is the end."""
    start = doc["startTimeInSeconds"]
    bound = start + sum(value for value in (doc.get("durationInSeconds"), doc.get("awakeDurationInSeconds"),
                                            _unmeasurable(doc)) if _is_number(value) and value > 0)
    ends = [seg["endTimeInSeconds"] for segs in (doc.get("sleepLevelsMap") or {}).values() for seg in segs or []]
    staged = sum(value for value in (doc.get("deepSleepDurationInSeconds"), doc.get("lightSleepDurationInSeconds"),
                                     doc.get("remSleepInSeconds"), doc.get("awakeDurationInSeconds"),
                                     _unmeasurable(doc)) if _is_number(value) and value > 0)
    # a map that ends before its own stage totals could (a partial map) does not end the night: the totals do
    staged_end = max(max(ends), start + staged) if ends else start + staged if staged else None
    duration = doc.get("durationInSeconds")
    if not ends and not any(_is_number(doc.get(name)) and doc[name] > 0 for name in STAGE_TOTALS) and \
            _is_number(duration) and duration > 0 and str(doc.get("validation") or "").strip().upper() != "OFF_WRIST":
        return start + duration  # no stages at all (a sleep entered by hand): its duration, awake counted in it
    if staged_end is None or staged_end <= start:
        return bound
    return min(staged_end, bound) if bound > start else staged_end


def _stage_segments(doc: dict[str, Any], night_end: int) -> list[tuple[int, int, int]]:
    """``sleepLevelsMap`` as time-ordered ``(start, end, Terra SleepLevel)``, cut at ``night_end`` (what runs past
    the night is no stage; a segment starting at or after it is left out); a stage name Garmin adds later is
    UNKNOWN (0), whatever its case."""
    segments = []
    for level, segs in (doc.get("sleepLevelsMap") or {}).items():
        for seg in segs or []:
            start, end = seg["startTimeInSeconds"], min(seg["endTimeInSeconds"], night_end)
            if start < night_end:
                segments.append((start, end, SLEEP_LEVEL.get(str(level).lower(), UNKNOWN_LEVEL)))
    return sorted(segments)


def _hypnogram(segments: list[tuple[int, int, int]], night_end: int, offset: int) -> list[dict[str, Any]]:
    """Terra hypnogram samples (each level holds until the next sample, the last one until the night's end).
    Where Garmin staged nothing (a gap between one segment's end and the next one's start) an UNKNOWN sample starts
    at the gap, so the gap never counts as the stage before it; so does the span between a partial map's last
    segment and the night's end (which the stage totals set), never a full map's (the night ends with it)."""
    samples: list[dict[str, Any]] = []
    for index, (start, end, level) in enumerate(segments):
        samples.append({"timestamp": unix_ts(start, offset), "level": level})
        following = segments[index + 1][0] if index + 1 < len(segments) else night_end
        if end < following:
            samples.append({"timestamp": unix_ts(end, offset), "level": UNKNOWN_LEVEL})
    return samples


def _stage_seconds(segments: list[tuple[int, int, int]], level: int) -> int | None:
    """Seconds Garmin staged as ``level`` (None when the map has no such segment)."""
    spans = [end - start for start, end, seg_level in segments if seg_level == level]
    return sum(spans) if spans else None


NAP_UPLOAD = {"MANUAL": 1, "DEVICE": 2}  # Garmin napValidation → Terra SleepUploadType


@PROVIDER.kind("sleeps", "sleep")
def sleeps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Night sleep with stage totals, hypnogram (sleepLevelsMap), respiration and SpO2; and each of its ``naps`` as
    a Sleep of its own (``is_nap``).

    Stage totals are Garmin's fields; a total Garmin leaves out is the sum of that stage's segments (only what
    it staged, never a gap). Asleep is deep + light + REM (absent when none is known), time in bed the night's
    span (``_sleep_end``), efficiency asleep ÷ in bed. An OFF_WRIST sleep measured nothing: its zero totals, asleep
    and efficiency are absent. A nap has no id of
    its own at Garmin: its ``summary_id`` is the night's followed by ``-nap-<napStartTimeInSeconds>``, the same
    each time the night is re-sent."""
    _require(doc, "summaryId", "startTimeInSeconds")
    return [_night(doc), *(_nap(doc, nap) for nap in doc.get("naps") or [])]


def _nap(night: dict[str, Any], nap: dict[str, Any]) -> dict[str, Any]:
    _require(nap, "napStartTimeInSeconds", "napDurationInSeconds")
    start, duration = nap["napStartTimeInSeconds"], nap["napDurationInSeconds"]
    if not _is_number(duration) or duration < 0:
        raise MappingError(f"naps[].napDurationInSeconds must be a number of seconds ≥ 0, got {duration!r}")
    offset = _offset(nap, "napOffsetInSeconds") if nap.get("napOffsetInSeconds") is not None else _offset(night)
    return {
        "metadata": {
            "summary_id": f"{night['summaryId']}-nap-{start}",
            "start_time": unix_ts(start, offset),
            "end_time": unix_ts(start + duration, offset),
            "upload_type": NAP_UPLOAD.get(str(nap.get("napValidation") or "").strip().upper(), 0),
            "is_nap": True,
            "timestamp_localization": LOCAL,
        },
        "sleep_durations_data": {"asleep": {"duration_asleep_state_seconds": duration}},
    }


def _night(doc: dict[str, Any]) -> dict[str, Any]:
    offset = _offset(doc)
    start, end = doc["startTimeInSeconds"], _sleep_end(doc)
    segments = _stage_segments(doc, end)
    hypnogram = _hypnogram(segments, end, offset)
    upload_type = _sleep_upload_type(doc.get("validation"))
    off_wrist = str(doc.get("validation") or "").strip().upper() == "OFF_WRIST"

    def total(field: str, level: int) -> Any:
        value = doc.get(field)
        if value is None:
            value = _stage_seconds(segments, level)
        return _measured(value) if off_wrist else value

    deep, light, rem = (total("deepSleepDurationInSeconds", SLEEP_LEVEL["deep"]),
                        total("lightSleepDurationInSeconds", SLEEP_LEVEL["light"]),
                        total("remSleepInSeconds", SLEEP_LEVEL["rem"]))
    staged = [value for value in (deep, light, rem) if value is not None]
    # the stages when Garmin staged any (never durationInSeconds then: Garmin counts awake or unmeasurable in it); a
    # sleep entered by hand (validation MANUAL) has no stages, only its duration
    duration, awake = doc.get("durationInSeconds"), doc.get("awakeDurationInSeconds")
    manual = str(doc.get("validation") or "").strip().upper() == "MANUAL"
    asleep = (sum(staged) if staged and (any(staged) or not manual) else  # stages Garmin measured, zeros included
              duration - (awake if _is_number(awake) and 0 < awake < duration else 0)  # entered by hand: no stages
              if not off_wrist and _is_number(duration) and duration > 0 else None)
    breaths = _offset_samples(doc, "timeOffsetSleepRespiration", "breaths_per_min", offset, skip_zero=True)
    spo2 = _offset_samples(doc, "timeOffsetSleepSpo2", "percentage", offset, skip_zero=True)
    rates = [s["breaths_per_min"] for s in breaths]
    in_bed = end - start
    return {
        "metadata": {
            "summary_id": str(doc["summaryId"]),
            "start_time": unix_ts(start, offset),
            "end_time": unix_ts(end, offset),
            "upload_type": upload_type,
            "is_nap": False,
            "timestamp_localization": LOCAL,
        },
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": asleep,
                "duration_deep_sleep_state_seconds": deep,
                "duration_light_sleep_state_seconds": light,
                "duration_REM_sleep_state_seconds": rem,
            },
            "awake": {"duration_awake_state_seconds": total("awakeDurationInSeconds", SLEEP_LEVEL["awake"])},
            "other": {
                "duration_in_bed_seconds": in_bed,
                "duration_unmeasurable_sleep_seconds": _unmeasurable(doc),
            },
            # Terra's sleep_efficiency is a percentage (asleep ÷ in bed × 100).
            "sleep_efficiency": round(100 * asleep / in_bed, 2) if asleep and in_bed > 0 else None,
            "hypnogram_samples": hypnogram,
        },
        "respiration_data": {
            "breaths_data": {
                "start_time": breaths[0]["timestamp"] if breaths else None,
                "end_time": breaths[-1]["timestamp"] if breaths else None,
                "avg_breaths_per_min": round(sum(rates) / len(rates), 2) if rates else None,
                "min_breaths_per_min": min(rates) if rates else None,
                "max_breaths_per_min": max(rates) if rates else None,
                "samples": breaths,
            },
            "oxygen_saturation_data": {
                "start_time": spo2[0]["timestamp"] if spo2 else None,
                "end_time": spo2[-1]["timestamp"] if spo2 else None,
                "avg_saturation_percentage": round(sum(s["percentage"] for s in spo2) / len(spo2), 2) if spo2 else None,
                "samples": [dict(s, type=0) for s in spo2],
            },
        },
        "scores": {"sleep_score": _measured((doc.get("overallSleepScore") or {}).get("value"))},
    }


def _first(doc: dict[str, Any], *names: str) -> Any:
    return next((doc[n] for n in names if doc.get(n) is not None), None)


def _activity(doc: dict[str, Any], upload_type: int) -> dict[str, Any]:
    _require(doc, "summaryId", "startTimeInSeconds", "durationInSeconds")
    offset = _offset(doc)
    start = doc["startTimeInSeconds"]
    lat, lng = doc.get("startingLatitudeInDegree"), doc.get("startingLongitudeInDegree")
    device = doc.get("deviceName")
    return {
        "metadata": {
            "summary_id": str(doc["summaryId"]),
            "start_time": unix_ts(start, offset),
            "end_time": unix_ts(start + doc["durationInSeconds"], offset),
            "type": terra_activity_type(doc.get("activityType")),
            "upload_type": UPLOAD_MANUAL if doc.get("manual") else upload_type,
            "name": doc.get("activityName"),
            "timestamp_localization": LOCAL,
        },
        "distance_data": {"summary": {
            "distance_meters": doc.get("distanceInMeters"),
            "steps": doc.get("steps"),
            "swimming": {"num_laps": doc.get("numberOfActiveLengths")},
            "elevation": {"gain_actual_meters": doc.get("totalElevationGainInMeters"),
                          "loss_actual_meters": doc.get("totalElevationLossInMeters")},
        }},
        # The Activity API's activeKilocalories include BMR (unlike dailies).
        "calories_data": {"total_burned_calories": doc.get("activeKilocalories")},
        "heart_rate_data": {"summary": {"avg_hr_bpm": _measured(doc.get("averageHeartRateInBeatsPerMinute")),
                                        "max_hr_bpm": _measured(doc.get("maxHeartRateInBeatsPerMinute"))}},
        "movement_data": {
            "avg_speed_meters_per_second": doc.get("averageSpeedInMetersPerSecond"),
            "max_speed_meters_per_second": doc.get("maxSpeedInMetersPerSecond"),
            "avg_pace_minutes_per_kilometer": _measured(doc.get("averagePaceInMinutesPerKilometer")),
            "max_pace_minutes_per_kilometer": _measured(doc.get("maxPaceInMinutesPerKilometer")),
            "avg_cadence_rpm": _measured(_first(doc, "averageRunCadenceInStepsPerMinute",
                                                "averageBikeCadenceInRoundsPerMinute")),
            "max_cadence_rpm": _measured(_first(doc, "maxRunCadenceInStepsPerMinute",
                                                "maxBikeCadenceInRoundsPerMinute")),
        },
        "position_data": {"start_pos_lat_lng_deg": [lat, lng] if lat is not None and lng is not None else None},
        "device_data": {"name": device if device and device != "unknown" else None, "manufacturer": "Garmin"},
    }


@PROVIDER.kind("activities", "activity")
def activities(doc: dict[str, Any]) -> dict[str, Any]:
    """Completed activity summary."""
    return _activity(doc, UPLOAD_AUTOMATIC)


@PROVIDER.kind("manuallyUpdatedActivities", "activity")
def manually_updated_activities(doc: dict[str, Any]) -> dict[str, Any]:
    """Activity edited on the web: replaces the earlier version (same summaryId)."""
    return _activity(doc, UPLOAD_MANUAL)


@PROVIDER.kind("activityDetails", "activity")
def activity_details(doc: dict[str, Any]) -> dict[str, Any]:
    """Activity with its samples (HR, GPS, speed, power, cadence, elevation, distance) and laps."""
    summary = dict(doc.get("summary") or {})
    # A null summaryId must stay missing (MappingError), not become the key "None".
    summary.setdefault("summaryId", str(doc.get("summaryId") or "").removesuffix("-detail") or None)
    record = _activity(summary, UPLOAD_AUTOMATIC)
    offset = _offset(summary)
    samples = doc.get("samples") or []

    def series(field: str, name: str) -> list[dict[str, Any]]:
        return [{"timestamp": unix_ts(s["startTimeInSeconds"], offset), name: s[field],
                 "timer_duration_seconds": s.get("timerDurationInSeconds")}
                for s in samples if s.get(field) is not None]

    hr_samples = [s for s in series("heartRate", "bpm") if _measured(s["bpm"])]
    record["heart_rate_data"]["detailed"] = {"hr_samples": hr_samples}
    record["movement_data"]["speed_samples"] = series("speedMetersPerSecond", "speed_meters_per_second")
    record["movement_data"]["cadence_samples"] = series("bikeCadenceInRPM", "cadence_rpm") or series(
        "stepsPerMinute", "cadence_rpm")
    record["power_data"] = {"power_samples": series("powerInWatts", "watts")}
    record["distance_data"]["detailed"] = {
        "distance_samples": series("totalDistanceInMeters", "distance_meters"),
        "elevation_samples": series("elevationInMeters", "elev_meters"),
    }
    record["position_data"]["position_samples"] = [
        {"timestamp": unix_ts(s["startTimeInSeconds"], offset),
         "coords_lat_lng_deg": [s["latitudeInDegree"], s["longitudeInDegree"]],
         "timer_duration_seconds": s.get("timerDurationInSeconds")}
        for s in samples if s.get("latitudeInDegree") is not None and s.get("longitudeInDegree") is not None
    ]
    watts = [s["watts"] for s in record["power_data"]["power_samples"]]
    record["power_data"].update(avg_watts=round(sum(watts) / len(watts), 2) if watts else None,
                                max_watts=max(watts) if watts else None)
    record["lap_data"] = {"laps": [{"start_time": unix_ts(lap["startTimeInSeconds"], offset)}
                                   for lap in doc.get("laps") or []]}
    return record


@PROVIDER.kind("bodyComps", "body")
def body_comps(doc: dict[str, Any]) -> dict[str, Any]:
    """Body composition measurement (Garmin sends grams; Terra wants kg for weight)."""
    _require(doc, "measurementTimeInSeconds")
    offset = _offset(doc, "measurementTimeOffsetInSeconds")
    start, end = _local_day(doc, "measurementTimeInSeconds", "measurementTimeOffsetInSeconds")
    grams = _measured(doc.get("weightInGrams"))
    return {
        "metadata": {"start_time": start, "end_time": end, "timestamp_localization": LOCAL},
        "measurements_data": {"measurements": [{
            "measurement_time": unix_ts(doc["measurementTimeInSeconds"], offset),
            "weight_kg": grams / 1000 if grams is not None else None,
            "bodyfat_percentage": _measured(doc.get("bodyFatInPercent")),
            "BMI": _measured(doc.get("bodyMassIndex")),
            "bone_mass_g": _measured(doc.get("boneMassInGrams")),
            "muscle_mass_g": _measured(doc.get("muscleMassInGrams")),
            "water_percentage": _measured(doc.get("bodyWaterInPercent")),
        }]},
    }


@PROVIDER.kind("bloodPressures", "body")
def blood_pressures(doc: dict[str, Any]) -> dict[str, Any]:
    """One blood-pressure reading (mmHg) and its pulse."""
    _require(doc, "measurementTimeInSeconds", "systolic", "diastolic")
    offset = _offset(doc, "measurementTimeOffsetInSeconds")
    start, end = _local_day(doc, "measurementTimeInSeconds", "measurementTimeOffsetInSeconds")
    at = unix_ts(doc["measurementTimeInSeconds"], offset)
    return {
        "metadata": {"start_time": start, "end_time": end, "timestamp_localization": LOCAL},
        "blood_pressure_data": {"blood_pressure_samples": [
            {"timestamp": at, "systolic_bp": doc["systolic"], "diastolic_bp": doc["diastolic"]}]},
        "heart_data": {"heart_rate_data": {"detailed": {"hr_samples": [{"timestamp": at, "bpm": doc["pulse"]}]
                                                        if _measured(doc.get("pulse")) else []}}},
    }


@PROVIDER.kind("stressDetails", "daily")
def stress_details(doc: dict[str, Any]) -> dict[str, Any]:
    """3-minute stress levels and Body Battery values for the day (negative codes are not data)."""
    _require(doc, "startTimeInSeconds")
    offset = _offset(doc)
    return {
        "metadata": _day_metadata(doc),
        "stress_data": {
            "samples": _offset_samples(doc, "timeOffsetStressLevelValues", "level", offset, skip_negative=True),
            "body_battery_samples": _offset_samples(doc, "timeOffsetBodyBatteryValues", "level", offset,
                                                    skip_negative=True),
        },
    }


@PROVIDER.kind("pulseox", "daily")
def pulse_ox(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Blood oxygen saturation readings (all-day and on-demand arrive as separate summaries), each in the Daily of
    its own local day: an all-day summary runs 24 h from whenever it starts (Garmin's example: 21:11 local), so its
    readings span two days. A summary without readings is its own day's (empty) Daily."""
    _require(doc, "startTimeInSeconds")
    offset = _offset(doc)
    samples = [dict(s, type=0) for s in _offset_samples(doc, "timeOffsetSpo2Values", "percentage", offset,
                                                        skip_zero=True)]
    by_day: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_day.setdefault(sample["timestamp"][:10], []).append(sample)  # the local date of the reading
    if not by_day:
        return [{"metadata": _day_metadata(doc), "oxygen_data": {"saturation_samples": []}}]
    return [{"metadata": _day_metadata({"calendarDate": day, "startTimeOffsetInSeconds": offset}),
             "oxygen_data": {"saturation_samples": day_samples}} for day, day_samples in by_day.items()]


@PROVIDER.kind("hrv", "daily")
def hrv(doc: dict[str, Any]) -> dict[str, Any]:
    """Overnight heart-rate variability (RMSSD, ms) of the night ending on ``calendarDate``: the day's Daily
    ``avg_hrv_rmssd`` (``lastNightAvg``) and 5-minute ``hrv_samples_rmssd`` (``hrvValues``). Garmin's summary names
    no sleep (its ``summaryId`` is its own), so it joins the Daily of its calendar day; ``lastNight5MinHigh`` has
    no Terra field."""
    _require(doc, "startTimeInSeconds")
    offset = _offset(doc)
    return {
        "metadata": _day_metadata(doc),
        "heart_rate_data": {
            "summary": {"avg_hrv_rmssd": _measured(doc.get("lastNightAvg"))},
            "detailed": {"hrv_samples_rmssd": _offset_samples(doc, "hrvValues", "hrv_rmssd", offset, skip_zero=True)},
        },
    }


SNAPSHOT_SERIES = {  # healthSnapshot summaryType → (Terra Daily sample list path, value name); respiration has no
    # Daily field. SDRR (SD of R-R intervals over the 2 minutes) is Terra's SDNN.
    "heart_rate": (("heart_rate_data", "detailed", "hr_samples"), "bpm"),
    "stress": (("stress_data", "samples"), "level"),
    "spo2": (("oxygen_data", "saturation_samples"), "percentage"),
    "rmssd_hrv": (("heart_rate_data", "detailed", "hrv_samples_rmssd"), "hrv_rmssd"),
    "sdrr_hrv": (("heart_rate_data", "detailed", "hrv_samples_sdnn"), "hrv_sdnn"),
}


@PROVIDER.kind("healthSnapshot", "daily")
def health_snapshot(doc: dict[str, Any]) -> dict[str, Any]:
    """A 2-minute Health Snapshot: heart rate, stress, SpO2, RMSSD and SDRR readings as samples of the day's Daily
    (each series' ``epochSummaries`` ``{"<seconds from start>": value}``; a series without them is its
    ``avgValue`` at the start). Respiration has no Daily field in Terra's model."""
    _require(doc, "startTimeInSeconds")
    offset = _offset(doc)
    record: dict[str, Any] = {"metadata": _day_metadata(doc)}
    for series in doc.get("summaries") or []:
        target = SNAPSHOT_SERIES.get(str(series.get("summaryType") or "").lower())
        if target is None:
            continue
        (*parents, leaf), name = target
        values = series.get("epochSummaries") or {"0": series.get("avgValue")}
        # stress levels below 0 are codes, every other reading ≤ 0 is no reading (module docstring)
        samples = _offset_samples(dict(doc, values=values), "values", name, offset,
                                  skip_negative=name == "level", skip_zero=name != "level")
        if name == "percentage":
            samples = [dict(sample, type=0) for sample in samples]
        holder = record
        for key in parents:
            holder = holder.setdefault(key, {})
        holder[leaf] = samples
    return record


@PROVIDER.kind("userMetrics", "daily")
def user_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """VO2 max for a calendar day."""
    _require(doc, "calendarDate")
    start, end = day_bounds(doc["calendarDate"], offset_tz(0))
    return {
        "metadata": {"start_time": start[:26], "end_time": end[:26], "upload_type": UPLOAD_AUTOMATIC,
                     "timestamp_localization": LOCAL},
        "oxygen_data": {"vo2max_ml_per_min_per_kg": _measured(doc.get("vo2Max"))},
    }


@PROVIDER.kind("mct", "menstruation")
def menstrual_cycle(doc: dict[str, Any]) -> Fragment:
    """Menstrual cycle state; every edit gets a new summaryId, so it is keyed on periodStartDate."""
    _require(doc, "periodStartDate")
    # Garmin gives the cycle's local date only: emit local midnight without an offset (localization 1).
    start, end = (t[:26] for t in day_bounds(doc["periodStartDate"], offset_tz(0)))
    updated = doc.get("lastUpdatedTimeInSeconds")
    record = {
        "metadata": {"start_time": start, "end_time": end, "timestamp_localization": LOCAL},
        "menstruation_data": {
            "period_start_date": doc["periodStartDate"],
            "period_length_days": doc.get("periodLength"),
            # Terra's SDK (terra-python 1.1.0) types these two as strings.
            "cycle_length_days": str(doc["cycleLength"]) if doc.get("cycleLength") is not None else None,
            "predicted_cycle_length_days": doc.get("predictedCycleLength"),
            "is_predicted_cycle": str(doc["isPredictedCycle"]).lower() if doc.get("isPredictedCycle") is not None
            else None,
            "day_in_cycle": doc.get("dayInCycle"),
            "current_phase": MCT_PHASE.get((doc.get("currentPhaseType") or "").upper(), 0),
            "length_of_current_phase_days": doc.get("lengthOfCurrentPhase"),
            "days_until_next_phase": doc.get("daysUntilNextPhase"),
            "last_updated_time": unix_ts(updated) if updated is not None else None,
        },
    }
    return Fragment("menstruation", record, version_ms=int(updated * 1000) if updated is not None else None)


def _not_mapped(doc: dict[str, Any]) -> list[Fragment]:
    """Nothing: healthflow knowingly does not map this kind (its docstring says why)."""
    return []


PROVIDER.kind("skinTemp", doc=(
    "Skin-temperature deviation (°C) from the user's baseline over a sleep window: not mapped (acknowledged, counted "
    "as ignored). Terra's Sleep.temperature_data.delta would hold it, but Garmin's summary names no sleep; Daily and "
    "Body temperature samples are absolute temperatures, not deviations."))(_not_mapped)
PROVIDER.kind("allDayRespiration", doc=(
    "All-day breathing rate (breaths/min per minute offset, ``timeOffsetEpochToBreaths``): not mapped (acknowledged, "
    "counted as ignored). Terra's Daily has no respiration field (breaths are Sleep and Activity data)."))(_not_mapped)
PROVIDER.kind("moveIQActivities", doc=(
    "Move IQ auto-detected activity (type, start, duration only): not mapped (acknowledged, counted as ignored). It is "
    "no recorded activity (no distance, calories or heart rate), and its steps and calories are already in the day's "
    "epochs and daily summary."))(_not_mapped)


__all__ = ["PROVIDER", "format_ts"]
