"""How versions and fragments of one record combine (transforms.normalize)."""

from __future__ import annotations

import dataclasses
import json

from connectors.base import IntervalSamples
from core.raw import RawMessage, RawPayload
from schemas.serde import encode_raw
from transforms.interval_samples import PART, emitted
from transforms.normalize import Failed, Keyed, RecordMerge, deep_merge, merge_user_events, normalize_message


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



def test_folding_a_days_samples_parses_each_sample_time_once():
    """Merging is linear in the samples: a day's record folded from n one-sample fragments (Oura heart-rate rows)
    parses n sample times, not the whole accumulated list again for every fragment (n²/2)."""
    from transforms.interval_samples import sample_instant

    day = {"start_time": "2026-11-02T00:00:00.000000+00:00", "end_time": "2026-11-03T00:00:00.000000+00:00",
           "upload_type": 1, "timestamp_localization": 0}
    rows = [_keyed({"metadata": day, "heart_rate_data": {"detailed": {"hr_samples": [
        {"timestamp": f"2026-11-02T{n // 60:02d}:{n % 60:02d}:00.000000+00:00", "bpm": 60 + n % 7}]}}},
        1000 + n, f"{n:05d}") for n in range(600)]
    sample_instant.cache_clear()
    (event,) = merge_user_events("u", rows)
    assert len(event.data["heart_rate_data"]["detailed"]["hr_samples"]) == 600
    parsed = sample_instant.cache_info()
    assert parsed.hits + parsed.misses <= 2 * len(rows), parsed


def _reference_merge_user_events(fragments, stored=None):
    """The per-record fold as first written (a copy of the record for every fragment, a deep compare after each):
    the oracle for the in-place merge. Returns {(type, key): (canonical data bytes, ordering timestamp)}."""
    from datetime import UTC, datetime

    from core.events import canonical_json

    def instant(text):
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    def sample_list(items):
        return bool(items) and all(isinstance(i, dict) and (i.get("timestamp") or i.get("measurement_time"))
                                   for i in items)

    def merge(older, newer, rows=frozenset()):
        """``newer`` over ``older``; the samples of ``older`` whose ids are in ``rows`` stay wherever ``newer`` has
        no sample at their instant, even inside ``newer``'s span."""
        if isinstance(older, dict) and isinstance(newer, dict):
            merged = dict(older)
            for key, value in newer.items():
                if key not in older or not isinstance(value, dict | list):
                    merged[key] = value
                elif isinstance(value, list) and isinstance(older[key], list) and sample_list(older[key]) \
                        and sample_list(value):
                    merged[key] = _reference_sample_merge_with(merge, instant, older[key], value, rows)
                else:
                    merged[key] = merge(older[key], value, rows)
            return merged
        return newer

    def sample_lists(value):
        """Every sample list in ``value``."""
        for item in value.values():
            if isinstance(item, dict):
                yield from sample_lists(item)
            elif isinstance(item, list) and sample_list(item):
                yield item

    def row_samples(record):
        """A row's samples: every sample list of ``record`` holds one sample (none: not a row)."""
        found = list(sample_lists(record))
        return [items[0] for items in found] if found and all(len(items) == 1 for items in found) else []

    def has_offset(text):
        return bool(text) and len(text) > 26

    def day_aware(older, newer, rows=frozenset()):
        merged = merge(older, newer, rows)
        old_meta, new_meta = older.get("metadata") or {}, newer.get("metadata") or {}
        if old_meta.get("timestamp_localization") == 1 and has_offset(old_meta.get("start_time")) and (
                new_meta.get("timestamp_localization") != 1 or not has_offset(new_meta.get("start_time"))):
            for key in ("start_time", "end_time", "timestamp_localization"):
                if key in old_meta:
                    merged["metadata"][key] = old_meta[key]
        return merged

    groups = {}
    for fragment in fragments:
        groups.setdefault((fragment.type, fragment.natural_key), []).append(fragment)
    out = {}
    for group, versions in groups.items():
        versions = sorted(versions, key=lambda f: (f.version_ms, f.sequence))
        data, version = (stored or {}).get(group, ({}, 0))
        held = version
        stale = [f for f in versions if f.version_ms < version]
        stored_data = data
        if stale:  # no interval lists here: stored sample lists win for their span, except over stale rows
            older = {}
            for fragment in stale:
                older = day_aware(older, fragment.data)
            filled = day_aware(older, data, {id(sample) for f in stale for sample in row_samples(f.data)})
            if filled != data:
                data, version = filled, version + 1
        for fragment in versions[len(stale):]:
            data = day_aware(data, fragment.data)
            version = max(version, fragment.version_ms)
        if version == held and data != stored_data:  # new content at the version held: one past it
            version += 1
        out[group] = (canonical_json(data), version)
    return out


