"""The /v2 API on a real uvicorn server (loopback), driven like a developer's backend and a user's browser."""

from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import requests
from cryptography.fernet import Fernet

from connectors import registry
from controlplane.api import BackgroundServer, create_app
from controlplane.auth import ControlPlane, MemoryCollector
from controlplane.auth.control_plane import ACTIVE, DEAUTH

pytest_plugins = ("servers.fake_provider",)  # fixtures: fake_provider, store_url, table_prefix
pytest.register_assert_rewrite("servers.fake_provider")
from servers.fake_provider import fake_manifests, fake_settings, query_of  # noqa: E402

OK_URL, FAILED_URL = "https://app.example/connected", "https://app.example/failed"


@pytest.fixture
def api(store_url, table_prefix, fake_provider):
    server = BackgroundServer()
    manifests = {**{slug: p.manifest for slug, p in registry().items()}, **fake_manifests()}
    plane = ControlPlane(store_url, Fernet.generate_key().decode(), public_url=server.url, emit=MemoryCollector(),
                         manifests=manifests, settings=fake_settings(fake_provider), environ={},
                         table_prefix=table_prefix).open()
    dev_id = plane.create_developer(name="acme")
    key = plane.create_api_key(dev_id)
    server.start(create_app(plane))
    http = requests.Session()
    http.headers.update({"dev-id": dev_id, "x-api-key": key})
    try:
        yield SimpleNamespace(url=server.url, plane=plane, events=plane.emit, fake=fake_provider, http=http,
                              dev_id=dev_id, key=key)
    finally:
        server.stop()
        http.close()
        plane.drop_tables()
        plane.close()


def browse(url: str) -> requests.Response:
    """One browser step, without following the redirect."""
    return requests.get(url, allow_redirects=False, timeout=10)


def start(api, resource: str = "FAKEBODY", reference_id: str = "ref-1") -> dict:
    response = api.http.post(f"{api.url}/v2/auth/authenticateUser", params={"resource": resource},
                             json={"reference_id": reference_id, "auth_success_redirect_url": OK_URL,
                                   "auth_failure_redirect_url": FAILED_URL, "language": "en"})
    assert response.status_code == 200, response.text
    return response.json()


def test_api_keys_missing_401_wrong_403(api):
    url = f"{api.url}/v2/integrations"
    missing = requests.get(url, timeout=5)
    assert missing.status_code == 401 and "dev-id" in missing.json()["message"]
    assert requests.get(url, headers={"dev-id": api.dev_id}, timeout=5).status_code == 401
    wrong = requests.get(url, headers={"dev-id": api.dev_id, "x-api-key": api.key[:-2] + "zz"}, timeout=5)
    assert wrong.status_code == 403
    assert wrong.json() == {"status": "error", "message": wrong.json()["message"]} and api.dev_id in wrong.text
    other = api.plane.create_developer()
    assert requests.get(url, headers={"dev-id": other, "x-api-key": api.key}, timeout=5).status_code == 403
    body = api.http.get(url).json()
    oura = next(p for p in body["providers"] if p["provider"] == "OURA")
    assert oura["types"]["sleep"] and oura["types"]["daily"] and not oura["types"]["nutrition"]
    assert not oura["enabled"] and next(p for p in body["providers"] if p["provider"] == "FAKEPKCE")["enabled"]


