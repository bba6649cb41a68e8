"""Garmin push bodies (Health, Activity and Women's Health APIs): realistic payloads in tests/fixtures/garmin,
checked value by value, then pushed through the pipeline's own normalize + per-user merge for update semantics.

Users: A (``c0a5…``) shows a display offset of -18000 s (-05:00, Bogotá), B (``7e9b…``) one of +19800 s
(+05:30, Bengaluru). Every fixture day is 2024-03-11 local.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from terra.core.serialization import convert_and_respect_annotation_metadata
from terra.types.activity import Activity
from terra.types.body import Body
from terra.types.daily import Daily
from terra.types.menstruation import Menstruation
from terra.types.sleep import Sleep

from connectors import get_provider
from connectors.base import Fragment, MappingError, UnknownKind, natural_key, terra_user_id
from connectors.timeutil import unix_ts
from core.events import NormalizedEvent
from core.raw import RawMessage, RawPayload
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from schemas.serde import encode_raw, validate_record
from sinks.sql import SqlSink
from transforms.normalize import Failed, Keyed, merge_user_events, normalize_message
from transforms.plausibility import check_record

FIXTURES = Path(__file__).parent / "fixtures" / "garmin"
TERRA_MODELS = {"activity": Activity, "body": Body, "daily": Daily, "menstruation": Menstruation, "sleep": Sleep}
GARMIN = get_provider("garmin")
USER_A = "c0a5d2e8f7b14e39a6d21f8b3e4c5d70"  # -05:00
USER_B = "7e9b13f4a2c84d6b91e05f3a8c2d4b16"  # +05:30
RECEIVED_AT_MS = 1710200000000


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def sdk_validate(model_type: str, record: dict[str, Any]) -> None:
    """Validate with Terra's SDK model; Fern aliases (``MET_data``) are mapped first, or they would be extras."""
    model = TERRA_MODELS[model_type]
    model.model_validate(convert_and_respect_annotation_metadata(object_=record, annotation=model, direction="read"))


def normalize(payload: Any) -> list[Fragment]:
    """Map a push body; every record must pass the Avro schema and Terra's SDK. Returns conformed records."""
    fragments = []
    for fragment in GARMIN.normalize(payload):
        data = validate_record(fragment.type, fragment.data)
        sdk_validate(fragment.type, data)
        fragments.append(dataclasses.replace(fragment, data=data))
    return fragments


def only(payload: Any, user: str | None = None) -> dict[str, Any]:
    """The single record a push body maps to (for ``user`` when given)."""
    records = [f.data for f in normalize(payload) if user is None or f.provider_user_id == user]
    assert len(records) == 1
    return records[0]


def pipeline(*bodies: Any) -> list[Keyed | Failed]:
    """Run push bodies through the real normalize step, one raw message each, a minute apart."""
    out: list[Keyed | Failed] = []
    for index, body in enumerate(bodies):
        payload = RawPayload("garmin", json.dumps(body).encode(), received_at_ms=RECEIVED_AT_MS + index * 60_000)
        out.extend(normalize_message(RawMessage(encode_raw(payload), {"partition": 0, "offset": index})))
    return out


def merged(*bodies: Any) -> dict[tuple[str, str, str], NormalizedEvent]:
    """Normalize and merge per user: ``(garmin user, type, natural key) → event``."""
    items = pipeline(*bodies)
    failed = [item.record["error_message"] for item in items if isinstance(item, Failed)]
    assert not failed
    by_user: dict[str, list[Keyed]] = {}
    for item in items:
        by_user.setdefault(item.user["user_id"], []).append(item)
    garmin_user = {terra_user_id("garmin", u): u for u in (USER_A, USER_B)}
    return {(garmin_user[e.user_id], e.type, e.natural_key): e
            for user, keyed in by_user.items() for e in merge_user_events(user, keyed)}


def day_push(user: str) -> dict[str, Any]:
    """The complete (86400 s) daily of ``user`` from the evening push."""
    return next(d for d in load("dailies.through_the_day.json")[2]["dailies"] if d["userId"] == user)


# ----------------------------------------------------------------------------------------------------------------------
# dailies, epochs, stressDetails
# ----------------------------------------------------------------------------------------------------------------------
def test_daily_units_offset_timestamps_and_calendar_date_key() -> None:
    record = only({"dailies": [day_push(USER_A)]})
    assert record["metadata"] == {
        "start_time": "2024-03-11T00:00:00.000000-05:00",
        "end_time": "2024-03-12T00:00:00.000000-05:00",
        "upload_type": 1,  # AUTOMATIC
        "timestamp_localization": 1,  # LOCAL: the display offset is kept
    }
    assert natural_key("daily", record) == "2024-03-11"
    assert record["distance_data"] == {"steps": 11842, "distance_meters": 9120, "floors_climbed": 14}  # 9120.4 m
    assert record["calories_data"] == {"net_activity_calories": 612, "BMR_calories": 1698,
                                       "total_burned_calories": 2310}  # dailies' active kcal exclude BMR
    assert record["active_durations_data"] == {"activity_seconds": 5460, "moderate_intensity_seconds": 1920,
                                               "vigorous_intensity_seconds": 1140}
    heart = record["heart_rate_data"]
    # Garmin's averageHeartRateInBeatsPerMinute (66) is a 7-day average: the day's comes from its samples.
    assert heart["summary"] == {"avg_hr_bpm": 85.75, "min_hr_bpm": 47, "max_hr_bpm": 163, "resting_hr_bpm": 51}
    samples = heart["detailed"]["hr_samples"]
    assert [s["bpm"] for s in samples] == [52, 51, 53, 88, 91, 142, 151, 58]
    assert samples[0] == {"timestamp": "2024-03-11T00:00:15.000000-05:00", "bpm": 52}
    assert samples[3] == {"timestamp": "2024-03-11T07:00:00.000000-05:00", "bpm": 88}  # key "25200"
    assert samples[-1] == {"timestamp": "2024-03-11T23:59:45.000000-05:00", "bpm": 58}
    assert record["stress_data"] == {
        "avg_stress_level": 31, "max_stress_level": 88, "stress_rating": 2,  # balanced → LOW
        "stress_duration_seconds": 20160, "rest_stress_duration_seconds": 27300,
        "activity_stress_duration_seconds": 11220, "low_stress_duration_seconds": 12600,
        "medium_stress_duration_seconds": 5940, "high_stress_duration_seconds": 1620,
    }


def test_daily_at_plus_0530_keys_on_calendar_date_and_treats_stress_minus_one_as_no_data() -> None:
    doc = day_push(USER_B)
    record = only({"dailies": [doc]})
    # local midnight in Bengaluru is 2024-03-10T18:30Z: the key is the calendarDate, not the UTC date
    assert record["metadata"]["start_time"] == "2024-03-11T00:00:00.000000+05:30"
    assert record["metadata"]["end_time"] == "2024-03-12T00:00:00.000000+05:30"
    assert natural_key("daily", record) == "2024-03-11"
    assert record["heart_rate_data"]["detailed"]["hr_samples"][0] == {
        "timestamp": "2024-03-11T01:00:00.000000+05:30", "bpm": 61}
    assert record["heart_rate_data"]["summary"]["avg_hr_bpm"] == 62
    assert record["distance_data"]["distance_meters"] == 3158  # 3157.5 m → Terra's integer metres
    # averageStressLevel and maxStressLevel are -1 ("not enough data"), qualifier "unknown": no stress at all
    assert "stress_data" not in record
    # without calendarDate the day is the local date of the start, still not the UTC one
    undated = {k: v for k, v in doc.items() if k != "calendarDate"}
    assert natural_key("daily", only({"dailies": [undated]})) == "2024-03-11"
    measured = dict(doc, averageStressLevel=12, maxStressLevel=-1, stressQualifier="calm_awake")
    assert only({"dailies": [measured]})["stress_data"] == {"avg_stress_level": 12, "stress_rating": 1}
    shouted = dict(doc, averageStressLevel=12, stressQualifier="CALM_AWAKE")
    assert only({"dailies": [shouted]})["stress_data"] == {"avg_stress_level": 12, "stress_rating": 1}


def test_epochs_become_step_distance_calorie_met_and_activity_level_samples_of_the_day() -> None:
    sedentary, running, walking = normalize(load("epochs.json"))
    day = only({"dailies": [day_push(USER_A)]})
    for epoch in (sedentary, running, walking):
        assert epoch.type == "daily" and epoch.provider_user_id == USER_A
        assert epoch.data["metadata"] == day["metadata"]  # same day key: merges into the day's Daily
    # two activity types share the 08:00 slice (SEDENTARY + RUNNING): both map, at the slice start, each a part of
    # it; each sample holds the epoch's own amount over its 15 minutes (epochs of a day arrive in many pushes): the
    # delivered Daily has running totals (test_epochs_of_several_activity_types_become_the_days_running_totals)
    at = "2024-03-11T08:00:00.000000-05:00"
    assert running.data == {
        "metadata": day["metadata"],
        "distance_data": {"detailed": {"step_samples": [{"timestamp": at, "steps": 980}],
                                       "distance_samples": [{"timestamp": at, "distance_meters": 1012.0}]}},
        "calories_data": {"calorie_samples": [{"timestamp": at, "calories": 71}]},  # activeKilocalories
        "MET_data": {"MET_samples": [{"timestamp": at, "level": 9.8}]},
        "active_durations_data": {"activity_levels_samples": [{"timestamp": at, "level": 5}]},  # HIGHLY_ACTIVE
    }
    assert sedentary.data["MET_data"]["MET_samples"] == [{"timestamp": at, "level": 1.0}]
    assert sedentary.data["active_durations_data"]["activity_levels_samples"][0]["level"] == 2  # INACTIVE
    assert sedentary.data["distance_data"]["detailed"]["step_samples"] == [{"timestamp": at, "steps": 120}]
    assert walking.data["active_durations_data"]["activity_levels_samples"] == [
        {"timestamp": "2024-03-11T08:15:00.000000-05:00", "level": 4}]  # ACTIVE → MEDIUM_INTENSITY
    assert walking.data["MET_data"]["MET_samples"][0]["level"] == 3.4
    assert walking.data["distance_data"]["detailed"] == {
        "step_samples": [{"timestamp": "2024-03-11T08:15:00.000000-05:00", "steps": 1350}],
        "distance_samples": [{"timestamp": "2024-03-11T08:15:00.000000-05:00", "distance_meters": 1020.0}]}


