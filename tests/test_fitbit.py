"""Fitbit Web API mappers: realistic responses in tests/fixtures/fitbit, checked value by value, then pushed
through the pipeline's own normalize + per-user merge for update semantics.

Users (one per fixture): Berlin (Europe/Berlin, +01:00 in March, metric), Los Angeles (America/Los_Angeles,
en_US units; 2024-03-10 is its DST day: -08:00 until 02:00, -07:00 after), London (en_GB: stone).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from terra.core.serialization import convert_and_respect_annotation_metadata
from terra.types.activity import Activity
from terra.types.body import Body
from terra.types.daily import Daily
from terra.types.nutrition import Nutrition
from terra.types.sleep import Sleep

from connectors import get_provider
from connectors.base import Fragment, MappingError, UnknownKind, natural_key, terra_user_id
from connectors.providers.fitbit.activity_types import terra_activity_type
from core.events import NormalizedEvent
from core.raw import RawMessage, RawPayload
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from schemas.serde import encode_raw, validate_record
from sinks.sql import SqlSink
from transforms.normalize import Failed, Keyed, merge_user_events, normalize_message
from transforms.plausibility import IMPOSSIBLE_SAMPLES, IMPOSSIBLE_VALUES, check_record

FIXTURES = Path(__file__).parent / "fixtures" / "fitbit"
TERRA_MODELS = {"activity": Activity, "body": Body, "daily": Daily, "nutrition": Nutrition, "sleep": Sleep}
FITBIT = get_provider("fitbit")
USER = "7QK2XB"  # Fitbit encoded user id, carried by the raw event
RECEIVED_AT_MS = 1710200000000
BERLIN = {"timezone": "Europe/Berlin", "offsetFromUTCMillis": 3600000}
MAIN_SLEEP_ID = "45012233871"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def sdk_validate(model_type: str, record: dict[str, Any]) -> None:
    """Validate with Terra's SDK model; Fern aliases (``MET_data``) are mapped first, or they would be extras."""
    model = TERRA_MODELS[model_type]
    model.model_validate(convert_and_respect_annotation_metadata(object_=record, annotation=model, direction="read"))


def normalize(payload: Any, kind: str, user_id: str | None = USER) -> list[Fragment]:
    """Map a response; every record must pass the Avro schema and Terra's SDK. Returns conformed records."""
    fragments = []
    for fragment in FITBIT.normalize(payload, kind=kind, user_id=user_id):
        data = validate_record(fragment.type, fragment.data)
        sdk_validate(fragment.type, data)
        assert fragment.provider_user_id == user_id
        fragments.append(dataclasses.replace(fragment, data=data))
    return fragments


