"""Polar AccessLink v3 mappers: realistic responses in tests/fixtures/polar, checked value by value."""

from __future__ import annotations

import json
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from terra_oracle import assert_terra_record

from connectors import get_provider
from connectors.base import Fragment, MappingError, UnknownKind, natural_key
from connectors.hooks import Request
from connectors.providers.polar.client import PolarHook
from schemas.serde import validate_record

FIXTURES = Path(__file__).parent / "fixtures" / "polar"
USER = "45395466"  # polar_user .../v3/users/45395466
TRAVELLER = "61209842"
EVENT_USER = "event-user"  # the raw event's user, for documents that do not name theirs


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def normalize(payload: Any, kind: str, user_id: str | None = EVENT_USER) -> list[Fragment]:
    """Map a payload; every record must already conform to the Avro schema and to Terra's SDK models."""
    fragments = list(get_provider("polar").normalize(payload, kind=kind, user_id=user_id))
    for fragment in fragments:
        assert validate_record(fragment.type, fragment.data) == fragment.data
        assert_terra_record(fragment.type, fragment.data)
    return fragments


def fixture_files(bad: bool) -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if p.name.partition(".")[2].startswith("bad") == bad)


# ----------------------------------------------------------------------------------------------------------------------
# every fixture, as the shared conformance suite loads them
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", fixture_files(bad=False), ids=lambda p: p.name)
def test_every_fixture_maps_to_valid_records(path: Path) -> None:
    """A fixture is one payload, or a JSON list of payloads (``[[...]]``: one bare-array response)."""
    kind, content = path.name.split(".")[0], json.loads(path.read_text())
    for payload in content if isinstance(content, list) else [content]:
        assert normalize(payload, kind, user_id="conformance-user")


@pytest.mark.parametrize("path", fixture_files(bad=True), ids=lambda p: p.name)
def test_every_bad_fixture_raises_mapping_error(path: Path) -> None:
    with pytest.raises(MappingError):
        normalize(json.loads(path.read_text()), path.name.split(".")[0], user_id="conformance-user")


def test_fixtures_cover_every_kind() -> None:
    kinds = {p.name.split(".")[0] for p in FIXTURES.glob("*.json")}
    assert kinds == set(get_provider("polar").kinds)
    assert any(fixture_files(bad=True))


# ----------------------------------------------------------------------------------------------------------------------
# exercises → Activity
# ----------------------------------------------------------------------------------------------------------------------
def test_exercise_local_start_plus_offset_minutes_and_iso_duration() -> None:
    (fragment,) = normalize(load("exercises.json"), "exercises")
    assert fragment.type == "activity"
    assert fragment.provider_user_id == USER  # from polar_user, not the raw event's user
    assert fragment.version_ms is None
    record = fragment.data
    assert record["metadata"] == {
        "summary_id": "Zk3qP9",
        "start_time": "2024-03-11T07:40:00.000000+01:00",  # start_time_utc_offset 60 minutes
        "end_time": "2024-03-11T08:26:30.000000+01:00",  # + PT46M30S
        "type": 8,  # ROAD_RUNNING → RUNNING
        "upload_type": 1,
        "name": "ROAD_RUNNING",
        "timestamp_localization": 1,
    }
    assert natural_key("activity", record) == "Zk3qP9"
    assert record["distance_data"]["summary"] == {"distance_meters": 8013}  # 8013.4 m, Terra wants an integer
    assert record["calories_data"] == {"total_burned_calories": 588}
    assert record["heart_rate_data"]["summary"] == {
        "avg_hr_bpm": 153,
        "max_hr_bpm": 172,
        "hr_zone_data": [
            {"zone": 1, "name": "94-112 bpm", "duration_seconds": 95},  # PT1M35S
            {"zone": 2, "name": "113-131 bpm", "duration_seconds": 160},
            {"zone": 3, "name": "132-150 bpm", "duration_seconds": 560},
            {"zone": 4, "name": "151-169 bpm", "duration_seconds": 1700},  # PT28M20S
            {"zone": 5, "name": "170-188 bpm", "duration_seconds": 265},
        ],
    }
    assert record["device_data"] == {"name": "Polar Vantage V3", "manufacturer": "Polar"}


def test_exercise_samples_and_route() -> None:
    record = normalize(load("exercises.json"), "exercises")[0].data
    source = {s["sample-type"]: s["data"].split(",") for s in load("exercises.json")["samples"]}
    hr = record["heart_rate_data"]["detailed"]["hr_samples"]
    assert len(source["0"]) == 558  # 2790 s at a 5 s recording rate
    assert len(hr) == 556  # two null values: sensor offline
    assert hr[0] == {"timestamp": "2024-03-11T07:40:00.000000+01:00", "bpm": 97, "timer_duration_seconds": 0}
    assert source["0"][211:213] == ["null", "null"]
    assert hr[211] == {"timestamp": "2024-03-11T07:57:45.000000+01:00", "bpm": 152, "timer_duration_seconds": 1065}
    speed = record["movement_data"]["speed_samples"]
    assert speed[100] == {"timestamp": "2024-03-11T07:48:20.000000+01:00", "speed_meters_per_second": 3.0278,
                          "timer_duration_seconds": 500}  # 10.9 km/h
    assert source["1"][100] == "10.9"
    distance = record["distance_data"]["detailed"]["distance_samples"]
    assert distance[-1] == {"timestamp": "2024-03-11T08:26:25.000000+01:00", "distance_meters": 7998.4,
                            "timer_duration_seconds": 2785}
    assert record["distance_data"]["detailed"]["elevation_samples"][0]["elev_meters"] == 36
    assert "cadence_samples" not in record["movement_data"]  # no cadence series; RR (type 11) has no Terra sample
    position = record["position_data"]
    assert len(position["position_samples"]) == 94  # every 30 s, PT0S … PT2790S
    assert position["position_samples"][1] == {"timestamp": "2024-03-11T07:40:30.000000+01:00",
                                               "coords_lat_lng_deg": [52.515229, 13.350148],
                                               "timer_duration_seconds": 30}
    assert position["start_pos_lat_lng_deg"] == position["end_pos_lat_lng_deg"] == [52.51452, 13.3501]


