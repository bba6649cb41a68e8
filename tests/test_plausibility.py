"""Plausibility (transforms/plausibility.py): impossible samples and values never reach a destination, a record that
cannot be true is dead-lettered with its bytes and a readable reason, and what providers really send passes untouched.

Records are mapped from realistic provider documents (the conformance fixtures, changed where a rule needs it)."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_provider_conformance import GOOD, _normalize, _payloads

from connectors import registry
from connectors.base import Fragment
from core.dead_letters import read_dead_letters
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from pipelines.replay import select
from schemas.serde import validate_record
from sinks.sql import SqlSink
from transforms.plausibility import (
    AGGREGATES_DROPPED,
    IMPOSSIBLE_SAMPLES,
    IMPOSSIBLE_VALUES,
    SAMPLES_OUTSIDE_WINDOW,
    Implausible,
    check_record,
)

FIXTURES = Path(__file__).parent / "fixtures"
THREE_YEARS_S = 3 * 365 * 86_400


def _fixture(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


def _mapped(slug: str, kind: str, payload: Any) -> list[tuple[str, dict[str, Any]]]:
    """(model type, validated record) of each record a payload maps to: what the check is given in the pipeline."""
    return [(f.type, validate_record(f.type, f.data)) for f in _normalize(registry()[slug], kind, payload)
            if isinstance(f, Fragment)]


def _one(slug: str, kind: str, payload: Any) -> tuple[str, dict[str, Any]]:
    (record,) = _mapped(slug, kind, payload)
    return record


def _garmin_daily(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(_fixture("garmin/dailies.through_the_day.json")[0])
    body["dailies"][0].update(changes)
    return body


def _garmin_sleep(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(_fixture("garmin/sleeps.final.json"))
    body["sleeps"] = [dict(body["sleeps"][0], **changes)]
    return body


def _oura_sleep(**changes: Any) -> dict[str, Any]:
    page = copy.deepcopy(_fixture("oura/sleep.page.json"))
    page["data"] = [dict(page["data"][0], **changes)]
    return page


def _polar_sleep(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(_fixture("polar/sleep.json"))
    body["nights"] = [dict(body["nights"][0], **changes)]
    return body


def _sixteen_hour_deep_segment() -> dict[str, Any]:
    """A Garmin night of 7.5 h whose sleepLevelsMap holds one deep segment running 16 h past the night's start."""
    body = _garmin_sleep()
    sleep = body["sleeps"][0]
    sleep["sleepLevelsMap"]["deep"][0]["endTimeInSeconds"] = sleep["startTimeInSeconds"] + 16 * 3600
    return body


# --- what providers really send passes untouched ----------------------------------------------------------------

@pytest.mark.parametrize(("slug", "kind", "path"), GOOD, ids=[f"{s}/{p.name}" for s, _, p in GOOD])
def test_every_realistic_fixture_passes_unchanged(slug: str, kind: str, path: Path) -> None:
    for payload in _payloads(path):
        for model_type, record in _mapped(slug, kind, payload):
            before = copy.deepcopy(record)
            checked, dropped = check_record(model_type, record)
            assert dropped == {}
            assert checked is record  # no copy of a clean record
            assert record == before


# --- samples outside the window ----------------------------------------------------------------------------------

def test_a_garmin_daily_sample_years_away_is_dropped_and_counted() -> None:
    samples = {"15": 52, "30": 51, "45": 53, str(THREE_YEARS_S): 64, "25200": 88, "25215": 91}
    _, record = _one("garmin", "dailies", _garmin_daily(timeOffsetHeartRateSamples=samples))
    original = copy.deepcopy(record)
    assert len(record["heart_rate_data"]["detailed"]["hr_samples"]) == 6

    checked, dropped = check_record("daily", record)

    assert dropped == {SAMPLES_OUTSIDE_WINDOW: 1}
    assert checked["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-11T00:00:15.000000-05:00", "bpm": 52},
        {"timestamp": "2024-03-11T00:00:30.000000-05:00", "bpm": 51},
        {"timestamp": "2024-03-11T00:00:45.000000-05:00", "bpm": 53},
        {"timestamp": "2024-03-11T07:00:00.000000-05:00", "bpm": 88},
        {"timestamp": "2024-03-11T07:00:15.000000-05:00", "bpm": 91},
    ]
    # the mapper's mean, with the plausible 64 bpm 3 years away, lies within the kept samples (51-91): it stays, as
    # Garmin's own min/max do
    assert checked["heart_rate_data"]["summary"] == {"avg_hr_bpm": 66.5, "min_hr_bpm": 47, "max_hr_bpm": 118,
                                                     "resting_hr_bpm": 51}
    assert record == original  # the input never changes
    assert checked["calories_data"] is record["calories_data"]  # what did not change is shared, not copied


