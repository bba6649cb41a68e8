"""WHOOP API v2 mappers: realistic payloads in tests/fixtures/whoop, checked value by value."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from terra.types.activity import Activity
from terra.types.daily import Daily
from terra.types.sleep import Sleep

from connectors import get_provider
from connectors.base import Deletion, Fragment, MappingError, natural_key
from connectors.hooks import Request
from connectors.providers.whoop.client import WhoopPollHook
from core.errors import PermanentError
from schemas.serde import validate_record

FIXTURES = Path(__file__).parent / "fixtures" / "whoop"
TERRA_MODELS = {"activity": Activity, "daily": Daily, "sleep": Sleep}
SLEEP_ID = "3f5e1c9a-7b2d-4e8f-a1c3-9d6b2e4f7a10"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def normalize(payload: Any, kind: str) -> list[Fragment]:
    """Map a payload and check every record against the Avro schema and Terra's SDK models."""
    fragments = list(get_provider("whoop").normalize(payload, kind=kind))
    for fragment in fragments:
        if isinstance(fragment, Deletion):
            continue
        validate_record(fragment.type, fragment.data)
        TERRA_MODELS[fragment.type].model_validate(fragment.data)
    return fragments


def recovery_with_sleep() -> dict[str, Any]:
    """The recovery as a collector delivers it: with its sleep (GET /v2/activity/sleep/{sleep_id}) attached."""
    recovery = load("recovery.bad_no_sleep.json")["records"][0]
    return dict(recovery, sleep=load("sleep.page.json")["records"][0])


def test_cycle_day_key_is_the_local_day_it_covers() -> None:
    """A cycle runs from falling asleep to falling asleep; its Daily is the local day of its start + 12 h: the waking
    day after the sleep that opened it (an evening sleep opens tomorrow's cycle, one after midnight today's)."""
    central_europe, new_york = normalize(load("cycle.page.json"), "cycle")
    assert central_europe.type == "daily"
    assert central_europe.provider_user_id == "245199"
    assert central_europe.version_ms == 1710193766202  # updated_at 2024-03-11T21:49:26.202Z
    # starts 2024-03-10 23:12 (+01:00): asleep on the evening of the 10th, the day it covers is the 11th
    assert central_europe.data == {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+01:00", "end_time": "2024-03-12T00:00:00.000000+01:00",
                     "upload_type": 1, "timestamp_localization": 1},
        "strain_data": {"strain_level": 12.8406},
        "calories_data": {"total_burned_calories": 2218},  # 9280 kJ / 4.184
        "heart_rate_data": {"summary": {"avg_hr_bpm": 71, "max_hr_bpm": 168}},
    }
    # starts 2024-03-11T03:40Z = 2024-03-10 22:40 in New York: local, not UTC, and the next day
    assert new_york.provider_user_id == "10129"
    assert natural_key("daily", new_york.data) == "2024-03-11"
    assert new_york.data["metadata"]["start_time"] == "2024-03-11T00:00:00.000000-05:00"
    assert new_york.data["calories_data"] == {"total_burned_calories": 1031}  # 4311.7 kJ, cycle still open


def test_consecutive_cycles_never_share_a_day() -> None:
    """WHOOP's docs shape: asleep at 00:15 on Apr 24 and again at 23:30 the same day (-05:00). Keyed by the start's
    date both were Apr 24 (one overwrote the other) and Apr 25 had nothing; each now covers its own day."""
    later, earlier = normalize(load("cycle.two-nights.json"), "cycle")
    assert [natural_key("daily", f.data) for f in (earlier, later)] == ["2022-04-24", "2022-04-25"]
    assert earlier.data["metadata"] == {"start_time": "2022-04-24T00:00:00.000000-05:00",
                                        "end_time": "2022-04-25T00:00:00.000000-05:00",
                                        "upload_type": 1, "timestamp_localization": 1}
    assert earlier.data["strain_data"] == {"strain_level": 14.2}
    assert later.data["metadata"]["start_time"] == "2022-04-25T00:00:00.000000-05:00"
    assert later.data["strain_data"] == {"strain_level": 6.1}
    assert later.data["calories_data"] == {"total_burned_calories": 1912}  # 8000 kJ / 4.184


