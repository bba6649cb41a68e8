"""Provider time conversions: the fast paths write what the datetime path writes."""

from __future__ import annotations

import random

import pytest

from connectors.timeutil import format_ts, from_unix, unix_ts


def test_unix_timestamps_are_written_as_through_a_datetime():
    rng = random.Random(5)
    for _ in range(20_000):
        seconds = rng.choice([rng.randrange(-10**10, 10**10), rng.randrange(1_700_000_000, 1_800_000_000)])
        offset = rng.choice([None, 0, 3600, -18000, 19800, 20700, -34200, rng.randrange(-86_399, 86_400)])
        assert unix_ts(seconds, offset) == format_ts(from_unix(seconds, offset)), (seconds, offset)
    assert unix_ts(1.5, 3600) == format_ts(from_unix(1.5, 3600))


def test_instants_datetime_cannot_hold_are_refused_as_before():
    for seconds, offset in ((253402300800, -3600), (-62135596801, 7200), (10**13, 0)):
        with pytest.raises((ValueError, OverflowError, OSError)):
            format_ts(from_unix(seconds, offset))
        with pytest.raises((ValueError, OverflowError, OSError)):
            unix_ts(seconds, offset)
