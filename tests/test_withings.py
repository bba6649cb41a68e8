"""Withings Public API mappers: realistic responses in tests/fixtures/withings, checked value by value."""

from __future__ import annotations

import json
from datetime import datetime
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
from terra_oracle import assert_terra_record

from connectors import get_provider
from connectors.base import Fragment, MappingError, natural_key
from schemas.serde import validate_record
from transforms.normalize import deep_merge

FIXTURES = Path(__file__).parent / "fixtures" / "withings"
USER = "12345678"  # Withings userid, from the notification the raw event was built from


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def normalize(payload: Any, kind: str, user_id: str | None = USER) -> list[Fragment]:
    """Map a payload; every record must already conform to the Avro schema and to Terra's SDK models."""
    fragments = list(get_provider("withings").normalize(payload, kind=kind, user_id=user_id))
    for fragment in fragments:
        assert validate_record(fragment.type, fragment.data) == fragment.data
        assert_terra_record(fragment.type, fragment.data)
        assert fragment.provider_user_id == user_id
    return fragments


def response(**body: Any) -> dict[str, Any]:
    return {"status": 0, "body": body}


def fixture_files(bad: bool) -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if p.name.partition(".")[2].startswith("bad") == bad)


# ----------------------------------------------------------------------------------------------------------------------
# every fixture, as the shared conformance suite loads them; the response envelope
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", fixture_files(bad=False), ids=lambda p: p.name)
def test_every_fixture_maps_to_valid_records(path: Path) -> None:
    """A fixture is one payload, or a JSON list of payloads (``[[...]]``: one bare array of entries)."""
    kind, content = path.name.split(".")[0], json.loads(path.read_text())
    for payload in content if isinstance(content, list) else [content]:
        assert normalize(payload, kind, user_id="conformance-user")


@pytest.mark.parametrize("path", fixture_files(bad=True), ids=lambda p: p.name)
def test_every_bad_fixture_raises_mapping_error(path: Path) -> None:
    with pytest.raises(MappingError):
        normalize(json.loads(path.read_text()), path.name.split(".")[0], user_id="conformance-user")


def test_fixtures_cover_every_kind() -> None:
    assert {p.name.split(".")[0] for p in FIXTURES.glob("*.json")} == set(get_provider("withings").kinds)


@pytest.mark.parametrize("kind", ["getmeas", "sleep_getsummary", "sleep_get", "getworkouts", "getactivity"])
def test_non_zero_status_is_a_mapping_error_naming_the_code(kind: str) -> None:
    with pytest.raises(MappingError, match=r"Withings API status 401: .*invalid_token"):
        normalize(load("getmeas.bad-status.json"), kind)
    with pytest.raises(MappingError, match="Withings API status 601: error response"):
        normalize({"status": 601, "body": {}}, kind)


@pytest.mark.parametrize("name", ["getmeas.json", "sleep_getsummary.json", "getworkouts.json", "getactivity.json"])
def test_a_body_without_its_envelope_maps_as_the_response(name: str) -> None:
    """Clients that keep only ``body`` (python_withings_api, exports) send it alone."""
    kind = name.split(".")[0]
    assert [f.data for f in normalize(load(name)["body"], kind)] == [f.data for f in normalize(load(name), kind)]


@pytest.mark.parametrize(("name", "key"), [("sleep_getsummary.json", "series"), ("getworkouts.json", "series"),
                                           ("getactivity.json", "activities")])
def test_entries_alone_and_bare_arrays_of_entries_map_as_the_page(name: str, key: str) -> None:
    kind = name.split(".")[0]
    entries = load(name)["body"][key]
    if kind == "getactivity":
        entries = [row for row in entries if row["brand"] == 1]  # one row per date: no page-wide choice to make
    page = [f.data for f in normalize(response(**{key: entries}), kind)]
    assert [f.data for e in entries for f in normalize(e, kind)] == page
    assert [f.data for f in normalize(entries, kind)] == page  # the framework splits a bare array


def test_payloads_without_data_say_what_to_send() -> None:
    notification = {"userid": "12345678", "appli": 44, "startdate": 1710108720, "enddate": 1710136680}
    with pytest.raises(MappingError, match=r"a Withings notification \(appli 44\), not data: poll .* 1710108720"):
        normalize(notification, "sleep_getsummary")
    with pytest.raises(MappingError, match="a measure group alone names no time zone"):
        normalize(load("getmeas.json")["body"]["measuregrps"][0], "getmeas")
    with pytest.raises(MappingError, match="not a Withings response of this kind"):
        normalize({"measuregrps": []}, "getworkouts")


def test_responses_must_be_withings_responses_of_their_kind() -> None:
    with pytest.raises(MappingError, match="body has no 'series'"):
        normalize(load("getmeas.json"), "getworkouts")
    with pytest.raises(MappingError, match="no user id"):
        normalize(load("getmeas.json"), "getmeas", user_id=None)
    assert normalize(response(measuregrps=[], timezone="Europe/Berlin"), "getmeas") == []  # an empty page


