"""Oura API v2 mappers: realistic payloads in tests/fixtures/oura, checked value by value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from terra.types.activity import Activity
from terra.types.daily import Daily
from terra.types.sleep import Sleep

from connectors import get_provider
from connectors.base import Deletion, Fragment, MappingError, UnknownKind, natural_key
from connectors.hooks import Request
from connectors.providers.oura.client import OuraPollHook
from schemas.serde import validate_record

FIXTURES = Path(__file__).parent / "fixtures" / "oura"
TERRA_MODELS = {"activity": Activity, "daily": Daily, "sleep": Sleep}
USER = "e4b8f9d2-3c6a-4f7e-9d1b-2a5c8e7f6a3b"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def normalize(payload: Any, kind: str) -> list[Fragment]:
    """Map a payload and check every record against the Avro schema and Terra's SDK models."""
    fragments = list(get_provider("oura").normalize(payload, kind=kind, user_id=USER))
    for fragment in fragments:
        assert fragment.provider_user_id == USER
        if isinstance(fragment, Deletion):
            continue
        validate_record(fragment.type, fragment.data)
        TERRA_MODELS[fragment.type].model_validate(fragment.data)
        assert fragment.provider_user_id == USER
    return fragments


def test_long_sleep_keeps_local_offset_and_maps_durations() -> None:
    long_sleep, _nap = normalize(load("sleep.page.json"), "sleep")
    assert long_sleep.type == "sleep"
    assert long_sleep.version_ms == 1710137564000  # meta.updated_at 2024-03-11T06:12:44Z
    record = long_sleep.data
    assert record["metadata"] == {
        "summary_id": "6f1c2a70-0b8e-4a4e-9d55-3c1a0b9e2f41",
        "start_time": "2024-03-10T23:12:00.000000+01:00",
        "end_time": "2024-03-11T06:58:00.000000+01:00",
        "upload_type": 2,  # SleepUploadType.AUTOMATIC
        "is_nap": False,
        "timestamp_localization": 1,
    }
    assert natural_key("sleep", record) == "6f1c2a70-0b8e-4a4e-9d55-3c1a0b9e2f41"
    durations = record["sleep_durations_data"]
    assert durations["asleep"] == {
        "duration_asleep_state_seconds": 25800,
        "duration_deep_sleep_state_seconds": 5400,
        "duration_light_sleep_state_seconds": 14400,
        "duration_REM_sleep_state_seconds": 6000,
    }
    assert durations["awake"] == {"duration_awake_state_seconds": 2160, "sleep_latency_seconds": 540}
    assert durations["other"] == {"duration_in_bed_seconds": 27960}
    assert durations["sleep_efficiency"] == 92  # percentage scale, as Terra's (0-100)
    assert record["readiness_data"] == {"readiness": 81}
    assert record["temperature_data"] == {"delta": -0.12}
    assert record["respiration_data"]["breaths_data"]["avg_breaths_per_min"] == 14.875
    assert record["heart_rate_data"]["summary"]["avg_hrv_rmssd"] == 58
    assert "scores" not in record  # Oura scores the day: see daily_sleep


def test_hypnogram_is_one_sample_per_five_minutes_with_terra_levels() -> None:
    record = normalize(load("sleep.page.json"), "sleep")[0].data
    phases = load("sleep.page.json")["data"][0]["sleep_phase_5_min"]
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    assert len(hypnogram) == len(phases) == 94  # ceil(27960 s / 300 s)
    assert hypnogram[0] == {"timestamp": "2024-03-10T23:12:00.000000+01:00", "level": 1}  # '4' awake
    assert hypnogram[12] == {"timestamp": "2024-03-11T00:12:00.000000+01:00", "level": 5}  # '1' deep, after midnight
    assert hypnogram[-1] == {"timestamp": "2024-03-11T06:57:00.000000+01:00", "level": 1}
    terra_level = {"1": 5, "2": 4, "3": 6, "4": 1}
    assert [s["level"] for s in hypnogram] == [terra_level[p] for p in phases]
    # each stage's samples cover (about) Oura's stage total
    assert sum(s["level"] == 5 for s in hypnogram) * 300 == 5400
    assert sum(s["level"] == 6 for s in hypnogram) * 300 == 6000


