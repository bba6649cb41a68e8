"""Fake Polar (OAuth + AccessLink v3 on loopback, real HTTP) with Polar's rules, for the Polar cycle tests.

    with FakePolarAuth() as auth, FakePolarApi(auth=auth) as api:
        plane, start = connect_provider(state, auth, "polar", "45395466", api_base=api.base_url)
        api.add_user_data("45395466", "sleep", nights)

``FakePolarAuth`` (a ``FakeProvider``): Polar's paths (``/oauth2/authorization``, ``/v2/oauth2/token``), Basic
client auth as registered, and Polar's token answer: one long-lived access token (``expires_in`` ten years), **no
refresh token**, the user in ``x_user_id`` (an integer).

``FakePolarApi`` (a ``FakeProviderApi`` played from Polar's manifest), accepting exactly the live tokens
``FakePolarAuth`` issued:

- ``POST /v3/users`` (``{"member-id": …}``, JSON, ``Accept: application/json`` else 406): 200 with the user's base
  information, 409 when the user (or the member id) is already registered; ``refuse_registration(status)`` makes
  the next registrations answer ``status`` (403: consents not accepted, 500, …).
- ``DELETE /v3/users/{user-id}`` (the user's own token): 204 and the user is deregistered and their token revoked, as
  Polar does; 404 when not registered, 403 for another user's id.
- Data endpoints answer 403 for a live token of a user who is not registered. A registered user gets their own
  documents (``add_user_data``) in Polar's shapes: ``/v3/exercises`` a bare array, ``/v3/users/sleep``
  ``{"nights"}``, ``/v3/users/nightly-recharge`` ``{"recharges"}``, ``/v3/users/continuous-heart-rate?from=&to=``
  ``{"heart_rates"}`` (the days in the inclusive range), ``/v3/users/activities?from=&to=`` a bare array (the days in
  the range), ``/v3/users/physical-info`` the user's latest physical information.

``registration_requests`` / ``deregistration_requests`` record what reached the users endpoints; ``requests``
(``Logged``) every request.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from connectors.manifest import Endpoint, Manifest
from pipelines.embedded import dispatching_handler
from servers.fake_provider import FakeProvider
from servers.fake_provider_api import FakeProviderApi, Logged

USERS_PATH = "/v3/users"
SINGLE = "(one document)"  # an endpoint answering the user's one document (physical info), not a list
USER_PATH = re.compile(r"/v3/users/(\d+)")
TEN_YEARS_S = 315_359_999  # what Polar answers in expires_in


@dataclass
class FakePolarAuth(FakeProvider):
    expires_in: int = TEN_YEARS_S
    authorize_path: str = "/oauth2/authorization"
    token_path: str = "/v2/oauth2/token"

    def _issue(self, grant_id: str, refresh_token: str | None) -> dict[str, Any]:
        """Polar's token answer: no refresh token and no scope; the user is ``x_user_id``."""
        account = self._grants[grant_id].account
        access = secrets.token_urlsafe(24)
        self._access[access] = (grant_id, time.time() + self.expires_in)
        return {"access_token": access, "token_type": "bearer", "expires_in": self.expires_in,
                "x_user_id": int(account) if account.isdigit() else account}

    def account_of(self, access_token: str) -> str | None:
        """The Polar user whose live access token this is, else None."""
        if not self.is_live(access_token):
            return None
        with self._lock:
            return self._grants[self._access[access_token][0]].account