def test_epochs_of_one_day_in_separate_pushes_and_an_epoch_update_replaces_the_epoch() -> None:
    """Garmin sends an epoch at 720 s, later the same start at 900 s (more steps): the update replaces it (its
    96 steps are not counted), the RUNNING epoch of the same slice stays."""
    first, _, second = load("epochs.json")["epochs"]
    partial = dict(first, durationInSeconds=720, activeTimeInSeconds=420, steps=96, distanceInMeters=68.5,
                   activeKilocalories=7)
    record = merged({"epochs": [partial]}, {"epochs": [second]}, {"epochs": [first]})[
        (USER_A, "daily", "2024-03-11")].data
    assert record["distance_data"]["detailed"]["step_samples"] == [
        {"timestamp": "2024-03-11T08:15:00.000000-05:00", "steps": 120},  # 08:00 SEDENTARY (the update)
        {"timestamp": "2024-03-11T08:30:00.000000-05:00", "steps": 1470}]  # + 08:15 WALKING 1350
    assert [s["distance_meters"] for s in record["distance_data"]["detailed"]["distance_samples"]] == [86.0, 1106.0]
    assert [s["calories"] for s in record["calories_data"]["calorie_samples"]] == [9, 57]
    with_running = merged({"epochs": [partial]}, load("epochs.json"))[(USER_A, "daily", "2024-03-11")].data
    assert [s["steps"] for s in with_running["distance_data"]["detailed"]["step_samples"]] == [1100, 2450]


def epoch(at_local: str, activity: str, steps: int, metres: float, kcal: int, met: float, intensity: str,
          duration: int = 900) -> dict[str, Any]:
    """An epoch of USER_A (-05:00) on 2024-03-11 starting at ``at_local`` (HH:MM), as Garmin pushes it."""
    hours, minutes = map(int, at_local.split(":"))
    start = 1710133200 + hours * 3600 + minutes * 60  # 2024-03-11T00:00:00-05:00
    return {"userId": USER_A, "summaryId": f"x2f41c9a-{start:x}-{activity.lower()[:3]}", "startTimeInSeconds": start,
            "startTimeOffsetInSeconds": -18000, "activityType": activity, "durationInSeconds": duration,
            "activeTimeInSeconds": duration // 2, "steps": steps, "distanceInMeters": metres,
            "activeKilocalories": kcal, "met": met, "intensity": intensity, "meanMotionIntensity": 2.0,
            "maxMotionIntensity": 4.0}


EPOCH_PUSH_1 = {"epochs": [epoch("08:00", "SEDENTARY", 20, 14.5, 2, 1.1, "SEDENTARY"),
                           epoch("08:00", "WALKING", 300, 228.25, 18, 3.2, "ACTIVE"),
                           epoch("08:15", "WALKING", 500, 380.5, 30, 3.4, "ACTIVE", duration=720)]}
EPOCH_PUSH_2 = {"epochs": [epoch("08:30", "RUNNING", 1500, 1650.0, 121, 9.6, "HIGHLY_ACTIVE"),
                           epoch("08:15", "WALKING", 650, 494.75, 39, 3.5, "ACTIVE")]}  # the 08:15 update
AT = "2024-03-11T{}:00.000000-05:00".format


def assert_epoch_totals(day: dict[str, Any]) -> None:
    """The Daily of EPOCH_PUSH_1 then EPOCH_PUSH_2: running totals since midnight at each slice's end, the activity
    types of a slice added up, the updated 08:15 walk replacing its first version (hand-computed)."""
    assert day["distance_data"]["detailed"] == {
        "step_samples": [{"timestamp": AT("08:15"), "steps": 320},  # 20 + 300
                         {"timestamp": AT("08:30"), "steps": 970},  # + 650 (not 500)
                         {"timestamp": AT("08:45"), "steps": 2470}],  # + 1500
        "distance_samples": [{"timestamp": AT("08:15"), "distance_meters": 242.75},
                             {"timestamp": AT("08:30"), "distance_meters": 737.5},
                             {"timestamp": AT("08:45"), "distance_meters": 2387.5}]}
    assert day["calories_data"]["calorie_samples"] == [{"timestamp": AT("08:15"), "calories": 20},
                                                       {"timestamp": AT("08:30"), "calories": 59},
                                                       {"timestamp": AT("08:45"), "calories": 180}]
    # levels stay at the slice start; of two activity types in a slice, the higher (walking over sedentary)
    assert day["MET_data"]["MET_samples"] == [{"timestamp": AT("08:00"), "level": 3.2},
                                              {"timestamp": AT("08:15"), "level": 3.5},
                                              {"timestamp": AT("08:30"), "level": 9.6}]
    assert day["active_durations_data"]["activity_levels_samples"] == [{"timestamp": AT("08:00"), "level": 4},
                                                                       {"timestamp": AT("08:15"), "level": 4},
                                                                       {"timestamp": AT("08:30"), "level": 5}]


SED_0800, WALK_0800, WALK_0815, RUN_0830, WALK_0815_UPDATE = (*EPOCH_PUSH_1["epochs"], *EPOCH_PUSH_2["epochs"])


@pytest.mark.parametrize("pushes", [
    (EPOCH_PUSH_1, EPOCH_PUSH_2),
    ({"epochs": [SED_0800, RUN_0830]}, {"epochs": [WALK_0815, WALK_0800]}, {"epochs": [WALK_0815_UPDATE]}),
    ({"epochs": [WALK_0815, SED_0800, WALK_0800, WALK_0815_UPDATE, RUN_0830]},),  # one push, the update last
], ids=["two pushes", "three pushes", "one push"])
def test_epochs_of_several_activity_types_become_the_days_running_totals(pushes: tuple[Any, ...]) -> None:
    event = merged(*pushes)[(USER_A, "daily", "2024-03-11")]
    assert_epoch_totals(event.data)
    sdk_validate("daily", event.data)


def test_epochs_pushed_in_two_runs_reach_sql_as_the_days_running_totals(tmp_path: Path) -> None:
    """Two runs of the real pipeline sharing the record state: the second run's epochs add to the first run's (the
    state keeps each epoch's own amount, never a total), and a redelivered push changes nothing."""
    database, state = tmp_path / "out.db", f"sqlite:///{tmp_path / 'state.db'}"

    def run(push: dict[str, Any], index: int) -> dict[str, Any]:
        source = tmp_path / f"raw{index}.jsonl"
        source.write_text(json.dumps({"provider": "garmin", "received_at": RECEIVED_AT_MS + index * 60_000,
                                      "payload": json.dumps(push)}) + "\n")
        summary = run_batch(NormalizeJob(FileSource(str(source)), [SqlSink("sql", f"sqlite:///{database}")],
                                         str(tmp_path / "dlq"), state_url=state))
        assert summary.with_prefix("dead_letter:") == {}
        with sqlite3.connect(database) as conn:
            ((key, payload),) = conn.execute("SELECT natural_key, payload FROM healthflow_records").fetchall()
        assert key == "2024-03-11"
        return json.loads(payload)

    first = run(EPOCH_PUSH_1, 0)
    assert [s["steps"] for s in first["distance_data"]["detailed"]["step_samples"]] == [320, 820]
    assert_epoch_totals(run(EPOCH_PUSH_2, 1))
    assert_epoch_totals(run(EPOCH_PUSH_2, 2))  # the same push again, received later


def test_skin_temp_respiration_and_move_iq_are_acknowledged_and_counted_never_dead_lettered(tmp_path: Path) -> None:
    """Garmin pushes ``skinTemp`` and ``allDayRespiration`` (Health API spec examples) and ``moveIQActivities`` to
    every app subscribed to them; healthflow maps none (no Terra field): one push holding all three and a daily
    delivers the daily, dead-letters nothing and counts each ignored document."""
    day = {"userId": USER_B, "summaryId": "x1b7e0d3-65ee", "calendarDate": "2024-03-11",
           "startTimeInSeconds": 1710095400, "startTimeOffsetInSeconds": 19800, "durationInSeconds": 86400,
           "steps": 4210}
    push = {**load("skinTemp.json"), **load("allDayRespiration.json"), **load("moveIQActivities.json"),
            "dailies": [day]}
    only_ignored = {**load("skinTemp.json"), **load("moveIQActivities.json")}
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps({"provider": "garmin", "received_at": RECEIVED_AT_MS + i,
                                          "payload": json.dumps(body)}) + "\n"
                              for i, body in enumerate((push, only_ignored))))
    database = tmp_path / "out.db"
    summary = run_batch(NormalizeJob(FileSource(str(source)), [SqlSink("sql", f"sqlite:///{database}")],
                                     str(tmp_path / "dlq")))
    assert summary.with_prefix("dead_letter:") == {}
    assert summary.with_prefix("ignored:garmin:") == {"skinTemp": 2, "allDayRespiration": 1, "moveIQActivities": 2}
    assert (summary.get("raw_ok"), summary.get("raw_empty")) == (1, 1)
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT natural_key FROM healthflow_records").fetchall() == [("2024-03-11",)]


