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