def test_scored_sleep() -> None:
    night, nap = normalize(load("sleep.page.json"), "sleep")
    assert night.version_ms == 1710137692090  # 2024-03-11T06:14:52.090Z
    assert night.data == {
        "metadata": {
            "summary_id": SLEEP_ID,
            "start_time": "2024-03-10T23:12:00.000000+01:00",
            "end_time": "2024-03-11T06:58:00.000000+01:00",
            "upload_type": 2,  # SleepUploadType.AUTOMATIC
            "is_nap": False,
            "timestamp_localization": 1,
        },
        "sleep_durations_data": {
            "asleep": {
                "duration_asleep_state_seconds": 25680.0,
                "duration_light_sleep_state_seconds": 14280.0,
                "duration_deep_sleep_state_seconds": 5400.0,
                "duration_REM_sleep_state_seconds": 6000.0,
            },
            "awake": {"duration_awake_state_seconds": 2160.0, "num_wakeup_events": 9},
            "other": {"duration_in_bed_seconds": 27960.0, "duration_unmeasurable_sleep_seconds": 120.0},
            "sleep_efficiency": 91.84549,
        },
        "respiration_data": {"breaths_data": {"start_time": "2024-03-10T23:12:00.000000+01:00",
                                              "end_time": "2024-03-11T06:58:00.000000+01:00",
                                              "avg_breaths_per_min": 14.94140625}},
        "scores": {"sleep_score": 88.0},
    }
    assert nap.data["metadata"]["is_nap"] is True
    assert nap.data["metadata"]["start_time"] == "2024-03-11T14:05:00.000000+01:00"
    assert nap.data["sleep_durations_data"]["asleep"]["duration_REM_sleep_state_seconds"] == 0.0
    assert "scores" not in nap.data  # no sleep_performance_percentage for naps


def test_pending_sleep_maps_times_only_and_is_superseded_when_scored() -> None:
    (pending,) = normalize(load("sleep.pending.json"), "sleep")
    scored = normalize(load("sleep.page.json"), "sleep")[0]
    assert pending.data == {"metadata": scored.data["metadata"]}
    assert natural_key("sleep", pending.data) == natural_key("sleep", scored.data) == SLEEP_ID
    assert pending.version_ms < scored.version_ms


def test_unscorable_sleep_ignores_any_score() -> None:
    doc = dict(load("sleep.page.json")["records"][0], score_state="UNSCORABLE")
    (fragment,) = normalize(doc, "sleep")
    assert set(fragment.data) == {"metadata"}


def test_recovery_completes_its_sleep() -> None:
    (fragment,) = normalize({"records": [recovery_with_sleep()]}, "recovery")
    scored_sleep = normalize(load("sleep.page.json"), "sleep")[0]
    assert fragment.type == "sleep"
    assert natural_key("sleep", fragment.data) == SLEEP_ID
    assert fragment.version_ms == 1710137721009  # the recovery's updated_at, newer than the sleep's
    assert fragment.data["readiness_data"] == {"readiness": 67}
    assert fragment.data["heart_rate_data"] == {"summary": {"resting_hr_bpm": 51.0, "avg_hrv_rmssd": 58.403}}
    assert fragment.data["respiration_data"] == {
        "breaths_data": scored_sleep.data["respiration_data"]["breaths_data"],
        "oxygen_saturation_data": {"start_time": "2024-03-10T23:12:00.000000+01:00",
                                   "end_time": "2024-03-11T06:58:00.000000+01:00",
                                   "avg_saturation_percentage": 95.6875},
    }
    assert fragment.data["metadata"] == scored_sleep.data["metadata"]
    assert fragment.data["sleep_durations_data"] == scored_sleep.data["sleep_durations_data"]


def test_pending_recovery_carries_only_its_sleep() -> None:
    doc = dict(recovery_with_sleep(), score_state="PENDING_SCORE")
    del doc["score"]
    (fragment,) = normalize(doc, "recovery")
    assert "readiness_data" not in fragment.data
    assert fragment.data["metadata"]["summary_id"] == SLEEP_ID


def test_recovery_without_its_sleep_cannot_make_a_valid_sleep_record() -> None:
    with pytest.raises(MappingError, match="has no 'sleep' document"):
        normalize(load("recovery.bad_no_sleep.json"), "recovery")
    other_sleep = dict(recovery_with_sleep(), sleep=load("sleep.page.json")["records"][1])
    with pytest.raises(MappingError, match="is not this recovery's sleep"):
        normalize(other_sleep, "recovery")