def test_stress_details_skip_negative_codes() -> None:
    record = only(load("stressDetails.json"))
    assert natural_key("daily", record) == "2024-03-11"
    # -1 off wrist, -2 large motion, -3 not enough data, -4 recovering, -5 unidentified: no level
    assert record["stress_data"]["samples"] == [
        {"timestamp": "2024-03-11T00:00:00.000000-05:00", "level": 18},
        {"timestamp": "2024-03-11T00:03:00.000000-05:00", "level": 21},
        {"timestamp": "2024-03-11T00:12:00.000000-05:00", "level": 35},
        {"timestamp": "2024-03-11T00:18:00.000000-05:00", "level": 42},
        {"timestamp": "2024-03-11T00:27:00.000000-05:00", "level": 27},
    ]
    assert [s["level"] for s in record["stress_data"]["body_battery_samples"]] == [55, 55, 56, 56]
    assert record["stress_data"]["body_battery_samples"][-1]["timestamp"] == "2024-03-11T00:09:00.000000-05:00"


def test_pulse_ox_and_user_metrics() -> None:
    spo2 = only({"pulseox": [{"userId": USER_B, "summaryId": "x1b7e0d3-65edfc28", "calendarDate": "2024-03-11",
                              "startTimeInSeconds": 1710095400, "startTimeOffsetInSeconds": 19800,
                              "durationInSeconds": 86400, "timeOffsetSpo2Values": {"60": 97, "0": 96},
                              "onDemand": False}]})
    assert spo2["oxygen_data"] == {"saturation_samples": [
        {"timestamp": "2024-03-11T00:00:00.000000+05:30", "percentage": 96, "type": 0},
        {"timestamp": "2024-03-11T00:01:00.000000+05:30", "percentage": 97, "type": 0}]}
    vo2 = only({"userMetrics": [{"userId": USER_B, "summaryId": "x1b7e0d3-um", "calendarDate": "2024-03-11",
                                 "vo2Max": 48.0, "enhanced": True, "fitnessAge": 31}]})
    assert vo2["oxygen_data"] == {"vo2max_ml_per_min_per_kg": 48.0}
    assert natural_key("daily", vo2) == "2024-03-11"


def test_all_day_pulse_ox_readings_each_join_the_daily_of_their_own_local_day() -> None:
    """Garmin's spec example: an all-day summary starting 21:11 (+01:00) that runs 86,400 s; its readings after
    midnight belong to the next day's Daily, so the plausibility stage (samples within the day) drops none."""
    spec = [dict(doc, userId=USER_A) for doc in load("pulseox.spec.json")]
    items = pipeline({"pulseox": spec})
    assert not [item for item in items if isinstance(item, Failed)]
    days = {item.natural_key: item for item in items}
    assert sorted(days) == ["2018-08-27", "2018-08-28", "2019-10-29"]  # the on-demand reading's own day
    assert [s["timestamp"] for s in days["2018-08-27"].data["oxygen_data"]["saturation_samples"]] == [
        "2018-08-27T23:10:46.000000+01:00"]
    next_day = days["2018-08-28"].data
    assert next_day["metadata"]["start_time"] == "2018-08-28T00:00:00.000000+01:00"
    samples = next_day["oxygen_data"]["saturation_samples"]
    assert len(samples) == 18 and not [d for item in items for d in item.dropped]
    assert samples[0] == {"timestamp": "2018-08-28T00:10:46.000000+01:00", "percentage": 98, "type": 0}
    assert samples[-1] == {"timestamp": "2018-08-28T21:10:46.000000+01:00", "percentage": 96, "type": 0}


def test_hrv_is_the_days_average_rmssd_and_its_five_minute_samples() -> None:
    record = only(load("hrv.json"), USER_A)
    # the night that started 23:12 on the 10th (-05:00) belongs to calendarDate 2024-03-11
    assert record["metadata"] == only({"dailies": [day_push(USER_A)]})["metadata"]
    assert natural_key("daily", record) == "2024-03-11"
    assert record["heart_rate_data"] == {
        "summary": {"avg_hrv_rmssd": 44},  # lastNightAvg, ms; lastNight5MinHigh (72) has no Terra field
        "detailed": {"hrv_samples_rmssd": [  # offsets from startTimeInSeconds; the 0 at "900" is no reading
            {"timestamp": "2024-03-10T23:17:00.000000-05:00", "hrv_rmssd": 32},
            {"timestamp": "2024-03-10T23:22:00.000000-05:00", "hrv_rmssd": 24},
            {"timestamp": "2024-03-10T23:32:00.000000-05:00", "hrv_rmssd": 41},
            {"timestamp": "2024-03-10T23:37:00.000000-05:00", "hrv_rmssd": 55},
            {"timestamp": "2024-03-10T23:42:00.000000-05:00", "hrv_rmssd": 72},
            {"timestamp": "2024-03-10T23:47:00.000000-05:00", "hrv_rmssd": 48}]},
    }
    bengaluru = only(load("hrv.json"), USER_B)
    assert bengaluru["metadata"]["start_time"] == "2024-03-11T00:00:00.000000+05:30"
    assert bengaluru["heart_rate_data"]["detailed"]["hrv_samples_rmssd"][0] == {
        "timestamp": "2024-03-10T22:45:00.000000+05:30", "hrv_rmssd": 36}
    no_reading = dict(load("hrv.json")["hrv"][1], lastNightAvg=0, hrvValues={})
    assert "heart_rate_data" not in only({"hrv": [no_reading]})


def test_hrv_joins_the_days_daily_without_wiping_its_heart_rate() -> None:
    day = only({"dailies": [day_push(USER_A)]})
    daily = {"dailies": [day_push(USER_A)]}
    for bodies in ((daily, load("hrv.json")), (load("hrv.json"), daily)):
        heart = merged(*bodies)[(USER_A, "daily", "2024-03-11")].data["heart_rate_data"]
        assert heart["summary"] == {**day["heart_rate_data"]["summary"], "avg_hrv_rmssd": 44}
        assert heart["detailed"]["hr_samples"] == day["heart_rate_data"]["detailed"]["hr_samples"]
        assert len(heart["detailed"]["hrv_samples_rmssd"]) == 6


def test_health_snapshot_readings_become_samples_of_the_day() -> None:
    record = only(load("healthSnapshot.json"))
    def at(seconds: int) -> str:  # startTimeInSeconds is 14:02:00 local
        return f"2024-03-11T14:{2 + seconds // 60:02d}:{seconds % 60:02d}.000000+05:30"

    assert record == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+05:30", "end_time": "2024-03-12T00:00:00.000000+05:30",
                     "upload_type": 1, "timestamp_localization": 1},  # offsetStartTimeInSeconds: the example's spelling
        "heart_rate_data": {"detailed": {
            "hr_samples": [{"timestamp": at(0), "bpm": 68}, {"timestamp": at(30), "bpm": 66},
                           {"timestamp": at(60), "bpm": 71}, {"timestamp": at(90), "bpm": 74},
                           {"timestamp": at(115), "bpm": 68}],
            "hrv_samples_rmssd": [{"timestamp": at(0), "hrv_rmssd": 41.0}],  # avgValue only: at the start
            "hrv_samples_sdnn": [{"timestamp": at(0), "hrv_sdnn": 57.0}]}},
        "stress_data": {"samples": [{"timestamp": at(0), "level": 9}, {"timestamp": at(60), "level": 31}]},  # -1: none
        "oxygen_data": {"saturation_samples": [  # 0 % is no reading
            {"timestamp": at(0), "percentage": 97.0, "type": 0},
            {"timestamp": at(115), "percentage": 95.0, "type": 0}]},
    }
    assert natural_key("daily", record) == "2024-03-11"


# ----------------------------------------------------------------------------------------------------------------------
# sleeps
# ----------------------------------------------------------------------------------------------------------------------
def test_final_sleep_times_durations_hypnogram_and_respiration() -> None:
    record = only(load("sleeps.final.json"), USER_A)
    assert record["metadata"] == {
        "summary_id": "x2f41c9a-65ee8490",
        "start_time": "2024-03-10T23:12:00.000000-05:00",  # the evening before calendarDate, local time
        "end_time": "2024-03-11T06:58:00.000000-05:00",  # end of the last stage in sleepLevelsMap
        "upload_type": 2,  # ENHANCED_FINAL → AUTOMATIC
        "is_nap": False,
        "timestamp_localization": 1,
    }
    assert natural_key("sleep", record) == "x2f41c9a-65ee8490"
    durations = record["sleep_durations_data"]
    assert durations["asleep"] == {
        "duration_asleep_state_seconds": 26880,
        "duration_deep_sleep_state_seconds": 7020,
        "duration_light_sleep_state_seconds": 13920,
        "duration_REM_sleep_state_seconds": 5940,
    }
    assert durations["awake"] == {"duration_awake_state_seconds": 1080}
    assert durations["other"] == {"duration_in_bed_seconds": 27960, "duration_unmeasurable_sleep_seconds": 0}
    assert durations["sleep_efficiency"] == 96.14  # 26880 / 27960, as a percentage
    deep, light, rem, awake = 5, 4, 6, 1  # Terra SleepLevel
    assert [(s["timestamp"][11:16], s["level"]) for s in durations["hypnogram_samples"]] == [
        ("23:12", light), ("23:58", deep), ("01:13", light), ("02:43", rem), ("03:28", awake),
        ("03:40", deep), ("04:22", light), ("05:58", rem), ("06:52", awake)]
    assert durations["hypnogram_samples"][1] == {"timestamp": "2024-03-10T23:58:00.000000-05:00", "level": 5}
    assert durations["hypnogram_samples"][2]["timestamp"] == "2024-03-11T01:13:00.000000-05:00"
    breaths = record["respiration_data"]["breaths_data"]
    assert {k: v for k, v in breaths.items() if k != "samples"} == {
        "start_time": "2024-03-10T23:12:00.000000-05:00", "end_time": "2024-03-11T06:42:00.000000-05:00",
        "avg_breaths_per_min": 13.58, "min_breaths_per_min": 12.5, "max_breaths_per_min": 15.0}
    assert breaths["samples"][2] == {"timestamp": "2024-03-11T00:12:00.000000-05:00", "breaths_per_min": 13.0}
    spo2 = record["respiration_data"]["oxygen_saturation_data"]
    assert spo2["avg_saturation_percentage"] == 95.5
    assert spo2["samples"][-1] == {"timestamp": "2024-03-11T05:12:00.000000-05:00", "percentage": 97, "type": 0}
    assert record["scores"] == {"sleep_score": 84}


