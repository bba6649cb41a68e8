"""The connection lifecycle on real stores (SQLite, PostgreSQL) against a fake provider over real HTTP."""

from __future__ import annotations

import threading

import pytest
import requests
from cryptography.fernet import Fernet

from connectors.oauth import ProviderOAuth, ProviderSettings, get_json
from controlplane.auth import ControlPlane, MemoryCollector
from controlplane.auth.control_plane import (
    ACTIVE,
    DEAUTH,
    REVOKED,
    ConnectionInactive,
    ConnectionRevoked,
    UnknownUser,
    now_ms,
)
from core.errors import FatalError

pytest_plugins = ("servers.fake_provider",)  # fixtures: fake_provider, store_url, table_prefix
pytest.register_assert_rewrite("servers.fake_provider")
from servers.fake_provider import FakeProvider, authorize, fake_manifests, fake_settings, query_of  # noqa: E402

SECRET = Fernet.generate_key().decode()


def make_plane(store_url: str, prefix: str, provider: FakeProvider, **kwargs) -> ControlPlane:
    kwargs.setdefault("emit", MemoryCollector())
    kwargs.setdefault("settings", fake_settings(provider))
    return ControlPlane(store_url, SECRET, public_url="http://127.0.0.1:9", manifests=fake_manifests(),
                        table_prefix=prefix, environ={}, **kwargs).open()


@pytest.fixture
def plane(store_url, table_prefix, fake_provider):
    control_plane = make_plane(store_url, table_prefix, fake_provider)
    yield control_plane
    control_plane.drop_tables()
    control_plane.close()


def connect(plane: ControlPlane, provider: str = "fakebody", dev_id: str = "dev-1", reference_id: str = "ref-1"):
    start = plane.start_auth(dev_id, provider, reference_id=reference_id, success_url="https://app.example/ok",
                             failure_url="https://app.example/failed")
    outcome = plane.complete_auth(provider, query_of(authorize(start.auth_url)))
    assert outcome.ok, outcome
    return start.user_id


def test_refuses_to_start_without_a_secret_key(tmp_path):
    with pytest.raises(FatalError, match=r"HEALTHFLOW_SECRET_KEY.*Fernet.generate_key"):
        ControlPlane(f"sqlite:///{tmp_path}/c.db", environ={}, manifests={})
    with pytest.raises(FatalError, match="not a valid Fernet key"):
        ControlPlane(f"sqlite:///{tmp_path}/c.db", "not-a-key", manifests={})
    assert ControlPlane(f"sqlite:///{tmp_path}/c.db", environ={"HEALTHFLOW_SECRET_KEY": SECRET}, manifests={})


