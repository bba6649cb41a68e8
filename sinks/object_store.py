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
- A tombstone (``event.deleted``) removes the record's object: the one its ``start_time`` names (activity, sleep: if it
  holds that record, read to confirm, since two sessions starting at the same time share a name and the object then
  holds the later one) or every object of the user's day (``<user_id>-<date>*``: day-scoped models); a deleted activity
  or sleep whose ``start_time`` is unknown (never seen by this deployment's record state) is found by reading the user's
  objects of that type for its ``summary_id``. Removing what is already gone is fine (idempotent). A batch's data and
  tombstones are applied in their order; a run of tombstones is one match (every exact name, each (user, type)'s
  objects), one read of each object to confirm, one delete call. Glob characters in names match literally; a day-scoped
  key must be a day (``YYYY-MM-DD``), else PermanentError. The objects carry no version to compare with: a tombstone
  older than the stored object still removes it (replay, which knows the record state, never sends such a tombstone).
- Concurrency: a run of data events writes its objects (one per name) up to ``concurrency`` at once. The default
  is 8 on ``s3://``, ``gs://`` and other remote roots, where each object is a round trip, and 1 on a local folder,
  where creating a file is the kernel's CPU and measured no faster from several threads (``sinks.concurrent_writes``:
  one at a time until one is written, no thread at all with ``concurrency=1`` or two objects or fewer). A run of
  tombstones waits for every write before it, and the writes after it wait for it. The threads are the sink's own,
  made on the worker and ended by ``close()``; a ``s3://`` or ``gs://`` root's Beam filesystem is then called from
  several threads at once.
- Failures: I/O errors -> ``RetryableError``; permission denied -> ``FatalError`` for writes (of that object: the
  other objects are still written), ``PermanentError`` for a tombstone (dead-lettered, naming the missing permission;
  the run goes on); events whose name cannot be built (missing ``metadata.start_time``, ``/`` or ``..`` in a name
  part) -> ``PermanentError``. Any other exception of a write stops the batch (no write starts after it) and is
  raised by ``write``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from core.errors import FatalError, PermanentError, RetryableError
from core.events import DAY_KEY, NormalizedEvent
from sinks.base import Sink, SinkResult
from sinks.concurrent_writes import DEFAULT_CONCURRENCY, ConcurrentWrites, checked_concurrency

ATHLETE_START_TIME = "profile"
LOCAL_CONCURRENCY = 1  # a local folder's default: file creation is kernel CPU, no faster from several threads


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
    """The objects ``terra_object_parts`` gave the record a tombstone deletes; PermanentError for an unusable part
    (or a day-scoped key that is not a day, YYYY-MM-DD: a prefix such as a month would name more than the record)."""
    start_time = ATHLETE_START_TIME if event.type == "athlete" else event.data.get("start_time")
    for part in (event.version, event.type, event.user_id, event.natural_key):
        safe_part(part, event)
    folder = [event.version, event.type]
    if event.type in ("activity", "sleep", "athlete"):
        if isinstance(start_time, str) and start_time:  # another session of the user may hold that name: confirmed
            return DeletedObjects(folder, f"{event.user_id}-{safe_part(start_time, event)}.json", True,
                                  event.type != "athlete")
        return DeletedObjects(folder, f"{event.user_id}-", False, True)
    if not DAY_KEY.fullmatch(event.natural_key):
        raise PermanentError(f"tombstone {event.event_id}: {event.type} key {event.natural_key!r} is not a day "
                             "(YYYY-MM-DD)")
    return DeletedObjects(folder, f"{event.user_id}-{event.natural_key}", False, False)  # the day's objects


