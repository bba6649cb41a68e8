"""Compatibility with Terra's official Python SDK (terra-python 1.1.0) as an external oracle.

Every event the pipeline produces from the simulator (Garmin, Oura and WHOOP) must validate with the SDK model
of its type and must use only keys that model declares. The SDK models accept any extra key
(``extra="allow"``), so validation alone proves little: ``undeclared_keys`` walks ``model_fields``
recursively, by wire name (Fern ``FieldMetadata`` aliases such as ``MET_data`` / ``TSS_data``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from terra.types.athlete_event import AthleteEvent
from terra.types.daily import Daily
from terra.types.sleep_event import SleepEvent
from terra_oracle import SDK_EVENTS, SDK_MODELS, extras, sdk_parse, undeclared_keys

from core.events import NormalizedEvent
from core.raw import RawMessage
from pipelines.demo_data import Simulator
from schemas import DATA_MODEL_VERSION, MODEL_TYPES
from schemas.serde import encode_raw
from transforms.normalize import normalize_in_memory


# ----------------------------------------------------------------------------------------------------------------------
# the events under test
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def events() -> list[NormalizedEvent]:
    """Every normalized event of a 30-user, 3-day simulation, after the per-user merge."""
    messages = (RawMessage(encode_raw(payload), {"partition": 0, "offset": offset})
                for offset, payload in enumerate(Simulator(users=30, days=3).payloads()))
    return normalize_in_memory(messages)[0]


def test_the_simulation_covers_every_provider_and_model_it_emits(events: list[NormalizedEvent]) -> None:
    kinds = Counter((e.provider, e.type) for e in events)
    assert set(kinds) == {
        ("GARMIN", "daily"), ("GARMIN", "sleep"), ("GARMIN", "activity"), ("GARMIN", "body"),
        ("GARMIN", "menstruation"), ("OURA", "daily"), ("OURA", "sleep"), ("OURA", "activity"),
        ("WHOOP", "daily"), ("WHOOP", "sleep"), ("WHOOP", "activity")}
    assert kinds[("GARMIN", "sleep")] == kinds[("OURA", "sleep")] == kinds[("WHOOP", "sleep")] == 30
    assert {e.type for e in events} <= set(MODEL_TYPES)


def test_every_record_validates_with_its_sdk_model(events: list[NormalizedEvent]) -> None:
    leftovers = []
    for event in events:
        parsed = sdk_parse(SDK_MODELS[event.type], event.data)
        leftovers += extras(parsed, f"{event.provider}.{event.type}")
    assert leftovers == []


def test_every_record_uses_only_keys_the_sdk_declares(events: list[NormalizedEvent]) -> None:
    problems = Counter()
    for event in events:
        problems.update(undeclared_keys(event.data, SDK_MODELS[event.type], f"{event.provider}.{event.type}"))
    assert dict(problems) == {}
    met = [e for e in events if "MET_data" in e.data]
    assert met, "the simulation should exercise the MET_data alias"
    assert all(sdk_parse(Daily, e.data).met_data.met_samples for e in met if e.type == "daily")


def test_every_webhook_envelope_validates_with_the_sdk_event_model(events: list[NormalizedEvent]) -> None:
    problems = []
    for event in events:
        envelope = event.envelope()
        assert json.loads(event.body()) == envelope
        model = SDK_EVENTS[event.type]
        parsed = sdk_parse(model, envelope)
        assert parsed.type == event.type
        assert parsed.version == DATA_MODEL_VERSION
        assert parsed.user.user_id == event.user_id and parsed.user.provider == event.provider
        assert len(parsed.data) == 1
        problems += undeclared_keys(envelope, model, event.type)
        problems += extras(parsed, event.type)
    assert problems == []


def test_athlete_envelope_carries_the_profile_under_athlete() -> None:
    event = NormalizedEvent.create(type="athlete", user={"user_id": "u-1", "provider": "GARMIN"},
                                   data={"first_name": "Ana", "age": 34, "country": "CO"}, natural_key="profile",
                                   ordering_timestamp_ms=1, sequence="0")
    envelope = event.envelope()
    parsed = sdk_parse(AthleteEvent, envelope)
    assert parsed.athlete.first_name == "Ana" and parsed.athlete.age == 34
    assert undeclared_keys(envelope, AthleteEvent, "athlete") == []


def test_strict_check_rejects_what_plain_sdk_validation_accepts() -> None:
    wrong = {
        "metadata": {"start_time": "2024-03-11T00:00:00.000000+01:00", "end_time": "2024-03-12T00:00:00.000000+01:00",
                     "upload_type": 1, "timezone": "Europe/Paris"},
        "met_data": {"avg_level": 1.4},  # the Python attribute name, not Terra's wire name MET_data
        "MET_data": {"MET_samples": [{"timestamp": "2024-03-11T08:00:00.000000+01:00", "level": 2.1},
                                     {"timestamp": "2024-03-11T08:15:00.000000+01:00", "level": 3.4, "intensity": 4}]},
        "heart_rate_data": {"summary": {"avg_hr": 61}},
        "distance_data": {"steps": 100, "distance": 80.0},
        "steps": 11842,
    }
    Daily.model_validate(wrong)  # accepted: the SDK models allow extra keys
    assert undeclared_keys(wrong, Daily, "daily") == [
        "daily.metadata.timezone",
        "daily.met_data",
        "daily.MET_data.MET_samples[1].intensity",
        "daily.heart_rate_data.summary.avg_hr",
        "daily.distance_data.distance",
        "daily.steps",
    ]
    assert undeclared_keys({"distance_data": {"floors_climbed": {"count": 3}}}, Daily, "daily") == [
        "daily.distance_data.floors_climbed: an object where the SDK declares typing.Optional[int]"]
    assert undeclared_keys({k: v for k, v in wrong.items() if k == "MET_data"}, Daily, "daily") == [
        "daily.MET_data.MET_samples[1].intensity"]
    envelope = {"type": "sleep", "version": DATA_MODEL_VERSION, "user": {"user_id": "u", "provider": "OURA",
                                                                         "userId": "u"},
                "data": [{"metadata": {"start_time": "a", "end_time": "b", "upload_type": 2},
                          "sleep_durations_data": {"hypnogram": []}}]}
    SleepEvent.model_validate(envelope)
    assert undeclared_keys(envelope, SleepEvent, "sleep") == [
        "sleep.user.userId", "sleep.data[0].sleep_durations_data.hypnogram"]


def test_enum_fields_are_integers(events: list[NormalizedEvent]) -> None:
    """Terra's enums are integers on the wire; the SDK types them as float, so validation cannot tell."""
    enum_paths = {  # path → allowed values
        ("metadata", "type"): range(0, 155),
        ("metadata", "upload_type"): range(0, 7),
        ("metadata", "timestamp_localization"): range(0, 2),
        ("sleep_durations_data", "hypnogram_samples", "*", "level"): range(0, 7),
        ("active_durations_data", "activity_levels_samples", "*", "level"): range(0, 6),
        ("stress_data", "stress_rating"): range(0, 5),
        ("heart_rate_data", "detailed", "hr_samples", "*", "context"): range(0, 3),
        ("respiration_data", "oxygen_saturation_data", "samples", "*", "type"): range(0, 2),
        ("oxygen_data", "saturation_samples", "*", "type"): range(0, 2),
        ("menstruation_data", "current_phase"): range(0, 10),
    }
    seen: Counter[tuple[str, ...]] = Counter()
    wrong = []
    for event in events:
        for path, allowed in enum_paths.items():
            for value in values_at(event.data, path):
                seen[path] += 1
                if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
                    wrong.append((event.provider, event.type, path, value))
                if path[-1] == "upload_type" and event.type == "sleep" and value not in range(0, 5):
                    wrong.append((event.provider, event.type, path, value))  # SleepUploadType
    assert wrong == []
    for path in [("metadata", "type"), ("metadata", "upload_type"), ("metadata", "timestamp_localization"),
                 ("sleep_durations_data", "hypnogram_samples", "*", "level"),
                 ("active_durations_data", "activity_levels_samples", "*", "level"),
                 ("menstruation_data", "current_phase")]:
        assert seen[path] > 0, path


def values_at(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if not path:
        yield value
    elif path[0] == "*":
        for item in value if isinstance(value, list) else []:
            yield from values_at(item, path[1:])
    elif isinstance(value, dict) and path[0] in value:
        yield from values_at(value[path[0]], path[1:])