def _reference_sample_merge_with(merge, instant, older, newer, rows=frozenset()):
    key = "timestamp" if "timestamp" in newer[0] else "measurement_time"
    span = [instant(item[key]) for item in newer]
    first, last = min(span), max(span)
    older_at = {instant(item[key]): item for item in older}
    merged_newer = [merge(older_at[at], item) if at in older_at else item
                    for at, item in zip(span, newer, strict=True)]
    kept = [item for item in older if (instant(item[key]) not in span if id(item) in rows else
                                       not first <= instant(item[key]) <= last)]
    return sorted(kept + merged_newer, key=lambda item: instant(item[key]))


def test_the_in_place_merge_gives_what_copying_every_version_gave_and_changes_no_input():
    """Records, ordering timestamps and the bytes delivered are those of the fold that copied the record for every
    fragment and compared before and after (the oracle above), on random versions: local and UTC day windows,
    stale versions under a stored record, equal versions, samples at the same instant, out of order, 1 vs 1.0."""
    import copy
    import random

    from core.events import canonical_json

    rng = random.Random(9)
    windows = [("2026-11-02T00:00:00.000000-05:00", 1), ("2026-11-02T00:00:00.000000+00:00", 0),
               ("2026-11-02T00:00:00.000000", 1), ("2026-11-02T00:00:00.000000+01:00", 1)]

    def samples(name, count):
        minutes = [rng.randrange(30) for _ in range(count)]
        if rng.random() < 0.7:
            minutes.sort()
        return [{name: f"2026-11-02T10:{m:02d}:00{rng.choice(['+00:00', '+01:00', ''])}",
                 "bpm": rng.choice([60, 60.0, 61, 72.5]), **({"extra": {"n": m}} if rng.random() < 0.2 else {})}
                for m in minutes]

    def record():
        start, localization = rng.choice(windows)
        data = {"metadata": {"start_time": start, "end_time": start.replace("-02T", "-03T"),
                             "timestamp_localization": localization, **({"upload_type": 1} if rng.random() < 0.5
                                                                        else {})}}
        if rng.random() < 0.8:
            data["heart_rate_data"] = {"detailed": {"hr_samples": samples("timestamp", rng.randrange(1, 6))},
                                       **({"summary": {"avg_hr_bpm": rng.choice([60, 60.0])}} if rng.random() < 0.5
                                          else {})}
        if rng.random() < 0.3:
            data["measurements_data"] = {"measurements": samples("measurement_time", rng.randrange(1, 3))}
        if rng.random() < 0.3:
            data["distance_data"] = {"steps": rng.choice([100, 100.0, 200]), "detailed": {"floors": [1, 2]}}
        return data

    for _ in range(300):
        fragments = [Keyed("daily", rng.choice(["2026-11-02", "2026-11-03"]), record(), rng.choice([10, 20, 30]),
                           f"{n:03d}", {"user_id": "u", "provider": "OURA"}, "k") for n in range(rng.randrange(1, 9))]
        stored = {("daily", "2026-11-02"): (record(), rng.choice([0, 15, 25]))} if rng.random() < 0.5 else None
        before = copy.deepcopy((fragments, stored))
        expected = _reference_merge_user_events(fragments, stored)
        events = merge_user_events("u", fragments, stored)
        assert {(e.type, e.natural_key): (e.data_json, e.ordering_timestamp_ms) for e in events} == expected
        assert {(e.type, e.natural_key): canonical_json(e.data) for e in events} == {k: v[0] for k, v in
                                                                                      expected.items()}
        assert canonical_json([[f.data for f in fragments], stored and list(stored.values())]) == canonical_json(
            [[f.data for f in before[0]], before[1] and list(before[1].values())]), "an input changed"