def test_sleep_heart_rate_samples_skip_null_items() -> None:
    record = normalize(load("sleep.page.json"), "sleep")[0].data
    source = load("sleep.page.json")["data"][0]
    detailed = record["heart_rate_data"]["detailed"]
    present = [i for i, v in enumerate(source["heart_rate"]["items"]) if v is not None]
    assert len(detailed["hr_samples"]) == len(present) == 91  # 93 items, 2 null
    assert detailed["hr_samples"][0] == {"timestamp": "2024-03-10T23:17:00.000000+01:00",
                                         "bpm": source["heart_rate"]["items"][1]}
    # item 40 is null: item 41 comes next, 41 intervals after the start
    assert detailed["hr_samples"][39]["timestamp"] == "2024-03-11T02:37:00.000000+01:00"
    assert detailed["hr_samples"][39]["bpm"] == source["heart_rate"]["items"][41]
    assert len(detailed["hrv_samples_rmssd"]) == 91
    assert detailed["hrv_samples_rmssd"][0]["hrv_rmssd"] == source["hrv"]["items"][1]
    summary = record["heart_rate_data"]["summary"]
    assert summary["min_hr_bpm"] == min(s["bpm"] for s in detailed["hr_samples"])
    assert summary["avg_hr_bpm"] == source["average_heart_rate"]


def test_sleep_without_total_sleep_duration_sums_its_stages() -> None:
    """Oura's docs example sleep (via hedgertronic/oura-ring) has ``total_sleep_duration: null``: asleep is deep +
    light + REM. (The example's two negative HRV items, -102 and -122 ms, are replaced by 58 and 62 in the fixture.)"""
    record = normalize(load("sleep.docs-null-total.json"), "sleep")[0].data
    assert record["sleep_durations_data"]["asleep"] == {
        "duration_asleep_state_seconds": 25200,  # 4170 deep + 18750 light + 2280 REM
        "duration_deep_sleep_state_seconds": 4170,
        "duration_light_sleep_state_seconds": 18750,
        "duration_REM_sleep_state_seconds": 2280,
    }
    assert record["sleep_durations_data"]["other"] == {"duration_in_bed_seconds": 30000}  # 25200 asleep + 4800 awake
    source = load("sleep.docs-null-total.json")
    unstaged = normalize(dict(source, rem_sleep_duration=None), "sleep")[0].data["sleep_durations_data"]["asleep"]
    assert "duration_asleep_state_seconds" not in unstaged  # a stage missing: no total is invented
    sent = normalize(dict(source, total_sleep_duration=25080), "sleep")[0].data["sleep_durations_data"]["asleep"]
    assert sent["duration_asleep_state_seconds"] == 25080  # a total Oura sends wins


def test_nap_types_map_to_is_nap() -> None:
    nap = normalize(load("sleep.page.json"), "sleep")[1].data
    assert nap["metadata"]["is_nap"] is True
    assert nap["metadata"]["start_time"] == "2024-03-11T14:05:30.000000+01:00"
    assert [s["level"] for s in nap["sleep_durations_data"]["hypnogram_samples"]] == [1, 4, 4, 5, 4, 4, 1, 1]
    assert nap["sleep_durations_data"]["asleep"]["duration_REM_sleep_state_seconds"] == 0  # zero kept, not dropped
    assert "readiness_data" not in nap
    late_nap = dict(load("sleep.page.json")["data"][1], type="late_nap")
    assert normalize(late_nap, "sleep")[0].data["metadata"]["is_nap"] is True


def test_sleep_update_version_2_supersedes_version_1() -> None:
    (first,) = normalize(load("sleep.v1.json"), "sleep")
    second = normalize(load("sleep.page.json"), "sleep")[0]
    assert natural_key("sleep", first.data) == natural_key("sleep", second.data)
    assert first.version_ms < second.version_ms
    assert first.data["metadata"]["end_time"] == "2024-03-11T06:48:00.000000+01:00"
    assert second.data["metadata"]["end_time"] == "2024-03-11T06:58:00.000000+01:00"
    assert len(first.data["sleep_durations_data"]["hypnogram_samples"]) == 92
    assert "readiness_data" not in first.data and second.data["readiness_data"] == {"readiness": 81}


