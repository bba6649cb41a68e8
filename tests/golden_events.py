"""The bench data's normalized events as recorded before any speed work: what users receive must not change.

``python -m tests.golden_events`` rewrites ``tests/golden/bench_events.tsv.gz`` (only when a change of
output is intended, and said so in the commit); the tests compare against it.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable
from pathlib import Path

from core.events import NormalizedEvent

GOLDEN = Path(__file__).parent / "golden" / "bench_events.tsv.gz"
BENCH_USERS, BENCH_DAYS = 300, 4  # bench/run.py's defaults


def bench_payloads():
    from pipelines.demo_data import Simulator

    return list(Simulator(BENCH_USERS, BENCH_DAYS).payloads())


def fingerprint(event_id: str, ordering_timestamp_ms: int, body: bytes) -> str:
    """One line per event: its id, its ordering timestamp and a digest of the exact body bytes."""
    return f"{event_id}\t{ordering_timestamp_ms}\t{hashlib.sha256(body).hexdigest()}"


def fingerprints(events: Iterable[NormalizedEvent]) -> list[str]:
    return sorted(fingerprint(e.event_id, e.ordering_timestamp_ms, e.body()) for e in events)


def normalized_in_memory(payloads) -> list[NormalizedEvent]:
    """The bench's bare mapper loop: decode, map, validate and merge with no Beam."""
    from core.raw import RawMessage
    from schemas.serde import encode_raw
    from transforms.normalize import normalize_in_memory

    events, _ = normalize_in_memory(RawMessage(encode_raw(payload), {"partition": 0, "offset": offset})
                                    for offset, payload in enumerate(payloads))
    return events


def recorded() -> list[str]:
    return gzip.decompress(GOLDEN.read_bytes()).decode().splitlines()


def main() -> None:
    events = normalized_in_memory(bench_payloads())
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_bytes(gzip.compress(("\n".join(fingerprints(events)) + "\n").encode(), mtime=0))
    print(f"{len(events)} events recorded in {GOLDEN}")


if __name__ == "__main__":
    main()
