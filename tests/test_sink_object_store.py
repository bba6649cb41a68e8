"""ObjectStoreSink on a local temp dir: as a local root (plain file calls) and, through Beam's FileSystem for a URL
scheme (the code path of s3:// and gs://), as ``hftest://`` (Beam's local filesystem under a scheme of its own)."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.base import SinkResult
from sinks.object_store import ObjectStoreSink, terra_object_parts

MakeEvent = Callable[..., NormalizedEvent]


class SchemeFileSystem(LocalFileSystem):
    """``hftest:///abs/path``: Beam finds it among FileSystem subclasses, like its S3 and GCS filesystems."""

    created: list[str] = []

    @classmethod
    def scheme(cls) -> str:
        return "hftest"

    def join(self, basepath: str, *paths: str) -> str:
        return "/".join([basepath.rstrip("/"), *paths])

    def create(self, path: str, *args: Any, **kwargs: Any) -> BinaryIO:
        self.created.append(path)
        return super().create(path.removeprefix("hftest://"), *args, **kwargs)

    def open(self, path: str, *args: Any, **kwargs: Any) -> BinaryIO:
        return super().open(path.removeprefix("hftest://"), *args, **kwargs)

    def match(self, patterns: list[str], limits: Any = None) -> list[MatchResult]:
        found = super().match([p.removeprefix("hftest://") for p in patterns], limits)
        return [MatchResult(f"hftest://{r.pattern}", [FileMetadata(f"hftest://{m.path}", m.size_in_bytes)
                                                      for m in r.metadata_list]) for r in found]

    def exists(self, path: str) -> bool:
        return super().exists(path.removeprefix("hftest://"))

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            os.remove(path.removeprefix("hftest://"))


@pytest.fixture(params=["local", "scheme"])
def as_root(request: pytest.FixtureRequest) -> Callable[[Path], str]:
    """The sink's root for a local folder: the folder itself, or its hftest:// URL."""
    SchemeFileSystem.created.clear()
    return str if request.param == "local" else lambda folder: f"hftest://{folder}"


def stored_objects(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative name -> bytes): catches stray temp files too."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def athlete_event(user: str) -> NormalizedEvent:
    return NormalizedEvent.create(type="athlete", user={"user_id": user, "provider": "GARMIN"},
                                  data={"first_name": "Ada", "age": 36}, natural_key="profile",
                                  ordering_timestamp_ms=5, sequence="0")


