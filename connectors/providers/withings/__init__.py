"""Withings Public API responses (``{"status": 0, "body": {...}}``), one API response (page) per raw payload.

Raw kinds, named after the service and action that produced the response:

- ``getmeas`` (``/measure?action=getmeas``): ``body.measuregrps`` → Body, one record per local day.
- ``sleep_getsummary`` (``/v2/sleep?action=getsummary``): ``body.series`` → Sleep, ``id`` as summary id.
- ``sleep_get`` (``/v2/sleep?action=get``, high frequency): ``body.series`` segments → the hypnogram and HR, RR,
  HRV and snoring samples of one Sleep. The segments name neither their sleep nor a time zone, so the collector
  requests them for one summary's ``startdate``-``enddate`` and attaches that ``getsummary`` series entry under
  ``summary`` (top level, beside ``status`` and ``body``; the poll hook in ``client.py`` does this); the result is
  that summary's record plus the samples.
- ``getworkouts`` (``/v2/measure?action=getworkouts``): ``body.series`` → Activity, ``id`` as summary id.
- ``getactivity`` (``/v2/measure?action=getactivity``): ``body.activities`` → Daily, one record per ``date``.

Accepted forms, every kind: the API response ``{"status": 0, "body": {...}}`` (one page; ``more``/``offset``
paging), its ``body`` alone (clients such as python_withings_api keep only that), and for getworkouts,
sleep_getsummary and getactivity one entry alone or a bare JSON array of entries (getactivity then cannot choose
between a date's rows: each row is its own record, the newest ``modified`` winning when they merge). getmeas also
accepts a body without ``timezone`` when every group names its own, and one measure group alone when it names its
``timezone`` (without one it is refused: its zone would be ``body.timezone``). A notification callback (``userid``,
``appli``, ``startdate``, ``enddate``: the webhook route polls the kinds its appli names) and a non-zero ``status``
are refused.

Envelope: the documents sit under ``body`` (``measuregrps``, ``series``, ``activities``), not in a top-level list,
and the ``status`` beside them decides whether there are documents at all. ``envelope`` therefore names a field
Withings never sends, so each mapper receives the whole response, raises MappingError (with the status code) when
``status`` is not 0, and returns one Fragment per record; one unmappable entry dead-letters its page.

User: Withings responses do not name the user: the raw event carries the Withings ``userid`` (``user_field`` None).

Zero means absent (Withings writes 0 where a device did not measure), per field:

- heart rate (workout and daily ``hr_average/hr_min/hr_max``, sleep ``hr_*``, high-frequency ``hr`` samples, getmeas
  heart pulse 11), breathing rate (``rr_*``, ``rr`` samples), HRV (``rmssd``, ``sdnn_1``), SpO2 (``spo2_average``,
  getmeas 54) and body weight/height: 0 is "not measured" (no living user has it) → absent.
- getmeas body composition, fat ratio 6, fat mass 8, fat-free mass 5, muscle 76, hydration 77, bone 88: 0 is "not
  measured" → absent. Withings writes fat ratio 0 and fat mass 0 into manual weigh-ins (attrib 2, fm 128) and into
  readings of scales that measured weight only; nobody has 0 % body fat.
- ``hr_zone_0..3``: all four 0 means no heart rate was recorded → no zones; when any zone has time, a 0 zone is a
  real 0 s and stays.
- workout ``distance, steps, pool_laps, strokes, pool_length, manual_*``, ``elevation``: 0 for what does not apply
  (a yoga session's distance, a run's laps) → absent.
- getactivity ``soft/moderate/intense/active``: all 0 on a day with steps means the source (a phone, brand 18) does
  not classify intensity → absent; daily ``steps, distance, elevation`` 0 is a real still day and stays.
- snoring 0 s, wake-up count 0, sleep latency 0 are real values and stay.

Unknown codes never refuse a record: an unknown sleep state is SleepLevel UNKNOWN, an unknown workout category
ActivityType OTHER, an unknown measure type is skipped.

Time: unix seconds, shown in the IANA ``timezone`` of each entry (getmeas: the group's documented
``measuregrps[].timezone`` when present, as a weigh-in abroad is dated where it happened, else the response's
``body.timezone``), at the offset that zone has at that instant (zoneinfo: a night across a DST change starts and
ends at different offsets). Day-scoped records run from local midnight to the next local midnight of their day (23 or
25 hours on DST days).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.base import Fragment, MappingError, Provider, compact
from connectors.providers.withings.activity_types import terra_activity_type
from connectors.timeutil import format_ts

WHOLE_RESPONSE = "(whole response)"  # a field Withings never sends: every mapper gets the whole response

PROVIDER = Provider(
    "withings",
    "WITHINGS",
    envelope=WHOLE_RESPONSE,
    user_field=None,
    doc="Withings Public API responses: measures, sleep summaries and stages, workouts, daily activity",
)

LOCAL_TIME = 1  # Terra TimestampLocalization
UPLOAD_AUTOMATIC, UPLOAD_MANUAL = 1, 2  # Terra UploadType
SLEEP_UPLOAD_AUTOMATIC = 2  # Terra SleepUploadType (MANUAL/AUTOMATIC are swapped relative to UploadType)
# Withings sleep state → Terra SleepLevel: 0 awake, 1 light, 2 deep, 3 REM; 4 "manual" (asleep, no stage) → 2 sleeping,
# 5 unspecified → 0 unknown, 15 out of bed → 3. Any other state is UNKNOWN: an unknown code never refuses a night.
SLEEP_LEVEL_BY_STATE = {0: 1, 1: 4, 2: 5, 3: 6, 4: 2, 5: 0, 15: 3}
SLEEP_LEVEL_UNKNOWN = 0
REAL_MEASURES = 1  # getmeas category: 1 real measures, 2 user objectives
AMBIGUOUS = 1  # getmeas attrib: captured by a device but may belong to another user until the user assigns it
MANUAL_ATTRIBS = {2, 4}  # entered manually (4: at account creation)
WITHINGS_BRAND = 1  # getactivity brand: 1 Withings device, 18 external source (e.g. a phone's health app)

# getmeas measure types healthflow maps (value × 10^unit is in the unit shown)
WEIGHT_KG, HEIGHT_M, FAT_FREE_MASS_KG, FAT_RATIO_PCT, FAT_MASS_KG = 1, 4, 5, 6, 8
DIASTOLIC_MMHG, SYSTOLIC_MMHG, HEART_PULSE_BPM, TEMPERATURE_C, SPO2_PCT = 9, 10, 11, 12, 54
BODY_TEMPERATURE_C, SKIN_TEMPERATURE_C, MUSCLE_MASS_KG, HYDRATION_KG, BONE_MASS_KG = 71, 73, 76, 77, 88
PULSE_WAVE_VELOCITY_MS, VO2MAX, BMR_KCAL = 91, 123, 226
# a 0 of these is a failed reading or nothing measured (a manual weigh-in's fat ratio and fat mass), not a value
NEVER_ZERO = frozenset({WEIGHT_KG, HEIGHT_M, HEART_PULSE_BPM, SPO2_PCT, PULSE_WAVE_VELOCITY_MS, VO2MAX, BMR_KCAL,
                        FAT_FREE_MASS_KG, FAT_RATIO_PCT, FAT_MASS_KG, MUSCLE_MASS_KG, HYDRATION_KG, BONE_MASS_KG})


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def _require(doc: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if doc.get(n) is None]
    if missing:
        raise MappingError(f"missing required field(s): {', '.join(missing)}")


def _response(payload: dict[str, Any], list_key: str,
              entry_fields: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``body`` and its ``list_key`` entries, from the API response (``{"status": 0, "body": {...}}``), its ``body``
    alone, or one entry alone (an object with every ``entry_fields``; ``body`` is then empty). A non-zero
    ``status`` is an error response, and a notification callback names data to poll: neither is data."""
    if "status" not in payload:
        if "appli" in payload and "userid" in payload:
            raise MappingError(f"a Withings notification (appli {payload['appli']}), not data: poll the kinds "
                               f"it names for startdate {payload.get('startdate')!r} to enddate "
                               f"{payload.get('enddate')!r}")
        if list_key in payload:
            payload = {"status": 0, "body": payload}
        elif entry_fields and all(name in payload for name in entry_fields):
            return {}, [payload]
        else:
            raise MappingError(f'not a Withings response of this kind: expected {{"status": 0, "body": '
                               f'{{"{list_key}": [...]}}}}, its body, or one entry with {", ".join(entry_fields)}'
                               if entry_fields else f'not a Withings response of this kind: expected {{"status": 0, '
                               f'"body": {{"{list_key}": [...]}}}} or its body')
    status = payload["status"]
    if status != 0:
        detail = payload.get("error") or "error response"
        raise MappingError(f"Withings API status {status}: {detail}")
    body = payload.get("body")
    if not isinstance(body, dict):
        raise MappingError(f"Withings body must be an object, got {type(body).__name__}")
    if list_key not in body:
        raise MappingError(f"Withings body has no {list_key!r}: not a response of this kind")
    entries = body[list_key]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise MappingError(f"body.{list_key} must be a list of objects")
    return body, entries