def test_tentative_sleep_is_upload_type_tentative() -> None:
    record = only(load("sleeps.tentative.json"))
    assert record["metadata"]["upload_type"] == 3  # ENHANCED_TENTATIVE → TENTATIVE
    assert record["metadata"]["end_time"] == "2024-03-11T06:52:00.000000-05:00"
    assert 6 not in {s["level"] for s in record["sleep_durations_data"]["hypnogram_samples"]}  # no REM staged yet
    assert "scores" not in record


def test_sleep_without_stage_map_ends_after_asleep_awake_and_unmeasurable() -> None:
    record = only(load("sleeps.final.json"), USER_B)
    assert record["metadata"]["start_time"] == "2024-03-10T22:40:00.000000+05:30"
    # 24300 asleep + 900 awake + 300 unmeasurable (the example's spelling): 22:40 + 7 h 05 min
    assert record["metadata"]["end_time"] == "2024-03-11T05:45:00.000000+05:30"
    assert record["metadata"]["upload_type"] == 2  # AUTO_FINAL
    assert record["sleep_durations_data"]["other"] == {"duration_in_bed_seconds": 25500,
                                                       "duration_unmeasurable_sleep_seconds": 300}
    assert "hypnogram_samples" not in record["sleep_durations_data"]


@pytest.mark.parametrize(("validation", "upload_type"), [
    ("MANUAL", 1), ("DEVICE", 2), ("AUTO_FINAL", 2), ("AUTO_TENTATIVE", 3), ("OFF_WRIST", 4), ("SOMETHING_NEW", 0),
    ("auto_final", 2), ("Enhanced_Final", 2), ("enhanced_tentative", 3), ("manual", 1), ("off_wrist", 4),
    (" ENHANCED_FINAL ", 2), ("SMART_FINAL", 2), ("smart_tentative", 3), (None, 0), ("", 0)])
def test_sleep_validation_to_upload_type(validation: str, upload_type: int) -> None:
    doc = dict(load("sleeps.final.json")["sleeps"][0], validation=validation)
    assert only({"sleeps": [doc]})["metadata"]["upload_type"] == upload_type


def test_naps_of_a_night_are_sleeps_of_their_own() -> None:
    night, device_nap, manual_nap = normalize(load("sleeps.naps.json"))
    assert night.data == only(load("sleeps.final.json"), USER_A)  # the night itself is unchanged
    assert device_nap.provider_user_id == USER_A
    assert device_nap.data == {
        "metadata": {"summary_id": "x2f41c9a-65ee8490-nap-1710184800",  # stable: the night's id + the nap's start
                     "start_time": "2024-03-11T14:20:00.000000-05:00", "end_time": "2024-03-11T14:50:00.000000-05:00",
                     "upload_type": 2, "is_nap": True, "timestamp_localization": 1},  # DEVICE → AUTOMATIC
        "sleep_durations_data": {"asleep": {"duration_asleep_state_seconds": 1800}},
    }
    assert manual_nap.data["metadata"]["upload_type"] == 1  # MANUAL
    assert manual_nap.data["metadata"]["end_time"] == "2024-03-11T17:50:00.000000-05:00"
    # re-sent with the final night, the naps keep their keys (no duplicates)
    events = merged(load("sleeps.naps.json"), load("sleeps.naps.json"))
    assert sorted(key for user, kind, key in events if kind == "sleep") == [
        "x2f41c9a-65ee8490", "x2f41c9a-65ee8490-nap-1710184800", "x2f41c9a-65ee8490-nap-1710196200"]


def test_a_gap_in_the_stage_map_is_unknown_not_the_stage_before_it() -> None:
    """Garmin staged 23:12-23:58 light, nothing 23:58-00:10, 00:10-01:13 deep: the gap is UNKNOWN (0), not light.
    The night ends with the map at 01:13 (asleep + awake + unmeasurable, 01:30, only bounds it): no UNKNOWN tail."""
    doc = dict(load("sleeps.final.json")["sleeps"][0], durationInSeconds=6540, awakeDurationInSeconds=0,
               unmeasurableSleepInSeconds=1740, deepSleepDurationInSeconds=None, lightSleepDurationInSeconds=None,
               remSleepInSeconds=None, validation="enhanced_final",
               sleepLevelsMap={"light": [{"startTimeInSeconds": 1710130320, "endTimeInSeconds": 1710133080}],
                               "deep": [{"startTimeInSeconds": 1710133800, "endTimeInSeconds": 1710137580}]})
    record = only({"sleeps": [doc]})
    assert record["sleep_durations_data"]["hypnogram_samples"] == [
        {"timestamp": "2024-03-10T23:12:00.000000-05:00", "level": 4},
        {"timestamp": "2024-03-10T23:58:00.000000-05:00", "level": 0},
        {"timestamp": "2024-03-11T00:10:00.000000-05:00", "level": 5}]
    assert record["metadata"]["end_time"] == "2024-03-11T01:13:00.000000-05:00"
    assert record["metadata"]["upload_type"] == 2
    # totals Garmin left out count only what it staged: 46 min light, 63 min deep, no REM
    assert record["sleep_durations_data"]["asleep"] == {"duration_asleep_state_seconds": 6540,
                                                        "duration_deep_sleep_state_seconds": 3780,
                                                        "duration_light_sleep_state_seconds": 2760}


def test_recorded_sleep_ends_with_its_stage_map_and_counts_unmeasurable_once() -> None:
    """A sleep Garmin really sent (recorded in a public app): ``durationInSeconds`` 26,460 = deep + light + REM +
    unmeasurable, the stage map ends at 08:59. Asleep is the staged sleep, the night ends with the map (adding
    awake and unmeasurable to durationInSeconds again would end it at 10:26 with an 87-minute UNKNOWN tail)."""
    record = only(load("sleeps.recorded.json"))
    assert record["metadata"]["start_time"] == "2021-01-13T01:26:00.000000+08:00"
    assert record["metadata"]["end_time"] == "2021-01-13T08:59:00.000000+08:00"
    durations = record["sleep_durations_data"]
    assert durations["asleep"] == {"duration_asleep_state_seconds": 21240,  # 4560 + 12720 + 3960
                                   "duration_deep_sleep_state_seconds": 4560,
                                   "duration_light_sleep_state_seconds": 12720,
                                   "duration_REM_sleep_state_seconds": 3960}
    assert durations["awake"] == {"duration_awake_state_seconds": 720}
    assert durations["other"] == {"duration_in_bed_seconds": 27180, "duration_unmeasurable_sleep_seconds": 5220}
    assert durations["sleep_efficiency"] == 78.15  # 21240 / 27180
    hypnogram = durations["hypnogram_samples"]
    assert hypnogram[-1] == {"timestamp": "2021-01-13T08:50:00.000000+08:00", "level": 4}  # light to the end
    assert [s["level"] for s in hypnogram].count(0) == 2  # the two unmeasurable spans, no UNKNOWN tail


def test_recorded_sleep_without_its_stage_map_ends_after_its_stage_totals() -> None:
    doc = dict(load("sleeps.recorded.json")["sleeps"][0], sleepLevelsMap=None)
    record = only({"sleeps": [doc]})
    assert record["metadata"]["end_time"] == "2021-01-13T08:59:00.000000+08:00"  # 4560+12720+3960+720+5220 s
    assert record["sleep_durations_data"]["sleep_efficiency"] == 78.15


def test_spec_sleep_counts_awake_once_and_cuts_the_runaway_deep_segment() -> None:
    """Garmin's spec example: durationInSeconds 15,264 already holds awake (11,231 deep + 3,541 light + 492 awake);
    its deep segment runs 16 h: the night is cut at start + 15,264 + 492."""
    first = normalize({"sleeps": [dict(doc, userId=USER_A) for doc in load("sleeps.spec.json")]})[0].data
    assert first["metadata"]["end_time"] == "2016-01-10T16:15:37.000000+02:00"
    durations = first["sleep_durations_data"]
    assert durations["asleep"]["duration_asleep_state_seconds"] == 14772  # 11231 + 3541 + 0
    assert durations["other"]["duration_in_bed_seconds"] == 15756
    assert durations["sleep_efficiency"] == 93.75
    assert durations["hypnogram_samples"] == [{"timestamp": "2016-01-10T11:53:01.000000+02:00", "level": 5}]


def test_spec_off_wrist_sleep_invents_no_asleep_time_or_efficiency() -> None:
    """Garmin's OFF_WRIST example (``x-EXAMPLE``): durationInSeconds 28,260 with every stage 0 measured nothing."""
    off_wrist = normalize({"sleeps": [dict(load("sleeps.spec.json")[2], userId=USER_A)]})[0].data
    assert off_wrist["metadata"]["upload_type"] == 4
    assert off_wrist["metadata"]["end_time"] == "2021-01-29T06:22:00.000000+09:00"
    assert off_wrist["sleep_durations_data"] == {"other": {"duration_in_bed_seconds": 28260,
                                                           "duration_unmeasurable_sleep_seconds": 0}}


def test_stage_names_are_case_insensitive_and_an_unknown_stage_is_unknown() -> None:
    doc = dict(load("sleeps.final.json")["sleeps"][0],
               sleepLevelsMap={"LIGHT": [{"startTimeInSeconds": 1710130320, "endTimeInSeconds": 1710133080}],
                               "unmeasurable": [{"startTimeInSeconds": 1710133080, "endTimeInSeconds": 1710133800}],
                               "Deep": [{"startTimeInSeconds": 1710133800, "endTimeInSeconds": 1710158280}]})
    assert [s["level"] for s in only({"sleeps": [doc]})["sleep_durations_data"]["hypnogram_samples"]] == [4, 0, 5]