def test_sleep_samples_straddling_the_window_within_an_hour_stay_and_beyond_go() -> None:
    """Oura's 5-minute heart-rate series, starting 50 min (kept) or 2 h (partly dropped) before bedtime_start."""
    page = _oura_sleep()
    series = page["data"][0]["heart_rate"]
    series["timestamp"] = "2024-03-10T22:22:00.000+01:00"  # 50 min before 23:12
    _, record = _one("oura", "sleep", page)
    assert check_record("sleep", record) == (record, {})

    series["timestamp"] = "2024-03-10T21:12:00.000+01:00"  # 2 h before: items 1..11 are before 22:12 (item 0 is null)
    _, record = _one("oura", "sleep", page)
    checked, dropped = check_record("sleep", record)
    assert dropped == {SAMPLES_OUTSIDE_WINDOW: 11}
    # Oura's own average and lowest heart rate (of its whole night) stay: the average lies within the kept samples
    assert checked["heart_rate_data"]["summary"] == {"avg_hr_bpm": 54.736, "min_hr_bpm": 48, "avg_hrv_rmssd": 58}
    assert checked["heart_rate_data"]["detailed"]["hr_samples"][0] == {"timestamp": "2024-03-10T22:12:00.000000+01:00",
                                                                       "bpm": 48.0}


def test_a_sample_written_in_another_offset_is_placed_by_its_instant() -> None:
    """In a long series checked whole, one time written at -12:00 reads as inside the night (05:00 < 06:58) but is
    17:00+01:00, ten hours after it; one written at +00:00 inside the night stays."""
    _, record = _one("oura", "sleep", _oura_sleep())
    samples = record["heart_rate_data"]["detailed"]["hr_samples"]
    assert len(samples) == 91
    changed = copy.deepcopy(record)
    changed["heart_rate_data"]["detailed"]["hr_samples"][40]["timestamp"] = "2024-03-11T05:00:00.000000-12:00"
    changed["heart_rate_data"]["detailed"]["hr_samples"][41]["timestamp"] = "2024-03-11T01:40:00.000000+00:00"
    checked, dropped = check_record("sleep", changed)
    assert dropped == {SAMPLES_OUTSIDE_WINDOW: 1}
    kept = checked["heart_rate_data"]["detailed"]["hr_samples"]
    assert len(kept) == 90 and kept[40]["timestamp"] == "2024-03-11T01:40:00.000000+00:00"


def test_overnight_spo2_dated_by_the_morning_it_ends_stays_with_its_day() -> None:
    """Garmin pulse ox of a night that began at 18:00 the evening before the calendarDate: within DAY_EARLY."""
    model_type, record = _one("garmin", "pulseox", _fixture("garmin/pulseox.json"))
    assert check_record(model_type, record) == (record, {})


def test_a_local_day_without_offset_keeps_samples_by_their_wall_clock_time() -> None:
    """A day written without its offset (Polar nightly recharge, Garmin user metrics) holds 00:30 at UTC+14 and 23:30
    at UTC-12 (13.5 h before and 11.5 h after the day taken as UTC); a sample a week later still goes."""
    record = {"metadata": {"start_time": "2024-03-11T00:00:00.000000", "end_time": "2024-03-12T00:00:00.000000",
                           "upload_type": 1, "timestamp_localization": 1},
              "heart_rate_data": {"detailed": {"hr_samples": [
                  {"timestamp": "2024-03-11T00:30:00.000000+14:00", "bpm": 55},
                  {"timestamp": "2024-03-11T23:30:00.000000-12:00", "bpm": 61},
                  {"timestamp": "2024-03-18T23:30:00.000000-12:00", "bpm": 58}]}}}
    checked, dropped = check_record("daily", record)
    assert dropped == {SAMPLES_OUTSIDE_WINDOW: 1}
    assert [s["bpm"] for s in checked["heart_rate_data"]["detailed"]["hr_samples"]] == [55, 61]