def test_exercise_with_negative_offset_keeps_its_local_date() -> None:
    (fragment,) = normalize(load("exercises.denver.json"), "exercises")
    assert fragment.provider_user_id == TRAVELLER
    assert fragment.data == {
        "metadata": {
            "summary_id": "Lq8W2c",
            # 18:05 at -06:00 is already 2024-03-13 in UTC
            "start_time": "2024-03-12T18:05:00.000000-06:00",
            "end_time": "2024-03-12T19:37:15.000000-06:00",  # PT1H32M15S
            "type": 15,  # MOUNTAIN_BIKING
            "upload_type": 1,
            "name": "MOUNTAIN_BIKING",
            "timestamp_localization": 1,
        },
        "distance_data": {"summary": {"distance_meters": 28340}},
        "calories_data": {"total_burned_calories": 1104},
        "heart_rate_data": {"summary": {"avg_hr_bpm": 138, "max_hr_bpm": 176}},
        "device_data": {"name": "Polar Grit X2 Pro", "manufacturer": "Polar"},
    }


@pytest.mark.parametrize(("duration", "end"), [
    ("PT2H44M", "2024-03-12T20:49:00.000000-06:00"),
    ("PT59.5S", "2024-03-12T18:05:59.500000-06:00"),
    ("PT45S", "2024-03-12T18:05:45.000000-06:00"),
    ("P1DT1H", "2024-03-13T19:05:00.000000-06:00"),
])
def test_iso_8601_durations(duration: str, end: str) -> None:
    doc = dict(load("exercises.denver.json"), duration=duration)
    assert normalize(doc, "exercises")[0].data["metadata"]["end_time"] == end


@pytest.mark.parametrize("duration", ["1h 32m", "PT", "P", "", "PT1H32", 5535])
def test_malformed_durations_raise(duration: Any) -> None:
    with pytest.raises(MappingError, match="ISO-8601 duration"):
        normalize(dict(load("exercises.denver.json"), duration=duration), "exercises")


@pytest.mark.parametrize(("sport", "detailed", "terra_type"), [
    ("RUNNING", "TREADMILL_RUNNING", 58),
    ("RUNNING", None, 8),
    ("CYCLING", "INDOOR_CYCLING", 18),
    ("SWIMMING", "POOL_SWIMMING", 83),
    ("OTHER", "WATERSPORTS_WATERSKI", 132),
    ("CROSS-COUNTRY_SKIING", None, 67),  # hyphenated Polar name
    ("STRENGTH_TRAINING", "UNHEARD_OF_DRILL", 80),  # unknown detail: the sport decides
    ("UNDERWATER_HOCKEY", None, 108),  # unknown sport: OTHER
    (None, None, 108),
])
def test_sport_maps_to_terra_activity_type(sport: str | None, detailed: str | None, terra_type: int) -> None:
    doc = dict(load("exercises.denver.json"), sport=sport, detailed_sport_info=detailed)
    assert normalize(doc, "exercises")[0].data["metadata"]["type"] == terra_type


def test_exercise_without_heart_rate_has_none_rather_than_zero_bpm() -> None:
    """No HR recorded: Polar's average/maximum 0, zones of PT0S, 0 bpm samples, 0 kcal (calories come from HR) and 0 m
    (an indoor session) are absent, not zero."""
    (fragment,) = normalize(load("exercises.no-heart-rate.json"), "exercises")
    assert fragment.data == {
        "metadata": {"summary_id": "Rm7tK2", "start_time": "2024-03-13T18:30:00.000000+01:00",
                     "end_time": "2024-03-13T19:22:10.000000+01:00", "type": 80, "upload_type": 1,
                     "name": "STRENGTH_TRAINING", "timestamp_localization": 1},
        "device_data": {"name": "Polar Pacer", "manufacturer": "Polar"},
    }


def test_a_zero_zone_beside_measured_zones_is_kept() -> None:
    doc = load("exercises.json")
    doc["heart_rate_zones"][4]["in-zone"] = "PT0S"
    (fragment,) = normalize(doc, "exercises")
    zones = fragment.data["heart_rate_data"]["summary"]["hr_zone_data"]
    assert zones[4]["duration_seconds"] == 0 and len(zones) == 5


def test_zero_vitals_in_nights_recharges_heart_rate_days_and_physical_info_are_absent() -> None:
    night = load("sleep.json")["nights"][0]
    night["heart_rate_samples"] = {"23:15": 0, "23:20": 56, "23:25": 0}
    (sleep,) = normalize(night, "sleep")
    assert sleep.data["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-10T23:20:00.000000+01:00", "bpm": 56}]
    recharge = dict(load("nightly-recharge.json")["recharges"][0], heart_rate_variability_avg=0,
                    breathing_rate_avg=0, hrv_samples={"23:30": 0, "23:35": 41})
    (daily,) = normalize(recharge, "nightly-recharge")
    assert daily.data["heart_rate_data"] == {"detailed": {"hrv_samples_rmssd": [
        {"timestamp": "2024-03-10T23:35:00.000000", "hrv_rmssd": 41}]}}
    day = {"polar_user": "https://www.polaraccesslink.com/v3/users/45395466", "date": "2024-03-11",
           "heart_rate_samples": [{"heart_rate": 0, "sample_time": "00:02:08"},
                                  {"heart_rate": 63, "sample_time": "00:07:08"}]}
    (hr_day,) = normalize(day, "continuous-heart-rate")
    assert hr_day.data["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-11T00:07:08.000000", "bpm": 63}]
    info = dict(load("physical-info.json"), weight=0, height=0, resting_heart_rate=0, maximum_heart_rate=0,
                vo2_max=0)
    (body,) = normalize(info, "physical-info")
    assert set(body.data) == {"metadata"}