def test_off_wrist_sleep_has_no_stage_totals_score_or_efficiency() -> None:
    record = only(load("sleeps.off_wrist.json"))
    assert record["metadata"]["upload_type"] == 4  # OFF_WRIST → INDETERMINATE
    assert record["metadata"]["start_time"] == "2024-03-11T23:30:00.000000-05:00"
    assert record["metadata"]["end_time"] == "2024-03-12T06:30:00.000000-05:00"  # + 25200 s unmeasurable
    assert record["sleep_durations_data"] == {"other": {"duration_in_bed_seconds": 25200,
                                                        "duration_unmeasurable_sleep_seconds": 25200}}
    assert "scores" not in record


# ----------------------------------------------------------------------------------------------------------------------
# activities and activityDetails
# ----------------------------------------------------------------------------------------------------------------------
def test_activities() -> None:
    run, glide = normalize(load("activities.json"))
    assert run.type == "activity" and run.provider_user_id == USER_B
    assert run.data == {
        "metadata": {
            "summary_id": "14562379901",
            "start_time": "2024-03-11T06:30:00.000000+05:30",
            "end_time": "2024-03-11T07:16:30.000000+05:30",  # + 2790 s
            "type": 8,  # RUNNING
            "upload_type": 1,  # AUTOMATIC
            "name": "Bengaluru Running",
            "timestamp_localization": 1,
        },
        "distance_data": {"summary": {"distance_meters": 8013, "steps": 7812,  # 8012.6 m
                                      "elevation": {"gain_actual_meters": 42.0, "loss_actual_meters": 39.6}}},
        "calories_data": {"total_burned_calories": 598},  # Activity API kcal include BMR
        "heart_rate_data": {"summary": {"avg_hr_bpm": 152, "max_hr_bpm": 171}},
        "movement_data": {
            "avg_speed_meters_per_second": 2.872, "max_speed_meters_per_second": 3.91,
            "avg_pace_minutes_per_kilometer": 5.803, "max_pace_minutes_per_kilometer": 4.263,
            "avg_cadence_rpm": 168.0, "max_cadence_rpm": 184.0,
        },
        "position_data": {"start_pos_lat_lng_deg": [12.9716, 77.5946]},
        "device_data": {"name": "Forerunner 965", "manufacturer": "Garmin"},
    }
    assert glide.data["metadata"]["type"] == 108  # PARAGLIDING is not in the table → OTHER
    assert glide.data["metadata"]["upload_type"] == 2  # "manual": true → MANUAL
    assert glide.data["metadata"]["end_time"] == "2024-03-11T15:30:00.000000+05:30"
    assert glide.data["device_data"] == {"manufacturer": "Garmin"}  # deviceName "unknown" dropped


@pytest.mark.parametrize(("garmin_type", "terra_type"), [
    ("RUNNING", 8), ("running", 8), ("TRAIL_RUNNING", 149), ("LAP_SWIMMING", 83), ("YOGA", 100),
    ("MOVE_IQ_SOMETHING", 108), (None, 108)])
def test_activity_type_mapping(garmin_type: str | None, terra_type: int) -> None:
    doc = dict(load("activities.json")["activities"][0], activityType=garmin_type)
    assert only({"activities": [doc]})["metadata"]["type"] == terra_type


def test_manually_updated_activity_is_manual_with_the_same_key() -> None:
    doc = dict(load("activities.json")["activities"][0], manual=True, activityName="Bengaluru Tempo Run")
    record = only({"manuallyUpdatedActivities": [doc]})
    assert record["metadata"]["upload_type"] == 2
    assert record["metadata"]["name"] == "Bengaluru Tempo Run"
    assert natural_key("activity", record) == "14562379901"


def test_activity_details_samples_laps_and_summary_id_of_the_activity() -> None:
    record = only(load("activityDetails.json"))
    summary = only({"activities": [load("activities.json")["activities"][0]]})
    assert record["metadata"] == summary["metadata"]  # summary_id "14562379901", not "...-detail"
    assert natural_key("activity", record) == natural_key("activity", summary) == "14562379901"
    # the first sample has no heart rate and no GPS fix yet: it yields speed/distance/elevation only
    assert record["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-11T06:30:15.000000+05:30", "bpm": 118, "timer_duration_seconds": 15},
        {"timestamp": "2024-03-11T06:30:30.000000+05:30", "bpm": 131, "timer_duration_seconds": 30},
        {"timestamp": "2024-03-11T06:53:15.000000+05:30", "bpm": 158, "timer_duration_seconds": 1380},
        {"timestamp": "2024-03-11T07:16:30.000000+05:30", "bpm": 166, "timer_duration_seconds": 2775},
    ]
    assert record["heart_rate_data"]["summary"] == {"avg_hr_bpm": 152, "max_hr_bpm": 171}
    movement = record["movement_data"]
    assert [s["speed_meters_per_second"] for s in movement["speed_samples"]] == [0.0, 2.61, 2.84, 3.02, 3.11]
    assert [s["cadence_rpm"] for s in movement["cadence_samples"]] == [162.0, 168.0, 172.0, 176.0]  # stepsPerMinute
    position = record["position_data"]
    assert position["start_pos_lat_lng_deg"] == [12.9716, 77.5946]
    assert len(position["position_samples"]) == 4
    assert position["position_samples"][1] == {"timestamp": "2024-03-11T06:30:30.000000+05:30",
                                               "coords_lat_lng_deg": [12.97195, 77.59491],
                                               "timer_duration_seconds": 30}
    detailed = record["distance_data"]["detailed"]
    assert detailed["distance_samples"][-1] == {"timestamp": "2024-03-11T07:16:30.000000+05:30",
                                                "distance_meters": 8012.6, "timer_duration_seconds": 2775}
    assert [s["elev_meters"] for s in detailed["elevation_samples"]] == [920.4, 920.6, 921.0, 934.2, 923.1]
    assert record["power_data"]["avg_watts"] == 247  # (231 + 248 + 262) / 3; the last sample has no power
    assert record["power_data"]["max_watts"] == 262
    assert len(record["power_data"]["power_samples"]) == 3
    assert record["lap_data"] == {"laps": [{"start_time": "2024-03-11T06:30:00.000000+05:30"},
                                           {"start_time": "2024-03-11T06:53:15.000000+05:30"}]}


def test_activity_and_its_details_merge_into_one_event() -> None:
    events = merged(load("activities.json"), load("activityDetails.json"))
    assert sorted(key for _, _, key in events) == ["14562379901", "14563011422"]
    run = events[(USER_B, "activity", "14562379901")].data
    summary = only({"activities": [load("activities.json")["activities"][0]]})
    details = only(load("activityDetails.json"))
    assert run == details  # details repeat every summary field and add the samples
    assert run["movement_data"]["avg_speed_meters_per_second"] == summary["movement_data"][
        "avg_speed_meters_per_second"]
    # details first, summary later: the summary does not wipe the samples
    reverse = merged(load("activityDetails.json"), load("activities.json"))[(USER_B, "activity", "14562379901")]
    assert len(reverse.data["heart_rate_data"]["detailed"]["hr_samples"]) == 4
    assert reverse.data["metadata"] == summary["metadata"]


# ----------------------------------------------------------------------------------------------------------------------
# bodyComps, bloodPressures, mct
# ----------------------------------------------------------------------------------------------------------------------
def test_body_comps_grams_to_kg_on_the_local_day() -> None:
    evening, manual = normalize(load("bodyComps.json"))
    # measured 21:30 in Bogotá = 02:30Z on the 12th: the day is the local one
    assert evening.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000-05:00", "end_time": "2024-03-12T00:00:00.000000-05:00",
                     "timestamp_localization": 1},
        "measurements_data": {"measurements": [{
            "measurement_time": "2024-03-11T21:30:00.000000-05:00",
            "weight_kg": 72.35,  # 72350 g
            "bodyfat_percentage": 18.4,
            "BMI": 23.1,
            "bone_mass_g": 3100,  # Terra keeps these in grams
            "muscle_mass_g": 31200,
            "water_percentage": 57.2,
        }]},
    }
    assert natural_key("body", evening.data) == "2024-03-11"
    assert manual.provider_user_id == USER_B
    assert manual.data["measurements_data"] == {"measurements": [
        {"measurement_time": "2024-03-11T07:45:00.000000+05:30", "weight_kg": 80.65}]}


def test_blood_pressure_and_weight_merge_into_the_days_body() -> None:
    reading = only(load("bloodPressures.json"))
    assert reading["blood_pressure_data"] == {"blood_pressure_samples": [
        {"timestamp": "2024-03-11T07:50:00.000000+05:30", "systolic_bp": 128, "diastolic_bp": 82}]}
    assert reading["heart_data"] == {"heart_rate_data": {"detailed": {"hr_samples": [
        {"timestamp": "2024-03-11T07:50:00.000000+05:30", "bpm": 71}]}}}
    body = merged(load("bodyComps.json"), load("bloodPressures.json"))[(USER_B, "body", "2024-03-11")].data
    assert body["measurements_data"]["measurements"][0]["weight_kg"] == 80.65
    assert body["blood_pressure_data"] == reading["blood_pressure_data"]
    assert body["heart_data"] == reading["heart_data"]


