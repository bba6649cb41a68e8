"""The poller against real things: a fake provider API over HTTP, the machine's Redis, a Tansu broker, SQLite."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests

from connectors import registry
from connectors.hooks import default_hooks
from connectors.manifest import Pagination, RateLimit
from controlplane.polling import (
    BACKFILL_HEADER,
    CursorStore,
    KafkaPublisher,
    PollConnection,
    Poller,
    PublishFailed,
    RedisRateLimiter,
    TokenRejected,
)
from controlplane.polling.ratelimit import http_date
from core.errors import PermanentError, RetryableError
from pipelines.embedded import free_port

pytest.register_assert_rewrite("servers.fake_provider_api")
from servers.fake_provider_api import FakeProviderApi, consume_raw  # noqa: E402

pytest_plugins = ("servers.fake_provider_api",)  # fixtures: redis_client, limiter_namespace

FIXTURES = Path(__file__).parent / "fixtures"
NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
READINESS = json.loads((FIXTURES / "oura" / "daily_readiness.json").read_text())["data"][0]
CYCLE = json.loads((FIXTURES / "whoop" / "cycle.page.json").read_text())["records"][0]
OURA_A = PollConnection("user-a", "oura", "oura-a")
OURA_B = PollConnection("user-b", "oura", "oura-b")
WHOOP = PollConnection("user-w", "whoop", "245199")


def readiness(day: date) -> dict:
    return {**READINESS, "id": f"readiness-{day}", "day": day.isoformat(), "timestamp": f"{day}T00:00:00+00:00"}


def readiness_days(first: date, count: int, step: int = 1) -> list[dict]:
    return [readiness(first + timedelta(days=i * step)) for i in range(count)]


def cycle(index: int, start: datetime) -> dict:
    stamp = start.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    end = (start + timedelta(hours=20)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {**CYCLE, "id": 5000 + index, "user_id": 245199, "start": stamp, "end": end, "created_at": stamp,
            "updated_at": end}


def loopback_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: never through a proxy from the environment
    return session


@pytest.fixture
def make_poller(tmp_path, broker, topic, limiter_namespace):
    made: list[Poller] = []

    def make(manifest, *, publisher=None, clock=lambda: NOW, **options) -> Poller:
        # these tests count the requests of the poller's own mechanics: Oura's hook (which may ask daily_activity for
        # the user's offsets) is left out; tests/test_cycle_oura.py polls through it
        options.setdefault("hooks", {slug: hook for slug, hook in default_hooks().items() if slug != "oura"})
        poller = Poller(cursors=CursorStore(f"sqlite:///{tmp_path}/state.db"),
                        publisher=publisher or KafkaPublisher(broker.bootstrap, topic),
                        limiter=RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=limiter_namespace),
                        manifests={manifest.provider: manifest}, session_factory=loopback_session, clock=clock,
                        **{"backoff_s": 0.05, "overlap": timedelta(0), **options})
        made.append(poller)
        return poller

    yield make
    for poller in made:
        poller.stop()
        poller.publisher.close()


def fast_limit(api: FakeProviderApi, requests_per_s: int = 10):
    return api.manifest_with(rate_limits=[RateLimit(requests=requests_per_s, per_seconds=1.0, scope="app")])


def test_oura_token_pagination_publishes_every_page_exactly_once(make_poller, broker, topic):
    with FakeProviderApi("oura", page_size=3) as api:
        api.add("daily_readiness", readiness_days(date(2024, 3, 1), 20))  # 8 of them in the first poll's window
        poller = make_poller(api.manifest)
        result = poller.poll(OURA_A, "daily_readiness", lambda: "token-1")

        served = api.served("daily_readiness")
        assert [r.params.get("next_token") is None for r in served] == [True, False, False]
        assert len({r.params.get("next_token") for r in served}) == 3  # every page once
        assert {(r.params["start_date"], r.params["end_date"]) for r in served} == {("2024-03-13", "2024-03-20")}
        assert (result.windows, result.pages, result.published, result.cursor) == (1, 3, 3, NOW)
        assert poller.cursors.get("user-a", "daily_readiness") == NOW

        events = consume_raw(broker.bootstrap, topic)
        assert sorted(e["payload"] for e, _ in events) == sorted(r.reply for r in served)  # exactly the pages
        assert {(e["provider"], e["kind"], e["user_id"]) for e, _ in events} == {("oura", "daily_readiness", "oura-a")}
        assert all(BACKFILL_HEADER not in headers for _, headers in events)
        fragments = [f for e, _ in events
                     for f in registry()["oura"].normalize(json.loads(e["payload"]), e["kind"], e["user_id"])]
        assert sorted(f.data["metadata"]["start_time"][:10] for f in fragments) == [
            f"2024-03-{d}" for d in range(13, 21)]
        assert {(f.type, f.provider_user_id) for f in fragments} == {("daily", "oura-a")}

        # the next poll starts at the cursor's day (date windows re-read today), nothing older
        later = make_poller(api.manifest, clock=lambda: NOW + timedelta(hours=1))
        assert later.poll(OURA_A, "daily_readiness", lambda: "token-1").pages == 1
        assert (api.served()[-1].params["start_date"], api.served()[-1].params["end_date"]) == (
            "2024-03-20", "2024-03-20")


def test_whoop_next_token_with_limit_25_and_datetime_windows(make_poller, broker, topic):
    with FakeProviderApi("whoop") as api:
        api.add("cycle", [cycle(i, NOW - timedelta(days=3) + timedelta(hours=i)) for i in range(60)])
        poller = make_poller(api.manifest, initial_lookback=timedelta(days=3))
        result = poller.poll(WHOOP, "cycle", lambda: "token-1")

        served = api.served("cycle")
        assert [r.params["limit"] for r in served] == ["25", "25", "25"]
        assert ["nextToken" in r.params for r in served] == [False, True, True]
        assert {(r.params["start"], r.params["end"]) for r in served} == {
            ("2024-03-17T12:00:00.000Z", "2024-03-20T12:00:00.000Z")}
        assert (result.pages, result.published) == (3, 3)
        events = consume_raw(broker.bootstrap, topic)
        records = [rec for e, _ in events for rec in json.loads(e["payload"])["records"]]
        assert sorted(r["id"] for r in records) == list(range(5000, 5060))
        fragments = [f for e, _ in events
                     for f in registry()["whoop"].normalize(json.loads(e["payload"]), e["kind"], e["user_id"])]
        assert len(fragments) == 60 and {f.provider_user_id for f in fragments} == {"245199"}

        too_big = api.manifest_with(pagination=Pagination(style="token", request_param="nextToken",
                                                          response_field="next_token", page_size_param="limit",
                                                          page_size=50))
        with pytest.raises(PermanentError, match="HTTP 400"):  # other 4xx: permanent, not retried
            make_poller(too_big, clock=lambda: NOW + timedelta(hours=1)).poll(WHOOP, "cycle", lambda: "token-1")
        assert api.requests[-1].status == 400 and api.requests[-2].status == 200


def test_cursor_moves_only_after_the_window_was_published(make_poller, broker, topic):
    with FakeProviderApi("oura", page_size=2) as api:
        api.add("daily_readiness", readiness_days(date(2024, 3, 14), 7))
        assert make_poller(api.manifest).poll(OURA_A, "daily_readiness", lambda: "token-1").published == 4
        published_before = len(consume_raw(broker.bootstrap, topic))

        # two days later the broker is unreachable: every page is fetched, none acknowledged, the cursor stays
        later = NOW + timedelta(days=2)
        dead = KafkaPublisher(f"127.0.0.1:{free_port()}", topic, flush_timeout_s=1.5,
                              config={"log_level": 0})  # its refused connections are the point: keep them quiet
        failing = make_poller(api.manifest, publisher=dead, clock=lambda: later)
        api.add("daily_readiness", readiness_days(date(2024, 3, 21), 2))
        first_try = len(api.served())
        with pytest.raises(PublishFailed):
            failing.poll(OURA_A, "daily_readiness", lambda: "token-1")
        failed_requests = [r.params for r in api.served()[first_try:]]
        assert failing.cursors.get("user-a", "daily_readiness") == NOW

        # the next poll re-fetches exactly that window and publishes it
        retry_at = len(api.served())
        result = make_poller(api.manifest, clock=lambda: later).poll(OURA_A, "daily_readiness", lambda: "token-1")
        assert [r.params for r in api.served()[retry_at:]] == failed_requests
        assert failed_requests[0]["start_date"] == "2024-03-20"
        assert result.cursor == later == failing.cursors.get("user-a", "daily_readiness")
        assert len(consume_raw(broker.bootstrap, topic)) == published_before + result.published


def test_429_with_retry_after_pauses_every_poller_then_the_same_page_succeeds(make_poller, broker, topic):
    with FakeProviderApi("oura", page_size=1, tokens=("token-a", "token-b")) as api:
        api.add("daily_readiness", readiness_days(date(2024, 3, 15), 6))
        manifest = fast_limit(api, 50)
        pollers = [make_poller(manifest), make_poller(manifest)]
        results: dict[str, object] = {}

        def run(poller: Poller, connection: PollConnection, token: str) -> None:
            results[connection.user_id] = poller.poll(connection, "daily_readiness", lambda: token)

        api.throttle(1, retry_after="1")
        threads = [threading.Thread(target=run, args=(pollers[0], OURA_A, "token-a")),
                   threading.Thread(target=run, args=(pollers[1], OURA_B, "token-b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)

        assert {user: r.published for user, r in results.items()} == {"user-a": 6, "user-b": 6}
        throttled = [r for r in api.requests if r.status == 429]
        assert len(throttled) == 1
        # once the 429 is in (0.1 s: a request already in flight may still land), nobody calls until the pause ends
        during_pause = [r for r in api.requests if throttled[0].at + 0.1 < r.at < throttled[0].at + 0.95]
        assert during_pause == []
        retried = next(r for r in api.requests if r.at > throttled[0].at and r.token == throttled[0].token)
        assert retried.params == throttled[0].params and retried.status == 200  # the same page, retried
        assert len(consume_raw(broker.bootstrap, topic)) == 12

        api.throttle(1, retry_after=None)  # no Retry-After: exponential backoff instead
        api.throttle(1, retry_after=http_date(1))
        started = time.monotonic()
        assert make_poller(manifest, clock=lambda: NOW + timedelta(hours=2)).poll(
            OURA_A, "daily_readiness", lambda: "token-a").published == 1
        assert time.monotonic() - started >= 0.9


def test_two_pollers_sharing_the_redis_limiter_stay_under_the_provider_rate(make_poller, broker, topic):
    with FakeProviderApi("oura", page_size=1, tokens=("token-a", "token-b"), rate_limit=(10, 1.0)) as api:
        api.add("daily_readiness", readiness_days(date(2024, 3, 6), 15))
        manifest = fast_limit(api, 10)
        results = {}
        pollers = {OURA_A: make_poller(manifest, initial_lookback=timedelta(days=14)),
                   OURA_B: make_poller(manifest, initial_lookback=timedelta(days=14))}

        def run(connection: PollConnection, token: str) -> None:
            results[connection.user_id] = pollers[connection].poll(connection, "daily_readiness", lambda: token)

        threads = [threading.Thread(target=run, args=(OURA_A, "token-a")),
                   threading.Thread(target=run, args=(OURA_B, "token-b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert {user: r.published for user, r in results.items()} == {"user-a": 15, "user-b": 15}
        assert [r for r in api.requests if r.status == 429] == []  # the provider never had to refuse one
        assert api.max_in_window(1.0) <= 10
        assert len(consume_raw(broker.bootstrap, topic)) == 30


def test_401_raises_token_rejected_and_5xx_are_retried(make_poller, broker, topic):
    with FakeProviderApi("oura", page_size=5) as api:
        api.add("daily_readiness", readiness_days(date(2024, 3, 15), 3))
        poller = make_poller(api.manifest)
        with pytest.raises(TokenRejected, match="HTTP 401") as rejected:
            poller.poll(OURA_A, "daily_readiness", lambda: "stolen")
        assert (rejected.value.provider, rejected.value.user_id, rejected.value.kind) == (
            "oura", "user-a", "daily_readiness")
        api.add_token("short-lived")
        api.expire_token("short-lived")
        with pytest.raises(TokenRejected):
            poller.poll(OURA_A, "daily_readiness", lambda: "short-lived")
        assert poller.cursors.get("user-a", "daily_readiness") is None

        api.fail(2, status=503)
        assert poller.poll(OURA_A, "daily_readiness", lambda: "token-1").published == 1
        assert [r.status for r in api.requests[-3:]] == [503, 503, 200]
        assert len({json.dumps(r.params) for r in api.requests[-3:]}) == 1

        api.fail(10)
        with pytest.raises(RetryableError, match="gave up after 3 attempts"):
            make_poller(api.manifest, max_attempts=3, clock=lambda: NOW + timedelta(days=1)).poll(
                OURA_A, "daily_readiness", lambda: "token-1")
        assert poller.cursors.get("user-a", "daily_readiness") == NOW
        assert len(consume_raw(broker.bootstrap, topic)) == 1


def test_backfill_chunks_90_days_into_max_days_windows_and_never_starves_a_live_poll(make_poller, broker, topic):
    with FakeProviderApi("oura", page_size=2) as api:
        first = date(2023, 12, 1)
        api.add("daily_readiness", readiness_days(first, 30, step=3))  # 30 documents, every third day
        api.add("daily_readiness", readiness_days(date(2024, 3, 14), 7))  # the live window (after the range)
        manifest = fast_limit(api, 10)  # burst 2, 8/s
        backfiller, live = make_poller(manifest), make_poller(manifest)
        start = datetime(2023, 12, 1, tzinfo=UTC)
        done: dict[str, float] = {}

        def run_backfill() -> None:
            done["result"] = backfiller.backfill(OURA_A, "daily_readiness", start, start + timedelta(days=90),
                                                 lambda: "token-1")
            done["backfill"] = time.monotonic()

        thread = threading.Thread(target=run_backfill)
        thread.start()
        while len(api.served()) < 3:
            time.sleep(0.01)
        live_started = time.monotonic()
        live_result = live.poll(OURA_B, "daily_readiness", lambda: "token-1")
        live_took = time.monotonic() - live_started
        thread.join(30)

        assert live_result.published == 4 and live_took < 1.5  # 4 pages at 8/s, the backfill notwithstanding
        assert done["backfill"] > live_started + live_took  # the backfill was still running meanwhile
        result = done["result"]
        assert (result.windows, result.published) == (3, 15)
        first_pages = [(r.params["start_date"], r.params["end_date"]) for r in api.served()
                       if "next_token" not in r.params and r.params["start_date"] < "2024-03"]
        assert first_pages == [("2023-12-01", "2023-12-30"), ("2023-12-31", "2024-01-29"),
                               ("2024-01-30", "2024-02-28")]  # oldest first, max_days (30) each
        events = consume_raw(broker.bootstrap, topic)
        backfilled = [e for e, headers in events if headers.get(BACKFILL_HEADER) == b"true"]
        assert len(backfilled) == 15 and len(events) == 19
        assert {e["user_id"] for e in backfilled} == {"oura-a"}
        assert backfiller.cursors.get("user-a", "daily_readiness") is None  # the live cursor is untouched
        # the same backfill again: already done, no request
        before = len(api.requests)
        assert backfiller.backfill(OURA_A, "daily_readiness", start, start + timedelta(days=90),
                                   lambda: "token-1").windows == 0
        assert len(api.requests) == before


def test_fitbit_hook_attaches_date_and_profile_and_offset_pagination(make_poller, broker, topic):
    fitbit = PollConnection("user-f", "fitbit", "FB123")
    with FakeProviderApi("fitbit") as api:
        api.respond("water", lambda start, end, params: {"summary": {"water": 500 + start.day},
                                                         "water": [{"amount": 500 + start.day, "logId": start.day}]})
        api.route("/1/user/-/profile.json", lambda params: {"user": {
            "timezone": "Europe/Berlin", "offsetFromUTCMillis": 3600000, "displayName": "F", "avatar": "x"}})
        activities = json.loads((FIXTURES / "fitbit" / "activities.json").read_text())["activities"]
        api.add("activities", activities)
        poller = make_poller(api.manifest, initial_lookback=timedelta(days=2))
        result = poller.poll(fitbit, "water", lambda: "token-1")

        assert [r.path for r in api.served("water")] == [f"/1/user/-/foods/log/water/date/2024-03-{d}.json"
                                                         for d in (18, 19, 20)]  # one request per day
        assert result.published == 3
        assert len([r for r in api.served() if r.path.endswith("profile.json")]) == 1  # cached per connection
        events = consume_raw(broker.bootstrap, topic)
        payloads = [json.loads(e["payload"]) for e, _ in events]
        assert sorted(p["_date"] for p in payloads) == ["2024-03-18", "2024-03-19", "2024-03-20"]
        assert all(p["_profile"] == {"timezone": "Europe/Berlin", "offsetFromUTCMillis": 3600000} for p in payloads)
        nutrition = sorted((f.data["metadata"]["start_time"], f.data["summary"]["water_ml"]) for p in payloads
                           for f in registry()["fitbit"].normalize(p, "water", "FB123"))
        assert nutrition == [("2024-03-18T00:00:00.000000+01:00", 518), ("2024-03-19T00:00:00.000000+01:00", 519),
                             ("2024-03-20T00:00:00.000000+01:00", 520)]

        # offset pagination (page size 2 instead of Fitbit's 100), an open-ended afterDate window
        endpoint = api.manifest.api.endpoints["activities"]
        small = api.manifest_with(endpoints={"activities": endpoint.model_copy(
            update={"params": {**endpoint.params, "limit": "2"}})})
        listed = make_poller(small, initial_lookback=timedelta(days=10)).poll(fitbit, "activities", lambda: "token-1")
        served = api.served("activities")
        assert [(r.params["afterDate"], r.params["offset"], r.params["limit"]) for r in served] == [
            ("2024-03-10", "0", "2"), ("2024-03-10", "2", "2")]
        assert listed.published == 2
        pages = [json.loads(e["payload"]) for e, _ in consume_raw(broker.bootstrap, topic)[3:]]
        assert sorted(a["logId"] for p in pages for a in p["activities"]) == sorted(a["logId"] for a in activities)
        mapped = [f for p in pages for f in registry()["fitbit"].normalize(p, "activities", "FB123")]
        assert {f.type for f in mapped} == {"activity"} and len(mapped) == 3


def test_polar_hook_publishes_a_bare_array_item_by_item(make_poller, broker, topic):
    exercise = json.loads((FIXTURES / "polar" / "exercises.json").read_text())
    others = json.loads((FIXTURES / "polar" / "exercises.denver.json").read_text())
    with FakeProviderApi("polar") as api:
        api.respond("exercises", lambda start, end, params: [exercise, others])  # GET /v3/exercises: a JSON array
        result = make_poller(api.manifest).poll(PollConnection("user-p", "polar", "P-1"), "exercises",
                                                lambda: "token-1")
        assert (result.pages, result.published, result.cursor) == (1, 2, NOW)
        assert api.served()[0].params == {"samples": "true", "zones": "true"}  # no window: the last 30 days
        events = consume_raw(broker.bootstrap, topic)
        mapped = [f for e, _ in events
                  for f in registry()["polar"].normalize(json.loads(e["payload"]), e["kind"], e["user_id"])]
        assert sorted(f.type for f in mapped) == ["activity", "activity"]
        with pytest.raises(PermanentError, match="cannot be backfilled"):
            make_poller(api.manifest).backfill(PollConnection("user-p", "polar", "P-1"), "exercises",
                                               NOW - timedelta(days=60), NOW, lambda: "token-1")
