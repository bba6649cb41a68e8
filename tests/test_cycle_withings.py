"""The whole life of a Withings connection, against a fake Withings that answers the way Withings does.

connect (``/v2/oauth2`` ``action=requesttoken``, tokens under ``body``) → poll ``getmeas``, ``sleep_get`` and
``getactivity`` (offset/``more`` pages; each night's segments published with its ``getsummary`` entry) → normalize
→ deliver to SQL for the connection's user and reference id → the access token expires (HTTP 200, ``status`` 401)
→ rotating refresh → poll again → deauth (signed ``action=revoke``) → nothing polled. Then the failures: a refresh
token Withings refuses (status 503) revokes the connection, status 601 is a rate limit (paused and retried, on the
data API and the token endpoint alike), any other status is a permanent error that leaves the cursor where it was.

Real OAuth client code (``connectors.providers.withings.client.WithingsOAuth``), the real poller with the Withings hook,
Redis rate limits, the Tansu broker, the Beam pipeline and a SQLite destination.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from connectors import registry
from connectors.oauth import InvalidGrant, ProviderSettings
from connectors.providers.withings.client import WithingsOAuth
from controlplane.auth import MemoryCollector
from controlplane.polling import ConnectionPolling, CursorStore, KafkaPublisher, Poller, RedisRateLimiter
from controlplane.polling.cursors import LIVE_TRACK
from controlplane.polling.ratelimit import RateLimited
from core.errors import FatalError, PermanentError, RetryableError
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest.register_assert_rewrite("servers.fake_provider", "servers.fake_provider_api", "servers.fake_withings")
from servers.fake_provider import assert_disconnected, authorize, connect_provider, query_of  # noqa: E402
from servers.fake_withings import FakeWithings, FakeWithingsApi  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "withings"
NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
SHIFT = 7 * 86_400  # the fixtures' March 10-12 2024, moved into the week before NOW
USERID = "12345678"  # the Withings userid the fake's token answers carry
KINDS = ["getmeas", "sleep_get", "getactivity"]


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def shifted(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` a week later: unix fields move by SHIFT, ``date`` days by 7."""
    doc = copy.deepcopy(doc)
    for name in ("date", "startdate", "enddate", "created", "modified"):
        if isinstance(doc.get(name), int):
            doc[name] += SHIFT
        elif name == "date" and isinstance(doc.get(name), str):
            doc[name] = (datetime.fromisoformat(doc[name]) + timedelta(days=7)).date().isoformat()
    for name in ("hr", "rr", "snoring", "sdnn_1", "rmssd"):
        if isinstance(doc.get(name), dict):
            doc[name] = {str(int(k) + SHIFT): v for k, v in doc[name].items()}
    return doc


def measure_groups() -> list[dict[str, Any]]:
    """The getmeas fixture's groups a week later (its 2023 and January groups stay outside the poll)."""
    return [shifted(g) for g in load("getmeas.json")["body"]["measuregrps"]]