# --- impossible values -------------------------------------------------------------------------------------------

def test_heart_rates_of_0_and_over_250_bpm_are_dropped() -> None:
    samples = {"15": 52, "30": 0, "45": 53, "25200": 88, "25215": 312}
    _, record = _one("garmin", "dailies", _garmin_daily(timeOffsetHeartRateSamples=samples,
                                                        maxHeartRateInBeatsPerMinute=255))
    # Garmin's 0 bpm means "no reading": its mapper leaves that sample out; the check takes out 312 bpm, and the
    # mapper's mean is of the plausible samples only (52, 53, 88), so it stays; Garmin's max of 255 goes
    assert record["heart_rate_data"]["summary"]["avg_hr_bpm"] == 64.33
    checked, dropped = check_record("daily", record)
    assert dropped == {IMPOSSIBLE_SAMPLES: 1, IMPOSSIBLE_VALUES: 1}
    assert [s["bpm"] for s in checked["heart_rate_data"]["detailed"]["hr_samples"]] == [52, 53, 88]
    assert checked["heart_rate_data"]["summary"] == {"avg_hr_bpm": 64.33, "min_hr_bpm": 47, "resting_hr_bpm": 51}

    zero = {"metadata": {"start_time": "2024-03-11T00:00:00.000000-05:00",
                         "end_time": "2024-03-12T00:00:00.000000-05:00", "upload_type": 1, "timestamp_localization": 1},
            "heart_rate_data": {"detailed": {"hr_samples": [
                {"timestamp": "2024-03-11T07:00:00.000000-05:00", "bpm": 0},
                {"timestamp": "2024-03-11T07:00:15.000000-05:00", "bpm": 64}]}}}
    checked, dropped = check_record("daily", zero)
    assert dropped == {IMPOSSIBLE_SAMPLES: 1}
    assert checked["heart_rate_data"]["detailed"]["hr_samples"] == [{"timestamp": "2024-03-11T07:00:15.000000-05:00",
                                                                     "bpm": 64}]


def test_spo2_over_100_percent_is_dropped() -> None:
    body = _fixture("garmin/pulseox.json")
    body["pulseox"][0]["timeOffsetSpo2Values"] = {"0": 96, "60": 104, "120": 97, "180": 94}
    model_type, record = _one("garmin", "pulseox", body)
    checked, dropped = check_record(model_type, record)
    assert dropped == {IMPOSSIBLE_SAMPLES: 1}
    assert [s["percentage"] for s in checked["oxygen_data"]["saturation_samples"]] == [96, 97, 94]
    assert "avg_saturation_percentage" not in record["oxygen_data"]  # nothing derived from 104 % to drop


def test_sleep_efficiency_over_100_and_negative_durations_are_dropped() -> None:
    _, record = _one("oura", "sleep", _oura_sleep(efficiency=130, latency=-540))
    checked, dropped = check_record("sleep", record)
    assert dropped == {IMPOSSIBLE_VALUES: 2}
    durations = checked["sleep_durations_data"]
    assert "sleep_efficiency" not in durations
    assert durations["awake"] == {"duration_awake_state_seconds": 2160}
    assert durations["asleep"] is record["sleep_durations_data"]["asleep"]