def test_scored_workout() -> None:
    running, hike = normalize(load("workout.page.json"), "workout")
    assert running.type == "activity"
    assert running.version_ms == 1710177879768
    assert running.data == {
        "metadata": {
            "summary_id": "ecfc6a15-4661-442f-a9a4-f160dd7afae8",
            "start_time": "2024-03-11T17:30:00.000000+01:00",
            "end_time": "2024-03-11T18:18:42.000000+01:00",
            "type": 8,  # RUNNING
            "upload_type": 1,
            "name": "running",
            "timestamp_localization": 1,
        },
        "calories_data": {"total_burned_calories": 576},  # 2410.7 kJ / 4.184 = 576.2 kcal
        "energy_data": {"energy_kilojoules": 2410.7},
        "strain_data": {"strain_level": 11.2847},
        "heart_rate_data": {"summary": {
            "avg_hr_bpm": 152,
            "max_hr_bpm": 181,
            "hr_zone_data": [
                {"zone": 0, "duration_seconds": 31.0},
                {"zone": 1, "duration_seconds": 182.0},
                {"zone": 2, "duration_seconds": 604.0},
                {"zone": 3, "duration_seconds": 1108.0},
                {"zone": 4, "duration_seconds": 889.0},
                {"zone": 5, "duration_seconds": 108.0},
            ],
        }},
        "distance_data": {"summary": {"distance_meters": 8124, "elevation": {"gain_actual_meters": 46.2}}},
    }
    zones = running.data["heart_rate_data"]["summary"]["hr_zone_data"]
    assert sum(z["duration_seconds"] for z in zones) == 2922.0  # the workout's 48 min 42 s
    # pending: times and sport only; hyphenated slug resolved
    assert hike.data["metadata"]["type"] == 35  # HIKING
    assert set(hike.data) == {"metadata"}


def test_legacy_workout_zone_duration_and_unknown_sport() -> None:
    (fragment,) = normalize(load("workout.legacy.json"), "workout")
    assert fragment.provider_user_id == "10129"
    metadata = fragment.data["metadata"]
    assert metadata["summary_id"] == "1043"
    assert metadata["type"] == 108  # unknown sport → OTHER
    assert metadata["start_time"] == "2022-04-23T21:25:44.774000-05:00"  # previous local day in -05:00
    zones = fragment.data["heart_rate_data"]["summary"]["hr_zone_data"]
    assert [z["zone"] for z in zones] == [0, 1, 2, 3, 4, 5]  # zone 0 and empty zones kept
    assert zones[2]["duration_seconds"] == 1251.83
    assert zones[4]["duration_seconds"] == 0.0
    assert fragment.data["calories_data"] == {"total_burned_calories": 375}


def test_v1_workout_sport_id_maps_through_whoop_sport_list() -> None:
    """A v1 workout (api-evangelist/whoop example, the docs' shape) names its sport only by ``sport_id``: 1 Cycling."""
    (fragment,) = normalize(load("workout.v1-sport-id.json"), "workout")
    metadata = fragment.data["metadata"]
    assert (metadata["type"], metadata["name"]) == (1, "Cycling")  # Terra BIKING
    assert metadata["summary_id"] == "1043"
    record = load("workout.v1-sport-id.json")["records"][0]
    for sport_id, terra_type, name in [(0, 8, "Running"), (52, 35, "Hiking/Rucking"), (35, 8, "Track & Field"),
                                       (96, 114, "HIIT"), (-1, 108, "Activity"), (71, 108, "Other"),
                                       (74, 108, "Operations - Tactical"), (9999, 108, None)]:
        (mapped,) = normalize(dict(record, sport_id=sport_id), "workout")
        assert (mapped.data["metadata"]["type"], mapped.data["metadata"].get("name")) == (terra_type, name), sport_id
    (named,) = normalize(dict(record, sport_name="running", sport_id=1), "workout")  # v2 sport_name wins
    assert (named.data["metadata"]["type"], named.data["metadata"]["name"]) == (8, "running")