# ----------------------------------------------------------------------------------------------------------------------
# getmeas → Body
# ----------------------------------------------------------------------------------------------------------------------
def test_measure_groups_become_one_body_per_instant_keyed_by_local_day() -> None:
    height, watch, thermometer, scale, blood_pressure = normalize(load("getmeas.json"), "getmeas")
    assert [natural_key("body", f.data) for f in (height, watch, thermometer, scale, blood_pressure)] == [
        "2023-10-01", "2024-03-10", "2024-03-11", "2024-03-11", "2024-03-11"]
    # the scale's body-composition group and its heart/PWV group share their date: one sample
    assert scale.version_ms == 1710136994000  # the newer group's modified
    assert scale.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+01:00", "end_time": "2024-03-12T00:00:00.000000+01:00",
                     "timestamp_localization": 1},
        "measurements_data": {"measurements": [{
            "measurement_time": "2024-03-11T07:02:41.000000+01:00",
            "weight_kg": 72.45,  # 72450 × 10^-3
            "bodyfat_percentage": 17.9,  # 179 × 10^-1
            "lean_mass_g": 59481,  # fat-free mass 59.481 kg
            "muscle_mass_g": 56960,  # 56.96 kg
            "bone_mass_g": 2980,  # 2.98 kg
            "water_percentage": 57.98,  # hydration 42.01 kg of 72.45 kg
            "BMR": 1712,
        }]},
        "heart_data": {
            "heart_rate_data": {"detailed": {"hr_samples": [{"timestamp": "2024-03-11T07:02:41.000000+01:00",
                                                             "bpm": 61}]}},
            "pulse_wave_velocity_samples": [{"timestamp": "2024-03-11T07:02:41.000000+01:00",
                                             "pulse_wave_velocity_meters_per_second": 7.12}],
        },
        "hydration_data": {"hydration_amount_samples": [{"timestamp": "2024-03-11T07:02:41.000000+01:00",
                                                         "hydration_kg": 42.01}]},
    }
    assert blood_pressure.data["blood_pressure_data"] == {"blood_pressure_samples": [
        {"timestamp": "2024-03-11T21:34:10.000000+01:00", "systolic_bp": 124, "diastolic_bp": 79}]}
    assert blood_pressure.data["heart_data"] == {"heart_rate_data": {"detailed": {"hr_samples": [
        {"timestamp": "2024-03-11T21:34:10.000000+01:00", "bpm": 66}]}}}


def test_day_key_is_the_local_date_not_the_utc_one() -> None:
    thermometer = normalize(load("getmeas.json"), "getmeas")[2]
    # 2024-03-10T23:35:12Z is 00:35 on the 11th in Berlin
    assert [g["date"] for g in load("getmeas.json")["body"]["measuregrps"] if g["grpid"] == 5123439001] == [1710113712]
    assert thermometer.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+01:00", "end_time": "2024-03-12T00:00:00.000000+01:00",
                     "timestamp_localization": 1},
        "temperature_data": {"body_temperature_samples": [{"timestamp": "2024-03-11T00:35:12.000000+01:00",
                                                           "temperature_celsius": 36.85}]},
    }


def test_watch_spot_check_and_summer_time_height() -> None:
    height, watch = normalize(load("getmeas.json"), "getmeas")[:2]
    assert watch.data["oxygen_data"] == {"saturation_samples": [
        {"timestamp": "2024-03-10T22:10:05.000000+01:00", "percentage": 97, "type": 0}]}
    assert watch.data["temperature_data"] == {"skin_temperature_samples": [
        {"timestamp": "2024-03-10T22:10:05.000000+01:00", "temperature_celsius": 33.42}]}
    assert height.data == {  # entered at account creation, in October: CEST
        "metadata": {"start_time": "2023-10-01T00:00:00.000000+02:00", "end_time": "2023-10-02T00:00:00.000000+02:00",
                     "timestamp_localization": 1},
        "measurements_data": {"measurements": [{"measurement_time": "2023-10-01T12:00:00.000000+02:00",
                                                "height_cm": 179}]},  # 179 × 10^-2 m
    }


def test_objectives_and_ambiguous_groups_are_skipped() -> None:
    weights = [m["weight_kg"] for f in normalize(load("getmeas.json"), "getmeas")
               for m in f.data.get("measurements_data", {}).get("measurements", []) if "weight_kg" in m]
    assert weights == [72.45]  # not the unassigned 58.12 kg (attrib 1) nor the 70 kg goal (category 2)


