"""How versions and fragments of one record combine (transforms.normalize)."""

from __future__ import annotations

import json

from core.raw import RawMessage, RawPayload
from schemas.serde import encode_raw
from transforms.normalize import Failed, Keyed, deep_merge, merge_user_events, normalize_message


def _sample(ts: str, level: int) -> dict:
    return {"timestamp": ts, "level": level}


def test_a_newer_sample_list_replaces_the_span_it_covers_and_keeps_the_rest():
    tentative = [_sample("2026-11-01T23:00:00.000000+01:00", 4), _sample("2026-11-01T23:10:00.000000+01:00", 5),
                 _sample("2026-11-02T06:00:00.000000+01:00", 1)]
    final = [_sample("2026-11-01T23:00:00.000000+01:00", 4), _sample("2026-11-01T23:20:00.000000+01:00", 5),
             _sample("2026-11-02T06:00:00.000000+01:00", 1)]
    merged = deep_merge({"hypnogram_samples": tentative}, {"hypnogram_samples": final})["hypnogram_samples"]
    assert merged == final  # the stale 23:10 sample is gone
    epoch = [_sample("2026-11-02T09:00:00.000000+01:00", 3)]
    assert deep_merge({"s": final}, {"s": epoch})["s"] == [*final, *epoch]  # outside the span: kept


def test_samples_compare_by_instant_across_offsets():
    local = [_sample("2026-11-02T01:00:00.000000+01:00", 1)]
    utc = [_sample("2026-11-02T00:00:00.000000+00:00", 2)]  # the same instant
    assert deep_merge({"s": local}, {"s": utc})["s"] == utc


def _keyed(data: dict, version: int, sequence: str) -> Keyed:
    return Keyed("daily", "2026-11-02", data, version, sequence, {"user_id": "u", "provider": "OURA"}, "k")


def test_a_local_day_window_is_not_replaced_by_the_same_day_in_utc():
    local = {"metadata": {"start_time": "2026-11-02T00:00:00.000000-05:00", "end_time":
                          "2026-11-03T00:00:00.000000-05:00", "upload_type": 1, "timestamp_localization": 1},
             "distance_data": {"steps": 100}}
    utc = {"metadata": {"start_time": "2026-11-02T00:00:00.000000+00:00", "end_time":
                        "2026-11-03T00:00:00.000000+00:00", "upload_type": 1, "timestamp_localization": 0},
           "heart_rate_data": {"detailed": {"hr_samples": [{"timestamp": "2026-11-02T12:00:00.000000+00:00",
                                                            "bpm": 61}]}}}
    (event,) = merge_user_events("u", [_keyed(local, 1, "1"), _keyed(utc, 2, "2")])
    assert event.data["metadata"]["start_time"] == "2026-11-02T00:00:00.000000-05:00"
    assert event.data["metadata"]["timestamp_localization"] == 1
    assert event.data["distance_data"]["steps"] == 100 and event.data["heart_rate_data"]["detailed"]["hr_samples"]


def test_a_stale_version_only_fills_gaps():
    newer = {"metadata": {"start_time": "2026-11-02T00:00:00.000000+00:00", "end_time": "x", "upload_type": 1},
             "distance_data": {"steps": 9000}}
    older = {"metadata": {"start_time": "2026-11-02T00:00:00.000000+00:00", "end_time": "x", "upload_type": 1},
             "distance_data": {"steps": 5000, "floors_climbed": 3}}
    stored = {("daily", "2026-11-02"): (newer, 2000)}
    (event,) = merge_user_events("u", [_keyed(older, 1000, "9")], stored)
    assert event.data["distance_data"] == {"steps": 9000, "floors_climbed": 3}
    # the filled-in record is richer than what destinations hold at 2000: it must not be taken for stale
    assert event.ordering_timestamp_ms == 2001


def test_stale_fragments_fold_oldest_first_under_the_stored_record():
    base = {"metadata": {"start_time": "2026-11-02T00:00:00.000000+00:00", "end_time": "x", "upload_type": 1}}
    stored = {("daily", "2026-11-02"): (base, 100)}
    v50 = dict(base, distance_data={"floors_climbed": 1})
    v60 = dict(base, distance_data={"floors_climbed": 2})
    (event,) = merge_user_events("u", [_keyed(v60, 60, "2"), _keyed(v50, 50, "1")], stored)
    assert event.data["distance_data"] == {"floors_climbed": 2}  # the newer of the two stale versions


