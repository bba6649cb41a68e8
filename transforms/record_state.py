"""Record state: the latest merged version of every normalized record.

Terra's destinations overwrite a record by its natural key, so every delivered record must be the
whole record. Providers send parts of one record separately and at different times (Garmin epochs
and stress details into the day's Daily, Oura heart-rate rows and scores into the Daily). The
pipeline merges each batch's fragments into the stored record and delivers the result, so a later
fragment never wipes what an earlier batch delivered.

A deleted record is kept as a tombstone row: ``{"healthflow_deleted": <the tombstone's key>}`` at the deletion's
version (``state_row``, ``stored_deletion``), so data older than the deletion cannot bring it back and data newer
than it starts a fresh record. A record re-created after a deletion keeps the deletion's version with it
(``{..., "healthflow_generation": version}``, ``stored_marks``): its events' ids include it for good. A record a
fragment replaced whole (``connectors.base.Fragment.replaces``) keeps that fragment's version the same way
(``{..., "healthflow_replaced": version}``): data not newer than it fills no gaps (what the replace cleared stays gone).

Stored in the control-plane store (SQLite embedded, PostgreSQL shared by distributed workers);
all I/O is batched: one read and one write per group of users.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from core.events import NormalizedEvent, canonical_json
from core.store import Store

Key = tuple[str, str, str]  # (user_id, type, natural_key)
TABLE = "healthflow_record_state"
CHUNK = 300
TOMBSTONE_FIELD = "healthflow_deleted"  # no Terra model has it: a stored record holding it is a tombstone
GENERATION_FIELD = "healthflow_generation"  # no Terra model has it: the generation of a record re-created
REPLACED_FIELD = "healthflow_replaced"  # no Terra model has it: the version of the last fragment replacing the record


def state_row(event: NormalizedEvent, record: dict[str, Any] | None = None) -> bytes:
    """What the state stores for ``event``: its record's JSON (``record``, the merged record, when the event delivers
    a copy made from it: ``transforms.normalize.merge_user_records``; with ``GENERATION_FIELD`` when it has a
    generation, ``REPLACED_FIELD`` when a fragment replaced it), or for a tombstone ``{TOMBSTONE_FIELD: key}``."""
    if event.deleted:
        return canonical_json({TOMBSTONE_FIELD: event.data})
    marks = {name: value for name, value in ((GENERATION_FIELD, event.generation), (REPLACED_FIELD, event.replaced))
             if value is not None}
    if marks:
        return canonical_json({**(event.data if record is None else record), **marks})
    return event.data_json if record is None else canonical_json(record)


def stored_marks(stored: dict[str, Any]) -> tuple[dict[str, Any], int | None, int | None]:
    """A stored record without ``GENERATION_FIELD`` and ``REPLACED_FIELD``, its generation (None: never re-created)
    and the version of the last fragment that replaced it (None: none did)."""
    if not isinstance(stored, dict) or (GENERATION_FIELD not in stored and REPLACED_FIELD not in stored):
        return stored, None, None
    record = dict(stored)
    generation, replaced = record.pop(GENERATION_FIELD, None), record.pop(REPLACED_FIELD, None)
    return (record, generation if isinstance(generation, int) else None,
            replaced if isinstance(replaced, int) else None)


def stored_deletion(stored: dict[str, Any]) -> dict[str, Any] | None:
    """The deleted key of a tombstone row (see ``state_row``); None for a record."""
    key = stored.get(TOMBSTONE_FIELD) if isinstance(stored, dict) else None
    return key if isinstance(key, dict) else None


class RecordState:
    """Stored records by (user, type, natural key), with the provider version they carry."""

    def __init__(self, url: str) -> None:
        self.store = Store(url)

    def open(self) -> None:
        self.store.open()
        self.store.create_tables(f"CREATE TABLE IF NOT EXISTS {TABLE} (user_id TEXT NOT NULL, type TEXT NOT NULL, "
                                 f"natural_key TEXT NOT NULL, version_ms BIGINT NOT NULL, data "
                                 f"{self.store.json_type} NOT NULL, PRIMARY KEY (user_id, type, natural_key))")

    def close(self) -> None:
        self.store.close()

    def load(self, keys: Sequence[Key]) -> dict[Key, tuple[dict[str, Any], int]]:
        """Stored ``(record, version_ms)`` for the keys that exist."""
        return {(user_id, kind, key): (self.store.load_json(data), version)
                for user_id, kind, key, version, data in self._rows(keys, "version_ms, data")}

    def versions(self, keys: Sequence[Key]) -> dict[Key, int]:
        """Stored ``version_ms`` (records and tombstones alike) for the keys that exist; one query per chunk."""
        return {(user_id, kind, key): version for user_id, kind, key, version in self._rows(keys, "version_ms")}

    def _rows(self, keys: Sequence[Key], columns: str) -> list[tuple[Any, ...]]:
        """``(user_id, type, natural_key, *columns)`` of the stored keys, one query per chunk of keys."""
        found: list[tuple[Any, ...]] = []
        with self.store.transaction() as cursor:
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start:start + CHUNK]
                found.extend(cursor.execute(
                    f"SELECT user_id, type, natural_key, {columns} FROM {TABLE} WHERE (user_id, type, "
                    f"natural_key) IN ({', '.join('(?, ?, ?)' for _ in chunk)})",
                    [part for key in chunk for part in key]).fetchall())
        return found

    def save(self, rows: Iterable[tuple[Key, bytes, int]]) -> None:
        """Store merged records, given as their JSON bytes (overwriting), atomically for the whole call."""
        values = [(*key, version, data.decode()) for key, data, version in rows]
        if not values:
            return
        with self.store.transaction() as cursor:
            cursor.executemany(
                f"INSERT INTO {TABLE} (user_id, type, natural_key, version_ms, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (user_id, type, natural_key) DO UPDATE SET version_ms = excluded.version_ms, "
                "data = excluded.data", values)


def open_state(url: str) -> RecordState:
    """``sqlite:///path/state.db`` or ``postgresql://user@host:port/db``."""
    return RecordState(url)