def _zone(name: Any, where: str = "timezone") -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise MappingError(f"{where} must be an IANA time zone name, got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise MappingError(f"{where} {name!r} is not a known IANA time zone") from exc


def _at(seconds: Any, zone: ZoneInfo, name: str) -> datetime:
    """Unix seconds shown in ``zone`` (with the offset the zone has at that instant)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise MappingError(f"{name} must be unix seconds, got {seconds!r}")
    return datetime.fromtimestamp(seconds, tz=zone)


def _span(entry: dict[str, Any], zone: ZoneInfo) -> tuple[datetime, datetime]:
    start, end = _at(entry["startdate"], zone, "startdate"), _at(entry["enddate"], zone, "enddate")
    if end < start:
        raise MappingError(f"enddate {entry['enddate']} is before startdate {entry['startdate']}")
    return start, end


def _day_window(day: date, zone: ZoneInfo) -> dict[str, Any]:
    """Local midnight to the next local midnight of ``day`` in ``zone``."""
    start = datetime.combine(day, time(), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(), tzinfo=zone)
    return {"start_time": format_ts(start), "end_time": format_ts(end), "timestamp_localization": LOCAL_TIME}


def _version_ms(*entries: dict[str, Any]) -> int | None:
    """Newest ``modified`` (unix seconds) in epoch ms: newest wins when fragments merge."""
    stamps = [e["modified"] for e in entries if isinstance(e.get("modified"), int | float)]
    return int(max(stamps) * 1000) if stamps else None


def _int(value: Any) -> int | None:
    """Terra's long fields (calories, distance, steps) reject fractions: round to the nearest integer."""
    return None if value is None else round(value)


def _positive(value: Any) -> Any:
    """Withings writes 0 for what was not measured or does not apply (heart rate without a sensor, pool laps of a
    run): absent, not zero."""
    return value if value else None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins on conflicting leaves."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _zone_durations(data: dict[str, Any]) -> list[dict[str, Any]]:
    """``hr_zone_0`` … ``hr_zone_3`` (seconds; light, moderate, intense, peak) → Terra zones 0-3; none when all are 0
    (no heart rate was recorded)."""
    zones = [{"zone": index, "duration_seconds": data[f"hr_zone_{index}"]}
             for index in range(4) if data.get(f"hr_zone_{index}") is not None]
    return zones if any(zone["duration_seconds"] for zone in zones) else []


def _heart_rate_summary(data: dict[str, Any]) -> dict[str, Any]:
    """``hr_average/min/max`` and the zones, 0 bpm being "not measured"."""
    return {"avg_hr_bpm": _positive(data.get("hr_average")), "min_hr_bpm": _positive(data.get("hr_min")),
            "max_hr_bpm": _positive(data.get("hr_max")), "hr_zone_data": _zone_durations(data)}


# ----------------------------------------------------------------------------------------------------------------------
# getmeas → Body
# ----------------------------------------------------------------------------------------------------------------------
MAX_UNIT_EXPONENT = 30  # Withings units are powers of ten around -3..3: beyond ±30 a value is not a measurement


def _value(measure: dict[str, Any], shift: int = 0) -> int | float:
    """``value × 10^(unit + shift)``, rounded to the decimals the exponent implies (no float noise)."""
    value, unit = measure.get("value"), measure.get("unit")
    for name, number in (("value", value), ("unit", unit)):
        if isinstance(number, bool) or not isinstance(number, int):
            raise MappingError(f"measure {name} must be an integer, got {number!r}")
    exponent = unit + shift
    if not -MAX_UNIT_EXPONENT <= exponent <= MAX_UNIT_EXPONENT:  # 10**huge would compute for ever
        raise MappingError(f"measure unit {unit} is out of range (a power of ten within ±{MAX_UNIT_EXPONENT})")
    return value * 10**exponent if exponent >= 0 else round(value * 10.0**exponent, -exponent)


@PROVIDER.kind("getmeas", "body")
def getmeas(payload: dict[str, Any]) -> list[Fragment]:
    """Measure groups → one Body per local day of their ``date``, in the group's ``timezone`` when it names one,
    else in ``body.timezone``.

    Terra's Body has no per-measurement id, so ``grpid`` cannot travel: a group becomes samples at its ``date``, and
    a re-sent group (same grpid, same date) replaces its samples by time when records merge. Groups measured at the
    same instant in the same zone (a scale's composition and its heart/PWV group) combine into one sample. User
    objectives (category 2) and ambiguous groups (attrib 1, not yet assigned to this user) are skipped. Unmapped
    types: fat mass (8; Terra has only the fat ratio), AFib/ECG results (130-139), vascular age, visceral fat,
    segmental and other codes.
    """
    if "grpid" in payload and "measures" in payload:
        if payload.get("timezone") is None:
            raise MappingError("a measure group alone names no time zone: send the getmeas response or its body "
                               "(timezone beside measuregrps), or a group with its own timezone")
        payload = {"status": 0, "body": {"measuregrps": [payload]}}
    body, groups = _response(payload, "measuregrps")
    real = [g for g in groups if g.get("category", REAL_MEASURES) == REAL_MEASURES and g.get("attrib") != AMBIGUOUS]
    by_instant: dict[tuple[int, str], list[dict[str, Any]]] = {}
    zones: dict[str, ZoneInfo] = {}
    for group in real:
        _require(group, "grpid", "date", "measures")
        zone_name = group.get("timezone") or body.get("timezone")
        if zone_name is None:
            raise MappingError(f"measure group {group['grpid']} has no timezone and body.timezone is missing: "
                               "send the getmeas response as Withings returns it")
        where = "measuregrps[].timezone" if group.get("timezone") else "body.timezone"
        zones.setdefault(zone_name, _zone(zone_name, where))
        _at(group["date"], zones[zone_name], "measuregrps[].date")
        by_instant.setdefault((group["date"], zone_name), []).append(group)
    fragments = []
    for (instant, zone_name), same_time in sorted(by_instant.items()):
        measures: dict[int, dict[str, Any]] = {}
        for group in sorted(same_time, key=lambda g: g.get("modified") or 0):
            if not isinstance(group["measures"], list):
                raise MappingError(f"measure group {group['grpid']}: measures must be a list")
            measures.update({m.get("type"): m for m in group["measures"]})
        zone = zones[zone_name]
        record = _body_record(_at(instant, zone, "date"), measures, zone)
        if record is not None:
            fragments.append(Fragment("body", record, version_ms=_version_ms(*same_time)))
    return fragments


def _body_record(at: datetime, measures: dict[int, dict[str, Any]], zone: ZoneInfo) -> dict[str, Any] | None:
    def get(kind: int, shift: int = 0) -> Any:
        value = _value(measures[kind], shift) if kind in measures else None
        return None if value == 0 and kind in NEVER_ZERO else value

    stamp = format_ts(at)
    weight, hydration = get(WEIGHT_KG), get(HYDRATION_KG)
    measurement = compact({
        "weight_kg": weight,
        "height_cm": get(HEIGHT_M, 2),
        "bodyfat_percentage": get(FAT_RATIO_PCT),
        "lean_mass_g": get(FAT_FREE_MASS_KG, 3),
        "muscle_mass_g": get(MUSCLE_MASS_KG, 3),
        "bone_mass_g": get(BONE_MASS_KG, 3),
        # Withings "hydration" is body water in kg; Terra wants its share of the weight measured with it.
        "water_percentage": round(100 * hydration / weight, 2) if hydration is not None and weight else None,
        "BMR": get(BMR_KCAL),
    })
    systolic, diastolic = get(SYSTOLIC_MMHG), get(DIASTOLIC_MMHG)
    pulse, pwv, spo2, vo2max = get(HEART_PULSE_BPM), get(PULSE_WAVE_VELOCITY_MS), get(SPO2_PCT), get(VO2MAX)
    body_temperature = get(BODY_TEMPERATURE_C) if BODY_TEMPERATURE_C in measures else get(TEMPERATURE_C)
    skin_temperature = get(SKIN_TEMPERATURE_C)
    record = compact({
        "measurements_data": {"measurements": [dict(measurement, measurement_time=stamp)] if measurement else []},
        "blood_pressure_data": {"blood_pressure_samples": [
            {"timestamp": stamp, "systolic_bp": systolic, "diastolic_bp": diastolic}]
            if systolic is not None or diastolic is not None else []},
        "heart_data": {
            "heart_rate_data": {"detailed": {"hr_samples": [{"timestamp": stamp, "bpm": pulse}]
                                             if pulse is not None else []}},
            "pulse_wave_velocity_samples": [{"timestamp": stamp, "pulse_wave_velocity_meters_per_second": pwv}]
            if pwv is not None else [],
        },
        "temperature_data": {
            "body_temperature_samples": [{"timestamp": stamp, "temperature_celsius": body_temperature}]
            if body_temperature is not None else [],
            "skin_temperature_samples": [{"timestamp": stamp, "temperature_celsius": skin_temperature}]
            if skin_temperature is not None else [],
        },
        "oxygen_data": {
            "saturation_samples": [{"timestamp": stamp, "percentage": spo2, "type": 0}] if spo2 is not None else [],
            "vo2max_ml_per_min_per_kg": vo2max,
            "vo2_samples": [{"timestamp": stamp, "vo2max_ml_per_min_per_kg": vo2max}] if vo2max is not None else [],
        },
        "hydration_data": {"hydration_amount_samples": [{"timestamp": stamp, "hydration_kg": hydration}]
                           if hydration is not None else []},
    })
    if not record:
        return None  # only types Terra has no field for
    return {"metadata": _day_window(at.date(), zone), **record}


# ----------------------------------------------------------------------------------------------------------------------
# sleep getsummary / get → Sleep
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("sleep_getsummary", "sleep")
def sleep_getsummary(payload: dict[str, Any]) -> list[Fragment]:
    """Sleep summaries: stage totals, latencies, wake-ups, efficiency, HR and breathing rates, snoring, sleep score."""
    _, series = _response(payload, "series", ("id", "startdate", "enddate", "data"))
    return [Fragment("sleep", _summary_record(entry), version_ms=_version_ms(entry)) for entry in series]


def _summary_record(entry: dict[str, Any]) -> dict[str, Any]:
    _require(entry, "id", "startdate", "enddate", "timezone")
    zone = _zone(entry["timezone"])
    start, end = _span(entry, zone)
    data = entry.get("data") or {}
    light, deep, rem = (data.get(n) for n in ("lightsleepduration", "deepsleepduration", "remsleepduration"))
    asleep = data.get("total_sleep_time")
    if asleep is None:  # asleepduration: nights from external sources, without stages
        asleep = data.get("asleepduration") if None in (light, deep, rem) else light + deep + rem
    efficiency = data.get("sleep_efficiency")  # a ratio; Terra's is a percentage
    rates = {k: _positive(data.get(f"rr_{k}")) for k in ("average", "min", "max")}
    window = {"start_time": format_ts(start), "end_time": format_ts(end)}
    return compact({
        "metadata": {
            "summary_id": str(entry["id"]),
            **window,
            "upload_type": SLEEP_UPLOAD_AUTOMATIC,
            "timestamp_localization": LOCAL_TIME,
        },
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": asleep,
                "duration_light_sleep_state_seconds": light,
                "duration_deep_sleep_state_seconds": deep,
                "duration_REM_sleep_state_seconds": rem,
                "num_REM_events": data.get("nb_rem_episodes"),
            },
            "awake": {
                "duration_awake_state_seconds": data.get("wakeupduration"),
                "num_wakeup_events": data.get("wakeupcount"),
                "num_out_of_bed_events": data.get("out_of_bed_count"),
                "sleep_latency_seconds": data.get("sleep_latency", data.get("durationtosleep")),
                "wake_up_latency_seconds": data.get("wakeup_latency", data.get("durationtowakeup")),
            },
            "other": {"duration_in_bed_seconds": data.get("total_timeinbed")},
            "sleep_efficiency": round(100 * efficiency, 2) if efficiency is not None else None,
        },
        "heart_rate_data": {"summary": {"avg_hr_bpm": _positive(data.get("hr_average")),
                                        "min_hr_bpm": _positive(data.get("hr_min")),
                                        "max_hr_bpm": _positive(data.get("hr_max"))}},
        "respiration_data": {
            "breaths_data": {**window, "avg_breaths_per_min": rates["average"], "min_breaths_per_min": rates["min"],
                             "max_breaths_per_min": rates["max"]} if any(v is not None for v in rates.values())
            else None,
            "snoring_data": {**window, "total_snoring_duration_seconds": data.get("snoring"),
                             "num_snoring_events": data.get("snoringepisodecount")}
            if data.get("snoring") is not None or data.get("snoringepisodecount") is not None else None,
        },
        "scores": {"sleep_score": data.get("sleep_score")},
    })