def records(name: str, kind: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
    kind = kind or name.split(".")[0]
    return [f.data for f in normalize(load(name), kind) if model is None or f.type == model]


def merged(*deliveries: tuple[str, Any]) -> dict[tuple[str, str], NormalizedEvent]:
    """Run ``(kind, response)`` deliveries, a minute apart, through the real normalize step and the per-user
    merge: ``(type, natural key) → event``."""
    items: list[Keyed | Failed] = []
    for index, (kind, body) in enumerate(deliveries):
        payload = RawPayload("fitbit", json.dumps(body).encode(), kind=kind, user_id=USER,
                             received_at_ms=RECEIVED_AT_MS + index * 60_000)
        items.extend(normalize_message(RawMessage(encode_raw(payload), {"partition": 0, "offset": index})))
    failed = [item.record["error_message"] for item in items if isinstance(item, Failed)]
    assert not failed
    assert {item.user["user_id"] for item in items} == {terra_user_id("fitbit", USER)}
    assert {item.user["provider"] for item in items} == {"FITBIT"}
    return {(e.type, e.natural_key): e for e in merge_user_events(terra_user_id("fitbit", USER), items)}


# ----------------------------------------------------------------------------------------------------------------------
# every fixture: the naming convention of the shared conformance suite
# ----------------------------------------------------------------------------------------------------------------------
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.json"))


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_every_fixture_maps_or_is_rejected_by_its_name(name: str) -> None:
    kind, _, variant = name.removesuffix(".json").partition(".")
    assert kind in FITBIT.kinds
    payload = load(name)
    payloads = payload if isinstance(payload, list) else [payload]  # a list: payloads in order (conformance rule)
    if variant.startswith("bad"):
        with pytest.raises(MappingError):
            [normalize(body, kind, "conformance-user") for body in payloads]
    else:
        fragments = [f for body in payloads for f in normalize(body, kind, "conformance-user")]
        assert fragments
        for fragment in fragments:
            assert fragment.type in FITBIT.kinds[kind].models
            natural_key(fragment.type, fragment.data)
            assert fragment.data["metadata"]["timestamp_localization"] == 1


def test_every_kind_has_a_fixture_and_a_bad_fixture_per_model() -> None:
    kinds = {name.split(".")[0] for name in FIXTURE_FILES}
    assert kinds == set(FITBIT.kinds)
    bad_models = {m for name in FIXTURE_FILES if name.split(".")[1].startswith("bad")
                  for m in FITBIT.kinds[name.split(".")[0]].models}
    assert bad_models == {"activity", "daily", "sleep", "body", "nutrition"}


# ----------------------------------------------------------------------------------------------------------------------
# activities
# ----------------------------------------------------------------------------------------------------------------------
def test_run_keeps_its_own_offset_and_converts_units() -> None:
    fragments = normalize(load("activities.json"), "activities")
    run = fragments[0]
    assert run.type == "activity"
    assert run.version_ms == 1710141674000  # lastModified 2024-03-11T07:21:14Z
    assert run.data["metadata"] == {
        "summary_id": "61234567890",
        "start_time": "2024-03-11T07:40:00.000000+01:00",
        "end_time": "2024-03-11T08:05:56.000000+01:00",  # + duration 1556000 ms (pauses included)
        "type": 8,  # RUNNING
        "upload_type": 1,  # AUTOMATIC
        "name": "Run",
        "timestamp_localization": 1,
    }
    assert natural_key("activity", run.data) == "61234567890"
    assert run.data["distance_data"] == {"summary": {"distance_meters": 4120, "steps": 3989,
                                                     "elevation": {"gain_actual_meters": 18.3}}}
    assert run.data["calories_data"] == {"total_burned_calories": 312}
    assert run.data["active_durations_data"] == {
        "activity_seconds": 1536.0,  # activeDuration: pauses excluded
        "inactivity_seconds": 0, "low_intensity_seconds": 60, "moderate_intensity_seconds": 120,
        "vigorous_intensity_seconds": 1380,
    }
    assert run.data["heart_rate_data"] == {"summary": {"avg_hr_bpm": 151, "hr_zone_data": [
        {"zone": 0, "name": "Out of Range", "duration_seconds": 0},
        {"zone": 1, "name": "Fat Burn", "duration_seconds": 180},
        {"zone": 2, "name": "Cardio", "duration_seconds": 1080},
        {"zone": 3, "name": "Peak", "duration_seconds": 240},
    ]}}
    # 9.65625 km/h; pace 372.8155 s/km
    assert run.data["movement_data"] == {"avg_speed_meters_per_second": 2.682, "avg_pace_minutes_per_kilometer": 6.214}
    assert run.data["device_data"] == {"name": "Charge 6", "manufacturer": "Fitbit"}


def test_auto_detected_walk_and_manual_weights_log() -> None:
    _run, walk, weights = records("activities.json")
    assert walk["metadata"]["type"] == 7 and walk["metadata"]["upload_type"] == 1
    assert walk["metadata"]["end_time"] == "2024-03-11T12:50:00.000000+01:00"
    assert walk["movement_data"] == {"avg_speed_meters_per_second": 1.333, "avg_pace_minutes_per_kilometer": 12.5}
    assert weights["metadata"] == {
        "summary_id": "61235044871", "start_time": "2024-03-11T18:15:00.000000+01:00",
        "end_time": "2024-03-11T19:00:00.000000+01:00", "type": 80, "upload_type": 2,  # STRENGTH_TRAINING, MANUAL
        "name": "Weights", "timestamp_localization": 1,
    }
    assert "distance_data" not in weights and "heart_rate_data" not in weights
    assert weights["device_data"] == {"name": "Fitbit for Android"}  # an app, not a Fitbit device


def test_us_user_miles_feet_and_negative_offsets_either_side_of_dst() -> None:
    run, walk = records("activities.us_user.json")
    assert run["metadata"]["start_time"] == "2024-03-09T16:05:00.000000-08:00"
    assert run["metadata"]["end_time"] == "2024-03-09T16:36:00.000000-08:00"
    assert walk["metadata"]["start_time"] == "2024-03-10T17:30:00.000000-07:00"
    assert run["distance_data"]["summary"] == {"distance_meters": 4989, "steps": 5127,  # 3.1 mi
                                               "elevation": {"gain_actual_meters": 15.85}}  # 52 ft
    assert run["movement_data"] == {"avg_speed_meters_per_second": 2.772,  # 6.2 mph
                                    "avg_pace_minutes_per_kilometer": 6.013}  # 580.6452 s/mi
    assert walk["distance_data"]["summary"]["distance_meters"] == 1931  # 1.2 mi


def test_distance_unit_field_wins_and_the_response_units_are_the_fallback() -> None:
    walk = load("activities.json")["activities"][1]
    no_unit = {k: v for k, v in walk.items() if k != "distanceUnit"}
    us = records_of({"_units": "en_US", "activities": [no_unit]}, "activities")[0]
    assert us["distance_data"]["summary"] == {"distance_meters": 2446, "steps": 2011,  # 1.52 mi
                                              "elevation": {"gain_actual_meters": 0.93}}  # 3.05 ft
    metric = records_of({"activities": [no_unit]}, "activities")[0]
    assert metric["distance_data"]["summary"]["distance_meters"] == 1520
    # "Mile" without _units: a US-units response, so elevation is in feet too
    miles = records_of({"activities": [dict(walk, distanceUnit="Mile")]}, "activities")[0]
    assert miles["distance_data"]["summary"]["elevation"] == {"gain_actual_meters": 0.93}
    with pytest.raises(MappingError, match="distanceUnit 'Furlong'"):
        normalize({"activities": [dict(walk, distanceUnit="Furlong")]}, "activities")


def records_of(payload: Any, kind: str) -> list[dict[str, Any]]:
    return [f.data for f in normalize(payload, kind)]


@pytest.mark.parametrize(("type_id", "name", "terra_type"), [
    (90009, "Run", 8), (90013, "Walk", 7), (90001, "Bike", 1), (90024, "Swim", 82), (2131, "Weights", 80),
    (None, "Outdoor Bike", 1), (1071, " outdoor bike ", 1), (55001, "Spinning", 17), (20047, "Elliptical", 25),
    (None, "Treadmill", 88), (3001, "Aerobic Workout", 9), (15000, "Sport", 108), (999999, "Underwater Hockey", 108),
    (None, None, 108), (True, "Run", 8),
])
def test_activity_type_table_with_other_fallback(type_id: Any, name: str | None, terra_type: int) -> None:
    assert terra_activity_type(type_id, name) == terra_type


def test_edited_activity_replaces_the_older_version_whatever_the_arrival_order() -> None:
    for order in ((load("activities.json"), load("activities.edited.json")),
                  (load("activities.edited.json"), load("activities.json"))):
        event = merged(*(("activities", body) for body in order))[("activity", "61234567890")]
        assert event.ordering_timestamp_ms == 1710183730000  # the edit's lastModified 2024-03-11T19:02:10Z
        assert event.data["distance_data"]["summary"]["distance_meters"] == 4200
        assert event.data["calories_data"] == {"total_burned_calories": 305}
        assert event.data["metadata"]["upload_type"] == 2  # a manually specified distance makes it MANUAL
        assert event.data["movement_data"]["avg_pace_minutes_per_kilometer"] == 6.095


# ----------------------------------------------------------------------------------------------------------------------
# sleep
# ----------------------------------------------------------------------------------------------------------------------
BERLIN_HYPNOGRAM = [  # levels.data with the three shortData wakes (00:45, 03:10, 04:30) laid over light sleep
    ("2024-03-10T23:12:00", 1), ("2024-03-10T23:17:30", 4), ("2024-03-10T23:46:30", 5), ("2024-03-11T00:26:30", 4),
    ("2024-03-11T00:45:00", 1), ("2024-03-11T00:46:00", 4), ("2024-03-11T01:01:30", 6), ("2024-03-11T01:26:30", 4),
    ("2024-03-11T02:06:30", 5), ("2024-03-11T02:36:30", 1), ("2024-03-11T02:46:00", 4), ("2024-03-11T03:10:00", 1),
    ("2024-03-11T03:11:30", 4), ("2024-03-11T03:36:00", 6), ("2024-03-11T04:10:00", 4), ("2024-03-11T04:30:00", 1),
    ("2024-03-11T04:30:30", 4), ("2024-03-11T04:55:00", 5), ("2024-03-11T05:13:00", 4), ("2024-03-11T05:53:00", 6),
    ("2024-03-11T06:28:00", 1),
]


def level_seconds(record: dict[str, Any]) -> dict[int, float]:
    """Time per level from a hypnogram (each sample lasts until the next, the last until end_time)."""
    samples = record["sleep_durations_data"]["hypnogram_samples"]
    times = [datetime.fromisoformat(s["timestamp"]) for s in samples]
    times.append(datetime.fromisoformat(record["metadata"]["end_time"]))
    out: dict[int, float] = {}
    for sample, start, end in zip(samples, times, times[1:], strict=False):
        out[sample["level"]] = out.get(sample["level"], 0) + (end - start).total_seconds()
    return out


def test_stages_sleep_times_durations_and_hypnogram() -> None:
    main, nap = normalize(load("sleep.json"), "sleep")
    assert main.type == "sleep" and main.version_ms is None
    record = main.data
    assert record["metadata"] == {
        "summary_id": MAIN_SLEEP_ID,
        "start_time": "2024-03-10T23:12:00.000000+01:00",  # local wall time + the profile zone's offset
        "end_time": "2024-03-11T06:58:00.000000+01:00",
        "upload_type": 2,  # auto_detected → SleepUploadType.AUTOMATIC
        "is_nap": False,
        "timestamp_localization": 1,
    }
    durations = record["sleep_durations_data"]
    assert durations["asleep"] == {
        "duration_asleep_state_seconds": 25080,  # 418 min
        "duration_deep_sleep_state_seconds": 5280, "duration_light_sleep_state_seconds": 14160,
        "duration_REM_sleep_state_seconds": 5640, "num_REM_events": 3,
    }
    assert durations["awake"] == {"duration_awake_state_seconds": 2880,  # auto-detected: latency 0 = not measured
                                  "wake_up_latency_seconds": 0, "num_wakeup_events": 6}
    assert durations["other"] == {"duration_in_bed_seconds": 27960}  # duration 27960000 ms
    assert durations["sleep_efficiency"] == 90
    assert [(s["timestamp"], s["level"]) for s in durations["hypnogram_samples"]] == [
        (f"{t}.000000+01:00", level) for t, level in BERLIN_HYPNOGRAM]
    # the hypnogram accounts for Fitbit's stage totals exactly: short wakes are wake time, not extra time
    assert level_seconds(record) == {1: 2880, 4: 14160, 5: 5280, 6: 5640}
    assert nap.data["metadata"]["is_nap"] is True


def test_classic_nap_levels() -> None:
    nap = records("sleep.json")[1]
    assert nap["metadata"]["start_time"] == "2024-03-11T14:05:00.000000+01:00"
    # classic: restless → AWAKE (Fitbit counts it in minutesAwake), asleep → SLEEPING, awake → AWAKE
    assert [(s["timestamp"][11:19], s["level"]) for s in nap["sleep_durations_data"]["hypnogram_samples"]] == [
        ("14:05:00", 1), ("14:07:00", 2), ("14:32:00", 1), ("14:34:00", 2), ("14:50:00", 1)]
    assert nap["sleep_durations_data"]["asleep"] == {"duration_asleep_state_seconds": 2460}  # no stage totals
    assert nap["sleep_durations_data"]["awake"]["duration_awake_state_seconds"] == 360  # restless 4 + awake 2 min
    assert nap["sleep_durations_data"]["awake"]["num_wakeup_events"] == 1
    assert level_seconds(nap) == {1: 360, 2: 2460}


def test_night_across_dst_for_a_negative_offset_user() -> None:
    (record,) = records("sleep.us_user.json")
    assert record["metadata"]["start_time"] == "2024-03-09T23:30:00.000000-08:00"
    assert record["metadata"]["end_time"] == "2024-03-10T07:10:00.000000-07:00"  # 6 h 40 min later, not 7 h 40
    start, end = (datetime.fromisoformat(record["metadata"][k]) for k in ("start_time", "end_time"))
    assert (end - start).total_seconds() == record["sleep_durations_data"]["other"]["duration_in_bed_seconds"] == 24000
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    assert hypnogram[3:5] == [{"timestamp": "2024-03-10T01:30:00.000000-08:00", "level": 6},
                              {"timestamp": "2024-03-10T03:00:00.000000-07:00", "level": 4}]  # 30 min of REM
    assert level_seconds(record) == {1: 1500, 4: 10800, 5: 5400, 6: 6300}


def test_without_a_time_zone_times_stay_local_without_an_offset() -> None:
    main, nap = records("sleep.no_profile.json")
    assert main["metadata"]["start_time"] == "2024-03-10T23:12:00.000000"
    assert main["metadata"]["end_time"] == "2024-03-11T06:58:00.000000"
    assert main["metadata"]["timestamp_localization"] == 1
    assert main["sleep_durations_data"]["hypnogram_samples"][4] == {"timestamp": "2024-03-11T00:45:00.000000",
                                                                    "level": 1}
    assert nap["metadata"]["start_time"] == "2024-03-11T14:05:00.000000"


@pytest.mark.parametrize(("profile", "start"), [
    ({"offsetFromUTCMillis": 3600000}, "2024-03-10T23:12:00.000000+01:00"),
    ({"timezone": "Mars/Olympus_Mons", "offsetFromUTCMillis": -18000000}, "2024-03-10T23:12:00.000000-05:00"),
    ({"user": {"timezone": "Asia/Kolkata", "offsetFromUTCMillis": 19800000, "fullName": "A"}},
     "2024-03-10T23:12:00.000000+05:30"),
    ({"timezone": "America/Los_Angeles", "offsetFromUTCMillis": -25200000}, "2024-03-10T23:12:00.000000-07:00"),
    ({}, "2024-03-10T23:12:00.000000"),
])
def test_time_zone_contract(profile: dict[str, Any], start: str) -> None:
    body = dict(load("sleep.json"), _profile=profile)
    assert records_of(body, "sleep")[0]["metadata"]["start_time"] == start


@pytest.mark.parametrize(("profile", "reason"), [
    ({"timezone": "Mars/Olympus_Mons"}, "not a known IANA time zone"),
    ({"offsetFromUTCMillis": "+01:00"}, "must be a number"),
    ({"offsetFromUTCMillis": 90_000_000}, "is not a UTC offset"),
    ("Europe/Berlin", "_profile must be an object"),
])
def test_bad_time_zone_is_a_mapping_error(profile: Any, reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        normalize(dict(load("sleep.json"), _profile=profile), "sleep")


def test_single_sleep_log_document_and_bad_sleep_logs() -> None:
    log = dict(load("sleep.json")["sleep"][0], _profile=BERLIN)
    (one,) = records_of(log, "sleep")
    assert one == records("sleep.json")[0]
    with pytest.raises(MappingError, match=r"endTime .* is before startTime"):
        normalize(dict(log, endTime="2024-03-10T22:00:00.000"), "sleep")
    with pytest.raises(MappingError, match=r"sleep\[0\]: missing required field\(s\): logId"):
        normalize({"sleep": [{k: v for k, v in log.items() if k != "logId"}]}, "sleep")
    with pytest.raises(MappingError, match="startTime must be an ISO-8601 time"):
        normalize({"sleep": [dict(log, startTime="last night")]}, "sleep")
    with pytest.raises(MappingError, match="expected a Fitbit response with a 'sleep' list"):
        normalize({"summary": {}}, "sleep")


# ----------------------------------------------------------------------------------------------------------------------
# spo2, hrv, br
# ----------------------------------------------------------------------------------------------------------------------
def test_spo2_goes_to_the_day_and_to_the_main_sleep_it_was_measured_in() -> None:
    daily, sleep = normalize(load("spo2.json"), "spo2")
    assert (daily.type, sleep.type) == ("daily", "sleep")
    assert daily.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+01:00", "end_time": "2024-03-12T00:00:00.000000+01:00",
                     "upload_type": 1, "timestamp_localization": 1},
        "oxygen_data": {"avg_saturation_percentage": 96.4},
    }
    main = records("sleep.json")[0]
    assert sleep.data["metadata"] == main["metadata"]  # the nap of the same date is not its sleep
    assert sleep.data["respiration_data"] == {"oxygen_saturation_data": {
        "start_time": "2024-03-10T23:12:00.000000+01:00", "end_time": "2024-03-11T06:58:00.000000+01:00",
        "avg_saturation_percentage": 96.4}}


