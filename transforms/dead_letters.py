"""Dead-letter records: built in one place so every stage keeps the same evidence."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from transforms.errors import RetryableError


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