def _part(ts: str, steps: int, part: str | None) -> dict:
    return {"timestamp": ts, "steps": steps, **({PART: part} if part is not None else {})}


def test_samples_of_different_parts_at_one_instant_stay_side_by_side_and_a_part_replaces_itself():
    at, later = "2026-11-02T08:00:00.000000+01:00", "2026-11-02T08:15:00.000000+01:00"
    day = {"s": [_part(at, 20, "SEDENTARY"), _part(at, 300, "WALKING"), _part(later, 500, "WALKING")]}
    updated = deep_merge(day, {"s": [_part(later, 650, "WALKING")]})["s"]
    assert updated == [_part(at, 20, "SEDENTARY"), _part(at, 300, "WALKING"), _part(later, 650, "WALKING")]
    beside = deep_merge(day, {"s": [_part(later, 40, "SEDENTARY")]})["s"]  # another part of the 08:15 slice
    assert beside == [*day["s"], _part(later, 40, "SEDENTARY")]
    again = deep_merge(day, {"s": [_part(at, 25, "SEDENTARY")]})["s"]  # the walk of 08:00 stays
    assert again == [_part(at, 300, "WALKING"), _part(at, 25, "SEDENTARY"), _part(later, 500, "WALKING")]
    # a list of one part is authoritative for its span and that part alone: the 08:00 walk goes, the rest stays
    span = deep_merge(day, {"s": [_part(at, 30, "SEDENTARY"), _part(later, 45, "SEDENTARY")]})["s"]
    assert span == [_part(at, 300, "WALKING"), _part(at, 30, "SEDENTARY"), _part(later, 500, "WALKING"),
                    _part(later, 45, "SEDENTARY")]
    walks = deep_merge(day, {"s": [_part(later, 700, "WALKING")]})["s"]
    assert walks == [_part(at, 20, "SEDENTARY"), _part(at, 300, "WALKING"), _part(later, 700, "WALKING")]


def test_a_part_that_changes_nothing_leaves_the_record_unchanged():
    at = "2026-11-02T08:00:00.000000+01:00"
    merge = RecordMerge()
    record = merge.record({"s": [_part(at, 20, "SEDENTARY"), _part(at, 300, "WALKING")]})
    assert not merge.fold(record, {"s": [_part(at, 20, "SEDENTARY")]})
    assert merge.fold(record, {"s": [_part(at, 21, "SEDENTARY")]})


def test_interval_amounts_become_running_totals_at_each_intervals_end_and_levels_the_highest_part():
    spec = IntervalSamples(900, amounts=("d.steps", "d.metres"), levels=("met",))
    record = {"d": {"steps": [_part("2026-11-02T08:15:00+01:00", 5, "A"), _part("2026-11-02T08:00:00+01:00", 4, "A"),
                              _part("2026-11-02T07:00:00Z", 3, "B")],  # the same instant: its first's offset
                    "metres": [{"timestamp": "2026-11-02T08:00:00", "distance_meters": 0.1},  # no offset: UTC
                               {"timestamp": "2026-11-02T08:00:00", "distance_meters": 0.2, PART: "B"}],
                    "other": [{"timestamp": "2026-11-02T08:00:00", "x": 1}]},
              "met": [{"timestamp": "2026-11-02T08:00:00+01:00", "level": 1.1, PART: "A"},
                      {"timestamp": "2026-11-02T08:00:00+01:00", "level": 3.5, PART: "B"},
                      {"timestamp": "2026-11-02T08:15:00+01:00", "level": 2.0, PART: "A"}]}
    before = json.dumps(record)
    out = emitted(record, spec)
    assert json.dumps(record) == before  # the merged record (the state's) does not change
    assert out["d"]["steps"] == [{"timestamp": "2026-11-02T08:15:00.000000+01:00", "steps": 7},
                                 {"timestamp": "2026-11-02T08:30:00.000000+01:00", "steps": 12}]
    assert out["d"]["metres"] == [{"timestamp": "2026-11-02T08:15:00.000000", "distance_meters": 0.3}]  # not 0.30…04
    assert out["d"]["other"] is record["d"]["other"]
    assert out["met"] == [{"timestamp": "2026-11-02T08:00:00+01:00", "level": 3.5},
                          {"timestamp": "2026-11-02T08:15:00+01:00", "level": 2.0}]
    assert emitted({"met": []}, spec) == {"met": []}