def test_spo2_and_hrv_minutes() -> None:
    (spo2,) = records("spo2.intraday.json")
    samples = spo2["oxygen_data"]["saturation_samples"]
    assert samples[0] == {"timestamp": "2024-03-10T23:14:00.000000+01:00", "percentage": 95.7, "type": 0}
    assert len(samples) == 8 and natural_key("daily", spo2) == "2024-03-11"  # the night's minutes precede the day
    (hrv,) = records("hrv.json")
    assert hrv["heart_rate_data"] == {"summary": {"avg_hrv_rmssd": 41.2}}
    daily, sleep = normalize(load("hrv.intraday.json"), "hrv")
    expected = [{"timestamp": "2024-03-10T23:45:00.000000+01:00", "hrv_rmssd": 38.4},
                {"timestamp": "2024-03-10T23:50:00.000000+01:00", "hrv_rmssd": 44.7},
                {"timestamp": "2024-03-11T00:05:00.000000+01:00", "hrv_rmssd": 47.1}]
    assert daily.data["heart_rate_data"] == {"detailed": {"hrv_samples_rmssd": expected}}
    assert sleep.data["metadata"]["summary_id"] == MAIN_SLEEP_ID
    assert sleep.data["heart_rate_data"] == {"detailed": {"hrv_samples_rmssd": expected}}


