"""Inbound write paths hold against forgery, replays and hostile bodies (issue 10: findings 1, 3, 5 and replays).

The real API (``create_app`` + the webhook router) on uvicorn over loopback, a real control plane (SQLite, and
PostgreSQL for the shared replay store), the embedded Kafka-protocol broker; Garmin's OAuth played by its fake.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from connectors.publish import PublishUnavailable, RawEventPublisher
from controlplane.api import BackgroundServer, create_app
from controlplane.auth import MemoryCollector
from controlplane.limits import json_depth
from controlplane.webhooks import router, unauthenticated_webhooks
from controlplane.webhooks.seen import SeenNotifications
from pipelines.embedded import free_port

pytest.register_assert_rewrite("servers.fake_provider_api")
from servers.fake_provider_api import read_raw_events  # noqa: E402

ACCOUNT = "garmin-acct-1"
DEEP = b"[" * 100_000 + b"]" * 100_000
MIB = 1024 * 1024


def _rss_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def _whoop_headers(body: bytes, secret: str = "whoop-secret", at_ms: int | None = None) -> dict[str, str]:
    stamp = str(at_ms or int(time.time() * 1000))
    mac = base64.b64encode(hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).digest()).decode()
    return {"X-WHOOP-Signature": mac, "X-WHOOP-Signature-Timestamp": stamp, "Content-Type": "application/json"}


def _fitbit_headers(body: bytes, secret: str = "fitbit-secret") -> dict[str, str]:
    mac = base64.b64encode(hmac.new(f"{secret}&".encode(), body, hashlib.sha1).digest()).decode()
    return {"X-Fitbit-Signature": mac, "Content-Type": "application/json"}


def _polar_headers(body: bytes, secret: str = "polar-secret") -> dict[str, str]:
    return {"Polar-Webhook-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}


def _daily(user: str) -> dict[str, Any]:
    return {"userId": user, "summaryId": f"x-{user}", "calendarDate": "2026-11-02", "startTimeInSeconds": 1793574000,
            "startTimeOffsetInSeconds": 3600, "durationInSeconds": 86400, "steps": 100}


class Api:
    """The served app: ``url``, the control plane, Garmin's fake and the topics it publishes to."""

    def __init__(self, url: str, plane: Any, garmin: Any, raw: str, notes: str, broker: Any) -> None:
        self.url, self.plane, self.garmin, self.raw, self.notes, self.broker = url, plane, garmin, raw, notes, broker

    def hook(self, provider: str, token: str | None = None) -> str:
        return f"{self.url}/v2/providers/{provider}/webhook" + (f"?token={token}" if token is not None else "")

    def published(self, topic: str) -> list[dict[str, Any]]:
        return read_raw_events(self.broker.bootstrap, topic)


@pytest.fixture
def api(tmp_path, broker, monkeypatch) -> Iterator[Api]:
    """The API with the webhook router; one active Garmin connection (ACCOUNT); no webhook token configured."""
    from servers.fake_garmin import FakeGarmin, authorize_in_browser
    from servers.fake_provider import query_of

    for variable in ("GARMIN_WEBHOOK_TOKEN", "WITHINGS_WEBHOOK_TOKEN", "WHOOP_WEBHOOK_TOKEN", "GARMIN_API_BASE"):
        monkeypatch.delenv(f"HEALTHFLOW_{variable}", raising=False)
    monkeypatch.setenv("HEALTHFLOW_WHOOP_CLIENT_SECRET", "whoop-secret")
    monkeypatch.setenv("HEALTHFLOW_FITBIT_CLIENT_SECRET", "fitbit-secret")
    monkeypatch.setenv("HEALTHFLOW_POLAR_WEBHOOK_SECRET", "polar-secret")
    raw, notes = f"raw.{time.time_ns()}", f"notes.{time.time_ns()}"
    broker.create_topic(raw, 2)
    broker.create_topic(notes, 2)
    server = BackgroundServer()
    with FakeGarmin() as garmin:
        plane = garmin.control_plane(f"sqlite:///{tmp_path}/state.db", public_url=server.url, emit=MemoryCollector())
        garmin.oauth.next_account = ACCOUNT
        start = plane.start_auth("dev-1", "garmin", reference_id="athlete-1")
        assert plane.complete_auth("garmin", query_of(authorize_in_browser(start.auth_url))).ok
        app = create_app(plane)
        app.include_router(router(RawEventPublisher(broker.bootstrap), raw, notes))
        server.start(app)
        try:
            yield Api(server.url, plane, garmin, raw, notes, broker)
        finally:
            server.stop()
            plane.close()