def test_a_days_groups_merge_into_one_body() -> None:
    fragments = [f for f in normalize(load("getmeas.json"), "getmeas") if natural_key("body", f.data) == "2024-03-11"]
    day = reduce(deep_merge, (f.data for f in sorted(fragments, key=lambda f: f.version_ms)))
    assert [s["timestamp"] for s in day["heart_data"]["heart_rate_data"]["detailed"]["hr_samples"]] == [
        "2024-03-11T07:02:41.000000+01:00", "2024-03-11T21:34:10.000000+01:00"]
    assert set(day) == {"metadata", "measurements_data", "heart_data", "hydration_data", "blood_pressure_data",
                        "temperature_data"}


def test_dst_day_in_los_angeles() -> None:
    blood_pressure, scale = normalize(load("getmeas.los-angeles.json"), "getmeas")
    # 20:15 PDT on the day the clocks went forward is already 2024-03-11 in UTC
    assert scale.data["metadata"] == {"start_time": "2024-03-10T00:00:00.000000-08:00",
                                      "end_time": "2024-03-11T00:00:00.000000-07:00",  # a 23-hour day
                                      "timestamp_localization": 1}
    assert natural_key("body", scale.data) == "2024-03-10"
    assert scale.data["measurements_data"]["measurements"] == [{
        "measurement_time": "2024-03-10T20:15:00.000000-07:00", "weight_kg": 81.31, "bodyfat_percentage": 22.4,
        "muscle_mass_g": 60210, "bone_mass_g": 3310}]
    assert blood_pressure.data["metadata"]["start_time"] == "2024-03-09T00:00:00.000000-08:00"
    assert blood_pressure.data["blood_pressure_data"]["blood_pressure_samples"] == [
        {"timestamp": "2024-03-09T23:50:22.000000-08:00", "systolic_bp": 131, "diastolic_bp": 84}]


@pytest.mark.parametrize(("measure_type", "value", "unit", "path", "expected"), [
    (1, 72450, -3, ("measurements_data", "measurements", 0, "weight_kg"), 72.45),
    (1, 7245, -2, ("measurements_data", "measurements", 0, "weight_kg"), 72.45),
    (4, 1790, -3, ("measurements_data", "measurements", 0, "height_cm"), 179.0),
    (88, 3, 0, ("measurements_data", "measurements", 0, "bone_mass_g"), 3000),
    (6, 2035, -2, ("measurements_data", "measurements", 0, "bodyfat_percentage"), 20.35),
    (12, 371, -1, ("temperature_data", "body_temperature_samples", 0, "temperature_celsius"), 37.1),
    (123, 481, -1, ("oxygen_data", "vo2max_ml_per_min_per_kg"), 48.1),
])
def test_value_times_ten_to_the_unit(measure_type: int, value: int, unit: int, path: tuple[Any, ...],
                                     expected: float) -> None:
    group = {"grpid": 1, "attrib": 0, "date": 1710140400, "category": 1,
             "measures": [{"value": value, "type": measure_type, "unit": unit}]}
    (fragment,) = normalize(response(timezone="Europe/Berlin", measuregrps=[group]), "getmeas")
    assert reduce(lambda node, key: node[key], path, fragment.data) == expected


def test_groups_of_unmapped_types_give_no_record() -> None:
    afib = {"grpid": 2, "attrib": 0, "date": 1710140400, "category": 1, "measures": [{"value": 0, "type": 130,
                                                                                       "unit": 0}]}
    assert normalize(response(timezone="Europe/Berlin", measuregrps=[afib]), "getmeas") == []


def test_unmappable_measures() -> None:
    group = load("getmeas.json")["body"]["measuregrps"][0]
    with pytest.raises(MappingError, match="not a known IANA time zone"):
        normalize(response(timezone="Mars/Olympus_Mons", measuregrps=[group]), "getmeas")
    with pytest.raises(MappingError, match=r"body\.timezone"):
        normalize(response(measuregrps=[group]), "getmeas")
    with pytest.raises(MappingError, match="measure value must be an integer"):
        normalize(response(timezone="Europe/Berlin", measuregrps=[
            dict(group, measures=[{"value": "72.45", "type": 1, "unit": 0}])]), "getmeas")


