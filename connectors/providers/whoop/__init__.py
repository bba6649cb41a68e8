"""WHOOP API v2 records (``{"records": [...], "next_token": ...}`` pages or single records).

Every record carries ``user_id``. Times are UTC (``...Z``) plus ``timezone_offset`` (``"+hh:mm"``,
``"-hh:mm"`` or ``"Z"``); healthflow shows every timestamp in that offset. Energy is kJ
(kcal = kJ / 4.184), durations ms. ``score`` is only meaningful when ``score_state`` is SCORED;
``updated_at`` becomes the fragment version.

Accepted forms: collection pages ``{"records": [...], "next_token"}``, single records (``GET /v2/.../{id}``), v1
records (integer ids, ``zone_duration``, a workout's ``sport_id`` without ``sport_name``: mapped through the "WHOOP
Sports" table of WHOOP's workout docs, an id not in it is OTHER); a recovery needs its sleep attached under ``sleep``
(the poll hook, ``client.WhoopPollHook``, does it). Deletion webhooks ``{user_id, id, type, trace_id}`` (raw kind
``deleted``) become ``Deletion``s keyed like the records: ``sleep.deleted`` → the Sleep ``id``, ``workout.deleted`` →
the Activity ``id``. ``recovery.deleted`` is no tombstone: it removes the recovery fields of a Sleep, not the Sleep.
The manifest fetches the sleep again; a sleep fetched by id comes with its cycle's recovery attached by the hook
(``_recovery``: the recovery, or null when the cycle has none left) and is the whole Sleep as WHOOP has it now: a
Fragment that ``replaces`` the stored Sleep (the deleted recovery's readiness, resting HR, HRV and SpO2 are cleared),
versioned by its arrival.

Day key of a cycle: WHOOP's physiological day (cycle) begins when the member falls asleep and ends when they next fall
asleep (support.whoop.com "WHOOP Cycles"); Terra's Daily is one calendar day. A cycle opened by an evening sleep
(23:30) covers the next day's waking hours, one opened after midnight (00:15) the same day's, so the cycle is the
Daily of the local date of ``start`` + 12 h: every sleep onset from local noon to the next noon keys the same day.
Keyed by the start's own date, those two cycles collided on one day and left the next empty. Only two main sleeps
begun within one noon-to-noon span (shift work) still share a day; the newer ``updated_at`` then wins.

Zero means absent: a heart rate (average, max, resting), HRV RMSSD, respiratory rate or SpO2 of 0 is no measurement
(WHOOP 3.0 straps measure no SpO2; an UNSCORABLE-like score can carry zeros) and is left out, as is a workout
``distance_meter`` / ``altitude_gain_meter`` of 0 (sports without GPS). Strain, kilojoules, stage durations and counts
are kept at 0: a rest day's strain or a night without REM is a real zero.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from connectors.base import Deletion, Fragment, MappingError, Provider, compact, timestamp_field
from connectors.providers.whoop.activity_types import terra_activity_type, whoop_sport_name
from connectors.timeutil import day_bounds, format_ts, parse_offset, to_ms

PROVIDER = Provider(
    "whoop",
    "WHOOP",
    envelope="records",
    user_field="user_id",
    doc="WHOOP API v2 cycles, sleeps, recoveries and workouts",
)

LOCAL = 1  # Terra TimestampLocalization: timestamps carry the user's offset
UPLOAD_AUTOMATIC = 1  # Terra UploadType
SLEEP_UPLOAD_AUTOMATIC = 2  # Terra SleepUploadType (MANUAL/AUTOMATIC are swapped relative to UploadType)
KJ_PER_KCAL = 4.184
SCORE_STATES = ("SCORED", "PENDING_SCORE", "UNSCORABLE")
HR_ZONE_FIELDS = ("zone_zero_milli", "zone_one_milli", "zone_two_milli", "zone_three_milli", "zone_four_milli",
                  "zone_five_milli")  # index = Terra zone number


def _require(doc: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if doc.get(n) is None]
    if missing:
        raise MappingError(f"missing required field(s): {', '.join(missing)}")


def _zone(doc: dict[str, Any]) -> timezone:
    """The user's UTC offset for this record; without it no local time or day can be derived."""
    text = doc.get("timezone_offset")
    if not isinstance(text, str):
        raise MappingError(f"timezone_offset must be '+hh:mm', '-hh:mm' or 'Z', got {text!r}")
    try:
        return parse_offset(text)
    except ValueError as exc:
        raise MappingError(f"timezone_offset: {exc}") from exc