def _timed(maps: Iterable[Any], zone: ZoneInfo, name: str) -> list[tuple[datetime, Any]]:
    """Per-segment ``{"<unix seconds>": value}`` maps → time-ordered ``(moment, value)``, nulls skipped."""
    series: dict[int, Any] = {}
    for values in maps:
        if values is None:
            continue
        if not isinstance(values, dict):
            raise MappingError(f"series[].{name} must be an object keyed by unix seconds")
        for key, value in values.items():
            try:
                series[int(key)] = value
            except ValueError as exc:
                raise MappingError(f"series[].{name} key {key!r} is not unix seconds") from exc
    return [(_at(second, zone, name), value) for second, value in sorted(series.items()) if value is not None]


@PROVIDER.kind("sleep_get", "sleep", context=("summary",))
def sleep_get(payload: dict[str, Any]) -> Fragment:
    """High-frequency sleep data of one night (see the module docstring: needs its summary under ``summary``).

    Segments become hypnogram samples at their start (a gap between segments is UNKNOWN from the earlier one's end);
    ``hr``, ``rr``, ``rmssd``, ``sdnn_1`` and ``snoring`` maps become samples.
    """
    _, segments = _response(payload, "series")
    summary = payload.get("summary")
    if not isinstance(summary, dict):
        span = (f" (segments {min(s.get('startdate') or 0 for s in segments)}-"
                f"{max(s.get('enddate') or 0 for s in segments)})") if segments else ""
        raise MappingError("sleep_get needs its sleep: the segments name neither sleep id nor time zone; attach the "
                           "/v2/sleep?action=getsummary series entry (id, timezone, startdate, enddate) whose night "
                           f"they fall in{span} under a top-level 'summary', beside 'body' (the Withings poll hook "
                           "does)")
    if "series" in summary or "body" in summary:
        raise MappingError("sleep_get 'summary' must be one getsummary series entry (id, timezone, startdate, "
                           "enddate), not a getsummary response or body")
    record = _summary_record(summary)
    zone = _zone(summary["timezone"])
    begin, finish = summary["startdate"], summary["enddate"]
    night = []
    for segment in segments:
        _require(segment, "startdate", "enddate", "state")
        if segment["startdate"] < finish and segment["enddate"] > begin:
            night.append(segment)
    if segments and not night:
        raise MappingError(f"no segment falls within sleep {summary['id']} ({begin}-{finish}): "
                           "the attached summary is not the night these segments were requested for")
    night.sort(key=lambda s: s["startdate"])
    hypnogram: list[dict[str, Any]] = []
    for index, segment in enumerate(night):
        state = segment["state"]
        level = SLEEP_LEVEL_UNKNOWN if isinstance(state, bool) else SLEEP_LEVEL_BY_STATE.get(state, SLEEP_LEVEL_UNKNOWN)
        if index and segment["startdate"] > night[index - 1]["enddate"]:
            hypnogram.append({"timestamp": format_ts(_at(night[index - 1]["enddate"], zone, "enddate")), "level": 0})
        hypnogram.append({"timestamp": format_ts(_at(segment["startdate"], zone, "startdate")),
                          "level": level})

    def samples(field: str, value_name: str) -> list[dict[str, Any]]:
        return [{"timestamp": format_ts(at), value_name: value}
                for at, value in _timed((s.get(field) for s in night), zone, field)
                if value != 0 or field == "snoring"]  # 0 bpm / breaths / ms: not measured; 0 s of snoring is real

    breaths, snoring = samples("rr", "breaths_per_min"), samples("snoring", "duration_seconds")
    window = {"start_time": record["metadata"]["start_time"], "end_time": record["metadata"]["end_time"]}
    detailed = compact({
        "sleep_durations_data": {"hypnogram_samples": hypnogram},
        "heart_rate_data": {"detailed": {"hr_samples": samples("hr", "bpm"),
                                         "hrv_samples_rmssd": samples("rmssd", "hrv_rmssd"),
                                         "hrv_samples_sdnn": samples("sdnn_1", "hrv_sdnn")}},
        "respiration_data": {
            "breaths_data": dict(window, samples=breaths) if breaths else None,
            "snoring_data": dict(window, samples=snoring) if snoring else None,
        },
    })
    return Fragment("sleep", _merge(record, detailed), version_ms=_version_ms(summary))


