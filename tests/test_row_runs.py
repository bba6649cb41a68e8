"""Rows of one record are validated and merged together (``transforms.normalize.map_documents``: a run of Oura
heart-rate rows, of Garmin epochs) and give exactly what they give one by one: the same events, record state, dead
letters and counts, across flushes and stale redeliveries."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from golden_events import fingerprint

from connectors import registry
from core.raw import RawMessage, RawPayload
from pipelines.demo_data import Simulator
from schemas.serde import encode_raw
from transforms import normalize
from transforms.normalize import (
    Failed,
    Keyed,
    map_documents,
    merge_user_records,
    normalize_message,
    read_documents,
    split_by_user,
)
from transforms.outputs import Tally
from transforms.record_state import state_row

FIXTURES = Path(__file__).parent / "fixtures"
ROWS_IN_FIXTURES = {"garmin", "google_health", "oura"}  # heart-rate and steps points, epochs, weigh-ins

DAY = 1_793_491_200  # 2026-11-01T00:00:00Z


def _outcome(batches: list[list[RawPayload]]) -> dict:
    """Every batch mapped and merged per user on the record state the batches before it left (a flush each)."""
    stored: dict[str, dict] = {}
    events, dead, counts = [], [], Counter()
    offset = 0
    for batch in batches:
        by_user: dict[str, list[Keyed]] = {}
        for payload in batch:
            offset += 1
            for item in normalize_message(RawMessage(encode_raw(payload), {"partition": 0, "offset": offset})):
                if isinstance(item, Failed):
                    record = dict(item.record, failed_at=None)
                    dead.append(json.dumps([item.stage, record], sort_keys=True, default=repr))
                else:
                    by_user.setdefault(item.user["user_id"], []).append(item)
                    counts["fragments"] += item.fragment_count
                    counts.update({f"plausibility:{name}": n for name, n in item.dropped})
        for user, keyed in by_user.items():
            records = merge_user_records(user, keyed, stored.get(user),
                                         on_dropped=lambda name, n: counts.update({name: n}))
            counts["superseded"] += sum(k.fragment_count for k in keyed) - len(records)
            events += [f"{e.sequence}\t{fingerprint(e.event_id, e.ordering_timestamp_ms, e.body())}"
                       for e, _ in records]
            stored.setdefault(user, {}).update({(e.type, e.natural_key): (json.loads(state_row(e, r)),
                                                                          e.ordering_timestamp_ms)
                                                for e, r in records})
    return {"events": events, "state": stored, "dead": dead, "counts": counts}  # events and dead letters in order


def _row_by_row(batches: list[list[RawPayload]], monkeypatch: pytest.MonkeyPatch) -> dict:
    with monkeypatch.context() as patched:
        patched.setattr(normalize, "_row_shape", lambda fragment: None)  # no row joins another
        return _outcome(batches)


def _oura_rows(received_ms: int, rows: list[dict]) -> RawPayload:
    return RawPayload("oura", json.dumps({"data": rows}).encode(), "heartrate", "oura-7", received_ms)


def _hr(minute: int, bpm: object = 60, offset: str | None = "-05:00", **more: object) -> dict:
    """A row ``minute`` minutes after 2026-11-01T15:00Z."""
    at = datetime.fromtimestamp(DAY + 15 * 3600 + minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    row = {"bpm": bpm, "source": "awake", "timestamp": at}
    return {**row, **({"_offset": offset} if offset else {}), **more}


def _epochs(received_ms: int, epochs: list[dict]) -> RawPayload:
    return RawPayload("garmin", json.dumps({"epochs": epochs}).encode(), None, None, received_ms)


def _epoch(slot: int, activity: str, steps: object = 100, **more: object) -> dict:
    start = DAY + 8 * 3600 + slot * 900
    return {"userId": "g-7", "summaryId": f"e-{slot}-{activity}", "startTimeInSeconds": start,
            "startTimeOffsetInSeconds": -28800, "activityType": activity, "durationInSeconds": 900,
            "activeTimeInSeconds": 300, "steps": steps, "distanceInMeters": 80, "activeKilocalories": 9, "met": 2.5,
            "intensity": "ACTIVE", **more}


def _tricky() -> list[list[RawPayload]]:
    """Rows that fail, are dropped or kept in part, meet UTC days, repeat instants and parts, and arrive stale."""
    t = 1_793_550_000_000
    first = [
        _oura_rows(t, [_hr(m) for m in range(0, 120, 5)]),
        _oura_rows(t + 10, [_hr(0, 61), _hr(5, "72"), _hr(10, 62), _hr(15), {"source": "awake"}, _hr(20, 400)]),
        _oura_rows(t + 20, [_hr(m, offset=None) for m in (0, 30, 600, 605)] + [_hr(35), _hr(35, 90)]),
        _epochs(t + 30, [_epoch(s, a) for s in range(6) for a in ("WALKING", "SEDENTARY")]),
        _epochs(t + 40, [_epoch(1, "WALKING", 120), _epoch(1, "WALKING", -5), _epoch(2, "RUNNING"), _epoch(2, ""),
                         _epoch(3, "WALKING", None), _epoch(4, "WALKING", met=None), _epoch(5, "CYCLING")]),
    ]
    first += [  # records they create: rows out of order, at one instant, an epoch updated in the same push
        _oura_rows(t + 60, [_hr(m + 1440, 50 + m) for m in (30, 10, 20, 10, 0, 30)]),
        _epochs(t + 70, [_epoch(s + 96, a, 10 * s) for s, a in ((1, "WALKING"), (0, "SEDENTARY"), (0, "WALKING"),
                                                                  (1, "WALKING"), (2, "RUNNING"), (0, "WALKING"))]),
        _epochs(t + 80, [{**_epoch(s + 192, "WALKING"), "userId": user} for s in range(3) for user in ("g-7", "g-8")]),
        _oura_rows(t + 90, [_hr(m + 2880, 60) for m in (0, 50, 100)]),  # days with few samples, for stale rows to fill
        _epochs(t + 90, [_epoch(s + 288, "WALKING", 7) for s in (0, 9)]),
    ]
    second = [  # older than what the first flush stored: they only fill gaps
        _oura_rows(t - 5_000, [_hr(m, 70) for m in (1, 5, 7, 121)]),
        _epochs(t - 5_000, [_epoch(s, a, 50) for s in (0, 7, 8) for a in ("WALKING", "ELLIPTICAL")]),
        _oura_rows(t + 50, [_hr(m, 55, offset=None) for m in (2, 3)]),
        # stale pages overlapping one another, out of order, at instants the stored record holds and lacks
        _oura_rows(t - 9_000, [_hr(m + 2880, 70) for m in (30, 10, 20, 40)]),
        _oura_rows(t - 8_000, [_hr(m + 2880, 71) for m in (15, 25, 5, 10)]),
        _epochs(t - 9_000, [_epoch(s + 288, a, 11) for s in (3, 1, 2) for a in ("WALKING", "RUNNING")]),
        _epochs(t - 8_000, [_epoch(s + 288, "WALKING", 12) for s in (2, 1, 4)]),
    ]
    return [first, second]


def test_rows_joined_give_what_rows_one_by_one_give_on_rows_that_fail_drop_repeat_and_arrive_stale(monkeypatch):
    batches = _tricky()
    joined, alone = _outcome(batches), _row_by_row(batches, monkeypatch)
    assert joined == alone
    assert joined["dead"] and joined["counts"]["plausibility:impossible_samples"]  # the cases are there
    assert joined["counts"]["fragments"] > sum(1 for batch in batches for _ in batch)


@pytest.mark.parametrize("seed", [3, 11])
def test_rows_joined_give_what_rows_one_by_one_give_on_simulated_data_in_several_flushes(seed, monkeypatch):
    payloads = list(Simulator(30, 3, seed=seed).payloads())
    random.Random(seed).shuffle(payloads)  # flushes of messages out of their arrival order: stale rows fill gaps
    batches = [payloads[n::3] for n in range(3)]
    joined = _outcome(batches)
    assert joined == _row_by_row(batches, monkeypatch)
    assert joined["counts"]["fragments"] > 4 * len(payloads)


def test_a_run_of_rows_is_one_keyed_that_stands_for_each_row():
    items = list(normalize_message(RawMessage(encode_raw(_oura_rows(1_793_550_000_000, [_hr(m) for m in range(
        0, 60, 5)])), {"partition": 0, "offset": 0})))
    (keyed,) = items
    assert keyed.rows == keyed.fragment_count == 12
    assert len(keyed.data["heart_rate_data"]["detailed"]["hr_samples"]) == 12


def _fixture_payloads(slug: str, received_ms: int) -> list[RawPayload]:
    """Every payload of a provider's good fixtures (``tests/fixtures/<provider>/<kind>[.<variant>].json``), a second
    apart; a keyed provider's push bodies name their kinds, its other files are pull answers of the file's kind."""
    provider, payloads = registry()[slug], []
    for path in sorted((FIXTURES / slug).glob("*.json")):
        kind, _, variant = path.stem.partition(".")
        if variant.startswith("bad"):
            continue
        body = json.loads(path.read_text())
        keyed = provider.envelope == "keyed" and isinstance(body, dict) and all(
            isinstance(docs, list) for docs in body.values())
        payloads.append(RawPayload(slug, json.dumps(body).encode(), None if keyed else kind, "fixture-user",
                                   received_ms + 1000 * len(payloads)))
    return payloads


@pytest.mark.parametrize("slug", sorted(registry()))
def test_rows_joined_give_what_rows_one_by_one_give_on_every_providers_fixtures(slug, monkeypatch):
    """Each provider's real payload shapes (weigh-ins, heart-rate pages, intraday series), then the same payloads
    redelivered stale in reverse."""
    t = 1_793_550_000_000
    batches = [_fixture_payloads(slug, t), _fixture_payloads(slug, t - 100_000)[::-1]]
    assert _outcome(batches) == _row_by_row(batches, monkeypatch)
    runs = [item.rows for offset, payload in enumerate(batches[0])
            for item in normalize_message(RawMessage(encode_raw(payload), {"partition": 0, "offset": offset}))
            if isinstance(item, Keyed) and item.rows]
    assert bool(runs) == (slug in ROWS_IN_FIXTURES)  # which providers' fixtures hold rows (so the test joins some)


def test_records_mapped_before_the_shuffle_are_not_joined():
    """A message of several users is mapped where it is split, and its Keyed cross the shuffle: a worker of an earlier
    version (during an update) would merge rows joined as one series, so they go one per row."""
    epochs = [_epoch(slot, activity) for slot in range(4) for activity in ("WALKING", "SEDENTARY")]
    others = [{**epoch, "userId": "g-8"} for epoch in epochs]
    message = RawMessage(encode_raw(_epochs(1_793_550_000_000, epochs + others)), {"partition": 0, "offset": 0})
    records, failed, mapped = split_by_user(message)
    assert mapped and not failed and len(records) == 2
    assert all(item.rows == 0 for keyed in records.values() for item in keyed)
    assert sum(len(keyed) for keyed in records.values()) == 16
    (joined,) = (item for item in normalize_message(RawMessage(encode_raw(_epochs(1, epochs)), {})))
    assert joined.rows == 8


def test_rows_joined_and_rows_validated_one_by_one_are_counted():
    """A run that does not validate whole is validated row by row, and counted: a change that stops rows joining
    shows in a run's summary, not only in its speed."""
    tally = Tally()
    for offset, rows in enumerate(([_hr(m) for m in range(0, 30, 5)], [_hr(0), _hr(5, "72"), _hr(10), _hr(15)])):
        message = RawMessage(encode_raw(_oura_rows(1_793_550_000_000, rows)), {"partition": 0, "offset": offset})
        list(map_documents(message, *read_documents(message), range(len(rows)), tally=tally))
    assert tally.counts == {"rows_joined": 6, "rows_one_by_one": 4}