# ----------------------------------------------------------------------------------------------------------------------
# sleep getsummary / get → Sleep
# ----------------------------------------------------------------------------------------------------------------------
NIGHT = {
    "metadata": {
        "summary_id": "3104455871",
        "start_time": "2024-03-10T23:05:00.000000+01:00",
        "end_time": "2024-03-11T07:11:00.000000+01:00",
        "upload_type": 2,  # SleepUploadType.AUTOMATIC
        "timestamp_localization": 1,
    },
    "sleep_durations_data": {
        "asleep": {"duration_asleep_state_seconds": 27420, "duration_light_sleep_state_seconds": 15240,
                   "duration_deep_sleep_state_seconds": 6420, "duration_REM_sleep_state_seconds": 5760,
                   "num_REM_events": 4},
        "awake": {"duration_awake_state_seconds": 1620, "num_wakeup_events": 2, "num_out_of_bed_events": 0,
                  "sleep_latency_seconds": 840, "wake_up_latency_seconds": 360},
        "other": {"duration_in_bed_seconds": 29160},
        "sleep_efficiency": 94.0,  # Withings' ratio 0.94 as Terra's percentage
    },
    "heart_rate_data": {"summary": {"avg_hr_bpm": 54, "min_hr_bpm": 46, "max_hr_bpm": 65}},
    "respiration_data": {
        "breaths_data": {"start_time": "2024-03-10T23:05:00.000000+01:00",
                         "end_time": "2024-03-11T07:11:00.000000+01:00",
                         "avg_breaths_per_min": 14, "min_breaths_per_min": 12, "max_breaths_per_min": 16},
        "snoring_data": {"start_time": "2024-03-10T23:05:00.000000+01:00",
                         "end_time": "2024-03-11T07:11:00.000000+01:00",
                         "total_snoring_duration_seconds": 2280, "num_snoring_events": 20},
    },
    "scores": {"sleep_score": 81},
}


def test_sleep_summary() -> None:
    night, second = normalize(load("sleep_getsummary.json"), "sleep_getsummary")
    assert night.type == "sleep"
    assert night.version_ms == 1710138060000  # modified
    assert night.data == NIGHT
    assert natural_key("sleep", night.data) == "3104455871"
    assert second.data["metadata"]["start_time"] == "2024-03-11T23:41:00.000000+01:00"


def test_sleep_across_the_dst_switch_keeps_each_instants_offset() -> None:
    (night,) = normalize(load("sleep_getsummary.los-angeles.json"), "sleep_getsummary")
    assert night.data["metadata"]["start_time"] == "2024-03-09T23:20:00.000000-08:00"  # PST
    assert night.data["metadata"]["end_time"] == "2024-03-10T07:05:00.000000-07:00"  # PDT
    assert night.data["sleep_durations_data"]["other"] == {"duration_in_bed_seconds": 24300}  # 6 h 45 min, not 7:45


def test_external_night_without_stages() -> None:
    entry = load("sleep_getsummary.json")["body"]["series"][1]
    data = {"total_timeinbed": 26100, "asleepduration": 24300, "lightsleepduration": None, "deepsleepduration": None,
            "remsleepduration": None}
    (night,) = normalize(response(series=[dict(entry, data=data)]), "sleep_getsummary")
    assert night.data["sleep_durations_data"] == {"asleep": {"duration_asleep_state_seconds": 24300},
                                                  "other": {"duration_in_bed_seconds": 26100}}


WITHINGS_TO_TERRA_LEVEL = {0: 1, 1: 4, 2: 5, 3: 6}  # awake, light, deep, REM


def test_high_frequency_sleep_completes_its_summary() -> None:
    (fragment,) = normalize(load("sleep_get.json"), "sleep_get")
    record = fragment.data
    assert fragment.version_ms == 1710138060000
    assert record["metadata"] == NIGHT["metadata"]
    assert {k: v for k, v in record["sleep_durations_data"].items() if k != "hypnogram_samples"} == (
        NIGHT["sleep_durations_data"])
    assert record["scores"] == NIGHT["scores"]
    segments = load("sleep_get.json")["body"]["series"]
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    assert len(hypnogram) == len(segments) + 1  # one gap in the data
    assert hypnogram[:3] == [{"timestamp": "2024-03-10T23:05:00.000000+01:00", "level": 1},  # awake
                             {"timestamp": "2024-03-10T23:19:00.000000+01:00", "level": 4},  # light
                             {"timestamp": "2024-03-10T23:44:00.000000+01:00", "level": 5}]  # deep
    # segment 7 (deep) ends at 02:47 and segment 8 starts at 02:49: the two minutes are UNKNOWN
    assert (segments[7]["enddate"], segments[8]["startdate"]) == (1710121620, 1710121740)
    assert hypnogram[8:10] == [{"timestamp": "2024-03-11T02:47:00.000000+01:00", "level": 0},
                               {"timestamp": "2024-03-11T02:49:00.000000+01:00", "level": 4}]
    assert [s["level"] for s in hypnogram if s["level"] != 0] == [WITHINGS_TO_TERRA_LEVEL[s["state"]]
                                                                 for s in segments]


def test_high_frequency_stage_durations_match_the_summary_totals() -> None:
    """Each hypnogram level lasts until the next sample (the last until end_time): light, deep, REM and awake add up
    to the summary's lightsleepduration, deepsleepduration, remsleepduration and wakeupduration, to the second."""
    record = normalize(load("sleep_get.json"), "sleep_get")[0].data
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    ends = [s["timestamp"] for s in hypnogram[1:]] + [record["metadata"]["end_time"]]
    seconds: dict[int, float] = {}
    for sample, end in zip(hypnogram, ends, strict=True):
        elapsed = (datetime.fromisoformat(end) - datetime.fromisoformat(sample["timestamp"])).total_seconds()
        seconds[sample["level"]] = seconds.get(sample["level"], 0) + elapsed
    assert seconds == {4: 15240, 5: 6420, 6: 5760, 1: 1620, 0: 120}  # 0: the 2-minute gap at 02:47
    asleep = record["sleep_durations_data"]["asleep"]
    assert (asleep["duration_light_sleep_state_seconds"], asleep["duration_deep_sleep_state_seconds"],
            asleep["duration_REM_sleep_state_seconds"], asleep["duration_asleep_state_seconds"]) == (
        15240, 6420, 5760, 27420)
    assert record["sleep_durations_data"]["awake"]["duration_awake_state_seconds"] == 1620