# ----------------------------------------------------------------------------------------------------------------------
# getworkouts → Activity
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("getworkouts", "activity")
def getworkouts(payload: dict[str, Any]) -> list[Fragment]:
    """Workouts: category, times in their time zone, active kcal, distance, steps, floors, HR and zones, pool data.

    Withings' workout ``calories`` are active calories (Terra ``net_activity_calories``); no total is given.
    ``data.elevation`` is floors climbed (the data API's definition, as in getactivity), not metres.
    """
    _, series = _response(payload, "series", ("id", "category", "startdate", "enddate"))
    return [Fragment("activity", _workout(entry), version_ms=_version_ms(entry)) for entry in series]


def _workout(entry: dict[str, Any]) -> dict[str, Any]:
    _require(entry, "id", "startdate", "enddate", "timezone")
    zone = _zone(entry["timezone"])
    start, end = _span(entry, zone)
    data = entry.get("data") or {}
    activity_type, label = terra_activity_type(entry.get("category"))
    calories = data.get("calories") if data.get("calories") is not None else _positive(data.get("manual_calories"))
    distance = data.get("distance") if data.get("distance") is not None else _positive(data.get("manual_distance"))
    return compact({
        "metadata": {
            "summary_id": str(entry["id"]),
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "type": activity_type,
            "upload_type": UPLOAD_MANUAL if entry.get("attrib") in MANUAL_ATTRIBS else UPLOAD_AUTOMATIC,
            "name": label,
            "timestamp_localization": LOCAL_TIME,
        },
        "calories_data": {"net_activity_calories": _int(calories)},
        "distance_data": {"summary": {
            "distance_meters": _int(_positive(distance)),
            "steps": _int(_positive(data.get("steps"))),
            "floors_climbed": _int(_positive(data.get("elevation"))),  # floors, as getactivity's elevation
            "swimming": {"num_laps": _positive(data.get("pool_laps")), "num_strokes": _positive(data.get("strokes")),
                         "pool_length_meters": _positive(data.get("pool_length"))},
        }},
        "heart_rate_data": {"summary": _heart_rate_summary(data)},
        "oxygen_data": {"avg_saturation_percentage": _positive(data.get("spo2_average"))},
        "active_durations_data": {"activity_seconds": _active_seconds(entry, data)},
        "device_data": {"manufacturer": "Withings"},
    })