@pytest.mark.parametrize(("case", "reason"), [
    ("no_offset", "no UTC offset"),
    ("bad_phase", "unknown code 'x' at position 4"),
])
def test_unmappable_sleeps_raise_mapping_error(case: str, reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        normalize(load("sleep.bad.json")[case], "sleep")


def test_sleep_without_bedtime_or_with_unknown_type_is_rejected() -> None:
    good = load("sleep.page.json")["data"][0]
    with pytest.raises(MappingError, match="bedtime_end"):
        normalize({k: v for k, v in good.items() if k != "bedtime_end"}, "sleep")
    with pytest.raises(MappingError, match="unknown Oura sleep type 'siesta'"):
        normalize(dict(good, type="siesta"), "sleep")
    with pytest.raises(MappingError, match=r"heart_rate\.interval"):
        normalize(dict(good, heart_rate={"interval": 0, "items": [55.0], "timestamp": good["bedtime_start"]}), "sleep")


def test_daily_activity() -> None:
    (fragment,) = normalize(load("daily_activity.json"), "daily_activity")
    record = fragment.data
    source = load("daily_activity.json")["data"][0]
    assert fragment.type == "daily"
    assert fragment.version_ms == 1710215921000  # 2024-03-12T03:58:41Z
    assert record["metadata"] == {
        "start_time": "2024-03-11T00:00:00.000000+01:00",  # local midnight of `day`, not Oura's 4 a.m.
        "end_time": "2024-03-12T00:00:00.000000+01:00",
        "upload_type": 1,
        "timestamp_localization": 1,
    }
    assert natural_key("daily", record) == "2024-03-11"
    assert record["distance_data"] == {"steps": 9412, "distance_meters": 8094}
    assert record["calories_data"] == {"total_burned_calories": 2486, "net_activity_calories": 612,
                                       "BMR_calories": 1874}
    durations = record["active_durations_data"]
    assert {k: v for k, v in durations.items() if k != "activity_levels_samples"} == {
        "activity_seconds": 14100,  # 2700 high + 3000 medium + 8400 low
        "vigorous_intensity_seconds": 2700,
        "moderate_intensity_seconds": 3000,
        "low_intensity_seconds": 8400,
        "inactivity_seconds": 44100,
        "rest_seconds": 24600,
        "num_continuous_inactive_periods": 1,
    }
    levels = durations["activity_levels_samples"]
    assert len(levels) == 288
    assert levels[0] == {"timestamp": "2024-03-11T04:00:00.000000+01:00", "level": 1}
    assert levels[-1] == {"timestamp": "2024-03-12T03:55:00.000000+01:00", "level": 0}  # '0' non-wear → UNKNOWN
    assert [s["level"] for s in levels] == [int(c) for c in source["class_5_min"]]
    met = record["MET_data"]
    assert met["avg_level"] == source["average_met_minutes"]
    assert met["num_high_intensity_minutes"] == 45
    assert met["num_inactive_minutes"] == 735
    worn_minutes = [i for i, v in enumerate(source["met"]["items"]) if v is not None]
    assert len(met["MET_samples"]) == len(worn_minutes) == 1380  # 60 non-wear minutes skipped
    assert met["MET_samples"][0] == {"timestamp": "2024-03-11T04:00:00.000000+01:00", "level": 0.9}
    assert met["MET_samples"][-1]["timestamp"] == "2024-03-12T02:59:00.000000+01:00"
    assert record["scores"] == {"activity": 84}


def test_daily_scores_and_spo2_share_the_day_key() -> None:
    """daily_sleep/daily_readiness write the day as UTC midnight (+00:00): without the user's offset the window is
    the day in UTC, labelled UTC (main labelled that UTC window local)."""
    (sleep_day,) = normalize(load("daily_sleep.json"), "daily_sleep")
    (readiness_day,) = normalize(load("daily_readiness.json"), "daily_readiness")
    (spo2_day,) = normalize(load("daily_spo2.json"), "daily_spo2")
    assert sleep_day.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+00:00", "end_time": "2024-03-12T00:00:00.000000+00:00",
                     "upload_type": 1, "timestamp_localization": 0},
        "scores": {"sleep": 79},
    }
    assert readiness_day.data["scores"] == {"recovery": 81}
    assert readiness_day.data["metadata"] == sleep_day.data["metadata"]
    # daily_spo2 has no timestamp, hence no offset: the day's window is given in UTC
    assert spo2_day.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+00:00", "end_time": "2024-03-12T00:00:00.000000+00:00",
                     "upload_type": 1, "timestamp_localization": 0},
        "oxygen_data": {"avg_saturation_percentage": 96.412},
    }
    keys = {natural_key("daily", f.data) for f in (sleep_day, readiness_day, spo2_day)}
    assert keys == {"2024-03-11"}
    assert all(f.version_ms for f in (sleep_day, readiness_day, spo2_day))


