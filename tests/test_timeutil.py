"""Provider time conversions: the fast paths write what the datetime path writes."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from connectors.timeutil import (
    day_bounds,
    format_ts,
    from_unix,
    parse_offset,
    series_ts,
    unix_date,
    unix_ts,
)


def iso(moment: datetime) -> str:
    """What every timestamp text must be: datetime's own ISO form (the oracle of the fast paths)."""
    return moment.isoformat(timespec="microseconds")


def test_unix_timestamps_are_written_as_through_a_datetime():
    rng = random.Random(5)
    for _ in range(20_000):
        seconds = rng.choice([rng.randrange(-10**10, 10**10), rng.randrange(1_700_000_000, 1_800_000_000)])
        offset = rng.choice([None, 0, 3600, -18000, 19800, 20700, -34200, rng.randrange(-86_399, 86_400)])
        assert unix_ts(seconds, offset) == iso(from_unix(seconds, offset)), (seconds, offset)
    assert unix_ts(1.5, 3600) == iso(from_unix(1.5, 3600))


def test_instants_datetime_cannot_hold_are_refused_as_before():
    for seconds, offset in ((253402300800, -3600), (-62135596801, 7200), (10**13, 0)):
        with pytest.raises((ValueError, OverflowError, OSError)):
            format_ts(from_unix(seconds, offset))
        with pytest.raises((ValueError, OverflowError, OSError)):
            unix_ts(seconds, offset)


def test_timestamps_are_written_as_datetime_writes_them():
    rng = random.Random(8)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-9, minutes=-30)),
             timezone(timedelta(seconds=-3601)), timezone(timedelta(seconds=20, microseconds=5)),
             timezone(timedelta(hours=23, minutes=59)), ZoneInfo("Europe/Berlin")]
    for _ in range(20_000):
        moment = datetime.min.replace(tzinfo=rng.choice(zones)) + timedelta(
            days=rng.choice([rng.randrange(1, 3_652_058), rng.randrange(738_000, 740_000)]),
            seconds=rng.randrange(86_400), microseconds=rng.choice([0, 0, 1, rng.randrange(1_000_000)]))
        assert format_ts(moment) == iso(moment), moment
    with pytest.raises(ValueError, match="naive"):
        format_ts(datetime(2024, 3, 11, 6, 58))


def test_series_times_are_the_start_plus_each_step_as_datetime_writes_it():
    """Oura's sample times: whole-second steps from a whole second in a fixed offset take the unix-seconds path;
    fractions, zones with rules and times datetime cannot hold go (and fail) as through datetime."""
    rng = random.Random(4)
    starts = [datetime(2026, 10, 31, 23, 57, tzinfo=timezone(timedelta(hours=-5))),
              datetime(2024, 3, 10, 1, 0, tzinfo=ZoneInfo("America/New_York")),  # the night clocks go forward
              datetime(2024, 3, 11, 6, 58, 0, 250, tzinfo=UTC), datetime(9999, 12, 31, 22, tzinfo=UTC),
              datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(minutes=-90)))]
    for _ in range(3_000):
        start = rng.choice(starts)
        interval = rng.choice([300, 300.0, 60, 0.5, 299.999, 1, True, 86_400 * 400, 10**30])
        indexes = sorted(rng.sample(range(120), rng.randrange(0, 30)))
        try:
            expected: object = [iso(start + timedelta(seconds=index * interval)) for index in indexes]
        except OverflowError as exc:
            expected = repr(exc)
        try:
            found: object = series_ts(start, interval, indexes)
        except OverflowError as exc:
            found = repr(exc)
        assert found == expected, (start, interval, indexes)


def test_day_bounds_are_remembered_and_refuse_what_is_not_a_day_as_before():
    zone = timezone(timedelta(hours=-5))
    assert day_bounds("2026-11-01", zone) == day_bounds(date(2026, 11, 1), zone) == (
        "2026-11-01T00:00:00.000000-05:00", "2026-11-02T00:00:00.000000-05:00")
    for day in (["2026-11-01"], {"day": 1}, "2026-13-01", None):
        with pytest.raises(ValueError, match=r"Invalid isoformat string|month must be"):
            day_bounds(day, zone)


def outcome(call, *args):
    try:
        return call(*args)
    except (ValueError, OverflowError, OSError, TypeError) as exc:
        return type(exc), str(exc)


def local_day(seconds, offset):
    return from_unix(seconds, offset).date().isoformat()


def test_local_days_of_unix_seconds_are_what_a_datetime_gives():
    rng = random.Random(8)
    offsets = [None, 0, 3600, -18000, 19800, 0.5, 3600.9, 86_399, -86_399, 86_400, -90_000]
    for _ in range(20_000):
        seconds = rng.choice([rng.randrange(-10**10, 10**10), rng.randrange(1_700_000_000, 1_800_000_000),
                              rng.uniform(-1e10, 1e10), 253402300799, -62135596800, 10**13, 1.5])
        offset = rng.choice([*offsets, rng.randrange(-86_399, 86_400)])
        assert outcome(unix_date, seconds, offset) == outcome(local_day, seconds, offset), (seconds, offset)


def test_offsets_are_parsed_once_and_refused_every_time():
    assert parse_offset("+05:30") is parse_offset("+05:30")
    assert parse_offset("+0530").utcoffset(None) == timedelta(hours=5, minutes=30)
    assert parse_offset(None) is parse_offset("Z") is parse_offset("z") is parse_offset("") is UTC
    assert parse_offset("-00:00") is UTC
    for bad in ("+5:30", "05:30x", "+24:00", "abc"):
        for _ in range(2):
            with pytest.raises(ValueError):
                parse_offset(bad)
