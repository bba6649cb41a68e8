"""Oura API v2 client code the manifest cannot express: the poll hook attaching the user's UTC offset."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, date, datetime, timedelta
from typing import Any

from connectors.hooks import Request, ResponseHook
from connectors.timeutil import parse_iso, parse_offset
from core.errors import PermanentError

log = logging.getLogger(__name__)

# documents written in the user's offset: (field whose offset is the user's on the document's day)
OFFSET_FIELD_BY_KIND = {"sleep": "bedtime_end", "daily_activity": "timestamp", "workout": "start_datetime"}
NEEDS_OFFSET = frozenset({"daily_sleep", "daily_readiness", "daily_spo2", "heartrate"})
DAILY_ACTIVITY_PATH = "/v2/usercollection/daily_activity"
MAX_DAYS_PER_USER = 800  # offsets remembered per user (two years of days)
MAX_LOOKUP_DAYS = 31  # the longest date range asked of daily_activity to learn offsets


def _offset_text(moment: datetime) -> str:
    offset = moment.utcoffset() or timedelta(0)
    sign, seconds = ("-", -offset) if offset < timedelta(0) else ("+", offset)
    minutes = int(seconds.total_seconds()) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _documents(body: Any) -> list[Any] | None:
    """The documents of a page ``{"data": [...]}``, ``[body]`` for a single document, None for anything else."""
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return body["data"]
    return [body] if isinstance(body, dict) else None


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        return None


def _utc_moment(row: dict[str, Any]) -> datetime | None:
    try:
        if isinstance(row.get("timestamp"), str):
            return parse_iso(row["timestamp"]).astimezone(UTC)
        if isinstance(row.get("timestamp_unix"), int | float) and not isinstance(row["timestamp_unix"], bool):
            return datetime.fromtimestamp(row["timestamp_unix"] / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _candidate_days(moment: datetime) -> tuple[date, date, date]:
    """The local days a UTC moment can be on: its UTC date, the day before or after."""
    return moment.date(), moment.date() - timedelta(days=1), moment.date() + timedelta(days=1)


def _placing_offset(moment: datetime, offsets: dict[date, str]) -> str | None:
    """The known offset of the day (among the candidates) that this very offset puts the UTC moment on."""
    for day in _candidate_days(moment):
        if day in offsets and (moment + parse_offset(offsets[day]).utcoffset(None)).date() == day:
            return offsets[day]
    return None


def _row_offset(moment: datetime, offsets: dict[date, str]) -> str | None:
    """The offset of a UTC heart-rate row: the placing offset, else that of the first candidate day known."""
    found = _placing_offset(moment, offsets)
    if found is not None:
        return found
    return next((offsets[d] for d in _candidate_days(moment) if d in offsets), None)


class OuraPollHook(ResponseHook):
    """Attaches ``_offset`` (the user's UTC offset, ``"-05:00"``) to daily_sleep, daily_readiness and daily_spo2
    documents and heartrate rows, which carry none (see ``connectors.providers.oura``).

    Offsets are learned per user and day from the documents that carry one: sleep (``bedtime_end``), daily_activity
    (``timestamp``, 4 a.m. local) and workout (``start_datetime``). They live in this process and each kind is polled
    on its own timer, so a page (or a document fetched by id) whose days are not known yet (heartrate polled before
    daily_activity, a restarted worker) costs one ``daily_activity`` request for those days (at most 31 of them),
    never one per row; each day is asked once. A day whose offset cannot be learned gets none: the mapper then keeps
    the day in UTC, labelled UTC (the merge keeps only its samples inside a local day of the same key). A heartrate
    row takes the offset of the day (its UTC date, the day before or after) that offset puts it on.
    """

    attaches = {kind: ("_offset",) for kind in sorted(NEEDS_OFFSET)}  # optional: without it, UTC days labelled UTC

    def __init__(self) -> None:
        self._offsets: dict[str, dict[date, str]] = {}  # user → day → offset
        self._asked: dict[str, set[date]] = {}  # user → days already asked of daily_activity
        self._lock = threading.Lock()

    def payloads(self, request: Request, body: Any) -> list[Any]:
        documents = _documents(body)
        if documents is None:
            return [] if body is None else [body]
        user = str(request.connection.user_id)
        if request.kind in OFFSET_FIELD_BY_KIND:
            self._learn(user, request.kind, documents)
            return [body]
        if request.kind not in NEEDS_OFFSET:
            return [body]
        heartrate = request.kind == "heartrate"
        moments = [(_utc_moment(doc) if heartrate else None) if isinstance(doc, dict) else None for doc in documents]
        days = {m.date() for m in moments if m} if heartrate else \
            {d for doc in documents if isinstance(doc, dict) and (d := _day(doc.get("day")))}
        # days not learned yet (kinds are polled on their own timers: heartrate may come before daily_activity, and
        # a restarted worker knows nothing) are asked of daily_activity: one request per page, each day once
        offsets = self._known(request, user, days, [m for m in moments if m] if heartrate else None)
        attached = []
        for doc, moment in zip(documents, moments, strict=True):
            offset = None
            if isinstance(doc, dict) and "_offset" not in doc:
                if heartrate and moment is not None:
                    offset = _row_offset(moment, offsets)
                elif not heartrate:
                    offset = offsets.get(_day(doc.get("day")))  # type: ignore[arg-type]
            attached.append({**doc, "_offset": offset} if offset else doc)
        if all(new is old for new, old in zip(attached, documents, strict=True)):
            return [body]  # nothing attached: the provider's bytes as they are
        if isinstance(body, dict) and isinstance(body.get("data"), list):
            return [{**body, "data": attached}]
        return attached

    # ------------------------------------------------------------------------------------------------ internals
    def _learn(self, user: str, kind: str, documents: list[Any]) -> None:
        field = OFFSET_FIELD_BY_KIND[kind]
        learned: dict[date, str] = {}
        for doc in documents:
            if not isinstance(doc, dict) or not isinstance(doc.get(field), str):
                continue
            day = _day(doc.get("day"))
            try:
                moment = parse_iso(doc[field])
            except ValueError:
                continue
            if day is not None:
                learned[day] = _offset_text(moment)
        if not learned:
            return
        with self._lock:
            known = self._offsets.setdefault(user, {})
            known.update(learned)
            for stale in sorted(known)[:-MAX_DAYS_PER_USER]:
                del known[stale]

    def _known(self, request: Request, user: str, days: set[date], rows: list[datetime] | None = None,
               ) -> dict[date, str]:
        """The user's offsets of ``days`` and their neighbours. Days not known (for heartrate ``rows``: the days a
        row could be on, when no known offset places it) are asked of daily_activity in one request (at most
        ``MAX_LOOKUP_DAYS`` from the first), each day once."""
        wanted = days | {d + timedelta(days=step) for d in days for step in (-1, 1)}
        with self._lock:
            known = dict(self._offsets.get(user, {}))
            asked = set(self._asked.get(user, set()))
        needed = days if rows is None else {
            d for moment in rows if _placing_offset(moment, known) is None for d in _candidate_days(moment)}
        missing = sorted(d for d in needed if d not in known and d not in asked)
        if missing:
            first, last = missing[0], min(missing[-1], missing[0] + timedelta(days=MAX_LOOKUP_DAYS - 1))
            try:
                answer = request.fetch(DAILY_ACTIVITY_PATH, {"start_date": first.isoformat(),
                                                             "end_date": last.isoformat()})
            except PermanentError as exc:  # e.g. no "daily" scope: those days stay in UTC (transient errors raise:
                # the window is polled again rather than labelled UTC for good)
                log.warning("oura %s: no daily_activity to learn the offset of %s–%s (%s); those days stay in UTC",
                            user, first, last, exc)
                answer = None
            self._learn(user, "daily_activity", _documents(answer) or [])
            with self._lock:
                asked_days = self._asked.setdefault(user, set())
                asked_days.update(d for d in missing if first <= d <= last)
                for stale in sorted(asked_days)[:-MAX_DAYS_PER_USER]:
                    asked_days.discard(stale)
                known = dict(self._offsets.get(user, {}))
        return {d: known[d] for d in wanted if d in known}

