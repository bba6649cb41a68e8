"""Polar AccessLink v3 responses (the non-transactional endpoints; physical info also in its legacy form).

Raw kinds, one AccessLink response body per raw payload (every list form, a bare array of documents, or one
document; documents in the current snake_case or the legacy transaction's kebab-case spelling):

- ``exercises``: ``GET /v3/exercises`` (a bare array), ``GET /v3/exercises/{id}?samples=true&zones=true&route=true``
  (the URL an EXERCISE webhook names), an object listing exercises under ``exercises``, or a legacy transaction's
  exercise (``start-time``, ``heart-rate``, …) → Activity.
- ``sleep``: ``GET /v3/users/sleep`` (``{"nights": [...]}``) or ``GET /v3/users/sleep/{date}`` (one night) → Sleep.
- ``nightly-recharge``: ``GET /v3/users/nightly-recharge`` (``{"recharges": [...]}``) or one date → Daily (HRV), and
  Sleep (recovery status, breathing, HRV) when the night is attached under ``sleep`` (the poll hook,
  ``connectors.providers.polar.client.PolarHook``, attaches it from ``GET /v3/users/sleep``).
- ``activities``: ``GET /v3/users/activities`` (a bare array), one day (``/v3/users/activities/{date}``,
  ``?steps=true&activity_zones=true``), or a legacy transaction's daily summary (``date``, ``calories``,
  ``active-calories``; its ``active-steps`` are Polar activity units, not steps, and are left out) → Daily.
- ``continuous-heart-rate``: ``GET /v3/users/continuous-heart-rate?from=&to=`` (``{"heart_rates": [...]}``, one
  document per day) or one day, ``GET /v3/users/continuous-heart-rate/{date}`` → Daily.
- ``physical-info``: ``GET /v3/users/physical-info`` (or a legacy transaction's physical-information) → Body.

Refused with what to fetch instead: a legacy transaction's list of links (``{"exercises": [url, …]}``,
``{"activity-log": [...]}``, ``{"physical-informations": [...]}``), a transaction just created (``transaction-id``,
``resource-uri``), the list of available nights (``available``) and a webhook notification (``event``, ``url``):
none holds data.

Envelope: Polar names its lists per endpoint (``nights``, ``recharges``, ``heart_rates``: the provider's
``list_fields``, which the framework splits into documents, so one bad night dead-letters only itself and each
night names its own user) and returns the exercise and activity lists as bare JSON arrays (split alike).
``envelope`` names a field Polar never sends; the mappers themselves read ``exercises`` / ``activity-log`` /
``physical-informations`` objects, to refuse a legacy transaction's list of links with what to fetch.

User: the id in ``polar_user`` (``https://www.polaraccesslink.com/v3/users/<id>``) when the document has it, else
the raw event's user id (daily activity and current physical info name no user, so their raw events must carry
it). Polar user ids are the webhooks' ``user_id``. ``user_field`` is ``polar_user`` so that a document carrying it
needs no raw-event user; the mappers replace that link with the id it ends in.

Zero means absent (Polar writes 0 where nothing was measured), per field:

- heart rate (exercise ``heart_rate.average/maximum`` and ``"0"`` samples, sleep ``heart_rate_samples``, continuous
  ``heart_rate``, physical-info ``resting_heart_rate/maximum_heart_rate``), HRV (``heart_rate_variability_avg``,
  ``hrv_samples``), breathing (``breathing_rate_avg``, ``breathing_samples``), ``vo2_max``, ``weight``, ``height``:
  0 → absent (no living user has it).
- exercise ``heart_rate_zones``: all ``in-zone`` PT0S means no heart rate was recorded → no zones; when any zone has
  time, a PT0S zone is a real 0 s and stays.
- exercise ``calories`` (Polar derives them from heart rate) and ``distance`` (an indoor session) 0 → absent.
- daily ``steps``, ``calories`` and durations, sleep stage totals and interruptions 0 are real values and stay.

Unknown codes never refuse a record: an unknown hypnogram code is SleepLevel UNKNOWN, an unknown activity zone
ActivityLevel UNKNOWN, an unknown sport ActivityType OTHER, an unknown sample-type is skipped, a
``nightly_recharge_status`` outside 1-6 is left out.

Time: exercises give local time without offset plus ``start_time_utc_offset`` in minutes; sleeps give ISO-8601 with
offset and ``"HH:MM"`` sample keys, placed at the first such clock time from an hour before ``sleep_start_time``
(so keys after midnight fall on the next day). A night whose ``sleep_end_time`` has another offset than its
``sleep_start_time`` crossed a DST change: the keys are wall-clock times, taken in the order Polar sends them; those
from the change on take the end's offset. The change is placed from the offset pair, Polar giving no zone: EU
pairs (UTC+0/+1, +1/+2, +2/+3) at 01:00 UTC (03:00/04:00 local in Finland); negative offsets (the US, Canada) at
02:00 in the offset before it; others (Australia, New Zealand) at 02:00 standard time. In autumn a step back of
the wall clock into the repeated hour marks the change exactly, wherever the user is; in spring a zone that
changes at another hour (Chile, Paraguay: 00:00) has the keys of the hour or two after midnight an hour off. A
recharge with that night attached has a 23- or 25-hour day
(midnight at the start's offset, the next at the end's). Daily activity, continuous heart rate and nightly
recharge carry no offset: their day windows and samples are local wall-clock time without offset
(``timestamp_localization`` 1: Polar gives neither a zone nor an offset, and labelling them UTC would move samples
by the user's offset); the pipeline keeps a day's offset once a record that knows it (a recharge with its sleep
attached) arrived. Physical info is stamped in UTC and has no local day: its Body is the UTC day (localization 0).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from typing import Any

from connectors.base import Fragment, MappingError, Provider, compact, timestamp_field
from connectors.providers.polar.activity_types import terra_activity_type
from connectors.timeutil import format_ts, to_ms

WHOLE_RESPONSE = "(whole response)"  # a field Polar never sends: see list_fields

PROVIDER = Provider(
    "polar",
    "POLAR",
    envelope=WHOLE_RESPONSE,
    list_fields=("nights", "recharges", "heart_rates"),  # the framework splits these pages into their documents
    user_field="polar_user",  # a link: only lets single documents through without a raw-event user; see _owner
    records_name_their_user=True,  # a page's documents link to their user, who may not be the page's
    doc="Polar AccessLink v3 exercises, sleep, nightly recharge, daily activity, continuous HR and physical info",
)

UTC_TIME, LOCAL_TIME = 0, 1  # Terra TimestampLocalization
UPLOAD_AUTOMATIC = 1  # Terra UploadType
SLEEP_UPLOAD_AUTOMATIC = 2  # Terra SleepUploadType (MANUAL/AUTOMATIC are swapped relative to UploadType)
# Polar hypnogram codes (0 WAKE, 1 REM, 2 N1, 3 N2, 4 N3, 5 UNKNOWN) → Terra SleepLevel (1 awake, 6 REM, 4 light,
# 5 deep, 0 unknown): Polar's "light sleep" total is N1 + N2. Any other code (a newer device's) is UNKNOWN.
SLEEP_LEVEL_BY_STAGE = {0: 1, 1: 6, 2: 4, 3: 4, 4: 5, 5: 0}
SLEEP_LEVEL_UNKNOWN = 0
ACTIVITY_LEVEL_BY_ZONE = {"SLEEP": 1, "SEDENTARY": 2, "LIGHT": 3, "MODERATE": 4, "VIGOROUS": 5}  # Terra ActivityLevel
RECOVERY_LEVELS = range(1, 7)  # nightly_recharge_status 1 very poor … 6 very good = Terra RecoveryLevel 1 … 6
# When a night's clocks changed, from its offset pair (Polar gives offsets, no zone): EU zones (UTC+0/+1, +1/+2,
# +2/+3) change at 01:00 UTC; elsewhere at 02:00 local (the Americas: in the offset before the change, as the US and
# Canada do; elsewhere, e.g. Australia and New Zealand, in standard time)
EU_OFFSET_PAIRS = frozenset({frozenset({0, 1}), frozenset({1, 2}), frozenset({2, 3})})  # hours
EU_CHANGE_UTC = time(1)
LOCAL_CHANGE = time(2)
EARLY_SAMPLES = timedelta(hours=1)  # "HH:MM" keys up to an hour before sleep_start_time stay on its date
ISO_DURATION = re.compile(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?")
USER_LINK = re.compile(r"/users/(\d+)/?$")
# Exercise sample-type codes (AccessLink's table; the OpenAPI spec itself only shows "0" = heart rate):
# code → (sample list, value name, factor to Terra's unit). 5-7, 9 and 11 (RR intervals) have no Terra sample.
SAMPLE_TYPES: dict[str, tuple[str, str, float]] = {
    "0": ("hr_samples", "bpm", 1),
    "1": ("speed_samples", "speed_meters_per_second", 1 / 3.6),  # km/h
    "2": ("cadence_samples", "cadence_rpm", 1),
    "3": ("elevation_samples", "elev_meters", 1),
    "4": ("power_samples", "watts", 1),
    "8": ("running_cadence_samples", "cadence_rpm", 1),  # steps/min; used when there is no "2"
    "10": ("distance_samples", "distance_meters", 1),
}


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def _require(doc: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if doc.get(n) is None]
    if missing:
        raise MappingError(f"missing required field(s): {', '.join(missing)}")


def _documents(payload: dict[str, Any], *list_keys: str) -> list[dict[str, Any]]:
    """The documents of a response: its list under one of ``list_keys`` (a page) or the response itself (one
    document, in the current snake_case or the legacy transaction's kebab-case spelling).

    Responses that hold no data are refused with what to fetch instead: a legacy transaction's list of links
    (``{"exercises": ["https://…/exercises/56"]}``), a transaction just created (``transaction-id`` +
    ``resource-uri``), a webhook notification (``event`` + ``url``).
    """
    if "event" in payload and "url" in payload:
        raise MappingError(f"a Polar webhook notification ({payload.get('event')}), not data: fetch its url "
                           f"{payload.get('url')!r} and send that response")
    if isinstance(payload.get("available"), list):
        raise MappingError("GET /v3/users/sleep/available lists which nights exist, not the nights: fetch "
                           "/v3/users/sleep/{date} for each (or /v3/users/sleep) and send that response")
    if "transaction-id" in payload and "resource-uri" in payload:
        raise MappingError(f"a Polar transaction, not data: list it at its resource-uri {payload['resource-uri']!r},"
                           " then send each document it links to")
    for list_key in list_keys:
        if list_key not in payload:
            continue
        docs = payload[list_key]
        if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
            raise MappingError(f"{list_key!r} holds a legacy transaction's links ({docs[0]!r}, …), not documents: "
                               "fetch each link and send its document")
        if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
            raise MappingError(f"{list_key!r} must be a list of objects")
        return [_snake_case(doc) for doc in docs]
    return [_snake_case(payload)]


def _snake_case(doc: dict[str, Any]) -> dict[str, Any]:
    """A legacy transaction document (``start-time``, ``heart-rate``, ``detailed-sport-info``) with its top-level
    kebab-case keys also under the current snake_case names; the keys ``_owner`` and samples read stay as sent."""
    if not any("-" in key for key in doc):
        return doc
    out = dict(doc)
    for key, value in doc.items():
        out.setdefault(key.replace("-", "_"), value)
    return out


def _owner(doc: dict[str, Any]) -> str | None:
    """Polar user id from ``polar_user`` (``polar-user`` in legacy documents); None when absent."""
    link = doc.get("polar_user", doc.get("polar-user"))
    if link is None:
        return None
    match = USER_LINK.search(link) if isinstance(link, str) else None
    if match is None:
        raise MappingError(f"polar_user must be a link ending in /v3/users/<id>, got {link!r}")
    return match.group(1)


def _fragment(model: str, record: dict[str, Any], doc: dict[str, Any], version_ms: int | None = None) -> Fragment:
    return Fragment(model, record, provider_user_id=_owner(doc), version_ms=version_ms)


def _number(value: Any) -> int | float:
    """JSON number with integral floats as ints (Polar writes ``8013.0`` and ``"98"`` alike)."""
    return int(value) if float(value).is_integer() else value


def _int(value: Any) -> int | None:
    """Terra's long fields (calories, distance) reject fractions: round to the nearest integer."""
    return None if value is None else round(value)


def _measured(value: Any) -> Any:
    """A vital sign or measurement Polar writes as 0 when it measured nothing: absent, not zero."""
    return None if value == 0 else value


def _duration(value: Any, name: str) -> int | float | None:
    """ISO-8601 duration (``PT46M30S``, ``PT2H44M``, ``PT210.026S``, ``P1DT2H``) → seconds."""
    if value is None:
        return None
    match = ISO_DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None or not any(match.groups()) or value.endswith("T"):
        raise MappingError(f"{name} must be an ISO-8601 duration such as PT46M30S, got {value!r}")
    days, hours, minutes, seconds = match.groups()
    total = int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    return _number(round(total, 3))


def _date(value: Any, name: str = "date") -> date:
    """The ``YYYY-MM-DD`` date a field starts with (a date, or a local date-time)."""
    try:
        return date.fromisoformat(value[:10])
    except (TypeError, ValueError) as exc:
        raise MappingError(f"{name} must start with a YYYY-MM-DD date, got {value!r}") from exc


def _wall_clock(text: Any, name: str) -> datetime:
    """A local date-time as Polar writes it without offset (``2024-03-11T07:40:00``, ``2024-03-11T07:02``)."""
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise MappingError(f"{name} must be a local ISO-8601 date-time, got {text!r}") from exc


def _text(moment: datetime) -> str:
    """Terra timestamp text; a naive (offset-less local) time is written without offset."""
    return moment.isoformat(timespec="microseconds")


def _day_metadata(day: date, zone: tzinfo | None, end_zone: tzinfo | None = None) -> dict[str, Any]:
    """Local midnight to midnight of ``day``, with the user's offset when known (``zone``; ``end_zone`` for the
    closing midnight when the day changed offset: 23 or 25 hours), else without."""
    start = datetime.combine(day, time(), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(), tzinfo=end_zone or zone)
    return {"start_time": _text(start), "end_time": _text(end), "upload_type": UPLOAD_AUTOMATIC,
            "timestamp_localization": LOCAL_TIME}


def _night_window(sleep_start: datetime) -> datetime:
    """Where a night's ``"HH:MM"`` keys start: an hour before ``sleep_start_time`` (whole minute, its offset)."""
    return sleep_start.replace(second=0, microsecond=0) - EARLY_SAMPLES


def _dst_change(window_start: datetime, before: timedelta, after: timedelta) -> datetime:
    """The first instant after ``window_start`` at which clocks change from the offset ``before`` to ``after`` (see
    ``EU_OFFSET_PAIRS``)."""
    if frozenset({before / timedelta(hours=1), after / timedelta(hours=1)}) in EU_OFFSET_PAIRS:
        zone, clock = UTC, EU_CHANGE_UTC
    elif before < timedelta(0) and after < timedelta(0):
        zone, clock = timezone(before), LOCAL_CHANGE
    else:
        zone, clock = timezone(min(before, after)), LOCAL_CHANGE
    change = datetime.combine(window_start.astimezone(zone).date(), clock, tzinfo=zone)
    return change if change > window_start else change + timedelta(days=1)


def _clock_series(samples: Any, window_start: datetime, name: str,
                  end_zone: tzinfo | None = None) -> list[tuple[datetime, Any]]:
    """``{"HH:MM": value}`` → time-ordered ``(moment, value)``: each key at its first occurrence from ``window_start``
    (keys after midnight roll over to the next day). Moments carry ``window_start``'s offset, or none.

    A night whose end has another offset (``end_zone``) crossed a DST change; the keys are the device's wall clock.
    They keep the order Polar sends them in (time order, which sorting the wall clock would scramble in the
    repeated hour of autumn) and take ``end_zone``'s offset from the change on (``_dst_change``), on the wall
    clock before it. In autumn a step back of at most the offsets' difference into the repeated hour marks the
    change itself: that key and every later one take ``end_zone``'s offset.
    """
    if samples is None:
        return []
    if not isinstance(samples, dict):
        raise MappingError(f"{name} must be an object keyed by \"HH:MM\", got {type(samples).__name__}")
    start_zone = window_start.tzinfo
    before = window_start.utcoffset()
    after = end_zone.utcoffset(window_start) if end_zone is not None else None
    change_wall, shift = None, timedelta(0)
    if start_zone is not None and before is not None and after is not None and after != before:
        change_wall = _dst_change(window_start, before, after).astimezone(start_zone).replace(tzinfo=None)
        shift = before - after  # > 0: clocks fall back
    wall_start = window_start.replace(tzinfo=None)
    series, previous, changed = [], None, False
    for key, value in samples.items():
        try:
            clock = time.fromisoformat(key)
        except ValueError as exc:
            raise MappingError(f"{name} key {key!r} is not a \"HH:MM\" time") from exc
        moment = datetime.combine(wall_start.date(), clock)
        if moment < wall_start:
            moment += timedelta(days=1)
        zone = start_zone
        if change_wall is not None:
            if (shift > timedelta(0) and previous is not None and previous - shift <= moment < previous
                    and change_wall - shift <= moment < change_wall):
                changed = True  # the wall clock stepped back into the repeated hour: the change happened here
            previous = moment
            if changed or moment >= change_wall:
                zone = end_zone
        series.append((moment.replace(tzinfo=zone), value))
    return series if change_wall is not None else sorted(series, key=lambda item: item[0])


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins on conflicting leaves."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _stats(values: Iterable[float]) -> dict[str, Any]:
    values = list(values)
    if not values:
        return {}
    return {"avg": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------------------------------------------------
# exercises → Activity
# ----------------------------------------------------------------------------------------------------------------------
def _exercise_start(doc: dict[str, Any]) -> datetime:
    """``start_time`` (local, no offset) placed in the fixed offset ``start_time_utc_offset`` (minutes)."""
    minutes = doc.get("start_time_utc_offset")
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not -16 * 60 <= minutes <= 16 * 60:
        raise MappingError(f"start_time_utc_offset must be a whole number of minutes, got {minutes!r}")
    zone = timezone(timedelta(minutes=minutes))
    start = _wall_clock(doc.get("start_time"), "start_time")
    return start.astimezone(zone) if start.tzinfo else start.replace(tzinfo=zone)


def _exercise_samples(doc: dict[str, Any], start: datetime) -> dict[str, list[dict[str, Any]]]:
    """Sample series by Terra list name; sample ``i`` of a series is ``i × recording-rate`` seconds after the start."""
    out: dict[str, list[dict[str, Any]]] = {}
    for series in doc.get("samples") or []:
        spec = SAMPLE_TYPES.get(str(series.get("sample-type")))
        rate = series.get("recording-rate")
        if spec is None or not rate:  # unmapped type, or RR data (no recording rate)
            continue
        list_name, value_name, factor = spec
        samples = out.setdefault(list_name, [])
        for index, item in enumerate(str(series.get("data") or "").split(",")):
            item = item.strip()
            if item in ("", "null"):
                continue  # sensor offline
            try:
                value = float(item) * factor
            except ValueError as exc:
                raise MappingError(f"sample-type {series.get('sample-type')} value {item!r} is not a number") from exc
            if value == 0 and list_name == "hr_samples":
                continue  # 0 bpm: no heart rate at that moment
            offset = index * rate
            samples.append({"timestamp": format_ts(start + timedelta(seconds=offset)),
                            value_name: _number(round(value, 4)), "timer_duration_seconds": offset})
    running_cadence = out.pop("running_cadence_samples", [])
    if not out.get("cadence_samples"):
        out["cadence_samples"] = running_cadence
    return out


@PROVIDER.kind("exercises", "activity")
def exercises(payload: dict[str, Any]) -> list[Fragment]:
    """An exercise: sport, local start + UTC offset (minutes), ISO duration, distance, kcal, HR, zones, samples,
    route."""
    return [_fragment("activity", _exercise(doc), doc) for doc in _documents(payload, "exercises")]


def _exercise(doc: dict[str, Any]) -> dict[str, Any]:
    _require(doc, "id", "start_time", "duration")
    start = _exercise_start(doc)
    duration = _duration(doc["duration"], "duration")
    end = start + timedelta(seconds=duration)
    heart_rate = doc.get("heart_rate") or {}
    zones = [{"zone": zone["index"], "name": f"{zone.get('lower-limit')}-{zone.get('upper-limit')} bpm",
              "duration_seconds": _duration(zone.get("in-zone"), "heart_rate_zones[].in-zone")}
             for zone in doc.get("heart_rate_zones") or []]
    if not any(zone["duration_seconds"] for zone in zones):
        zones = []  # every zone PT0S: no heart rate was recorded
    samples = _exercise_samples(doc, start)
    watts = [s["watts"] for s in samples.get("power_samples", [])]
    route = [{"timestamp": format_ts(start + timedelta(seconds=offset)),
              "coords_lat_lng_deg": [point["latitude"], point["longitude"]], "timer_duration_seconds": offset}
             for point in doc.get("route") or []
             if (offset := _duration(point.get("time"), "route[].time")) is not None
             and point.get("latitude") is not None and point.get("longitude") is not None]
    return compact({
        "metadata": {
            "summary_id": str(doc["id"]),
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "type": terra_activity_type(doc.get("sport"), doc.get("detailed_sport_info")),
            "upload_type": UPLOAD_AUTOMATIC,
            "name": doc.get("detailed_sport_info") or doc.get("sport"),
            "timestamp_localization": LOCAL_TIME,
        },
        "distance_data": {
            "summary": {"distance_meters": _int(_measured(doc.get("distance")))},
            "detailed": {"distance_samples": samples.get("distance_samples"),
                         "elevation_samples": samples.get("elevation_samples")},
        },
        "calories_data": {"total_burned_calories": _int(_measured(doc.get("calories")))},
        "heart_rate_data": {
            "summary": {"avg_hr_bpm": _measured(heart_rate.get("average")),
                        "max_hr_bpm": _measured(heart_rate.get("maximum")),
                        "hr_zone_data": zones},
            "detailed": {"hr_samples": samples.get("hr_samples")},
        },
        "movement_data": {"speed_samples": samples.get("speed_samples"),
                          "cadence_samples": samples.get("cadence_samples")},
        "power_data": {"power_samples": samples.get("power_samples"),
                       "avg_watts": round(sum(watts) / len(watts), 2) if watts else None,
                       "max_watts": max(watts) if watts else None},
        "position_data": {
            "start_pos_lat_lng_deg": route[0]["coords_lat_lng_deg"] if route else None,
            "end_pos_lat_lng_deg": route[-1]["coords_lat_lng_deg"] if route else None,
            "position_samples": route,
        },
        "device_data": {"name": doc.get("device"), "manufacturer": "Polar"},
    })


# ----------------------------------------------------------------------------------------------------------------------
# sleep → Sleep
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("sleep", "sleep")
def sleep(payload: dict[str, Any]) -> list[Fragment]:
    """A night (Sleep Plus Stages): stage totals, interruptions, hypnogram, 5-minute heart rate, sleep score."""
    return [_fragment("sleep", _sleep_record(doc), doc) for doc in _documents(payload)]


def _sleep_level(code: Any) -> int:
    """Terra SleepLevel of a hypnogram code; a code outside Polar's documented table is UNKNOWN, never a refusal."""
    if isinstance(code, bool) or not isinstance(code, int):
        return SLEEP_LEVEL_UNKNOWN
    return SLEEP_LEVEL_BY_STAGE.get(code, SLEEP_LEVEL_UNKNOWN)


def _sleep_span(doc: dict[str, Any]) -> tuple[datetime, datetime]:
    _require(doc, "date", "sleep_start_time", "sleep_end_time")
    start, end = timestamp_field(doc, "sleep_start_time"), timestamp_field(doc, "sleep_end_time")
    if end <= start:
        raise MappingError(f"sleep_end_time {doc['sleep_end_time']} is not after sleep_start_time "
                           f"{doc['sleep_start_time']}")
    return start, end


def _sleep_record(doc: dict[str, Any]) -> dict[str, Any]:
    """A Polar night; its result ``date`` (one night per date) is the summary id."""
    start, end = _sleep_span(doc)
    window = _night_window(start)
    hypnogram = []
    for at, code in _clock_series(doc.get("hypnogram"), window, "hypnogram", end.tzinfo):
        hypnogram.append({"timestamp": format_ts(at), "level": _sleep_level(code)})
    hr_samples = [{"timestamp": format_ts(at), "bpm": bpm}
                  for at, bpm in _clock_series(doc.get("heart_rate_samples"), window, "heart_rate_samples",
                                               end.tzinfo)
                  if _measured(bpm) is not None]
    hr = _stats(s["bpm"] for s in hr_samples)
    light, deep, rem = doc.get("light_sleep"), doc.get("deep_sleep"), doc.get("rem_sleep")
    asleep = light + deep + rem if None not in (light, deep, rem) else None
    period = (end - start).total_seconds()  # falling asleep to waking up, as Polar defines the night
    return compact({
        "metadata": {
            "summary_id": _date(doc["date"]).isoformat(),
            "start_time": format_ts(start),
            "end_time": format_ts(end),
            "upload_type": SLEEP_UPLOAD_AUTOMATIC,
            "is_nap": False,  # Polar reports one night per result date
            "timestamp_localization": LOCAL_TIME,
        },
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": asleep,
                "duration_light_sleep_state_seconds": light,  # N1 + N2
                "duration_deep_sleep_state_seconds": deep,  # N3
                "duration_REM_sleep_state_seconds": rem,
            },
            "awake": {
                "duration_awake_state_seconds": doc.get("total_interruption_duration"),
                "duration_short_interruption_seconds": doc.get("short_interruption_duration"),
                "duration_long_interruption_seconds": doc.get("long_interruption_duration"),
            },
            "other": {
                "duration_in_bed_seconds": period,
                "duration_unmeasurable_sleep_seconds": doc.get("unrecognized_sleep_stage"),
            },
            "sleep_efficiency": round(100 * asleep / period, 2) if asleep is not None else None,  # percentage
            "hypnogram_samples": hypnogram,
        },
        "heart_rate_data": {
            "summary": {"avg_hr_bpm": hr.get("avg"), "min_hr_bpm": hr.get("min"), "max_hr_bpm": hr.get("max")},
            "detailed": {"hr_samples": hr_samples},
        },
        "scores": {"sleep_score": doc.get("sleep_score")},
    })


