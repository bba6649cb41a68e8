"""A notification is acknowledged as a replay only once its first copy is queued (issue 10 review, finding 3).

The webhook router on uvicorn over loopback (or in process through its ASGI interface, to cancel a request the way
anyio does), the embedded Kafka-protocol broker, and a publisher pointed at a port where no broker listens for the
outage; the replay claims in a real SQLite control-plane store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import pytest
import requests
from fastapi import FastAPI

from connectors.publish import RawEventPublisher
from controlplane.api import BackgroundServer
from controlplane.webhooks import router
from controlplane.webhooks.seen import SeenNotifications
from pipelines.embedded import free_port

pytest.register_assert_rewrite("servers.fake_provider_api")
from servers.fake_provider_api import read_raw_events  # noqa: E402

BODY = json.dumps([{"collectionType": "sleep", "date": "2026-11-02", "ownerId": "AAA", "ownerType": "user",
                    "subscriptionId": "s-1"}]).encode()
HEADERS = {"X-Fitbit-Signature": base64.b64encode(hmac.new(b"fitbit-secret&", BODY, hashlib.sha1).digest()).decode(),
           "Content-Type": "application/json"}
PATH = "/v2/providers/fitbit/webhook"


class SwitchablePublisher:
    """Two real publishers: one to a port where no broker listens (the outage, each publish failing after
    ``timeout_s``), one to the embedded broker; ``broker_up`` says which is used."""

    def __init__(self, bootstrap: str, timeout_s: float = 1.5) -> None:
        self.down = RawEventPublisher(f"127.0.0.1:{free_port()}", timeout_s=timeout_s)
        self.up = RawEventPublisher(bootstrap, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.broker_up = threading.Event()

    async def __call__(self, topic: str, payloads: Any, **options: Any) -> int:
        return await (self.up if self.broker_up.is_set() else self.down)(topic, payloads, **options)

    def close(self) -> None:
        self.down.close()
        self.up.close()


@pytest.fixture
def notes(broker, monkeypatch) -> str:
    monkeypatch.setenv("HEALTHFLOW_FITBIT_CLIENT_SECRET", "fitbit-secret")
    topic = f"notes.{time.time_ns()}"
    broker.create_topic(topic, 1)
    return topic


@pytest.fixture
def publisher(broker) -> Iterator[SwitchablePublisher]:
    switchable = SwitchablePublisher(broker.bootstrap)
    yield switchable
    switchable.close()


def test_a_copy_arriving_while_the_first_is_being_queued_gets_503_and_nothing_is_lost(broker, notes, publisher,
                                                                                      tmp_path):
    app = FastAPI()
    app.include_router(router(publisher, "raw", notes, seen=SeenNotifications(f"sqlite:///{tmp_path}/s.db")))
    with BackgroundServer() as server, ThreadPoolExecutor(1) as pool:
        server.start(app)
        url = server.url + PATH
        first = pool.submit(requests.post, url, data=BODY, headers=HEADERS, timeout=30)
        time.sleep(0.5)  # the first copy is waiting for the broker (down: it fails after 1.5 s)
        copy = requests.post(url, data=BODY, headers=HEADERS, timeout=30)
        assert copy.status_code == 503 and int(copy.headers["Retry-After"]) >= 1, (copy.status_code, copy.text)
        assert "being queued" in copy.json()["detail"]
        assert first.result().status_code == 503
        publisher.broker_up.set()  # the provider retries once the broker is back: accepted, then replays are not
        assert [requests.post(url, data=BODY, headers=HEADERS, timeout=30).status_code for _ in range(2)] == [204, 204]
    assert len(read_raw_events(broker.bootstrap, notes)) == 1


def test_a_cancelled_request_gives_its_claim_back(broker, notes, publisher, tmp_path):
    """Cancelled by an anyio cancel scope (as a server or middleware cancels a request): every await in the cancelled
    scope is cancelled again, so the claim must be given back shielded or it blocks the provider's retries."""
    app = FastAPI()
    app.include_router(router(publisher, "raw", notes, seen=SeenNotifications(f"sqlite:///{tmp_path}/s.db")))

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            with anyio.move_on_after(0.5) as scope:  # mid-publish: the broker is down
                await client.post(PATH, content=BODY, headers=HEADERS)
            assert scope.cancelled_caught
            publisher.broker_up.set()
            return [(await client.post(PATH, content=BODY, headers=HEADERS)).status_code for _ in range(2)]

    assert anyio.run(scenario) == [204, 204]
    assert len(read_raw_events(broker.bootstrap, notes)) == 1, "the retry after the cancelled request was dropped"


class ReleaseFails(SeenNotifications):
    """The control-plane store failing exactly when a claim is given back."""

    def release(self, provider: str, seen_id: str, token: str) -> None:
        raise ConnectionError("the control-plane store went away")


def test_a_claim_that_cannot_be_given_back_lapses_after_the_pending_timeout(broker, notes, publisher, tmp_path):
    app = FastAPI()
    app.include_router(router(publisher, "raw", notes, seen=ReleaseFails(f"sqlite:///{tmp_path}/s.db"),
                              pending_s=3.0))
    with BackgroundServer() as server:
        server.start(app)
        url = server.url + PATH
        started = time.monotonic()
        failed = requests.post(url, data=BODY, headers=HEADERS, timeout=30)
        assert failed.status_code == 503 and failed.headers["Retry-After"], failed.text  # never a 500
        publisher.broker_up.set()
        assert requests.post(url, data=BODY, headers=HEADERS, timeout=30).status_code == 503  # still pending
        time.sleep(max(0.0, started + 3.2 - time.monotonic()))
        assert requests.post(url, data=BODY, headers=HEADERS, timeout=30).status_code == 204
    assert len(read_raw_events(broker.bootstrap, notes)) == 1


def test_a_claim_the_fetcher_forgets_before_the_api_accepts_it_stays_forgotten(tmp_path):
    """The fetcher can fetch (and forget) a notification before the API marks its claim accepted: the late accept
    must not bring the claim back, or the next identical notification (another sync of that day) would be dropped."""
    seen = SeenNotifications(f"sqlite:///{tmp_path}/seen.db")
    try:
        first = seen.claim("fitbit", "day-sync", pending_s=10.0)
        assert first.token is not None
        seen.forget("fitbit", "day-sync")  # fetched while the claim is still pending
        seen.accept("fitbit", "day-sync", first.token, window_s=600.0)  # the API's late accept
        again = seen.claim("fitbit", "day-sync", pending_s=10.0)
        assert again.token is not None and not again.replay
    finally:
        seen.close()