def test_api_keys_are_hashed_at_rest(plane):
    dev = plane.create_developer(name="acme")
    other = plane.create_developer()
    key = plane.create_api_key(dev)
    rows = plane.store.query(f"SELECT * FROM {plane.t_keys}")
    assert len(rows) == 1 and all(key not in str(value) and key.split(".")[1] not in str(value) for value in rows[0])
    assert plane.check_api_key(dev, key)
    assert not plane.check_api_key(dev, key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert not plane.check_api_key(other, key)
    assert not plane.check_api_key(dev, "garbage")
    plane.revoke_api_key(plane.api_keys(dev)[0]["key_id"])
    assert not plane.check_api_key(dev, key)


def test_connect_stores_tokens_encrypted_and_emits_auth(plane, fake_provider):
    user_id = connect(plane)
    connection = plane.connection(user_id)
    assert (connection.state, connection.provider_user_id, connection.scopes) == (ACTIVE, "acct-1", "daily,sleep")
    tokens = plane.tokens(user_id)
    assert tokens.access_token and tokens.refresh_token and tokens.expires_at_ms
    stored = plane.store.query(f"SELECT * FROM {plane.t_tokens}")
    assert all(tokens.access_token not in str(v) and tokens.refresh_token not in str(v) for v in stored[0])
    [event] = plane.emit.of_type("auth")
    assert event["status"] == "success" and event["user"]["user_id"] == user_id
    assert event["reference_id"] == "ref-1" and event["user"]["provider"] == "FAKEBODY"
    assert fake_provider.token_requests[0]["client_secret"] == "body-secret"  # client_auth: body
    assert plane.resolve_user("FAKEBODY", "acct-1").user_id == user_id


def test_pkce_provider_requires_the_verifier(plane, fake_provider):
    start = plane.start_auth("dev-1", "FAKEPKCE", reference_id="r")
    sent = fake_provider.authorize_requests
    redirect = authorize(start.auth_url)
    assert sent[-1]["code_challenge_method"] == "S256" and sent[-1]["scope"] == "activity,heartrate"
    params = query_of(redirect)
    token_url = f"{fake_provider.base_url}/oauth/token"
    form = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": plane.callback_url("fakepkce")}
    for extra in ({}, {"code_verifier": "x" * 64}):
        refused = requests.post(token_url, data={**form, **extra}, auth=("pkce-client", "pkce-secret"), timeout=5)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert plane.complete_auth("fakepkce", params).ok
    assert len(fake_provider.token_requests[-1]["code_verifier"]) == 64
    assert "client_secret" not in fake_provider.token_requests[-1]  # client_auth: basic


def test_concurrent_refresh_spends_the_refresh_token_once(store_url, table_prefix, fake_provider):
    fake_provider.expires_in, fake_provider.refresh_delay_s = 60, 0.3  # 60 s: inside the 300 s refresh skew
    workers = [make_plane(store_url, table_prefix, fake_provider) for _ in range(3)]  # three workers, one store
    try:
        user_id = connect(workers[0])
        fake_provider.expires_in = 3600  # refreshed tokens are fresh
        for round_ in (1, 2):
            barrier, results, errors = threading.Barrier(6), [], []

            def worker(plane: ControlPlane) -> None:
                try:
                    if round_ == 1:  # noqa: B023 - every worker sees the expiring token before any refresh starts
                        seen = plane.tokens(user_id).version
                        barrier.wait()  # noqa: B023
                        results.append(plane.refresh(user_id, seen_version=seen).access_token)  # noqa: B023
                    else:  # the public path: check expiry, refresh when needed
                        barrier.wait()  # noqa: B023
                        results.append(plane.access_token(user_id))  # noqa: B023
                except Exception as exc:
                    errors.append(exc)  # noqa: B023

            threads = [threading.Thread(target=worker, args=(workers[i % 3],)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert not errors
            assert fake_provider.calls["token:refresh_token"] == round_
            assert len(set(results)) == 1 and results[0] == workers[1].tokens(user_id).access_token
            assert workers[2].tokens(user_id).version == round_ + 1
            # time passes: the token is about to expire again
            workers[0].store.execute(f"UPDATE {workers[0].t_tokens} SET expires_at_ms = ?", [now_ms() + 1000])
        assert fake_provider.reused_refresh_tokens == []
        assert fake_provider.live_refresh_tokens() == [workers[0].tokens(user_id).refresh_token]
    finally:
        workers[0].drop_tables()
        for plane in workers:
            plane.close()


def test_rejected_refresh_marks_the_connection_revoked(plane, fake_provider):
    user_id = connect(plane)
    fake_provider.revoke_account("acct-1")
    with pytest.raises(ConnectionRevoked, match="invalid_grant"):
        plane.refresh(user_id, force=True)
    assert plane.connection(user_id).state == REVOKED and plane.tokens(user_id) is None
    [event] = plane.emit.of_type("access_revoked")
    assert event["status"] == "warning" and event["user"]["user_id"] == user_id and not event["user"]["active"]
    with pytest.raises(ConnectionInactive):
        plane.access_token(user_id)
    assert fake_provider.calls["token:refresh_token"] == 1


def test_provider_revocation_notice_after_a_disconnect_changes_nothing(plane, fake_provider):
    """A deregistration notice (e.g. Garmin's last push after our DELETE) for a disconnected user: no revoke, no
    second event; for an active one: revoked with ``access_revoked``."""
    gone = connect(plane)
    fake_provider.next_account = "acct-2"
    active = connect(plane, reference_id="ref-2")
    plane.deauthenticate(gone)
    assert plane.mark_revoked(gone).state == DEAUTH and plane.emit.of_type("access_revoked") == []
    assert plane.mark_revoked(active).state == REVOKED and plane.mark_revoked(active).state == REVOKED
    [event] = plane.emit.of_type("access_revoked")
    assert event["user"]["user_id"] == active
    with pytest.raises(UnknownUser):
        plane.mark_revoked("nobody")


def test_update_scopes_from_a_permissions_notice(plane):
    user_id = connect(plane)
    assert plane.update_scopes(user_id, ["ACTIVITY_EXPORT", "HEALTH_EXPORT"]).scopes == "ACTIVITY_EXPORT,HEALTH_EXPORT"
    assert plane.update_scopes(user_id, []).scopes is None


def test_rejected_token_without_refresh_token_revokes(plane):
    """A provider that issues one long-lived token (Polar) rejected it: nothing to refresh, the grant is gone."""
    user_id = connect(plane)
    plane.store.execute(f"UPDATE {plane.t_tokens} SET secret = ? WHERE user_id = ?",
                        [plane.cipher.encrypt(user_id, {"access_token": "only-token", "token_type": "Bearer"}),
                         user_id])
    with pytest.raises(ConnectionRevoked, match="no refresh token"):
        plane.refresh(user_id, force=True)
    assert plane.connection(user_id).state == REVOKED and plane.tokens(user_id) is None
    assert len(plane.emit.of_type("access_revoked")) == 1


def test_refresh_without_rotation_keeps_the_refresh_token(plane, fake_provider):
    fake_provider.rotate = False
    user_id = connect(plane)
    before = plane.tokens(user_id)
    after = plane.refresh(user_id, force=True)
    assert after.refresh_token == before.refresh_token and after.access_token != before.access_token
    assert plane.access_token(user_id) == after.access_token


def test_deauth_revokes_at_the_provider(plane, fake_provider):
    user_id = connect(plane, "fakepkce")
    tokens = plane.tokens(user_id)
    plane.deauthenticate(user_id)
    assert fake_provider.calls["revoke"] >= 1 and tokens.refresh_token in fake_provider.revoked_tokens
    assert fake_provider.live_refresh_tokens() == []
    assert plane.tokens(user_id) is None and plane.connection(user_id).state == DEAUTH
    [event] = plane.emit.of_type("deauth")
    assert event["status"] == "success" and event["user"]["user_id"] == user_id
    plane.deauthenticate(user_id)  # idempotent, no second event
    assert len(plane.emit.of_type("deauth")) == 1


def test_reconnecting_the_same_account_emits_user_reauth(plane):
    old = connect(plane, reference_id="ref-9")
    new = connect(plane, reference_id="ref-9")
    [event] = plane.emit.of_type("user_reauth")
    assert event["new_user"]["user_id"] == new and event["old_user"]["user_id"] == old
    assert event["status"] == "warning" and len(plane.emit.of_type("auth")) == 2
    assert plane.connection(old).state == DEAUTH and plane.tokens(old) is None
    assert plane.resolve_user("fakebody", "acct-1").user_id == new


def test_events_stay_in_the_outbox_until_emit_takes_them(store_url, table_prefix, fake_provider):
    taken, failing = [], [True]

    def flaky(event: dict) -> None:
        if failing[0]:
            raise ConnectionError("destination down")
        taken.append(event)

    plane = make_plane(store_url, table_prefix, fake_provider, emit=flaky)
    try:
        connect(plane)
        assert taken == []
        failing[0] = False
        assert plane.flush_events() == 1 and taken[0]["type"] == "auth"
        assert plane.flush_events() == 0
    finally:
        plane.drop_tables()
        plane.close()


def test_profile_call_when_the_token_response_has_no_user_id(store_url, table_prefix, fake_provider):
    fake_provider.include_user_id = False
    settings = fake_settings(fake_provider)
    settings["fakebody"] = ProviderSettings("body-client", "body-secret", oauth_base=fake_provider.base_url,
                                            api_base=fake_provider.base_url)
    fetchers = {"fakebody": lambda oauth, token: get_json(oauth, token, "/profile")["user_id"]}
    plane = make_plane(store_url, table_prefix, fake_provider, settings=settings, profile_fetchers=fetchers)
    try:
        user_id = connect(plane)
        assert plane.connection(user_id).provider_user_id == "acct-1" and fake_provider.calls["profile"] == 1
        start = plane.start_auth("dev-1", "fakepkce")  # no profile call for fakepkce: the connection cannot be keyed
        outcome = plane.complete_auth("fakepkce", query_of(authorize(start.auth_url)))
        assert outcome.reason == "token_exchange_failed" and plane.emit.of_type("auth_cancelled")
    finally:
        plane.drop_tables()
        plane.close()


def test_registry_manifest_with_env_credentials_and_loopback_override(tmp_path, fake_provider):
    fake_provider.register("oura-id", "oura-secret", "body")
    environ = {"HEALTHFLOW_OURA_CLIENT_ID": "oura-id", "HEALTHFLOW_OURA_CLIENT_SECRET": "oura-secret",
               "HEALTHFLOW_OURA_OAUTH_BASE": fake_provider.base_url, "HEALTHFLOW_SECRET_KEY": SECRET}
    with ControlPlane(f"sqlite:///{tmp_path}/c.db", environ=environ, emit=MemoryCollector()) as plane:
        assert "oura" in plane.connectable() and "whoop" not in plane.connectable()
        start = plane.start_auth("dev-1", "OURA", reference_id="r")
        assert start.auth_url.startswith(f"{fake_provider.base_url}/oauth/authorize?")
        assert query_of(start.auth_url)["scope"].startswith("email personal daily")
        assert plane.complete_auth("OURA", query_of(authorize(start.auth_url))).ok
    manifest = fake_manifests()["fakebody"]
    with pytest.raises(FatalError, match="must use https"):
        ProviderOAuth(manifest, ProviderSettings("id", "s", oauth_base="http://fake.example"))


def test_purge_removes_abandoned_flows(plane):
    start = plane.start_auth("dev-1", "fakebody", reference_id="r")
    session = plane.create_widget_session("dev-1", providers=["FAKEBODY"], ttl_s=0)
    assert plane.widget_session(session.session_id).expired
    assert plane.purge_expired(older_than_s=-1) == 1
    assert plane.widget_session(session.session_id) is None
    with pytest.raises(KeyError):
        plane.connection(start.user_id)
    assert plane.complete_auth("fakebody", query_of(authorize(start.auth_url))).reason == "invalid_state"