def test_workouts() -> None:
    cycling, pickleball = normalize(load("workout.page.json"), "workout")
    assert cycling.type == "activity"
    assert cycling.data == {
        "metadata": {
            "summary_id": "a1c3e5f7-0b2d-4f6a-8c0e-5f7b9d1a3c6e",
            "start_time": "2024-03-09T10:02:00.000000-05:00",  # recorded while travelling: its own offset
            "end_time": "2024-03-09T11:04:30.000000-05:00",
            "type": 1,  # BIKING
            "upload_type": 1,  # confirmed autodetection → AUTOMATIC
            "name": "cycling",
            "timestamp_localization": 1,
        },
        "calories_data": {"total_burned_calories": 412},  # 412.5 kcal → Terra's integer kcal (half to even)
        "distance_data": {"summary": {"distance_meters": 15230}},
    }
    assert pickleball.data["metadata"]["type"] == 108  # not in the table → OTHER
    assert pickleball.data["metadata"]["upload_type"] == 2  # manual
    assert pickleball.data["metadata"]["name"] == "Pickleball with Sam"
    assert "distance_data" not in pickleball.data
    running = dict(load("workout.page.json")["data"][0], activity="Running")
    assert normalize(running, "workout")[0].data["metadata"]["type"] == 8


def test_heartrate_rows_become_samples_of_their_utc_day() -> None:
    fragments = normalize(load("heartrate.json"), "heartrate")
    assert len(fragments) == 6
    days = [natural_key("daily", f.data) for f in fragments]
    assert days == ["2024-03-10", "2024-03-10", "2024-03-11", "2024-03-11", "2024-03-11", "2024-03-11"]
    first, midnight = fragments[0].data, fragments[2].data
    assert first["metadata"] == {"start_time": "2024-03-10T00:00:00.000000+00:00",
                                 "end_time": "2024-03-11T00:00:00.000000+00:00",
                                 "upload_type": 1, "timestamp_localization": 0}
    assert first["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-10T23:50:00.000000+00:00", "bpm": 56, "context": 2}]  # sleep → NOT_ACTIVE
    assert midnight["heart_rate_data"]["detailed"]["hr_samples"][0]["timestamp"] == "2024-03-11T00:00:00.000000+00:00"
    workout_row = fragments[5].data["heart_rate_data"]["detailed"]["hr_samples"][0]
    assert workout_row == {"timestamp": "2024-03-11T17:42:10.000000+00:00", "bpm": 148, "context": 1}


def test_heartrate_row_with_unix_time_only() -> None:
    (fragment,) = normalize({"bpm": 61, "source": "awake", "timestamp_unix": 1710178930000}, "heartrate")
    assert fragment.data["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-11T17:42:10.000000+00:00", "bpm": 61, "context": 0}]
    with pytest.raises(MappingError, match="neither timestamp nor timestamp_unix"):
        normalize({"bpm": 61, "source": "awake"}, "heartrate")


def test_unknown_kind_and_bad_documents() -> None:
    with pytest.raises(UnknownKind):
        normalize({"data": [{"id": "x"}]}, "ring_battery_level")
    with pytest.raises(MappingError, match="must be a JSON object"):
        normalize({"data": ["not a document"]}, "workout")
    with pytest.raises(MappingError, match="missing required field"):
        normalize({"data": [{"day": "2024-03-11"}]}, "daily_sleep")
    with pytest.raises(MappingError, match="day must be a YYYY-MM-DD date"):
        normalize({"id": "x", "day": "11/03/2024"}, "daily_readiness")
    with pytest.raises(MappingError, match="no user id"):
        list(get_provider("oura").normalize(load("daily_sleep.json"), kind="daily_sleep"))