def test_legacy_transaction_exercise_in_kebab_case() -> None:
    """``GET /v3/users/{id}/exercise-transactions/{t}/exercises/{e}``: the same exercise, kebab-case keys."""
    (fragment,) = normalize(load("exercises.transaction.json"), "exercises")
    assert fragment.provider_user_id == TRAVELLER  # from polar-user
    assert fragment.data == {
        "metadata": {"summary_id": "1937529874", "start_time": "2024-01-20T09:15:02.000000-07:00",
                     "end_time": "2024-01-20T10:19:47.000000-07:00", "type": 149, "upload_type": 1,
                     "name": "TRAIL_RUNNING", "timestamp_localization": 1},
        "distance_data": {"summary": {"distance_meters": 11603}},
        "calories_data": {"total_burned_calories": 742},
        "heart_rate_data": {"summary": {"avg_hr_bpm": 148, "max_hr_bpm": 171}},
        "device_data": {"name": "Polar M430", "manufacturer": "Polar"},
    }


def test_exercise_list_forms() -> None:
    """``GET /v3/exercises`` answers a bare JSON array; an object listing them under ``exercises`` is read alike."""
    (listed,) = load("exercises.list.json")
    bare = normalize(listed, "exercises")
    assert [f.data["metadata"]["summary_id"] for f in bare] == ["Zk3qP9", "Lq8W2c"]
    assert [f.provider_user_id for f in bare] == [USER, TRAVELLER]
    assert [f.data for f in normalize({"exercises": listed}, "exercises")] == [f.data for f in bare]