def nights() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two nights, their getsummary entries and their segments: a Berlin night inside one poll window (its segments
    come from that window's page) and a Los Angeles night across two windows (22:20-07:05 local, 05:20-14:05 UTC
    here: fetched by one more ``action=get`` over the night)."""
    berlin = shifted(load("sleep_getsummary.json")["body"]["series"][0])
    segments = [shifted(s) for s in load("sleep_get.json")["body"]["series"]]
    los_angeles = shifted(load("sleep_getsummary.los-angeles.json")["body"]["series"][0])
    los_angeles.update(startdate=los_angeles["startdate"] - 7200, enddate=los_angeles["enddate"] - 7200)
    begin, states = los_angeles["startdate"], [0, 1, 2, 1, 3, 1, 2, 3, 1, 0]
    step = (los_angeles["enddate"] - begin) // len(states)
    for index, state in enumerate(states):
        start = begin + index * step
        segments.append({"startdate": start, "enddate": start + step, "state": state, "model": "Sleep Analyzer",
                         "model_id": 63, "hr": {str(start): 58 - index}, "rr": {str(start): 14}})
    return [berlin, los_angeles], segments


def activities() -> list[dict[str, Any]]:
    return [shifted(a) for a in load("getactivity.json")["body"]["activities"]]


@pytest.fixture
def fake_withings():
    """A started FakeWithings (connect_provider registers the client)."""
    with FakeWithings() as provider:
        yield provider


@pytest.fixture
def limiter(topic) -> RedisRateLimiter:
    return RedisRateLimiter(redis.Redis(host="127.0.0.1", port=6379), namespace=topic)


def poller_for(api: FakeWithingsApi, state: str, publisher: KafkaPublisher, limiter: RedisRateLimiter,
               clock: list[datetime], **options: Any) -> Poller:
    return Poller(cursors=CursorStore(state), publisher=publisher, manifests={"withings": api.manifest},
                  limiter=limiter, clock=lambda: clock[0], overlap=timedelta(0), backoff_s=0.01, **options)


def deliver(tmp_path: Path, broker: Any, topic: str, state: str) -> dict[str, int]:
    return run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "cycle"),
                                  [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")], str(tmp_path / "dlq"),
                                  state_url=state))


def delivered_rows(tmp_path: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    with sqlite3.connect(tmp_path / "out.db") as conn:
        rows = conn.execute("SELECT r.user_id, u.reference_id, r.type, r.payload FROM healthflow_records r "
                            "JOIN healthflow_users u ON u.user_id = r.user_id ORDER BY r.type, r.start_time").fetchall()
    return [(user, reference, kind, json.loads(payload)) for user, reference, kind, payload in rows]


# ======================================================================================================================
# the cycle
# ======================================================================================================================
def test_connect_poll_deliver_refresh_deauth(tmp_path, fake_withings, broker, topic, limiter):
    state = f"sqlite:///{tmp_path}/state.db"
    events = MemoryCollector()
    plane, start = connect_provider(state, fake_withings, "withings", USERID, emit=events, reference_id="athlete-w")
    connection = plane.connection(start.user_id)
    assert (connection.state, connection.provider_user_id) == ("active", USERID)  # the userid under "body"
    [exchange] = fake_withings.token_requests
    assert exchange["action"] == "requesttoken" and exchange["grant_type"] == "authorization_code"
    assert exchange["client_secret"] == "secret"  # in the body: Withings takes no Basic auth
    first_tokens = plane.tokens(start.user_id)
    assert first_tokens.expires_at_ms is not None  # expires_in came from "body" too

    summaries, segments = nights()
    clock = [NOW]
    with FakeWithingsApi(page_size=3, token_validator=fake_withings.is_live) as api:
        api.add("getmeas", measure_groups())
        api.add("sleep_getsummary", summaries)
        api.add("sleep_get", segments)
        api.add("getactivity", activities())
        publisher = KafkaPublisher(broker.bootstrap, topic)
        polling = ConnectionPolling(plane, poller_for(api, state, publisher, limiter, clock), kinds=lambda _: KINDS)

        first = polling.poll_once()
        published = {r.kind: r.published for r in first.results}
        # getmeas: 6 groups in the week, 3 a page; sleep_get: one payload per night; getactivity: one page
        assert published == {"getmeas": 2, "sleep_get": 2, "getactivity": 1}
        berlin, los_angeles = summaries
        asked = [r.params for r in api.served("sleep_get")]
        assert len(asked) == 7 + 1  # a day a window, and one more for the night across two windows:
        assert [(p["startdate"], p["enddate"]) for p in asked if int(p["enddate"]) - int(p["startdate"]) < 86_400] \
            == [(str(los_angeles["startdate"]), str(los_angeles["enddate"]))]
        assert all(p["data_fields"] == "hr,rr,snoring,sdnn_1,rmssd" for p in asked)

        summary = deliver(tmp_path, broker, topic, state)
        rows = delivered_rows(tmp_path)
        assert summary.get("delivered:sql") == len(rows) == 6
        assert {(user, reference) for user, reference, _, _ in rows} == {(start.user_id, "athlete-w")}
        by_type: dict[str, list[dict[str, Any]]] = {}
        for _, _, kind, payload in rows:
            by_type.setdefault(kind, []).append(payload)
        assert {kind: len(found) for kind, found in by_type.items()} == {"body": 2, "sleep": 2, "daily": 2}
        sleeps = {s["metadata"]["summary_id"]: s for s in by_type["sleep"]}
        assert set(sleeps) == {str(berlin["id"]), str(los_angeles["id"])}
        [unshifted] = registry()["withings"].normalize(load("sleep_get.json"), kind="sleep_get", user_id=USERID)
        assert [s["level"] for s in sleeps[str(berlin["id"])]["sleep_durations_data"]["hypnogram_samples"]] \
            == [s["level"] for s in unshifted.data["sleep_durations_data"]["hypnogram_samples"]]  # the whole night
        assert [s["level"] for s in sleeps[str(los_angeles["id"])]["sleep_durations_data"]["hypnogram_samples"]] \
            == [1, 4, 5, 4, 6, 4, 5, 6, 4, 1]  # awake, light, deep, light, REM, … (fetched across two windows)
        weights = [m["weight_kg"] for b in by_type["body"]
                   for m in b.get("measurements_data", {}).get("measurements", []) if "weight_kg" in m]
        assert weights == [72.45]  # the ambiguous group (attrib 1) is not the user's

        # the access token expires: Withings answers HTTP 200 {"status": 401}; the service refreshes and goes on
        fake_withings.expire_access_tokens()
        clock[0] = NOW + timedelta(days=1)
        late = shifted(load("getmeas.json")["body"]["measuregrps"][2])
        late.update(grpid=5123499999, date=int((NOW + timedelta(hours=12)).timestamp()))
        api.add("getmeas", [late])
        second = polling.poll_once()
        assert second.refreshed == [start.user_id]
        assert 401 in api.body_statuses
        refresh = fake_withings.token_requests[-1]
        assert (refresh["action"], refresh["grant_type"]) == ("requesttoken", "refresh_token")
        assert refresh["refresh_token"] == first_tokens.refresh_token
        rotated = plane.tokens(start.user_id)
        assert rotated.refresh_token != first_tokens.refresh_token
        assert fake_withings.live_refresh_tokens() == [rotated.refresh_token]  # the old one is spent
        assert {r.kind: r.published for r in second.results} == {"getmeas": 1, "sleep_get": 0, "getactivity": 0}
        assert deliver(tmp_path, broker, topic, state).get("delivered:sql") == 1

        # the user disconnects: the grant ends at Withings (signed revoke), a deauth event, nothing polled any more
        plane.deauthenticate(start.user_id)
        assert fake_withings.revoked_users == [USERID] and fake_withings.signature_errors == 0
        assert not fake_withings.is_live(rotated.access_token) and fake_withings.live_refresh_tokens() == []
        assert_disconnected(plane, polling, api, start.user_id, events)
        publisher.close()
    plane.close()


@pytest.mark.parametrize("how", ["withdrawn", "reused"])
def test_refresh_refused_revokes_the_connection(tmp_path, fake_withings, broker, topic, limiter, how):
    """Withings refuses the refresh token (status 503 "invalid refresh_token"): the user withdrew access at Withings,
    or the token was already used (rotation; the fake, like the reuse detection it models, ends the grant)."""
    state = f"sqlite:///{tmp_path}/state.db"
    events = MemoryCollector()
    plane, start = connect_provider(state, fake_withings, "withings", USERID, emit=events)
    stored = plane.tokens(start.user_id).refresh_token
    if how == "withdrawn":
        fake_withings.revoke_account(USERID)
    else:  # someone else refreshed with the stored token first
        plane.oauth("withings").refresh(stored)
    fake_withings.expire_access_tokens()
    with FakeWithingsApi(token_validator=fake_withings.is_live) as api:
        api.add("getmeas", measure_groups())
        publisher = KafkaPublisher(broker.bootstrap, topic)
        polling = ConnectionPolling(plane, poller_for(api, state, publisher, limiter, [NOW]),
                                    kinds=lambda _: ["getmeas"])
        report = polling.poll_once()
        assert report.revoked == [start.user_id] and report.results == []
        assert api.body_statuses == [401]
        assert polling.poll_once().results == [] and len(api.requests) == 1
        publisher.close()
    assert fake_withings.reused_refresh_tokens == ([stored] if how == "reused" else [])
    assert plane.connection(start.user_id).state == "revoked" and plane.tokens(start.user_id) is None
    assert [e["type"] for e in events.events] == ["auth", "access_revoked"]
    assert "Withings status 503" in events.events[-1]["message"]
    plane.close()


def test_code_exchange_refused_cancels_the_connection(tmp_path, fake_withings):
    """A code Withings refuses (already used: status 503 "invalid code") abandons the pending connection."""
    plane, _ = connect_provider(f"sqlite:///{tmp_path}/state.db", fake_withings, "withings", USERID)
    began = plane.start_auth("dev-1", "withings", reference_id="athlete-2")
    params = query_of(authorize(began.auth_url))
    spent = plane.oauth("withings").exchange_code(params["code"], plane.callback_url("withings"), None)
    assert spent["access_token"]  # someone else used the code first …
    with pytest.raises(InvalidGrant, match="invalid code"):
        plane.oauth("withings").exchange_code(params["code"], plane.callback_url("withings"), None)
    outcome = plane.complete_auth("withings", params)  # … so healthflow's exchange is refused
    assert not outcome.ok and outcome.reason == "token_exchange_failed" and "invalid code" in outcome.message
    assert plane.connections("dev-1", "athlete-2") == []
    plane.close()


def test_token_endpoint_601_and_bad_client(fake_withings):
    """601 from /v2/oauth2 is retryable (the connection stays); a refused client id is our configuration's fault."""
    manifest = registry()["withings"].manifest
    fake_withings.register("withings-client", "secret")
    oauth = WithingsOAuth(manifest, ProviderSettings("withings-client", "secret", oauth_base=fake_withings.base_url))
    fake_withings.next_account = USERID
    url = oauth.authorization_url("http://127.0.0.1:9/cb", "state-1", None)
    token = oauth.exchange_code(query_of(authorize(url))["code"], "http://127.0.0.1:9/cb", None)
    assert oauth.provider_user_id(token) == USERID and token["token_type"] == "Bearer"

    fake_withings.throttle_tokens = 1
    with pytest.raises(RetryableError, match="601"):
        oauth.refresh(token["refresh_token"])
    assert fake_withings.live_refresh_tokens() == [token["refresh_token"]]  # nothing spent
    assert oauth.refresh(token["refresh_token"])["refresh_token"] != token["refresh_token"]

    wrong = WithingsOAuth(manifest, ProviderSettings("withings-client", "wrong", oauth_base=fake_withings.base_url))
    with pytest.raises(FatalError, match="client"):
        wrong.refresh("anything")