def test_a_part_replaces_a_sample_of_no_part_the_whole_interval_as_stored_before_parts():
    at = "2026-11-02T08:00:00.000000+01:00"
    stored = {"s": [_part(at, 980, None)]}  # a record state written before samples had parts
    assert deep_merge(stored, {"s": [_part(at, 980, "RUNNING")]})["s"] == [_part(at, 980, "RUNNING")]
    parted = {"s": [_part(at, 20, "SEDENTARY"), _part(at, 980, None)]}
    assert deep_merge(parted, {"s": [_part(at, 300, "WALKING")]})["s"] == [_part(at, 20, "SEDENTARY"),
                                                                           _part(at, 300, "WALKING")]
    assert deep_merge(parted, {"s": [_part(at, 5, None)]})["s"] == [_part(at, 5, None)]  # no part: the interval


def _hr(*stamps: str) -> dict:
    return {"heart_rate_data": {"detailed": {"hr_samples": [{"timestamp": s, "bpm": 60} for s in stamps]}}}


LOCAL_0311 = {"start_time": "2024-03-11T00:00:00.000000-05:00", "end_time": "2024-03-12T00:00:00.000000-05:00",
              "upload_type": 1, "timestamp_localization": 1}
UTC_0311 = {"start_time": "2024-03-11T00:00:00.000000+00:00", "end_time": "2024-03-12T00:00:00.000000+00:00",
            "upload_type": 1, "timestamp_localization": 0}


def test_a_utc_day_merged_into_a_local_day_brings_only_the_samples_of_that_local_day():
    # an Oura heart-rate row at 02:00Z on the 11th is 21:00 on the 10th at -05:00: not a sample of the local 11th
    stored = {("daily", "2026-11-02"): ({"metadata": LOCAL_0311, "distance_data": {"steps": 100}}, 5)}
    utc = {"metadata": UTC_0311, **_hr("2024-03-11T02:00:00.000000+00:00", "2024-03-11T12:00:00.000000+00:00")}
    dropped: list[tuple[str, int]] = []
    (event,) = merge_user_events("u", [_keyed(utc, 6, "1")], stored, on_dropped=lambda n, c: dropped.append((n, c)))
    assert event.data["metadata"] == LOCAL_0311
    assert event.data["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-11T12:00:00.000000+00:00", "bpm": 60}]
    assert dropped == [("samples_outside_window", 1)]


def test_a_local_day_replacing_a_utc_day_keeps_only_the_stored_samples_of_that_local_day():
    stored = {("daily", "2026-11-02"): ({"metadata": UTC_0311, **_hr("2024-03-11T02:00:00.000000+00:00",
                                                                      "2024-03-11T12:00:00.000000+00:00")}, 5)}
    local = {"metadata": LOCAL_0311, "distance_data": {"steps": 100}}
    (event,) = merge_user_events("u", [_keyed(local, 6, "1")], stored)
    assert event.data["metadata"] == LOCAL_0311 and event.data["distance_data"] == {"steps": 100}
    assert event.data["heart_rate_data"]["detailed"]["hr_samples"] == [
        {"timestamp": "2024-03-11T12:00:00.000000+00:00", "bpm": 60}]


