"""Parquet batches of normalized events: the table layout and the deterministic object name of one batch.

One file holds the events of one type from one ``write`` call. Its name is a pure function of the (deduplicated,
sorted) event ids, so a retried batch rewrites the same file instead of adding a second copy. A batch that is split
differently on retry (or an update of a record written earlier) yields rows in several files: readers keep one row
per ``event_id`` and, per ``(user_id, type, natural_key)``, the row with the highest ``ordering_timestamp_ms``.
Files are append-only, so a deletion is a row too: a tombstone's row has ``deleted`` true and its key (``{natural_key,
summary_id | date, start_time?}``) as ``record``; when it is a record's newest row, the record is gone. ``deleted`` is
null in files written before tombstones existed (read it as false).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from core.events import NormalizedEvent

#: Columns; times are the record's ISO-8601 strings as delivered (Terra mixes offsets), ``record`` its canonical JSON.
PARQUET_SCHEMA = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("provider", pa.string()),
    pa.field("type", pa.string(), nullable=False),
    pa.field("natural_key", pa.string(), nullable=False),
    pa.field("start_time", pa.string()),
    pa.field("end_time", pa.string()),
    pa.field("ordering_timestamp_ms", pa.int64(), nullable=False),
    pa.field("record", pa.string(), nullable=False),
    pa.field("deleted", pa.bool_()),
])
NAME_DIGEST_CHARS = 24
UNDATED = "unknown"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def unique_events(events: Sequence[NormalizedEvent]) -> list[NormalizedEvent]:
    """The events with duplicate ``event_id``s removed (first kept), sorted for a stable row order."""
    first: dict[str, NormalizedEvent] = {}
    for event in events:
        first.setdefault(event.event_id, event)
    return sorted(first.values(), key=lambda e: (e.user_id, e.ordering_timestamp_ms, e.sequence, e.event_id))


def _metadata_time(event: NormalizedEvent, field: str) -> str | None:
    """The record's ``metadata.<field>`` (a tombstone: its key's ``start_time``, when known)."""
    if event.deleted:
        value = event.data.get(field) if field == "start_time" else None
    else:
        value = (event.data.get("metadata") or {}).get(field) if isinstance(event.data, dict) else None
    return value if isinstance(value, str) and value else None


def batch_date(events: Sequence[NormalizedEvent]) -> str:
    """``yyyy-mm-dd`` of the earliest ``metadata.start_time`` in ``events``; ``unknown`` when none has one."""
    dates = [t[:10] for t in (_metadata_time(e, "start_time") for e in events) if t and _DATE.match(t)]
    return min(dates) if dates else UNDATED


def parquet_key(prefix: str, event_type: str, events: Sequence[NormalizedEvent]) -> str:
    """``<prefix>/parquet/<type>/date=<yyyy-mm-dd>/<sha256(sorted unique event ids)[:24]>.parquet``."""
    ids = sorted({e.event_id for e in events})
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:NAME_DIGEST_CHARS]
    parts = [prefix.strip("/"), "parquet", event_type, f"date={batch_date(events)}", f"{digest}.parquet"]
    return "/".join(p for p in parts if p)


def events_to_table(events: Sequence[NormalizedEvent]) -> pa.Table:
    """One row per unique event, in ``unique_events`` order, with ``PARQUET_SCHEMA``."""
    rows = unique_events(events)
    return pa.Table.from_pydict({
        "event_id": [e.event_id for e in rows],
        "user_id": [e.user_id for e in rows],
        "provider": [e.user.get("provider") for e in rows],
        "type": [e.type for e in rows],
        "natural_key": [e.natural_key for e in rows],
        "start_time": [_metadata_time(e, "start_time") for e in rows],
        "end_time": [_metadata_time(e, "end_time") for e in rows],
        "ordering_timestamp_ms": [e.ordering_timestamp_ms for e in rows],
        "record": [e.data_json.decode() for e in rows],
        "deleted": [e.deleted for e in rows],
    }, schema=PARQUET_SCHEMA)


def parquet_bytes(events: Sequence[NormalizedEvent]) -> bytes:
    """The Parquet file (snappy) for ``events``."""
    buffer = io.BytesIO()
    pq.write_table(events_to_table(events), buffer, compression="snappy")
    return buffer.getvalue()
