"""Shared pytest fixtures. Each block belongs to one area; add new fixtures in their own block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from transforms.events import NormalizedEvent


# ======================================================================================================================
# Sink tests (tests/test_sink_*.py): event factory
# ======================================================================================================================
@pytest.fixture
def make_sink_event() -> Callable[..., NormalizedEvent]:
    """Build a sleep (or ``type=``) event for ``user`` starting on ``day``; ``version`` varies the content."""

    def make(user: str = "user-1", day: str = "2026-03-12", *, version: int = 1, ordering_timestamp_ms: int = 1_000,
             sequence: str = "0", type: str = "sleep", provider: str = "OURA", **extra: Any) -> NormalizedEvent:
        start_time = f"{day}T22:00:00.000000+00:00"
        data: dict[str, Any] = {
            "metadata": {"start_time": start_time, "end_time": f"{day}T23:30:00.000000+00:00",
                         "summary_id": f"{user}-{day}", "upload_type": 1},
            "sleep_durations_data": {"asleep": {"duration_asleep_state_seconds": 3600 + version}},
            **extra,
        }
        return NormalizedEvent.create(type=type, user={"user_id": user, "provider": provider}, data=data,
                                      natural_key=day, ordering_timestamp_ms=ordering_timestamp_ms, sequence=sequence)

    return make
# ======================================================================================================================
# End of sink test fixtures
# ======================================================================================================================