def test_breathing_rate_completes_the_main_sleep() -> None:
    (summary,) = records("br.json")
    (intraday,) = records("br.intraday.json")  # per-stage rates: the full-sleep one is kept
    assert summary == intraday
    assert summary["metadata"]["summary_id"] == MAIN_SLEEP_ID
    assert summary["respiration_data"] == {"breaths_data": {
        "start_time": "2024-03-10T23:12:00.000000+01:00", "end_time": "2024-03-11T06:58:00.000000+01:00",
        "avg_breaths_per_min": 14.6}}
    with pytest.raises(MappingError, match="attach the sleep response"):
        normalize(load("br.bad_no_sleep.json"), "br")
    wrong_night = dict(load("br.json"), br=[{"dateTime": "2024-03-12", "value": {"breathingRate": 15.0}}])
    with pytest.raises(MappingError, match="holds 0 main sleeps ending 2024-03-12"):
        normalize(wrong_night, "br")


def test_sleep_and_its_nightly_metrics_merge_into_one_event() -> None:
    events = merged(("br", load("br.json")), ("sleep", load("sleep.json")), ("spo2", load("spo2.json")),
                    ("hrv", load("hrv.intraday.json")))
    record = events[("sleep", MAIN_SLEEP_ID)].data
    main = records("sleep.json")[0]
    assert record["metadata"] == main["metadata"]
    assert record["sleep_durations_data"] == main["sleep_durations_data"]
    assert record["respiration_data"]["breaths_data"]["avg_breaths_per_min"] == 14.6
    assert record["respiration_data"]["oxygen_saturation_data"]["avg_saturation_percentage"] == 96.4
    assert len(record["heart_rate_data"]["detailed"]["hrv_samples_rmssd"]) == 3
    daily = events[("daily", "2024-03-11")].data
    assert daily["oxygen_data"] == {"avg_saturation_percentage": 96.4}
    assert ("sleep", "45019870112") in events  # the nap stays its own record


# ----------------------------------------------------------------------------------------------------------------------
# activity_summary, activity_timeseries
# ----------------------------------------------------------------------------------------------------------------------
def test_activity_summary_day() -> None:
    (record,) = records("activity_summary.json")
    assert record["metadata"] == {"start_time": "2024-03-11T00:00:00.000000+01:00",
                                  "end_time": "2024-03-12T00:00:00.000000+01:00",
                                  "upload_type": 1, "timestamp_localization": 1}
    assert natural_key("daily", record) == "2024-03-11"
    assert record["distance_data"] == {"steps": 12873, "distance_meters": 9840, "floors_climbed": 14,
                                       "elevation": {"gain_actual_meters": 42.67}}
    assert record["calories_data"] == {"total_burned_calories": 2598, "BMR_calories": 1602,
                                       "net_activity_calories": 996}  # caloriesOut − caloriesBMR
    assert record["active_durations_data"] == {
        "activity_seconds": 17820,  # (238 + 21 + 38) min
        "low_intensity_seconds": 14280, "moderate_intensity_seconds": 1260, "vigorous_intensity_seconds": 2280,
        "inactivity_seconds": 39300,
    }
    assert record["MET_data"] == {"num_low_intensity_minutes": 238, "num_moderate_intensity_minutes": 21,
                                  "num_high_intensity_minutes": 38, "num_inactive_minutes": 655}
    assert record["heart_rate_data"] == {"summary": {"resting_hr_bpm": 57, "hr_zone_data": [
        {"zone": 0, "name": "Out of Range", "duration_seconds": 78660},
        {"zone": 1, "name": "Fat Burn", "duration_seconds": 5040},
        {"zone": 2, "name": "Cardio", "duration_seconds": 1620},
        {"zone": 3, "name": "Peak", "duration_seconds": 240}]}}


def test_activity_summary_of_a_us_user_on_the_dst_day() -> None:
    (record,) = records("activity_summary.us_user.json")
    # local midnight to local midnight: 23 hours, the offset changes in between
    assert record["metadata"]["start_time"] == "2024-03-10T00:00:00.000000-08:00"
    assert record["metadata"]["end_time"] == "2024-03-11T00:00:00.000000-07:00"
    assert natural_key("daily", record) == "2024-03-10"
    assert record["distance_data"] == {"steps": 13388, "distance_meters": 10332,  # 6.42 mi
                                       "floors_climbed": 15, "elevation": {"gain_actual_meters": 45.72}}  # 150 ft


def test_heart_rate_series_and_intraday() -> None:
    (record,) = records("activity_timeseries.json")
    assert natural_key("daily", record) == "2024-03-11"
    heart = record["heart_rate_data"]
    assert heart["summary"]["resting_hr_bpm"] == 57
    assert heart["summary"]["hr_zone_data"] == records("activity_summary.json")[0]["heart_rate_data"]["summary"][
        "hr_zone_data"]
    assert (heart["summary"]["min_hr_bpm"], heart["summary"]["max_hr_bpm"], heart["summary"]["avg_hr_bpm"]) == (
        57, 151, 89.67)
    samples = heart["detailed"]["hr_samples"]
    assert samples[0] == {"timestamp": "2024-03-11T00:00:00.000000+01:00", "bpm": 58}
    assert samples[-1] == {"timestamp": "2024-03-11T23:59:00.000000+01:00", "bpm": 61}
    assert len(samples) == 9


def test_intraday_steps_and_calories_are_running_totals_of_the_day() -> None:
    (steps,) = records("activity_timeseries.steps_intraday.json")
    samples = steps["distance_data"]["detailed"]["step_samples"]
    assert steps["distance_data"]["steps"] == 12873
    assert len(samples) == 96
    assert samples[0] == {"timestamp": "2024-03-11T00:15:00.000000+01:00", "steps": 0}  # end of 00:00-00:15
    assert samples[-1] == {"timestamp": "2024-03-12T00:00:00.000000+01:00", "steps": 12873}
    values = [s["steps"] for s in samples]
    assert values == sorted(values)
    dataset = load("activity_timeseries.steps_intraday.json")["activities-steps-intraday"]["dataset"]
    assert values[31] == sum(p["value"] for p in dataset[:32])  # total through 07:45-08:00
    (calories,) = records("activity_timeseries.calories_intraday.json")
    assert calories["calories_data"]["total_burned_calories"] == 2598
    assert calories["calories_data"]["calorie_samples"][-1] == {"timestamp": "2024-03-12T00:00:00.000000+01:00",
                                                                "calories": 2598.0}
    # the 07:30 slot of the run: level 3 (very active) → HIGH_INTENSITY, 98 → 9.8 METs
    assert calories["active_durations_data"]["activity_levels_samples"][30] == {
        "timestamp": "2024-03-11T07:30:00.000000+01:00", "level": 5}
    assert calories["MET_data"]["MET_samples"][30] == {"timestamp": "2024-03-11T07:30:00.000000+01:00", "level": 9.8}
    assert calories["active_durations_data"]["activity_levels_samples"][0]["level"] == 2  # sedentary → INACTIVE
    with pytest.raises(MappingError, match="starts at '08:00:00', not 00:00:00"):
        normalize(load("activity_timeseries.bad_window.json"), "activity_timeseries")


