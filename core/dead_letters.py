"""Dead letters: built in one place so every stage keeps the same evidence, and the store that keeps them.

The store keeps one JSON object per dead letter under ``<root>/<stage>/<id>.json``, written through Beam
FileSystems (local path, ``s3://``, ``gs://``). Names are the deterministic dead-letter ids, so a reprocessed
failure overwrites its earlier record instead of duplicating it. The original bytes are kept exactly (base64)
next to a readable copy when they are UTF-8.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

from apache_beam.io.filesystems import FileSystems

from core.errors import RetryableError
from core.secrets import private_file

SCRATCH_PREFIX = ".replay-"


def dead_letter(*, stage: str, error: BaseException, original: bytes, source: dict[str, Any] | None = None,
                attempts: int = 1, provider: str | None = None, kind: str | None = None,
                user_id: str | None = None, destination: str | None = None,
                event_id: str | None = None, next_attempt_at: int | None = None,
                redelivery_round: int = 0) -> dict[str, Any]:
    """A DeadLetter record (schemas/avro/envelopes/dead_letter.avsc) as a dict.

    The id is deterministic over (stage, destination, source, original bytes): the same failure of
    the same input overwrites rather than piles up.
    """
    source = {k: str(v) for k, v in (source or {}).items() if v is not None}
    digest = hashlib.sha256()
    for part in (stage, destination or "", repr(sorted(source.items())), event_id or ""):
        digest.update(part.encode() + b"\0")
    digest.update(original)
    message = str(error)
    if isinstance(error, RetryableError):
        message = f"gave up after {attempts} attempt(s): {message}"
    return {
        "dead_letter_id": f"dlq_{digest.hexdigest()[:32]}",
        "stage": stage,
        "error_class": type(error).__name__,
        "error_message": message[:2000],
        "attempts": attempts,
        "failed_at": int(time.time() * 1000),
        "original": original,
        "source": source,
        "provider": provider,
        "kind": kind,
        "user_id": user_id,
        "destination": destination,
        "event_id": event_id,
        "next_attempt_at": next_attempt_at,
        "redelivery_round": redelivery_round,
    }


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
    """Store (or overwrite, same id) one dead letter; returns its path. It holds raw health data: a local one is
    created 0600, in folders created 0700 (``core.secrets.private_file``)."""
    path = dead_letter_path(root, record)
    if FileSystems.get_scheme(path) is None:  # a local path (object stores have their own access control)
        private_file(path, companions=())
    with FileSystems.create(path) as handle:
        handle.write(to_json(record))
    return path


def delete_dead_letter(root: str, record: dict[str, Any]) -> None:
    FileSystems.delete([dead_letter_path(root, record)])


def read_dead_letters(root: str) -> Iterator[dict[str, Any]]:
    """Every dead letter under ``root`` (for inspection, summaries and replay), oldest first. One that goes between
    the listing and its read (a running job redelivered it, a replay settled it) is no longer a dead letter: left
    out."""
    root = root.rstrip("/")
    matches = FileSystems.match([f"{root}/**.json"])[0].metadata_list
    records = []
    for match in matches:
        if f"/{SCRATCH_PREFIX}" in match.path[len(root):]:  # a replay in progress
            continue
        try:
            with FileSystems.open(match.path) as handle:
                records.append(from_json(handle.read()))
        except Exception:  # OSError locally and on S3 (BeamIOError included), google.api_core's NotFound on GCS
            if FileSystems.exists(match.path):
                raise
    yield from sorted(records, key=lambda r: (r["failed_at"], r["dead_letter_id"]))