def test_objects_after_writing_twice_with_an_update(tmp_path: Path, make_sink_event: MakeEvent,
                                                     as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    a1 = make_sink_event("u1", "2026-03-10")
    a2 = make_sink_event("u1", "2026-03-11")
    b1 = make_sink_event("u2", "2026-03-10")
    profile = athlete_event("u2")
    a1_updated = make_sink_event("u1", "2026-03-10", version=2, ordering_timestamp_ms=2_000)

    first = sink.write([a1, a2, b1, profile])
    second = sink.write([a1_updated, a2, b1, profile])

    assert first.failures == second.failures == []
    assert sorted(second.delivered) == sorted(e.event_id for e in (a1_updated, a2, b1, profile))
    assert stored_objects(tmp_path) == {
        "2022-03-16/sleep/u1-2026-03-10T22:00:00.000000+00:00.json": a1_updated.body(),
        "2022-03-16/sleep/u1-2026-03-11T22:00:00.000000+00:00.json": a2.body(),
        "2022-03-16/sleep/u2-2026-03-10T22:00:00.000000+00:00.json": b1.body(),
        "2022-03-16/athlete/u2-profile.json": profile.body(),
    }


def test_newest_version_wins_inside_one_batch(tmp_path: Path, make_sink_event: MakeEvent,
                                              as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    old = make_sink_event("u1", "2026-03-10", version=1, ordering_timestamp_ms=1_000)
    new = make_sink_event("u1", "2026-03-10", version=2, ordering_timestamp_ms=3_000)
    stale = make_sink_event("u1", "2026-03-10", version=3, ordering_timestamp_ms=2_000)
    tie = make_sink_event("u1", "2026-03-10", version=4, ordering_timestamp_ms=3_000)

    result = sink.write([old, new, stale])
    assert sorted(result.delivered) == sorted([old.event_id, new.event_id, stale.event_id])
    assert list(stored_objects(tmp_path).values()) == [new.body()]

    sink.write([new, tie])  # equal ordering timestamps: the later event wins
    assert list(stored_objects(tmp_path).values()) == [tie.body()]


def test_unnameable_events_are_permanent_and_nothing_escapes_root(tmp_path: Path, make_sink_event: MakeEvent,
                                                                  as_root: Callable[[Path], str]) -> None:
    root = tmp_path / "root"
    sink = ObjectStoreSink("store", as_root(root))
    no_start = NormalizedEvent.create(type="sleep", user={"user_id": "u1", "provider": "OURA"},
                                      data={"metadata": {}}, natural_key="k", ordering_timestamp_ms=1, sequence="0")
    traversal = make_sink_event("../../escape", "2026-03-10")
    good = make_sink_event("u1", "2026-03-10")

    result = sink.write([no_start, traversal, good])

    assert result.delivered == [good.event_id]
    errors = {f.event.event_id: f.error for f in result.failures}
    assert set(errors) == {no_start.event_id, traversal.event_id}
    assert all(isinstance(error, PermanentError) for error in errors.values())
    assert "metadata.start_time" in str(errors[no_start.event_id])
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()} == {
        "root/2022-03-16/sleep/u1-2026-03-10T22:00:00.000000+00:00.json"}


def test_io_error_is_retryable(tmp_path: Path, make_sink_event: MakeEvent, as_root: Callable[[Path], str]) -> None:
    not_a_directory = tmp_path / "plain-file"
    not_a_directory.write_text("occupied")
    sink = ObjectStoreSink("store", as_root(not_a_directory))
    events = [make_sink_event("u1", "2026-03-10"), make_sink_event("u1", "2026-03-11")]

    result = sink.write(events)

    assert result.delivered == [] and len(result.failures) == 2
    assert all(isinstance(f.error, RetryableError) for f in result.failures)


def test_bad_root_is_fatal() -> None:
    with pytest.raises(FatalError, match="root is empty"):
        ObjectStoreSink("store", "")
    with pytest.raises(FatalError, match="no Beam filesystem"):
        ObjectStoreSink("store", "nosuchscheme://bucket/prefix")


def test_sink_pickles(tmp_path: Path, make_sink_event: MakeEvent, as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    assert sink.write([make_sink_event("u1", "2026-03-10")]).failures == []  # its filesystem is looked up: not pickled
    copy = pickle.loads(pickle.dumps(sink))

    assert copy.write([make_sink_event("u1", "2026-03-11")]).failures == []
    assert len(stored_objects(tmp_path)) == 2


def test_only_scheme_roots_go_through_beams_create(tmp_path: Path, make_sink_event: MakeEvent,
                                                   as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))

    assert sink.write([make_sink_event("u1", "2026-03-10")]).failures == []

    expected = [] if as_root is str else [f"hftest://{tmp_path}/2022-03-16/sleep/u1-2026-03-10T22:00:00.000000+00:00.json"]
    assert SchemeFileSystem.created == expected


def test_local_folders_are_made_when_missing(tmp_path: Path, make_sink_event: MakeEvent) -> None:
    """The folder is not checked before each object: one removed between batches is made again."""
    root = tmp_path / "not" / "yet"
    sink = ObjectStoreSink("store", str(root))
    event = make_sink_event("u1", "2026-03-10")

    assert sink.write([event]).delivered == [event.event_id]
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    assert sink.write([event]).delivered == [event.event_id]

    assert stored_objects(root) == {"2022-03-16/sleep/u1-2026-03-10T22:00:00.000000+00:00.json": event.body()}



def _tombstone(event: NormalizedEvent, *, start_time: str | None = None, ordering_timestamp_ms: int = 2_000,
               ) -> NormalizedEvent:
    """The tombstone of ``event``'s record: a session's key is its ``summary_id`` (as the merge keys it)."""
    key = event.data["metadata"]["summary_id"] if event.type in ("activity", "sleep") else event.natural_key
    return NormalizedEvent.tombstone(type=event.type, user=event.user, natural_key=key,
                                     ordering_timestamp_ms=ordering_timestamp_ms, sequence="9", start_time=start_time)


def test_a_tombstone_removes_the_records_object_in_batch_order(tmp_path: Path, make_sink_event: MakeEvent,
                                                               as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    day, other = make_sink_event("u1", "2026-03-10", type="daily"), make_sink_event("u1", "2026-03-11", type="daily")
    sink.write([day, other])
    session = make_sink_event("u1", "2026-03-12", type="activity")
    known = _tombstone(session, start_time=session.data["metadata"]["start_time"])
    recreated = make_sink_event("u1", "2026-03-10", type="daily", version=2, ordering_timestamp_ms=3_000)

    result = sink.write([session, known, _tombstone(day), recreated, _tombstone(other), _tombstone(other)])

    assert len(result.delivered) == 6 and not result.failures  # deleting what is gone is fine
    assert sorted(stored_objects(tmp_path)) == ["2022-03-16/daily/u1-2026-03-10T22:00:00.000000+00:00.json"]
    assert b'"duration_asleep_state_seconds":3602' in stored_objects(tmp_path)[
        "2022-03-16/daily/u1-2026-03-10T22:00:00.000000+00:00.json"]


def test_a_tombstone_leaves_another_session_that_starts_at_the_same_time(tmp_path: Path, make_sink_event: MakeEvent,
                                                                          as_root: Callable[[Path], str]) -> None:
    """Two sessions of a user starting at the same time share an object name, which holds the later one: the
    tombstone of the other (a duplicate import deleted, say) leaves it; its own tombstone removes it."""
    sink = ObjectStoreSink("store", as_root(tmp_path))
    first = make_sink_event("u1", "2026-03-10", type="activity")
    data = make_sink_event("u1", "2026-03-10", type="activity", version=2).data
    second = NormalizedEvent.create(type="activity", user=first.user, natural_key="u1-dup",
                                    data={**data, "metadata": {**data["metadata"], "summary_id": "u1-dup"}},
                                    ordering_timestamp_ms=2_000, sequence="1")
    sink.write([first, second])
    start = first.data["metadata"]["start_time"]

    assert not sink.write([_tombstone(first, start_time=start, ordering_timestamp_ms=3_000)]).failures
    assert list(stored_objects(tmp_path).values()) == [second.body()]
    assert not sink.write([_tombstone(second, start_time=start, ordering_timestamp_ms=4_000)]).failures
    assert not stored_objects(tmp_path)


def test_a_tombstone_of_a_session_never_seen_finds_its_object_by_summary_id(tmp_path: Path, make_sink_event: MakeEvent,
                                                                            as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    gone = make_sink_event("u1", "2026-03-10", type="activity")
    kept = make_sink_event("u1", "2026-03-11", type="activity")
    sink.write([gone, kept])
    unknown_start = NormalizedEvent.tombstone(type="activity", user=gone.user, natural_key="u1-2026-03-10",
                                              ordering_timestamp_ms=2_000, sequence="9")

    assert sink.write([unknown_start]).delivered == [unknown_start.event_id]

    assert sorted(stored_objects(tmp_path)) == ["2022-03-16/activity/u1-2026-03-11T22:00:00.000000+00:00.json"]


def test_a_day_tombstone_whose_key_is_not_a_day_removes_nothing(tmp_path: Path, make_sink_event: MakeEvent,
                                                                 as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    sink.write([make_sink_event("u1", "2026-03-10", type="daily"), make_sink_event("u1", "2026-03-11", type="daily")])
    month = NormalizedEvent.tombstone(type="daily", user={"user_id": "u1", "provider": "OURA"}, natural_key="2026-03",
                                      ordering_timestamp_ms=2_000, sequence="9")

    result = sink.write([month])

    assert not result.delivered and isinstance(result.failures[0].error, PermanentError)
    assert "is not a day" in str(result.failures[0].error)
    assert len(stored_objects(tmp_path)) == 2


def test_glob_characters_in_a_name_are_matched_literally(tmp_path: Path, make_sink_event: MakeEvent,
                                                        as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    bracketed, plain = make_sink_event("u[1]", "2026-03-10", type="daily"), make_sink_event("u1", "2026-03-10",
                                                                                              type="daily")
    sink.write([bracketed, plain])

    assert sink.write([_tombstone(bracketed)]).delivered == [_tombstone(bracketed).event_id]

    assert sorted(stored_objects(tmp_path)) == ["2022-03-16/daily/u1-2026-03-10T22:00:00.000000+00:00.json"]


def test_a_run_of_tombstones_is_one_match_and_one_delete(tmp_path: Path, make_sink_event: MakeEvent,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sink = ObjectStoreSink("store", f"hftest://{tmp_path}")
    sessions = [make_sink_event("u1", f"2026-03-1{day}", type="activity") for day in range(4)]
    days = [make_sink_event("u1", f"2026-03-1{day}", type="daily") for day in range(3)]
    sink.write([*sessions, *days])
    calls: list[tuple[str, int]] = []
    match, delete = SchemeFileSystem.match, SchemeFileSystem.delete
    monkeypatch.setattr(SchemeFileSystem, "match", lambda self, patterns, limits=None: (
        calls.append(("match", len(patterns))), match(self, patterns, limits))[1])
    monkeypatch.setattr(SchemeFileSystem, "delete", lambda self, paths: (
        calls.append(("delete", len(paths))), delete(self, paths))[1])
    unknown_start = [NormalizedEvent.tombstone(type="activity", user=s.user, natural_key=s.data["metadata"][
        "summary_id"], ordering_timestamp_ms=2_000, sequence="9") for s in sessions[:3]]

    result = sink.write([*unknown_start, *map(_tombstone, days[:2])])

    assert len(result.delivered) == 5 and not result.failures
    assert calls == [("match", 2), ("delete", 5)]
    assert sorted(stored_objects(tmp_path)) == ["2022-03-16/activity/u1-2026-03-13T22:00:00.000000+00:00.json",
                                                "2022-03-16/daily/u1-2026-03-12T22:00:00.000000+00:00.json"]


def test_a_tombstone_the_root_does_not_permit_is_a_permanent_failure_of_its_own(
        tmp_path: Path, make_sink_event: MakeEvent, monkeypatch: pytest.MonkeyPatch,
        as_root: Callable[[Path], str]) -> None:
    sink = ObjectStoreSink("store", as_root(tmp_path))
    day = make_sink_event("u1", "2026-03-10", type="daily")
    sink.write([day])

    def denied(*args: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "remove", denied)
    result = sink.write([_tombstone(day)])  # not FatalError: the run goes on, this tombstone is dead-lettered

    assert isinstance(result.failures[0].error, PermanentError) and "grant delete" in str(result.failures[0].error)


# --- concurrent writes ---------------------------------------------------------------------------------------------
def _object_file(root: Path, event: NormalizedEvent) -> Path:
    path = root / "/".join(terra_object_parts(event))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_within(sink: ObjectStoreSink, events: list[NormalizedEvent], fifos: list[Path]) -> SinkResult:
    """``sink.write(events)`` in a thread of its own. Writing a FIFO blocks until a reader opens it: when the write has
    not returned in 20 s, every FIFO is opened for reading (so the blocked writes end) and the test fails."""
    returned: list[SinkResult] = []
    writer = threading.Thread(target=lambda: returned.append(sink.write(events)), daemon=True)
    writer.start()
    writer.join(20)
    if writer.is_alive():
        readers = [os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) for fifo in fifos]
        writer.join(20)
        for descriptor in readers:
            os.close(descriptor)
        pytest.fail("the writes waited for each other: a write at a time never reaches the FIFO the reader opened")
    return returned[0]


def test_a_batchs_objects_are_written_at_the_same_time(tmp_path: Path, make_sink_event: MakeEvent,
                                                       as_root: Callable[[Path], str]) -> None:
    """Objects 2-5 are FIFOs, read last first: opening one to write waits until the reader opens it, so writing one
    object at a time would wait on object 2 forever while the reader waits on object 5. Four at once pass."""
    sink = ObjectStoreSink("store", as_root(tmp_path), concurrency=4)
    events = [make_sink_event("u1", f"2026-03-1{day}") for day in range(5)]
    fifos = [_object_file(tmp_path, event) for event in events[1:]]
    for fifo in fifos:
        os.mkfifo(fifo)
    received: dict[Path, bytes] = {}

    def read_last_first() -> None:
        for fifo in reversed(fifos):
            with open(fifo, "rb") as reading:  # returns once this object's write has started
                received[fifo] = reading.read()

    threading.Thread(target=read_last_first, daemon=True).start()
    result = _write_within(sink, events, fifos)
    sink.close()

    assert result.delivered == [e.event_id for e in events] and not result.failures
    assert received == {fifo: event.body() for fifo, event in zip(fifos, events[1:], strict=True)}
    assert stored_objects(tmp_path) == {"/".join(terra_object_parts(events[0])): events[0].body()}


def test_a_tombstone_waits_for_the_writes_before_it_and_the_writes_after_it_wait_for_it(
        tmp_path: Path, make_sink_event: MakeEvent, as_root: Callable[[Path], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects 2 and 3 are FIFOs, read once both writes have started: while they are blocked the tombstone after them
    has not removed its object, nor has the write after it begun; when it removes it, the later writes have not
    begun either."""
    sink = ObjectStoreSink("store", as_root(tmp_path), concurrency=8)
    old = make_sink_event("u2", "2026-03-01", type="daily")
    assert sink.write([old]).delivered == [old.event_id]
    before = [make_sink_event("u1", f"2026-03-1{day}") for day in range(3)]
    after = [make_sink_event("u3", f"2026-03-1{day}") for day in range(4)]
    fifos = [_object_file(tmp_path, event) for event in before[1:]]
    for fifo in fifos:
        os.mkfifo(fifo)
    seen_while_blocked: list[tuple[bool, bool]] = []
    seen_when_removing: list[tuple[bool, list[bool]]] = []
    remove = os.remove

    def observed_remove(path: str) -> None:
        seen_when_removing.append((all(not f.exists() or f.is_fifo() for f in fifos),
                                   [_object_file(tmp_path, e).exists() for e in after]))
        remove(path)

    monkeypatch.setattr(os, "remove", observed_remove)

    def read_both() -> None:
        with open(fifos[1], "rb") as second:
            seen_while_blocked.append((_object_file(tmp_path, old).exists(), _object_file(tmp_path, after[0]).exists()))
            with open(fifos[0], "rb") as first:
                first.read()
            second.read()

    threading.Thread(target=read_both, daemon=True).start()
    result = _write_within(sink, [*before, _tombstone(old), *after], fifos)
    sink.close()

    assert len(result.delivered) == 8 and not result.failures
    assert seen_while_blocked == [(True, False)]  # old still there, the write after the tombstone not begun
    assert seen_when_removing == [(True, [False] * 4)]
    assert sorted(stored_objects(tmp_path)) == sorted(["/".join(terra_object_parts(before[0])),
                                                       *("/".join(terra_object_parts(e)) for e in after)])


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder no file can be created in, for root too (``chattr +i``, immutable)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True,
                                                     check=False).returncode == 0
    try:
        with contextlib.suppress(PermissionError), open(folder / "probe", "wb"):
            pytest.skip("cannot make a read-only folder here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_objects_that_cannot_be_written_fail_alone_and_the_others_are_written(
        tmp_path: Path, read_only_folder: Path, make_sink_event: MakeEvent) -> None:
    """Daily objects go to a read-only folder (permission denied: FatalError); one sleep object's name is taken by a
    folder (RetryableError); every other object of the batch is written, as when written one at a time."""
    results, stored = [], []
    for concurrency in (1, 8):
        root = tmp_path / f"root-{concurrency}"
        (root / "2022-03-16").mkdir(parents=True)
        (root / "2022-03-16" / "daily").symlink_to(read_only_folder)
        sleeps = [make_sink_event(f"u{n}", "2026-03-10") for n in range(6)]
        days = [make_sink_event(f"u{n}", "2026-03-10", type="daily") for n in range(3)]
        _object_file(root, sleeps[3]).mkdir()
        sink = ObjectStoreSink("store", str(root), concurrency=concurrency)
        result = sink.write([sleeps[0], days[0], *sleeps[1:4], days[1], *sleeps[4:], days[2]])
        sink.close()

        assert result.delivered == [e.event_id for e in (sleeps[0], *sleeps[1:3], *sleeps[4:])]
        errors = {f.event.event_id: type(f.error) for f in result.failures}
        assert errors == {**{e.event_id: FatalError for e in days}, sleeps[3].event_id: RetryableError}
        assert "grant create/overwrite" in str(result.failures[0].error)
        results.append((result.delivered, [(f.event.event_id, type(f.error)) for f in result.failures]))
        stored.append(stored_objects(root))
    assert results[0] == results[1] and stored[0] == stored[1] and len(stored[0]) == 5


def test_objects_written_at_once_are_those_written_one_at_a_time(tmp_path: Path, make_sink_event: MakeEvent,
                                                                 as_root: Callable[[Path], str]) -> None:
    first = [make_sink_event(f"u{n % 5}", f"2026-03-{10 + n // 5}", type=("sleep", "daily", "activity")[n % 3])
             for n in range(30)]
    gone = first[4]
    second = [
        *(make_sink_event(f"u{n}", "2026-03-20", version=v, ordering_timestamp_ms=t)  # newest wins within the batch
          for n in range(4) for v, t in ((1, 2_000), (2, 3_000), (3, 1_000))),
        NormalizedEvent.create(type="sleep", user={"user_id": "u1", "provider": "OURA"}, data={"metadata": {}},
                               natural_key="k", ordering_timestamp_ms=1, sequence="0"),  # unnameable
        _tombstone(gone), _tombstone(first[7]), athlete_event("u9"),
        *(make_sink_event(f"u{n}", "2026-03-21") for n in range(12)),
        make_sink_event(gone.user_id, gone.natural_key, type=gone.type, version=5, ordering_timestamp_ms=9_000),
    ]
    outcomes = []
    for concurrency in (1, 8):
        root = tmp_path / f"c{concurrency}"
        sink = ObjectStoreSink("store", as_root(root), concurrency=concurrency)
        results = [sink.write(first), sink.write(second)]
        sink.close()
        outcomes.append(([(r.delivered, [(f.event.event_id, type(f.error), str(f.error)) for f in r.failures])
                          for r in results], stored_objects(root)))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][1]) == 30 - 2 + 4 + 1 + 12 + 1


def _write_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"writes-{name}_")]


def test_threads_are_bounded_started_only_when_worth_it_and_ended_by_close(tmp_path: Path,
                                                                           make_sink_event: MakeEvent) -> None:
    one_at_a_time = ObjectStoreSink("serial", str(tmp_path / "serial"), concurrency=1)
    assert not one_at_a_time.write([make_sink_event(f"u{n}") for n in range(20)]).failures
    small = ObjectStoreSink("small", str(tmp_path / "small"))
    assert not small.write([make_sink_event("u1"), make_sink_event("u2")]).failures  # two objects: written inline
    assert _write_threads("serial") == _write_threads("small") == []

    sink = ObjectStoreSink("three", str(tmp_path / "three"), concurrency=3)
    for batch in range(3):
        assert not sink.write([make_sink_event(f"u{n}", f"2026-03-1{batch}") for n in range(40)]).failures
    assert 1 <= len(_write_threads("three")) <= 2  # the calling thread is the third
    copy = pickle.loads(pickle.dumps(sink))  # no thread travels
    sink.close()
    assert _write_threads("three") == []
    assert not copy.write([make_sink_event(f"u{n}", "2026-03-20") for n in range(5)]).failures  # threads made again
    copy.close()
    assert len(stored_objects(tmp_path / "three")) == 125


@pytest.mark.parametrize("concurrency", [0, -1, 65, 2.5, "8", True])
def test_a_bad_concurrency_is_fatal_and_names_the_fix(tmp_path: Path, concurrency: Any) -> None:
    with pytest.raises(FatalError, match=r"object store sink 'store': concurrency must be a whole number from 1 to 64"):
        ObjectStoreSink("store", str(tmp_path), concurrency=concurrency)


def test_concurrency_defaults_to_one_on_a_local_folder_and_eight_on_a_remote_root(tmp_path: Path) -> None:
    """A local folder's files are created by the kernel's CPU (no faster from threads); a remote root's objects are
    round trips, written several at once."""
    assert ObjectStoreSink("store", str(tmp_path)).concurrency == 1
    assert ObjectStoreSink("store", f"hftest://{tmp_path}").concurrency == 8


@pytest.mark.parametrize("concurrency", [1, 8])
def test_an_unexpected_error_stops_the_batch_and_is_raised(tmp_path: Path, make_sink_event: MakeEvent,
                                                           monkeypatch: pytest.MonkeyPatch, concurrency: int) -> None:
    """Not an I/O error (e.g. a filesystem bug): no write starts after it, and ``write`` raises it, as before."""
    events = [make_sink_event(f"u{n}") for n in range(10)]
    broken = f"hftest://{tmp_path}/{'/'.join(terra_object_parts(events[2]))}"
    create = SchemeFileSystem.create

    def create_or_fail(self: SchemeFileSystem, path: str, *args: Any, **kwargs: Any) -> BinaryIO:
        if path == broken:
            raise RuntimeError("filesystem bug")
        return create(self, path, *args, **kwargs)

    monkeypatch.setattr(SchemeFileSystem, "create", create_or_fail)
    sink = ObjectStoreSink("store", f"hftest://{tmp_path}", concurrency=concurrency)
    with pytest.raises(RuntimeError, match="filesystem bug"):
        sink.write(events)
    sink.close()

    written = set(stored_objects(tmp_path))
    assert {"/".join(terra_object_parts(e)) for e in events[:2]} <= written
    assert len(written) <= (2 if concurrency == 1 else 9)