# ======================================================================================================================
# the data API's statuses
# ======================================================================================================================
def test_601_pauses_and_retries_then_gives_up(tmp_path, fake_withings, broker, topic, limiter):
    state = f"sqlite:///{tmp_path}/state.db"
    plane, start = connect_provider(state, fake_withings, "withings", USERID)
    connection = plane.connection(start.user_id)
    with FakeWithingsApi(page_size=10, token_validator=fake_withings.is_live) as api:
        api.add("getmeas", measure_groups())
        publisher = KafkaPublisher(broker.bootstrap, topic)
        clock = [NOW]
        poller = poller_for(api, state, publisher, limiter, clock, max_attempts=3)
        token = lambda: plane.access_token(start.user_id)  # noqa: E731

        api.throttle(2)  # two answers {"status": 601}, then the data
        result = poller.poll(connection, "getmeas", token)
        assert api.body_statuses == [601, 601, 0] and result.published == 1
        assert CursorStore(state).get(start.user_id, "getmeas", LIVE_TRACK) == NOW

        clock[0] = NOW + timedelta(hours=6)
        api.throttle(5)
        with pytest.raises(RateLimited, match="HTTP 200 taken as 429"):
            poller.poll(connection, "getmeas", token)
        assert api.body_statuses[3:] == [601, 601, 601]  # max_attempts, each after the provider's pause
        assert CursorStore(state).get(start.user_id, "getmeas", LIVE_TRACK) == NOW
        publisher.close()
    plane.close()


