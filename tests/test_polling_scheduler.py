"""The poll scheduler (interval, jitter, new connections, clean stop) and the cursor store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
import requests

from controlplane.polling import (
    CursorStore,
    KafkaPublisher,
    LocalRateLimiter,
    PollConnection,
    Poller,
    RedisRateLimiter,
    Scheduler,
    TokenRejected,
)
from core.errors import FatalError
from core.store import Store

pytest.register_assert_rewrite("servers.fake_provider_api")
from servers.fake_provider_api import FakeProviderApi, consume_raw  # noqa: E402

pytest_plugins = ("servers.fake_provider_api",)  # fixtures: redis_client, limiter_namespace

NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
READINESS = json.loads((Path(__file__).parent / "fixtures" / "oura" / "daily_readiness.json").read_text())["data"][0]
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def loopback_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def poller_for(api: FakeProviderApi, tmp_path: Path, bootstrap: str, topic: str, limiter) -> Poller:
    """A poller without Oura's hook: these tests time the scheduler's polls, not the offset lookups the hook may add
    (tests/test_cycle_oura.py polls through it)."""
    return Poller(cursors=CursorStore(f"sqlite:///{tmp_path}/state.db"), publisher=KafkaPublisher(bootstrap, topic),
                  limiter=limiter, manifests={"oura": api.manifest}, session_factory=loopback_session,
                  clock=lambda: NOW, backoff_s=0.05, hooks={})


def test_scheduler_polls_every_connection_at_its_interval_and_stops_cleanly(tmp_path, broker, topic):
    """The in-process limiter (embedded/demo case) behind the same poller."""
    with FakeProviderApi("oura", tokens=("token-a", "token-b")) as api:
        api.add("daily_readiness", [{**READINESS, "id": f"r-{d}", "day": f"2024-03-{d}"} for d in range(15, 21)])
        poller = poller_for(api, tmp_path, broker.bootstrap, topic, LocalRateLimiter())
        connections = [PollConnection("user-a", "oura", "oura-a"), PollConnection("user-x", "oura", "oura-x")]
        errors: list[tuple[str, str, BaseException]] = []
        tokens = {"user-a": "token-a", "user-b": "token-b", "user-x": "token-x"}  # user-x's was revoked
        scheduler = Scheduler(poller, lambda: list(connections), lambda c: tokens[c.user_id], interval_s=0.4,
                              jitter=0.25, refresh_s=0.1, kinds=lambda c: ["daily_readiness"],
                              on_error=lambda c, kind, exc: errors.append((c.user_id, kind, exc)))
        with scheduler:
            time.sleep(0.5)
            connections.append(PollConnection("user-b", "oura", "oura-b"))  # picked up at the next refresh
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (len([r for r in api.requests if r.token == "token-a"]) < 3
                                                   or len([r for r in api.requests if r.token == "token-b"]) < 2):
                time.sleep(0.05)
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 2
        after_stop = len(api.requests)
        time.sleep(0.6)
        assert len(api.requests) == after_stop  # nothing polls after stop()

        polls = {token: [r.at for r in api.requests if r.token == token] for token in ("token-a", "token-b", "token-x")}
        assert len(polls["token-a"]) >= 3 and len(polls["token-b"]) >= 2
        for times in polls.values():  # every interval × (1 ± jitter), never sooner; a rejected token (x) neither
            assert all(later - earlier >= 0.4 * 0.75 - 0.02 for earlier, later in pairwise(times))
        assert {(user, kind, type(exc)) for user, kind, exc in errors} == {("user-x", "daily_readiness", TokenRejected)}
        events = consume_raw(broker.bootstrap, topic)
        assert sorted({e["user_id"] for e, _ in events}) == ["oura-a", "oura-b"]
        assert len(events) == len(api.served("daily_readiness"))


def test_stop_cancels_a_poll_waiting_on_a_long_rate_limit_pause(tmp_path, broker, topic, redis_client,
                                                                limiter_namespace):
    with FakeProviderApi("oura") as api:
        limiter = RedisRateLimiter(redis_client, namespace=limiter_namespace)
        poller = poller_for(api, tmp_path, broker.bootstrap, topic, limiter)
        limiter.pause("oura", 30)  # another worker got a 429 with Retry-After: 30
        scheduler = Scheduler(poller, lambda: [PollConnection("user-a", "oura", "oura-a")], lambda c: "token-1",
                              interval_s=60, jitter=0.0, kinds=lambda c: ["daily_readiness"])
        scheduler.start()
        time.sleep(0.3)
        started = time.monotonic()
        scheduler.stop()
        assert time.monotonic() - started < 2
        assert api.requests == []
        assert poller.cursors.get("user-a", "daily_readiness") is None


def test_run_once_polls_everything_and_push_providers_are_skipped(tmp_path, broker, topic, redis_client,
                                                                  limiter_namespace):
    with FakeProviderApi("oura") as api:
        api.add("daily_sleep", [{**READINESS, "id": "s-1", "day": "2024-03-19"}])
        poller = poller_for(api, tmp_path, broker.bootstrap, topic,
                            RedisRateLimiter(redis_client, namespace=limiter_namespace))
        garmin = PollConnection("user-g", "garmin", "g-1")
        scheduler = Scheduler(poller, lambda: [PollConnection("user-a", "oura", "oura-a"), garmin],
                              lambda c: "token-1")
        assert scheduler.default_kinds(garmin) == []  # Garmin pushes its data; it is never polled
        results = scheduler.run_once()
        assert sorted(r.kind for r in results) == sorted(api.manifest.api.endpoints)  # every Oura kind, once
        assert sum(r.published for r in results) == 1


@pytest.fixture(params=["sqlite", "postgres"])
def cursor_store(request, tmp_path):
    if request.param == "sqlite":
        yield CursorStore(f"sqlite:///{tmp_path}/cursors.db")
        return
    try:
        store = Store(POSTGRES_URL).open()
    except FatalError as exc:
        pytest.fail(f"PostgreSQL is not reachable (the machine runs it; .ci/ensure-services starts it): {exc}")
    table = f"poll_cursors_{secrets.token_hex(4)}"
    yield CursorStore(store, table=table)
    store.execute(f"DROP TABLE IF EXISTS {table}")
    store.close()


def test_cursors_only_move_forward_and_backfills_have_their_own(cursor_store):
    t1, t2 = NOW, NOW + timedelta(hours=1)
    assert cursor_store.get("u", "sleep") is None
    cursor_store.advance("u", "sleep", t2)
    cursor_store.advance("u", "sleep", t1)  # a slower concurrent poll finishing late cannot rewind it
    assert cursor_store.get("u", "sleep") == t2
    track = "backfill:2024-01-01T00:00:00+00:00/2024-03-01T00:00:00+00:00"
    cursor_store.advance("u", "sleep", datetime(2024, 1, 31, tzinfo=UTC), track)
    assert cursor_store.get("u", "sleep", track) == datetime(2024, 1, 31, tzinfo=UTC)
    assert cursor_store.get("u", "sleep") == t2 and cursor_store.get("u", "workout") is None
    threads = [threading.Thread(target=cursor_store.advance, args=("u", "hr", NOW + timedelta(minutes=i)))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cursor_store.get("u", "hr") == NOW + timedelta(minutes=7)
    cursor_store.reset("u", "sleep")
    assert cursor_store.get("u", "sleep") is None and cursor_store.get("u", "sleep", track) is None
    assert cursor_store.get("u", "hr") is not None
    assert date(2024, 3, 20) == NOW.date()