@dataclass
class FakePolarApi(FakeProviderApi):
    provider: str | Manifest = "polar"
    auth: FakePolarAuth | None = None
    registered: dict[str, str] = field(default_factory=dict)  # Polar user id -> member id
    user_data: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.auth is not None, "FakePolarApi(auth=FakePolarAuth())"
        self.token_validator = self.auth.is_live
        super().__post_init__()
        self.registration_requests: list[dict[str, Any]] = []
        self.deregistration_requests: list[str] = []
        self._refusals: list[int] = []
        self._current = threading.local()
        for kind, wrap in {"exercises": None, "sleep": "nights", "nightly-recharge": "recharges",
                           "continuous-heart-rate": "heart_rates", "activities": None,
                           "physical-info": SINGLE}.items():
            self.respond(kind, self._responder(kind, wrap))

    # ------------------------------------------------------------------------------------------------ controls
    def add_user_data(self, account: str, kind: str, docs: list[dict[str, Any]]) -> None:
        with self._lock:
            self.user_data.setdefault(account, {}).setdefault(kind, []).extend(docs)

    def refuse_registration(self, status: int, count: int = 1) -> None:
        with self._lock:
            self._refusals.extend([status] * count)

    def data_requests(self, token: str | None = None) -> list[Logged]:
        """Requests that reached a data endpoint (with ``token`` when given)."""
        with self._lock:
            return [r for r in self.requests if r.kind is not None and (token is None or r.token == token)]

    # ------------------------------------------------------------------------------------------------ HTTP
    def handler(self) -> type[BaseHTTPRequestHandler]:
        return dispatching_handler(self._dispatch, ("GET", "POST", "DELETE"))

    def _dispatch(self, request: BaseHTTPRequestHandler, method: str) -> None:
        """User registration and deregistration here, data endpoints as in ``FakeProviderApi``."""
        if method == "DELETE" or urlsplit(request.path).path == USERS_PATH:
            self._users(request, method)
        else:
            self._handle(request, method)

    def _answer(self, path: str, params: dict[str, str], token: str | None, kind: str | None,
                endpoint: Endpoint | None, match: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        assert self.auth is not None
        account = self.auth.account_of(token or "")
        with self._lock:
            unregistered = account is not None and account not in self.registered
        if unregistered:
            return 403, {}, {"error": "user is not registered to this partner"}
        self._current.account = account
        return super()._answer(path, params, token, kind, endpoint, match)

    def _responder(self, kind: str, wrap: str | None) -> Any:
        def respond(start: datetime | None, end: datetime | None, _params: dict[str, str]) -> Any:
            with self._lock:
                docs = list(self.user_data.get(self._current.account, {}).get(kind, []))
            if start is not None and end is not None:  # a date range: the days in it
                docs = [d for d in docs
                        if start.date() <= date.fromisoformat((d.get("date") or d["start_time"])[:10]) < end.date()]
            if wrap is SINGLE:
                return docs[-1] if docs else {}
            return docs if wrap is None else {wrap: docs}

        return respond

    def _users(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(request.path).path
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        auth = request.headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else None
        status, reply = self._user_call(method, path, raw, token, request.headers)
        data = b"" if reply is None else json.dumps(reply).encode()
        with self._lock:
            self.requests.append(Logged(time.time(), method, path, {}, status, token, None, data))
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _user_call(self, method: str, path: str, raw: bytes, token: str | None,
                   headers: Any) -> tuple[int, Any]:
        assert self.auth is not None
        account = self.auth.account_of(token or "")
        if account is None:
            return 401, {"error": "invalid_token"}
        if method == "POST":
            return self._register(account, raw, headers)
        found = USER_PATH.fullmatch(path)
        if found is None:
            return 404, {"error": f"no such resource {path}"}
        with self._lock:
            self.deregistration_requests.append(found.group(1))
            if found.group(1) != account:
                return 403, {"error": "the token belongs to another user"}
            if self.registered.pop(account, None) is None:
                return 404, {"error": "user not registered"}
        self.auth.revoke_account(account)  # "This will revoke the access token authorized by user."
        return 204, None

    def _register(self, account: str, raw: bytes, headers: Any) -> tuple[int, Any]:
        if "application/json" not in (headers.get("Accept") or ""):
            return 406, {"error": "Accept: application/json required"}
        if not (headers.get("Content-Type") or "").startswith("application/json"):
            return 415, {"error": "Content-Type: application/json required"}
        try:
            member = json.loads(raw)["member-id"]
        except (ValueError, KeyError, TypeError):
            return 400, {"error": "body must be {\"member-id\": ...}"}
        with self._lock:
            self.registration_requests.append({"account": account, "member-id": member,
                                               "accept": headers.get("Accept")})
            if self._refusals:
                return self._refusals.pop(0), {"error": "refused"}
            if account in self.registered or member in self.registered.values():
                return 409, {"error": "User already registered to partner or duplicated member-id"}
            self.registered[account] = member
        return 200, {"polar-user-id": int(account), "member-id": member,
                     "registration-date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                     "first-name": "Eka", "last-name": "Toka"}