# ----------------------------------------------------------------------------------------------------------------------
# nightly recharge → Daily (+ Sleep when the night is attached)
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("nightly-recharge", "daily", "sleep")
def nightly_recharge(payload: dict[str, Any]) -> list[Fragment]:
    """Nightly Recharge → the result date's Daily (average HRV and HRV samples).

    Breathing rate and the recharge status have no Daily field: they complete the night's Sleep (recovery_level =
    nightly_recharge_status, Polar's 1-6 scale being Terra's RecoveryLevel) when that night is attached under
    ``sleep`` (``PolarHook`` does, from ``GET /v3/users/sleep``; or ``GET /v3/users/sleep/{date}``). Without it,
    the ``"HH:MM"`` keys are placed on the night before ``date`` from noon on, without offset. ANS charge has no
    Terra field.
    """
    fragments = []
    for doc in _documents(payload):
        fragments += _recharge(doc)
    return fragments


def _recharge(doc: dict[str, Any]) -> list[Fragment]:
    _require(doc, "date")
    day = _date(doc["date"])
    night = doc.get("sleep")
    if night is not None:
        if not isinstance(night, dict):
            raise MappingError(f"attached sleep must be a Polar sleep object, got {type(night).__name__}")
        if str(night.get("date")) != str(doc["date"]):
            raise MappingError(f"attached sleep of {night.get('date')!r} is not this recharge's night {doc['date']!r}")
        sleep_start, sleep_end = _sleep_span(night)
        window, zone, end_zone = _night_window(sleep_start), sleep_start.tzinfo, sleep_end.tzinfo
    else:
        window, zone, end_zone = datetime.combine(day - timedelta(days=1), time(12)), None, None
    hrv = [{"timestamp": _text(at), "hrv_rmssd": ms}
           for at, ms in _clock_series(doc.get("hrv_samples"), window, "hrv_samples", end_zone)
           if _measured(ms) is not None]
    breaths = [{"timestamp": _text(at), "breaths_per_min": rate}
               for at, rate in _clock_series(doc.get("breathing_samples"), window, "breathing_samples", end_zone)
               if _measured(rate) is not None]
    heart_rate = {"summary": {"avg_hrv_rmssd": _measured(doc.get("heart_rate_variability_avg"))},
                  "detailed": {"hrv_samples_rmssd": hrv}}
    daily = compact({"metadata": _day_metadata(day, zone, end_zone), "heart_rate_data": heart_rate})
    fragments = [_fragment("daily", daily, doc)]
    if night is not None:
        rates = _stats(s["breaths_per_min"] for s in breaths)
        status = doc.get("nightly_recharge_status")
        recharge = compact({
            "readiness_data": {"recovery_level": status if status in RECOVERY_LEVELS else None},
            "heart_rate_data": heart_rate,
            "respiration_data": {"breaths_data": {
                "start_time": breaths[0]["timestamp"] if breaths else None,
                "end_time": breaths[-1]["timestamp"] if breaths else None,
                # over ~4 h from 30 min after falling asleep
                "avg_breaths_per_min": _measured(doc.get("breathing_rate_avg")),
                "min_breaths_per_min": rates.get("min"),
                "max_breaths_per_min": rates.get("max"),
                "samples": breaths,
            }},
        })
        fragments.append(_fragment("sleep", _merge(_sleep_record(night), recharge), doc))
    return fragments