def test_high_frequency_night_across_the_dst_change() -> None:
    """Berlin, 31 March 2024 (01:00 UTC: 02:00 CET → 03:00 CEST): each instant keeps the offset it had."""
    start, change = 1711837800, 1711846800  # 2024-03-30T22:30:00Z, 2024-03-31T01:00:00Z
    summary = {"id": 3105520077, "timezone": "Europe/Berlin", "model": 32, "model_id": 63, "startdate": start,
               "enddate": start + 25200, "date": "2024-03-31", "modified": start + 26000,
               "data": {"total_timeinbed": 25200, "lightsleepduration": 10800, "deepsleepduration": 3600,
                        "remsleepduration": 10800}}
    segments = [{"startdate": start, "enddate": start + 7200, "state": 1, "hr": {str(change - 300): 51}},
                {"startdate": start + 7200, "enddate": start + 10800, "state": 2, "hr": {str(change + 300): 49}},
                {"startdate": start + 10800, "enddate": start + 25200, "state": 3}]
    (fragment,) = normalize({"status": 0, "body": {"series": segments}, "summary": summary}, "sleep_get")
    record = fragment.data
    assert record["metadata"]["start_time"] == "2024-03-30T23:30:00.000000+01:00"
    assert record["metadata"]["end_time"] == "2024-03-31T07:30:00.000000+02:00"  # 7 h later, 8 h on the clock
    assert natural_key("sleep", record) == "3105520077"
    assert record["sleep_durations_data"]["hypnogram_samples"] == [
        {"timestamp": "2024-03-30T23:30:00.000000+01:00", "level": 4},
        {"timestamp": "2024-03-31T01:30:00.000000+01:00", "level": 5},
        {"timestamp": "2024-03-31T03:30:00.000000+02:00", "level": 6}]
    assert record["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-31T01:55:00.000000+01:00", "bpm": 51},
        {"timestamp": "2024-03-31T03:05:00.000000+02:00", "bpm": 49}]  # 10 minutes apart


def test_high_frequency_samples() -> None:
    record = normalize(load("sleep_get.json"), "sleep_get")[0].data
    segments = load("sleep_get.json")["body"]["series"]
    detailed = record["heart_rate_data"]["detailed"]
    assert len(detailed["hr_samples"]) == sum(len(s["hr"]) for s in segments) == 98
    assert detailed["hr_samples"][0] == {"timestamp": "2024-03-10T23:05:00.000000+01:00", "bpm": 63}
    assert detailed["hrv_samples_rmssd"][0] == {"timestamp": "2024-03-10T23:05:00.000000+01:00", "hrv_rmssd": 52}
    assert detailed["hrv_samples_sdnn"][0] == {"timestamp": "2024-03-10T23:05:00.000000+01:00", "hrv_sdnn": 47}
    assert record["heart_rate_data"]["summary"] == NIGHT["heart_rate_data"]["summary"]
    breaths = record["respiration_data"]["breaths_data"]
    assert breaths["avg_breaths_per_min"] == 14
    assert breaths["samples"][0] == {"timestamp": "2024-03-10T23:05:00.000000+01:00", "breaths_per_min": 16}
    snoring = record["respiration_data"]["snoring_data"]
    assert snoring["total_snoring_duration_seconds"] == sum(s["duration_seconds"] for s in snoring["samples"]) == 2280


@pytest.mark.parametrize(("state", "level"), [(0, 1), (1, 4), (2, 5), (3, 6), (4, 2), (5, 0), (15, 3)])
def test_sleep_state_codes(state: int, level: int) -> None:
    payload = load("sleep_get.json")
    payload["body"]["series"][1]["state"] = state
    hypnogram = normalize(payload, "sleep_get")[0].data["sleep_durations_data"]["hypnogram_samples"]
    assert hypnogram[1] == {"timestamp": "2024-03-10T23:19:00.000000+01:00", "level": level}