# ----------------------------------------------------------------------------------------------------------------------
# time zones: the user's offset from the user's own documents
# ----------------------------------------------------------------------------------------------------------------------
def test_daily_scores_with_the_users_offset_are_local_days() -> None:
    """A -05:00 user's daily_sleep: with the offset the poll hook learned, the same window as that day's
    daily_activity (local midnight to midnight, labelled local)."""
    doc = dict(load("daily_sleep.json")["data"][0], _offset="-05:00")
    (sleep_day,) = normalize(doc, "daily_sleep")
    assert sleep_day.data["metadata"] == {"start_time": "2024-03-11T00:00:00.000000-05:00",
                                          "end_time": "2024-03-12T00:00:00.000000-05:00",
                                          "upload_type": 1, "timestamp_localization": 1}
    activity = dict(load("daily_activity.json")["data"][0], timestamp="2024-03-11T04:00:00-05:00")
    activity.pop("met"), activity.pop("class_5_min")
    assert normalize(activity, "daily_activity")[0].data["metadata"] == sleep_day.data["metadata"]
    (spo2_day,) = normalize(dict(load("daily_spo2.json")["data"][0], _offset="-05:00"), "daily_spo2")
    assert spo2_day.data["metadata"] == sleep_day.data["metadata"]
    with pytest.raises(MappingError, match="_offset"):
        normalize(dict(doc, _offset="EST"), "daily_sleep")


def test_heartrate_rows_land_in_their_local_day() -> None:
    """01:45Z on 2024-03-12 is 20:45 on 2024-03-11 at -05:00: that day's Daily, in local time."""
    row = {"bpm": 72, "source": "awake", "timestamp": "2024-03-12T01:45:00+00:00", "timestamp_unix": 1710207900000,
           "_offset": "-05:00"}
    (fragment,) = normalize(row, "heartrate")
    assert natural_key("daily", fragment.data) == "2024-03-11"
    assert fragment.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000-05:00", "end_time": "2024-03-12T00:00:00.000000-05:00",
                     "upload_type": 1, "timestamp_localization": 1},
        "heart_rate_data": {"detailed": {"hr_samples": [
            {"timestamp": "2024-03-11T20:45:00.000000-05:00", "bpm": 72, "context": 0}]}},
    }


def hook_request(kind: str, answers: dict[str, Any], asked: list[tuple[str, Any]]) -> Request:
    def fetch(path: str, params: Any = None, method: str = "GET") -> Any:
        asked.append((path, params))
        return answers.get(path, {"data": [], "next_token": None})

    connection = type("Connection", (), {"user_id": "hf-1", "provider_user_id": USER, "provider": "oura"})()
    return Request("oura", kind, None, None, None, connection, fetch)


def test_hook_attaches_the_offset_learned_from_the_users_documents() -> None:
    hook, asked = OuraPollHook(), []
    activity = load("daily_activity.json")
    activity["data"][0]["timestamp"] = "2024-03-11T04:00:00-05:00"
    assert hook.payloads(hook_request("daily_activity", {}, asked), activity) == [activity]
    sleep_page = load("daily_sleep.json")
    (published,) = hook.payloads(hook_request("daily_sleep", {}, asked), sleep_page)
    assert asked == [] and published["data"][0]["_offset"] == "-05:00"
    assert "_offset" not in sleep_page["data"][0]  # the page as fetched is not modified
    rows = {"data": [{"bpm": 72, "source": "awake", "timestamp": "2024-03-12T01:45:00+00:00"}], "next_token": None}
    (hr,) = hook.payloads(hook_request("heartrate", {}, asked), rows)
    assert hr["data"][0]["_offset"] == "-05:00"  # the day before's offset: 2024-03-12 is not known
    (fragment,) = normalize(hr, "heartrate")
    assert natural_key("daily", fragment.data) == "2024-03-11"