def test_breathing_rates_outside_1_to_80_per_minute_are_dropped_with_their_aggregates() -> None:
    """A Garmin night's respiration with a 96/min reading (a motion artefact): the sample, the max of 96 and the
    average the mapper computed with it (33.9, beyond the kept readings' 12.5-14) go; the min and the rest stay."""
    body = _garmin_sleep(timeOffsetSleepRespiration={"0": 14.0, "1800": 96.0, "3600": 13.0, "7200": 12.5})
    _, record = _one("garmin", "sleeps", body)
    assert record["respiration_data"]["breaths_data"]["max_breaths_per_min"] == 96.0
    checked, dropped = check_record("sleep", record)
    assert dropped == {IMPOSSIBLE_SAMPLES: 1, IMPOSSIBLE_VALUES: 1, AGGREGATES_DROPPED: 1}  # the max is 96 itself
    breaths = checked["respiration_data"]["breaths_data"]
    assert [s["breaths_per_min"] for s in breaths["samples"]] == [14.0, 13.0, 12.5]
    assert breaths["min_breaths_per_min"] == 12.5
    assert not {"avg_breaths_per_min", "max_breaths_per_min"} & set(breaths)


def test_a_height_in_metres_a_weight_in_pounds_and_an_impossible_vo2_max_are_dropped() -> None:
    """Polar physical info typed in the wrong units: height 1.79 (metres in a cm field) goes from its measurement,
    whose weight stays (a Body measurement holds several values); VO2 max 230 goes from the summary and the sample
    list, and the blocks left empty go too."""
    body = dict(_fixture("polar/physical-info.json"), height=1.79, vo2_max=230)
    _, record = _one("polar", "physical-info", body)
    checked, dropped = check_record("body", record)
    assert dropped == {IMPOSSIBLE_SAMPLES: 1, IMPOSSIBLE_VALUES: 2}
    assert record["measurements_data"]["measurements"] and record["oxygen_data"]["vo2_samples"]
    assert set(checked) == {"metadata", "heart_data", "measurements_data"}
    assert checked["measurements_data"]["measurements"] == [{"measurement_time": "2024-03-09T23:15:31.000000+00:00",
                                                             "weight_kg": 72.4}]
    assert checked["heart_data"] is record["heart_data"]

    _, record = _one("polar", "physical-info", dict(body, height=179.0, weight=712.0, vo2_max=52))  # pounds as kg
    checked, dropped = check_record("body", record)
    assert dropped == {IMPOSSIBLE_VALUES: 1}
    assert checked["measurements_data"]["measurements"] == [{"measurement_time": "2024-03-09T23:15:31.000000+00:00",
                                                             "height_cm": 179.0}]
    _, record = _one("polar", "physical-info", dict(body, height=179.0, weight=0.4, vo2_max=52))  # a newborn: kept
    assert check_record("body", record) == (record, {})


def test_a_negative_hrv_is_dropped() -> None:
    _, record = _one("oura", "sleep", _oura_sleep(average_hrv=-58))
    checked, dropped = check_record("sleep", record)
    assert dropped == {IMPOSSIBLE_VALUES: 1}
    assert "avg_hrv_rmssd" not in checked["heart_rate_data"]["summary"]


def test_a_lap_loses_only_its_impossible_value() -> None:
    record = {"metadata": {"summary_id": "a1", "start_time": "2024-03-11T07:00:00.000000+01:00",
                           "end_time": "2024-03-11T08:00:00.000000+01:00", "type": 8, "upload_type": 1},
              "lap_data": {"laps": [{"start_time": "2024-03-11T07:00:00.000000+01:00", "avg_hr_bpm": 0,
                                     "distance_meters": 1000.0}]}}
    checked, dropped = check_record("activity", record)
    assert dropped == {IMPOSSIBLE_VALUES: 1}
    assert checked["lap_data"]["laps"] == [{"start_time": "2024-03-11T07:00:00.000000+01:00",
                                            "distance_meters": 1000.0}]


# --- whole records that cannot be true ---------------------------------------------------------------------------

def test_a_garmin_night_with_a_16_hour_deep_segment_ends_where_its_totals_say() -> None:
    """The segment no longer stretches the night (Garmin's own published example does this): the night ends at
    start + asleep + awake, the overrun is cut, and the record passes untouched."""
    _, record = _one("garmin", "sleeps", _sixteen_hour_deep_segment())
    assert (record["metadata"]["start_time"], record["metadata"]["end_time"]) == (
        "2024-03-10T23:12:00.000000-05:00", "2024-03-11T06:58:00.000000-05:00")
    assert check_record("sleep", record) == (record, {})


