"""A file is read in byte ranges spread over workers: together they give exactly the messages one pass over the
whole file gives (same bytes, same line numbers, blank lines skipped), however the ranges fall."""

from __future__ import annotations

import gzip
import itertools
import random

import pytest

from transforms import sources
from transforms.sources import FileRange, plan_ranges, read_lines, read_range


def _lines(rng: random.Random) -> bytes:
    shapes = [lambda: b"\n", lambda: b"  \r\n", lambda: b"x" * rng.randint(50, 400) + b"\r\n",
              lambda: b'{"a": %d, "text": "\\r"}\n' % rng.randint(0, 10**9)]
    data = b"".join(rng.choice(shapes)() for _ in range(rng.randint(0, 60)))
    return data.rstrip(b"\n") if rng.random() < 0.3 else data  # a last line without its newline, at times


def test_ranges_together_read_every_line_once_with_its_line_number(tmp_path, monkeypatch):
    rng = random.Random(7)
    for trial in range(300):
        data = _lines(rng)
        path = tmp_path / f"raw{trial}.jsonl"
        path.write_bytes(data)
        size = rng.randint(1, 200)
        monkeypatch.setattr(sources, "RANGE_BYTES", (size, size))
        monkeypatch.setattr(sources, "SCAN_BLOCK", rng.choice([1, 3, 64, 1 << 20]))
        ranges = list(plan_ranges(str(path), len(data)))
        assert ranges[0].start == 0 and ranges[-1].end is None
        assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
        assert [m for r in ranges for m in read_range(r)] == list(read_lines(str(path)))


def test_whole_file_reading_keeps_line_numbers_and_bytes(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\n  \n{"b": 2}')
    assert [(m.data, m.source["line"]) for m in read_lines(str(path))] == [(b'{"a": 1}', 1), (b'{"b": 2}', 4)]


def test_a_small_or_compressed_file_is_one_range(tmp_path, monkeypatch):
    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"a": 1}\n' * 10)
    assert list(plan_ranges(str(small), 90)) == [FileRange(str(small))]
    monkeypatch.setattr(sources, "RANGE_BYTES", (10, 10))
    packed = tmp_path / "raw.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000))
    assert list(plan_ranges(str(packed), packed.stat().st_size)) == [FileRange(str(packed))]


def test_ranges_are_about_a_share_of_the_file(tmp_path):
    path = tmp_path / "raw.jsonl"
    line = b'{"a": "' + b"x" * 1000 + b'"}\n'
    path.write_bytes(line * 4000)  # ~4 MB: four ranges of at least the 1 MiB floor
    ranges = list(plan_ranges(str(path), path.stat().st_size))
    assert len(ranges) == 4
    assert all(r.end is None or r.end - r.start >= sources.RANGE_BYTES[0] for r in ranges)
    assert sum(1 for r in ranges for _ in read_range(r)) == 4000


@pytest.mark.parametrize("size", [0, None])
def test_an_empty_or_unsized_file_is_read_whole(tmp_path, size):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b"")
    assert list(plan_ranges(str(path), size)) == [FileRange(str(path))]


def test_a_compressed_file_is_read_end_to_end(tmp_path):
    packed = tmp_path / "raw.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"a": 1}\n\n{"b": 2}\r\n'))
    (only,) = plan_ranges(str(packed), packed.stat().st_size)
    assert [(m.data, m.source["line"]) for m in read_range(only)] == [(b'{"a": 1}', 1), (b'{"b": 2}', 3)]


@pytest.mark.parametrize("rewrite", [
    lambda data: data.replace(b'"n": 1,', b'"n": 1111,'),  # a line longer: every later cut falls inside a line
    lambda data: data[data.index(b"\n", 200) + 1:],  # shorter: a range now ends past the file
])
def test_a_file_rewritten_after_planning_fails_the_run_instead_of_misreading(tmp_path, monkeypatch, rewrite):
    path = tmp_path / "raw.jsonl"
    data = b"".join(b'{"n": %d, "pad": "%s"}\n' % (n, b"z" * (n % 7)) for n in range(40))
    path.write_bytes(data)
    monkeypatch.setattr(sources, "RANGE_BYTES", (100, 100))
    ranges = list(plan_ranges(str(path), len(data)))
    path.write_bytes(rewrite(data))
    with pytest.raises(sources.FileChanged, match="changed while this run read it"):
        for file_range in ranges:
            list(read_range(file_range))