@pytest.mark.parametrize(("case", "reason"), [
    ("bad_offset", "timezone_offset"),
    ("unknown_score_state", "unknown score_state 'ARCHIVED'"),
    ("end_before_start", "is before start"),
])
def test_unmappable_records_raise_mapping_error(case: str, reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        normalize(load("sleep.bad.json")[case], "sleep")


def test_missing_fields_raise_mapping_error() -> None:
    cycle = load("cycle.page.json")["records"][0]
    with pytest.raises(MappingError, match="missing required field"):
        normalize({k: v for k, v in cycle.items() if k != "start"}, "cycle")
    with pytest.raises(MappingError, match="timezone_offset"):
        normalize({k: v for k, v in cycle.items() if k != "timezone_offset"}, "cycle")
    sleep = load("sleep.page.json")["records"][0]
    with pytest.raises(MappingError, match=r"missing required field.*end"):
        normalize({k: v for k, v in sleep.items() if k != "end"}, "sleep")
    with pytest.raises(MappingError, match="no user id"):
        normalize({k: v for k, v in sleep.items() if k != "user_id"}, "sleep")


# ----------------------------------------------------------------------------------------------------------------------
# deletions, zeros, accepted forms
# ----------------------------------------------------------------------------------------------------------------------
def test_deletion_webhooks_become_deletions_keyed_like_the_records() -> None:
    (sleep_gone,) = normalize(load("deleted.sleep.json"), "deleted")
    (nap,) = [f for f in normalize(load("sleep.page.json"), "sleep") if f.data["metadata"]["is_nap"]]
    assert sleep_gone == Deletion("sleep", natural_key("sleep", nap.data), "245199")
    (workout_gone,) = normalize(load("deleted.workout.json"), "deleted")
    running = normalize(load("workout.page.json"), "workout")[0]
    assert workout_gone == Deletion("activity", natural_key("activity", running.data), "245199")


@pytest.mark.parametrize(("case", "reason"), [
    ("v1_integer_id", "v1 integer id"),
    ("recovery_deleted_is_partial", "not a deletion of a record"),
    ("update_not_deletion", "not a deletion of a record"),
    ("no_id", "missing required field"),
])
def test_deletion_webhooks_that_name_no_record_key_are_refused(case: str, reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        normalize(load("deleted.bad.json")["cases"][case], "deleted")


def test_zero_rates_mean_not_measured() -> None:
    """A WHOOP 3.0 strap sends no SpO2 and zeros where it measured nothing: zero rates are absent, zero work is not."""
    recovery = recovery_with_sleep()
    recovery["score"] = {**recovery["score"], "spo2_percentage": 0.0, "resting_heart_rate": 0.0, "hrv_rmssd_milli": 0}
    (fragment,) = normalize(recovery, "recovery")
    assert fragment.data["readiness_data"] == {"readiness": 67}
    assert "oxygen_saturation_data" not in fragment.data["respiration_data"]
    assert "summary" not in fragment.data.get("heart_rate_data", {})
    workout = load("workout.page.json")["records"][0]
    workout["score"] = {**workout["score"], "distance_meter": 0.0, "altitude_gain_meter": 0.0, "average_heart_rate": 0}
    (indoor,) = normalize(workout, "workout")
    assert "distance_data" not in indoor.data
    assert "avg_hr_bpm" not in indoor.data["heart_rate_data"]["summary"]
    assert indoor.data["strain_data"] == {"strain_level": 11.2847}
    cycle = load("cycle.page.json")["records"][0]
    cycle["score"] = {**cycle["score"], "strain": 0.0, "average_heart_rate": 0, "max_heart_rate": 0}
    (rest_day,) = normalize(cycle, "cycle")
    assert rest_day.data["strain_data"] == {"strain_level": 0.0} and "heart_rate_data" not in rest_day.data


def test_single_records_and_pages_map_alike() -> None:
    for kind, single, page in (("sleep", "sleep.single.json", "sleep.page.json"),
                               ("workout", "workout.single.json", "workout.page.json"),
                               ("cycle", "cycle.single.json", "cycle.page.json"),
                               ("recovery", "recovery.single.json", "recovery.json")):
        assert normalize(load(single), kind) == normalize(load(page), kind)[:1], kind
    (v1,) = normalize(load("sleep.v1.json"), "sleep")
    assert v1.data["metadata"]["summary_id"] == "93845123" and v1.provider_user_id == "10129"


def test_recovery_whose_sleep_was_deleted_is_refused_with_the_reason() -> None:
    with pytest.raises(MappingError, match="answered 404: the sleep was deleted at WHOOP"):
        normalize(load("recovery.bad_sleep_deleted.json"), "recovery")


# ----------------------------------------------------------------------------------------------------------------------
# the poll hook attaching each recovery's sleep
# ----------------------------------------------------------------------------------------------------------------------
class Refused(PermanentError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def hook_request(kind: str, answers: dict[str, Any], asked: list[str]) -> Request:
    """A poll request of the connection ``hf-1``; ``fetch`` answers from ``answers`` (404 for other paths)."""
    def fetch(path: str, params: Any = None, method: str = "GET") -> Any:
        asked.append(path)
        if path not in answers:
            raise Refused(f"whoop GET {path}: HTTP 404", 404)
        return answers[path]

    connection = type("Connection", (), {"user_id": "hf-1", "provider_user_id": "245199", "provider": "whoop"})()
    return Request("whoop", kind, None, None, None, connection, fetch)


def test_hook_attaches_sleeps_seen_in_sleep_pages_and_fetches_others_once() -> None:
    hook, asked = WhoopPollHook(), []
    sleeps = load("sleep.page.json")
    other = dict(sleeps["records"][0], id="0b1d3f5a-7c9e-4b2d-8f0a-2c4e6a8b0d13")
    # the sleeps not seen are listed by window (one request for the page); what that misses is asked by id
    answers = {"/v2/activity/sleep": {"records": [other], "next_token": None}}
    assert hook.payloads(hook_request("sleep", answers, asked), sleeps) == [sleeps]
    recovery = load("recovery.bad_no_sleep.json")["records"][0]
    page = {"records": [recovery, dict(recovery, sleep_id=other["id"], cycle_id=1),
                        dict(recovery, sleep_id=other["id"], cycle_id=2),
                        dict(recovery, sleep_id="9d7b5f3a-1e2c-4a6b-8d0f-4a6c8e0b2d24")], "next_token": "abc"}
    (published,) = hook.payloads(hook_request("recovery", answers, asked), page)
    assert asked == ["/v2/activity/sleep", "/v2/activity/sleep/9d7b5f3a-1e2c-4a6b-8d0f-4a6c8e0b2d24"]
    assert published["next_token"] == "abc"
    first, second, third, gone = published["records"]
    assert first["sleep"] == sleeps["records"][0] and second["sleep"] == third["sleep"] == other
    assert "sleep" not in gone and gone["_sleep_missing"].endswith("answered 404: the sleep was deleted at WHOOP")
    assert page["records"][0] == recovery and "sleep" not in recovery  # the page is not modified
    assert [f.data["metadata"]["summary_id"] for f in normalize({"records": [first, second]}, "recovery")] == [
        SLEEP_ID, other["id"]]


def test_hook_turns_a_sleep_fetched_by_id_into_its_recovery() -> None:
    """A recovery.updated notification names the sleep's UUID: the recovery is its cycle's, with the sleep."""
    hook, asked = WhoopPollHook(), []
    sleep = load("sleep.single.json")
    recovery = load("recovery.bad_no_sleep.json")["records"][0]
    answers = {"/v2/cycle/1236731435/recovery": recovery}
    (published,) = hook.payloads(hook_request("recovery", answers, asked), sleep)
    assert asked == ["/v2/cycle/1236731435/recovery"] and published == dict(recovery, sleep=sleep)
    # a cycle without a recovery (a nap's notification after its cycle's recovery was deleted): nothing to publish
    assert hook.payloads(hook_request("recovery", {}, []), sleep) == []


def test_hook_forgets_expired_sleeps_and_keeps_them_over_two_poll_intervals(monkeypatch) -> None:
    from connectors.providers.whoop import client

    now = [1000.0]
    monkeypatch.setattr(client.time, "monotonic", lambda: now[0])
    hook, asked = WhoopPollHook(), []
    assert hook.sleep_ttl_s >= 2 * 900 * 1.1  # the scheduler polls each kind every 900 s ± 10 %, independently
    sleeps = load("sleep.page.json")
    hook.payloads(hook_request("sleep", {}, asked), sleeps)
    assert hook.cached() == len(sleeps["records"])
    now[0] += 2 * 990  # two late poll intervals later, the recovery page still finds its sleep
    recovery = load("recovery.bad_no_sleep.json")["records"][0]
    (published,) = hook.payloads(hook_request("recovery", {}, asked), {"records": [recovery]})
    assert asked == [] and published["records"][0]["sleep"] == sleeps["records"][0]
    now[0] += hook.sleep_ttl_s  # expired: pruned on the next page any user's sleeps arrive with
    other = dict(sleeps["records"][0], id="0b1d3f5a-7c9e-4b2d-8f0a-2c4e6a8b0d13")
    connection = type("Connection", (), {"user_id": "hf-2", "provider_user_id": "9", "provider": "whoop"})()
    hook.payloads(Request("whoop", "sleep", None, None, None, connection, None), {"records": [other]})
    assert hook.cached() == 1


def test_hook_attaches_the_cycles_recovery_to_a_sleep_fetched_by_id() -> None:
    """sleep.updated / recovery.deleted fetch the sleep by id: it comes with its cycle's recovery (or null: none left,
    or a nap's), and maps to the whole Sleep, replacing the stored one."""
    sleep = load("sleep.single.json")
    recovery = load("recovery.bad_no_sleep.json")["records"][0]
    hook, asked = WhoopPollHook(), []
    (published,) = hook.payloads(hook_request("sleep", {"/v2/cycle/1236731435/recovery": recovery}, asked), sleep)
    assert asked == ["/v2/cycle/1236731435/recovery"] and published == dict(sleep, _recovery=recovery)
    (whole,) = normalize(published, "sleep")
    assert whole.replaces and whole.version_ms is None and whole.data["readiness_data"] == {"readiness": 67}
    (gone,) = hook.payloads(hook_request("sleep", {}, []), sleep)  # 404: the recovery was deleted
    assert gone == dict(sleep, _recovery=None)
    (bare,) = normalize(gone, "sleep")
    assert bare.replaces and "readiness_data" not in bare.data and bare.data["metadata"]["summary_id"] == SLEEP_ID
    nap_of_cycle = dict(recovery, sleep_id="0b1d3f5a-7c9e-4b2d-8f0a-2c4e6a8b0d13")  # the cycle's recovery is another's
    (nap,) = hook.payloads(hook_request("sleep", {"/v2/cycle/1236731435/recovery": nap_of_cycle}, []), sleep)
    assert nap == dict(sleep, _recovery=None)
    # polled pages are published as they are, and map to mergeable fragments
    page = load("sleep.page.json")
    assert hook.payloads(Request("whoop", "sleep", None, datetime(2024, 3, 10, tzinfo=UTC),
                                 datetime(2024, 3, 12, tzinfo=UTC), hook_request("sleep", {}, []).connection,
                                 None), page) == [page]
    assert not any(f.replaces for f in normalize(page, "sleep"))


def test_two_cycles_of_one_day_never_mix_their_fields() -> None:
    """Two sleeps starting within one noon-to-noon span make two cycles of one day: the newer cycle is the Daily
    whole (a PENDING one keeps none of the scored one's strain), and the older one, redelivered, fills nothing in."""
    from transforms.normalize import Keyed, merge_user_events
    from transforms.record_state import state_row

    scored = json.loads((FIXTURES / "cycle.page.json").read_text())["records"][0]
    pending = {**scored, "id": scored["id"] + 1, "start": "2024-03-11T08:00:00.000Z", "end": None,  # 09:00 local
               "score_state": "PENDING_SCORE", "score": None, "updated_at": "2024-03-11T22:00:00.000Z"}
    fragments = [f for doc in (scored, pending) for f in get_provider("whoop").normalize(doc, "cycle", "u")]
    assert fragments[0].replaces and {f.data["metadata"]["start_time"] for f in fragments} == {
        fragments[0].data["metadata"]["start_time"]}
    keyed = [Keyed("daily", f.data["metadata"]["start_time"][:10], f.data, f.version_ms, f"{n:03d}",
                   {"user_id": "u", "provider": "WHOOP"}, "k", "whoop", replaces=f.replaces)
             for n, f in enumerate(fragments)]
    (day,) = merge_user_events("u", keyed)
    assert "strain_data" not in day.data and "calories_data" not in day.data
    for row in (json.loads(state_row(day)), day.data):  # as the state keeps it; as a row written before replaces
        stored = {("daily", day.natural_key): (row, day.ordering_timestamp_ms)}
        (again,) = merge_user_events("u", keyed[:1], stored)  # the scored cycle redelivered: older, fills nothing in
        assert (again.data, again.ordering_timestamp_ms) == (day.data, day.ordering_timestamp_ms)