def test_unmappable_high_frequency_sleep() -> None:
    payload = load("sleep_get.json")
    with pytest.raises(MappingError, match=r"needs its sleep: .* attach the /v2/sleep\?action=getsummary series entry "
                                            r"\(id, timezone, startdate, enddate\) whose night they fall in "
                                            r"\(segments 1710108300-\d+\) under a top-level 'summary'"):
        normalize(load("sleep_get.bad-no-summary.json"), "sleep_get")
    with pytest.raises(MappingError, match=r"must be one getsummary series entry .* not a getsummary response"):
        normalize(dict(payload, summary=load("sleep_getsummary.json")), "sleep_get")
    with pytest.raises(MappingError, match="no segment falls within sleep 3104712266"):
        normalize(dict(payload, summary=load("sleep_getsummary.json")["body"]["series"][1]), "sleep_get")


def test_sleep_get_declares_the_summary_it_needs_and_the_poll_hook_attaches_it() -> None:
    """The registry refuses to start when a polled kind's context is not attached (connectors._check_context)."""
    from connectors.providers.withings.client import WithingsHook

    assert get_provider("withings").kinds["sleep_get"].context == ("summary",)
    assert WithingsHook.attaches == {"sleep_get": ("summary",)}


def test_an_unknown_sleep_state_is_an_unknown_level_and_keeps_the_night() -> None:
    payload = load("sleep_get.json")
    payload["body"]["series"][3]["state"] = 9  # not in Withings' documented table
    (fragment,) = normalize(payload, "sleep_get")
    hypnogram = fragment.data["sleep_durations_data"]["hypnogram_samples"]
    expected = normalize(load("sleep_get.json"), "sleep_get")[0].data["sleep_durations_data"]["hypnogram_samples"]
    assert hypnogram[3] == dict(expected[3], level=0)
    assert hypnogram[:3] + hypnogram[4:] == expected[:3] + expected[4:]


# ----------------------------------------------------------------------------------------------------------------------
# getworkouts → Activity
# ----------------------------------------------------------------------------------------------------------------------
def test_workouts() -> None:
    run, swim, yoga = normalize(load("getworkouts.json"), "getworkouts")
    assert run.version_ms == 1710144390000
    assert run.data == {
        "metadata": {
            "summary_id": "2918844501",
            "start_time": "2024-03-11T07:40:00.000000+01:00",
            "end_time": "2024-03-11T08:26:30.000000+01:00",
            "type": 8,  # category 2 "Run"
            "upload_type": 1,
            "name": "Run",
            "timestamp_localization": 1,
        },
        "calories_data": {"net_activity_calories": 512},  # Withings' workout calories are active kcal
        "distance_data": {"summary": {"distance_meters": 8013, "steps": 7734,
                                      "floors_climbed": 12}},  # data.elevation counts floors, as in getactivity
        "heart_rate_data": {"summary": {
            "avg_hr_bpm": 153, "min_hr_bpm": 97, "max_hr_bpm": 172,
            "hr_zone_data": [{"zone": 0, "duration_seconds": 255}, {"zone": 1, "duration_seconds": 560},
                             {"zone": 2, "duration_seconds": 1700}, {"zone": 3, "duration_seconds": 265}],
        }},
        "active_durations_data": {"activity_seconds": 2790},
        "device_data": {"manufacturer": "Withings"},
    }
    assert swim.data["metadata"]["type"] == 82
    assert swim.data["distance_data"]["summary"] == {
        "distance_meters": 1500, "swimming": {"num_laps": 60, "num_strokes": 1130, "pool_length_meters": 25}}
    assert swim.data["active_durations_data"] == {"activity_seconds": 2525}  # 45:40 minus 215 s of pauses
    assert yoga.data["metadata"]["upload_type"] == 2  # attrib 2: entered by hand
    assert yoga.data["metadata"]["type"] == 100
    assert yoga.data["calories_data"] == {"net_activity_calories": 140}  # manual_calories
    assert "distance_data" not in yoga.data  # Withings' zeros for what does not apply


def test_workout_without_heart_rate_has_no_heart_rate_rather_than_zero_bpm() -> None:
    """A Withings Move (no HR sensor) sends hr_average/min/max 0, four zero zones and spo2_average 0: not measured."""
    (walk,) = normalize(load("getworkouts.no-heart-rate.json"), "getworkouts")
    assert walk.data == {
        "metadata": {
            "summary_id": "2920388104",
            "start_time": "2024-03-13T11:45:00.000000+01:00",
            "end_time": "2024-03-13T12:41:00.000000+01:00",
            "type": 7,  # category 1 "Walk"
            "upload_type": 1,
            "name": "Walk",
            "timestamp_localization": 1,
        },
        "calories_data": {"net_activity_calories": 188},
        "distance_data": {"summary": {"distance_meters": 4383, "steps": 5841, "floors_climbed": 3}},
        "active_durations_data": {"activity_seconds": 3360},
        "device_data": {"manufacturer": "Withings"},
    }


