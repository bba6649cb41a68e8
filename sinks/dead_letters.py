"""The dead-letter store: one JSON object per dead letter under ``<root>/<stage>/<id>.json``.

Written through Beam FileSystems (local path, ``s3://``, ``gs://``). Names are the deterministic
dead-letter ids, so a reprocessed failure overwrites its earlier record instead of duplicating it.
The original bytes are kept exactly (base64) next to a readable copy when they are UTF-8.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

SCRATCH_PREFIX = ".replay-"


def to_json(record: dict[str, Any]) -> bytes:
    out = {k: v for k, v in record.items() if k != "original"}
    original: bytes = record["original"]
    out["original_base64"] = base64.b64encode(original).decode()
    with contextlib.suppress(UnicodeDecodeError):
        out["original_text"] = original.decode("utf-8")
    return json.dumps(out, indent=1, sort_keys=True).encode()


def from_json(data: bytes) -> dict[str, Any]:
    record = json.loads(data)
    record.pop("original_text", None)
    record["original"] = base64.b64decode(record.pop("original_base64"))
    return record


def stage_folder(stage: str) -> str:
    return stage.replace(":", "/")


def dead_letter_path(root: str, record: dict[str, Any]) -> str:
    return f"{root.rstrip('/')}/{stage_folder(record['stage'])}/{record['dead_letter_id']}.json"


def write_dead_letter(root: str, record: dict[str, Any]) -> str:
    """Store (or overwrite, same id) one dead letter; returns its path."""
    path = dead_letter_path(root, record)
    with FileSystems.create(path) as handle:
        handle.write(to_json(record))
    return path


def delete_dead_letter(root: str, record: dict[str, Any]) -> None:
    FileSystems.delete([dead_letter_path(root, record)])


class WriteDeadLetter(beam.DoFn):
    """Persist each dead letter; yields its path. An I/O error fails the bundle (Beam retries it)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def process(self, record: dict[str, Any]) -> Iterator[str]:
        yield write_dead_letter(self.root, record)


def read_dead_letters(root: str) -> Iterator[dict[str, Any]]:
    """Every dead letter under ``root`` (for inspection, summaries and replay), oldest first."""
    root = root.rstrip("/")
    matches = FileSystems.match([f"{root}/**.json"])[0].metadata_list
    records = []
    for match in matches:
        if f"/{SCRATCH_PREFIX}" in match.path[len(root):]:  # a replay in progress
            continue
        with FileSystems.open(match.path) as handle:
            records.append(from_json(handle.read()))
    yield from sorted(records, key=lambda r: (r["failed_at"], r["dead_letter_id"]))