def test_a_sleep_window_mostly_unexplained_is_implausible() -> None:
    """An Oura night whose bedtime_end is 18 h after its start while time in bed, sleep, awake time and latency say
    7.9 h: more than max(2 h, 7.9 h) unexplained, beyond the hour of DST slack of a window with one offset."""
    _, record = _one("oura", "sleep", _oura_sleep(bedtime_end="2024-03-11T17:12:00+01:00"))
    with pytest.raises(Implausible, match=r"^sleep 6f1c2a70-0b8e-4a4e-9d55-3c1a0b9e2f41: window of 18.0 h .* but "
                                          r"asleep \+ awake \+ latencies account for only 7.9 h of it$"):
        check_record("sleep", record)


def test_latencies_and_a_matching_time_in_bed_explain_a_sleep_window() -> None:
    """A Fitbit classic log of 10 h in bed: 150 min to fall asleep, 210 asleep, 30 awake, 210 in bed after waking."""
    response = copy.deepcopy(_fixture("fitbit/sleep.json"))
    log = response["sleep"][1]
    log.update(logId=45019870113, isMainSleep=True, startTime="2024-03-10T21:00:00.000",
               endTime="2024-03-11T07:00:00.000", duration=36_000_000, timeInBed=600, minutesToFallAsleep=150,
               minutesAsleep=210, minutesAwake=30, minutesAfterWakeup=210, efficiency=35)
    log["levels"] = {"summary": {"asleep": {"count": 0, "minutes": 210}, "restless": {"count": 3, "minutes": 20},
                                 "awake": {"count": 1, "minutes": 10}},
                     "data": [{"dateTime": "2024-03-10T21:00:00.000", "level": "awake", "seconds": 9000},
                              {"dateTime": "2024-03-10T23:30:00.000", "level": "asleep", "seconds": 27000}]}
    response["sleep"] = [log]
    _, record = _one("fitbit", "sleep", response)
    assert record["sleep_durations_data"]["awake"]["sleep_latency_seconds"] == 9000
    assert check_record("sleep", record) == (record, {})
    # time in bed unlike the window: the latencies alone account for it
    record["sleep_durations_data"]["other"]["duration_in_bed_seconds"] = 25_200
    assert check_record("sleep", record) == (record, {})
    del record["sleep_durations_data"]["awake"]["sleep_latency_seconds"]
    del record["sleep_durations_data"]["awake"]["wake_up_latency_seconds"]  # 6 h of 10 unexplained
    with pytest.raises(Implausible, match=r"account for only 4.0 h"):
        check_record("sleep", record)


def _fitbit_night_across_the_autumn_dst_change(profile: dict[str, Any] | None) -> dict[str, Any]:
    """A real New York night of 2024-11-03 (clocks back at 02:00): 23:00 to 07:00 on the wall clock is 9 h in bed."""
    response = copy.deepcopy(_fixture("fitbit/sleep.json"))
    log = response["sleep"][0]
    log.update(dateOfSleep="2024-11-03", startTime="2024-11-02T23:00:00.000", endTime="2024-11-03T07:00:00.000",
               duration=9 * 3_600_000, timeInBed=540, minutesAsleep=480, minutesAwake=60, minutesAfterWakeup=0,
               minutesToFallAsleep=0)
    log["levels"] = {"summary": {"deep": {"count": 3, "minutes": 90, "thirtyDayAvgMinutes": 80},
                                 "light": {"count": 20, "minutes": 270, "thirtyDayAvgMinutes": 250},
                                 "rem": {"count": 5, "minutes": 120, "thirtyDayAvgMinutes": 100},
                                 "wake": {"count": 10, "minutes": 60, "thirtyDayAvgMinutes": 50}},
                     "data": [{"dateTime": "2024-11-02T23:00:00.000", "level": "light", "seconds": 32_400}],
                     "shortData": []}
    response["sleep"] = [log]
    response.pop("_profile")
    if profile is not None:
        response["_profile"] = profile
    return response


