"""A fake Withings on loopback: its OAuth 2 token service and its data API, with Withings' real quirks.

``FakeWithings`` (a ``FakeProvider``): authorize at ``/oauth2_user/authorize2``; ``POST /v2/oauth2`` serves

- ``action=requesttoken`` (required; another or no action answers status 2554 "Not implemented"): the code exchange
  and refresh of ``FakeProvider`` (client id and secret in the form body, single-use codes, rotating refresh
  tokens, a reused one rejected and the grant ended), answered HTTP 200 ``{"status": 0, "body": {"userid": …,
  "access_token": …, "refresh_token": …, "expires_in": 10800, "scope": …, "token_type": "Bearer"}}``; errors are
  HTTP 200 too: status 503 "Invalid Params: invalid code" / "invalid refresh_token" (the wording users report), 503
  "Invalid Params: invalid client_id" for bad client credentials (assumed wording), 601 while ``throttle_tokens``.
- ``action=revoke`` (signed: ``client_id``, ``nonce``, ``signature``, ``userid``): ends every grant of the user.

``POST /v2/signature`` ``action=getnonce`` (signed over ``action,client_id,timestamp``) issues single-use nonces.
``revoked_users`` lists users revoked; ``signature_errors`` counts signed calls refused.

``FakeWithingsApi`` (a ``FakeProviderApi`` played from the Withings manifest): documents are held per kind and
served in Withings' envelope, filtered by the request's window and paged by ``offset``/``more``: ``getmeas``
(``measuregrps`` by ``date``, with ``timezone``), ``sleep_getsummary`` (``series`` by ``date``),
``sleep_get`` (segments overlapping ``startdate``-``enddate``; more than 24 h is refused), ``getactivity``
(``activities`` by ``date``), ``getworkouts`` (``series`` by ``startdate``). A token the OAuth server does not
accept gets HTTP 200 ``{"status": 401, "body": {}, "error": "… invalid_token …"}``, ``throttle()`` HTTP 200
``{"status": 601}``, invalid parameters status 503 and an unknown action 2554, as Withings answers (``fail()`` still
answers HTTP 5xx); ``body_statuses`` records the status of every answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from servers.fake_provider import FakeProvider
from servers.fake_provider_api import FakeProviderApi

INVALID_TOKEN = "XRequestID: Not provided invalid_token: The access token provided is invalid"


def _sign(secret: str, *values: str) -> str:
    return hmac.new(secret.encode(), ",".join(values).encode(), hashlib.sha256).hexdigest()


@dataclass
class FakeWithings(FakeProvider):
    expires_in: int = 10800
    authorize_path: str = "/oauth2_user/authorize2"
    token_path: str = "/v2/oauth2"
    signature_path: str = "/v2/signature"
    throttle_tokens: int = 0  # the next N requesttoken calls answer status 601

    def __post_init__(self) -> None:
        super().__post_init__()
        self.revoked_users: list[str] = []
        self.signature_errors = 0
        self._nonces: set[str] = set()

    # ------------------------------------------------------------------ HTTP
    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        if method == "POST" and urlsplit(request.path).path == self.signature_path:
            length = int(request.headers.get("Content-Length") or 0)
            form = {k: v[-1] for k, v in parse_qs(request.rfile.read(length).decode()).items()}
            payload = json.dumps(self._getnonce(form)).encode()
            request.send_response(200)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
            return
        super()._handle(request, method)

    def _token(self, query: dict[str, str], form: dict[str, str], headers: Any) -> tuple[int, dict, Any]:
        action = form.get("action")
        if action == "revoke":
            return 200, {}, self._revoke_user(form)
        if action != "requesttoken":
            self.token_requests.append(dict(form))
            return 200, {}, {"status": 2554, "body": {}, "error": "Not implemented"}
        if self.throttle_tokens > 0:
            self.throttle_tokens -= 1
            self.token_requests.append(dict(form))
            return 200, {}, {"status": 601, "body": {}, "error": "Too many requests"}
        status, _, answer = super()._token(query, form, headers)
        if status == 200:
            body = dict(answer)
            account = str(body.pop("user_id", ""))
            body["userid"] = int(account) if account.isdigit() else account
            return 200, {}, {"status": 0, "body": body}
        error = answer.get("error")
        if error == "invalid_client":
            text = "Invalid Params: invalid client_id"
        elif error == "invalid_grant":
            text = f"Invalid Params: invalid {'refresh_token' if form.get('grant_type') == 'refresh_token' else 'code'}"
        else:
            text = "Invalid Params: invalid grant_type"
        return 200, {}, {"status": 503, "body": {}, "error": text}

    # ------------------------------------------------------------------ signed calls
    def _signed(self, form: dict[str, str], third: str) -> str | None:
        """The client id of a correctly signed call (signature over ``action,client_id,<third>``), else None."""
        client = self.clients.get(form.get("client_id", ""))
        if client is None or not form.get(third):
            return None
        expected = _sign(client.client_secret, form.get("action", ""), client.client_id, form[third])
        if not secrets.compare_digest(expected, form.get("signature", "")):
            return None
        return client.client_id

    def _getnonce(self, form: dict[str, str]) -> dict[str, Any]:
        self.calls["getnonce"] += 1
        if form.get("action") != "getnonce":
            return {"status": 2554, "body": {}, "error": "Not implemented"}
        if self._signed(form, "timestamp") is None or abs(int(form["timestamp"]) - time.time()) > 600:
            self.signature_errors += 1
            return {"status": 503, "body": {}, "error": "Invalid Params: invalid signature"}
        nonce = secrets.token_hex(20)
        with self._lock:
            self._nonces.add(nonce)
        return {"status": 0, "body": {"nonce": nonce}}

    def _revoke_user(self, form: dict[str, str]) -> dict[str, Any]:
        self.calls["revoke"] += 1
        with self._lock:
            fresh = form.get("nonce", "") in self._nonces
            self._nonces.discard(form.get("nonce", ""))
        if not fresh or self._signed(form, "nonce") is None:
            self.signature_errors += 1
            return {"status": 503, "body": {}, "error": "Invalid Params: invalid signature or nonce"}
        userid = form.get("userid", "")
        self.revoke_account(userid)
        self.revoked_users.append(userid)
        return {"status": 0, "body": {}}


# ======================================================================================================================
# the data API
# ======================================================================================================================
def _unix(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


def _day(value: Any) -> datetime | None:
    return datetime.combine(date.fromisoformat(value), datetime.min.time(), tzinfo=UTC) if isinstance(value, str) \
        else None


# kind → (list field, the document's moment used for the window)
SERVED: dict[str, tuple[str, Callable[[dict[str, Any]], datetime | None]]] = {
    "getmeas": ("measuregrps", lambda doc: _unix(doc.get("date"))),
    "sleep_getsummary": ("series", lambda doc: _day(doc.get("date"))),
    "getactivity": ("activities", lambda doc: _day(doc.get("date"))),
    "getworkouts": ("series", lambda doc: _unix(doc.get("startdate"))),
}


@dataclass
class FakeWithingsApi(FakeProviderApi):
    provider: Any = "withings"
    timezone: str = "Europe/Berlin"  # getmeas' body.timezone
    body_statuses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        for kind in SERVED:
            self.respond(kind, self._serve(kind))
        self.respond("sleep_get", self._segments)

    def _answer(self, path: str, params: dict[str, str], token: str | None, kind: str | None, endpoint: Any,
                match: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        status, headers, reply = super()._answer(path, params, token, kind, endpoint, match)
        if status == 401:  # Withings: HTTP 200, the error in the body
            status, headers, reply = 200, {}, {"status": 401, "body": {}, "error": INVALID_TOKEN}
        elif status == 429:
            status, headers, reply = 200, {}, {"status": 601, "body": {}, "error": "Too many requests"}
        elif status == 400:  # e.g. a window over the endpoint's limit
            status, headers, reply = 200, {}, {"status": 503, "body": {}, "error": f"Invalid Params: {reply['error']}"}
        elif status == 404:
            status, headers, reply = 200, {}, {"status": 2554, "body": {}, "error": "Not implemented"}
        with self._lock:
            self.body_statuses.append(reply.get("status", -1) if isinstance(reply, dict) else -1)
        return status, headers, reply

    def _serve(self, kind: str) -> Callable[[datetime | None, datetime | None, dict[str, str]], Any]:
        list_key, moment = SERVED[kind]

        def serve(start: datetime | None, end: datetime | None, params: dict[str, str]) -> Any:
            with self._lock:
                docs = list(self.documents.get(kind, []))
            picked = sorted((at, n, doc) for n, doc in enumerate(docs) if (at := moment(doc)) is not None
                            and (start is None or at >= start) and (end is None or at < end))
            offset = int(params.get("offset") or 0)
            items = [doc for _, _, doc in picked[offset:offset + self.page_size]]
            after = offset + len(items)
            more = after < len(picked)
            body: dict[str, Any] = {list_key: items, "more": more, "offset": after if more else 0}
            if kind == "getmeas":
                body = {"updatetime": int(time.time()), "timezone": self.timezone, **body}
            return {"status": 0, "body": body}

        return serve

    def _segments(self, start: datetime | None, end: datetime | None, params: dict[str, str]) -> Any:
        """``/v2/sleep?action=get``: segments overlapping the window (not paged: Withings sends ``series`` only)."""
        assert start is not None and end is not None  # the manifest's window (≤ 1 day) is checked by FakeProviderApi
        with self._lock:
            segments = list(self.documents.get("sleep_get", []))
        first, last = start.timestamp(), end.timestamp()
        night = sorted((s for s in segments if s["startdate"] < last and s["enddate"] > first),
                       key=lambda s: s["startdate"])
        return {"status": 0, "body": {"series": night, "model": 32}}
