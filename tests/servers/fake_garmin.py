"""A fake Garmin Connect Developer Program on loopback (real HTTP both ways), for the Garmin cycle tests.

    with FakeGarmin(webhook_url=f"{api}/v2/providers/garmin/webhook?token={HEALTHFLOW_GARMIN_WEBHOOK_TOKEN}") as garmin:
        plane = garmin.control_plane(state_url, public_url=api, emit=events)   # the real garmin manifest, pointed here
        garmin.sync(account, "dailies", [daily, ...])       # stored, and pushed to the webhook like Garmin does

OAuth 2 (``oauth``, a ``FakeProvider``): authorize + PKCE token endpoint at Garmin's paths; like Garmin, the
token answer names no user (the account comes from ``GET /user/id``). Wellness API under ``api_base``
(``/wellness-api/rest``), every call with ``Authorization: Bearer <token>`` of a live grant, else 401:

- ``GET /user/id`` → ``{"userId": …}``; ``GET /user/permissions`` → the account's permission list.
- ``GET /backfill/<type>?summaryStartTimeInSeconds=&summaryEndTimeInSeconds=`` → 202 with an empty body, then
  the stored summaries of that account and type starting in ``[start, end)`` are POSTed to the webhook as one
  push body (nothing when there are none). The same range again → 409; more than ``BACKFILL_MAX_DAYS`` (30
  for activity types, else 90) → 400; a missing, non-numeric or millisecond bound → 400 (``errorMessage``).
- ``DELETE /user/registration`` → 204: every grant of the account ends (its tokens get 401 from then on) and a
  final ``{"deregistrations": [{"userId": …}]}`` is pushed, as Garmin does.

Ping mode (``ping_types``: the summary types Garmin is configured to deliver by Ping, or ``ping`` directly):
``sync`` then stores the summaries and POSTs ``{"<type>": [{"userId", "callbackURL"}]}`` instead of the data; the
callback URL points here, ``GET /<type>?uploadStartTimeInSeconds=&uploadEndTimeInSeconds=&token=<pull token>``,
and answers that upload's summaries as a JSON array, with the Bearer token of a live grant of the same account (else
401, or 403 for another account), 400 when the upload window does not match the pull token, 410 once the callback
expired (``expire_callbacks()``; Garmin keeps them ``callback_ttl_s`` = 24 h). Activity files (``ping_file``) are
served once (FIT bytes): a second download → 410. ``callbacks()`` lists the callback requests.

Pushes after a request go out in order from one worker thread, shortly after the answer (``drain()`` waits
for them); ``sync``, ``push``, ``disconnect_in_connect`` and ``change_permissions`` push synchronously and
return the webhook's status. ``calls`` logs every API request, ``pushes`` every push with its status.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from pipelines.embedded import LoopbackService, dispatching_handler
from servers.fake_provider import FakeProvider, query_of

API_PREFIX = "/wellness-api/rest"
ACTIVITY_TYPES = frozenset({"activities", "activityDetails", "moveiq", "manuallyUpdatedActivities"})
BACKFILL_MAX_DAYS = dict.fromkeys(ACTIVITY_TYPES, 30)  # others: 90
PERMISSIONS = ("ACTIVITY_EXPORT", "HEALTH_EXPORT", "MCT_EXPORT", "WORKOUT_IMPORT", "COURSE_IMPORT")
CLIENT_ID, CLIENT_SECRET = "garmin-client", "garmin-secret"


@dataclass
class GarminOAuthServer(FakeProvider):
    """``FakeProvider`` as Garmin's OAuth 2 server: Garmin's paths, and no user id in the token answer."""

    include_user_id: bool = False
    authorize_path: str = "/oauth2Confirm"
    token_path: str = "/di-oauth2-service/oauth/token"

    def account_of(self, access_token: str) -> str | None:
        """The account of a live access token (issued, unexpired, grant not ended), else None."""
        if not self.is_live(access_token):
            return None
        with self._lock:
            return self._grants[self._access[access_token][0]].account


@dataclass(frozen=True)
class Call:
    method: str
    path: str  # below API_PREFIX
    params: dict[str, str]
    status: int
    token: str | None
    account: str | None


@dataclass(frozen=True)
class Push:
    body: dict[str, Any]
    status: int | None  # None: the webhook was unreachable


@dataclass
class Callback:
    """One ping's pull: what the callback URL serves, until it expires (or, for a file, once)."""

    account: str
    summary_type: str
    start: int  # the upload window named in the URL
    end: int
    data: list[dict[str, Any]] | bytes  # summaries (JSON array), or a file's bytes
    expires_at: float
    single: bool = False  # activity files: one download only
    downloads: int = 0