@pytest.mark.parametrize("profile", [None, {"offsetFromUTCMillis": -18_000_000}], ids=["no profile", "offset only"])
def test_a_wall_clock_night_across_the_autumn_dst_change_is_accepted(profile: dict[str, Any] | None) -> None:
    """Without an IANA zone the window is 8 h on the wall clock for 9 h in bed: an hour of DST slack."""
    _, record = _one("fitbit", "sleep", _fitbit_night_across_the_autumn_dst_change(profile))
    assert record["sleep_durations_data"]["other"]["duration_in_bed_seconds"] == 32_400
    assert check_record("sleep", record) == (record, {})
    record["sleep_durations_data"]["other"]["duration_in_bed_seconds"] = 39_600  # 11 h: beyond the slack
    with pytest.raises(Implausible, match=r"duration_in_bed_seconds of 11.0 h does not fit its 8.0 h window"):
        check_record("sleep", record)


def test_a_window_with_two_offsets_gets_no_dst_slack() -> None:
    """With the user's zone the window is the true 9 h; 10.5 h in bed is beyond max(15 min, 10 %)."""
    response = _fitbit_night_across_the_autumn_dst_change({"timezone": "America/New_York",
                                                           "offsetFromUTCMillis": -18_000_000})
    _, record = _one("fitbit", "sleep", response)
    assert record["metadata"]["end_time"] == "2024-11-03T07:00:00.000000-05:00"
    assert check_record("sleep", record) == (record, {})
    record["sleep_durations_data"]["other"]["duration_in_bed_seconds"] = 37_800
    with pytest.raises(Implausible, match=r"duration_in_bed_seconds of 10.5 h does not fit its 9.0 h window"):
        check_record("sleep", record)


def test_an_oura_night_of_4_hours_with_16_hours_of_deep_sleep_is_implausible() -> None:
    page = _oura_sleep(bedtime_end="2024-03-11T03:12:00+01:00", time_in_bed=14400, total_sleep_duration=13800,
                       awake_time=600, deep_sleep_duration=57600)
    _, record = _one("oura", "sleep", page)
    with pytest.raises(Implausible, match=r"^sleep 6f1c2a70-0b8e-4a4e-9d55-3c1a0b9e2f41: "
                                          r"duration_deep_sleep_state_seconds of 16.0 h does not fit its 4.0 h window"):
        check_record("sleep", record)


def test_a_polar_night_whose_stages_exceed_its_window_is_implausible() -> None:
    _, record = _one("polar", "sleep", _polar_sleep(sleep_end_time="2024-03-11T03:12:30+01:00", deep_sleep=57600))
    with pytest.raises(Implausible, match=r"sleep .* does not fit its 4.0 h window"):
        check_record("sleep", record)


def test_stage_totals_within_the_tolerance_are_accepted() -> None:
    """Oura's time_in_bed 10 min over its bedtime window (rounding of 30-second epochs) is not a reason to refuse."""
    _, record = _one("oura", "sleep", _oura_sleep(time_in_bed=27960 + 600))
    assert check_record("sleep", record) == (record, {})


def test_an_activity_that_ends_before_it_starts_is_implausible() -> None:
    """(Garmin's mapper already refuses a negative ``durationInSeconds``; a record of any provider can end early.)"""
    body = copy.deepcopy(_fixture("garmin/activities.json"))
    body["activities"] = body["activities"][:1]
    _, record = _one("garmin", "activities", body)
    record["metadata"]["end_time"] = "2024-03-11T05:43:30.000000+05:30"
    with pytest.raises(Implausible, match=r"^activity \d+: ends before it starts: "
                                          r"start_time 2024-03-11T06:30:00.000000\+05:30, "
                                          r"end_time 2024-03-11T05:43:30.000000\+05:30$"):
        check_record("activity", record)