def test_mct_keyed_on_period_start_with_version_from_last_update() -> None:
    (fragment,) = normalize(load("mct.json"))
    assert fragment.type == "menstruation"
    assert fragment.version_ms == 1709560800000  # lastUpdatedTimeInSeconds, not the arrival time
    assert fragment.data == {
        # Garmin gives a local date only: local midnight without an offset
        "metadata": {"start_time": "2024-03-02T00:00:00.000000", "end_time": "2024-03-03T00:00:00.000000",
                     "timestamp_localization": 1},
        "menstruation_data": {
            "period_start_date": "2024-03-02", "period_length_days": 5, "cycle_length_days": "29",
            "predicted_cycle_length_days": 29, "is_predicted_cycle": "true", "day_in_cycle": 3,
            "current_phase": 1,  # MENSTRUAL → PERIOD
            "length_of_current_phase_days": 5, "days_until_next_phase": 3,
            "last_updated_time": "2024-03-04T14:00:00.000000+00:00",
        },
    }
    (update,) = normalize(load("mct.update.json"))
    assert load("mct.update.json")["mct"][0]["summaryId"] != load("mct.json")["mct"][0]["summaryId"]
    assert natural_key("menstruation", update.data) == natural_key("menstruation", fragment.data) == "2024-03-02"
    assert update.data["menstruation_data"]["current_phase"] == 2  # FOLLICULAR
    # delivered newest first: the older edit must not win
    event = merged(load("mct.update.json"), load("mct.json"))[(USER_A, "menstruation", "2024-03-02")]
    assert event.data == update.data
    assert event.ordering_timestamp_ms == 1710140000000


# ----------------------------------------------------------------------------------------------------------------------
# zero that means "not measured" (the rule per field is in the module docstring)
# ----------------------------------------------------------------------------------------------------------------------
def test_daily_heart_rate_zeros_are_not_measured() -> None:
    """A day the watch was barely worn: Garmin sends 0 for resting/min/max HR and 0 samples where nothing was read."""
    doc = dict(day_push(USER_A), restingHeartRateInBeatsPerMinute=0, minHeartRateInBeatsPerMinute=0,
               maxHeartRateInBeatsPerMinute=0, timeOffsetHeartRateSamples={"15": 0, "30": 61, "45": 0, "60": 63},
               steps=0, floorsClimbed=0)
    record = only({"dailies": [doc]})
    assert record["heart_rate_data"] == {
        "summary": {"avg_hr_bpm": 62},  # of the two real samples, not (0 + 61 + 0 + 63) / 4
        "detailed": {"hr_samples": [{"timestamp": "2024-03-11T00:00:30.000000-05:00", "bpm": 61},
                                    {"timestamp": "2024-03-11T00:01:00.000000-05:00", "bpm": 63}]}}
    assert record["distance_data"]["steps"] == 0 and record["distance_data"]["floors_climbed"] == 0  # real zeros


def test_activity_without_heart_rate_or_cadence_sensor() -> None:
    """A strength session recorded without HR: Garmin's 0 averages are no reading; distance 0 is a real 0 m."""
    doc = dict(load("activities.json")["activities"][0], activityType="STRENGTH_TRAINING", distanceInMeters=0,
               averageHeartRateInBeatsPerMinute=0, maxHeartRateInBeatsPerMinute=0, averageRunCadenceInStepsPerMinute=0,
               maxRunCadenceInStepsPerMinute=0.0, averagePaceInMinutesPerKilometer=0.0, maxPaceInMinutesPerKilometer=0,
               averageSpeedInMetersPerSecond=0.0)
    record = only({"activities": [doc]})
    assert "heart_rate_data" not in record
    assert record["distance_data"]["summary"]["distance_meters"] == 0
    assert record["movement_data"] == {"avg_speed_meters_per_second": 0.0, "max_speed_meters_per_second": 3.91}


def test_zero_spo2_respiration_vo2_body_composition_and_pulse_are_not_measured() -> None:
    spo2 = only({"pulseox": [dict(load("pulseox.json")["pulseox"][0], timeOffsetSpo2Values={"0": 0, "60": 95})]})
    assert [s["percentage"] for s in spo2["oxygen_data"]["saturation_samples"]] == [95]
    sleep = dict(load("sleeps.final.json")["sleeps"][0], timeOffsetSleepRespiration={"0": 0.0, "60": 14.0},
                 timeOffsetSleepSpo2={"0": 0, "60": 96}, overallSleepScore={"value": 0})
    respiration = only({"sleeps": [sleep]})["respiration_data"]
    assert [s["breaths_per_min"] for s in respiration["breaths_data"]["samples"]] == [14.0]
    assert respiration["breaths_data"]["min_breaths_per_min"] == 14.0
    assert respiration["oxygen_saturation_data"]["avg_saturation_percentage"] == 96
    assert "scores" not in only({"sleeps": [sleep]})
    vo2 = {"userId": USER_B, "summaryId": "x1b7e0d3-um", "calendarDate": "2024-03-11", "vo2Max": 0.0, "fitnessAge": 31}
    assert "oxygen_data" not in only({"userMetrics": [vo2]})
    scale = dict(load("bodyComps.json")["bodyComps"][0], bodyFatInPercent=0.0, bodyMassIndex=0, muscleMassInGrams=0,
                 boneMassInGrams=0, bodyWaterInPercent=0.0)
    assert only({"bodyComps": [scale]})["measurements_data"]["measurements"] == [
        {"measurement_time": "2024-03-11T21:30:00.000000-05:00", "weight_kg": 72.35}]
    reading = dict(load("bloodPressures.json")["bloodPressures"][0], pulse=0)
    assert "heart_data" not in only({"bloodPressures": [reading]})


# ----------------------------------------------------------------------------------------------------------------------
# update semantics through the merge
# ----------------------------------------------------------------------------------------------------------------------
def test_daily_resent_three_times_ends_as_the_last_one() -> None:
    pushes = load("dailies.through_the_day.json")
    last = only({"dailies": [day_push(USER_A)]})
    first = only(pushes[0])
    assert first != last and first["distance_data"]["steps"] == 3120
    event = merged(*pushes)[(USER_A, "daily", "2024-03-11")]
    assert event.data == last
    # the same across batches: each push merged on top of the stored record
    stored: dict[tuple[str, str], tuple[dict[str, Any], int]] = {}
    user = terra_user_id("garmin", USER_A)
    versions = [k for k in pipeline(*pushes) if isinstance(k, Keyed) and k.user["user_id"] == user]
    assert len(versions) == 3
    for keyed in versions:
        (event,) = merge_user_events(user, [keyed], stored)
        stored[("daily", event.natural_key)] = (event.data, event.ordering_timestamp_ms)
    assert event.data == last
    assert event.ordering_timestamp_ms == RECEIVED_AT_MS + 2 * 60_000  # dailies carry no version: arrival time


def test_epochs_and_stress_fill_the_daily_without_wiping_its_summary() -> None:
    day = only({"dailies": [day_push(USER_A)]})
    stress = only(load("stressDetails.json"))
    for order in (("dailies", "epochs", "stress"), ("epochs", "stress", "dailies")):
        bodies = {"dailies": {"dailies": [day_push(USER_A)]}, "epochs": load("epochs.json"),
                  "stress": load("stressDetails.json")}
        record = merged(*(bodies[name] for name in order))[(USER_A, "daily", "2024-03-11")].data
        for key in ("metadata", "heart_rate_data"):
            assert record[key] == day[key], (order, key)
        assert {k: v for k, v in record["distance_data"].items() if k != "detailed"} == day["distance_data"]
        assert {k: v for k, v in record["calories_data"].items() if k != "calorie_samples"} == day["calories_data"]
        assert record["stress_data"] == {**day["stress_data"], **stress["stress_data"]}
        assert record["active_durations_data"]["activity_seconds"] == 5460
        assert record["distance_data"]["steps"] == 11842  # the day's total stays the dailies' one
        # running totals at each slice's end: SEDENTARY 120 + RUNNING 980, then + WALKING 1350
        assert [s["steps"] for s in record["distance_data"]["detailed"]["step_samples"]] == [1100, 2450]
        met = record["MET_data"]["MET_samples"]
        levels = record["active_durations_data"]["activity_levels_samples"]
        # one sample per 15-minute slice; of two activity types in one slice the higher (RUNNING over SEDENTARY)
        assert met == [{"timestamp": "2024-03-11T08:00:00.000000-05:00", "level": 9.8},
                       {"timestamp": "2024-03-11T08:15:00.000000-05:00", "level": 3.4}]
        assert [s["level"] for s in levels] == [5, 4]


def test_tentative_then_final_sleep_ends_final() -> None:
    final = only(load("sleeps.final.json"), USER_A)
    event = merged(load("sleeps.tentative.json"), load("sleeps.final.json"))[(USER_A, "sleep", "x2f41c9a-65ee8490")]
    record = event.data
    assert record["metadata"] == final["metadata"]  # upload_type 2, end 06:58
    assert record["sleep_durations_data"]["asleep"] == final["sleep_durations_data"]["asleep"]
    assert record["sleep_durations_data"]["awake"] == final["sleep_durations_data"]["awake"]
    assert record["sleep_durations_data"]["sleep_efficiency"] == 96.14
    assert record["scores"] == {"sleep_score": 84}
    merged_stages = {s["timestamp"]: s["level"] for s in record["sleep_durations_data"]["hypnogram_samples"]}
    for sample in final["sleep_durations_data"]["hypnogram_samples"]:
        assert merged_stages[sample["timestamp"]] == sample["level"]


# ----------------------------------------------------------------------------------------------------------------------
# input forms: push body, pull answer (bare array), single summary
# ----------------------------------------------------------------------------------------------------------------------
def raw_event(payload: Any, kind: str | None, index: int = 0) -> list[Keyed | Failed]:
    """One raw event through the real normalize step, its kind named by the event (as a pull publishes it)."""
    raw = RawPayload("garmin", json.dumps(payload).encode(), kind, None, RECEIVED_AT_MS)
    return list(normalize_message(RawMessage(encode_raw(raw), {"partition": 0, "offset": index})))


@pytest.mark.parametrize("kind", ["dailies", "epochs", "sleeps", "activities", "activityDetails",
                                  "manuallyUpdatedActivities", "bodyComps", "bloodPressures", "stressDetails",
                                  "userMetrics", "pulseox", "hrv", "healthSnapshot", "mct"])