def test_time_series_range_without_a_time_zone() -> None:
    days = records("activity_timeseries.range.json")
    assert [natural_key("daily", d) for d in days] == ["2024-03-09", "2024-03-10", "2024-03-11"]
    assert days[0] == {
        "metadata": {"start_time": "2024-03-09T00:00:00.000000", "end_time": "2024-03-10T00:00:00.000000",
                     "upload_type": 1, "timestamp_localization": 1},
        "distance_data": {"steps": 8421, "distance_meters": 6420},
    }
    with pytest.raises(MappingError, match="no 'activities-<resource>' series"):
        normalize({"summary": {}}, "activity_timeseries")


def test_summary_time_series_and_intraday_fill_one_daily() -> None:
    events = merged(("activity_summary", load("activity_summary.morning.json")),
                    ("activity_timeseries", load("activity_timeseries.json")),
                    ("activity_timeseries", load("activity_timeseries.steps_intraday.json")),
                    ("activity_summary", load("activity_summary.json")))
    record = events[("daily", "2024-03-11")].data
    day = records("activity_summary.json")[0]
    for key in ("metadata", "calories_data", "active_durations_data", "MET_data"):
        assert record[key] == day[key], key  # the evening summary superseded the morning one
    assert record["distance_data"]["steps"] == 12873
    assert len(record["distance_data"]["detailed"]["step_samples"]) == 96
    assert len(record["heart_rate_data"]["detailed"]["hr_samples"]) == 9
    assert record["heart_rate_data"]["summary"]["max_hr_bpm"] == 151
    assert record["heart_rate_data"]["summary"]["resting_hr_bpm"] == 57  # the morning's 58 was replaced


def test_intraday_added_to_the_summary_document_merges_in() -> None:
    body = dict(load("activity_summary.json"), **{k: v for k, v in load("activity_timeseries.json").items()
                                                  if k.startswith("activities-")})
    (record,) = records_of(body, "activity_summary")
    assert record["distance_data"]["steps"] == 12873
    assert len(record["heart_rate_data"]["detailed"]["hr_samples"]) == 9
    with pytest.raises(MappingError, match="add '_date'"):
        normalize(load("activity_summary.bad_no_date.json"), "activity_summary")
    with pytest.raises(MappingError, match="no 'summary' object"):
        normalize({"_date": "2024-03-11", "goals": {}}, "activity_summary")


# ----------------------------------------------------------------------------------------------------------------------
# weight, fat
# ----------------------------------------------------------------------------------------------------------------------
def test_weight_logs_become_one_body_per_local_date() -> None:
    first, second = records("weight.json")
    assert first["metadata"] == {"start_time": "2024-03-11T00:00:00.000000+01:00",
                                 "end_time": "2024-03-12T00:00:00.000000+01:00", "timestamp_localization": 1}
    assert first["measurements_data"] == {"measurements": [
        {"measurement_time": "2024-03-11T07:32:01.000000+01:00", "weight_kg": 72.4, "BMI": 23.57,
         "bodyfat_percentage": 21.3},
        {"measurement_time": "2024-03-11T19:40:15.000000+01:00", "weight_kg": 71.9, "BMI": 23.41},
    ]}
    assert natural_key("body", first) == "2024-03-11" and natural_key("body", second) == "2024-03-12"


@pytest.mark.parametrize(("name", "measurement"), [
    ("weight.us_user.json", {"measurement_time": "2024-03-10T06:58:12.000000-07:00", "weight_kg": 76.294,  # 168.2 lb
                             "BMI": 24.8, "bodyfat_percentage": 24.9}),
    ("weight.uk_user.json", {"measurement_time": "2024-03-11T07:10:00.000000+00:00", "weight_kg": 72.393,  # 11.4 st
                             "BMI": 22.9}),
])
def test_weight_units_follow_the_request_locale(name: str, measurement: dict[str, Any]) -> None:
    (record,) = records(name)
    assert record["measurements_data"]["measurements"] == [measurement]


def test_fat_logs_alone_and_joined_with_weight() -> None:
    first, _ = records("fat.json")
    assert first["measurements_data"]["measurements"] == [
        {"measurement_time": "2024-03-11T07:32:01.000000+01:00", "bodyfat_percentage": 21.3}]
    (joined,) = records("weight.with_fat.json")
    assert joined["measurements_data"]["measurements"] == [
        {"measurement_time": "2024-03-11T07:32:01.000000+01:00", "weight_kg": 72.4, "BMI": 23.57,
         "bodyfat_percentage": 21.3},
        {"measurement_time": "2024-03-11T15:00:00.000000+01:00", "bodyfat_percentage": 21.6},
    ]
    assert records_of(load("weight.with_fat.json"), "fat") == [joined]


# ----------------------------------------------------------------------------------------------------------------------
# foods, water
# ----------------------------------------------------------------------------------------------------------------------
def test_food_log_meals_and_day_totals() -> None:
    (record,) = records("foods.json")
    assert record["metadata"] == {"start_time": "2024-03-11T00:00:00.000000+01:00",
                                  "end_time": "2024-03-12T00:00:00.000000+01:00", "timestamp_localization": 1}
    assert natural_key("nutrition", record) == "2024-03-11"
    assert record["summary"] == {"macros": {"calories": 925, "carbohydrates_g": 91.5, "fat_g": 38.8, "fiber_g": 14.5,
                                            "protein_g": 51.9, "sodium_mg": 1213}, "water_ml": 1750}
    oats, milk, salad, apple = record["meals"]
    assert oats == {
        "id": "23874563321", "name": "Haferflocken", "timestamp": "2024-03-11T00:00:00.000000+01:00",
        "type": 1,  # Breakfast
        "quantity": {"unit": 1, "amount": 60},  # gram
        "macros": {"calories": 224, "carbohydrates_g": 35.2, "fat_g": 4.3, "fiber_g": 6.0, "protein_g": 8.1,
                   "sodium_mg": 3},
        "micros": {},
    }
    assert (milk["type"], milk["quantity"]) == (1, {"unit": 8, "amount": 200})  # milliliter
    assert (salad["type"], salad["quantity"]) == (3, {"unit": 0, "amount": 1})  # Lunch, "serving" → UNKNOWN
    assert apple["type"] == 0  # "Anytime" has no Terra meal type
    with pytest.raises(MappingError, match="loggedFood: missing required field"):
        normalize(load("foods.bad.json"), "foods")


def test_food_log_date_comes_from_the_entries_or_the_poller() -> None:
    body = {k: v for k, v in load("foods.json").items() if k != "_date"}
    assert records_of(body, "foods") == records("foods.json")
    with pytest.raises(MappingError, match="add '_date'"):
        normalize({"foods": [], "summary": {"water": 500}}, "foods")
    with pytest.raises(MappingError, match="is not the response's date 2024-03-12"):
        normalize(dict(load("foods.json"), _date="2024-03-12"), "foods")


def test_water_in_fluid_ounces_for_us_units() -> None:
    (record,) = records("water.json")
    assert record == {"metadata": {"start_time": "2024-03-10T00:00:00.000000-08:00",
                                   "end_time": "2024-03-11T00:00:00.000000-07:00", "timestamp_localization": 1},
                      "summary": {"water_ml": 1892.7}}  # 64 fl oz
    no_summary = {k: v for k, v in load("water.json").items() if k != "summary"}
    assert records_of(no_summary, "water") == [record]