def test_a_withings_sleep_of_three_days_is_implausible() -> None:
    body = copy.deepcopy(_fixture("withings/sleep_getsummary.json"))
    night = body["body"]["series"][0]
    body["body"]["series"] = [dict(night, enddate=night["startdate"] + 3 * 86_400)]
    _, record = _one("withings", "sleep_getsummary", body)
    with pytest.raises(Implausible, match=r"window of 72.0 h .* longer than any sleep can be \(24.0 h\)"):
        check_record("sleep", record)


def test_negative_withings_steps_and_distance_are_dropped() -> None:
    body = copy.deepcopy(_fixture("withings/getactivity.json"))
    body["body"]["activities"] = [dict(body["body"]["activities"][0], steps=-15697, distance=-12217.4)]
    _, record = _one("withings", "getactivity", body)
    checked, dropped = check_record("daily", record)
    assert dropped == {IMPOSSIBLE_VALUES: 2}
    assert checked["distance_data"] == {"floors_climbed": 11}


def test_a_garmin_activity_lasting_years_is_implausible() -> None:
    body = copy.deepcopy(_fixture("garmin/activities.json"))
    key = next(iter(body))
    body[key] = [dict(body[key][0], durationInSeconds=THREE_YEARS_S)]
    model_type, record = _one("garmin", key, body)
    with pytest.raises(Implausible, match=r"window of 26280.0 h .* longer than any activity can be \(744.0 h\)"):
        check_record(model_type, record)


def test_a_garmin_expedition_of_28_days_is_accepted() -> None:
    """Garmin's Expedition mode records one activity for up to about 28 days (the cap is 31 days)."""
    body = copy.deepcopy(_fixture("garmin/activities.json"))
    key = next(iter(body))
    body[key] = [dict(body[key][0], activityType="HIKING", durationInSeconds=28 * 86_400)]
    model_type, record = _one("garmin", key, body)
    assert check_record(model_type, record)[0] is record


# --- in the pipeline ---------------------------------------------------------------------------------------------

def _line(provider: str, kind: str, payload: Any, user_id: str | None = None) -> str:
    event = {"provider": provider, "kind": kind, "received_at": 1_710_200_000_000, "payload": json.dumps(payload)}
    if user_id is not None:
        event["user_id"] = user_id
    return json.dumps(event)


def test_pipeline_counts_dropped_samples_and_dead_letters_an_implausible_sleep(tmp_path: Path) -> None:
    samples = {"15": 52, "30": 51, "45": 53, str(THREE_YEARS_S): 64, "25200": 88, "25215": 312}
    years = copy.deepcopy(_fixture("garmin/activities.json"))
    years["activities"] = [dict(years["activities"][0], durationInSeconds=THREE_YEARS_S)]
    implausible = _line("garmin", "activities", years)
    lines = [_line("garmin", "dailies", _garmin_daily(timeOffsetHeartRateSamples=samples)), implausible,
             _line("oura", "sleep", _fixture("oura/sleep.page.json"), user_id="oura-user")]
    source = tmp_path / "raw.jsonl"
    source.write_text("\n".join(lines) + "\n")
    database, dead_letters = tmp_path / "out.db", tmp_path / "dlq"

    summary = run_batch(NormalizeJob(FileSource(str(source)), [SqlSink("sql", f"sqlite:///{database}")],
                                     str(dead_letters), state_url=f"sqlite:///{tmp_path / 'state.db'}"))

    assert summary.with_prefix("plausibility:") == {SAMPLES_OUTSIDE_WINDOW: 1, IMPOSSIBLE_SAMPLES: 1}
    assert summary.get("dead_letter:plausibility") == 1
    (letter,) = read_dead_letters(str(dead_letters))
    assert letter["stage"] == "plausibility" and letter["error_class"] == "Implausible"
    assert letter["original"] == implausible.encode()
    assert letter["provider"] == "garmin" and letter["kind"] == "activities"
    assert letter["error_message"] == (
        "activity 14562379901: window of 26280.0 h (2024-03-11T06:30:00.000000+05:30 to "
        "2027-03-11T06:30:00.000000+05:30) is longer than any activity can be (744.0 h)")
    assert [d["dead_letter_id"] for d in select(str(dead_letters), ingest=True)] == [letter["dead_letter_id"]]
    with sqlite3.connect(database) as conn:
        delivered = {(t, k): json.loads(p) for t, k, p in conn.execute(
            "SELECT type, natural_key, payload FROM healthflow_records")}
    # the daily and Oura's two sleeps; not the implausible Garmin activity
    assert sorted(delivered) == [("daily", "2024-03-11"), ("sleep", "6f1c2a70-0b8e-4a4e-9d55-3c1a0b9e2f41"),
                                 ("sleep", "c81e2d44-7a90-4f3b-8d2e-5b6a1c9f0e73")]
    daily = delivered[("daily", "2024-03-11")]
    assert [s["bpm"] for s in daily["heart_rate_data"]["detailed"]["hr_samples"]] == [52, 51, 53, 88]
    # the mapper's mean of the plausible samples (52, 51, 53, 64, 88) stays: it lies within the kept ones
    assert daily["heart_rate_data"]["summary"] == {"avg_hr_bpm": 61.6, "min_hr_bpm": 47, "max_hr_bpm": 118,
                                                   "resting_hr_bpm": 51}