def test_a_pull_answer_a_bare_array_maps_as_its_push_body_does(kind: str) -> None:
    """``GET /wellness-api/rest/<type>?uploadStartTimeInSeconds=…`` (a Ping callback, or a pull) answers a bare JSON
    array of that type: with the kind named by the raw event it maps to exactly what the push body maps to."""
    answer = load(f"{kind}.pull.json")
    keyed = pipeline({kind: answer})
    pushed = [(k.user["user_id"], k.type, k.data) for k in keyed]
    pulled = raw_event(answer, kind)
    assert not [item.record["error_message"] for item in pulled if isinstance(item, Failed)]
    assert [(k.user["user_id"], k.type, k.data) for k in pulled] == pushed
    assert sum(k.fragment_count for k in keyed) >= len(answer)  # a run of epochs is one Keyed of its rows


def test_a_single_summary_naming_its_kind_and_what_is_refused() -> None:
    (keyed,) = raw_event(load("sleeps.single.json"), "sleeps")
    assert isinstance(keyed, Keyed) and keyed.data == only(load("sleeps.final.json"), USER_A)
    assert raw_event([], "dailies") == []  # an upload window with nothing new
    # a push body still names its own kind; another kind in it than the event's is refused
    (failed,) = raw_event({"sleeps": [load("sleeps.single.json")]}, "dailies")
    assert isinstance(failed, Failed)
    assert failed.record["error_message"] == "payload holds 'sleeps' but the raw event says kind 'dailies'"
    # a bare array whose event names no kind cannot be mapped: the error says what to attach
    (failed,) = raw_event(load("dailies.pull.json"), None)
    assert "keyed by summary type (or name its kind with the raw event)" in failed.record["error_message"]
    (failed,) = raw_event(load("dailies.single.json"), "futureSummaryType")
    assert failed.record["error_class"] == "UnknownKind"
    assert raw_event(load("moveIQActivities.json")["moveIQActivities"][0], "moveIQActivities") == []  # ignored


# ----------------------------------------------------------------------------------------------------------------------
# malformed input
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "doc", "field"), [
    ("dailies", lambda: day_push(USER_A), "startTimeInSeconds"),
    ("epochs", lambda: load("epochs.json")["epochs"][0], "startTimeInSeconds"),
    ("sleeps", lambda: load("sleeps.final.json")["sleeps"][0], "startTimeInSeconds"),
    ("sleeps", lambda: load("sleeps.final.json")["sleeps"][0], "summaryId"),
    ("stressDetails", lambda: load("stressDetails.json")["stressDetails"][0], "startTimeInSeconds"),
    ("activities", lambda: load("activities.json")["activities"][0], "startTimeInSeconds"),
    ("activities", lambda: load("activities.json")["activities"][0], "durationInSeconds"),
    ("bodyComps", lambda: load("bodyComps.json")["bodyComps"][0], "measurementTimeInSeconds"),
    ("bloodPressures", lambda: load("bloodPressures.json")["bloodPressures"][0], "systolic"),
    ("mct", lambda: load("mct.json")["mct"][0], "periodStartDate"),
])
def test_missing_required_field_is_a_mapping_error(kind: str, doc: Any, field: str) -> None:
    broken = {k: v for k, v in doc().items() if k != field}
    with pytest.raises(MappingError, match=f"missing required field\\(s\\): {field}$"):
        normalize({kind: [broken]})


def test_a_weight_entered_by_hand_for_1995_is_accepted() -> None:
    """Only 0 (a placeholder) and values beyond 2100 (milliseconds) are refused: a hand-entered record may be old."""
    doc = dict(load("bodyComps.json")["bodyComps"][0], measurementTimeInSeconds=788_918_400)  # 1995-01-01T00:00Z
    [fragment] = normalize({"bodyComps": [doc]})
    assert fragment.data["metadata"]["start_time"].startswith("1995-01-01") or \
        fragment.data["metadata"]["start_time"].startswith("1994-12-31")


@pytest.mark.parametrize(("kind", "doc", "changes", "reason"), [
    ("dailies", lambda: day_push(USER_A), {"startTimeInSeconds": 1710133200000},
     "startTimeInSeconds must be unix seconds between 1970-01-02 and 2100, got 1710133200000 (milliseconds? Garmin "
     "sends unix seconds)"),
    ("sleeps", lambda: load("sleeps.final.json")["sleeps"][0], {"startTimeInSeconds": "1710130320"},
     "startTimeInSeconds must be unix seconds between 1970-01-02 and 2100, got '1710130320'"),
    ("bodyComps", lambda: load("bodyComps.json")["bodyComps"][0], {"measurementTimeInSeconds": 0},
     "measurementTimeInSeconds must be unix seconds between 1970-01-02 and 2100, got 0"),
    ("activities", lambda: load("activities.json")["activities"][0], {"durationInSeconds": -2790},
     "durationInSeconds must be a number of seconds ≥ 0, got -2790"),
    ("epochs", lambda: load("epochs.json")["epochs"][0], {"startTimeOffsetInSeconds": -18000000},
     "startTimeOffsetInSeconds must be a display offset in seconds within ±24 h, got -18000000"),
])
def test_implausible_times_are_refused_naming_the_field(kind: str, doc: Any, changes: dict[str, Any],
                                                        reason: str) -> None:
    with pytest.raises(MappingError) as error:
        normalize({kind: [dict(doc(), **changes)]})
    assert str(error.value) == reason


def test_activity_details_without_any_summary_id_is_a_mapping_error() -> None:
    doc = load("activityDetails.json")["activityDetails"][0]
    with pytest.raises(MappingError, match="summaryId"):
        normalize({"activityDetails": [dict(doc, summaryId=None)]})
    with pytest.raises(MappingError, match="startTimeInSeconds"):
        normalize({"activityDetails": [dict(doc, summary={})]})


def test_malformed_payloads_and_documents() -> None:
    with pytest.raises(UnknownKind, match="garmin kind 'futureSummaryType' is not mapped"):
        normalize({"futureSummaryType": [{"userId": USER_A, "summaryId": "m1", "activityType": "WALKING"}]})
    with pytest.raises(MappingError, match="dailies document must be a JSON object, got str"):
        normalize({"dailies": ["x2f41c9a-65ee8fd0"]})
    with pytest.raises(MappingError, match="payload must be a JSON object keyed by summary type"):
        normalize([day_push(USER_A)])
    with pytest.raises(MappingError, match="'dailies' must be a list of summaries"):
        normalize({"dailies": day_push(USER_A)})
    with pytest.raises(MappingError, match="no user id"):
        normalize({"dailies": [{k: v for k, v in day_push(USER_A).items() if k != "userId"}]})
    with pytest.raises(MappingError, match="garmin dailies: AttributeError"):  # a sample map that is a list
        normalize({"dailies": [dict(day_push(USER_A), timeOffsetHeartRateSamples=[52, 51])]})


def test_one_bad_document_dead_letters_only_that_document() -> None:
    good_a, good_b = day_push(USER_A), day_push(USER_B)
    no_start = {k: v for k, v in good_a.items() if k != "startTimeInSeconds"}
    body = {"dailies": [good_a, no_start, "not a summary", good_b],
            "futureSummaryType": [{"userId": USER_A, "summaryId": "m1"}]}
    items = pipeline(body)
    keyed = [i for i in items if isinstance(i, Keyed)]
    failed = [i.record for i in items if isinstance(i, Failed)]
    assert sorted(k.user["user_id"] for k in keyed) == sorted(terra_user_id("garmin", u) for u in (USER_A, USER_B))
    assert [k.data for k in keyed] == [only({"dailies": [good_a]}), only({"dailies": [good_b]})]
    assert [(f["stage"], f["kind"], f["source"]["document_index"], f["error_class"]) for f in failed] == [
        ("normalize", "dailies", "1", "MappingError"),
        ("normalize", "dailies", "2", "MappingError"),
        ("normalize", "futureSummaryType", "4", "UnknownKind"),
    ]
    assert failed[0]["error_message"] == "missing required field(s): startTimeInSeconds"
    assert failed[1]["error_message"] == "garmin dailies document must be a JSON object, got str"
    assert "futureSummaryType" in failed[2]["error_message"]
    original = encode_raw(RawPayload("garmin", json.dumps(body).encode(), received_at_ms=RECEIVED_AT_MS))
    for record in failed:
        assert record["original"] == original  # the whole raw message, for replay
        assert record["provider"] == "garmin"
        assert {"partition": "0", "offset": "0"}.items() <= record["source"].items()
        assert record["source"]["idempotency_key"] == keyed[0].raw_idempotency_key


@pytest.mark.parametrize(("payload", "reason"), [
    (b'[{"userId": "c0a5d2e8f7b14e39a6d21f8b3e4c5d70"}]', "payload must be a JSON object keyed by summary type"),
    (b'"dailies"', "payload must be a JSON object keyed by summary type"),
    (b'{"dailies": {"userId": "c0a5"}}', "'dailies' must be a list of summaries"),
    (b'{"dailies": [{"userId": ', "Expecting value"),
])
def test_unparseable_payload_is_one_dead_letter(payload: bytes, reason: str) -> None:
    raw = encode_raw(RawPayload("garmin", payload, received_at_ms=RECEIVED_AT_MS))
    (item,) = normalize_message(RawMessage(raw, {"partition": 3, "offset": 41}))
    assert isinstance(item, Failed)
    assert item.stage == item.record["stage"] == "parse"
    assert reason in item.record["error_message"]
    assert "document_index" not in item.record["source"]
    assert item.record["source"]["offset"] == "41"
    assert item.record["original"] == raw


# ----------------------------------------------------------------------------------------------------------------------
# The Garmin client: ending a link deletes the user registration (real HTTP against tests/servers/fake_garmin.py)
# ----------------------------------------------------------------------------------------------------------------------
def _connected(garmin: Any, plane: Any, account: str) -> str:
    from servers.fake_garmin import authorize_in_browser
    from servers.fake_provider import query_of

    garmin.oauth.next_account = account
    start = plane.start_auth("dev-1", "garmin", reference_id=f"ref-{account}")
    assert plane.complete_auth("garmin", query_of(authorize_in_browser(start.auth_url))).ok
    return start.user_id