def test_a_utc_row_outside_the_local_day_leaves_the_days_samples_as_they_were():
    # Oura sends one heart-rate row per document: a row of the UTC 11th at 02:00Z is the local 10th, and brings
    # nothing to the local 11th (its emptied sample list must not replace the day's samples)
    local = {"metadata": LOCAL_0311, **_hr("2024-03-11T10:00:00.000000-05:00")}
    row = {"metadata": UTC_0311, **_hr("2024-03-11T02:00:00.000000+00:00")}
    dropped: list[tuple[str, int]] = []
    for stored, fragments in (({("daily", "2026-11-02"): (local, 5)}, [_keyed(row, 6, "1")]),
                              (None, [_keyed(local, 5, "1"), _keyed(row, 5, "2")])):
        (event,) = merge_user_events("u", fragments, stored, on_dropped=lambda n, c: dropped.append((n, c)))
        assert event.data == local
        assert event.ordering_timestamp_ms == fragments[-1].version_ms  # the row changed nothing at its version
    assert dropped == [("samples_outside_window", 1)] * 2


def test_a_local_day_replacing_a_utc_day_leaves_no_empty_list_of_the_samples_outside_it():
    stored = {("daily", "2026-11-02"): ({"metadata": UTC_0311, **_hr("2024-03-11T02:00:00.000000+00:00")}, 5)}
    local = {"metadata": LOCAL_0311, "distance_data": {"steps": 100}}
    (event,) = merge_user_events("u", [_keyed(local, 6, "1")], stored)
    assert event.data == local


def test_a_replacing_fragment_newer_than_the_stored_record_clears_what_it_lacks_an_older_one_only_fills_gaps():
    stored = {("daily", "2026-11-02"): ({"metadata": LOCAL_0311, "scores": {"recovery": 67}, "strain_data": {
        "strain_level": 5.0}}, 5)}
    whole = dataclasses.replace(_keyed({"metadata": LOCAL_0311, "strain_data": {"strain_level": 6.0}}, 6, "1"),
                                replaces=True)
    (event,) = merge_user_events("u", [whole], stored)
    assert event.data == {"metadata": LOCAL_0311, "strain_data": {"strain_level": 6.0}}
    assert event.ordering_timestamp_ms == 6
    (stale,) = merge_user_events("u", [dataclasses.replace(whole, version_ms=4)], stored)
    assert stale.data == stored[("daily", "2026-11-02")][0]  # older: nothing it lacks is cleared, nothing newer lost


def _stored_after(records: list) -> dict:
    """The record state a merge leaves: {(type, key): (stored row, version)}, as ``MergePerUser`` saves it."""
    from transforms.record_state import state_row

    return {(e.type, e.natural_key): (json.loads(state_row(e, r)), e.ordering_timestamp_ms) for e, r in records}


def _daily_steps(*samples: dict) -> dict:
    return {"metadata": {"start_time": "2024-01-01T00:00:00.000000+01:00", "end_time":
                         "2024-01-02T00:00:00.000000+01:00", "timestamp_localization": 1},
            "distance_data": {"detailed": {"step_samples": list(samples)}}}


def _steps_at(hm: str, steps: int, part: str | None = None) -> dict:
    return _part(f"2024-01-01T{hm}:00.000000+01:00", steps, part)