def test_hook_asks_daily_activity_once_for_days_it_does_not_know() -> None:
    hook, asked = OuraPollHook(), []
    activity = load("daily_activity.json")
    answers = {"/v2/usercollection/daily_activity": activity}  # 2024-03-11, +01:00
    (single,) = hook.payloads(hook_request("daily_readiness", answers, asked), load("daily_readiness.json")["data"][0])
    assert single["_offset"] == "+01:00"
    assert asked == [("/v2/usercollection/daily_activity", {"start_date": "2024-03-11", "end_date": "2024-03-11"})]
    unknown = dict(load("daily_readiness.json")["data"][0], day="2024-02-01")
    (first,) = hook.payloads(hook_request("daily_readiness", {}, asked), unknown)
    (again,) = hook.payloads(hook_request("daily_readiness", {}, asked), unknown)
    assert "_offset" not in first and "_offset" not in again and len(asked) == 2  # asked once, then UTC
    assert normalize(again, "daily_readiness")[0].data["metadata"]["timestamp_localization"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# deletions, zeros, accepted forms
# ----------------------------------------------------------------------------------------------------------------------
def test_deleted_and_rejected_sleeps_are_deletions_of_their_sleep() -> None:
    (deleted,) = normalize(load("sleep.deleted.json"), "sleep")
    assert deleted == Deletion("sleep", "0d7b1f2e-93c4-4a8e-b6f1-2e5d8c7a9b30", USER, 1710009611000)
    (rest,) = normalize(load("sleep.rest.json"), "sleep")
    assert rest == Deletion("sleep", "5e9a0c3b-1f72-4d6e-8a4b-9c0e2f7d1b58", USER, 1709992960000)


def test_delete_webhooks_become_deletions_keyed_like_the_records() -> None:
    (sleep_gone,) = normalize(load("deleted.sleep.json"), "deleted")
    main = normalize(load("sleep.page.json"), "sleep")[0]
    assert sleep_gone == Deletion("sleep", natural_key("sleep", main.data), USER, 1710137582000)
    (workout_gone,) = normalize(load("deleted.workout.json"), "deleted")
    cycling = normalize(load("workout.page.json"), "workout")[0]
    assert workout_gone == Deletion("activity", natural_key("activity", cycling.data), USER, 1710014400000)


@pytest.mark.parametrize(("case", "reason"), [
    ("daily_readiness", "keyed by day"),
    ("daily_sleep", "keyed by day"),
    ("tag", "deleted Oura tag is not mapped"),
    ("update", "is not a deletion"),
    ("no_object_id", "missing required field"),
])
def test_delete_webhooks_without_a_record_key_are_refused(case: str, reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        normalize(load("deleted.bad.json")["cases"][case], "deleted")


def test_zero_means_not_measured() -> None:
    night = dict(load("sleep.page.json")["data"][0], average_hrv=0, lowest_heart_rate=0, average_breath=0,
                 efficiency=0, readiness={"score": 0, "temperature_deviation": 0.0})
    (fragment,) = normalize(night, "sleep")
    summary = fragment.data["heart_rate_data"]["summary"]
    assert "avg_hrv_rmssd" not in summary and "min_hr_bpm" not in summary and summary["avg_hr_bpm"] > 0
    assert "respiration_data" not in fragment.data and "readiness_data" not in fragment.data
    assert "sleep_efficiency" not in fragment.data["sleep_durations_data"]
    assert fragment.data["temperature_data"] == {"delta": 0.0}  # a deviation of 0 is a measurement
    (spo2,) = normalize(dict(load("daily_spo2.json")["data"][0], spo2_percentage={"average": 0.0}), "daily_spo2")
    assert "oxygen_data" not in spo2.data
    (score,) = normalize(dict(load("daily_sleep.json")["data"][0], score=0), "daily_sleep")
    assert "scores" not in score.data
    (indoor,) = normalize(dict(load("workout.page.json")["data"][0], distance=0.0), "workout")
    assert "distance_data" not in indoor.data and indoor.data["calories_data"] == {"total_burned_calories": 412}
    activity = dict(load("daily_activity.json")["data"][0], steps=0, high_activity_time=0)
    (day,) = normalize(activity, "daily_activity")
    assert day.data["distance_data"]["steps"] == 0
    assert day.data["active_durations_data"]["vigorous_intensity_seconds"] == 0


def test_single_documents_and_pages_map_alike() -> None:
    for kind in ("sleep", "daily_activity", "daily_sleep", "daily_readiness", "daily_spo2", "workout"):
        page = load(f"{kind}.json" if kind.startswith("daily") else f"{kind}.page.json")
        assert normalize(page["data"][0], kind) == normalize(page, kind)[:1], kind