@pytest.mark.parametrize(("case", "message"), [
    ("transaction links", "legacy transaction's links .* fetch each link"),
    ("transaction created", "a Polar transaction, not data: list it at its resource-uri"),
    ("webhook notification", r"webhook notification \(EXERCISE\), not data: fetch its url"),
])
def test_responses_without_data_say_what_to_fetch(case: str, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        normalize(load("exercises.bad-not-data.json")["cases"][case], "exercises")
    with pytest.raises(MappingError, match=r"lists which nights exist, not the nights: fetch /v3/users/sleep/\{date\}"):
        normalize(load("sleep.bad-not-data.json")["cases"]["available nights"], "sleep")
    with pytest.raises(MappingError, match="legacy transaction's links"):
        normalize({"activity-log": ["https://www.polaraccesslink.com/v3/users/12/activity-transactions/34/activities/56"]},
                  "activities")


def test_exercise_offset_must_be_minutes() -> None:
    doc = load("exercises.denver.json")
    with pytest.raises(MappingError, match="start_time_utc_offset"):
        normalize(dict(doc, start_time_utc_offset="-06:00"), "exercises")
    with pytest.raises(MappingError, match="start_time_utc_offset"):
        normalize(dict(doc, start_time_utc_offset=-21600), "exercises")  # seconds, not minutes
    with pytest.raises(MappingError, match="missing required field"):
        normalize({k: v for k, v in doc.items() if k != "id"}, "exercises")


# ----------------------------------------------------------------------------------------------------------------------
# sleep → Sleep
# ----------------------------------------------------------------------------------------------------------------------
POLAR_TO_TERRA_LEVEL = {0: 1, 1: 6, 2: 4, 3: 4, 4: 5, 5: 0}  # wake, REM, N1, N2, N3, unknown


def test_night_with_midnight_rollover() -> None:
    night, _ = normalize(load("sleep.json"), "sleep")
    record = night.data
    assert night.provider_user_id == USER
    assert record["metadata"] == {
        "summary_id": "2024-03-11",  # the result date: Polar has one night per date and no sleep id
        "start_time": "2024-03-10T23:12:30.000000+01:00",
        "end_time": "2024-03-11T06:58:00.000000+01:00",
        "upload_type": 2,  # SleepUploadType.AUTOMATIC
        "is_nap": False,
        "timestamp_localization": 1,
    }
    assert natural_key("sleep", record) == "2024-03-11"
    durations = record["sleep_durations_data"]
    assert durations["asleep"] == {
        "duration_asleep_state_seconds": 27390,  # light + deep + REM
        "duration_light_sleep_state_seconds": 14370,  # N1 + N2
        "duration_deep_sleep_state_seconds": 4140,
        "duration_REM_sleep_state_seconds": 8880,
    }
    assert durations["awake"] == {"duration_awake_state_seconds": 240, "duration_short_interruption_seconds": 60,
                                  "duration_long_interruption_seconds": 180}
    assert durations["other"] == {"duration_in_bed_seconds": 27930.0, "duration_unmeasurable_sleep_seconds": 300}
    assert durations["sleep_efficiency"] == 98.07  # 27390 / 27930, a percentage
    assert record["scores"] == {"sleep_score": 79}


def test_hypnogram_keys_roll_over_midnight_and_map_stages() -> None:
    record = normalize(load("sleep.json"), "sleep")[0].data
    source = load("sleep.json")["nights"][0]["hypnogram"]
    expected = [{"timestamp": f"{'2024-03-10' if key >= '12:00' else '2024-03-11'}T{key}:00.000000+01:00",
                 "level": POLAR_TO_TERRA_LEVEL[code]} for key, code in source.items()]
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    assert hypnogram == expected
    assert hypnogram[3:5] == [{"timestamp": "2024-03-10T23:52:00.000000+01:00", "level": 4},  # N2 → light
                              {"timestamp": "2024-03-11T00:41:00.000000+01:00", "level": 6}]  # REM, after midnight
    assert {"timestamp": "2024-03-11T06:31:00.000000+01:00", "level": 0} in hypnogram  # 5 UNKNOWN
    # the stages the hypnogram holds add up to Polar's deep and REM totals
    ends = [s["timestamp"] for s in hypnogram[1:]] + [record["metadata"]["end_time"]]

    def seconds(level: int) -> float:
        return sum((datetime.fromisoformat(end) - datetime.fromisoformat(s["timestamp"])).total_seconds()
                   for s, end in zip(hypnogram, ends, strict=True) if s["level"] == level)

    assert seconds(5) == 4140
    assert seconds(6) == 8880
    assert seconds(1) == 240  # the interruptions


def test_sleep_heart_rate_samples() -> None:
    record = normalize(load("sleep.json"), "sleep")[0].data
    samples = record["heart_rate_data"]["detailed"]["hr_samples"]
    assert len(samples) == 93  # every 5 minutes, 23:15 … 06:55
    assert samples[0] == {"timestamp": "2024-03-10T23:15:00.000000+01:00", "bpm": 56}
    assert samples[9]["timestamp"] == "2024-03-11T00:00:00.000000+01:00"
    assert samples[-1]["timestamp"] == "2024-03-11T06:55:00.000000+01:00"
    assert record["heart_rate_data"]["summary"] == {"avg_hr_bpm": 52.02, "min_hr_bpm": 49, "max_hr_bpm": 57}


def test_night_starting_after_midnight_stays_on_its_date() -> None:
    record = normalize(load("sleep.json"), "sleep")[1].data
    assert record["metadata"]["summary_id"] == "2024-03-12"
    assert record["metadata"]["start_time"] == "2024-03-12T00:39:07.000000+01:00"
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    assert hypnogram[0] == {"timestamp": "2024-03-12T00:39:00.000000+01:00", "level": 4}
    assert all(s["timestamp"].startswith("2024-03-12T") for s in hypnogram)
    assert hypnogram[-1] == {"timestamp": "2024-03-12T07:20:00.000000+01:00", "level": 4}


def test_single_night_with_negative_offset() -> None:
    (fragment,) = normalize(load("sleep.new-york.json"), "sleep")  # GET /v3/users/sleep/{date}: no "nights" page
    record = fragment.data
    assert fragment.provider_user_id == TRAVELLER
    assert record["metadata"]["start_time"] == "2024-03-14T22:47:00.000000-04:00"
    assert record["metadata"]["end_time"] == "2024-03-15T06:21:30.000000-04:00"
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    assert hypnogram[2:4] == [{"timestamp": "2024-03-14T23:20:00.000000-04:00", "level": 5},
                              {"timestamp": "2024-03-15T00:05:00.000000-04:00", "level": 4}]
    assert record["heart_rate_data"]["detailed"]["hr_samples"][-1]["timestamp"] == "2024-03-15T06:20:00.000000-04:00"


def test_night_across_the_spring_dst_change() -> None:
    """Berlin, 31 March 2024: 02:00 CET → 03:00 CEST during the night. ``sleep_start_time`` is +01:00,
    ``sleep_end_time`` +02:00; the ``"HH:MM"`` keys are the device's wall clock, so keys from 02:00 on are +02:00."""
    (fragment,) = normalize(load("sleep.dst.json"), "sleep")
    record = fragment.data
    assert record["metadata"]["start_time"] == "2024-03-30T23:05:30.000000+01:00"
    assert record["metadata"]["end_time"] == "2024-03-31T07:41:00.000000+02:00"
    assert natural_key("sleep", record) == "2024-03-31"
    durations = record["sleep_durations_data"]
    assert durations["other"]["duration_in_bed_seconds"] == 27330  # 7 h 35 min 30 s, not the wall clock's 8 h 35
    assert durations["asleep"]["duration_asleep_state_seconds"] == 27150  # 15630 + 5520 + 6000
    assert durations["sleep_efficiency"] == 99.34
    hypnogram = durations["hypnogram_samples"]
    assert hypnogram[5:7] == [{"timestamp": "2024-03-31T01:50:00.000000+01:00", "level": 4},
                              {"timestamp": "2024-03-31T03:15:00.000000+02:00", "level": 5}]  # 25 min later
    assert hypnogram[-1] == {"timestamp": "2024-03-31T07:30:00.000000+02:00", "level": 4}
    ends = [s["timestamp"] for s in hypnogram[1:]] + [record["metadata"]["end_time"]]

    def seconds(level: int) -> float:
        return sum((datetime.fromisoformat(end) - datetime.fromisoformat(s["timestamp"])).total_seconds()
                   for s, end in zip(hypnogram, ends, strict=True) if s["level"] == level)

    assert (seconds(5), seconds(6), seconds(1)) == (5520, 6000, 180)  # Polar's deep, REM, interruptions
    assert seconds(4) == 15660  # light from the hypnogram's first whole minute (Polar: 15630 from 23:05:30)
    samples = record["heart_rate_data"]["detailed"]["hr_samples"]
    assert [s["timestamp"] for s in samples[3:5]] == ["2024-03-31T01:55:00.000000+01:00",
                                                      "2024-03-31T03:00:00.000000+02:00"]  # 5 minutes apart
    recharge = dict(load("nightly-recharge.json")["recharges"][0], date="2024-03-31", sleep=load("sleep.dst.json"),
                    hrv_samples={"01:55": 40, "03:00": 42}, breathing_samples={"03:00": 13.5})
    daily, sleep = normalize(recharge, "nightly-recharge")
    assert sleep.data["respiration_data"]["breaths_data"]["samples"] == [
        {"timestamp": "2024-03-31T03:00:00.000000+02:00", "breaths_per_min": 13.5}]
    assert daily.data["metadata"]["start_time"] == "2024-03-31T00:00:00.000000+01:00"  # midnight was still CET
    assert daily.data["metadata"]["end_time"] == "2024-04-01T00:00:00.000000+02:00"  # a 23-hour day
    assert daily.data["heart_rate_data"]["detailed"]["hrv_samples_rmssd"] == [
        {"timestamp": "2024-03-31T01:55:00.000000+01:00", "hrv_rmssd": 40},
        {"timestamp": "2024-03-31T03:00:00.000000+02:00", "hrv_rmssd": 42}]


def _dst_night(start: str, end: str, hypnogram: dict[str, int], heart_rate: dict[str, int]) -> dict[str, Any]:
    """The DST fixture's night moved to another zone's change: its bounds, hypnogram and heart-rate keys as the
    device's wall clock shows them, in the order Polar sends them (time order)."""
    return dict(load("sleep.dst.json"), date=end[:10], sleep_start_time=start, sleep_end_time=end,
                hypnogram=hypnogram, heart_rate_samples=heart_rate)


def _samples(record: dict[str, Any]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    return ([(s["timestamp"][11:16] + s["timestamp"][-6:], s["level"])
             for s in record["sleep_durations_data"]["hypnogram_samples"]],
            [(s["timestamp"][11:16] + s["timestamp"][-6:], s["bpm"])
             for s in record["heart_rate_data"]["detailed"]["hr_samples"]])


def test_helsinki_spring_night_changes_offset_at_03_00_local() -> None:
    """Helsinki, 31 March 2024: 03:00 EET → 04:00 EEST (01:00 UTC, as in all EU zones). 02:30 is still +02:00 (not
    the 02:00 of Central Europe); 04:10 is +03:00."""
    (fragment,) = normalize(_dst_night("2024-03-30T23:00:00+02:00", "2024-03-31T07:30:00+03:00",
                                       {"23:00": 2, "01:50": 3, "02:30": 4, "02:55": 3, "04:10": 1, "07:20": 0},
                                       {"01:50": 55, "02:30": 50, "02:55": 49, "04:05": 52, "04:10": 53}), "sleep")
    hypnogram, heart_rate = _samples(fragment.data)
    assert hypnogram == [("23:00+02:00", 4), ("01:50+02:00", 4), ("02:30+02:00", 5), ("02:55+02:00", 4),
                         ("04:10+03:00", 6), ("07:20+03:00", 1)]
    assert heart_rate == [("01:50+02:00", 55), ("02:30+02:00", 50), ("02:55+02:00", 49), ("04:05+03:00", 52),
                          ("04:10+03:00", 53)]


def test_helsinki_autumn_night_keeps_both_passes_of_the_repeated_hour_in_order() -> None:
    """Helsinki, 27 October 2024: 04:00 EEST → 03:00 EET. Polar's keys run 03:10 and 03:50 (+03:00), then 03:20 and
    03:40 again (+02:00): the step back marks the change. The levels stay in Polar's order, none merged."""
    (fragment,) = normalize(_dst_night("2024-10-26T23:00:00+03:00", "2024-10-27T07:00:00+02:00",
                                       {"23:00": 2, "03:10": 4, "03:50": 1, "03:20": 3, "06:50": 0},
                                       {"02:30": 56, "03:10": 54, "03:50": 57, "03:05": 53, "03:40": 52, "04:30": 51}),
                            "sleep")
    record = fragment.data
    hypnogram, heart_rate = _samples(record)
    assert hypnogram == [("23:00+03:00", 4), ("03:10+03:00", 5), ("03:50+03:00", 6), ("03:20+02:00", 4),
                         ("06:50+02:00", 1)]
    assert heart_rate == [("02:30+03:00", 56), ("03:10+03:00", 54), ("03:50+03:00", 57), ("03:05+02:00", 53),
                          ("03:40+02:00", 52), ("04:30+02:00", 51)]
    instants = [datetime.fromisoformat(s["timestamp"]) for s in record["heart_rate_data"]["detailed"]["hr_samples"]]
    assert instants == sorted(instants)


def test_new_york_autumn_night_changes_at_02_00_daylight_time() -> None:
    """New York, 3 November 2024: 02:00 EDT → 01:00 EST. Keys from 02:00 on are EST even without a sample in the
    repeated hour to show the step back."""
    (fragment,) = normalize(_dst_night("2024-11-02T23:30:00-04:00", "2024-11-03T06:30:00-05:00",
                                       {"23:30": 2, "00:55": 3, "02:10": 4, "05:40": 0},
                                       {"00:55": 58, "02:10": 51}), "sleep")
    hypnogram, heart_rate = _samples(fragment.data)
    assert hypnogram == [("23:30-04:00", 4), ("00:55-04:00", 4), ("02:10-05:00", 5), ("05:40-05:00", 1)]
    assert heart_rate == [("00:55-04:00", 58), ("02:10-05:00", 51)]


def test_a_zone_outside_europe_and_the_americas_changes_at_02_00_standard_time() -> None:
    """Sydney, 7 April 2024: 03:00 AEDT → 02:00 AEST (02:00 standard time). Without a sample in the repeated hour,
    02:40 is still +11:00 and 03:10 is +10:00; with one, the step back places the change."""
    (fragment,) = normalize(_dst_night("2024-04-06T22:30:00+11:00", "2024-04-07T06:30:00+10:00",
                                       {"22:30": 2, "01:30": 3, "02:40": 4, "03:10": 3, "06:20": 0},
                                       {"02:40": 50, "02:50": 51, "02:05": 52, "02:35": 49}), "sleep")
    hypnogram, heart_rate = _samples(fragment.data)
    assert hypnogram == [("22:30+11:00", 4), ("01:30+11:00", 4), ("02:40+11:00", 5), ("03:10+10:00", 4),
                         ("06:20+10:00", 1)]
    assert heart_rate == [("02:40+11:00", 50), ("02:50+11:00", 51), ("02:05+10:00", 52), ("02:35+10:00", 49)]


def test_an_unknown_stage_code_is_an_unknown_level_and_keeps_the_night() -> None:
    """Codes beyond Polar's documented 0-5 table (here 7 and 6) are Terra UNKNOWN; the rest of the night stays."""
    (fragment,) = normalize(load("sleep.unknown-stage.json"), "sleep")
    record = fragment.data
    assert record["metadata"]["summary_id"] == "2024-03-12"
    hypnogram = record["sleep_durations_data"]["hypnogram_samples"]
    assert len(hypnogram) == 15
    assert hypnogram[6:8] == [{"timestamp": "2024-03-12T03:05:00.000000+01:00", "level": 0},  # code 7
                              {"timestamp": "2024-03-12T03:26:00.000000+01:00", "level": 4}]
    assert hypnogram[12] == {"timestamp": "2024-03-12T05:58:00.000000+01:00", "level": 0}  # code 6
    assert record["sleep_durations_data"]["asleep"]["duration_deep_sleep_state_seconds"] == 3540
    assert record["scores"] == {"sleep_score": 83}


def test_unmappable_nights() -> None:
    night = load("sleep.json")["nights"][0]
    with pytest.raises(MappingError, match="hypnogram key '25:00'"):
        normalize(dict(night, hypnogram={"25:00": 2}), "sleep")
    with pytest.raises(MappingError, match="is not after sleep_start_time"):
        normalize(dict(night, sleep_end_time=night["sleep_start_time"]), "sleep")
    with pytest.raises(MappingError, match="no UTC offset"):
        normalize(dict(night, sleep_start_time="2024-03-10T23:12:30"), "sleep")
    with pytest.raises(MappingError, match="'nights' must be a list"):
        normalize({"nights": night}, "sleep")


def test_a_page_is_split_into_its_nights_each_naming_its_user() -> None:
    """``{"nights": [...]}`` is split by the framework: each night is its own document, owned by its polar_user (no
    raw-event user needed), and one unmappable night is refused alone, not with the page."""
    provider = get_provider("polar")
    page = load("sleep.json")
    assert [doc["date"] for _, doc in provider.documents(page, "sleep")] == ["2024-03-11", "2024-03-12"]
    assert [f.provider_user_id for f in normalize(page, "sleep", user_id=None)] == [USER, USER]
    page["nights"][0]["sleep_end_time"] = page["nights"][0]["sleep_start_time"]
    kind, bad = next(provider.documents(page, "sleep"))
    with pytest.raises(MappingError, match="is not after sleep_start_time"):
        provider.normalize_document(kind, bad)
    (_, good), = list(provider.documents(page, "sleep"))[1:]
    assert [f.data["metadata"]["summary_id"] for f in provider.normalize_document("sleep", good)] == ["2024-03-12"]
    anonymous = {"nights": [{k: v for k, v in page["nights"][1].items() if k != "polar_user"}]}
    with pytest.raises(MappingError, match="no user id"):
        normalize(anonymous, "sleep", user_id=None)


def test_polar_user_must_be_a_user_link() -> None:
    (fragment,) = normalize(load("sleep.new-york.json"), "sleep", user_id=None)  # the document names its user
    assert fragment.provider_user_id == TRAVELLER
    with pytest.raises(MappingError, match="polar_user"):
        normalize(dict(load("sleep.new-york.json"), polar_user="https://example.com/someone"), "sleep")


# ----------------------------------------------------------------------------------------------------------------------
# nightly recharge → Daily (+ Sleep)
# ----------------------------------------------------------------------------------------------------------------------
def test_nightly_recharge_alone_gives_the_days_hrv_without_offset() -> None:
    first, second = normalize(load("nightly-recharge.json"), "nightly-recharge")
    assert first.type == second.type == "daily"
    assert first.provider_user_id == USER
    record = first.data
    assert record["metadata"] == {"start_time": "2024-03-11T00:00:00.000000", "end_time": "2024-03-12T00:00:00.000000",
                                  "upload_type": 1, "timestamp_localization": 1}  # Polar gives no offset here
    assert natural_key("daily", record) == "2024-03-11"
    assert record["heart_rate_data"]["summary"] == {"avg_hrv_rmssd": 45}
    samples = record["heart_rate_data"]["detailed"]["hrv_samples_rmssd"]
    assert len(samples) == 48  # 5-minute samples over ~4 hours
    assert samples[:4] == [{"timestamp": "2024-03-10T23:45:00.000000", "hrv_rmssd": 44},
                           {"timestamp": "2024-03-10T23:50:00.000000", "hrv_rmssd": 46},
                           {"timestamp": "2024-03-10T23:55:00.000000", "hrv_rmssd": 49},
                           {"timestamp": "2024-03-11T00:00:00.000000", "hrv_rmssd": 48}]  # rolled over
    assert samples[-1]["timestamp"] == "2024-03-11T03:40:00.000000"
    assert natural_key("daily", second.data) == "2024-03-12"
    assert second.data["heart_rate_data"]["detailed"]["hrv_samples_rmssd"][0]["timestamp"] == (
        "2024-03-12T01:11:00.000000")  # a night that began after midnight


def test_nightly_recharge_with_its_night_completes_the_sleep() -> None:
    daily, sleep = normalize(load("nightly-recharge.with-sleep.json"), "nightly-recharge")
    night = normalize(load("sleep.json"), "sleep")[0].data
    assert daily.data["metadata"]["start_time"] == "2024-03-11T00:00:00.000000+01:00"  # the night's offset
    assert daily.data["heart_rate_data"]["detailed"]["hrv_samples_rmssd"][0] == {
        "timestamp": "2024-03-10T23:45:00.000000+01:00", "hrv_rmssd": 44}
    assert sleep.type == "sleep"
    assert sleep.provider_user_id == USER
    record = sleep.data
    assert natural_key("sleep", record) == "2024-03-11"
    assert record["metadata"] == night["metadata"]
    assert record["sleep_durations_data"] == night["sleep_durations_data"]
    assert record["readiness_data"] == {"recovery_level": 4}  # nightly_recharge_status 4 "OK" = RecoveryLevel.OK
    assert record["heart_rate_data"]["summary"] == dict(night["heart_rate_data"]["summary"], avg_hrv_rmssd=45)
    breaths = record["respiration_data"]["breaths_data"]
    assert {k: v for k, v in breaths.items() if k != "samples"} == {
        "start_time": "2024-03-10T23:43:00.000000+01:00", "end_time": "2024-03-11T03:38:00.000000+01:00",
        "avg_breaths_per_min": 13.9, "min_breaths_per_min": 13.0, "max_breaths_per_min": 14.5}
    assert len(breaths["samples"]) == 48
    assert breaths["samples"][0] == {"timestamp": "2024-03-10T23:43:00.000000+01:00", "breaths_per_min": 13.6}


def test_poll_hook_attaches_each_recharges_night_from_the_sleep_list() -> None:
    """What the poller publishes for a recharge page maps to the night's complete Sleep, as the mapper needs."""
    fetched: list[str] = []

    def fetch(path: str, params: Any = None) -> Any:  # the poller's rate-limited GET; here, Polar's answer
        fetched.append(path)
        return {"nights": load("sleep.json")["nights"][:1]}  # only the night of 2024-03-11 is still listed

    request = Request("polar", "nightly-recharge", None, None, None, None, fetch)
    (page,) = PolarHook().payloads(request, load("nightly-recharge.json"))
    assert fetched == ["/v3/users/sleep"]  # once per page
    first, second = page["recharges"]
    assert first["sleep"] == load("sleep.json")["nights"][0] and "sleep" not in second
    daily, sleep, other_daily = normalize(page, "nightly-recharge")
    assert (daily.type, sleep.type, other_daily.type) == ("daily", "sleep", "daily")
    assert sleep.data["readiness_data"] == {"recovery_level": 4}
    assert daily.data["metadata"]["start_time"] == "2024-03-11T00:00:00.000000+01:00"  # the night's offset
    assert PolarHook().payloads(request, {"recharges": []}) == [{"recharges": []}]  # nothing to attach: no request
    assert PolarHook().payloads(request, load("nightly-recharge.with-sleep.json")) == [
        load("nightly-recharge.with-sleep.json")]
    assert fetched == ["/v3/users/sleep"]
    exercise = load("exercises.json")
    assert PolarHook().payloads(Request("polar", "exercises", None, None, None, None, fetch), [exercise, None]) == [
        exercise]


def test_nightly_recharge_rejects_another_nights_sleep() -> None:
    doc = dict(load("nightly-recharge.json")["recharges"][0], sleep=load("sleep.json")["nights"][1])
    with pytest.raises(MappingError, match="is not this recharge's night"):
        normalize(doc, "nightly-recharge")


# ----------------------------------------------------------------------------------------------------------------------
# daily activity and continuous heart rate → Daily
# ----------------------------------------------------------------------------------------------------------------------
def test_daily_activity() -> None:
    (fragment,) = normalize(load("activities.json"), "activities")
    assert fragment.provider_user_id == EVENT_USER  # the activity names no user
    record = fragment.data
    assert record["metadata"] == {"start_time": "2024-03-11T00:00:00.000000", "end_time": "2024-03-12T00:00:00.000000",
                                  "upload_type": 1, "timestamp_localization": 1}
    assert natural_key("daily", record) == "2024-03-11"
    assert {k: v for k, v in record["distance_data"].items() if k != "detailed"} == {"steps": 15697,
                                                                                    "distance_meters": 12217}
    assert record["calories_data"] == {"total_burned_calories": 2921, "net_activity_calories": 1046,
                                       "BMR_calories": 1875}
    durations = record["active_durations_data"]
    assert {k: v for k, v in durations.items() if k != "activity_levels_samples"} == {
        "activity_seconds": 11460,  # PT3H11M
        "inactivity_seconds": 34950,  # PT9H42M30S
        "num_continuous_inactive_periods": 1,
    }
    assert durations["activity_levels_samples"][:4] == [
        {"timestamp": "2024-03-11T00:00:00.000000", "level": 1},  # SLEEP → REST
        {"timestamp": "2024-03-11T06:58:30.000000", "level": 2},  # SEDENTARY → INACTIVE
        {"timestamp": "2024-03-11T07:02:00.000000", "level": 3},  # LIGHT → LOW
        {"timestamp": "2024-03-11T07:40:00.000000", "level": 5},  # VIGOROUS → HIGH
    ]
    assert {"timestamp": "2024-03-11T17:31:00.000000", "level": 4} in durations["activity_levels_samples"]


def test_step_samples_are_cumulative_and_restore_filtered_repeats() -> None:
    record = normalize(load("activities.json"), "activities")[0].data
    steps = load("activities.json")["samples"]["steps"]
    samples = record["distance_data"]["detailed"]["step_samples"]
    assert len(samples) == len(steps["samples"]) == 210
    assert samples[0] == {"timestamp": "2024-03-11T07:02:00.000000", "steps": 0}  # 0 steps from midnight to 07:02
    # 96 steps at 07:11, then nothing until 07:16: Polar dropped 07:12-07:15, which repeated the 96
    assert {"steps": 96, "timestamp": "2024-03-11T07:11"} in steps["samples"]
    assert {"timestamp": "2024-03-11T07:16:00.000000", "steps": 34 + 58 + 61 + 47 + 12 + 23 + 88 + 5 * 96} in samples
    assert samples[-1]["steps"] == steps["total_steps"] == record["distance_data"]["steps"]
    assert all(a["steps"] <= b["steps"] for a, b in pairwise(samples))


def test_activity_day_comes_from_start_time_without_samples() -> None:
    doc = {k: v for k, v in load("activities.json").items() if k != "samples"}
    record = normalize(dict(doc, start_time="2024-03-12T00:00:00"), "activities")[0].data
    assert natural_key("daily", record) == "2024-03-12"
    assert "detailed" not in record["distance_data"]
    with pytest.raises(MappingError, match="its day is unknown"):
        normalize({k: v for k, v in doc.items() if k != "start_time"}, "activities")


def test_daily_activity_list_and_legacy_transaction_forms() -> None:
    (listed,) = load("activities.list.json")  # GET /v3/users/activities: a bare array, one summary per day
    days = normalize(listed, "activities")
    assert [natural_key("daily", f.data) for f in days] == ["2024-03-11", "2024-03-12"]
    assert days[1].data["distance_data"] == {"steps": 9814, "distance_meters": 7630}
    assert days[1].data["calories_data"] == {"total_burned_calories": 2612, "net_activity_calories": 731,
                                             "BMR_calories": 1881}
    (legacy,) = normalize(load("activities.transaction.json"), "activities")
    assert legacy.provider_user_id == TRAVELLER
    assert legacy.data == {  # active-steps are Polar's activity units, not steps: left out
        "metadata": {"start_time": "2024-01-20T00:00:00.000000", "end_time": "2024-01-21T00:00:00.000000",
                     "upload_type": 1, "timestamp_localization": 1},
        "calories_data": {"total_burned_calories": 2611, "net_activity_calories": 913, "BMR_calories": 1698},
    }


def test_continuous_heart_rate() -> None:
    (fragment,) = normalize(load("continuous-heart-rate.json"), "continuous-heart-rate")
    assert fragment.provider_user_id == USER
    record = fragment.data
    assert record["metadata"]["start_time"] == "2024-03-11T00:00:00.000000"
    samples = record["heart_rate_data"]["detailed"]["hr_samples"]
    assert len(samples) == len(load("continuous-heart-rate.json")["heart_rate_samples"]) == 271
    assert samples[0] == {"timestamp": "2024-03-11T00:02:08.000000", "bpm": 56}
    assert record["heart_rate_data"]["summary"] == {"avg_hr_bpm": 68.3, "min_hr_bpm": 50, "max_hr_bpm": 81}


def test_continuous_heart_rate_range_gives_one_daily_per_day() -> None:
    """``GET /v3/users/continuous-heart-rate?from=&to=`` (what the poller reads) answers ``{"heart_rates": [...]}``."""
    first, second = normalize(load("continuous-heart-rate.range.json"), "continuous-heart-rate")
    assert first.data == normalize(load("continuous-heart-rate.json"), "continuous-heart-rate")[0].data
    assert (first.provider_user_id, second.provider_user_id) == (USER, USER)
    assert natural_key("daily", second.data) == "2024-03-12"
    assert second.data["heart_rate_data"]["detailed"]["hr_samples"][2:4] == [
        {"timestamp": "2024-03-12T07:45:12.000000", "bpm": 61}, {"timestamp": "2024-03-12T07:46:12.000000", "bpm": 74}]
    assert second.data["heart_rate_data"]["summary"] == {"avg_hr_bpm": 62.8, "min_hr_bpm": 55, "max_hr_bpm": 74}
    assert normalize({"heart_rates": []}, "continuous-heart-rate") == []  # a range without data
    with pytest.raises(MappingError, match="'heart_rates' must be a list"):
        normalize({"heart_rates": {"date": "2024-03-12"}}, "continuous-heart-rate")


# ----------------------------------------------------------------------------------------------------------------------
# physical info → Body
# ----------------------------------------------------------------------------------------------------------------------
def test_physical_info_is_a_body_on_the_utc_date_of_its_change() -> None:
    (fragment,) = normalize(load("physical-info.json"), "physical-info")
    assert fragment.type == "body"
    assert fragment.provider_user_id == EVENT_USER
    assert fragment.version_ms == 1710026131000  # modified 2024-03-09T23:15:31Z
    assert fragment.data == {
        # no local offset from Polar: the UTC day (in Berlin it was already 2024-03-10)
        "metadata": {"start_time": "2024-03-09T00:00:00.000000+00:00", "end_time": "2024-03-10T00:00:00.000000+00:00",
                     "timestamp_localization": 0},
        "measurements_data": {"measurements": [{"measurement_time": "2024-03-09T23:15:31.000000+00:00",
                                                "weight_kg": 72.4, "height_cm": 179.0}]},
        "heart_data": {"heart_rate_data": {"summary": {"resting_hr_bpm": 51, "user_max_hr_bpm": 188}}},
        "oxygen_data": {"vo2max_ml_per_min_per_kg": 52,
                        "vo2_samples": [{"timestamp": "2024-03-09T23:15:31.000000+00:00",
                                         "vo2max_ml_per_min_per_kg": 52}]},
    }
    assert natural_key("body", fragment.data) == "2024-03-09"


def test_legacy_physical_information_and_default_weight() -> None:
    (fragment,) = normalize(load("physical-info.transaction.json"), "physical-info")
    assert fragment.provider_user_id == TRAVELLER  # "polar-user"
    assert fragment.data["measurements_data"]["measurements"] == [
        {"measurement_time": "2024-01-20T06:41:02.000000+00:00", "weight_kg": 81.3, "height_cm": 184.0}]
    assert fragment.data["heart_data"]["heart_rate_data"]["summary"] == {"resting_hr_bpm": 57, "user_max_hr_bpm": 183}
    default = dict(load("physical-info.json"), weight_source="SOURCE_DEFAULT")
    assert normalize(default, "physical-info")[0].data["measurements_data"]["measurements"][0].get("weight_kg") is None


def test_unknown_kind() -> None:
    with pytest.raises(UnknownKind, match="cardio-load"):
        normalize(load("exercises.json"), "cardio-load")