def test_other_statuses_are_permanent(tmp_path, fake_withings, broker, topic, limiter):
    state = f"sqlite:///{tmp_path}/state.db"
    plane, start = connect_provider(state, fake_withings, "withings", USERID)
    with FakeWithingsApi(token_validator=fake_withings.is_live) as api:
        api.respond("getactivity", lambda *_: {"status": 2555, "body": {}, "error": "An unknown error occurred"})
        publisher = KafkaPublisher(broker.bootstrap, topic)
        poller = poller_for(api, state, publisher, limiter, [NOW])
        with pytest.raises(PermanentError, match=r"HTTP 200 taken as 400.*2555"):
            poller.poll(plane.connection(start.user_id), "getactivity", lambda: plane.access_token(start.user_id))
        assert len(api.requests) == 1  # not retried
        assert CursorStore(state).get(start.user_id, "getactivity", LIVE_TRACK) is None
        publisher.close()
    plane.close()


@pytest.mark.parametrize(("http", "body", "acted_on"), [
    (200, {"status": 0, "body": {"measuregrps": []}}, 200),
    (200, {"status": 401, "body": {}, "error": "invalid_token"}, 401),  # authentication failed: refresh
    (200, {"status": 100, "body": {}}, 401),
    (200, {"status": 601, "body": {}}, 429),  # too many requests: pause and retry
    (200, {"status": 522, "body": {}}, 504),  # timeout: back off and retry
    (200, {"status": 503, "body": {}, "error": "Invalid Params"}, 400),  # anything else: permanent
    (200, {"status": 2554, "body": {}, "error": "Not implemented"}, 400),
    (502, None, 502),  # a real HTTP error stays what it is
    (200, None, 200),
])
def test_hook_status_mapping(http, body, acted_on):
    from connectors.providers.withings.client import WithingsHook

    assert WithingsHook().status(http, body) == acted_on
