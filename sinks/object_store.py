"""Object store sink: one JSON object per record in Terra's cloud-storage layout, via Beam's ``FileSystems``.

Object name: ``<root>/<version>/<type>/<user_id>-<start_time>.json`` (``start_time`` = the record's
``metadata.start_time``; athlete records use ``profile``). Content = ``event.body()``. Works for local paths,
``s3://`` and ``gs://`` roots alike (the cloud filesystems need their Beam extras installed). A local root (the paths
Beam gives its ``LocalFileSystem``) is written with plain file calls, as that filesystem writes, without its folder
check before each object: the folder is made when opening the file finds it missing.

Guarantees:
- Idempotent: the name is deterministic, so a redelivery overwrites the same object (never a second copy).
- Objects are written directly under their final name (no temp files left behind); a failed write is retried whole.
- Within a batch, when several events map to one object, only the newest (highest ``ordering_timestamp_ms``, later
  wins ties) is written and the superseded ones are reported delivered with it. Across batches the store is
  last-writer-wins: a stale redelivery arriving after a newer version overwrites it.
- A tombstone (``event.deleted``) removes the record's object: the one its ``start_time`` names (activity, sleep)
  or every object of the user's day (``<user_id>-<date>*``: day-scoped models); a deleted activity or sleep whose
  ``start_time`` is unknown (never seen by this deployment's record state) is found by reading the user's objects of
  that type for its ``summary_id``. Removing what is already gone is fine (idempotent). A batch's data and tombstones
  are applied in their order.
- Failures: I/O errors -> ``RetryableError``; permission denied -> ``FatalError``; events whose name cannot be built
  (missing ``metadata.start_time``, ``/`` or ``..`` in a name part) -> ``PermanentError``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.base import Sink, SinkResult

ATHLETE_START_TIME = "profile"


def safe_part(part: str, event: NormalizedEvent) -> str:
    """``part`` if it can be one segment of an object name; PermanentError otherwise."""
    if not part or "/" in part or "\\" in part or part in (".", "..") or "\x00" in part:
        raise PermanentError(f"unsafe object name part {part!r} for event {event.event_id}")
    return part


def terra_object_parts(event: NormalizedEvent) -> list[str]:
    """Terra's object layout ``<version>/<type>/<user_id>-<start_time>.json`` as name segments.

    Deterministic, so a redelivery overwrites the same object; PermanentError when a part is unusable.
    """
    if event.is_lifecycle:  # Terra: <version>/<event type>/<user_id>-<timestamp>.json
        start_time = datetime.fromtimestamp(event.ordering_timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds")
    elif event.type == "athlete":
        start_time = ATHLETE_START_TIME
    else:
        start_time = (event.data.get("metadata") or {}).get("start_time")
        if not isinstance(start_time, str) or not start_time:
            raise PermanentError(f"{event.type} record has no metadata.start_time to name its object")
    for part in (event.version, event.type, event.user_id, start_time):
        safe_part(part, event)
    return [event.version, event.type, f"{event.user_id}-{start_time}.json"]


def object_path(root: str, event: NormalizedEvent, filesystem: FileSystem | None = None) -> str:
    """The object name of ``event`` under ``root`` (see terra_object_parts); ``filesystem``: root's, when known."""
    return (filesystem or FileSystems).join(root, *terra_object_parts(event))


@dataclass(frozen=True)
class DeletedObjects:
    """Where a tombstone's objects are: under the ``folder`` segments, the object ``name`` (``exact``) or every object
    whose name starts with it; with ``confirm``, such an object is the record's only when its body names the record
    (``holds_record``)."""

    folder: list[str]
    name: str
    exact: bool
    confirm: bool


def deleted_objects(event: NormalizedEvent) -> DeletedObjects:
    """The objects ``terra_object_parts`` gave the record a tombstone deletes; PermanentError for an unusable part."""
    start_time = ATHLETE_START_TIME if event.type == "athlete" else event.data.get("start_time")
    for part in (event.version, event.type, event.user_id, event.natural_key):
        safe_part(part, event)
    folder = [event.version, event.type]
    if event.type in ("activity", "sleep", "athlete"):
        if isinstance(start_time, str) and start_time:
            return DeletedObjects(folder, f"{event.user_id}-{safe_part(start_time, event)}.json", True, False)
        return DeletedObjects(folder, f"{event.user_id}-", False, True)
    return DeletedObjects(folder, f"{event.user_id}-{event.natural_key}", False, False)  # the day's objects