def _active_seconds(entry: dict[str, Any], data: dict[str, Any]) -> int | float:
    """``effduration`` when sent, else the workout's span minus ``pause_duration`` (the pauses the user entered)."""
    if data.get("effduration") is not None:
        return data["effduration"]
    return max(0, entry["enddate"] - entry["startdate"] - (data.get("pause_duration") or 0))


# ----------------------------------------------------------------------------------------------------------------------
# getactivity → Daily
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("getactivity", "daily")
def getactivity(payload: dict[str, Any]) -> list[Fragment]:
    """Daily activity: steps, distance, floors, active/total kcal, intensity durations, HR averages and zones.

    Withings may return several rows for one date (a Withings device and an external source such as a phone): Terra
    keys Daily by date alone and summing would count steps twice, so per date the page's row from a Withings device
    wins, then a tracker's, then the one with the most steps.
    """
    _, rows = _response(payload, "activities", ("date", "timezone"))
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        _require(row, "date", "timezone")
        best = chosen.get(row["date"])
        if best is None or _preference(row) > _preference(best):
            chosen[row["date"]] = row
    return [Fragment("daily", _activity_day(row), version_ms=_version_ms(row)) for _, row in sorted(chosen.items())]


def _preference(row: dict[str, Any]) -> tuple[bool, bool, float]:
    return row.get("brand", WITHINGS_BRAND) == WITHINGS_BRAND, bool(row.get("is_tracker")), row.get("steps") or 0