# ----------------------------------------------------------------------------------------------------------------------
# framework edges
# ----------------------------------------------------------------------------------------------------------------------
def test_unknown_kind_missing_user_and_batched_pages() -> None:
    with pytest.raises(UnknownKind):
        normalize({"temp": []}, "temp")
    with pytest.raises(MappingError, match="no user id"):
        list(FITBIT.normalize(load("hrv.json"), kind="hrv"))
    with pytest.raises(MappingError, match="must be a JSON object"):
        normalize({"pages": [["not", "a", "response"]]}, "sleep")
    batch = {"pages": [load("weight.json"), load("weight.us_user.json")]}
    assert [natural_key("body", r) for r in records_of(batch, "weight")] == ["2024-03-11", "2024-03-12", "2024-03-10"]


# ----------------------------------------------------------------------------------------------------------------------
# the poll hook (tests/test_cycle_fitbit.py polls through it end to end)
# ----------------------------------------------------------------------------------------------------------------------
def _hook_request(kind: str, answers: dict[str, Any], asked: list[str], user: str = "hf-1") -> Any:
    from connectors.hooks import Request
    from controlplane.polling.poller import PollConnection
    from core.errors import PermanentError

    def fetch(path: str, params: Any = None) -> Any:
        asked.append(path)
        answer = answers[path.split("/date/")[0]]
        if isinstance(answer, Exception):
            raise answer
        return answer

    answers.setdefault("/1/user/-/profile.json", {"user": BERLIN})
    answers.setdefault("/1.2/user/-/sleep", PermanentError("HTTP 403: insufficient_scope sleep"))
    endpoint = FITBIT.manifest.api.endpoints[kind]
    return Request("fitbit", kind, endpoint, datetime(2024, 3, 11, tzinfo=UTC), datetime(2024, 3, 12, tzinfo=UTC),
                   PollConnection(user, "fitbit", USER), fetch)


def test_poll_hook_attaches_main_sleeps_once_and_does_without_them() -> None:
    from connectors.providers.fitbit.client import FitbitHook

    spo2 = [{k: v for k, v in load("spo2.json").items() if k in ("dateTime", "value")}]
    asked: list[str] = []
    # no sleep scope: SpO2 still reaches its Daily, without _sleep, and nothing is cached
    hook = FitbitHook()
    (payload,) = hook.payloads(_hook_request("spo2", {}, asked), spo2)
    assert "_sleep" not in payload and [f.type for f in normalize(payload, "spo2")] == ["daily"]
    assert asked == ["/1/user/-/profile.json", "/1.2/user/-/sleep/date/2024-03-11/2024-03-11.json"]

    sleeps = {"/1.2/user/-/sleep": {k: v for k, v in load("sleep.json").items() if k != "_profile"}}
    asked.clear()
    (payload,) = hook.payloads(_hook_request("spo2", sleeps, asked), spo2)
    assert [log["logId"] for log in payload["_sleep"]] == [int(MAIN_SLEEP_ID)]  # the nap is not its sleep
    assert [f.type for f in normalize(payload, "spo2")] == ["daily", "sleep"]
    (again,) = hook.payloads(_hook_request("hrv", sleeps, asked), load("hrv.json")["hrv"])
    assert again["_sleep"] == payload["_sleep"]
    assert asked == ["/1.2/user/-/sleep/date/2024-03-11/2024-03-11.json"]  # profile and sleeps from the cache
    expired = FitbitHook(sleep_ttl_s=0)
    for kind in ("spo2", "br"):
        expired.payloads(_hook_request(kind, sleeps, asked), load(f"{kind}.json")[kind] if kind == "br" else spo2)
    assert asked.count("/1.2/user/-/sleep/date/2024-03-11/2024-03-11.json") == 3


# ----------------------------------------------------------------------------------------------------------------------
# issue 11: what Fitbit really sends, mapped without known errors
# ----------------------------------------------------------------------------------------------------------------------
def without_context(doc: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if key not in names}


def test_net_activity_calories_are_total_minus_bmr_not_activity_calories() -> None:
    # Fitbit's activityCalories (1123) counts the BMR burned during active minutes; net = caloriesOut − caloriesBMR
    (record,) = records("activity_summary.json")
    assert record["calories_data"] == {"total_burned_calories": 2598, "BMR_calories": 1602,
                                       "net_activity_calories": 996}
    (morning,) = records("activity_summary.morning.json")  # a partial day: BMR so far is prorated too
    assert morning["calories_data"] == {"total_burned_calories": 801, "BMR_calories": 534,
                                        "net_activity_calories": 267}


def test_calorie_time_series_give_net_calories_and_activity_calories_alone_is_refused() -> None:
    series = {"activities-calories": [{"dateTime": "2024-03-10", "value": "2441"},
                                      {"dateTime": "2024-03-11", "value": "2598"}],
              "activities-caloriesBMR": [{"dateTime": "2024-03-10", "value": "1602"},
                                         {"dateTime": "2024-03-11", "value": "1602"}],
              "activities-activityCalories": [{"dateTime": "2024-03-10", "value": "951"},
                                              {"dateTime": "2024-03-11", "value": "1123"}]}
    days = [f.data for f in normalize(series, "activity_timeseries")]
    assert [(natural_key("daily", d), d["calories_data"]) for d in days] == [
        ("2024-03-10", {"total_burned_calories": 2441, "BMR_calories": 1602, "net_activity_calories": 839}),
        ("2024-03-11", {"total_burned_calories": 2598, "BMR_calories": 1602, "net_activity_calories": 996})]
    with pytest.raises(MappingError, match="activityCalories includes BMR"):
        normalize({"activities-activityCalories": series["activities-activityCalories"]}, "activity_timeseries")


def test_activity_summary_takes_its_date_from_its_logged_activities() -> None:
    doc = load("activity_summary.json")  # two activities with startDate 2024-03-11
    (record,) = [f.data for f in normalize(without_context(doc, "_date"), "activity_summary")]
    assert record == records("activity_summary.json")[0]
    with pytest.raises(MappingError, match=r"add '_date' \(the request's YYYY-MM-DD\)"):
        normalize(load("activity_summary.bad_no_date.json"), "activity_summary")


def test_documents_without_poller_context_are_metric_local_times() -> None:
    # fetched without Accept-Language (metric) and without the profile: the provider's own document maps
    doc = without_context(load("activities.json"), "_profile", "_units")
    run = next(f.data for f in normalize(doc, "activities") if f.data["metadata"]["summary_id"] == "61234567890")
    assert run["metadata"]["start_time"] == "2024-03-11T07:40:00.000000+01:00"  # the log's own offset
    weights = normalize(without_context(load("weight.json"), "_profile", "_units"), "weight")[0].data
    assert weights["metadata"]["start_time"] == "2024-03-11T00:00:00.000000"  # local, no guessed offset
    assert weights["metadata"]["timestamp_localization"] == 1
    assert weights["measurements_data"]["measurements"][0]["weight_kg"] == load("weight.json")["weight"][0]["weight"]


