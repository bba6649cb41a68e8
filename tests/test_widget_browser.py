"""The connect widget in a real headless browser (Chromium driven by Playwright).

A developer's backend creates a widget session over HTTP; Chromium opens the widget, types into
its search box (the script runs under the page's nonce CSP), clicks a provider, follows the real
redirects through the fake OAuth provider and our callback, and lands on the developer's success
page on loopback with the new user's id. Chromium is Debian's (``.ci/ensure-browser`` installs it);
``HEALTHFLOW_CHROMIUM`` points at another binary.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet

from connectors import registry
from controlplane.api import BackgroundServer, create_app
from controlplane.auth import ControlPlane, MemoryCollector
from controlplane.auth.control_plane import ACTIVE
from pipelines.embedded import LoopbackHTTPServer

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider")
from servers.fake_provider import fake_manifests, fake_settings, query_of  # noqa: E402

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def chromium_path() -> str:
    path = os.environ.get("HEALTHFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail(f"no Chromium at {path}: run .ci/ensure-browser (Debian package chromium) or set "
                    "HEALTHFLOW_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A Chromium browser context (10 s default timeouts)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        context = chromium.new_context()
        context.set_default_timeout(10_000)
        yield context
        chromium.close()


@pytest.fixture
def landing() -> Iterator[SimpleNamespace]:
    """The developer's app on loopback: records where the widget sent the browser back to."""
    visits: list[str] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with lock:
                visits.append(self.path)
            body = b"<!doctype html><title>Back in the app</title><h1>Back in the app</h1>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = LoopbackHTTPServer(Handler, name="developer-app").start()
    try:
        yield SimpleNamespace(url=server.base_url, visits=visits)
    finally:
        server.stop()


@pytest.fixture
def api(tmp_path, fake_provider) -> Iterator[SimpleNamespace]:
    server = BackgroundServer()
    manifests = {**{slug: p.manifest for slug, p in registry().items()}, **fake_manifests()}
    plane = ControlPlane(f"sqlite:///{tmp_path}/control.db", Fernet.generate_key().decode(), public_url=server.url,
                         emit=MemoryCollector(), manifests=manifests, settings=fake_settings(fake_provider),
                         environ={}).open()
    dev_id = plane.create_developer(name="acme")
    http = requests.Session()
    http.headers.update({"dev-id": dev_id, "x-api-key": plane.create_api_key(dev_id)})
    server.start(create_app(plane))
    try:
        yield SimpleNamespace(url=server.url, plane=plane, events=plane.emit, fake=fake_provider, http=http,
                              dev_id=dev_id)
    finally:
        server.stop()
        http.close()
        plane.close()


def widget_session(api, landing, language: str = "en", providers: str = "FAKEPKCE,FAKEBODY") -> dict:
    response = api.http.post(f"{api.url}/v2/auth/generateWidgetSession", json={
        "providers": providers, "reference_id": "athlete-42", "language": language,
        "auth_success_redirect_url": f"{landing.url}/connected", "auth_failure_redirect_url": f"{landing.url}/failed"})
    assert response.status_code == 200, response.text
    return response.json()


def test_widget_search_click_connect_in_chromium(api, landing, browser, tmp_path):
    session = widget_session(api, landing)
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(session["url"])
    assert page.title() == "Connect a device"
    links = page.get_by_role("link")
    assert links.all_inner_texts() == ["Connect Fake PKCE", "Connect Fake BODY"]

    search = page.get_by_role("searchbox", name="Search services")  # shown by the script: the CSP nonce works
    search.fill("body")
    assert page.get_by_role("link").all_inner_texts() == ["Connect Fake BODY"]
    search.fill("garmin")
    assert page.get_by_role("link").count() == 0 and page.get_by_text("No service matches").is_visible()
    search.fill("")
    assert page.get_by_role("link").count() == 2
    page.screenshot(path=str(tmp_path / "widget.png"))

    page.get_by_role("link", name="Connect Fake PKCE").click()  # → fake provider → our callback → the app
    page.wait_for_url(f"{landing.url}/connected?**")
    assert page.get_by_role("heading").inner_text() == "Back in the app"
    back = query_of(page.url)
    assert back["resource"] == "FAKEPKCE" and back["reference_id"] == "athlete-42"
    connection = api.plane.connection(back["user_id"])
    assert connection.state == ACTIVE and connection.provider == "fakepkce" and connection.reference_id == "athlete-42"
    assert api.fake.authorize_requests[-1]["code_challenge_method"] == "S256"
    [event] = api.events.of_type("auth")
    assert event["user"]["user_id"] == back["user_id"] and event["widget_session_id"] == session["session_id"]
    assert errors == []  # no CSP violation or script error in the console
    page.close()


def test_widget_denied_in_chromium_lands_on_failure_page(api, landing, browser):
    session = widget_session(api, landing, providers="FAKEBODY")
    api.fake.deny = True
    page = browser.new_page()
    page.goto(session["url"])
    page.get_by_role("link", name="Connect Fake BODY").click()
    page.wait_for_url(f"{landing.url}/failed?**")
    failed = query_of(page.url)
    assert failed["reason"] == "access_denied" and failed["resource"] == "FAKEBODY"
    assert api.plane.connections(api.dev_id, "athlete-42") == []  # the pending connection is gone
    [event] = api.events.events
    assert event["type"] == "auth_cancelled" and event["reason"] == "access_denied" and event["status"] == "error"
    page.close()


def test_widget_language_and_expired_session_in_chromium(api, landing, browser):
    session = widget_session(api, landing, language="de-AT")
    page = browser.new_page()
    page.goto(session["url"])
    assert page.locator("html").get_attribute("lang") == "de-AT"
    assert page.get_by_role("heading").inner_text() == "Gerät verbinden"
    assert page.get_by_role("link").all_inner_texts() == ["Fake PKCE verbinden", "Fake BODY verbinden"]
    response = page.goto(f"{api.url}/widget/session/no-such-session")
    assert response is not None and response.status == 404
    assert page.get_by_role("heading").inner_text() == "Session expired"
    page.close()