def _instant(doc: dict[str, Any], name: str) -> datetime:
    return timestamp_field(doc, name)


def _span(doc: dict[str, Any]) -> tuple[datetime, datetime]:
    """``start`` and ``end`` shown in the record's ``timezone_offset``."""
    _require(doc, "start", "end")
    zone = _zone(doc)
    start, end = _instant(doc, "start").astimezone(zone), _instant(doc, "end").astimezone(zone)
    if end < start:
        raise MappingError(f"end {doc['end']} is before start {doc['start']}")
    return start, end


def _score(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``score`` object when SCORED; ``{}`` while PENDING_SCORE or when UNSCORABLE (times only)."""
    state = doc.get("score_state")
    if state not in SCORE_STATES:
        raise MappingError(f"unknown score_state {state!r}; expected one of {', '.join(SCORE_STATES)}")
    score = doc.get("score") if state == "SCORED" else None
    if score is not None and not isinstance(score, dict):
        raise MappingError(f"score must be an object, got {type(score).__name__}")
    return score or {}


def _version_ms(doc: dict[str, Any]) -> int | None:
    return to_ms(_instant(doc, "updated_at")) if doc.get("updated_at") is not None else None


def _kcal(kilojoules: float | None) -> int | None:
    """Terra calories are integer kcal."""
    return None if kilojoules is None else round(kilojoules / KJ_PER_KCAL)


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000


def _measured(value: float | None) -> float | None:
    """A physiological rate or percentage: 0 means WHOOP measured nothing (see the module docstring)."""
    return None if value == 0 else value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins on conflicting leaves."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


CYCLE_DAY_SHIFT = timedelta(hours=12)  # a cycle's start (falling asleep) + 12 h falls in the waking day it covers


@PROVIDER.kind("cycle", "daily")
def cycle(doc: dict[str, Any]) -> Fragment:
    """A physiological cycle (falling asleep to falling asleep) → the Daily of the local day it covers: the local date
    of ``start`` + 12 h (see the module docstring); the record's window is that day, midnight to midnight.

    The cycle is the whole Daily (``replaces``): a newer cycle of the same day (two sleeps starting within one
    noon-to-noon span) replaces it rather than mixing its fields with the other cycle's, and an older one fills
    nothing in."""
    _require(doc, "id", "start")
    zone = _zone(doc)
    day = (_instant(doc, "start").astimezone(zone) + CYCLE_DAY_SHIFT).date()
    day_start, day_end = day_bounds(day, zone)
    score = _score(doc)
    record = compact({
        "metadata": {"start_time": day_start, "end_time": day_end, "upload_type": UPLOAD_AUTOMATIC,
                     "timestamp_localization": LOCAL},
        "strain_data": {"strain_level": score.get("strain")},
        "calories_data": {"total_burned_calories": _kcal(score.get("kilojoule"))},
        "heart_rate_data": {"summary": {"avg_hr_bpm": _measured(score.get("average_heart_rate")),
                                        "max_hr_bpm": _measured(score.get("max_heart_rate"))}},
    })
    return Fragment("daily", record, version_ms=_version_ms(doc), replaces=True)


def _sleep_record(doc: dict[str, Any]) -> dict[str, Any]:
    _require(doc, "id")
    start, end = _span(doc)
    score = _score(doc)
    stages = score.get("stage_summary") or {}
    light, deep, rem = (stages.get(f"total_{n}_time_milli") for n in ("light_sleep", "slow_wave_sleep", "rem_sleep"))
    asleep = light + deep + rem if None not in (light, deep, rem) else None
    respiratory_rate = _measured(score.get("respiratory_rate"))
    return compact({
        "metadata": {
            "summary_id": str(doc["id"]),
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "upload_type": SLEEP_UPLOAD_AUTOMATIC,
            "is_nap": doc.get("nap"),
            "timestamp_localization": LOCAL,
        },
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": _seconds(asleep),
                "duration_light_sleep_state_seconds": _seconds(light),
                "duration_deep_sleep_state_seconds": _seconds(deep),  # WHOOP "slow wave sleep"
                "duration_REM_sleep_state_seconds": _seconds(rem),
            },
            "awake": {
                "duration_awake_state_seconds": _seconds(stages.get("total_awake_time_milli")),
                "num_wakeup_events": stages.get("disturbance_count"),
            },
            "other": {
                "duration_in_bed_seconds": _seconds(stages.get("total_in_bed_time_milli")),
                "duration_unmeasurable_sleep_seconds": _seconds(stages.get("total_no_data_time_milli")),
            },
            "sleep_efficiency": score.get("sleep_efficiency_percentage"),  # 0-100, Terra's scale
        },
        "respiration_data": {"breaths_data": {
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "avg_breaths_per_min": respiratory_rate,
        }} if respiratory_rate is not None else None,
        "scores": {"sleep_score": score.get("sleep_performance_percentage")},
    })


@PROVIDER.kind("sleep", "sleep")
def sleep(doc: dict[str, Any]) -> Fragment:
    """A sleep or nap: stage totals (no hypnogram in WHOOP's public API), efficiency, respiration, performance.

    With ``_recovery`` (a sleep fetched by id: its recovery, or null for none) it is the whole Sleep, which replaces
    the stored one, versioned by its arrival (see the module docstring)."""
    if "_recovery" not in doc:
        return Fragment("sleep", _sleep_record(doc), version_ms=_version_ms(doc))
    sleep_doc = {key: value for key, value in doc.items() if key != "_recovery"}
    found = doc["_recovery"]
    if found is None:
        return Fragment("sleep", _sleep_record(sleep_doc), replaces=True)
    if not isinstance(found, dict):
        raise MappingError(f"_recovery must be the sleep's recovery object or null, got {type(found).__name__}")
    return Fragment("sleep", recovery({**found, "sleep": sleep_doc}).data, replaces=True)


@PROVIDER.kind("recovery", "sleep", context=("sleep",))
def recovery(doc: dict[str, Any]) -> Fragment:
    """A recovery → completes the Sleep it was computed from (summary_id = ``sleep_id``).

    A recovery has no times of its own, yet a Sleep record must carry start, end and upload type
    to be valid. The document must therefore carry its sleep under ``sleep`` (the collector attaches
    ``GET /v2/activity/sleep/{sleep_id}``); the result is that sleep's record plus the recovery fields.
    Skin temperature (absolute degrees C) is not mapped: Terra's Sleep only has a deviation (delta).
    """
    _require(doc, "sleep_id")
    sleep_doc = doc.get("sleep")
    if not isinstance(sleep_doc, dict):
        why = f" ({doc['_sleep_missing']})" if doc.get("_sleep_missing") else ""
        raise MappingError(f"recovery for sleep {doc['sleep_id']} has no 'sleep' document{why}: a Sleep record needs "
                           "the sleep's start/end, which a recovery lacks; attach GET /v2/activity/sleep/{sleep_id}")
    if str(sleep_doc.get("id")) != str(doc["sleep_id"]):
        raise MappingError(f"attached sleep {sleep_doc.get('id')!r} is not this recovery's sleep {doc['sleep_id']!r}")
    if sleep_doc.get("user_id") is not None and str(sleep_doc["user_id"]) != str(doc.get("user_id")):
        raise MappingError(f"attached sleep belongs to user {sleep_doc['user_id']}, recovery to {doc.get('user_id')}")
    record = _sleep_record(sleep_doc)
    score = _score(doc)
    spo2 = _measured(score.get("spo2_percentage"))
    owned = compact({
        "readiness_data": {"readiness": round(score["recovery_score"]) if score.get("recovery_score") is not None
                           else None},
        "heart_rate_data": {"summary": {"resting_hr_bpm": _measured(score.get("resting_heart_rate")),
                                        "avg_hrv_rmssd": _measured(score.get("hrv_rmssd_milli"))}},  # already ms
        "respiration_data": {"oxygen_saturation_data": {
            "start_time": record["metadata"]["start_time"],
            "end_time": record["metadata"]["end_time"],
            "avg_saturation_percentage": spo2,
        }} if spo2 is not None else None,
    })
    versions = [v for v in (_version_ms(doc), _version_ms(sleep_doc)) if v is not None]
    return Fragment("sleep", _merge(record, owned), version_ms=max(versions) if versions else None)


@PROVIDER.kind("workout", "activity")
def workout(doc: dict[str, Any]) -> Fragment:
    """A workout: sport (v2 ``sport_name``, else v1 ``sport_id`` through WHOOP's documented sport list), strain,
    energy (kJ and kcal), HR summary and zones, distance and climb."""
    _require(doc, "id")
    start, end = _span(doc)
    score = _score(doc)
    zones = score.get("zone_durations") or score.get("zone_duration") or {}  # v2 / legacy v1 spelling
    kilojoules = score.get("kilojoule")
    distance = _measured(score.get("distance_meter"))
    sport = whoop_sport_name(doc.get("sport_name"), doc.get("sport_id"))
    record = compact({
        "metadata": {
            "summary_id": str(doc["id"]),
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "type": terra_activity_type(sport),
            "upload_type": UPLOAD_AUTOMATIC,
            "name": sport,
            "timestamp_localization": LOCAL,
        },
        "calories_data": {"total_burned_calories": _kcal(kilojoules)},
        "energy_data": {"energy_kilojoules": kilojoules},
        "strain_data": {"strain_level": score.get("strain")},
        "heart_rate_data": {"summary": {
            "avg_hr_bpm": _measured(score.get("average_heart_rate")),
            "max_hr_bpm": _measured(score.get("max_heart_rate")),
            "hr_zone_data": [{"zone": index, "duration_seconds": _seconds(zones[name])}
                             for index, name in enumerate(HR_ZONE_FIELDS) if zones.get(name) is not None],
        }},
        "distance_data": {"summary": {
            "distance_meters": round(distance) if distance is not None else None,  # Terra: integer meters
            "elevation": {"gain_actual_meters": _measured(score.get("altitude_gain_meter"))},
        }},
    })
    return Fragment("activity", record, version_ms=_version_ms(doc))


DELETED_MODEL_BY_TYPE = {"sleep.deleted": "sleep", "workout.deleted": "activity"}


@PROVIDER.kind("deleted", "activity", "sleep")
def deleted(doc: dict[str, Any]) -> Deletion:
    """A deletion webhook ``{user_id, id, type, trace_id}`` → the Deletion of the Sleep or Activity keyed by ``id``.

    Only v2 webhooks (UUID ids) name the records' keys; a v1 webhook's integer id is refused (set the webhook URL's
    model version to v2 at WHOOP). WHOOP webhooks carry no time, so the Deletion has no version.
    """
    _require(doc, "id", "type")
    model = DELETED_MODEL_BY_TYPE.get(str(doc["type"]))
    if model is None:
        raise MappingError(f"WHOOP webhook type {doc['type']!r} is not a deletion of a record; expected one of "
                           f"{', '.join(DELETED_MODEL_BY_TYPE)}")
    if isinstance(doc["id"], int) or str(doc["id"]).isdigit():
        raise MappingError(f"{doc['type']} webhook id {doc['id']!r} is a v1 integer id, but records are keyed by the "
                           "v2 UUID: configure the webhook URL for model version v2 at WHOOP")
    return Deletion(model, str(doc["id"]))