def holds_record(body: bytes, event: NormalizedEvent) -> bool:
    """Whether an object's body (a Terra envelope) is the record ``event`` deletes (same ``summary_id``)."""
    try:
        records = json.loads(body).get("data") or []
        return any(str((r.get("metadata") or {}).get("summary_id")) == event.natural_key for r in records)
    except (ValueError, AttributeError, TypeError):
        return False


class ObjectStoreSink(Sink):
    """Writes each event's ``body()`` to ``object_path(root, event)``; see the module docstring."""

    ordered = True

    def __init__(self, name: str, root: str) -> None:
        super().__init__(name)
        if not root:
            raise FatalError(f"object store sink {name!r}: root is empty; give a directory, s3:// or gs:// URL")
        try:
            filesystem = FileSystems.get_filesystem(root)
        except ValueError as exc:
            raise FatalError(f"object store sink {name!r}: no Beam filesystem for {root!r}: {exc}") from None
        self.root = root
        self._local = type(filesystem) is LocalFileSystem  # exactly Beam's, not a subclass with a scheme
        self._filesystem: FileSystem | None = None  # root's, looked up once on the worker (with its pipeline options)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_filesystem"] = None
        return state

    def local_only(self) -> str | None:
        return None if "://" in self.root else f"root {self.root} is a local folder (give s3:// or gs://)"

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        """Data and tombstones in the batch's order (each run of data events as ``_write_records``)."""
        result = SinkResult()
        if self._filesystem is None:
            self._filesystem = FileSystems.get_filesystem(self.root)
        for deleting, run in itertools.groupby(events, key=lambda e: e.deleted):
            if not deleting:
                self._write_records(list(run), result)
                continue
            for event in run:
                try:
                    self._delete(event)
                except (RetryableError, FatalError, PermanentError) as exc:
                    result.fail_all([event], exc)
                else:
                    result.delivered.append(event.event_id)
        return result

    def _write_records(self, events: Sequence[NormalizedEvent], result: SinkResult) -> None:
        by_path: dict[str, list[NormalizedEvent]] = {}
        for event in events:
            try:
                by_path.setdefault(object_path(self.root, event, self._filesystem), []).append(event)
            except PermanentError as exc:
                result.fail_all([event], exc)
        for path, same_object in by_path.items():
            newest = max(reversed(same_object), key=lambda e: e.ordering_timestamp_ms)  # later wins ties
            try:
                self._put(path, newest.body())
            except (RetryableError, FatalError) as exc:
                result.fail_all(same_object, exc)
            else:
                result.delivered.extend(e.event_id for e in same_object)

    def _delete(self, event: NormalizedEvent) -> None:
        """Remove the objects of the record ``event`` deletes (``deleted_objects``); nothing there is fine."""
        where = deleted_objects(event)
        folder = self._filesystem.join(self.root, *where.folder)
        try:
            if where.exact:
                paths = [self._filesystem.join(folder, where.name)]
            else:
                found = FileSystems.match([self._filesystem.join(folder, where.name) + "*.json"])[0].metadata_list
                paths = [m.path for m in found]
            if where.confirm:
                paths = [p for p in paths if holds_record(_read(p), event)]
            for path in paths:
                if self._local:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                elif FileSystems.exists(path):
                    FileSystems.delete([path])
        except PermissionError as exc:
            raise FatalError(f"no permission to delete under {folder}: {exc}; grant delete on the root") from exc
        except OSError as exc:  # includes Beam's BeamIOError
            raise RetryableError(f"deleting {event.type} {event.natural_key} under {folder} failed: {exc}") from exc

    def _put(self, path: str, body: bytes) -> None:
        try:
            if self._local:
                _write_file(path, body)
            else:
                with self._filesystem.create(path, mime_type="application/json",
                                             compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                    handle.write(body)
        except PermissionError as exc:
            raise FatalError(f"no permission to write {path}: {exc}; grant create/overwrite on the root") from exc
        except OSError as exc:  # includes Beam's BeamIOError
            raise RetryableError(f"writing {path} failed: {exc}") from exc


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)


def _write_file(path: str, body: bytes) -> None:
    """``body`` as the file ``path``, created or truncated under that name (as ``LocalFileSystem.create`` and a
    write do), its folder made only when missing, and no buffered file object around the descriptor."""
    try:
        descriptor = os.open(path, _WRITE_FLAGS, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        descriptor = os.open(path, _WRITE_FLAGS, 0o666)
    try:
        remaining = memoryview(body)
        while remaining:
            remaining = remaining[os.write(descriptor, remaining):]
    finally:
        os.close(descriptor)