@dataclass
class FakeGarmin(LoopbackService):
    webhook_url: str | None = None
    push_delay_s: float = 0.05
    permissions: dict[str, list[str]] = field(default_factory=dict)  # account → granted (default: all)
    ping_types: frozenset[str] = frozenset()  # summary types delivered by Ping (a callback URL), not Push
    callback_ttl_s: float = 86400.0

    def __post_init__(self) -> None:
        self.oauth = GarminOAuthServer()
        self.callback_tokens: dict[str, Callback] = {}  # pull token → its callback
        self._upload_clock = int(time.time())  # upload windows: one second per ping, never overlapping
        self.summaries: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (account, type) → summaries
        self.calls: list[Call] = []
        self.pushes: list[Push] = []
        self._requested: set[tuple[str, str, int, int]] = set()
        self._lock = threading.Lock()
        self._outbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    service_name = "fake-garmin-api"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return dispatching_handler(self._handle, ("GET", "DELETE"), protocol="HTTP/1.0")

    def start(self) -> FakeGarmin:
        self.oauth.start()
        self.oauth.register(CLIENT_ID, CLIENT_SECRET, "body", require_pkce=True)
        super().start()
        self._worker = threading.Thread(target=self._deliver, name="fake-garmin-push", daemon=True)
        self._worker.start()
        return self

    def stop(self) -> None:
        if self._worker is not None:
            self._outbox.put({})  # stop marker
            self._worker.join(timeout=10)
            self._worker = None
        super().stop()
        self.oauth.stop()

    @property
    def api_base(self) -> str:
        return self.base_url + API_PREFIX

    @property
    def manifest(self) -> Any:
        """Garmin's real manifest with its API base URL pointing here (for the Poller's backfill requests)."""
        from connectors import registry

        manifest = registry()["garmin"].manifest
        return manifest.model_copy(update={"api": manifest.api.model_copy(update={"base_url": self.api_base})})

    def control_plane(self, store_url: str, *, public_url: str, emit: Any, table_prefix: str = "healthflow_cp_") -> Any:
        """A ControlPlane with Garmin's real manifest and OAuth client code, its OAuth and API URLs pointing here."""
        from cryptography.fernet import Fernet

        from connectors import registry
        from connectors.oauth import ProviderSettings
        from controlplane.auth import ControlPlane

        manifest = registry()["garmin"].manifest
        auth = manifest.auth.model_copy(update={"authorize_url": f"https://connect.garmin.com{self.oauth.authorize_path}",
                                                "token_url": f"https://diauth.garmin.com{self.oauth.token_path}"})
        return ControlPlane(store_url, Fernet.generate_key().decode(), public_url=public_url, environ={}, emit=emit,
                            manifests={"garmin": manifest.model_copy(update={"auth": auth})},
                            settings={"garmin": ProviderSettings(CLIENT_ID, CLIENT_SECRET,
                                                                 oauth_base=self.oauth.base_url,
                                                                 api_base=self.api_base)},
                            table_prefix=table_prefix).open()

    # ------------------------------------------------------------------------------------------------ controls
    def store(self, account: str, summary_type: str, summaries: list[dict[str, Any]]) -> None:
        """Summaries Garmin holds for the account (e.g. from before it connected): only a backfill pushes them."""
        with self._lock:
            self.summaries.setdefault((account, summary_type), []).extend(summaries)

    def sync(self, account: str, summary_type: str, summaries: list[dict[str, Any]]) -> int | None:
        """The user's device synced: keep the summaries (for backfills) and push them now (or, for a type in
        ``ping_types``, ping their callback URL)."""
        if summary_type in self.ping_types:
            return self.ping(account, summary_type, summaries)
        self.store(account, summary_type, summaries)
        return self.push({summary_type: summaries})

    def ping(self, account: str, summary_type: str, summaries: list[dict[str, Any]]) -> int | None:
        """Ping mode: keep the summaries, POST ``{type: [{userId, callbackURL}]}``; the webhook's status."""
        self.store(account, summary_type, summaries)
        return self.push({summary_type: [self.ping_entry(account, summary_type, summaries)]})

    def ping_entry(self, account: str, summary_type: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
        """A new upload of ``summaries`` and the ping entry naming its callback URL (not sent: build bodies with it)."""
        return {"userId": account, "callbackURL": self._callback(account, summary_type, list(summaries))}

    def ping_file(self, account: str, activity_id: int, data: bytes) -> dict[str, Any]:
        """An ``activityFiles`` ping entry: the callback serves ``data`` (a FIT file) once."""
        url = self._callback(account, "activityFiles", data, single=True, path=f"/activityFile?id={activity_id}&")
        return {"userId": account, "summaryId": str(activity_id), "activityId": activity_id, "fileType": "FIT",
                "callbackURL": url}

    def _callback(self, account: str, summary_type: str, data: list[dict[str, Any]] | bytes, single: bool = False,
                  path: str | None = None) -> str:
        token = f"pull-{time.time_ns():x}-{len(self.callback_tokens)}"
        with self._lock:
            start = self._upload_clock
            self._upload_clock += 1
            self.callback_tokens[token] = Callback(account, summary_type, start, start + 1, data,
                                                   time.time() + self.callback_ttl_s, single)
        if path is None:
            return (f"{self.api_base}/{summary_type}?uploadStartTimeInSeconds={start}"
                    f"&uploadEndTimeInSeconds={start + 1}&token={token}")
        return f"{self.api_base}{path}token={token}"

    def expire_callbacks(self) -> None:
        """Every callback URL handed out so far has expired (Garmin keeps them 24 h): 410 from now on."""
        with self._lock:
            for callback in self.callback_tokens.values():
                callback.expires_at = 0.0

    def callbacks(self, summary_type: str | None = None) -> list[Call]:
        """The requests of callback URLs (by pull token), in order."""
        with self._lock:
            return [c for c in self.calls if "token" in c.params and c.method == "GET"
                    and (summary_type is None
                         or c.path == ("/activityFile" if summary_type == "activityFiles" else f"/{summary_type}"))]

    def push(self, body: dict[str, Any]) -> int | None:
        """POST one push body to the webhook now; the webhook's HTTP status (None: unreachable or no webhook_url)."""
        status: int | None = None
        if self.webhook_url:
            try:
                status = requests.post(self.webhook_url, json=body, timeout=30).status_code
            except requests.RequestException:
                status = None
        with self._lock:
            self.pushes.append(Push(body, status))
        return status

    def disconnect_in_connect(self, account: str) -> int | None:
        """The user removed the app in Garmin Connect: the grants end and a deregistration is pushed."""
        self.oauth.revoke_account(account)
        return self.push({"deregistrations": [{"userId": account}]})

    def change_permissions(self, account: str, permissions: list[str]) -> int | None:
        """The user changed what they share (their token stays valid): a permissions change is pushed."""
        with self._lock:
            self.permissions[account] = list(permissions)
        return self.push({"userPermissionsChange": [{"userId": account, "summaryId": f"perm-{time.time_ns()}",
                                                     "permissions": list(permissions),
                                                     "changeTimeInSeconds": int(time.time())}]})

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every push queued by a request (backfill data, deregistration) was delivered."""
        deadline = time.monotonic() + timeout_s
        while self._outbox.unfinished_tasks:
            assert time.monotonic() < deadline, "fake Garmin pushes still pending"
            time.sleep(0.02)

    def backfills(self, summary_type: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.path.startswith("/backfill/")
                    and (summary_type is None or c.path == f"/backfill/{summary_type}")]

    # ------------------------------------------------------------------------------------------------ HTTP
    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(request.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        auth = request.headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else None
        path = parts.path.removeprefix(API_PREFIX) if parts.path.startswith(API_PREFIX + "/") else None
        account = self.oauth.account_of(token) if token else None
        if path is None:
            status, reply, after = 404, {"errorMessage": f"no such path {parts.path}"}, None
        elif account is None:
            status, reply, after = 401, {"errorMessage": "Unauthorized"}, None
        else:
            status, reply, after = self._answer(method, path, params, account)
        with self._lock:
            self.calls.append(Call(method, path or parts.path, params, status, token, account))
        if after:  # queued before answering: once a call is logged, drain() waits for its push
            self._outbox.put(after)
        binary = isinstance(reply, bytes)
        data = reply if binary else b"" if reply is None else json.dumps(reply).encode()
        request.send_response(status)
        if data:
            request.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _answer(self, method: str, path: str, params: dict[str, str],
                account: str) -> tuple[int, Any, dict[str, Any] | None]:
        """(status, JSON reply or None for no body, push body to send afterwards or None)."""
        if (method, path) == ("GET", "/user/id"):
            return 200, {"userId": account}, None
        if (method, path) == ("GET", "/user/permissions"):
            return 200, self.permissions.get(account, list(PERMISSIONS)), None
        if (method, path) == ("DELETE", "/user/registration"):
            self.oauth.revoke_account(account)
            return 204, None, {"deregistrations": [{"userId": account}]}
        if method == "GET" and path.startswith("/backfill/"):
            return self._backfill(path.removeprefix("/backfill/"), params, account)
        if method == "GET" and "token" in params:
            return self._pull(path, params, account)
        return 404, {"errorMessage": f"no such endpoint {method} {path}"}, None

    def _backfill(self, summary_type: str, params: dict[str, str],
                  account: str) -> tuple[int, Any, dict[str, Any] | None]:
        start_text = params.get("summaryStartTimeInSeconds", "")
        end_text = params.get("summaryEndTimeInSeconds", "")
        if not start_text.isdigit() or not end_text.isdigit():
            return 400, {"errorMessage": "summaryStartTimeInSeconds and summaryEndTimeInSeconds are required"}, None
        start, end = int(start_text), int(end_text)
        if max(start, end) > 10**11:
            return 400, {"errorMessage": "timestamp appears to be in milliseconds"}, None
        max_days = BACKFILL_MAX_DAYS.get(summary_type, 90)
        if end <= start or end - start > max_days * 86400:
            return 400, {"errorMessage": f"the time range must be positive and at most {max_days} days"}, None
        key = (account, summary_type, start, end)
        with self._lock:
            if key in self._requested:
                return 409, {"errorMessage": "Duplicate backfill request"}, None
            self._requested.add(key)
            found = [s for s in self.summaries.get((account, summary_type), [])
                     if start <= int(s["startTimeInSeconds"]) < end]
        return 202, None, ({summary_type: found} if found else None)

    def _pull(self, path: str, params: dict[str, str], account: str) -> tuple[int, Any, None]:
        """A ping's callback: the upload's summaries (or file), for the same account, until it expires."""
        with self._lock:
            callback = self.callback_tokens.get(params["token"])
            if callback is None:
                return 404, {"errorMessage": "unknown token"}, None
            if path != ("/activityFile" if callback.single else f"/{callback.summary_type}"):
                return 404, {"errorMessage": f"the token is not for {path}"}, None
            if callback.account != account:
                return 403, {"errorMessage": "the token is for another user"}, None
            if not callback.single and (params.get("uploadStartTimeInSeconds") != str(callback.start)
                                        or params.get("uploadEndTimeInSeconds") != str(callback.end)):
                return 400, {"errorMessage": "the upload window does not match the token"}, None
            if time.time() >= callback.expires_at or (callback.single and callback.downloads):
                return 410, {"errorMessage": "Gone"}, None
            callback.downloads += 1
            return 200, callback.data, None

    def _deliver(self) -> None:
        while True:
            body = self._outbox.get()
            try:
                if not body:
                    return
                time.sleep(self.push_delay_s)
                self.push(body)
            finally:
                self._outbox.task_done()


def authorize_in_browser(auth_url: str) -> str:
    """Play the user at Garmin: open the authorize URL (PKCE S256 required), return where Garmin sends them back."""
    response = requests.get(auth_url, allow_redirects=False, timeout=10)
    assert response.status_code == 302, response.text
    assert query_of(auth_url).get("code_challenge_method") == "S256"
    return response.headers["Location"]


# ----------------------------------------------------------------------------------------------------------------------
# Garmin summaries for tests: the fixtures moved to another account and day
# ----------------------------------------------------------------------------------------------------------------------
FIXTURES = Path(__file__).parent.parent / "fixtures" / "garmin"
TEMPLATE_DAY = date(2024, 3, 11)  # the local day of every fixture summary
TEMPLATES = {
    "dailies": json.loads((FIXTURES / "dailies.through_the_day.json").read_text())[2]["dailies"][0],
    "sleeps": json.loads((FIXTURES / "sleeps.final.json").read_text())["sleeps"][0],
    "activities": json.loads((FIXTURES / "activities.json").read_text())["activities"][0],
    "hrv": json.loads((FIXTURES / "hrv.json").read_text())["hrv"][0],
}


def summary(kind: str, account: str, day: date) -> dict[str, Any]:
    """The fixture summary of ``kind`` moved to ``account`` and ``day`` (every ``*TimeInSeconds`` shifted)."""
    shift = (day - TEMPLATE_DAY).days * 86400

    def moved(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: moved(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value + shift if key.endswith("TimeInSeconds") and isinstance(value, int) else value

    doc = moved(copy.deepcopy(TEMPLATES[kind]))
    doc.update(userId=account, summaryId=f"{account[:7]}-{doc['startTimeInSeconds']:x}")
    if "calendarDate" in doc:
        doc["calendarDate"] = day.isoformat()
    if "activityId" in doc:
        doc["activityId"] = doc["startTimeInSeconds"]
    return doc