def test_an_implausible_record_is_dead_lettered_alone_and_its_documents_other_records_are_delivered(
        tmp_path: Path) -> None:
    """A Fitbit activity log page (one document, three records) whose second log kept recording for 40 days: that
    activity goes to the dead letters, with the page's bytes and a reason naming it; the other two reach SQL."""
    page = copy.deepcopy(_fixture("fitbit/activities.json"))
    page["activities"][1]["duration"] = 40 * 86_400_000
    line = _line("fitbit", "activities", page, user_id="fitbit-user")
    source = tmp_path / "raw.jsonl"
    source.write_text(line + "\n")
    database, dead_letters = tmp_path / "out.db", tmp_path / "dlq"

    summary = run_batch(NormalizeJob(FileSource(str(source)), [SqlSink("sql", f"sqlite:///{database}")],
                                     str(dead_letters), state_url=f"sqlite:///{tmp_path / 'state.db'}"))

    assert summary.get("dead_letter:plausibility") == 1
    (letter,) = read_dead_letters(str(dead_letters))
    assert (letter["stage"], letter["error_class"], letter["provider"], letter["kind"]) == (
        "plausibility", "Implausible", "fitbit", "activities")
    assert letter["original"] == line.encode()
    assert letter["error_message"] == (
        "activity 61234600112: window of 960.0 h (2024-03-11T12:31:00.000000+01:00 to "
        "2024-04-20T12:31:00.000000+01:00) is longer than any activity can be (744.0 h)")
    with sqlite3.connect(database) as conn:
        delivered = sorted(conn.execute("SELECT type, natural_key FROM healthflow_records"))
    assert delivered == [("activity", "61234567890"), ("activity", "61235044871")]


def test_garmins_published_weigh_in_of_751_kg_loses_the_weight_not_its_body_fat() -> None:
    """Garmin's Health API spec example ``EXAMPLE_678902`` weighs 751,732 g (a typo for 75,173): the weight goes,
    the same weigh-in's body fat, BMI, water, bone and muscle mass stay."""
    body = {"bodyComps": [{"userId": "4aacafe82427c251df9c9592d0c06768", "summaryId": "EXAMPLE_678902",
                           "measurementTimeInSeconds": 1439784330, "measurementTimeOffsetInSeconds": 0,
                           "muscleMassInGrams": 25482, "boneMassInGrams": 2434, "bodyWaterInPercent": 59.8,
                           "bodyFatInPercent": 17.3, "bodyMassIndex": 23.1, "weightInGrams": 751732}]}
    _, record = _one("garmin", "bodyComps", body)
    checked, dropped = check_record("body", record)
    assert dropped == {IMPOSSIBLE_VALUES: 1}
    assert checked["measurements_data"]["measurements"] == [
        {"measurement_time": "2015-08-17T04:05:30.000000+00:00", "bodyfat_percentage": 17.3, "BMI": 23.1,
         "bone_mass_g": 2434, "muscle_mass_g": 25482, "water_percentage": 59.8}]