def test_widget_connect_flow(api):
    created = api.http.post(f"{api.url}/v2/auth/generateWidgetSession", json={
        "providers": "FAKEPKCE,FAKEBODY", "reference_id": "ref-7", "language": "en",
        "auth_success_redirect_url": OK_URL, "auth_failure_redirect_url": FAILED_URL}).json()
    assert created["status"] == "success" and created["expires_in"] == 900
    assert created["url"] == f"{api.url}/widget/session/{created['session_id']}"
    page = browse(created["url"])
    assert page.status_code == 200 and "Fake PKCE" in page.text and "Fake BODY" in page.text
    link = f"/widget/session/{created['session_id']}/connect/fakepkce"
    assert f'href="{link}"' in page.text
    to_provider = browse(api.url + link)
    assert to_provider.status_code == 302 and to_provider.headers["Location"].startswith(api.fake.base_url)
    to_callback = browse(to_provider.headers["Location"])
    assert to_callback.headers["Location"].startswith(f"{api.url}/v2/auth/callback/fakepkce?")
    done = browse(to_callback.headers["Location"])
    assert done.status_code == 302 and done.headers["Location"].startswith(OK_URL + "?")
    user_id = query_of(done.headers["Location"])["user_id"]
    assert query_of(done.headers["Location"])["resource"] == "FAKEPKCE"

    info = api.http.get(f"{api.url}/v2/userInfo", params={"user_id": user_id}).json()
    assert info["is_authenticated"] and info["user"]["provider"] == "FAKEPKCE"
    assert info["user"]["reference_id"] == "ref-7" and info["user"]["active"]
    assert info["user"]["scopes"] == "activity,heartrate"
    listed = api.http.get(f"{api.url}/v2/userInfo", params={"reference_id": "ref-7"}).json()
    assert [u["user_id"] for u in listed["users"]] == [user_id]

    tokens = api.plane.tokens(user_id)
    [stored] = api.plane.store.query(f"SELECT secret FROM {api.plane.t_tokens} WHERE user_id = ?", [user_id])
    assert tokens.access_token not in stored[0] and tokens.refresh_token not in stored[0]
    [event] = api.events.of_type("auth")
    assert event["user"]["user_id"] == user_id and event["reference_id"] == "ref-7"
    assert event["widget_session_id"] == created["session_id"] and event["version"] == "2022-03-16"
    assert api.fake.authorize_requests[-1]["code_challenge_method"] == "S256"


def test_authenticate_user_flow_and_callback_failures(api):
    started = start(api)
    assert started["status"] == "success" and started["auth_url"].startswith(f"{api.fake.base_url}/oauth/authorize")
    assert api.plane.connection(started["user_id"]).state == "pending"
    callback = browse(started["auth_url"]).headers["Location"]
    done = browse(callback)
    assert done.headers["Location"].startswith(OK_URL) and query_of(done.headers["Location"])["user_id"] == \
        started["user_id"]

    replayed = browse(callback)  # reused state
    assert replayed.status_code == 302 and query_of(replayed.headers["Location"])["reason"] == "state_reused"
    assert api.plane.connection(started["user_id"]).state == ACTIVE

    wrong_provider = start(api, reference_id="ref-2")  # the right state sent back to another provider's callback
    back = browse(wrong_provider["auth_url"]).headers["Location"]
    failed = browse(back.replace("/callback/fakebody?", "/callback/fakepkce?"))
    assert query_of(failed.headers["Location"])["reason"] == "state_mismatch"
    assert api.http.get(f"{api.url}/v2/userInfo", params={"user_id": wrong_provider["user_id"]}).status_code == 404
    assert query_of(browse(back).headers["Location"])["reason"] == "state_reused"  # the flow is over

    late = start(api, reference_id="ref-3")  # expired state
    back = browse(late["auth_url"]).headers["Location"]
    api.plane.store.execute(f"UPDATE {api.plane.t_flows} SET expires_at_ms = 0")
    assert query_of(browse(back).headers["Location"])["reason"] == "state_expired"

    api.fake.deny = True
    denied = start(api, reference_id="ref-4")
    assert query_of(browse(browse(denied["auth_url"]).headers["Location"]).headers["Location"])["reason"] == \
        "access_denied"

    garbage = browse(f"{api.url}/v2/auth/callback/fakebody?code=x&state=nonsense")
    assert garbage.status_code == 400 and "start the connection again" in garbage.text

    cancelled = api.events.of_type("auth_cancelled")
    assert [e["reason"] for e in cancelled] == ["state_reused", "state_mismatch", "state_reused", "state_expired",
                                                "access_denied"]
    assert [e["reference_id"] for e in cancelled] == ["ref-1", "ref-2", "ref-2", "ref-3", "ref-4"]
    assert all(e["status"] == "error" and e["provider"] == "FAKEBODY" for e in cancelled)
    assert len(api.events.of_type("auth")) == 1


def test_a_wrong_state_secret_cannot_burn_a_login(api):
    """Knowing a flow id (it is in lifecycle events) is not enough to cancel someone's login: a callback with the
    right flow id and a wrong secret is refused like an unknown state, without the developer's redirect, and
    changes nothing; the user's own callback still connects."""
    started = start(api, reference_id="ref-9")
    back = browse(started["auth_url"]).headers["Location"]
    state = query_of(back)["state"]
    for forged_secret in ("forged", "", state.split(".")[1][:-1] + "x"):
        forged = browse(back.replace(state, f"{state.split('.')[0]}.{forged_secret}"))
        assert forged.status_code == 400 and "start the connection again" in forged.text
        assert "Location" not in forged.headers and "ref-9" not in forged.text
    assert api.plane.connection(started["user_id"]).state == "pending"
    assert api.events.of_type("auth_cancelled") == []
    done = browse(back)
    assert done.headers["Location"].startswith(OK_URL) and api.plane.connection(started["user_id"]).state == ACTIVE


