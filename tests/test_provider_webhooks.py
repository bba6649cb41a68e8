"""Provider webhooks over real HTTP (uvicorn on loopback) into a real Kafka-protocol broker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time

import pytest
import requests
import uvicorn
from fastapi import FastAPI

from connectors.publish import RawEventPublisher
from controlplane.webhooks import router
from controlplane.webhooks.seen import SeenNotifications
from core.raw import RawMessage
from pipelines.embedded import free_port
from transforms.normalize import Failed, normalize_message

pytest.register_assert_rewrite("servers.fake_provider_api")
from servers.fake_provider_api import read_raw_events  # noqa: E402


def _read(broker, topic: str) -> list[dict]:
    return read_raw_events(broker.bootstrap, topic)


def _serve(broker, control_plane=None, seen=None, app=None):
    raw, notes = f"raw.{time.time_ns()}", f"notes.{time.time_ns()}"
    broker.create_topic(raw, 2)
    broker.create_topic(notes, 2)
    app = app or FastAPI()
    publisher = RawEventPublisher(broker.bootstrap)
    app.include_router(router(publisher, raw, notes, control_plane=control_plane, seen=seen))
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v2/providers", raw, notes
    http.should_exit = True
    thread.join(5)
    publisher.close()


GARMIN_TOKEN = "garmin-url-t0ken"


@pytest.fixture
def server(broker, monkeypatch, tmp_path):
    """The webhook router alone (no control plane; accepted notification ids in a SQLite store)."""
    monkeypatch.setenv("HEALTHFLOW_OURA_CLIENT_SECRET", "oura-secret")
    monkeypatch.setenv("HEALTHFLOW_WHOOP_CLIENT_SECRET", "whoop-secret")
    monkeypatch.setenv("HEALTHFLOW_OURA_VERIFICATION_TOKEN", "verify-me")
    monkeypatch.setenv("HEALTHFLOW_FITBIT_CLIENT_SECRET", "fitbit-secret")
    monkeypatch.setenv("HEALTHFLOW_FITBIT_VERIFICATION_CODE", "fitbit-code-1")
    monkeypatch.delenv("HEALTHFLOW_POLAR_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", GARMIN_TOKEN)
    yield from _serve(broker, seen=SeenNotifications(f"sqlite:///{tmp_path}/seen.db"))


def _garmin_daily(user: str, steps: int) -> dict:
    return {"userId": user, "summaryId": f"x-{user}", "calendarDate": "2026-11-02", "startTimeInSeconds": 1793574000,
            "startTimeOffsetInSeconds": 3600, "durationInSeconds": 86400, "steps": steps}


def test_garmin_push_becomes_one_raw_event_per_user(server, broker):
    base, raw, _ = server
    body = {"dailies": [_garmin_daily("u1", 100), _garmin_daily("u2", 200)],
            "sleeps": [{"userId": "u1", "summaryId": "s1", "startTimeInSeconds": 1793574000,
                        "startTimeOffsetInSeconds": 3600, "durationInSeconds": 25000, "validation": "DEVICE"}]}
    reply = requests.post(f"{base}/garmin/webhook?token={GARMIN_TOKEN}", json=body, timeout=10)
    assert reply.status_code == 200 and reply.json() == {"status": "accepted", "raw_events": 2}
    events = {e["user_id"]: e for e in _read(broker, raw)}
    assert set(events) == {"u1", "u2"} and events["u1"]["key"] == b"garmin:u1"
    assert json.loads(events["u1"]["payload"]) == {"dailies": [body["dailies"][0]], "sleeps": body["sleeps"]}
    records = [r for e in events.values() for r in normalize_message(RawMessage(e["raw"], {"partition": 0,
                                                                                            "offset": 0}))]
    assert not [r for r in records if isinstance(r, Failed)] and len(records) == 3


def test_unsigned_providers_are_authenticated_by_the_url_token(server, broker, monkeypatch):
    base, raw, _ = server
    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", "t0ken-in-the-url")
    body = {"dailies": [_garmin_daily("u1", 100)]}
    for url in (f"{base}/garmin/webhook", f"{base}/garmin/webhook?token=guess"):
        refused = requests.post(url, json=body, timeout=10)
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
    assert _read(broker, raw) == []
    accepted = requests.post(f"{base}/garmin/webhook?token=t0ken-in-the-url", json=body, timeout=10)
    assert accepted.status_code == 200 and len(_read(broker, raw)) == 1


def test_garmin_lifecycle_lists_are_applied_not_published(broker, tmp_path, monkeypatch):
    from cryptography.fernet import Fernet

    from controlplane.auth import ControlPlane

    monkeypatch.setenv("HEALTHFLOW_GARMIN_WEBHOOK_TOKEN", GARMIN_TOKEN)
    with ControlPlane(f"sqlite:///{tmp_path}/cp.db", Fernet.generate_key().decode(), environ={}) as plane:
        served = _serve(broker, plane)
        base, raw, _ = next(served)
        body = {"dailies": [_garmin_daily("u1", 100)],
                "deregistrations": [{"userId": "u9", "userAccessToken": "secret-uat"}],
                "userPermissionsChange": [{"userId": "u1", "permissions": ["HEALTH_EXPORT"],
                                           "changeTimeInSeconds": 1793574000}]}
        reply = requests.post(f"{base}/garmin/webhook?token={GARMIN_TOKEN}", json=body, timeout=10)
        assert reply.status_code == 200 and reply.json() == {"status": "accepted", "raw_events": 1, "lifecycle": 2}
        (event,) = _read(broker, raw)
        assert json.loads(event["payload"]) == {"dailies": body["dailies"]}  # no lifecycle list, no access token
        only = requests.post(f"{base}/garmin/webhook?token={GARMIN_TOKEN}",
                             json={"deregistrations": [{"userId": "u9"}]}, timeout=10)
        assert only.json() == {"status": "accepted", "raw_events": 0, "lifecycle": 1}
        assert len(_read(broker, raw)) == 1
        next(served, None)


def test_garmin_lifecycle_without_a_control_plane_is_refused_for_a_retry(server, broker):
    base, raw, _ = server
    reply = requests.post(f"{base}/garmin/webhook?token={GARMIN_TOKEN}", json={"deregistrations": [{"userId": "u9"}]},
                          timeout=10)
    assert reply.status_code == 503 and "control plane" in reply.json()["detail"]
    assert _read(broker, raw) == []


def test_a_push_that_is_not_json_is_kept_for_the_dead_letters(server, broker):
    base, raw, _ = server
    reply = requests.post(f"{base}/garmin/webhook?token={GARMIN_TOKEN}", data=b'{"dailies": [', timeout=10)
    assert reply.status_code == 200
    (event,) = _read(broker, raw)
    assert event["payload"] == b'{"dailies": ['
    (outcome,) = normalize_message(RawMessage(event["raw"], {"partition": 0, "offset": 0}))
    assert isinstance(outcome, Failed) and outcome.stage == "parse"


def _oura_headers(body: bytes, secret: str = "oura-secret", at: int | None = None) -> dict:
    stamp = str(at or int(time.time()))
    mac = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).hexdigest().upper()
    return {"x-oura-signature": mac, "x-oura-timestamp": stamp, "content-type": "application/json"}


def test_signed_notifications_are_verified_then_published(server, broker):
    base, _, notes = server
    body = json.dumps({"event_type": "update", "data_type": "sleep", "object_id": "abc",
                       "event_time": "2026-11-02T06:13:02+00:00", "user_id": "oura-7"}).encode()
    assert requests.post(f"{base}/oura/webhook", data=body, headers=_oura_headers(body), timeout=10).status_code == 200
    forged = requests.post(f"{base}/oura/webhook", data=body, headers=_oura_headers(body, "wrong"), timeout=10)
    assert forged.status_code == 401 and "does not match" in forged.json()["detail"]
    stale = requests.post(f"{base}/oura/webhook", data=body, headers=_oura_headers(body, at=int(time.time()) - 3600),
                          timeout=10)
    assert stale.status_code == 401 and "from now" in stale.json()["detail"]

    whoop_body = json.dumps({"user_id": 10129, "id": "f2e1", "type": "sleep.updated", "trace_id": "t"}).encode()
    millis = str(int(time.time() * 1000))
    mac = base64.b64encode(hmac.new(b"whoop-secret", millis.encode() + whoop_body, hashlib.sha256).digest()).decode()
    whoop = requests.post(f"{base}/whoop/webhook", data=whoop_body, timeout=10,
                          headers={"X-WHOOP-Signature": mac, "X-WHOOP-Signature-Timestamp": millis})
    assert whoop.status_code == 200
    published = _read(broker, notes)
    assert sorted((e["provider"], e["kind"], e["user_id"]) for e in published) == [
        ("oura", "notification", "oura-7"), ("whoop", "notification", "10129")]


def test_subscription_check_and_refusals(server):
    base, _, _ = server
    ok = requests.get(f"{base}/oura/webhook", params={"verification_token": "verify-me", "challenge": "c-1"},
                      timeout=10)
    assert ok.status_code == 200 and ok.json() == {"challenge": "c-1"}
    assert requests.get(f"{base}/oura/webhook", params={"verification_token": "nope", "challenge": "c"},
                        timeout=10).status_code == 401
    unknown = requests.post(f"{base}/acme/webhook", data=b"{}", timeout=10)
    assert unknown.status_code == 404 and "unknown provider" in unknown.json()["detail"]
    no_secret = requests.post(f"{base}/polar/webhook", data=b"{}", timeout=10)
    assert no_secret.status_code == 503 and "HEALTHFLOW_POLAR_WEBHOOK_SECRET" in no_secret.json()["detail"]


def _fitbit_headers(body: bytes, secret: str = "fitbit-secret") -> dict:
    mac = hmac.new(f"{secret}&".encode(), body, hashlib.sha1).digest()
    return {"X-Fitbit-Signature": base64.b64encode(mac).decode(), "Content-Type": "application/json"}


def test_fitbit_subscriber_verification(server, monkeypatch):
    base, _, _ = server
    right = requests.get(f"{base}/fitbit/webhook", params={"verify": "fitbit-code-1"}, timeout=10)
    assert right.status_code == 204 and right.content == b""
    assert requests.get(f"{base}/fitbit/webhook", timeout=10).status_code == 404
    for wrong in ("not-the-code", "fitbit-code-1\u00e9", "fitbit-code-"):  # any characters: 404, never a 500
        assert requests.get(f"{base}/fitbit/webhook", params={"verify": wrong}, timeout=10).status_code == 404
    # Oura's challenge form is not Fitbit's check
    assert requests.get(f"{base}/fitbit/webhook", params={"verification_token": "fitbit-code-1", "challenge": "c"},
                        timeout=10).status_code == 404
    monkeypatch.delenv("HEALTHFLOW_FITBIT_VERIFICATION_CODE")
    unset = requests.get(f"{base}/fitbit/webhook", params={"verify": ""}, timeout=10)
    assert unset.status_code == 404 and "HEALTHFLOW_FITBIT_VERIFICATION_CODE" in unset.json()["detail"]
    # Withings checks its callback URL with HEAD before subscribing
    assert requests.head(f"{base}/withings/webhook", timeout=10).status_code == 200
    assert requests.head(f"{base}/acme/webhook", timeout=10).status_code == 404


def test_fitbit_notifications_are_answered_204_and_split_per_owner(server, broker):
    base, _, notes = server
    one_owner = json.dumps([{"collectionType": "sleep", "date": "2024-03-10", "ownerId": "AAA111", "ownerType": "user",
                             "subscriptionId": "s-a"},
                            {"collectionType": "body", "date": "2024-03-10", "ownerId": "AAA111", "ownerType": "user",
                             "subscriptionId": "s-a"}]).encode()
    mixed = [{"collectionType": "sleep", "date": "2024-03-11", "ownerId": "AAA111", "subscriptionId": "s-a"},
             {"collectionType": "activities", "date": "2024-03-11", "ownerId": "BBB222", "subscriptionId": "s-b"},
             {"collectionType": "foods", "date": "2024-03-11", "ownerId": "AAA111", "subscriptionId": "s-a"}]
    mixed_body = json.dumps(mixed).encode()
    forged = requests.post(f"{base}/fitbit/webhook", data=one_owner, headers=_fitbit_headers(one_owner, "nope"),
                           timeout=10)
    assert forged.status_code == 401
    for body in (one_owner, mixed_body):
        reply = requests.post(f"{base}/fitbit/webhook", data=body, headers=_fitbit_headers(body), timeout=10)
        assert reply.status_code == 204 and reply.content == b""
    published = _read(broker, notes)
    assert all((e["provider"], e["kind"]) == ("fitbit", "notification") for e in published)
    by_owner: dict[str, list] = {}
    for event in published:
        by_owner.setdefault(event["user_id"], []).append(event)
    assert sorted((user, len(events)) for user, events in by_owner.items()) == [("AAA111", 2), ("BBB222", 1)]
    first, second = sorted(by_owner["AAA111"], key=lambda e: len(e["payload"]), reverse=True)
    assert first["payload"] == one_owner  # one owner: the provider's bytes unchanged
    assert json.loads(second["payload"]) == [mixed[0], mixed[2]]  # in the array's order
    assert first["key"] == second["key"] == b"fitbit:AAA111"  # one partition per owner: their order is kept
    (other,) = by_owner["BBB222"]
    assert json.loads(other["payload"]) == [mixed[1]] and other["key"] == b"fitbit:BBB222"


def test_garmin_pings_are_taken_out_of_a_push_body_entry_by_entry():
    from controlplane.webhooks import queue_pings, split_pings

    ping = {"userId": "u1", "callbackURL": "https://apis.garmin.com/wellness-api/rest/dailies?token=t"}
    body = json.dumps({"dailies": [_garmin_daily("u1", 1), ping, "junk"], "sleeps": [{**ping, "userId": "u2"}],
                       "epochs": [], "mct": {"not": "a list"}}).encode()
    rest, pings = split_pings(body, "callbackURL")
    assert json.loads(rest) == {"dailies": [_garmin_daily("u1", 1), "junk"], "epochs": [], "mct": {"not": "a list"}}
    assert pings == {"dailies": [ping], "sleeps": [{**ping, "userId": "u2"}]}
    assert [(p.kind, p.user_id, json.loads(p.payload)) for p in queue_pings("garmin", pings, "userId")] == [
        ("notification", "u1", {"dailies": [ping]}), ("notification", "u2", {"sleeps": [{**ping, "userId": "u2"}]})]
    only = json.dumps({"sleeps": [ping]}).encode()
    assert split_pings(only, "callbackURL") == (b"", {"sleeps": [ping]})
    for unchanged in (b"not json", b"[1, 2]", json.dumps({"dailies": [_garmin_daily("u1", 1)]}).encode()):
        assert split_pings(unchanged, "callbackURL") == (unchanged, {})
    assert split_pings(only, None) == (only, {})


def _whoop_headers(body: bytes, secret: str = "whoop-secret") -> dict:
    millis = str(int(time.time() * 1000))
    mac = base64.b64encode(hmac.new(secret.encode(), millis.encode() + body, hashlib.sha256).digest()).decode()
    return {"X-WHOOP-Signature": mac, "X-WHOOP-Signature-Timestamp": millis, "content-type": "application/json"}


def test_deletion_notifications_become_deletions_without_a_fetch(server, broker):
    """WHOOP sleep.deleted / workout.deleted and Oura event_type delete: published on the raw topic as kind "deleted"
    (nothing is queued for the fetcher: the object is gone), and the pipeline's reader maps them to Deletions."""
    from connectors.base import Deletion
    from transforms.normalize import read_documents

    base, raw, notes = server
    whoop_body = json.dumps({"user_id": 10129, "id": "ecfc6a15-4661-442f-a9a4-f160dd7afae8", "type": "workout.deleted",
                             "trace_id": "d-1"}).encode()
    oura_body = json.dumps({"event_type": "delete", "data_type": "sleep", "object_id": "6f1c2a70-0b8e-4a4e-9d55",
                            "event_time": "2026-11-02T06:13:02+00:00", "user_id": "oura-7"}).encode()
    whoop = requests.post(f"{base}/whoop/webhook", data=whoop_body, headers=_whoop_headers(whoop_body), timeout=10)
    oura = requests.post(f"{base}/oura/webhook", data=oura_body, headers=_oura_headers(oura_body), timeout=10)
    assert whoop.json() == oura.json() == {"status": "accepted", "deletions": 1}
    assert _read(broker, notes) == []
    # Oura deletions of what is not mapped to a record (daily_*, tag, session...) are no tombstones: they go to the
    # fetcher, which ignores them, instead of dead-lettering in the pipeline
    for data_type in ("daily_sleep", "tag"):
        unmapped = json.dumps({"event_type": "delete", "data_type": data_type, "object_id": "1f2e3d4c",
                               "event_time": "2026-11-02T06:13:02+00:00", "user_id": "oura-7"}).encode()
        answer = requests.post(f"{base}/oura/webhook", data=unmapped, headers=_oura_headers(unmapped), timeout=10)
        assert answer.json() == {"status": "accepted"}
    assert len(_read(broker, notes)) == 2
    events = sorted(_read(broker, raw), key=lambda e: e["provider"])
    assert [(e["provider"], e["kind"], e["user_id"], e["payload"]) for e in events] == [
        ("oura", "deleted", "oura-7", oura_body), ("whoop", "deleted", "10129", whoop_body)]
    mapped = []
    for event in events:
        raw_event, provider, documents = read_documents(RawMessage(event["raw"], {"partition": 0, "offset": 0}))
        mapped += [item for kind, doc in documents
                   for item in provider.normalize_document(kind, doc, raw_event.user_id)]
    assert mapped == [Deletion("sleep", "6f1c2a70-0b8e-4a4e-9d55", "oura-7", 1793599982000),
                      Deletion("activity", "ecfc6a15-4661-442f-a9a4-f160dd7afae8", "10129")]
