"""ObjectStoreSink on a local temp dir: as a local root (plain file calls) and, through Beam's FileSystem for a URL
scheme (the code path of s3:// and gs://), as ``hftest://`` (Beam's local filesystem under a scheme of its own)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.object_store import ObjectStoreSink

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
    return NormalizedEvent.tombstone(type=event.type, user=event.user, natural_key=event.natural_key,
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