def test_active_time_is_the_workout_minus_its_pauses_without_effduration() -> None:
    """``effduration`` is not in the API reference's workout fields: without it, active time is enddate - startdate
    minus ``pause_duration``."""
    swim = load("getworkouts.json")["body"]["series"][1]
    data = {k: v for k, v in swim["data"].items() if k != "effduration"}
    (fragment,) = normalize(response(series=[dict(swim, data=data)]), "getworkouts")
    assert fragment.data["active_durations_data"] == {"activity_seconds": 2525}  # 2740 s - 215 s of pauses


def test_zero_heart_rate_zones_are_kept_when_heart_rate_was_measured() -> None:
    entry = load("getworkouts.json")["body"]["series"][1]  # the swim: zone 3 is 0 s beside measured zones
    (swim,) = normalize(response(series=[entry]), "getworkouts")
    zones = swim.data["heart_rate_data"]["summary"]["hr_zone_data"]
    assert zones[3] == {"zone": 3, "duration_seconds": 0}


@pytest.mark.parametrize(("category", "terra_type", "name"), [
    (1, 7, "Walk"), (6, 1, "Bicycling"), (16, 97, "Lift weights"), (187, 53, "Rowing"), (307, 133, "Indoor running"),
    (999, 108, None),
])
def test_workout_categories(category: int, terra_type: int, name: str | None) -> None:
    entry = dict(load("getworkouts.json")["body"]["series"][0], category=category)
    metadata = normalize(response(series=[entry]), "getworkouts")[0].data["metadata"]
    assert (metadata["type"], metadata.get("name")) == (terra_type, name)


# ----------------------------------------------------------------------------------------------------------------------
# getactivity → Daily
# ----------------------------------------------------------------------------------------------------------------------
def test_daily_activity_prefers_the_withings_device_row() -> None:
    monday, tuesday = normalize(load("getactivity.json"), "getactivity")
    assert monday.version_ms == 1710197882000  # the Withings row's, not the phone row's
    assert monday.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+01:00", "end_time": "2024-03-12T00:00:00.000000+01:00",
                     "timestamp_localization": 1, "upload_type": 1},
        "distance_data": {"steps": 15697, "distance_meters": 12217, "floors_climbed": 11},
        "calories_data": {"total_burned_calories": 2922, "net_activity_calories": 1046, "BMR_calories": 1876},
        "active_durations_data": {"activity_seconds": 5760, "low_intensity_seconds": 7380,
                                  "moderate_intensity_seconds": 3120, "vigorous_intensity_seconds": 2640},
        "heart_rate_data": {"summary": {
            "avg_hr_bpm": 71, "min_hr_bpm": 47, "max_hr_bpm": 172,
            "hr_zone_data": [{"zone": 0, "duration_seconds": 61440}, {"zone": 1, "duration_seconds": 3900},
                             {"zone": 2, "duration_seconds": 2100}, {"zone": 3, "duration_seconds": 265}],
        }},
    }
    assert natural_key("daily", tuesday.data) == "2024-03-12"
    only_phone = [row for row in load("getactivity.json")["body"]["activities"] if row["brand"] == 18]
    (phone,) = normalize(response(activities=only_phone), "getactivity")
    assert phone.data["distance_data"] == {"steps": 14980, "distance_meters": 11102, "floors_climbed": 0}


def test_daily_activity_without_heart_rate_or_intensity_has_them_absent() -> None:
    """A Withings Move day: no HR sensor (zeros) → no heart rate; a phone row (brand 18) walking 14980 steps with 0 s
    of every intensity did not classify intensity → no durations. Steps, distance and floors of 0 stay 0."""
    rows = load("getactivity.json")["body"]["activities"]
    move = dict(rows[0], hr_average=0, hr_min=0, hr_max=0, hr_zone_0=0, hr_zone_1=0, hr_zone_2=0, hr_zone_3=0)
    (day,) = normalize(response(activities=[move]), "getactivity")
    assert "heart_rate_data" not in day.data
    (phone,) = normalize(response(activities=[rows[1]]), "getactivity")
    assert "active_durations_data" not in phone.data
    assert phone.data["distance_data"]["floors_climbed"] == 0
    still = dict(rows[1], steps=0, distance=0)
    (idle,) = normalize(response(activities=[still]), "getactivity")
    assert idle.data["distance_data"] == {"steps": 0, "distance_meters": 0, "floors_climbed": 0}


def test_sleep_without_heart_rate_or_breathing_sensors_has_them_absent() -> None:
    entry = load("sleep_getsummary.json")["body"]["series"][0]
    data = dict(entry["data"], hr_average=0, hr_min=0, hr_max=0, rr_average=0, rr_min=0, rr_max=0)
    (night,) = normalize(response(series=[dict(entry, data=data)]), "sleep_getsummary")
    assert "heart_rate_data" not in night.data
    assert "breaths_data" not in night.data.get("respiration_data", {})