def _garmin_state(api: Api) -> str:
    (connection,) = [c for c in api.plane.connections("dev-1", "athlete-1")]
    return connection.state


# ---------------------------------------------------------------------------------------------------- anonymous writes
def test_garmin_and_withings_webhooks_refuse_everything_until_their_url_token_is_set(api):
    forged_deregistration = {"deregistrations": [{"userId": ACCOUNT}]}
    for body in (forged_deregistration, {"dailies": [_daily(ACCOUNT)]}):
        refused = requests.post(api.hook("garmin"), json=body, timeout=10)
        assert refused.status_code == 503 and "HEALTHFLOW_GARMIN_WEBHOOK_TOKEN" in refused.json()["detail"]
    unlink = urllib.parse.urlencode({"userid": "12345", "appli": 46, "action": "unlink"})
    refused = requests.post(api.hook("withings"), data=unlink, timeout=10,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert refused.status_code == 503 and "HEALTHFLOW_WITHINGS_WEBHOOK_TOKEN" in refused.json()["detail"]
    assert _garmin_state(api) == "active"  # nothing revoked
    assert api.published(api.raw) == [] and api.published(api.notes) == []  # nothing published or queued


def test_with_the_token_set_only_the_registered_url_writes(api, monkeypatch):
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", "s3cret-url-t0ken")
    monkeypatch.setenv("HEALTHFLOW_WITHINGS_WEBHOOK_TOKEN", "w1things-t0ken")
    forged = {"deregistrations": [{"userId": ACCOUNT}]}
    for token in (None, "", "guess", "s3cret-url-t0ke", "s3cret-url-t0ken\u00e9"):
        refused = requests.post(api.hook("garmin", token), json=forged, timeout=10)
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
    unlink = urllib.parse.urlencode({"userid": "12345", "appli": 46, "action": "unlink"})
    assert requests.post(api.hook("withings", "nope"), data=unlink, timeout=10,
                         headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 401
    assert _garmin_state(api) == "active" and api.published(api.raw) == [] and api.published(api.notes) == []

    assert requests.post(api.hook("garmin", "s3cret-url-t0ken"), json=forged, timeout=10).status_code == 200
    assert _garmin_state(api) == "revoked"
    queued = requests.post(api.hook("withings", "w1things-t0ken"), data=unlink, timeout=10,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert queued.status_code == 200 and len(api.published(api.notes)) == 1


def test_what_cannot_be_authenticated_is_named_at_start(broker, tmp_path):
    environ = {"HEALTHFLOW_GARMIN_WEBHOOK_TOKEN": "t", "HEALTHFLOW_WHOOP_CLIENT_SECRET": "s"}
    problems = "\n".join(unauthenticated_webhooks(environ))
    assert "HEALTHFLOW_WITHINGS_WEBHOOK_TOKEN" in problems and "HEALTHFLOW_GARMIN_WEBHOOK_TOKEN" not in problems
    assert "HEALTHFLOW_OURA_CLIENT_SECRET" in problems and "HEALTHFLOW_WHOOP" not in problems
    # `healthflow serve --bootstrap-servers …` (the serve() it runs) logs them as warnings before it answers
    port = free_port()
    script = ("import os; from controlplane.api.server import serve; "
              f"serve({port}, 'sqlite:///{tmp_path}/s.db', secret_key=os.environ['KEY'], "
              f"bootstrap_servers='{broker.bootstrap}')")
    from cryptography.fernet import Fernet

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1]), "KEY": Fernet.generate_key().decode()}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    assert "HEALTHFLOW_GARMIN_WEBHOOK_TOKEN is not set" in stderr, stderr
    assert "HEALTHFLOW_WITHINGS_WEBHOOK_TOKEN is not set" in stderr


