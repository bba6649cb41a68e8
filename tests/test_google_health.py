"""Google Health API mappers: exact Terra values from the documented data point shapes (fixtures), the request
filters the manifest sends, and refusals that name the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from connectors import registry
from connectors.base import MappingError
from connectors.timeutil import format_bound, parse_iso
from schemas.serde import validate_record
from transforms.plausibility import IMPOSSIBLE_SAMPLES, IMPOSSIBLE_VALUES, check_record

FIXTURES = Path(__file__).parent / "fixtures" / "google_health"
PROVIDER = registry()["google_health"]


def page(kind: str) -> dict:
    return json.loads((FIXTURES / f"{kind}.json").read_text())


def records(kind: str, payload: dict | None = None) -> list:
    return list(PROVIDER.normalize(payload or page(kind), kind, "hu-1"))


def test_manifest_names_google_oauth_and_documented_limits():
    manifest = PROVIDER.manifest
    assert (manifest.terra_name, str(manifest.auth.token_url)) == ("GOOGLE_HEALTH", "https://oauth2.googleapis.com/token")
    assert manifest.auth.pkce and not manifest.auth.refresh_token_rotates
    assert (manifest.auth.profile.path, manifest.auth.profile.user_field) == ("/v4/users/me/identity", "healthUserId")
    assert [(r.requests, r.per_seconds, r.scope) for r in manifest.api.rate_limits] == [(120000, 60, "app"),
                                                                                         (300, 60, "user")]
    assert manifest.api.endpoints["sleep"].params == {"pageSize": "25"}  # the documented maximum for sessions


def test_window_becomes_one_filter_parameter():
    endpoint = PROVIDER.manifest.api.endpoints["sleep"]
    start, end = parse_iso("2026-03-14T00:00:00Z"), parse_iso("2026-03-15T00:00:00Z")
    path = endpoint.path.replace("{start}", format_bound(start, "datetime", False)).replace(
        "{end}", format_bound(end, "datetime", True))
    url = requests.Request("GET", "https://health.googleapis.com" + path, params=endpoint.params).prepare().url
    assert urlsplit(url).path == "/v4/users/me/dataTypes/sleep/dataPoints"
    assert parse_qs(urlsplit(url).query) == {
        "filter": ['sleep.interval.end_time >= "2026-03-14T00:00:00.000Z" AND '
                   'sleep.interval.end_time < "2026-03-15T00:00:00.000Z"'], "pageSize": ["25"]}


def test_exercise_maps_times_units_and_laps():
    run, yoga = records("exercise")
    data = run.data
    assert data["metadata"] == {"summary_id": "2026443605080188808", "start_time": "2026-04-12T06:05:10.000000-07:00",
                                "end_time": "2026-04-12T06:52:40.000000-07:00", "type": 8, "upload_type": 1,
                                "name": "Morning run", "timestamp_localization": 1}
    assert data["active_durations_data"] == {"activity_seconds": 2730}
    assert data["calories_data"] == {"net_activity_calories": 512.4}  # active energy, basal excluded
    assert data["distance_data"]["summary"] == {"distance_meters": 8043.5, "steps": 7410,
                                                "elevation": {"gain_actual_meters": 41.0}}
    assert data["heart_rate_data"]["summary"]["avg_hr_bpm"] == 151
    assert data["heart_rate_data"]["summary"]["hr_zone_data"] == [
        {"zone": 1, "name": "LIGHT", "duration_seconds": 300}, {"zone": 2, "name": "MODERATE", "duration_seconds": 900},
        {"zone": 3, "name": "VIGOROUS", "duration_seconds": 1380}, {"zone": 4, "name": "PEAK", "duration_seconds": 150}]
    assert data["movement_data"] == {"avg_speed_meters_per_second": 2.946, "avg_pace_minutes_per_kilometer": 5.657}
    assert data["lap_data"]["laps"][1] == {
        "start_time": "2026-04-12T06:10:52.000000-07:00", "end_time": "2026-04-12T06:16:30.000000-07:00",
        "distance_meters": 1000.0, "calories": 64.0, "avg_hr_bpm": 149, "avg_speed_meters_per_second": 2.959}
    assert data["device_data"] == {"name": "Pixel Watch 4", "manufacturer": "Google"}
    assert run.version_ms == 1776002477402  # updateTime 2026-04-12T14:01:17.402913Z, nanos trimmed
    assert (yoga.data["metadata"]["type"], yoga.data["metadata"]["upload_type"]) == (100, 2)  # MANUAL recording


def test_sleep_maps_stages_summary_and_nap():
    night, nap = records("sleep")
    assert night.data["metadata"] == {"summary_id": "a1b2c3d4-e5f6-7890-1234-567890abcdef",
                                      "start_time": "2026-03-14T23:41:00.000000+01:00",
                                      "end_time": "2026-03-15T07:12:00.000000+01:00", "upload_type": 2,
                                      "is_nap": False, "timestamp_localization": 1}
    durations = night.data["sleep_durations_data"]
    assert durations["asleep"] == {
        "duration_asleep_state_seconds": 25320, "duration_deep_sleep_state_seconds": 4320,
        "duration_light_sleep_state_seconds": 14520, "duration_REM_sleep_state_seconds": 6480, "num_REM_events": 2}
    assert durations["awake"] == {"duration_awake_state_seconds": 1740, "sleep_latency_seconds": 840,
                                  "wake_up_latency_seconds": 600, "num_wakeup_events": 3, "num_out_of_bed_events": 1}
    assert durations["other"] == {"duration_in_bed_seconds": 27060}
    assert [(s["timestamp"][11:16], s["level"]) for s in durations["hypnogram_samples"]] == [
        ("23:41", 1), ("23:55", 4), ("01:10", 5), ("02:22", 4), ("03:40", 6), ("04:31", 1), ("04:36", 4),
        ("06:05", 6), ("07:02", 1)]
    assert nap.data["metadata"]["is_nap"] is True
    # classic stages: ASLEEP → SLEEPING (2), RESTLESS → AWAKE (1)
    assert [s["level"] for s in nap.data["sleep_durations_data"]["hypnogram_samples"]] == [2, 1, 2]


def test_steps_and_heart_rate_are_samples_of_the_local_day():
    _, early, next_day = records("steps")
    assert early.data["metadata"] == {"start_time": "2026-04-12T00:00:00.000000-07:00",
                                      "end_time": "2026-04-13T00:00:00.000000-07:00", "upload_type": 1,
                                      "timestamp_localization": 1}
    assert early.data["distance_data"]["detailed"]["step_samples"] == [  # the minute 06:05-06:06, at its end
        {"timestamp": "2026-04-12T06:06:00.000000-07:00", "steps": 158}]
    # 06:59Z on the 13th is still the 12th at -07:00
    assert next_day.data["metadata"]["start_time"] == "2026-04-12T00:00:00.000000-07:00"
    active, resting, unspecified = records("heart-rate")
    assert active.data["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2026-04-12T06:40:05.000000-07:00", "bpm": 158, "context": 1}]
    assert resting.data["heart_rate_data"]["detailed"]["hr_samples"][0]["context"] == 2
    assert unspecified.data["heart_rate_data"]["detailed"]["hr_samples"][0] == {
        "timestamp": "2026-04-11T23:30:00.250000-07:00", "bpm": 61, "context": 0}


def test_daily_summaries_use_their_date_in_utc():
    rhr = records("daily-resting-heart-rate")[0].data
    assert rhr == {"metadata": {"start_time": "2026-04-12T00:00:00.000000+00:00",
                                "end_time": "2026-04-13T00:00:00.000000+00:00", "upload_type": 1,
                                "timestamp_localization": 0},
                   "heart_rate_data": {"summary": {"resting_hr_bpm": 57}}}
    assert records("daily-heart-rate-variability")[0].data["heart_rate_data"] == {"summary": {"avg_hrv_rmssd": 38.6}}
    assert records("daily-oxygen-saturation")[0].data["oxygen_data"] == {"avg_saturation_percentage": 96.4}


def test_body_measurements_convert_units():
    morning, evening = records("weight")
    assert morning.data["metadata"] == {"start_time": "2026-03-15T00:00:00.000000+01:00",
                                        "end_time": "2026-03-16T00:00:00.000000+01:00", "timestamp_localization": 1}
    assert morning.data["measurements_data"] == {"measurements": [
        {"measurement_time": "2026-03-15T07:31:12.000000+01:00", "weight_kg": 72.35}]}
    assert evening.data["measurements_data"]["measurements"][0] == {
        "measurement_time": "2026-03-15T00:30:00.000000+01:00", "weight_kg": 72.8, "user_notes": "after dinner"}
    assert records("body-fat")[0].data["measurements_data"]["measurements"] == [
        {"measurement_time": "2026-03-15T07:31:12.000000+01:00", "bodyfat_percentage": 18.7}]
    assert records("height")[0].data["measurements_data"]["measurements"] == [
        {"measurement_time": "2026-01-02T09:00:00.000000-08:00", "height_cm": 178.1}]


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("exercise", lambda p: p["exercise"]["interval"].pop("startUtcOffset"), "exercise.interval.startUtcOffset"),
    ("sleep", lambda p: p["sleep"]["stages"][0].update(type="DOZE"), "sleep.stages[0].type"),
    ("steps", lambda p: p["steps"].update(count="lots"), "steps.count"),
    ("weight", lambda p: p["weight"]["sampleTime"].update(utcOffset="+01:00"), "weight.sampleTime.utcOffset"),
    ("daily-oxygen-saturation", lambda p: p["dailyOxygenSaturation"]["date"].update(month=13),
     "dailyOxygenSaturation.date"),
    ("heart-rate", lambda p: p.pop("heartRate"), "no 'heartRate' object"),
])
def test_refusals_name_the_field(kind, change, message):
    point = copy.deepcopy(page(kind)["dataPoints"][0])
    change(point)
    with pytest.raises(MappingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        records(kind, {"dataPoints": [point]})


# ----------------------------------------------------------------------------------------------------------------------
# issue 11: real documents, zero rules, plausibility
# ----------------------------------------------------------------------------------------------------------------------
def point(kind: str, index: int = 0) -> dict:
    return copy.deepcopy(page(kind)["dataPoints"][index])


def test_exercise_calories_are_active_energy_not_total():
    # metricsSummary.caloriesKcal summarizes active-energy-burned (basal excluded): Terra's net activity calories
    run = records("exercise")[0].data
    assert run["calories_data"] == {"net_activity_calories": 512.4}


def test_a_single_data_point_is_accepted_as_well_as_a_list_page():
    for kind in ("exercise", "sleep", "steps", "heart-rate", "weight", "daily-resting-heart-rate"):
        assert [f.data for f in records(kind, point(kind))] == [records(kind)[0].data]


def test_zero_is_not_a_measurement_outside_the_true_zero_types():
    run = point("exercise")
    run["exercise"]["metricsSummary"].update(averageHeartRateBeatsPerMinute="0", runVo2Max=0,
                                             heartRateZoneDurations={"lightTime": "0s", "moderateTime": "0s",
                                                                     "vigorousTime": "0s", "peakTime": "0s"})
    data = records("exercise", run)[0].data
    assert "heart_rate_data" not in data and "oxygen_data" not in data
    idle = point("steps")
    idle["steps"]["count"] = "0"  # steps support true zeros: worn, not walking
    assert records("steps", idle)[0].data["distance_data"]["detailed"]["step_samples"][0]["steps"] == 0
    for kind, field, change in [
        ("heart-rate", "heartRate.beatsPerMinute", lambda p: p["heartRate"].update(beatsPerMinute="0")),
        ("daily-resting-heart-rate", "dailyRestingHeartRate.beatsPerMinute",
         lambda p: p["dailyRestingHeartRate"].update(beatsPerMinute="0")),
        ("weight", "weight.weightGrams", lambda p: p["weight"].update(weightGrams=0)),
        ("height", "height.heightMillimeters", lambda p: p["height"].update(heightMillimeters=0)),
        ("body-fat", "bodyFat.percentage", lambda p: p["bodyFat"].update(percentage=0)),
        ("daily-oxygen-saturation", "dailyOxygenSaturation.averagePercentage",
         lambda p: p["dailyOxygenSaturation"].update(averagePercentage=0)),
    ]:
        doc = point(kind)
        change(doc)
        with pytest.raises(MappingError, match=field.replace(".", r"\.") + " 0 is not a measurement"):
            records(kind, doc)


# an impossible value is mapped as sent; the pipeline's plausibility stage drops it (the sample, or the field), and
# only it, with the block it leaves empty: (kind, change, what it dropped); the day's window is what remains
IMPOSSIBLE = [
    ("heart-rate", lambda p: p["heartRate"].update(beatsPerMinute="412"), {IMPOSSIBLE_SAMPLES: 1}),
    ("daily-resting-heart-rate", lambda p: p["dailyRestingHeartRate"].update(beatsPerMinute="312"),
     {IMPOSSIBLE_VALUES: 1}),
    ("daily-oxygen-saturation", lambda p: p["dailyOxygenSaturation"].update(averagePercentage=196.4),
     {IMPOSSIBLE_VALUES: 1}),
    # a measurement left with nothing but its time goes with its value
    ("weight", lambda p: p["weight"].update(weightGrams=950000), {IMPOSSIBLE_VALUES: 1}),
    ("height", lambda p: p["height"].update(heightMillimeters=17810), {IMPOSSIBLE_VALUES: 1}),
    ("body-fat", lambda p: p["bodyFat"].update(percentage=118.7), {IMPOSSIBLE_VALUES: 1}),
]


@pytest.mark.parametrize(("kind", "change", "dropped"), IMPOSSIBLE, ids=[case[0] for case in IMPOSSIBLE])
def test_an_impossible_value_is_mapped_and_the_plausibility_stage_drops_it(kind, change, dropped):
    doc = point(kind)
    change(doc)
    (fragment,) = records(kind, doc)
    record = validate_record(fragment.type, fragment.data)
    assert record["metadata"] == validate_record(fragment.type, records(kind, point(kind))[0].data)["metadata"]
    checked, counts = check_record(fragment.type, record)
    assert counts == dropped
    assert checked == {"metadata": record["metadata"]}


def test_an_impossible_heart_rate_point_costs_that_sample_not_the_page():
    page_ = page("heart-rate")
    page_["dataPoints"][0]["heartRate"]["beatsPerMinute"] = "412"
    checked = [check_record(f.type, validate_record(f.type, f.data)) for f in records("heart-rate", page_)]
    assert [counts for _, counts in checked] == [{IMPOSSIBLE_SAMPLES: 1}] + [{}] * (len(checked) - 1)
    assert [record["heart_rate_data"]["detailed"]["hr_samples"] for record, _ in checked[1:]] == [
        validate_record("daily", f.data)["heart_rate_data"]["detailed"]["hr_samples"]
        for f in records("heart-rate")[1:]]


def test_an_exercise_loses_only_its_impossible_heart_rate_and_vo2_max():
    run = point("exercise")
    run["exercise"]["metricsSummary"].update(averageHeartRateBeatsPerMinute="412", runVo2Max=150.2)
    record = validate_record("activity", records("exercise", run)[0].data)
    assert (record["heart_rate_data"]["summary"]["avg_hr_bpm"], record["oxygen_data"]) == (
        412, {"vo2max_ml_per_min_per_kg": 150.2})
    checked, counts = check_record("activity", record)
    assert counts == {IMPOSSIBLE_VALUES: 2}
    expected = validate_record("activity", records("exercise", point("exercise"))[0].data)
    del expected["heart_rate_data"]["summary"]["avg_hr_bpm"]
    del expected["oxygen_data"]  # emptied by the check, so gone with it
    assert checked == expected


def test_hrv_point_without_rmssd_names_what_terra_cannot_hold():
    doc = point("daily-heart-rate-variability")
    del doc["dailyHeartRateVariability"]["averageHeartRateVariabilityMilliseconds"]
    with pytest.raises(MappingError, match=r"averageHeartRateVariabilityMilliseconds.*no Terra field"):
        records("daily-heart-rate-variability", doc)


# ----------------------------------------------------------------------------------------------------------------------
# fidelity: exact values across a DST change (Europe/Berlin, 2026-03-29 02:00 CET → 03:00 CEST)
# ----------------------------------------------------------------------------------------------------------------------
def stage(kind: str, start: str, end: str, start_offset: str = "3600s", end_offset: str = "3600s") -> dict:
    return {"type": kind, "startTime": start, "startUtcOffset": start_offset, "endTime": end,
            "endUtcOffset": end_offset}


def test_night_across_the_spring_dst_change():
    night = point("sleep")
    night["name"] = "users/5dG7yXkB2m/dataTypes/sleep/dataPoints/dst-night"
    night["sleep"]["interval"] = {"startTime": "2026-03-28T22:30:00Z", "startUtcOffset": "3600s",
                                  "endTime": "2026-03-29T05:30:00Z", "endUtcOffset": "7200s"}
    night["sleep"]["stages"] = [
        stage("AWAKE", "2026-03-28T22:30:00Z", "2026-03-28T22:42:00Z"),
        stage("LIGHT", "2026-03-28T22:42:00Z", "2026-03-29T00:20:00Z"),
        stage("DEEP", "2026-03-29T00:20:00Z", "2026-03-29T01:20:00Z", "3600s", "7200s"),  # 01:20 CET → 03:20 CEST
        stage("REM", "2026-03-29T01:20:00Z", "2026-03-29T02:05:00Z", "7200s", "7200s"),
        stage("LIGHT", "2026-03-29T02:05:00Z", "2026-03-29T05:30:00Z", "7200s", "7200s")]
    night["sleep"]["summary"] = {
        "minutesInSleepPeriod": "420", "minutesAsleep": "408", "minutesAwake": "12", "minutesToFallAsleep": "12",
        "minutesAfterWakeUp": "0",
        "stagesSummary": [{"type": "AWAKE", "minutes": "12", "count": "1"}, {"type": "LIGHT", "minutes": "303",
                                                                               "count": "2"},
                          {"type": "DEEP", "minutes": "60", "count": "1"}, {"type": "REM", "minutes": "45",
                                                                             "count": "1"}]}
    night["sleep"].pop("outOfBedSegments", None)
    (record,) = records("sleep", night)
    data = record.data
    assert (data["metadata"]["start_time"], data["metadata"]["end_time"]) == (
        "2026-03-28T23:30:00.000000+01:00", "2026-03-29T07:30:00.000000+02:00")  # 7 h in bed, 8 h on the clock
    assert data["sleep_durations_data"]["asleep"] == {
        "duration_asleep_state_seconds": 24480, "duration_deep_sleep_state_seconds": 3600,
        "duration_light_sleep_state_seconds": 18180, "duration_REM_sleep_state_seconds": 2700, "num_REM_events": 1}
    assert data["sleep_durations_data"]["awake"] == {
        "duration_awake_state_seconds": 720, "sleep_latency_seconds": 720, "wake_up_latency_seconds": 0,
        "num_wakeup_events": 1}
    assert data["sleep_durations_data"]["other"] == {"duration_in_bed_seconds": 25200}
    assert data["sleep_durations_data"]["hypnogram_samples"] == [
        {"timestamp": "2026-03-28T23:30:00.000000+01:00", "level": 1},
        {"timestamp": "2026-03-28T23:42:00.000000+01:00", "level": 4},
        {"timestamp": "2026-03-29T01:20:00.000000+01:00", "level": 5},
        {"timestamp": "2026-03-29T03:20:00.000000+02:00", "level": 6},
        {"timestamp": "2026-03-29T04:05:00.000000+02:00", "level": 4}]


def test_heart_rate_either_side_of_the_change_keeps_its_local_day():
    before, after = point("heart-rate"), point("heart-rate")
    before["heartRate"]["sampleTime"] = {"physicalTime": "2026-03-29T00:59:30Z", "utcOffset": "3600s"}
    after["heartRate"]["sampleTime"] = {"physicalTime": "2026-03-29T01:00:30Z", "utcOffset": "7200s"}
    samples = [records("heart-rate", doc)[0].data for doc in (before, after)]
    assert [s["heart_rate_data"]["detailed"]["hr_samples"][0]["timestamp"] for s in samples] == [
        "2026-03-29T01:59:30.000000+01:00", "2026-03-29T03:00:30.000000+02:00"]
    assert {s["metadata"]["start_time"][:10] for s in samples} == {"2026-03-29"}  # one Daily key


def test_daily_types_have_no_offset_so_their_window_is_the_date_in_utc():
    # 'date' is "in the user's timezone" and the point carries no offset: labelled UTC (localization 0), never guessed
    doc = point("daily-oxygen-saturation")
    doc["dailyOxygenSaturation"]["date"] = {"year": 2026, "month": 3, "day": 29}
    data = records("daily-oxygen-saturation", doc)[0].data
    assert data["metadata"] == {"start_time": "2026-03-29T00:00:00.000000+00:00",
                                "end_time": "2026-03-30T00:00:00.000000+00:00", "upload_type": 1,
                                "timestamp_localization": 0}


def test_body_units_to_the_gram_and_millimetre():
    weight, height = point("weight"), point("height")
    weight["weight"]["weightGrams"] = 81646.6  # 180 lb entered in the app, stored in grams
    height["height"]["heightMillimeters"] = "1803"
    assert records("weight", weight)[0].data["measurements_data"]["measurements"][0]["weight_kg"] == 81.647
    assert records("height", height)[0].data["measurements_data"]["measurements"][0]["height_cm"] == 180.3


@pytest.mark.parametrize(("exercise_type", "terra_type"), [
    ("RUNNING", 8), ("STRENGTH_TRAINING", 80), ("CROSSFIT", 113), ("CROSS_COUNTRY_SKI", 67), ("BALLROOM_DANCE", 24),
    ("WORKOUT", 108), ("EXERCISE_TYPE_UNSPECIFIED", 108), ("A_TYPE_ADDED_LATER", 108)])
def test_exercise_types_of_v4_and_v4beta(exercise_type, terra_type):
    doc = point("exercise")
    doc["exercise"]["exerciseType"] = exercise_type
    assert records("exercise", doc)[0].data["metadata"]["type"] == terra_type


def test_a_days_step_counts_are_delivered_as_its_running_totals():
    """Terra's step samples are running totals since the start of the day: each interval's count is added at its end
    (the record state keeps the counts, so a later page adds to the day and a re-sent point replaces its interval)."""
    from core.raw import RawMessage, RawPayload
    from schemas.serde import encode_raw
    from transforms.normalize import normalize_in_memory

    def minute(start: str, end: str, count: str) -> dict:
        point = copy.deepcopy(page("steps")["dataPoints"][0])
        point["steps"]["interval"].update(startTime=start, endTime=end)
        point["steps"]["count"] = count
        return point

    pages = [{"dataPoints": [minute("2026-04-12T13:06:00Z", "2026-04-12T13:07:00Z", "163"),
                             minute("2026-04-12T13:00:00Z", "2026-04-12T13:05:00Z", "420")]},
             {"dataPoints": [minute("2026-04-12T15:30:00Z", "2026-04-12T15:31:00Z", "88"),
                             minute("2026-04-12T13:06:00Z", "2026-04-12T13:07:00Z", "170")]}]  # 13:06 re-sent
    messages = [RawMessage(encode_raw(RawPayload("google_health", json.dumps(body).encode(), "steps", "hu-1",
                                                 received_at_ms=1_776_000_000_000 + n)), {"partition": 0, "offset": n})
                for n, body in enumerate(pages)]
    events, failed = normalize_in_memory(messages)
    assert not failed
    [day] = [e for e in events if e.type == "daily"]
    assert day.data["distance_data"]["detailed"]["step_samples"] == [
        {"timestamp": "2026-04-12T06:05:00.000000-07:00", "steps": 420},
        {"timestamp": "2026-04-12T06:07:00.000000-07:00", "steps": 590},  # 420 + 170 (the re-sent minute)
        {"timestamp": "2026-04-12T08:31:00.000000-07:00", "steps": 678}]
