"""Logs that help and leak nothing, as a user sees them from the real ``healthflow`` command (a subprocess):
warnings are visible by default, levels and JSON lines are honoured, and secrets in URLs are redacted from the
API server's access and application logs."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from core.logs import configure_logging, redact
from pipelines.embedded import free_port

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider")
from servers.fake_provider import connect_provider  # noqa: E402

EXE = shutil.which("healthflow") or str(Path(sys.executable).with_name("healthflow"))


def healthflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env})


class Server:
    """`healthflow serve` in a subprocess; ``stop()`` returns everything it logged (stdout + stderr)."""

    def __init__(self, state: str, env: dict[str, str], *args: str) -> None:
        self.base = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen([EXE, "serve", "--port", self.base.rsplit(":", 1)[1], "--state", state, *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "NO_PROXY": "127.0.0.1", "HEALTHFLOW_LOG_LEVEL": "",
                                             "HEALTHFLOW_LOG_FORMAT": "", **env})
        self.http = requests.Session()
        self.http.trust_env = False
        deadline = time.monotonic() + 30
        while True:
            try:
                self.http.get(f"{self.base}/healthz", timeout=1)
                return
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start: {self.stop()}") from None
                time.sleep(0.1)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=30)
        return out + err


@pytest.fixture
def failing_revocation(tmp_path, fake_provider):
    """A Fitbit connection in a state store, a developer key, and the environment of a `healthflow serve` whose
    Fitbit revocation endpoint is down: deauthenticating the user cannot revoke the grant at Fitbit."""
    key = Fernet.generate_key().decode()
    state = f"sqlite:///{tmp_path}/state.db"
    plane, start = connect_provider(state, fake_provider, "fitbit", "fitbit-acct-logs", secret_key=key, dev_id="lab")
    plane.create_developer(dev_id="lab", name="lab")
    api_key = plane.create_api_key("lab")
    plane.close()
    env = {"HEALTHFLOW_SECRET_KEY": key, "HEALTHFLOW_FITBIT_CLIENT_ID": "fitbit-client",
           "HEALTHFLOW_FITBIT_CLIENT_SECRET": "secret", "HEALTHFLOW_FITBIT_OAUTH_BASE": "http://127.0.0.1:1"}
    return state, env, {"dev-id": "lab", "x-api-key": api_key}, start.user_id


def deauthenticate(server: Server, headers: dict[str, str], user_id: str) -> None:
    reply = server.http.delete(f"{server.base}/v2/auth/deauthenticateUser", params={"user_id": user_id},
                               headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text


def test_a_failed_revocation_and_the_lifecycle_event_are_logged_by_default(failing_revocation):
    state, env, headers, user_id = failing_revocation
    server = Server(state, env)
    try:
        deauthenticate(server, headers, user_id)
    finally:
        logged = server.stop()
    warnings = [line for line in logged.splitlines() if " WARNING " in line and user_id in line]
    assert warnings and "could not revoke" in warnings[0] and "fitbit" in warnings[0], logged
    events = [line for line in logged.splitlines() if "healthflow.auth.events" in line and user_id in line]
    assert events and '"type":"deauth"' in events[0], logged
    assert "api-key" not in logged and headers["x-api-key"] not in logged


def test_log_level_and_json_lines_are_honoured(failing_revocation):
    state, env, headers, user_id = failing_revocation
    server = Server(state, env, "--log-level", "error", "--log-format", "json")
    try:
        deauthenticate(server, headers, user_id)
    finally:
        logged = server.stop()
    lines = [json.loads(line) for line in logged.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines), logged
    assert not [line for line in lines if line["level"] in ("INFO", "WARNING")], logged
    bad = healthflow("providers", env={"HEALTHFLOW_LOG_LEVEL": "loud"})
    assert bad.returncode == 2 and "DEBUG" in bad.stderr, bad.stderr


def test_a_pipeline_run_shows_no_beam_chatter(tmp_path):
    raw = tmp_path / "raw.jsonl"
    payload = (Path(__file__).parent / "fixtures" / "garmin" / "dailies.through_the_day.json").read_text()
    raw.write_text(json.dumps({"provider": "garmin", "received_at": 1_700_000_000_000,
                               "payload": json.loads(payload)}) + "\n")
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(f"destinations:\n  - {{name: db, type: sqlite, url: 'sqlite:///{tmp_path}/out.db'}}\n")
    done = healthflow("run", "normalize", "--input", str(raw), "--destinations", str(destinations),
                      "--state", f"sqlite:///{tmp_path}/state.db", "--dead-letters", str(tmp_path / "dl"), env={})
    assert done.returncode == 0, done.stderr
    assert "apache_beam" not in done.stderr and "WARNING" not in done.stderr, done.stderr


SECRETS = {"token": "tok-4f1c9e-webhook-url-secret", "code": "code-77a1-oauth-secret",
           "state": "state-93be-oauth-secret", "session": "wsess-5d0c-widget-secret",
           "key": "hfk_abc.apikey-secret-b1"}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_api_server_logs_requests_without_their_secrets(tmp_path, log_format):
    server = Server(f"sqlite:///{tmp_path}/state.db", {"HEALTHFLOW_SECRET_KEY": Fernet.generate_key().decode()},
                    "--log-format", log_format)
    try:
        base, http = server.base, server.http
        http.get(f"{base}/v2/auth/callback/oura?code={SECRETS['code']}&state={SECRETS['state']}", timeout=10)
        http.get(f"{base}/widget/session/{SECRETS['session']}", timeout=10)
        http.get(f"{base}/widget/session/{SECRETS['session']}/connect/oura", timeout=10)
        http.post(f"{base}/v2/providers/garmin/webhook?token={SECRETS['token']}", json={"dailies": []}, timeout=10)
        http.get(f"{base}/v2/userInfo?user_id=u1", headers={"dev-id": "d1", "x-api-key": SECRETS["key"]}, timeout=10)
    finally:
        logged = server.stop()
    assert "/widget/session/***" in logged and "code=***&state=***" in logged and "token=***" in logged, logged
    for name, secret in SECRETS.items():
        assert secret not in logged, f"the {name} is in the server's log"
    if log_format == "json":
        access = [json.loads(line) for line in logged.splitlines() if '"uvicorn.access"' in line]
        assert len(access) >= 5 and all(line["level"] == "INFO" for line in access)


def test_redaction_rules():
    assert redact("GET /x?a=1&token=s3cr3t&b=2") == "GET /x?a=1&token=***&b=2"
    assert redact("postgresql://app:pw@db/hf") == "postgresql://app:***@db/hf"
    assert redact("headers {'x-api-key': 'hfk_1.abc', 'dev-id': 'd'}") == "headers {'x-api-key': '***', 'dev-id': 'd'}"
    assert redact("Authorization: Bearer eyJabc") == "Authorization: ***"
    assert redact("1 validation error\n  Input should be a valid integer [type=int_parsing, input_value='72 bpm', "
                  "input_type=str]") == ("1 validation error\n  Input should be a valid integer [type=int_parsing, "
                                         "input_value=***, input_type=str]")
    assert redact("GET /widget/session/abc/connect/oura") == "GET /widget/session/***/connect/oura"


def test_redaction_rules_for_json_fields_form_bodies_and_userinfo():
    assert redact('{"access_token": "at-1\\"x", "expires_in": 3600, "refresh_token":"rt-2"}') == \
        '{"access_token": "***", "expires_in": 3600, "refresh_token":"***"}'
    assert redact("{'client_secret': 'cs-3', 'password': 'pw-4', 'user': 'u'}") == \
        "{'client_secret': '***', 'password': '***', 'user': 'u'}"
    assert redact("code=c0de&state=st4te&grant_type=authorization_code") == \
        "code=***&state=***&grant_type=authorization_code"
    assert redact("token request body b'code=c0de&redirect_uri=x'") == "token request body b'code=***&redirect_uri=x'"
    assert redact('{"code": "invalid_grant", "state": "failed"}') == '{"code": "invalid_grant", "state": "failed"}'
    assert redact("job state=RUNNING") == "job state=RUNNING"  # only a line's or a quoted string's first field
    assert redact("GET https://api.example:8443/v1?email=a@b.example") == \
        "GET https://api.example:8443/v1?email=a@b.example"  # a port and path are not a password


def _logged_through_the_filter(log: Callable[[logging.Logger], None]) -> str:
    """What healthflow's handler writes for the records ``log`` emits (its own filters, a real stream)."""
    stream = io.StringIO()
    handler = configure_logging("DEBUG", "text")
    logging.getLogger().removeHandler(handler)  # on a logger of its own: pytest's capture handlers stay out of it
    handler.setStream(stream)
    logger = logging.getLogger("healthflow.test.redacting")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(handler)
    try:
        log(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_the_redacting_filter_never_raises_into_the_caller():
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    def log(logger: logging.Logger) -> None:
        logger.info("count %d for /x?token=%s", "x", "s3cr3t-token")  # a bad format: TypeError in getMessage
        logger.info("value %s", Unprintable())
        logger.info("still logging after them")

    written = _logged_through_the_filter(log)
    assert "count %d for /x?token=*** [log arguments dropped: TypeError" in written, written
    assert "value %s [log arguments dropped: RuntimeError: no]" in written
    assert "still logging after them" in written and "s3cr3t-token" not in written
    assert "--- Logging error ---" not in written


def test_stack_info_and_exceptions_are_redacted():
    def log(logger: logging.Logger) -> None:
        token = "?token=st4ck-secret"  # noqa: F841 - shown in the stack's source line below
        logger.warning("with stack ?token=m3ssage-secret", stack_info=True)
        try:
            raise ValueError('{"refresh_token": "exc-secret"}')
        except ValueError:
            logger.exception("failed")

    written = _logged_through_the_filter(log)
    assert "Stack (most recent call last)" in written and "token=***" in written and '"refresh_token": "***"' in written
    for secret in ("st4ck-secret", "m3ssage-secret", "exc-secret"):
        assert secret not in written, written