# ------------------------------------------------------------------------------------------- signatures before parsing
def test_signatures_are_checked_on_the_raw_bytes_before_anything_parses_them(api):
    for provider, body in (("whoop", DEEP), ("fitbit", DEEP), ("polar", b"\xff not json"), ("whoop", b"{}")):
        unsigned = requests.post(api.hook(provider), data=body, timeout=10)
        assert unsigned.status_code == 401 and "signature check failed" in unsigned.json()["detail"]
    forged = requests.post(api.hook("whoop"), data=DEEP, headers=_whoop_headers(DEEP, "not-the-secret"), timeout=10)
    assert forged.status_code == 401  # not a 400 for its depth: the body was never looked at
    assert api.published(api.notes) == []


# ------------------------------------------------------------------------------------------------------------- limits
def _post_raw(port: int, path: str, total: int, *, chunked: bool, headers: str = "") -> tuple[int, bytes, int]:
    """POST ``total`` bytes from a constant 64 KiB chunk (never held whole), stopping as soon as the server answers:
    ``(status, response head and body, bytes sent)``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{headers}{framing}\r\n\r\n"
                 .encode())
    chunk, sent = b"[" * 65536, 0
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server answered and closed: its answer is read below
    answer = b""
    while True:
        head, _, rest = answer.partition(b"\r\n\r\n")
        if rest and len(rest) >= int(dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
                                     .get(b"content-length", b"0")):
            break
        got = sock.recv(65536)
        if not got:
            break
        answer += got
    sock.close()
    return int(answer.split(b" ", 2)[1]), answer, sent


def test_bodies_are_refused_with_413_before_they_are_read(api, monkeypatch):
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", "t0ken")
    dev = api.plane.create_developer(dev_id="lab", name="lab")
    key = api.plane.create_api_key(dev)
    port = int(api.url.rsplit(":", 1)[1])
    size = 50 * MIB
    before = _rss_mib()
    cpu = time.process_time()
    results = []
    for path, chunked in (("/v2/providers/whoop/webhook", False), ("/v2/providers/whoop/webhook", True),
                          ("/v2/providers/garmin/webhook?token=t0ken", True),
                          ("/v2/auth/generateWidgetSession", True), ("/v2/auth/generateWidgetSession", False)):
        status, answer, sent = _post_raw(port, path, size, chunked=chunked,
                                         headers=f"dev-id: {dev}\r\nx-api-key: {key}\r\n")
        results.append((path, chunked, status, sent))
        assert status == 413 and b"too large" in answer, answer[:300]
        assert sent < 0.85 * size  # the server answered before the body was all sent (Garmin's cap is 32 MiB)
    with ThreadPoolExecutor(8) as pool:  # eight at once, as the probe did
        parallel = list(pool.map(lambda _: _post_raw(port, "/v2/providers/fitbit/webhook", size, chunked=True),
                                 range(8)))
    assert [status for status, _, _ in parallel] == [413] * 8
    grown = _rss_mib() - before
    print(f"\n413s: {results}; eight parallel 50 MiB posts: sent {[s for _, _, s in parallel]}; RSS grew "
          f"{grown:.1f} MiB; client+server CPU {time.process_time() - cpu:.2f}s")
    assert grown < 40  # not the body size (50 MiB each, 400 MiB for the eight)
    # under the caps everything still works: a 900 KiB Garmin push (over the API's 64 KiB; the broker takes 1 MB
    # messages), a small widget session
    push = json.dumps({"dailies": [{**_daily(ACCOUNT), "pad": "x" * (900 * 1024)}]}).encode()
    assert requests.post(api.hook("garmin", "t0ken"), data=push, timeout=30).status_code == 200
    session = requests.post(f"{api.url}/v2/auth/generateWidgetSession", json={"reference_id": "r"}, timeout=10,
                            headers={"dev-id": dev, "x-api-key": key})
    assert session.status_code == 200
    too_big = requests.post(f"{api.url}/v2/auth/generateWidgetSession", json={"reference_id": "r" * 70_000},
                            timeout=10, headers={"dev-id": dev, "x-api-key": key})
    assert too_big.status_code == 413 and "at most 65536 bytes" in too_big.json()["message"]


def test_json_nested_too_deep_is_refused_with_400_never_500(api, monkeypatch):
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", "t0ken")
    dev = api.plane.create_developer(dev_id="lab", name="lab")
    headers = {"dev-id": dev, "x-api-key": api.plane.create_api_key(dev), "Content-Type": "application/json"}
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    deep_enough = b"[" * 20_000 + b"]" * 20_000  # the API's bodies are capped at 64 KiB: depth 100,000 is a 413
    for body in (DEEP, deep_object):
        for reply in (requests.post(api.hook("garmin", "t0ken"), data=body, timeout=10),
                      requests.post(api.hook("whoop"), data=body, headers=_whoop_headers(body), timeout=10),
                      requests.post(api.hook("fitbit"), data=body, headers=_fitbit_headers(body), timeout=10),
                      requests.post(f"{api.url}/v2/auth/generateWidgetSession", data=deep_enough, headers=headers,
                                    timeout=10)):
            assert reply.status_code == 400, (reply.request.url, reply.status_code, reply.text[:200])
            text = reply.json().get("detail") or reply.json().get("message")
            assert "nested more than 64 levels" in text
    assert api.published(api.raw) == [] and api.published(api.notes) == []
    at_the_cap = json.dumps({"dailies": [_daily(ACCOUNT)], "x": json.loads("[" * 63 + "]" * 63)}).encode()
    assert json_depth(at_the_cap) == 64
    assert requests.post(api.hook("garmin", "t0ken"), data=at_the_cap, timeout=10).status_code == 200


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": "[[[[{{{{", "b": ["\\"[", {"c": []}]}') == 4
    assert json_depth(b"12") == 0 and json_depth(DEEP) == 100_000


# ------------------------------------------------------------------------------------------------------------ replays
def test_a_replayed_notification_is_acknowledged_and_published_once(api):
    whoop = json.dumps({"user_id": 10129, "id": 7, "type": "sleep.updated", "trace_id": "t-1"}).encode()
    signed = _whoop_headers(whoop)
    first = requests.post(api.hook("whoop"), data=whoop, headers=signed, timeout=10)
    replay = requests.post(api.hook("whoop"), data=whoop, headers=signed, timeout=10)
    assert first.json() == {"status": "accepted"} and replay.json() == {"status": "accepted", "duplicate": True}
    # the same event signed again a second later (WHOOP's trace_id names it): still a replay
    resent = requests.post(api.hook("whoop"), data=whoop, timeout=10,
                           headers=_whoop_headers(whoop, at_ms=int(time.time() * 1000) + 1000))
    assert resent.status_code == 200 and resent.json()["duplicate"] is True
    stale = requests.post(api.hook("whoop"), data=whoop, timeout=10,
                          headers=_whoop_headers(whoop, at_ms=int(time.time() * 1000) - 301_000))
    assert stale.status_code == 401 and "from now" in stale.json()["detail"]

    fitbit = json.dumps([{"collectionType": "sleep", "date": "2024-03-10", "ownerId": "AAA", "ownerType": "user",
                          "subscriptionId": "s"}]).encode()
    polar = json.dumps({"event": "SLEEP", "user_id": 4, "date": "2026-11-02",
                        "timestamp": "2026-11-02T06:00:00Z"}).encode()
    for hook, body, headers in (("fitbit", fitbit, _fitbit_headers(fitbit)), ("polar", polar, _polar_headers(polar))):
        statuses = [requests.post(api.hook(hook), data=body, headers=headers, timeout=10).status_code
                    for _ in range(3)]
        assert statuses == ([204] * 3 if hook == "fitbit" else [200] * 3)
    published = api.published(api.notes)
    assert sorted(e["provider"] for e in published) == ["fitbit", "polar", "whoop"]


def test_replays_are_recognized_across_processes_sharing_the_store(broker, tmp_path, monkeypatch):
    """Two API servers (two stores opened on one database file, as two processes would): a notification accepted by
    one is a replay at the other."""
    from fastapi import FastAPI

    monkeypatch.setenv("HEALTHFLOW_OURA_CLIENT_SECRET", "oura-secret")
    notes = f"notes.{time.time_ns()}"
    broker.create_topic(notes, 1)
    body = json.dumps({"event_type": "update", "data_type": "sleep", "object_id": "o", "user_id": "u"}).encode()
    stamp = str(int(time.time()))
    headers = {"x-oura-signature": hmac.new(b"oura-secret", stamp.encode() + body, hashlib.sha256).hexdigest().upper(),
               "x-oura-timestamp": stamp}
    statuses = []
    for _ in range(2):
        app = FastAPI()
        app.include_router(router(RawEventPublisher(broker.bootstrap), "raw", notes,
                                  seen=SeenNotifications(f"sqlite:///{tmp_path}/state.db")))
        with BackgroundServer() as server:
            server.start(app)
            reply = requests.post(f"{server.url}/v2/providers/oura/webhook", data=body, headers=headers, timeout=10)
            statuses.append((reply.status_code, reply.json()))
    assert statuses == [(200, {"status": "accepted"}), (200, {"status": "accepted", "duplicate": True})]
    assert len(read_raw_events(broker.bootstrap, notes)) == 1


def test_a_notification_that_could_not_be_queued_is_accepted_when_retried(broker, tmp_path, monkeypatch):
    from fastapi import FastAPI

    monkeypatch.setenv("HEALTHFLOW_FITBIT_CLIENT_SECRET", "fitbit-secret")
    notes = f"notes.{time.time_ns()}"
    broker.create_topic(notes, 1)
    broker_down = threading.Event()
    broker_down.set()

    publisher = RawEventPublisher(broker.bootstrap)

    async def flaky_publish(topic: str, payloads: Any, **options: Any) -> None:
        if broker_down.is_set():
            raise PublishUnavailable("broker unreachable", 10)
        await publisher(topic, payloads, **options)

    app = FastAPI()
    app.include_router(router(flaky_publish, "raw", notes, seen=SeenNotifications(f"sqlite:///{tmp_path}/s.db")))
    body = json.dumps([{"collectionType": "body", "date": "2024-03-10", "ownerId": "B"}]).encode()
    with BackgroundServer() as server:
        server.start(app)
        url = f"{server.url}/v2/providers/fitbit/webhook"
        failed = requests.post(url, data=body, headers=_fitbit_headers(body), timeout=10)
        assert failed.status_code == 503 and failed.headers["Retry-After"] == "10"  # no 2xx: Fitbit sends it again
        broker_down.clear()
        assert requests.post(url, data=body, headers=_fitbit_headers(body), timeout=10).status_code == 204
        assert requests.post(url, data=body, headers=_fitbit_headers(body), timeout=10).status_code == 204
    assert len(read_raw_events(broker.bootstrap, notes)) == 1


@pytest.mark.parametrize("database", ["sqlite", "postgres", "mysql"])
def test_concurrent_claims_of_one_notification_admit_exactly_one(tmp_path, database):
    url, drop = {"sqlite": (f"sqlite:///{tmp_path}/seen.db", None),
                 "postgres": ("postgresql://postgres@127.0.0.1:5432/postgres", f"hf_seen_{time.time_ns()}"),
                 "mysql": ("mysql://root@127.0.0.1:3306/test", f"hf_seen_{time.time_ns()}")}[database]
    table = drop or "healthflow_webhook_seen"
    stores = [SeenNotifications(url, table) for _ in range(4)]  # four "processes", each its own connection
    try:
        with ThreadPoolExecutor(16) as pool:
            claims = list(pool.map(lambda i: stores[i % 4].claim("fitbit", "sha256:abc", 60), range(32)))
        winners = [c.token for c in claims if c.token is not None]
        assert len(winners) == 1 and all(c.pending for c in claims if c.token is None)
        assert stores[1].claim("fitbit", "sha256:other", 60).token is not None  # another id: its own claim
        stores[2].release("fitbit", "sha256:abc", "not-the-claim")  # only the claim's holder gives it back
        assert stores[3].claim("fitbit", "sha256:abc", 60).pending
        stores[0].release("fitbit", "sha256:abc", winners[0])
        again = stores[3].claim("fitbit", "sha256:abc", 0.05)
        assert again.token is not None
        time.sleep(0.1)  # a pending claim not given back in time is abandoned: claimed again as new
        taken_over = stores[0].claim("fitbit", "sha256:abc", 60)
        assert taken_over.token is not None
        stores[0].accept("fitbit", "sha256:abc", taken_over.token, 60)
        assert stores[1].claim("fitbit", "sha256:abc", 60).replay  # accepted: a copy is a replay
        stores[3].accept("fitbit", "sha256:abc", again.token, 60)  # the abandoned holder cannot accept any more
        stores[1].forget("fitbit", "sha256:abc")
        assert stores[2].claim("fitbit", "sha256:abc", 60).token is not None
    finally:
        for store in stores:
            store.close()
        if drop:
            from core.store import Store

            cleanup = Store(url).open()
            cleanup.execute(f"DROP TABLE IF EXISTS {drop}")
            cleanup.close()
