"""Time conversions shared by provider mappers. Output format is Terra's: ISO-8601 with
microseconds and an explicit UTC offset (``2024-03-11T06:58:00.000000+01:00``; UTC is ``+00:00``)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta, timezone


def offset_tz(offset_seconds: int | float | None) -> timezone:
    """A fixed-offset zone; ``None`` means UTC."""
    return _zone(int(offset_seconds or 0))


@functools.lru_cache(maxsize=256)
def _zone(offset_seconds: int) -> timezone:
    return timezone(timedelta(seconds=offset_seconds))


def parse_offset(text: str | None) -> timezone:
    """Parse ``+hh:mm``, ``-hh:mm``, ``+hhmm`` or ``Z`` into a fixed-offset zone (``None`` → UTC); ValueError otherwise.
    Remembered: a user's documents repeat the same offset."""
    return _parse_offset(text)


@functools.lru_cache(maxsize=256)
def _parse_offset(text: str | None) -> timezone:
    if not text or text in ("Z", "z"):
        return UTC
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-").replace(":", "")
    if len(digits) != 4 or not digits.isdigit():
        raise ValueError(f"bad UTC offset {text!r}")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))


def format_ts(moment: datetime) -> str:
    """Terra timestamp text; naive datetimes are rejected so no time is ever silently shifted.

    ``moment.isoformat(timespec="microseconds")``; a whole second in a fixed offset (what mappers make) is written from
    cached texts of its day, its time of day and its offset."""
    zone = moment.tzinfo
    if zone is None:
        raise ValueError("naive datetime: an offset is required")
    if type(zone) is timezone and not moment.microsecond:
        offset = zone.utcoffset(None)
        if not offset.microseconds:
            return (_day_text(moment.toordinal() - _EPOCH_ORDINAL) + _clock_text(
                moment.hour * 3600 + moment.minute * 60 + moment.second) + _offset_text(
                offset.days * 86_400 + offset.seconds))
    return moment.isoformat(timespec="microseconds")


def from_unix(seconds: int | float, offset_seconds: int | float | None = None) -> datetime:
    """Unix seconds (UTC) shown in the fixed offset ``offset_seconds``."""
    return datetime.fromtimestamp(seconds, tz=offset_tz(offset_seconds))


def unix_ts(seconds: int | float, offset_seconds: int | float | None = None) -> str:
    """``format_ts(from_unix(seconds, offset_seconds))``; whole seconds (most samples) are written without building
    a datetime, from cached texts of the local day, the time of day and the offset, and remembered: re-sent
    summaries (Garmin's dailies through the day) repeat their samples' times."""
    if type(seconds) is not int or not _FAST_RANGE[0] <= seconds <= _FAST_RANGE[1]:  # datetime refuses out of range
        return format_ts(from_unix(seconds, offset_seconds))
    return _unix_text(seconds, int(offset_seconds or 0))


def unix_date(seconds: int | float, offset_seconds: int | float | None = None) -> str:
    """``from_unix(seconds, offset_seconds).date().isoformat()``: the local day (whole seconds: with no datetime)."""
    if type(seconds) is not int or not _FAST_RANGE[0] <= seconds <= _FAST_RANGE[1]:
        return from_unix(seconds, offset_seconds).date().isoformat()
    offset = int(offset_seconds or 0)
    _zone(offset)  # refuses an offset beyond ±24 h as from_unix does
    return _day_text((seconds + offset) // 86_400)


@functools.lru_cache(maxsize=1 << 14)
def _unix_text(seconds: int, offset: int) -> str:
    days, rest = divmod(seconds + offset, 86_400)
    return _day_text(days) + _clock_text(rest) + _offset_text(offset)


def series_ts(start: datetime, interval: int | float, indexes: Iterable[int]) -> list[str]:
    """``format_ts(start + timedelta(seconds=index * interval))`` for each index: the sample times of a regular series
    (Oura's 5-minute samples). Whole seconds in a fixed offset are written as ``unix_ts`` writes them."""
    indexes = list(indexes)
    zone = start.tzinfo
    whole = type(interval) is int or (type(interval) is float and interval.is_integer())
    if indexes and whole and type(zone) is timezone and not start.microsecond:
        offset = zone.utcoffset(None)
        offset_seconds, step = offset.days * 86_400 + offset.seconds, int(interval)
        first = ((start.toordinal() - _EPOCH_ORDINAL) * 86_400 + start.hour * 3_600 + start.minute * 60 + start.second
                 - offset_seconds)
        ends = (first + min(indexes) * step, first + max(indexes) * step)
        if not offset.microseconds and _FAST_RANGE[0] <= min(ends) and max(ends) <= _FAST_RANGE[1]:
            return [_unix_text(first + index * step, offset_seconds) for index in indexes]  # ints, in range
    return [format_ts(start + timedelta(seconds=index * interval)) for index in indexes]


@functools.lru_cache(maxsize=4096)
def _day_text(days_since_epoch: int) -> str:
    return date.fromordinal(_EPOCH_ORDINAL + days_since_epoch).isoformat()


@functools.lru_cache(maxsize=1 << 14)
def _clock_text(second_of_day: int) -> str:
    hours, rest = divmod(second_of_day, 3_600)
    return f"T{hours:02d}:{rest // 60:02d}:{rest % 60:02d}.000000"


@functools.lru_cache(maxsize=256)
def _offset_text(offset_seconds: int) -> str:
    return datetime(2000, 1, 1, tzinfo=_zone(offset_seconds)).isoformat(timespec="microseconds")[26:]


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_FAST_RANGE = (-62_135_510_400, 253_402_214_400)  # 0001-01-02 to 9999-12-31 UTC: within datetime's range


def parse_iso(text: str) -> datetime:
    """Parse ISO-8601 with ``Z`` or an offset; a missing offset is an error."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset")
    return moment


def day_bounds(day: str | date, tz: timezone) -> tuple[str, str]:
    """Local midnight to the next local midnight of ``day`` in ``tz`` (Terra's day-scoped window)."""
    return _day_bounds(str(day), tz)


@functools.lru_cache(maxsize=4096)
def _day_bounds(day: str, tz: timezone) -> tuple[str, str]:  # remembered: a user's records name the same few days
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), tzinfo=tz)
    return format_ts(start), format_ts(start + timedelta(days=1))


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def format_bound(moment: datetime, fmt: str, is_end: bool) -> str:
    """A window bound as the provider wants it; a ``date`` end is the last day the window touches (inclusive)."""
    if fmt == "date":
        day = (moment - timedelta(microseconds=1)).date() if is_end else moment.date()
        return day.isoformat()
    if fmt == "unix":
        return str(int(moment.timestamp()))
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