def test_an_appended_file_reads_what_was_planned_and_the_rest(tmp_path, monkeypatch):
    path = tmp_path / "raw.jsonl"
    data = b"".join(b'{"n": %d}\n' % n for n in range(40))
    path.write_bytes(data)
    monkeypatch.setattr(sources, "RANGE_BYTES", (50, 50))
    ranges = list(plan_ranges(str(path), len(data)))
    path.write_bytes(data + b'{"n": 40}\n')
    assert [m.source["line"] for r in ranges for m in read_range(r)] == list(range(1, 42))


def test_remote_files_are_cut_in_ranges_no_smaller_than_a_read_buffer(monkeypatch):
    blocks = [b"x" * 99 + b"\n"] * 10_000  # 1 MB of 100-byte lines, never read from a range smaller than the floor

    class Remote:
        def __init__(self):
            self.blocks = iter([b"".join(blocks)])

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def read(self, _):
            return next(self.blocks, b"")

    monkeypatch.setattr(sources.FileSystems, "open", lambda *a, **k: Remote())
    monkeypatch.setattr(sources, "RANGE_BYTES", (1_000, 64 << 20))  # a local file of 1 MB: 32 ranges
    monkeypatch.setattr(sources, "REMOTE_RANGE_BYTES", 300_000)
    ranges = list(plan_ranges("s3://bucket/raw.jsonl", 1_000_000))
    assert len(ranges) == 4 and all(r.end is None or r.end - r.start >= 300_000 for r in ranges)


def test_a_handle_that_cannot_peek_is_read_through_a_buffer_not_byte_by_byte(tmp_path, monkeypatch):
    """Google Cloud Storage's BlobReader has no ``peek``: iterating it reads one byte per call to find each newline."""
    from google.cloud.storage.fileio import BlobReader

    data = b"".join(b'{"n": %d, "pad": "%s"}\r\n' % (n, b"x" * 200) for n in range(2_000))
    reads = []

    class Blob:  # what BlobReader asks of a blob
        size = len(data)

        def reload(self, **_):
            pass

        def download_as_bytes(self, start=0, end=None, **_):
            reads.append(start)
            return data[start:None if end is None else end + 1]

    path = tmp_path / "raw.jsonl"
    path.write_bytes(data)
    expected = [(m.data, m.source["line"]) for m in read_lines(str(path))]  # the same bytes, as a local file
    monkeypatch.setattr(sources.FileSystems, "open", lambda *a, **k: BlobReader(Blob(), chunk_size=1 << 16))
    monkeypatch.setattr(sources, "RANGE_BYTES", (100_000, 100_000))
    ranges = list(plan_ranges("gs://bucket/raw.jsonl", len(data)))
    assert len(ranges) > 3
    calls = []
    monkeypatch.setattr(BlobReader, "read", lambda self, size=-1, _read=BlobReader.read: calls.append(size) or
                        _read(self, size))
    got = [(m.data, m.source["line"]) for r in ranges for m in read_range(r)]
    assert got == expected
    assert len(calls) < 100  # byte by byte it was over 400,000


@pytest.mark.parametrize("cut_after_lines", [0, 1])  # at the last range's start, or a line into it
def test_a_file_cut_short_in_its_last_range_fails_the_run(tmp_path, monkeypatch, cut_after_lines):
    path = tmp_path / "raw.jsonl"
    data = b"".join(b'{"n": %d}\n' % n for n in range(40))
    path.write_bytes(data)
    monkeypatch.setattr(sources, "RANGE_BYTES", (150, 150))
    ranges = list(plan_ranges(str(path), len(data)))
    cut = ranges[-1].start
    for _ in range(cut_after_lines):
        cut = data.index(b"\n", cut) + 1
    path.write_bytes(data[:cut])
    with pytest.raises(sources.FileChanged, match="changed while this run read it"):
        for file_range in ranges:
            list(read_range(file_range))
