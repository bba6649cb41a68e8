"""Large Garmin pushes (issue 10 review, findings 4 and 5): every part the route accepts is published, a part too
large for the producer is refused with 413 before anything of the body is published, and parsing a large push never
stalls the event loop.

The webhook router on uvicorn over loopback and the embedded Kafka-protocol broker (Tansu takes messages of 33 MB:
checked with a real producer; the default librdkafka ``message.max.bytes`` is 1,000,000).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fastapi import FastAPI

from connectors.publish import RawEventPublisher
from controlplane.api import BackgroundServer
from controlplane.webhooks import router
from core.kafka import SharedProducer, producer_config

pytest.register_assert_rewrite("servers.fake_provider_api")
from servers.fake_provider_api import read_raw_events  # noqa: E402
from test_api_publish import HealthProbe  # noqa: E402

TOKEN = "garmin-url-token"


def _daily(user: str) -> dict[str, Any]:
    return {"userId": user, "summaryId": f"x-{user}", "calendarDate": "2026-11-02", "startTimeInSeconds": 1793574000,
            "startTimeOffsetInSeconds": 3600, "durationInSeconds": 86400, "steps": 100}


def _epochs(user: str, count: int) -> list[dict[str, Any]]:
    return [{"userId": user, "summaryId": f"e-{user}-{i}", "activityType": "WALKING", "activeKilocalories": 3,
             "steps": i % 90, "distanceInMeters": 51.3, "durationInSeconds": 900, "activeTimeInSeconds": 420,
             "startTimeInSeconds": 1793574000 + 900 * i, "startTimeOffsetInSeconds": 3600, "met": 3.2,
             "intensity": "ACTIVE", "meanMotionIntensity": 2.1, "maxMotionIntensity": 4.0} for i in range(count)]


def multi_user_push(big_user_epochs: int) -> bytes:
    """Dailies of two users and ``big_user_epochs`` epochs (~330 bytes each) of a third: one Garmin push."""
    return json.dumps({"dailies": [_daily("u-1"), _daily("u-2")],
                       "epochs": _epochs("u-3", big_user_epochs)}).encode()


@pytest.fixture
def serve(broker, monkeypatch) -> Iterator[Any]:
    """``serve(publisher)``: the router on uvicorn; its Garmin webhook URL and the raw topic."""
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", TOKEN)
    servers: list[BackgroundServer] = []

    def start(publisher: Any) -> tuple[str, str]:
        raw = f"raw.{time.time_ns()}"
        broker.create_topic(raw, 2)
        app = FastAPI()
        app.add_api_route("/healthz", lambda: {"ok": True})
        app.include_router(router(publisher, raw, f"notes.{time.time_ns()}"))
        server = BackgroundServer()
        servers.append(server)
        server.start(app)
        return f"{server.url}/v2/providers/garmin/webhook?token={TOKEN}", raw

    yield start
    for server in servers:
        server.stop()


def test_a_push_with_one_users_part_over_a_megabyte_is_published_whole(broker, serve):
    publisher = RawEventPublisher(broker.bootstrap)
    try:
        url, raw = serve(publisher)
        body = multi_user_push(6_000)  # u-3's part is ~2 MB, over librdkafka's default 1,000,000
        assert len(body) > 1_500_000
        reply = requests.post(url, data=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["raw_events"] == 3
    finally:
        publisher.close()
    published = read_raw_events(broker.bootstrap, raw)
    assert sorted(e["user_id"] for e in published) == ["u-1", "u-2", "u-3"]


def test_a_part_larger_than_the_producer_takes_is_413_and_nothing_of_the_body_is_published(broker, serve):
    """A producer limited to 1,000,000 bytes (librdkafka's default, as a deployment whose broker keeps Kafka's 1 MB
    limit would set): the push is refused as a whole before anything is produced, so Garmin's retries (it retries
    5xx) cannot duplicate the users before the large one."""
    producer = SharedProducer(producer_config(broker.bootstrap, {"message.max.bytes": 1_000_000,
                                                                 "message.timeout.ms": 5000}))
    try:
        url, raw = serve(RawEventPublisher(producer=producer))
        reply = requests.post(url, data=multi_user_push(6_000), timeout=60)
        assert reply.status_code == 413, reply.text
        assert "u-3" in reply.json()["detail"] and "1,000,000" in reply.json()["detail"]
    finally:
        producer.close()
    assert read_raw_events(broker.bootstrap, raw) == []


def test_healthz_stays_fast_while_a_large_push_is_parsed_and_split(broker, serve):
    publisher = RawEventPublisher(broker.bootstrap)
    try:
        url, _raw = serve(publisher)
        body = json.dumps({"epochs": [e for u in range(1000) for e in _epochs(f"u-{u}", 60)]}).encode()
        assert len(body) > 20 * 1024 * 1024  # ~1.4 s of CPU to scan and split: it stalled every request on main
        base = url.split("/v2/")[0]
        with HealthProbe(base) as probe:
            time.sleep(0.2)
            reply = requests.post(url, data=body, timeout=120)
            time.sleep(0.2)
        assert reply.status_code == 200 and reply.json()["raw_events"] == 1000, reply.text
    finally:
        publisher.close()
    assert len(probe.latencies) >= 5
    # main stalled 2.4 s on a 20 MiB push; what remains is ~0.8 s of single C calls holding the GIL (loose for CI)
    assert max(probe.latencies) < 1.5, (f"/healthz max {max(probe.latencies):.3f}s, "
                                        f"p50 {statistics.median(probe.latencies):.3f}s")


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b"{}", b'{"dailies": "not a list"}',
    json.dumps({"dailies": [_daily("u-1"), _daily("u-2"), "junk"]}).encode(),
    json.dumps({"deregistrations": [{"userId": "u-1"}], "dailies": [_daily("u-2")]}).encode(),
    json.dumps({"deregistrations": [{"userId": "u-1"}]}).encode(),
    json.dumps({"sleeps": [{"userId": "u-1", "callbackURL": "https://x/1"}], "dailies": [_daily("u-1")]}).encode(),
    json.dumps({"sleeps": [{"userId": "u-1", "callbackURL": "https://x/1"}], "epochs": [], "x": 3}).encode(),
    json.dumps({"userPermissionsChange": [{"userId": "u-3", "permissions": []}],
                "sleeps": [{"userId": "u-1", "callbackURL": "https://x/1"}, {"userId": "u-2", "sleepId": 1}]}).encode(),
])
def test_splitting_a_push_in_one_parse_matches_the_step_by_step_split(body):
    from controlplane.webhooks import lifecycle_keys, split_lifecycle, split_pings, split_push, split_push_by_user

    keys = lifecycle_keys("garmin")
    rest, lists = split_lifecycle(body, keys)
    rest, pings = split_pings(rest, "callbackURL")
    assert split_push("garmin", body, keys, "callbackURL", "userId") == (
        lists, split_push_by_user("garmin", rest, "userId") if rest else [], pings)


def test_a_non_ascii_part_is_published_at_its_own_size_not_escaped_threefold(broker, serve):
    """A part of 870 KB of non-ASCII text (activity names, notes) is under a 1,000,000-byte producer as UTF-8; written
    with ``\\u`` escapes it would be 1.2 MB and refused. It is published, and reads back as the same documents."""
    producer = SharedProducer(producer_config(broker.bootstrap, {"message.max.bytes": 1_000_000,
                                                                 "message.timeout.ms": 5000}))
    epochs = _epochs("u-3", 1)
    epochs[0]["activityName"] = "Café au lait — ünterwegs " * 30_000  # 870 KB as UTF-8, 1.2 MB as \\u escapes
    try:
        url, raw = serve(RawEventPublisher(producer=producer))
        body = {"dailies": [_daily("u-1")], "epochs": epochs}  # two users: the push is split and re-serialized
        reply = requests.post(url, data=json.dumps(body, ensure_ascii=False).encode(), timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        producer.close()
    published = {event["user_id"]: json.loads(event["payload"]) for event in read_raw_events(broker.bootstrap, raw)}
    assert published == {"u-1": {"dailies": [_daily("u-1")]}, "u-3": {"epochs": epochs}}