def test_zero_vital_measures_are_not_measurements() -> None:
    """A group's heart pulse 0 (a failed reading) or SpO2 0 is absent; the group's other values stay."""
    group = {"grpid": 5123450001, "attrib": 0, "date": 1710140400, "created": 1710140431, "modified": 1710140431,
             "category": 1, "measures": [{"value": 72450, "type": 1, "unit": -3}, {"value": 0, "type": 11, "unit": 0},
                                         {"value": 0, "type": 54, "unit": 0}]}
    (body,) = normalize(response(timezone="Europe/Berlin", measuregrps=[group]), "getmeas")
    assert body.data["measurements_data"]["measurements"][0]["weight_kg"] == 72.45
    assert "heart_data" not in body.data and "oxygen_data" not in body.data


def test_daily_activity_on_the_dst_day() -> None:
    (day,) = normalize(load("getactivity.los-angeles.json"), "getactivity")
    assert day.data["metadata"] == {"start_time": "2024-03-10T00:00:00.000000-08:00",
                                    "end_time": "2024-03-11T00:00:00.000000-07:00",
                                    "timestamp_localization": 1, "upload_type": 1}
    assert natural_key("daily", day.data) == "2024-03-10"
    with pytest.raises(MappingError, match="date must be YYYY-MM-DD"):
        normalize(response(activities=[dict(load("getactivity.los-angeles.json")["body"]["activities"][0],
                                            date="10/03/2024")]), "getactivity")


def test_manual_weigh_ins_have_no_body_composition() -> None:
    """A recorded getmeas (cjoshmartin/api-oauth2-python tests): manual weigh-ins (attrib 2, fm 128) carry fat ratio 0
    and fat mass 0, i.e. nothing measured them. No record may claim 0 % body fat; the scale's real ratios stay."""
    bodies = normalize(load("getmeas.recorded-manual.json"), "getmeas")
    measurements = [m for body in bodies for m in body.data["measurements_data"]["measurements"]]
    assert len(measurements) == 48
    assert [m for m in measurements if m.get("bodyfat_percentage") == 0] == []
    manual = next(m for m in measurements if m["measurement_time"] == "2021-11-23T12:10:30.000000+01:00")
    assert manual == {"measurement_time": "2021-11-23T12:10:30.000000+01:00", "weight_kg": 67.0}  # grpid 3181614319
    scale = next(m for m in measurements if m["measurement_time"] == "2022-02-27T07:30:16.000000+01:00")
    assert scale == {"measurement_time": "2022-02-27T07:30:16.000000+01:00", "weight_kg": 110.1,
                     "bodyfat_percentage": 15.713}  # grpid 3415696183 (fat mass 17.3 kg has no Terra field)


# fat-free mass, fat ratio, fat mass, muscle, water, bone
@pytest.mark.parametrize("measure_type", [5, 6, 8, 76, 77, 88])
def test_zero_body_composition_is_not_a_measurement(measure_type: int) -> None:
    group = {"grpid": 5123450002, "attrib": 0, "date": 1710140400, "category": 1,
             "measures": [{"value": 72450, "type": 1, "unit": -3}, {"value": 0, "type": measure_type, "unit": -2}]}
    (body,) = normalize(response(timezone="Europe/Berlin", measuregrps=[group]), "getmeas")
    assert body.data["measurements_data"]["measurements"] == [
        {"measurement_time": "2024-03-11T08:00:00.000000+01:00", "weight_kg": 72.45}]
    assert "hydration_data" not in body.data


def test_a_group_time_zone_wins_over_the_body_time_zone() -> None:
    """Withings documents ``measuregrps[].timezone``: a weigh-in in Paris while the account's zone is New York."""
    (body,) = normalize(load("getmeas.group-timezone-conflict.json"), "getmeas")
    assert body.data["metadata"] == {"start_time": "2020-07-09T00:00:00.000000+02:00",
                                     "end_time": "2020-07-10T00:00:00.000000+02:00", "timestamp_localization": 1}
    assert body.data["measurements_data"]["measurements"] == [
        {"measurement_time": "2020-07-09T00:00:00.000000+02:00", "weight_kg": 65.75}]  # 1594245600: 18:00 in New York
    assert natural_key("body", body.data) == "2020-07-09"


def test_a_body_without_time_zone_is_accepted_when_every_group_has_one() -> None:
    (body,) = normalize(load("getmeas.group-timezone.json"), "getmeas")
    assert body.data["metadata"]["start_time"] == "2020-07-09T00:00:00.000000+02:00"
    assert body.data["measurements_data"]["measurements"][0]["measurement_time"] == "2020-07-09T00:00:00.000000+02:00"
    group = load("getmeas.group-timezone.json")["body"]["measuregrps"][0]
    (alone,) = normalize(group, "getmeas")  # a group naming its zone is self-contained
    assert alone.data == body.data
    undated = {k: v for k, v in group.items() if k != "timezone"}
    with pytest.raises(MappingError, match=r"measure group 13 has no timezone and body\.timezone is missing"):
        normalize(response(measuregrps=[group, dict(undated, grpid=13)]), "getmeas")
