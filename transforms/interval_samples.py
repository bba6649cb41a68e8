"""Sample lists a provider emits one interval at a time (``connectors.base.IntervalSamples``): as the record state
keeps them, and as they are delivered.

The record state keeps such a list as mapped: one sample per interval start and part (``Fragment.part``, held in the
sample under ``PART``), so the merge (``transforms.normalize.RecordMerge``) replaces an updated interval, or one part
of it, and keeps the others. ``emitted`` makes the delivered copy from the merged record: the parts of each interval
combined, amounts as running totals since the record's start at each interval's end, ``PART`` gone. State never
holds running totals, and a delivered record never holds parts.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.base import IntervalSamples

PART = "_part"  # the part a sample of an interval list belongs to (the record state's, never delivered)
_NOT_VALUES = frozenset({"timestamp", PART, "timer_duration_seconds"})
DECIMALS = 3  # a running total of decimal amounts (metres, kcal) keeps this many: no sum of floats' noise
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def mark_part(record: dict[str, Any], spec: IntervalSamples, part: str) -> None:
    """Mark each sample of ``spec``'s lists in ``record`` as of ``part``, in place: for a record of the caller's own
    (``transforms.normalize._keyed``'s, just validated into new dicts and lists)."""
    for samples in _lists(record, spec):
        for sample in samples:
            sample[PART] = part


def mark_parts(record: dict[str, Any], spec: IntervalSamples, parts: list[str | None]) -> bool:
    """``mark_part`` of rows joined (``transforms.normalize._keyed_run``): the n-th sample of each of ``spec``'s lists
    as of ``parts[n]`` (none for None). False, marking nothing, when a list does not hold a sample per part."""
    lists = _lists(record, spec)
    if any(len(samples) != len(parts) for samples in lists):
        return False
    for samples in lists:
        for sample, part in zip(samples, parts, strict=True):
            if part is not None:
                sample[PART] = part
    return True


def emitted(record: dict[str, Any], spec: IntervalSamples) -> dict[str, Any]:
    """The delivered copy of a merged ``record`` (which does not change): in each list of ``spec.amounts``, one sample
    per interval holding the running total of the record's amounts up to that interval's end (the parts of an
    interval added up), at that end; in each list of ``spec.levels``, one sample per interval start holding the
    highest level of its parts. Integers stay integers; a decimal total is rounded to ``DECIMALS`` places."""
    for path in spec.amounts:
        record = _replaced(record, path.split("."), lambda samples: _running_totals(samples, spec.seconds))
    for path in spec.levels:
        record = _replaced(record, path.split("."), _highest_levels)
    return record


def _running_totals(samples: list[dict[str, Any]], seconds: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    total: int | float = 0
    for at, group in _by_instant(samples):
        key = _value_key(group[0])
        if key is None:  # a sample of no value (a merged record is validated: none) adds nothing
            continue
        total += sum(sample.get(key) or 0 for sample in group)
        total = total if isinstance(total, int) else round(total, DECIMALS)
        out.append({"timestamp": _later(at, seconds), key: total})
    return out


def _highest_levels(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for _, group in _by_instant(samples):
        key = _value_key(group[0]) or "level"
        highest = max(reversed(group), key=lambda sample: sample.get(key) or 0)  # a tie: the latest part
        out.append({name: value for name, value in highest.items() if name != PART})
    return out


def _by_instant(samples: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Samples grouped by the instant of their ``timestamp`` (a time without offset taken as UTC, as the merge does), in
    time order; each group with the time of its first sample, as written (its offset kept)."""
    groups: dict[int, tuple[str, list[dict[str, Any]]]] = {}
    for sample in samples:
        text = sample["timestamp"]
        instant = sample_instant(text)
        found = groups.get(instant)
        if found is None:
            groups[instant] = (text, [sample])
        else:
            found[1].append(sample)
    return [groups[instant] for instant in sorted(groups)]


@functools.lru_cache(maxsize=1 << 16)
def sample_instant(text: str) -> int:
    """The instant a sample's time names, as microseconds since the Unix epoch; a time without an offset is taken as
    UTC (how the merge compares them). Exact (a datetime holds microseconds), so instants order and compare as the
    datetimes they name do; an integer compares an order of magnitude faster than a datetime in a non-UTC offset."""
    moment = datetime.fromisoformat(text)
    return ((moment if moment.tzinfo else moment.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


@functools.lru_cache(maxsize=1 << 14)
def _later(text: str, seconds: int) -> str:
    """The time ``seconds`` after ``text``, written in its offset (none when it has none)."""
    return (datetime.fromisoformat(text) + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def _lists(record: dict[str, Any], spec: IntervalSamples) -> list[list[Any]]:
    """``spec``'s lists that ``record`` holds, not empty."""
    return [samples for samples in (_at(record, path) for path in spec.paths) if samples]


def _at(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(record, dict):
            return None
        record = record.get(name)
    return record


def _value_key(sample: dict[str, Any]) -> str | None:
    """The field a sample holds its value in (``steps``, ``distance_meters``, ``level``…)."""
    for name in sample:
        if name not in _NOT_VALUES:
            return name
    return None


def _replaced(record: dict[str, Any], path: list[str], change: Any) -> dict[str, Any]:
    """``record`` with the list at ``path`` changed by ``change`` (copying the dicts on the way); unchanged when the
    path holds no list."""
    head, *rest = path
    value = record.get(head)
    if rest:
        if not isinstance(value, dict):
            return record
        inner = _replaced(value, rest, change)
        return record if inner is value else {**record, head: inner}
    if not isinstance(value, list) or not value:
        return record
    return {**record, head: change(value)}