def test_a_late_interval_inside_the_stored_span_fills_its_gap_and_the_stored_samples_win():
    """Google Health steps (no parts) and Garmin epochs (parts): a stale fragment adds the interval the stored record
    lacks, even between stored intervals; at a stored (instant, part) the stored sample stays."""
    from transforms.normalize import merge_user_records

    def keyed(data: dict, version: int, sequence: str, provider: str) -> Keyed:
        return Keyed("daily", "2024-01-01", data, version, sequence, {"user_id": "u", "provider": "X"}, "k",
                     provider)

    for provider, part in (("google_health", None), ("garmin", "WALKING")):
        stored = _stored_after(merge_user_records("u", [
            keyed(_daily_steps(_steps_at("10:00", 100, part)), 30, "a", provider),
            keyed(_daily_steps(_steps_at("10:30", 300, part)), 31, "b", provider)]))
        late = keyed(_daily_steps(_steps_at("10:15", 200, part), _steps_at("10:30", 999, part)), 20, "c", provider)
        [(event, record)] = merge_user_records("u", [late], stored)
        assert (record or event.data)["distance_data"]["detailed"]["step_samples"] == [
            _steps_at("10:00", 100, part), _steps_at("10:15", 200, part), _steps_at("10:30", 300, part)], provider
        ends = ("10:15", "10:30", "10:45") if part else ("10:00", "10:15", "10:30")  # Google Health's: as mapped
        assert event.data["distance_data"]["detailed"]["step_samples"] == [  # running totals at each interval's end
            {"timestamp": f"2024-01-01T{end}:00.000000+01:00", "steps": total} for end, total in zip(
                ends, (100, 300, 600), strict=True)]
        assert event.ordering_timestamp_ms == 32  # richer than what destinations hold at 31
        [(again, _)] = merge_user_records("u", [late], _stored_after([(event, record)]))
        assert again.event_id == event.event_id and again.ordering_timestamp_ms == 32  # redelivered: nothing new


def test_a_stale_part_of_a_stored_interval_is_a_gap_a_sample_of_no_part_covers_the_whole_interval():
    merge = RecordMerge()
    filled = merge.record({"s": [_steps_at("10:00", 40, "SEDENTARY"), _steps_at("10:15", 7, None)]})
    merge.fill(filled, {"s": [_steps_at("10:00", 300, "WALKING"), _steps_at("10:15", 9, None),
                              _steps_at("10:30", 5, "WALKING")]}, intervals={"s"})
    assert filled["s"] == [_steps_at("10:00", 40, "SEDENTARY"), _steps_at("10:00", 300, "WALKING"),
                           _steps_at("10:15", 9, None), _steps_at("10:30", 5, "WALKING")]
    merge = RecordMerge()
    filled = merge.record({"s": [_steps_at("10:00", 40, "SEDENTARY")]})
    merge.fill(filled, {"s": [_steps_at("10:00", 300, None)]}, intervals={"s"})  # stored before parts: the interval
    assert filled["s"] == [_steps_at("10:00", 300, None)]


def _sleep(version: int, sequence: str, replaces: bool = False, **fields: dict) -> Keyed:
    metadata = {"summary_id": "s1", "start_time": "2024-01-01T23:00:00.000000+00:00",
                "end_time": "2024-01-02T07:00:00.000000+00:00"}
    return Keyed("sleep", "s1", {"metadata": metadata, **fields}, version, sequence,
                 {"user_id": "u", "provider": "WHOOP"}, "k", "whoop", replaces=replaces)


def test_what_a_replacing_fragment_cleared_stays_gone_when_older_data_is_redelivered():
    """WHOOP: recovery.deleted fetches the sleep by id (replaces, version = its arrival); the old recovery's
    redelivery (at least once) is older than the replace and must not bring the recovery fields back."""
    from transforms.normalize import merge_user_records

    recovery = {"heart_rate_data": {"summary": {"resting_hr_bpm": 50}}}
    stored = _stored_after(merge_user_records("u", [_sleep(100, "a", scores={"sleep_score": 80}),
                                                    _sleep(200, "b", **recovery)]))
    stored = _stored_after(merge_user_records("u", [_sleep(1000, "c", True, scores={"sleep_score": 80})], stored))
    [(event, _)] = merge_user_records("u", [_sleep(200, "d", **recovery)], stored)
    assert "heart_rate_data" not in event.data and event.ordering_timestamp_ms == 1000
    later = _stored_after([(event, None)])
    [(newer, _)] = merge_user_records("u", [_sleep(1100, "e", scores={"sleep_score": 81})], later)
    [(stale, _)] = merge_user_records("u", [_sleep(200, "d", **recovery)], _stored_after([(newer, None)]))
    assert "heart_rate_data" not in stale.data  # the replace's version stays with the record
    [(filled, _)] = merge_user_records("u", [_sleep(1050, "f", sleep_efficiency={"v": 1})], later)
    assert filled.data.get("sleep_efficiency") == {"v": 1}  # data newer than the replace still fills gaps


