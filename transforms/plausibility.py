"""Plausibility: what no body or device can produce never reaches a destination.

One provider-independent check of every mapped Terra record (``check_record``), run once per record in the
normalize path, right after it is validated and before it is keyed and merged. Pure: it takes a record (a dict
following ``schemas/avro/models``) and returns it, or a copy with what is impossible taken out (only the dicts and
lists on the way to a change are copied; a clean record is returned as it is, in one pass and no copy). Athlete
profiles have no window and are not checked.

Policy
------
**Samples outside the record's window are dropped** (any list of objects with a ``timestamp``, or Body's
``measurement_time``: heart rate, hypnogram, SpO2, steps, stress, measurements, meals...). The window is
``metadata.start_time`` → ``end_time``, widened by a tolerance for clock skew and samples that straddle a bound:

- Activity and Sleep: their own start → end, ± ``EVENT_TOLERANCE`` (1 h).
- Day-scoped models (Daily, Body, Nutrition, Menstruation): at least the whole day that starts at ``start_time`` (a
  day in progress may end early and still gets its later samples), from ``DAY_EARLY`` (12 h) before it, for
  overnight measurements dated by the morning they end (Fitbit SpO2 and HRV, Garmin pulse ox of a night that began
  in the evening), to ``DAY_LATE`` (6 h) after it, for a provider day that does not start at midnight (Oura's
  activity day runs 04:00 to 04:00).

Times compare as instants; a window written without an offset (a local day: Polar nightly recharge, Garmin user
metrics) compares in wall-clock time, so a sample's offset does not move it out of its day.

**Impossible values are dropped**; in a sample list the whole sample goes (a heart-rate sample is its one value),
except a Body measurement, which holds several (weight, fat, BMI...): only the impossible value goes, the
measurement only when nothing else is left in it; elsewhere just the field:

- heart rate (``*_hr_bpm``, ``bpm``, ``hr_bpm``) outside 1–250 bpm (0 is a sensor that saw nothing);
- SpO2 (``avg_saturation_percentage``, saturation sample ``percentage``) outside 1–100 %, other percentages
  (``sleep_efficiency``, body fat, water) outside 0–100 %;
- breathing rate (``*_breaths_per_min``, sample ``breaths_per_min``) outside 1–80 breaths/min;
- weight outside 0.1–700 kg, height outside 20–300 cm (beyond the lightest newborn and the heaviest and tallest
  people ever measured: 0 or a unit error, never a body);
- VO2 max outside 1–100 ml/kg/min (the highest measured is about 97);
- negative durations (every ``*_seconds`` field), steps, distances, floors or HRV (RMSSD, SDNN).

A block or list left empty by what was dropped (``{"measurements": []}``) goes with it; one the mapper sent empty
stays.

**Aggregates are the provider's unless they cannot be** (``AGGREGATES``): a summary's min, max, resting value is
dropped only when it is impossible itself (the rules above); an average beside a series that lost samples is
dropped only when it lies outside the [least, greatest] of the samples kept (or none is kept): then it cannot be
an average of them, only of what was dropped. An average inside that range stays: most are the provider's own, of
data finer than its series (Oura's ``average_heart_rate``, Withings' ``hr_average``, Garmin's activity average).
A mapper that computes an aggregate from samples leaves impossible ones out of it (Garmin's daily mean heart rate),
so an artefact never makes a plausible-looking average.

**Whole records that are implausible go to the dead-letter store** (stage ``plausibility``, with the original bytes
and the reason), instead of being delivered with meaningless derived values (a sleep efficiency computed from
stage totals that do not fit the night):

- a window whose end is before its start, or longer than ``MAX_WINDOW`` (Sleep 24 h, Activity 31 days: Garmin's
  Expedition mode records one activity for up to about 28 days; day-scoped models 2 days, Menstruation 400 days),
  or a bound that is not a timestamp;
- a sleep whose stage totals exceed its window by more than ``SLEEP_TOTALS_TOLERANCE`` (15 min or 10 %,
  whichever is larger): any one stage, deep + light + REM, asleep + awake, or time in bed;
- a sleep whose window is mostly unaccounted for: asleep + awake + unmeasurable + the latencies
  (``sleep_latency_seconds``, ``wake_up_latency_seconds``) leave more than ``max(2 h, what they account for)`` of
  the window unexplained (a window stretched far past the night its totals describe). Not checked when the
  provider's own ``duration_in_bed_seconds`` is the window (within the tolerance): the rest is time in bed it did
  not stage. A mapper whose window could be stretched by a bad sample ends it where the provider's totals say
  (Garmin): a suspect hypnogram sample is cut or dropped, never a reason to refuse totals that are consistent.

A window whose bounds carry no offset, or the same one, is wall-clock time: across a DST change it is an hour
shorter or longer than the night (a Fitbit log without an IANA zone, 23:00 to 07:00 on 2024-11-03 in New York, is
9 h in bed). Both sleep rules then allow ``DST_SLACK_S`` (1 h) more. Bounds with two offsets are true instants and
get no slack.

The reason names the record (``sleep <summary_id>: ...``, or ``daily starting <start_time>: ...``): the pipeline
dead-letters an implausible record alone, naming it, and delivers its document's other records.

Counters (``COUNTERS``; tallied into the run summary and Beam metrics as ``plausibility:<name>``):
``samples_outside_window``, ``impossible_samples``, ``impossible_values``, ``aggregates_dropped``. Records
dead-lettered here are counted as ``dead_letter:plausibility`` like every other dead letter.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any, NamedTuple

EVENT_TOLERANCE = timedelta(hours=1)
DAY_EARLY = timedelta(hours=12)
DAY_LATE = timedelta(hours=6)
DAY = timedelta(days=1)
DAY_SCOPED = frozenset({"daily", "body", "nutrition", "menstruation"})
MAX_WINDOW = {
    "sleep": timedelta(hours=24),
    "activity": timedelta(days=31),  # a Garmin Expedition activity lasts up to about 28 days
    "daily": timedelta(days=2),
    "body": timedelta(days=2),
    "nutrition": timedelta(days=2),
    "menstruation": timedelta(days=400),
}
SLEEP_TOTALS_TOLERANCE = (timedelta(minutes=15).total_seconds(), 0.10)  # absolute seconds, fraction of the window
UNACCOUNTED_SLACK_S = timedelta(hours=2).total_seconds()
DST_SLACK_S = timedelta(hours=1).total_seconds()  # a wall-clock window across a DST change is an hour off

WHOLE_LIST_CHECK = 16  # sample lists this long are first checked whole (one pass in C), shorter ones sample by sample

SAMPLES_OUTSIDE_WINDOW = "samples_outside_window"
IMPOSSIBLE_SAMPLES = "impossible_samples"
IMPOSSIBLE_VALUES = "impossible_values"
AGGREGATES_DROPPED = "aggregates_dropped"
COUNTERS = (SAMPLES_OUTSIDE_WINDOW, IMPOSSIBLE_SAMPLES, IMPOSSIBLE_VALUES, AGGREGATES_DROPPED)

_INF = float("inf")
_HEART_RATE = (1, 250)
_SPO2 = (1, 100)
_PERCENT = (0, 100)
_NON_NEGATIVE = (0, _INF)
_BREATHING = (1, 80)
_WEIGHT_KG = (0.1, 700)
_HEIGHT_CM = (20, 300)
_VO2MAX = (1, 100)

_DURATIONS = (
    "activity_seconds", "inactivity_seconds", "rest_seconds", "low_intensity_seconds", "moderate_intensity_seconds",
    "vigorous_intensity_seconds", "standing_seconds", "timer_duration_seconds", "duration_seconds",
    "active_duration_seconds", "duration_asleep_state_seconds", "duration_deep_sleep_state_seconds",
    "duration_light_sleep_state_seconds", "duration_REM_sleep_state_seconds", "duration_awake_state_seconds",
    "duration_short_interruption_seconds", "duration_long_interruption_seconds", "sleep_latency_seconds",
    "wake_up_latency_seconds", "duration_in_bed_seconds", "duration_unmeasurable_sleep_seconds",
    "total_snoring_duration_seconds", "stress_duration_seconds", "rest_stress_duration_seconds",
    "activity_stress_duration_seconds", "low_stress_duration_seconds", "medium_stress_duration_seconds",
    "high_stress_duration_seconds",
)
VALUE_RULES: dict[str, tuple[float, float]] = {  # field name → inclusive (low, high) of what is possible
    **dict.fromkeys(("avg_hr_bpm", "max_hr_bpm", "min_hr_bpm", "resting_hr_bpm", "user_max_hr_bpm", "bpm", "hr_bpm"),
                    _HEART_RATE),
    **dict.fromkeys(("avg_saturation_percentage", "percentage"), _SPO2),
    **dict.fromkeys(("sleep_efficiency", "bodyfat_percentage", "water_percentage", "day_avg_bodyfat_percentage",
                     "day_avg_water_percentage"), _PERCENT),
    **dict.fromkeys(("avg_breaths_per_min", "min_breaths_per_min", "max_breaths_per_min", "breaths_per_min"),
                    _BREATHING),
    "weight_kg": _WEIGHT_KG,
    "height_cm": _HEIGHT_CM,
    "vo2max_ml_per_min_per_kg": _VO2MAX,
    **dict.fromkeys((*_DURATIONS, "steps", "distance_meters", "floors_climbed", "avg_hrv_rmssd", "hrv_rmssd",
                     "avg_hrv_sdnn", "hrv_sdnn"), _NON_NEGATIVE),
}

Path = tuple[str, ...]
# block → (its sample list, the samples' value, the averages beside them that a mapper may compute from them)
AGGREGATES: dict[str, tuple[Path, str, tuple[Path, ...]]] = {
    "heart_rate_data": (("detailed", "hr_samples"), "bpm", (("summary", "avg_hr_bpm"),)),
    "oxygen_data": (("saturation_samples",), "percentage", (("avg_saturation_percentage",),)),
    "oxygen_saturation_data": (("samples",), "percentage", (("avg_saturation_percentage",),)),
    "breaths_data": (("samples",), "breaths_per_min", (("avg_breaths_per_min",),)),
    "stress_data": (("samples",), "level", (("avg_stress_level",),)),
}

_SLEEP_STAGES = ("duration_deep_sleep_state_seconds", "duration_light_sleep_state_seconds",
                 "duration_REM_sleep_state_seconds")


class Implausible(ValueError):
    """The record as a whole cannot be true; the message says why (the record is dead-lettered, not delivered)."""


def check_record(model_type: str, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """``record`` without its impossible samples and values, and how many of each went (``COUNTERS``; empty when
    none). Raises Implausible when the record as a whole is (see the module's policy). ``record`` never changes."""
    metadata = record.get("metadata")
    if model_type not in MAX_WINDOW or not isinstance(metadata, dict):
        return record, {}
    start, end = metadata.get("start_time"), metadata.get("end_time")
    try:
        if type(start) is not str or type(end) is not str:
            raise Implausible(f"metadata start_time {start!r}, end_time {end!r}: not timestamps")
        window = _window(model_type, start, end)
        checker = _Checker(window)
        checked = checker.record(record)
        if model_type == "sleep":
            _check_sleep_totals(checked, window)
    except Implausible as exc:  # named: the reason says which of a document's records was refused
        summary_id = metadata.get("summary_id")
        name = f"{model_type} {summary_id}" if summary_id is not None else f"{model_type} starting {start}"
        raise Implausible(f"{name}: {exc}") from None
    return checked, checker.counts


class _Window(NamedTuple):
    low: datetime  # where samples may start (the record's start, less the tolerance)
    high: datetime
    low_text: str  # ``low`` and ``high`` written as mappers write times (``format_ts``, in the bounds' zones)
    high_text: str
    seconds: float  # the record's own window (start to end)
    wall_clock: bool  # the bounds carry no offset, or the same one: the window may be an hour off across a DST change
    form: tuple[int, str]  # (length, offset) of a time written like both bounds (text order is then time order), or
    # (-1, "") when the bounds' offsets differ


@functools.lru_cache(maxsize=4096)  # remembered: a user's records name the same few days
def _window(model_type: str, start_text: str, end_text: str) -> _Window:
    start, end = _bound(model_type, start_text, "start_time"), _bound(model_type, end_text, "end_time")
    if start.tzinfo is None or end.tzinfo is None:  # a local day written without its offset: wall-clock times
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    wall_clock = start.tzinfo is None or start.utcoffset() == end.utcoffset()
    if end < start:
        raise Implausible(f"ends before it starts: start_time {start_text}, end_time {end_text}")
    if end - start > MAX_WINDOW[model_type]:
        raise Implausible(f"window of {_hours(end - start)} ({start_text} to {end_text}) is longer "
                          f"than any {model_type} can be ({_hours(MAX_WINDOW[model_type])})")
    if model_type in DAY_SCOPED:
        low, high = start - DAY_EARLY, max(end, start + DAY) + DAY_LATE
    else:
        low, high = start - EVENT_TOLERANCE, end + EVENT_TOLERANCE
    low_text, high_text = low.isoformat(timespec="microseconds"), high.isoformat(timespec="microseconds")
    suffix = low_text[-6:]  # the offset: times of the bounds' length and offset compare as text
    form = (len(low_text), suffix) if high_text[-6:] == suffix else (-1, "")
    return _Window(low, high, low_text, high_text, (end - start).total_seconds(), wall_clock, form)


def _bound(model_type: str, text: str, name: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise Implausible(f"metadata.{name} {text!r} is not a timestamp") from None


def _hours(span: timedelta) -> str:
    return f"{span.total_seconds() / 3600:.1f} h"


def _check_sleep_totals(record: dict[str, Any], window: _Window) -> None:
    """Raise Implausible when the sleep's stage totals do not fit its window (see the module's policy)."""
    durations = record.get("sleep_durations_data")
    if not durations:
        return
    window_s = window.seconds
    asleep, awake, other = durations.get("asleep") or {}, durations.get("awake") or {}, durations.get("other") or {}
    asleep_s, awake_s = asleep.get("duration_asleep_state_seconds"), awake.get("duration_awake_state_seconds")
    in_bed_s = other.get("duration_in_bed_seconds")
    stages = [value for value in map(asleep.get, _SLEEP_STAGES) if value is not None]
    totals = [asleep_s, awake_s, in_bed_s, *stages, sum(stages)]
    if asleep_s is not None and awake_s is not None:
        totals.append(asleep_s + awake_s)
    tolerance = max(SLEEP_TOTALS_TOLERANCE[0], SLEEP_TOTALS_TOLERANCE[1] * window_s)
    dst_slack = DST_SLACK_S if window.wall_clock else 0.0
    allowed = window_s + tolerance + dst_slack
    if max(total for total in totals if total is not None) > allowed:  # the rare case: name the total at fault
        names = {name: asleep.get(name) for name in (*_SLEEP_STAGES, "duration_asleep_state_seconds")}
        names.update(duration_awake_state_seconds=awake_s, duration_in_bed_seconds=in_bed_s)
        names["deep + light + REM"] = sum(stages)
        names["asleep + awake"] = (asleep_s or 0) + (awake_s or 0)
        name, total = next((name, total) for name, total in names.items() if total is not None and total > allowed)
        raise Implausible(f"{name} of {total / 3600:.1f} h does not fit its {window_s / 3600:.1f} h window "
                          f"({record['metadata']['start_time']} to {record['metadata']['end_time']})")
    if asleep_s is None or awake_s is None:
        return
    if in_bed_s is not None and abs(in_bed_s - window_s) <= tolerance + dst_slack:
        return  # the provider's own time in bed is the window: the rest of it is time in bed it did not stage
    accounted = asleep_s + awake_s + sum(value or 0 for value in (
        other.get("duration_unmeasurable_sleep_seconds"), awake.get("sleep_latency_seconds"),
        awake.get("wake_up_latency_seconds")))
    if window_s - dst_slack - accounted > max(UNACCOUNTED_SLACK_S, accounted):
        raise Implausible(f"window of {window_s / 3600:.1f} h ({record['metadata']['start_time']} to "
                          f"{record['metadata']['end_time']}) but asleep + awake + latencies account for only "
                          f"{accounted / 3600:.1f} h of it")


_DROP = object()
_UNCHECKED = frozenset({"metadata", "device_data", "data_enrichment", "scores"})  # hold no rule's field or sample


class _Checker:
    """One pass over a record: impossible values and samples (outside [low, high]) out, copying only what changes."""

    __slots__ = ("counts", "form", "high", "high_text", "low", "low_text")

    def __init__(self, window: _Window) -> None:
        self.low, self.high, self.low_text, self.high_text = window.low, window.high, window.low_text, window.high_text
        self.form = window.form
        self.counts: dict[str, int] = {}

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def record(self, data: dict[str, Any]) -> dict[str, Any]:
        out = data
        for key, value in data.items():
            kind = type(value)
            if kind is dict:
                if key in _UNCHECKED:
                    continue
                new = self.record(value)
                if key in AGGREGATES and new is not value:
                    new = self._untrusted_aggregates(AGGREGATES[key], value, new)
            elif kind is list:
                new = self.list(value)
            elif (kind is int or kind is float) and key in VALUE_RULES:
                low, high = VALUE_RULES[key]
                new = value if low <= value <= high else _DROP
            else:
                continue
            if new is value:
                continue
            if out is data:
                out = dict(data)
            if new is _DROP:
                del out[key]
                self._count(IMPOSSIBLE_VALUES)
            elif not new:  # a block or list this check emptied (it was not empty): no empty container is left
                del out[key]
            else:
                out[key] = new
        return out

    def _untrusted_aggregates(self, spec: tuple[Path, str, tuple[Path, ...]], old: dict[str, Any],
                              new: dict[str, Any]) -> dict[str, Any]:
        """``new`` without the averages of ``spec`` that only the samples dropped on the way from ``old`` can have
        made: when the series lost samples, an average outside the [least, greatest] of the samples kept (or beside
        none kept) goes; one inside it stays (a provider's own average, of data finer than its series)."""
        samples, value_key, averages = spec
        kept = _get(new, samples) or ()
        if len(kept) == len(_get(old, samples) or ()):
            return new
        values = [value for value in (sample.get(value_key) for sample in kept if type(sample) is dict)
                  if type(value) is int or type(value) is float]
        low, high = (min(values), max(values)) if values else (_INF, -_INF)
        for path in averages:
            average = _get(new, path)
            if average is not None and not low <= average <= high:
                new = _without(new, path)
                self._count(AGGREGATES_DROPPED)
        return new

    def list(self, items: list[Any]) -> list[Any]:
        if not items or type(items[0]) is not dict:
            return items
        first = items[0]
        time_key = "timestamp" if "timestamp" in first else "measurement_time" if "measurement_time" in first else None
        if len(items) == 1:  # the usual fragment's list (one sample): what the loop below makes of it, without it
            checked = self.sample(first, time_key)
            return items if checked is first else [] if checked is _DROP else [checked]
        if time_key is not None and len(items) >= WHOLE_LIST_CHECK and self._all_plausible(items, time_key):
            return items
        kept: list[Any] | None = None
        for index, item in enumerate(items):
            checked = self.sample(item, time_key) if type(item) is dict else item
            if checked is not item and kept is None:
                kept = items[:index]
            if kept is not None and checked is not _DROP:
                kept.append(checked)
        return items if kept is None else kept

    def _all_plausible(self, items: list[dict[str, Any]], time_key: str) -> bool:
        """Whether a list of flat samples certainly has nothing to drop, seen whole: times (written alike) between
        the window's texts, and each ruled field's least and greatest values possible. No answer is False (then
        each sample is looked at)."""
        low_text, high_text = self.low_text, self.high_text
        length, suffix = self.form
        try:
            times = [item[time_key] for item in items]
            if set(map(len, times)) != {length} or min(times) < low_text or max(times) > high_text:
                return False
            joined, count = "".join(times), len(times)  # each time's offset, character by character, at once
            if any(joined[length - 6 + n::length] != suffix[n] * count for n in range(6)):
                return False
            for key in set().union(*items).intersection(VALUE_RULES):
                values = [item.get(key) for item in items]
                low, high = VALUE_RULES[key]
                if min(values) < low or max(values) > high:
                    return False
        except (KeyError, TypeError):  # a sample without a time, a value that is None, a time that is not text
            return False
        return not any(type(value) is dict or type(value) is list for value in items[0].values())

    def sample(self, item: dict[str, Any], time_key: str | None) -> Any:
        """The item; a copy without impossible values nested deeper; or _DROP (counted) when it is outside the
        window or one of its own values is impossible."""
        at = item.get(time_key) if time_key else None
        if type(at) is str:
            length, suffix = self.form
            alike = len(at) == length and at[-6:] == suffix  # written like the bounds: text order is time order
            if (at < self.low_text or at > self.high_text) if alike else self._outside(at):
                self._count(SAMPLES_OUTSIDE_WINDOW)
                return _DROP
        nested = False
        for key, value in item.items():
            kind = type(value)
            if (kind is int or kind is float) and key in VALUE_RULES:
                rule = VALUE_RULES[key]
                if not rule[0] <= value <= rule[1]:
                    if time_key is None:  # not a sample (a lap, a meal): only the value goes
                        return self.record(item)
                    if time_key == "measurement_time":  # a Body measurement holds several values: only it goes
                        kept = self.record(item)
                        return kept if any(key != time_key for key in kept) else _DROP
                    self._count(IMPOSSIBLE_SAMPLES)
                    return _DROP
            elif kind is dict or kind is list:
                nested = True
        return self.record(item) if nested else item

    def _outside(self, text: str) -> bool:
        """Whether a time written unlike the window's bounds (another offset, ``Z``, no fraction) is outside it."""
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return True  # not a time at all: it cannot be placed in the window
        if self.low.tzinfo is None:  # a window in local wall-clock time: so is the sample, whatever its offset
            moment = moment.replace(tzinfo=None)
        elif moment.tzinfo is None:  # a sample without an offset: the window's
            moment = moment.replace(tzinfo=self.low.tzinfo)
        return moment < self.low or moment > self.high


def _get(data: dict[str, Any], path: Path) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _without(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A copy of ``data`` (and of the dicts on ``path``) without the value at ``path``."""
    out = dict(data)
    if len(path) == 1:
        del out[path[0]]
    else:
        out[path[0]] = _without(data[path[0]], path[1:])
    return out