def test_zero_means_not_measured_where_fitbit_writes_zero_for_no_data() -> None:
    doc = load("activity_summary.json")
    summary = doc["summary"]
    summary["restingHeartRate"] = 0
    for zone in summary["heartRateZones"]:  # a day the tracker was not worn: every zone 0 minutes
        zone["minutes"], zone["caloriesOut"] = 0, 0
    (record,) = [f.data for f in normalize(doc, "activity_summary")]
    assert "heart_rate_data" not in record
    # a worn day's empty Peak zone is a real zero
    (us,) = records("activity_summary.us_user.json")
    assert us["heart_rate_data"]["summary"]["hr_zone_data"][3] == {"zone": 3, "name": "Peak", "duration_seconds": 0}

    weights = load("weight.json")
    weights["weight"][0].update({"bmi": 0, "fat": 0})
    body = normalize(weights, "weight")[0].data
    first = body["measurements_data"]["measurements"][0]
    assert "BMI" not in first and "bodyfat_percentage" not in first
    weights["weight"][0]["weight"] = 0  # not a zero-means-absent field: an impossible value, left to plausibility
    assert normalize(weights, "weight")[0].data["measurements_data"]["measurements"][0]["weight_kg"] == 0

    hrv_doc = load("hrv.json")
    hrv_doc["hrv"][0]["value"] = {"dailyRmssd": 0, "deepRmssd": 0}
    with pytest.raises(MappingError, match=r"hrv\[0\] has neither value.dailyRmssd nor minutes"):
        normalize(hrv_doc, "hrv")

    logs = load("activities.json")
    logs["activities"][0]["averageHeartRate"] = 0
    first_log = normalize(logs, "activities")[0].data
    assert "avg_hr_bpm" not in first_log.get("heart_rate_data", {}).get("summary", {})


def test_auto_detected_sleep_latency_zero_is_not_measured() -> None:
    doc = load("sleep.json")
    main = next(log for log in doc["sleep"] if log["isMainSleep"])
    assert main["logType"] == "auto_detected" and main["minutesToFallAsleep"] == 0
    record = next(f.data for f in normalize(doc, "sleep") if f.data["metadata"]["summary_id"] == str(main["logId"]))
    assert "sleep_latency_seconds" not in record["sleep_durations_data"]["awake"]


def test_empty_single_day_spo2_response_is_no_data() -> None:
    assert normalize({"_profile": BERLIN}, "spo2") == []
    assert normalize([], "spo2") == []


# ----------------------------------------------------------------------------------------------------------------------
# plausibility: an impossible value is mapped as sent; the pipeline's plausibility stage drops it, and only it
# ----------------------------------------------------------------------------------------------------------------------
def test_an_impossible_resting_heart_rate_and_calories_below_bmr_cost_only_those_values_of_the_day() -> None:
    """restingHeartRate 412 bpm and caloriesOut (1480) below the caloriesBMR (1602) it includes: every other value
    of the day is delivered."""
    doc = load("activity_summary.json")
    doc["summary"].update(restingHeartRate=412, caloriesOut=1480)
    (record,) = [f.data for f in normalize(doc, "activity_summary")]
    assert record["heart_rate_data"]["summary"]["resting_hr_bpm"] == 412  # mapped as Fitbit sent it
    assert record["calories_data"] == {"total_burned_calories": 1480, "BMR_calories": 1602}  # no net value

    checked, dropped = check_record("daily", record)

    assert dropped == {IMPOSSIBLE_VALUES: 1}
    (expected,) = records("activity_summary.json")
    del expected["heart_rate_data"]["summary"]["resting_hr_bpm"]
    expected["calories_data"] = {"total_burned_calories": 1480, "BMR_calories": 1602}
    assert checked == expected


def test_an_impossible_spo2_minute_costs_that_minute_of_the_night() -> None:
    doc = load("spo2.intraday.json")
    doc["minutes"][2]["value"] = 101.3  # 23:16
    (record,) = [f.data for f in normalize(doc, "spo2")]
    checked, dropped = check_record("daily", record)
    assert dropped == {IMPOSSIBLE_SAMPLES: 1}
    assert [(s["timestamp"][11:16], s["percentage"]) for s in checked["oxygen_data"]["saturation_samples"]] == [
        ("23:14", 95.7), ("23:15", 96.1), ("23:17", 97.2), ("23:18", 96.5), ("23:19", 95.9), ("23:20", 96.3),
        ("23:21", 97.0)]


def test_a_weight_of_0_costs_that_measurement_not_the_page() -> None:
    doc = load("weight.json")
    doc["weight"][1]["weight"] = 0  # 2024-03-11 19:40:15, logged on the web
    first_day, second_day = (f.data for f in normalize(doc, "weight"))
    checked, dropped = check_record("body", first_day)
    assert dropped == {IMPOSSIBLE_VALUES: 1}  # the weight alone: what else the log holds stays
    assert checked["measurements_data"]["measurements"] == [
        {"measurement_time": "2024-03-11T07:32:01.000000+01:00", "weight_kg": 72.4, "BMI": 23.57,
         "bodyfat_percentage": 21.3},
        {"measurement_time": "2024-03-11T19:40:15.000000+01:00", "BMI": 23.41}]
    assert check_record("body", second_day) == (second_day, {})


def test_an_impossible_average_heart_rate_costs_that_value_of_that_activity() -> None:
    doc = load("activities.json")
    doc["activities"][0]["averageHeartRate"] = 312
    mapped = [f.data for f in normalize(doc, "activities")]
    checked = [check_record("activity", record) for record in mapped]
    assert [dropped for _, dropped in checked] == [{IMPOSSIBLE_VALUES: 1}, {}, {}]
    expected = records("activities.json")
    del expected[0]["heart_rate_data"]["summary"]["avg_hr_bpm"]
    assert [record for record, _ in checked] == expected
    assert expected[0]["heart_rate_data"]["summary"]["hr_zone_data"]  # the zones stay


def test_an_impossible_breathing_rate_is_dropped_from_the_night() -> None:
    doc = load("br.json")
    doc["br"][0]["value"] = {"breathingRate": 96}
    (record,) = [f.data for f in normalize(doc, "br")]
    checked, dropped = check_record("sleep", record)
    assert dropped == {IMPOSSIBLE_VALUES: 1}
    assert checked["respiration_data"]["breaths_data"] == {"start_time": "2024-03-10T23:12:00.000000+01:00",
                                                           "end_time": "2024-03-11T06:58:00.000000+01:00"}


def test_a_distance_that_overflows_its_conversion_is_refused_naming_the_field() -> None:
    doc = load("activities.json")
    doc["activities"][0].update(distance=1e308, distanceUnit="Mile")  # finite as sent, infinite in metres
    with pytest.raises(MappingError, match=r"^activities\[0\]\.distance: its value converted to Terra's unit is not"):
        normalize(doc, "activities")


def test_the_pipeline_delivers_the_day_without_its_impossible_value(tmp_path: Path) -> None:
    doc = load("activity_summary.json")
    doc["summary"]["restingHeartRate"] = 412
    event = {"provider": "fitbit", "kind": "activity_summary", "user_id": USER, "received_at": RECEIVED_AT_MS,
             "payload": json.dumps(doc)}
    source = tmp_path / "raw.jsonl"
    source.write_text(json.dumps(event) + "\n")
    database = tmp_path / "out.db"

    summary = run_batch(NormalizeJob(FileSource(str(source)), [SqlSink("sql", f"sqlite:///{database}")],
                                     str(tmp_path / "dlq"), state_url=f"sqlite:///{tmp_path / 'state.db'}"))

    assert summary.with_prefix("plausibility:") == {IMPOSSIBLE_VALUES: 1}
    assert summary.with_prefix("dead_letter:") == {}
    with sqlite3.connect(database) as conn:
        ((key, payload),) = conn.execute("SELECT natural_key, payload FROM healthflow_records").fetchall()
    day = json.loads(payload)
    assert key == "2024-03-11"
    assert "resting_hr_bpm" not in day["heart_rate_data"]["summary"]
    assert (day["distance_data"]["steps"], day["calories_data"]["net_activity_calories"]) == (12873, 996)