def _activity_day(row: dict[str, Any]) -> dict[str, Any]:
    try:
        day = date.fromisoformat(row["date"])
    except (TypeError, ValueError) as exc:
        raise MappingError(f"date must be YYYY-MM-DD, got {row['date']!r}") from exc
    zone = _zone(row["timezone"])
    active, total = row.get("calories"), row.get("totalcalories")
    soft, moderate, intense = row.get("soft"), row.get("moderate"), row.get("intense")
    active_seconds = row.get("active")
    if active_seconds is None and None not in (soft, moderate, intense):
        active_seconds = soft + moderate + intense
    if row.get("steps") and not any((soft, moderate, intense, active_seconds)):
        soft = moderate = intense = active_seconds = None  # steps without any active time: intensity not classified
    return compact({
        "metadata": {**_day_window(day, zone), "upload_type": UPLOAD_AUTOMATIC},
        "distance_data": {"steps": _int(row.get("steps")), "distance_meters": _int(row.get("distance")),
                          "floors_climbed": _int(row.get("elevation"))},
        "calories_data": {
            "total_burned_calories": _int(total),
            "net_activity_calories": _int(active),
            "BMR_calories": _int(total - active) if total is not None and active is not None else None,
        },
        "active_durations_data": {
            "activity_seconds": active_seconds,
            "low_intensity_seconds": soft,
            "moderate_intensity_seconds": moderate,
            "vigorous_intensity_seconds": intense,
        },
        "heart_rate_data": {"summary": _heart_rate_summary(row)},
    })