def test_deauthenticate_user(api):
    started = start(api, "FAKEPKCE")
    callback = browse(started["auth_url"]).headers["Location"]
    assert browse(callback).status_code == 302
    user_id = started["user_id"]
    refresh_token = api.plane.tokens(user_id).refresh_token

    outsider = api.plane.create_developer()
    headers = {"dev-id": outsider, "x-api-key": api.plane.create_api_key(outsider)}
    url = f"{api.url}/v2/auth/deauthenticateUser"
    assert requests.delete(url, params={"user_id": user_id}, headers=headers, timeout=5).status_code == 404
    assert requests.get(f"{api.url}/v2/userInfo", params={"user_id": user_id}, headers=headers,
                        timeout=5).status_code == 404

    response = api.http.delete(url, params={"user_id": user_id})
    assert response.status_code == 200 and response.json()["status"] == "success"
    assert api.fake.calls["revoke"] >= 1 and refresh_token in api.fake.revoked_tokens
    assert api.plane.tokens(user_id) is None and api.plane.connection(user_id).state == DEAUTH
    info = api.http.get(f"{api.url}/v2/userInfo", params={"user_id": user_id}).json()
    assert info["is_authenticated"] is False and info["user"]["active"] is False
    [event] = api.events.of_type("deauth")
    assert event["user"]["user_id"] == user_id and event["status"] == "success"


def test_validation_errors_are_useful(api):
    bad = api.http.post(f"{api.url}/v2/auth/authenticateUser", params={"resource": "FAKEBODY"},
                        json={"auth_success_redirect_url": "javascript:alert(1)"})
    assert bad.status_code == 422 and "auth_success_redirect_url" in bad.json()["message"]
    unknown = api.http.post(f"{api.url}/v2/auth/authenticateUser", params={"resource": "NOPE"}, json={})
    assert unknown.status_code == 400 and "OURA" in unknown.json()["message"]
    not_enabled = api.http.post(f"{api.url}/v2/auth/authenticateUser", params={"resource": "WHOOP"}, json={})
    assert not_enabled.status_code == 400 and "HEALTHFLOW_WHOOP_CLIENT_ID" in not_enabled.json()["message"]
    missing = api.http.post(f"{api.url}/v2/auth/authenticateUser", json={})
    assert missing.status_code == 422 and "resource" in missing.json()["message"]
    assert api.http.get(f"{api.url}/v2/userInfo").status_code == 400
    assert api.http.get(f"{api.url}/v2/userInfo", params={"user_id": "nobody"}).status_code == 404
    assert browse(f"{api.url}/widget/session/nope").status_code == 404
    spec = requests.get(f"{api.url}/v2/openapi.json", timeout=5).json()
    assert {"/v2/auth/generateWidgetSession", "/v2/auth/authenticateUser", "/v2/userInfo",
            "/v2/auth/deauthenticateUser", "/v2/integrations", "/v2/auth/callback/{provider}"} <= set(spec["paths"])
    assert {s["name"] for s in spec["components"]["securitySchemes"].values()} == {"dev-id", "x-api-key"}
    assert urlsplit(api.url).hostname == "127.0.0.1"


def test_a_revoked_key_is_refused_at_once_by_every_instance(api, store_url, table_prefix, fake_provider):
    """Two control planes on one database (as two `healthflow serve` processes): revoking a key in one makes the
    other refuse it at its next request, although it had just verified (and remembered) that key."""
    manifests = {**{slug: p.manifest for slug, p in registry().items()}, **fake_manifests()}
    with BackgroundServer() as server:
        other = ControlPlane(store_url, Fernet.generate_key().decode(), public_url=server.url,
                             manifests=manifests, settings=fake_settings(fake_provider), environ={},
                             table_prefix=table_prefix).open()
        try:
            server.start(create_app(other))
            url = f"{server.url}/v2/integrations"
            assert [api.http.get(url).status_code for _ in range(3)] == [200, 200, 200]
            [key] = api.plane.api_keys(api.dev_id)
            api.plane.revoke_api_key(key["key_id"])  # in the first instance
            refused = api.http.get(url)
            assert refused.status_code == 403 and "revoked keys are refused" in refused.json()["message"]
            assert api.http.get(f"{api.url}/v2/integrations").status_code == 403
        finally:
            other.close()