# ----------------------------------------------------------------------------------------------------------------------
# fidelity: exact values for units, time zones, day keys (hand-computed)
# ----------------------------------------------------------------------------------------------------------------------
LOS_ANGELES = {"timezone": "America/Los_Angeles", "offsetFromUTCMillis": -28800000}
LONDON = {"timezone": "Europe/London", "offsetFromUTCMillis": 0}


def test_uk_user_day_in_kilometres_and_metres() -> None:
    doc = {**load("activity_summary.json"), "_units": "en_GB", "_profile": LONDON}
    (record,) = [f.data for f in normalize(doc, "activity_summary")]
    assert record["metadata"]["start_time"] == "2024-03-11T00:00:00.000000+00:00"
    assert record["distance_data"] == {"steps": 12873, "distance_meters": 9840, "floors_climbed": 14,
                                       "elevation": {"gain_actual_meters": 42.67}}


def test_us_user_on_the_dst_day_intraday_distance_and_heart_rate() -> None:
    # 2024-03-10 in Los Angeles: 02:00-02:59 do not exist; Fitbit's local dataset jumps from 01:45 to 03:00
    doc = {"_profile": LOS_ANGELES, "_units": "en_US",
           "activities-distance": [{"dateTime": "2024-03-10", "value": "2.5"}],
           "activities-distance-intraday": {"datasetInterval": 15, "datasetType": "minute", "dataset": [
               {"time": "00:00:00", "value": 0}, {"time": "01:45:00", "value": 1.25},
               {"time": "03:00:00", "value": 1.25}]},
           "activities-heart": [{"dateTime": "2024-03-10", "value": {"restingHeartRate": 61, "heartRateZones": []}}],
           "activities-heart-intraday": {"datasetInterval": 1, "datasetType": "minute", "dataset": [
               {"time": "01:59:00", "value": 58}, {"time": "03:00:00", "value": 64}]}}
    (day,) = [f.data for f in normalize(doc, "activity_timeseries")]
    assert natural_key("daily", day) == "2024-03-10"
    assert (day["metadata"]["start_time"], day["metadata"]["end_time"]) == (
        "2024-03-10T00:00:00.000000-08:00", "2024-03-11T00:00:00.000000-07:00")  # a 23-hour day
    assert day["distance_data"]["distance_meters"] == 4023  # 2.5 mi × 1609.344 m
    assert day["distance_data"]["detailed"]["distance_samples"] == [  # running totals at each interval's end
        {"timestamp": "2024-03-10T00:15:00.000000-08:00", "distance_meters": 0.0},
        {"timestamp": "2024-03-10T03:00:00.000000-07:00", "distance_meters": 2011.68},  # 01:45 PST + 15 min
        {"timestamp": "2024-03-10T03:15:00.000000-07:00", "distance_meters": 4023.36}]
    assert day["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-10T01:59:00.000000-08:00", "bpm": 58},
        {"timestamp": "2024-03-10T03:00:00.000000-07:00", "bpm": 64}]  # one minute later in physical time
    assert day["heart_rate_data"]["summary"]["resting_hr_bpm"] == 61


def test_weights_in_each_unit_system_to_the_gram() -> None:
    log = {"logId": 1710138721000, "date": "2024-03-11", "time": "07:32:01", "bmi": 23.57, "source": "Aria"}
    cases = {"en_US": (159.6, 72.393), "en_GB": (11.4, 72.393), None: (72.4, 72.4)}  # 159.6 lb, 11.4 st, 72.4 kg
    for locale, (value, kg) in cases.items():
        doc = {"weight": [{**log, "weight": value}], "_profile": BERLIN, **({"_units": locale} if locale else {})}
        (body,) = [f.data for f in normalize(doc, "weight")]
        assert body["measurements_data"]["measurements"] == [
            {"measurement_time": "2024-03-11T07:32:01.000000+01:00", "weight_kg": kg, "BMI": 23.57}], locale


def test_classic_sleep_durations_and_the_date_it_belongs_to() -> None:
    # a classic (no HR) night in Berlin: restless counts as awake, dateOfSleep is the wake-up date
    log = {"logId": 45098765432, "dateOfSleep": "2024-03-12", "type": "classic", "logType": "manual",
           "isMainSleep": True, "startTime": "2024-03-11T23:30:00.000", "endTime": "2024-03-12T06:30:00.000",
           "duration": 25200000, "efficiency": 94, "minutesAsleep": 395, "minutesAwake": 15,
           "minutesToFallAsleep": 10, "minutesAfterWakeup": 0, "timeInBed": 420,
           "levels": {"summary": {"asleep": {"count": 0, "minutes": 395}, "restless": {"count": 4, "minutes": 11},
                                  "awake": {"count": 1, "minutes": 4}},
                      "data": [{"dateTime": "2024-03-11T23:40:00.000", "level": "asleep", "seconds": 9000},
                               {"dateTime": "2024-03-12T02:10:00.000", "level": "restless", "seconds": 660},
                               {"dateTime": "2024-03-12T02:21:00.000", "level": "asleep", "seconds": 14700},
                               {"dateTime": "2024-03-12T06:26:00.000", "level": "awake", "seconds": 240}]}}
    (sleep_record,) = [f.data for f in normalize({"sleep": [log], "_profile": BERLIN}, "sleep")]
    assert sleep_record["metadata"] == {"summary_id": "45098765432", "start_time": "2024-03-11T23:30:00.000000+01:00",
                                        "end_time": "2024-03-12T06:30:00.000000+01:00", "upload_type": 1,
                                        "is_nap": False, "timestamp_localization": 1}
    durations = sleep_record["sleep_durations_data"]
    assert durations["asleep"] == {"duration_asleep_state_seconds": 23700}
    assert durations["awake"] == {"duration_awake_state_seconds": 900, "sleep_latency_seconds": 600,
                                  "wake_up_latency_seconds": 0, "num_wakeup_events": 1}  # manual: latency kept
    assert durations["other"] == {"duration_in_bed_seconds": 25200}
    assert [(s["timestamp"][11:19], s["level"]) for s in durations["hypnogram_samples"]] == [
        ("23:40:00", 2), ("02:10:00", 1), ("02:21:00", 2), ("06:26:00", 1)]


def test_heart_range_day_without_heart_rate_makes_no_daily() -> None:
    # a 7-day heart series: Fitbit lists the zones at 0 minutes and no restingHeartRate for a day the tracker was off
    zones = [{"name": name, "min": low, "max": high, "minutes": 0, "caloriesOut": 0}
             for name, low, high in (("Out of Range", 30, 113), ("Fat Burn", 113, 137), ("Cardio", 137, 167),
                                     ("Peak", 167, 220))]
    doc = {"_profile": BERLIN, "activities-heart": [
        {"dateTime": "2024-03-09", "value": {"customHeartRateZones": [], "heartRateZones": zones}},
        {"dateTime": "2024-03-10", "value": {"customHeartRateZones": [], "heartRateZones": zones,
                                             "restingHeartRate": 58}}]}
    days = [f.data for f in normalize(doc, "activity_timeseries")]
    assert [(natural_key("daily", d), d["heart_rate_data"]) for d in days] == [
        ("2024-03-10", {"summary": {"resting_hr_bpm": 58}})]