# ----------------------------------------------------------------------------------------------------------------------
# daily activity and continuous heart rate → Daily
# ----------------------------------------------------------------------------------------------------------------------
def _step_samples(steps: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-interval step counts → Terra's cumulative step samples, each at the end of the segment it totals.

    Polar drops consecutive samples that repeat the previous count: a gap longer than ``interval_ms`` after a sample
    holds that count once per interval.
    """
    items = steps.get("samples") or []
    if not items:
        return []
    interval_ms = steps.get("interval_ms")
    if isinstance(interval_ms, bool) or not isinstance(interval_ms, int) or interval_ms <= 0:
        raise MappingError(f"steps.interval_ms must be a positive number of milliseconds, got {interval_ms!r}")
    interval = timedelta(milliseconds=interval_ms)
    points = sorted((_wall_clock(s.get("timestamp"), "steps.samples[].timestamp"), s.get("steps") or 0) for s in items)
    total, out = 0, []
    for index, (at, count) in enumerate(points):
        following = points[index + 1][0] if index + 1 < len(points) else at + interval
        intervals = max(1, round((following - at) / interval))
        total += count * intervals
        out.append({"timestamp": _text(at + intervals * interval), "steps": total})
    return out


@PROVIDER.kind("activities", "daily")
def activities(payload: dict[str, Any]) -> list[Fragment]:
    """A day's activity: steps (+ samples), distance from steps, total/active kcal, active and inactive time, zones."""
    return [_fragment("daily", _activity_day(doc), doc) for doc in _documents(payload, "activity-log")]


def _activity_day(doc: dict[str, Any]) -> dict[str, Any]:
    """The day is ``samples.date``, else the date of ``start_time`` (local; Polar's "UTC" label is unconfirmed and the
    day ends at 23:59:59, so it is read as local)."""
    samples = doc.get("samples") or {}
    day_text = samples.get("date") or doc.get("start_time") or doc.get("date")
    if day_text is None:
        raise MappingError("activity has neither samples.date, start_time nor (legacy) date: its day is unknown")
    day = _date(day_text, "samples.date / start_time / date")
    levels = [{"timestamp": _text(_wall_clock(s.get("timestamp"), "activity_zones.samples[].timestamp")),
               "level": ACTIVITY_LEVEL_BY_ZONE.get(s.get("zone"), 0)}
              for s in (samples.get("activity_zones") or {}).get("samples") or []]
    total, active = doc.get("calories"), doc.get("active_calories")
    return compact({
        "metadata": _day_metadata(day, None),
        "distance_data": {
            "steps": doc.get("steps"),
            "distance_meters": _int(doc.get("distance_from_steps")),
            "detailed": {"step_samples": _step_samples(samples.get("steps") or {})},
        },
        "calories_data": {
            "total_burned_calories": _int(total),  # includes BMR
            "net_activity_calories": _int(active),
            "BMR_calories": _int(total - active) if total is not None and active is not None else None,
        },
        "active_durations_data": {
            "activity_seconds": _duration(doc.get("active_duration"), "active_duration"),
            "inactivity_seconds": _duration(doc.get("inactive_duration"), "inactive_duration"),
            "num_continuous_inactive_periods": doc.get("inactivity_alert_count"),
            "activity_levels_samples": sorted(levels, key=lambda s: s["timestamp"]),
        },
    })


@PROVIDER.kind("continuous-heart-rate", "daily")
def continuous_heart_rate(payload: dict[str, Any]) -> list[Fragment]:
    """A day's 5-minute heart rate outside exercises (``sample_time`` is device time on ``date``); a range answer
    holds one such day per ``heart_rates`` item."""
    return [_fragment("daily", _heart_rate_day(doc), doc) for doc in _documents(payload)]


def _heart_rate_day(doc: dict[str, Any]) -> dict[str, Any]:
    _require(doc, "date")
    day = _date(doc["date"])
    samples = []
    for item in doc.get("heart_rate_samples") or []:
        try:
            clock = time.fromisoformat(item["sample_time"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MappingError(f"heart_rate_samples[].sample_time must be HH:MM:SS, got {item.get('sample_time')!r}"
                               ) from exc
        if _measured(item.get("heart_rate")) is not None:
            samples.append({"timestamp": _text(datetime.combine(day, clock)), "bpm": item["heart_rate"]})
    samples.sort(key=lambda s: s["timestamp"])
    hr = _stats(s["bpm"] for s in samples)
    return compact({
        "metadata": _day_metadata(day, None),
        "heart_rate_data": {
            "summary": {"avg_hr_bpm": hr.get("avg"), "min_hr_bpm": hr.get("min"), "max_hr_bpm": hr.get("max")},
            "detailed": {"hr_samples": samples},
        },
    })


# ----------------------------------------------------------------------------------------------------------------------
# physical info → Body
# ----------------------------------------------------------------------------------------------------------------------
@PROVIDER.kind("physical-info", "body")
def physical_info(payload: dict[str, Any]) -> list[Fragment]:
    """The user's physical information (weight kg, height cm, resting/max HR, VO2max) as of its last change.

    Polar stamps it in UTC and gives no local offset, so the Body day is the UTC date of ``modified`` (``created`` in
    legacy documents), timestamp_localization 0. A weight from ``SOURCE_DEFAULT`` is Polar's placeholder, not the
    user's, and is left out.
    """
    return [_fragment("body", *_physical_info(doc)) for doc in _documents(payload, "physical-informations")]


def _physical_info(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    stamp = "modified" if doc.get("modified") is not None else "created"
    _require(doc, stamp)
    at = timestamp_field(doc, stamp).astimezone(UTC)
    weight = _measured(doc.get("weight")) if doc.get("weight_source") != "SOURCE_DEFAULT" else None
    height, vo2max = _measured(doc.get("height")), _measured(doc.get("vo2_max"))
    start = datetime.combine(at.date(), time(), tzinfo=UTC)
    record = compact({
        "metadata": {"start_time": format_ts(start), "end_time": format_ts(start + timedelta(days=1)),
                     "timestamp_localization": UTC_TIME},
        "measurements_data": {"measurements": [{"measurement_time": format_ts(at), "weight_kg": weight,
                                                "height_cm": height}] if weight is not None or height is not None
                              else []},
        "heart_data": {"heart_rate_data": {"summary": {
            "resting_hr_bpm": _measured(doc.get("resting_heart_rate")),
            "user_max_hr_bpm": _measured(doc.get("maximum_heart_rate"))}}},
        "oxygen_data": {"vo2max_ml_per_min_per_kg": vo2max,
                        "vo2_samples": [{"timestamp": format_ts(at), "vo2max_ml_per_min_per_kg": vo2max}]
                        if vo2max is not None else []},
    })
    return record, doc, to_ms(at)