def test_same_version_with_new_content_moves_the_ordering_timestamp():
    calories = {"metadata": {"start_time": "2026-11-02T00:00:00.000000+00:00", "end_time": "x", "upload_type": 1},
                "calories_data": {"total_burned_calories": 2000}}
    steps = dict(calories, distance_data={"steps": 10})
    (first,) = merge_user_events("u", [_keyed(calories, 100, "1")])
    (second,) = merge_user_events("u", [_keyed(steps, 100, "2")], {("daily", "2026-11-02"): (first.data, 100)})
    assert second.ordering_timestamp_ms > first.ordering_timestamp_ms


def test_raw_events_with_wrongly_typed_envelope_fields_are_dead_lettered():
    for line in (b'{"provider": null, "payload": {}}', b'{"provider": "oura", "kind": ["sleep"], "payload": {}}',
                 b'{"provider": "oura", "received_at": 1e999, "payload": {}}',
                 b'{"provider": "oura", "kind": "sleep", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        outcomes = list(normalize_message(RawMessage(line, {"path": "x", "line": 1}, encoding="json")))
        assert outcomes and all(isinstance(o, Failed) for o in outcomes), line[:60]


def test_non_finite_numbers_are_dead_lettered_not_passed_on():
    body = b'{"dailies": [{"userId": "u", "startTimeInSeconds": 1793574000, "steps": NaN}]}'
    (outcome,) = list(normalize_message(RawMessage(encode_raw(RawPayload("garmin", body)), {"partition": 0,
                                                                                          "offset": 1})))
    assert isinstance(outcome, Failed) and outcome.stage == "parse"
    assert "NaN" in outcome.record["error_message"] and outcome.record["original"].endswith(b"}")
    assert json.loads(RawPayload("garmin", body).payload.replace(b"NaN", b"1"))  # only the NaN was the problem


def test_samples_at_the_same_instant_merge_field_by_field():
    weight = [{"measurement_time": "2026-11-02T07:00:00.000000+01:00", "weight_kg": 71.2}]
    fat = [{"measurement_time": "2026-11-02T07:00:00.000000+01:00", "bodyfat_percentage": 18.5}]
    merged = deep_merge({"measurements": weight}, {"measurements": fat})["measurements"]
    assert merged == [{"measurement_time": "2026-11-02T07:00:00.000000+01:00", "weight_kg": 71.2,
                       "bodyfat_percentage": 18.5}]


def _reference_sample_merge(older, newer):
    """The sample-list rule as first written (quadratic when folded): the oracle for the linear merge."""
    from datetime import UTC, datetime

    def instant(text):
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    key = "timestamp" if "timestamp" in newer[0] else "measurement_time"
    span = [instant(item[key]) for item in newer]
    first, last = min(span), max(span)
    older_at = {instant(item[key]): item for item in older}
    merged_newer = [deep_merge(older_at[at], item) if at in older_at else item
                    for at, item in zip(span, newer, strict=True)]
    kept = [item for item in older if not first <= instant(item[key]) <= last]
    return sorted(kept + merged_newer, key=lambda item: instant(item[key]))


def test_sample_lists_merge_as_the_reference_rule_in_and_out_of_order():
    import random

    rng = random.Random(3)
    offsets = ["+00:00", "+02:00", "-05:30", ""]
    for _ in range(400):
        def samples(count, ordered):
            minutes = sorted(rng.sample(range(40), count)) if ordered else [rng.randrange(40) for _ in range(count)]
            return [{"timestamp": f"2026-11-02T{10 + m // 60:02d}:{m % 60:02d}:00{rng.choice(offsets)}",
                     "bpm": rng.randrange(50, 150), **({"extra": n} if rng.random() < 0.3 else {})}
                    for n, m in enumerate(minutes)]
        older = samples(rng.randrange(1, 15), rng.random() < 0.7)
        newer = samples(rng.randrange(1, 6), rng.random() < 0.7)
        assert deep_merge(older, newer) == _reference_sample_merge(older, newer)
        folded = reference = []
        for _ in range(5):
            part = samples(rng.randrange(1, 6), True)
            folded = deep_merge(folded, part) if folded else part
            reference = _reference_sample_merge(reference, part) if reference else part
        assert folded == reference