def test_redelivering_an_identical_replacing_fragment_keeps_the_ordering_timestamp_and_id():
    from transforms.normalize import merge_user_records

    first = merge_user_records("u", [_sleep(1000, "a", True, scores={"sleep_score": 80})])
    again = merge_user_records("u", [_sleep(1000, "a", True, scores={"sleep_score": 80})], _stored_after(first))
    assert again[0][0].ordering_timestamp_ms == first[0][0].ordering_timestamp_ms == 1000
    assert again[0][0].event_id == first[0][0].event_id
    changed = merge_user_records("u", [_sleep(1000, "b", True, scores={"sleep_score": 70})], _stored_after(first))
    assert changed[0][0].ordering_timestamp_ms == 1001  # same version, other content: after the stored one


def test_samples_left_out_are_tallied_once_when_a_users_save_fails_and_their_messages_merge_again():
    """A user's messages merge together; when the state refuses the save, each message is merged again alone (the one
    at fault is dead-lettered): what the merge left out is tallied from the merge that was saved, not from both."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp

    from transforms.normalize import MergePerUser, UserFragments

    class RefusingState:
        def load(self, keys):
            return {}

        def save(self, rows):
            if any(key[2] == "2024-03-12" for key, _, _ in list(rows)):
                raise ValueError("the store refuses this row")

    class NoDirectory:
        def resolve(self, *_):
            return None

    def keyed(day: str, meta: dict, samples: dict, sequence: str) -> Keyed:
        return Keyed("daily", day, {"metadata": meta, **samples}, 1, sequence, {"user_id": "u", "provider": "OURA"},
                     "k")

    local, utc = keyed("2024-03-11", LOCAL_0311, {}, "1"), keyed("2024-03-11", UTC_0311, _hr(
        "2024-03-11T02:00:00.000000+00:00", "2024-03-11T12:00:00.000000+00:00"), "2")  # 02:00Z is the 10th locally
    refused = keyed("2024-03-12", LOCAL_0311, {}, "3")
    merge = MergePerUser("unused")
    merge.state, merge.users = RefusingState(), NoDirectory()
    merge.start_bundle()
    message = RawMessage(b"{}", {"path": "x", "line": 1}, encoding="json")
    merge.pending = [("u", [UserFragments((local, utc), message), UserFragments((refused,), message)],
                      GlobalWindow(), Timestamp(0))]
    list(merge._flush())
    assert merge.tally.counts["dead_letter:state"] == 1
    assert merge.tally.counts["plausibility:samples_outside_window"] == 1


def test_a_stale_redelivery_of_a_restaged_hypnogram_does_not_mix_into_the_newer_one():
    """Only interval lists take a late sample inside the stored span as a gap: a hypnogram restaged by a newer version
    (00:10 became 00:20) stays the newer one when the older version is redelivered."""
    def night(*stages: tuple[str, int]) -> dict:
        return {"sleep_durations_data": {"hypnogram_samples": [
            {"timestamp": f"2024-01-02T{at}:00.000000+00:00", "level": level} for at, level in stages]}}

    merge = RecordMerge()
    filled = merge.record(night(("00:00", 5), ("00:10", 4), ("00:40", 6)))
    merge.fill(filled, night(("00:00", 5), ("00:20", 4), ("00:40", 6)), intervals={"step_samples"})
    assert filled == night(("00:00", 5), ("00:20", 4), ("00:40", 6))


def test_late_rows_inside_the_stored_span_are_kept_a_late_series_there_gives_way():
    """A one-sample fragment (an Oura heart-rate row, a Withings weigh-in) adds its sample whatever its version: older
    than the stored record, it fills the gap it finds even between the stored samples. A stale series of several
    samples is the older version of the stored one, which wins its span."""
    stored = {("daily", "2026-11-02"): ({"metadata": LOCAL_0311, **_hr("2024-03-11T08:00:00.000000-05:00",
                                                                       "2024-03-11T12:00:00.000000-05:00")}, 5)}
    rows = [_keyed({"metadata": LOCAL_0311, **_hr(f"2024-03-11T{hour}:00:00.000000-05:00")}, 4, hour)
            for hour in ("10", "12")]
    (event,) = merge_user_events("u", rows, stored)
    assert [s["timestamp"][11:13] for s in event.data["heart_rate_data"]["detailed"]["hr_samples"]] == [
        "08", "10", "12"]
    assert event.ordering_timestamp_ms == 6  # newer than what destinations hold
    series = _keyed({"metadata": LOCAL_0311, **_hr("2024-03-11T09:00:00.000000-05:00",
                                                   "2024-03-11T09:30:00.000000-05:00")}, 4, "1")
    (event,) = merge_user_events("u", [series], stored)
    assert event.data == stored[("daily", "2026-11-02")][0] and event.ordering_timestamp_ms == 5
    (event,) = merge_user_events("u", [series, rows[0]], stored)  # each stale fragment is a row or a series
    assert [s["timestamp"][11:13] for s in event.data["heart_rate_data"]["detailed"]["hr_samples"]] == [
        "08", "10", "12"]
    elsewhere = _keyed({"metadata": LOCAL_0311, "oxygen_data": {"saturation_samples": [
        {"timestamp": f"2024-03-11T0{hour}:00:00.000000-05:00", "percentage": 97} for hour in (1, 2)]}}, 4, "2")
    (event,) = merge_user_events("u", [elsewhere, rows[0]], stored)
    assert [s["timestamp"][11:13] for s in event.data["heart_rate_data"]["detailed"]["hr_samples"]] == [
        "08", "10", "12"]
    weighed = {"metadata": LOCAL_0311, "measurements_data": {"measurements": [
        {"measurement_time": "2024-03-11T07:00:00.000000-05:00", "weight_kg": 80.0},
        {"measurement_time": "2024-03-11T21:00:00.000000-05:00", "weight_kg": 80.6}]}}
    late = {"metadata": LOCAL_0311, "measurements_data": {"measurements": [
        {"measurement_time": "2024-03-11T12:00:00.000000-05:00", "weight_kg": 80.3}]}}
    (event,) = merge_user_events("u", [_keyed(late, 4, "1")], {("daily", "2026-11-02"): (weighed, 5)})
    assert [m["weight_kg"] for m in event.data["measurements_data"]["measurements"]] == [80.0, 80.3, 80.6]


def test_rows_sharing_a_version_move_it_once_so_the_next_message_is_newer():
    """A message's rows share its arrival time: the record's version is that time (not one more per row), so a
    message arriving 2 ms later is newer and its values win; new content at the version destinations hold moves it
    one past, once."""
    rows = [_keyed({"metadata": LOCAL_0311, **_hr(f"2024-03-11T{hour}:00:00.000000-05:00")}, 1000, hour)
            for hour in ("08", "09", "10", "11")]
    (event,) = merge_user_events("u", rows)
    assert event.ordering_timestamp_ms == 1000
    stored = {("daily", "2026-11-02"): (event.data, event.ordering_timestamp_ms)}
    later = _keyed({"metadata": LOCAL_0311, "distance_data": {"steps": 6000}}, 1002, "a")
    (event,) = merge_user_events("u", [later], stored)
    assert event.data["distance_data"] == {"steps": 6000} and event.ordering_timestamp_ms == 1002
    same = [_keyed({"metadata": LOCAL_0311, **_hr(f"2024-03-11T{hour}:00:00.000000-05:00")}, 1000, hour)
            for hour in ("12", "13")]
    (event,) = merge_user_events("u", same, stored)
    assert len(event.data["heart_rate_data"]["detailed"]["hr_samples"]) == 6 and event.ordering_timestamp_ms == 1001