def test_deauthentication_deletes_the_registration_and_a_registration_already_gone_counts_as_done(tmp_path) -> None:
    from servers.fake_garmin import FakeGarmin

    from controlplane.auth import MemoryCollector

    events = MemoryCollector()
    with FakeGarmin() as garmin:
        plane = garmin.control_plane(f"sqlite:///{tmp_path}/cp.db", public_url="http://127.0.0.1:9", emit=events)
        kept, gone = _connected(garmin, plane, "acct-kept"), _connected(garmin, plane, "acct-gone")
        assert plane.connection(kept).provider_user_id == "acct-kept"  # from GET /user/id: no id in the token answer

        plane.deauthenticate(kept)
        (delete,) = [c for c in garmin.calls if c.method == "DELETE"]
        assert (delete.path, delete.status, delete.account) == ("/user/registration", 204, "acct-kept")
        assert not garmin.oauth.is_live(delete.token)  # Garmin ended the grant
        garmin.drain()
        assert garmin.pushes[-1].body == {"deregistrations": [{"userId": "acct-kept"}]}

        garmin.oauth.revoke_account("acct-gone")  # removed in Garmin Connect; we missed the deregistration push
        plane.deauthenticate(gone)  # 401, the refresh is refused (invalid_grant): already gone, done
        assert [c.status for c in garmin.calls if c.method == "DELETE"] == [204, 401]
        assert garmin.oauth.calls["token:refresh_token"] == 1
        assert plane.connection(gone).state == "deauth" and plane.tokens(gone) is None
        plane.close()
    assert [e["type"] for e in events.events] == ["auth", "auth", "deauth", "deauth"]


def test_garmins_published_sleep_example_ends_at_its_reported_durations_and_cuts_the_overrunning_segment() -> None:
    """The Health API spec's own ``sleeps`` example: a deep segment runs from the start to 1452478724 (16.4 h) while
    Garmin reports 15264 s asleep (deep 11231 + light 3541 + awake 492) and 492 s awake. The night ends at start +
    asleep + awake (4.4 h), not at the latest segment end; the segment is cut there and the light segments after
    the night are no stage of it."""
    body = {"sleeps": [{
        "userId": "sub-1", "summaryId": "EXAMPLE 567890", "calendarDate": "2016-01-10", "durationInSeconds": 15264,
        "startTimeInSeconds": 1452419581, "startTimeOffsetInSeconds": 7200, "unmeasurableSleepDurationInSeconds": 0,
        "deepSleepDurationInSeconds": 11231, "lightSleepDurationInSeconds": 3541, "remSleepInSeconds": 0,
        "awakeDurationInSeconds": 492, "validation": "DEVICE",
        "sleepLevelsMap": {"deep": [{"startTimeInSeconds": 1452419581, "endTimeInSeconds": 1452478724}],
                           "light": [{"startTimeInSeconds": 1452478725, "endTimeInSeconds": 1452479725},
                                     {"startTimeInSeconds": 1452481725, "endTimeInSeconds": 1452484266}]}}]}
    record = only(body)
    assert (record["metadata"]["start_time"], record["metadata"]["end_time"]) == (
        "2016-01-10T11:53:01.000000+02:00", "2016-01-10T16:15:37.000000+02:00")  # + 15264 + 492 s
    durations = record["sleep_durations_data"]
    assert durations["other"] == {"duration_in_bed_seconds": 15756, "duration_unmeasurable_sleep_seconds": 0}
    assert durations["sleep_efficiency"] == 93.75  # asleep 11231 + 3541 (awake counted once) / 15756
    assert durations["hypnogram_samples"] == [{"timestamp": "2016-01-10T11:53:01.000000+02:00", "level": 5}]


def test_a_stage_segment_running_past_the_night_is_cut_at_its_end() -> None:
    """A segment that starts in the night and runs past start + asleep + awake + unmeasurable ends with the night:
    a light segment of 04:00-09:00 in a night reported to end at 06:58 is no UNKNOWN gap and no longer night."""
    doc = load("sleeps.final.json")["sleeps"][0]
    levels = doc["sleepLevelsMap"]
    levels["light"][-1]["endTimeInSeconds"] = doc["startTimeInSeconds"] + 10 * 3600
    levels["rem"] = levels["rem"][:1]
    levels["awake"] = levels["awake"][:1]
    record = only({"sleeps": [doc]})
    assert record["metadata"]["end_time"] == "2024-03-11T06:58:00.000000-05:00"
    assert record["sleep_durations_data"]["hypnogram_samples"][-1] == {
        "timestamp": "2024-03-11T04:22:00.000000-05:00", "level": 4}


def test_the_days_average_heart_rate_is_the_mean_of_its_plausible_samples() -> None:
    """Garmin's averageHeartRateInBeatsPerMinute is a 7-day average, so the day's is the mapper's mean of its samples:
    a 312 bpm artefact is no heart rate and is left out of it (the plausibility stage drops the sample itself)."""
    doc = dict(day_push(USER_A), timeOffsetHeartRateSamples={"15": 52, "30": 53, "25200": 88, "25215": 312})
    record = only({"dailies": [doc]})
    assert record["heart_rate_data"]["summary"]["avg_hr_bpm"] == 64.33
    assert [s["bpm"] for s in record["heart_rate_data"]["detailed"]["hr_samples"]] == [52, 53, 88, 312]


def test_an_epoch_of_blank_activity_type_is_its_own_part_of_the_slice_never_merged_into_another() -> None:
    """An epoch whose ``activityType`` is blank (empty or missing) adds to its slice beside the WALKING epoch: it is
    the part UNKNOWN, not merged into the walking sample (which would take its steps for the walk's)."""
    blank = dict(epoch("08:00", "SEDENTARY", 30, 20.0, 3, 1.0, "SEDENTARY"), activityType=" ")
    missing = {key: value for key, value in epoch("08:15", "X", 7, 5.0, 1, 1.0, "SEDENTARY").items()
               if key != "activityType"}
    day = merged({"epochs": [WALK_0800]}, {"epochs": [blank, missing]})[(USER_A, "daily", "2024-03-11")].data
    assert day["distance_data"]["detailed"]["step_samples"] == [{"timestamp": AT("08:15"), "steps": 330},  # 300 + 30
                                                                {"timestamp": AT("08:30"), "steps": 337}]
    assert normalize({"epochs": [blank]})[0].part == "UNKNOWN"


def test_a_partial_stage_map_does_not_end_the_night_its_stage_totals_outlast() -> None:
    """A sleepLevelsMap holding only the first segments (the totals say 7.5 h were staged) ends nothing: the night
    runs to start + the totals, and the span the map does not cover is UNKNOWN, never the last stage."""
    night = copy.deepcopy(load("sleeps.final.json")["sleeps"][0])
    start = night["startTimeInSeconds"]
    night["sleepLevelsMap"] = {"light": [{"startTimeInSeconds": start, "endTimeInSeconds": start + 1800}],
                               "deep": [{"startTimeInSeconds": start + 1800, "endTimeInSeconds": start + 3600}]}
    [sleep] = [f for f in normalize({"sleeps": [night]}) if f.type == "sleep"]
    staged = 7020 + 13920 + 5940 + 1080  # deep + light + REM + awake (no unmeasurable)
    assert sleep.data["metadata"]["end_time"] == unix_ts(start + staged, -18000)
    assert sleep.data["sleep_durations_data"]["asleep"]["duration_light_sleep_state_seconds"] == 13920
    assert sleep.data["sleep_durations_data"]["hypnogram_samples"][-1] == {"timestamp": unix_ts(start + 3600, -18000),
                                                                           "level": 0}


def test_a_sleep_entered_by_hand_has_its_duration_asleep() -> None:
    """A MANUAL sleep carries no stage totals: its ``durationInSeconds`` is the time asleep."""
    manual = {"userId": USER_A, "summaryId": "x2f41c9a-manual", "calendarDate": "2024-03-11",
              "startTimeInSeconds": 1710130320, "startTimeOffsetInSeconds": -18000, "durationInSeconds": 28800,
              "validation": "MANUAL"}
    [sleep] = [f for f in normalize({"sleeps": [manual]}) if f.type == "sleep"]
    durations = sleep.data["sleep_durations_data"]
    assert durations["asleep"]["duration_asleep_state_seconds"] == 28800
    assert sleep.data["metadata"]["end_time"] == unix_ts(1710130320 + 28800, -18000)
    # with awake time (counted in the duration, as Garmin's examples do): the same night, 10 min less asleep
    [sleep] = [f for f in normalize({"sleeps": [dict(manual, awakeDurationInSeconds=600)]}) if f.type == "sleep"]
    assert sleep.data["sleep_durations_data"]["asleep"]["duration_asleep_state_seconds"] == 28200
    assert sleep.data["metadata"]["end_time"] == unix_ts(1710130320 + 28800, -18000)
    assert check_record("sleep", validate_record("sleep", sleep.data))[1] == {}
    # stages reported as 0 (not missing) are what Garmin measured: no fallback to the duration
    zeros = dict(manual, validation="AUTO_FINAL", deepSleepDurationInSeconds=0, lightSleepDurationInSeconds=0,
                 remSleepInSeconds=0, unmeasurableSleepInSeconds=28800)
    [sleep] = [f for f in normalize({"sleeps": [zeros]}) if f.type == "sleep"]
    assert sleep.data["sleep_durations_data"]["asleep"]["duration_asleep_state_seconds"] == 0
    # a sleep entered by hand with its stage fields at 0: its duration, as when they are missing
    [sleep] = [f for f in normalize({"sleeps": [dict(zeros, validation="MANUAL", unmeasurableSleepInSeconds=0)]})
               if f.type == "sleep"]
    assert sleep.data["sleep_durations_data"]["asleep"]["duration_asleep_state_seconds"] == 28800