def escape_glob(text: str) -> str:
    """A ``FileSystems.match`` pattern matching ``text`` (and names differing from it only where it has ``*``, ``?``
    or ``[``: each is the one-character wildcard ``?``, since Beam's patterns cannot quote them); callers compare the
    names found with ``text`` literally."""
    return re.sub(r"[*?\[]", "?", text)


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

    def __init__(self, name: str, root: str, concurrency: int | None = None) -> None:
        super().__init__(name)
        if not root:
            raise FatalError(f"object store sink {name!r}: root is empty; give a directory, s3:// or gs:// URL")
        try:
            filesystem = FileSystems.get_filesystem(root)
        except ValueError as exc:
            raise FatalError(f"object store sink {name!r}: no Beam filesystem for {root!r}: {exc}") from None
        self.root = root
        self._local = type(filesystem) is LocalFileSystem  # exactly Beam's, not a subclass with a scheme
        if concurrency is None:
            concurrency = LOCAL_CONCURRENCY if self._local else DEFAULT_CONCURRENCY
        self.concurrency = checked_concurrency("object store", name, concurrency)
        self._filesystem: FileSystem | None = None  # root's, looked up once on the worker (with its pipeline options)
        self._writes = ConcurrentWrites(name, self.concurrency)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_filesystem"] = None
        return state

    def close(self) -> None:
        self._writes.close()

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
            self._delete_run(list(run), result)
        return result

    def _write_records(self, events: Sequence[NormalizedEvent], result: SinkResult) -> None:
        by_path: dict[str, list[NormalizedEvent]] = {}
        for event in events:
            try:
                by_path.setdefault(object_path(self.root, event, self._filesystem), []).append(event)
            except PermanentError as exc:
                result.fail_all([event], exc)
        groups = list(by_path.items())
        newest = [max(reversed(same_object), key=lambda e: e.ordering_timestamp_ms)  # later wins ties
                  for _, same_object in groups]
        outcomes = self._writes.run([functools.partial(self._put_event, path, event)
                                     for (path, _), event in zip(groups, newest, strict=True)],
                                    stops=lambda exc: not isinstance(exc, RetryableError | FatalError))
        for (_, same_object), outcome in zip(groups, outcomes, strict=False):
            if outcome is None:
                result.delivered.extend(e.event_id for e in same_object)
            elif isinstance(outcome, RetryableError | FatalError):
                result.fail_all(same_object, outcome)
            else:
                raise outcome  # unexpected: fails the batch, as when raised here

    def _delete_run(self, events: list[NormalizedEvent], result: SinkResult) -> None:
        """Remove the objects of a run of tombstones (``deleted_objects``) in one pass: one match of every exact name
        and of each (user, type)'s objects, each object read at most once (an activity or sleep never seen), one
        delete of every object found. Nothing there is fine. A delete the root does not permit fails the run's
        tombstones alone (PermanentError, dead-lettered), other I/O errors are retryable."""
        planned: list[tuple[NormalizedEvent, DeletedObjects, str]] = []
        for event in events:
            try:
                where = deleted_objects(event)
            except PermanentError as exc:
                result.fail_all([event], exc)
                continue
            planned.append((event, where, self._filesystem.join(self.root, *where.folder)))
        if not planned:
            return
        try:
            patterns = sorted({escape_glob(self._filesystem.join(folder, where.name)) if where.exact
                               else escape_glob(self._filesystem.join(folder, f"{event.user_id}-")) + "*.json"
                               for event, where, folder in planned})
            found = sorted({m.path for r in FileSystems.match(patterns) for m in r.metadata_list})
            bodies: dict[str, bytes] = {}
            doomed: list[str] = []
            for event, where, folder in planned:
                named = self._filesystem.join(folder, where.name)
                for path in found:
                    if path != named if where.exact else not path.startswith(named):
                        continue
                    if where.confirm and not holds_record(bodies.get(path) or bodies.setdefault(path, _read(path)),
                                                          event):
                        continue
                    doomed.append(path)
            self._remove(sorted(set(doomed)))
        except PermissionError as exc:
            error: Exception = PermanentError(f"tombstone not applied: no permission to list, read or delete under "
                                              f"{self.root}: {exc}; grant delete (and list/read) on the root")
        except OSError as exc:  # includes Beam's BeamIOError
            if any(isinstance(e, PermissionError) for e in (getattr(exc, "exception_details", None) or {}).values()):
                error = PermanentError(f"tombstone not applied: no permission to delete under {self.root}: {exc}; "
                                       "grant delete on the root")
            else:
                error = RetryableError(f"deleting {len(planned)} record(s) under {self.root} failed: {exc}")
        else:
            result.delivered.extend(event.event_id for event, *_ in planned)
            return
        result.fail_all([event for event, *_ in planned], error)

    def _remove(self, paths: list[str]) -> None:
        if self._local:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        elif paths:
            FileSystems.delete(paths)

    def _put_event(self, path: str, event: NormalizedEvent) -> None:
        self._put(path, event.body())

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
