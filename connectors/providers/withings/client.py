"""Withings Public API client code the manifest cannot express: the token endpoint, revocation and the poll hook.

Every Withings answer is HTTP 200 with ``{"status": N, "body": {...}}`` (plus ``"error"`` text when N is not 0);
the status codes follow Withings' "Response status" table (api-reference, section Response-status):

- 0 success; 100-102, 200, 401 authentication failed (401: "invalid_token: The access token provided is invalid");
  201-213, 216-… and 503 invalid params (the token endpoint's "Invalid Params: invalid refresh_token" /
  "invalid code"); 214, 277, 2553-2555 unauthorized; 522 timeout; 601 too many requests; others "an error occurred".

Tokens (``WithingsOAuth``): ``POST https://wbsapi.withings.net/v2/oauth2`` with ``action=requesttoken`` (the
manifest's ``auth.token_params``) and the client id and secret in the form body, for the code exchange and every
refresh. The token fields sit under ``body`` (``userid``, ``access_token``, ``refresh_token`` — rotated on every
refresh —, ``expires_in`` 10800, ``scope``, ``token_type``); ``token_response`` unwraps them and turns a non-zero
status into the RFC 6749 error healthflow's taxonomy reads: an invalid code or refresh token → ``invalid_grant``
(→ ``InvalidGrant``: the connection is revoked), a rejected client → ``invalid_client`` (``FatalError``), 601 and
522 → ``RetryableError``, any other status → ``invalid_request`` (``PermanentError``).

Revocation (``disconnect``): Withings has no RFC 7009 endpoint; it documents ``action=revoke`` on the same
``/v2/oauth2`` ("OAuth 2.0 - Revoke user access": the tokens become invalid and the user's notification
subscriptions end), a signed call: ``nonce`` from ``/v2/signature`` ``action=getnonce`` (signed over
``action,client_id,timestamp``), then ``signature`` = HMAC-SHA256(client secret, ``action,client_id,nonce``) beside
``client_id``, ``nonce`` and ``userid``.

Polling (``WithingsHook``): ``status`` maps the body's status onto the HTTP status the poller understands (auth
failed → 401, refresh and retry; 601 → 429, pause and retry; 522 → 504, back off and retry; others → 400,
permanent). Pages without entries are not published. ``sleep_get`` pages get their sleep: the segments of
``/v2/sleep?action=get`` name neither their night nor its time zone, so for each ``getsummary`` series entry
starting in the window the hook publishes
``{"status": 0, "body": {"series": <that night's segments>}, "summary": <the entry>}`` (the mapper's contract, see
``connectors.providers.withings``), taking the segments from the window's page when the night lies inside the window and
otherwise from one ``action=get`` request over the night (≤ 24 h, Withings' limit per call).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import requests

from connectors.hooks import Request, ResponseHook
from connectors.oauth import ProviderOAuth
from core.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

OK = 0
AUTH_FAILED = frozenset({100, 101, 102, 200, 401})
TIMEOUT = 522
TOO_MANY_REQUESTS = 601
SIGNATURE_PATH = "/v2/signature"
SLEEP_PATH = "/v2/sleep"
MAX_SUMMARY_PAGES = 50


def signature(client_secret: str, *values: str) -> str:
    """Withings' request signature: HMAC-SHA256 (hex) of the values, ordered by their keys' names, comma-joined."""
    return hmac.new(client_secret.encode(), ",".join(values).encode(), hashlib.sha256).hexdigest()


def _envelope(response: requests.Response) -> dict[str, Any] | None:
    """The decoded ``{"status": N, ...}`` answer, or None when the answer is not one."""
    try:
        decoded = response.json()
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) and isinstance(decoded.get("status"), int) else None


# ----------------------------------------------------------------------------------------------------------------------
# OAuth
# ----------------------------------------------------------------------------------------------------------------------
class WithingsOAuth(ProviderOAuth):
    """``/v2/oauth2`` token answers unwrapped and their errors classified; disconnect by signed ``action=revoke``."""

    def token_response(self, response: requests.Response) -> requests.Response:
        """Rewrite the answer in place as RFC 6749 JSON: the ``body`` fields on success, else ``error`` and
        ``error_description`` with HTTP 400/401; 601 (too many requests) and 522 (timeout) raise RetryableError."""
        answer = _envelope(response)
        if answer is None:  # not Withings' envelope (e.g. already standard): leave it to oauthlib
            return response
        status, text = answer["status"], str(answer.get("error") or "")
        if status == OK:
            body = answer.get("body")
            if not isinstance(body, dict):
                raise PermanentError(f"withings token endpoint: status 0 without a token body: {response.text[:200]}")
            return self._rewrite(response, 200, body)
        if status in (TOO_MANY_REQUESTS, TIMEOUT):
            raise RetryableError(f"withings token endpoint: status {status}: {text or 'try again later'}")
        error, http = self._classify(status, text)
        return self._rewrite(response, http, {"error": error, "error_description": f"Withings status {status}: {text}"})

    @staticmethod
    def _classify(status: int, text: str) -> tuple[str, int]:
        """``(RFC 6749 error, HTTP status)`` of a token-endpoint status. The request's only user-specific parts are
        the code (or refresh token) and the redirect URI, so "invalid params" (503) or a refused authentication
        means the grant is gone, unless the text blames our client credentials."""
        if "client" in text.lower():  # e.g. "invalid client_id": our credentials, not the user's grant
            return "invalid_client", 401
        if status == 503 or status in AUTH_FAILED:  # "Invalid Params: invalid refresh_token" / "invalid code"
            return "invalid_grant", 400
        return "invalid_request", 400

    @staticmethod
    def _rewrite(response: requests.Response, http: int, document: dict[str, Any]) -> requests.Response:
        response._content = json.dumps(document).encode()
        response.status_code = http
        response.headers["Content-Type"] = "application/json"
        return response

    def disconnect(self, token: dict[str, Any], provider_user_id: str | None) -> None:
        """End the grant: ``action=revoke`` for the Withings ``userid`` (tokens and notify subscriptions end)."""
        if not provider_user_id:
            log.warning("withings: no userid for the connection; its grant cannot be revoked at Withings")
            return
        client_id, secret = self._require_client(), self.settings.client_secret or ""
        timestamp = str(int(time.time()))
        nonce_answer = self._signed_call("getnonce", self._url(SIGNATURE_PATH), {
            "action": "getnonce", "client_id": client_id, "timestamp": timestamp,
            "signature": signature(secret, "getnonce", client_id, timestamp)})
        nonce = str((nonce_answer.get("body") or {}).get("nonce") or "")
        if not nonce:
            raise PermanentError(f"withings getnonce: no nonce in {nonce_answer!r:.200}")
        self._signed_call("revoke", self.token_url, {
            "action": "revoke", "client_id": client_id, "nonce": nonce, "userid": str(provider_user_id),
            "signature": signature(secret, "revoke", client_id, nonce)})

    def _url(self, path: str) -> str:
        """``path`` on the token endpoint's host (wbsapi.withings.net, or the configured override)."""
        parts = urlsplit(self.token_url)
        prefix = parts.path[: -len("/v2/oauth2")] if parts.path.endswith("/v2/oauth2") else ""
        return urlunsplit((parts.scheme, parts.netloc, prefix + path, "", ""))

    def _signed_call(self, what: str, url: str, form: dict[str, str]) -> dict[str, Any]:
        try:
            response = requests.post(url, data=form, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise RetryableError(f"withings {what}: {exc}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise RetryableError(f"withings {what}: HTTP {response.status_code}")
        answer = _envelope(response)
        if response.status_code >= 400 or answer is None:
            raise PermanentError(f"withings {what}: HTTP {response.status_code}: {response.text[:300]}")
        if answer["status"] in (TOO_MANY_REQUESTS, TIMEOUT):
            raise RetryableError(f"withings {what}: status {answer['status']}")
        if answer["status"] != OK:
            raise PermanentError(f"withings {what}: status {answer['status']}: {answer.get('error') or ''}")
        return answer


# ----------------------------------------------------------------------------------------------------------------------
# polling
# ----------------------------------------------------------------------------------------------------------------------
def http_status(withings_status: int) -> int:
    """The HTTP status a non-zero Withings status means to the poller."""
    if withings_status in AUTH_FAILED:
        return 401
    if withings_status == TOO_MANY_REQUESTS:
        return 429
    if withings_status == TIMEOUT:
        return 504
    return 400


class WithingsHook(ResponseHook):
    """Body statuses as HTTP statuses; ``sleep_get`` pages split per night with the night's ``summary`` attached."""

    attaches: ClassVar[Mapping[str, tuple[str, ...]]] = {"sleep_get": ("summary",)}

    def status(self, status: int, body: Any) -> int:
        if status == 200 and isinstance(body, dict) and isinstance(body.get("status"), int) and body["status"] != OK:
            return http_status(body["status"])
        return status

    def payloads(self, request: Request, body: Any) -> list[Any]:
        if body is None or _no_entries(body):
            return []
        if request.kind != "sleep_get" or request.start is None or request.end is None:
            return [body]
        start, end = int(request.start.timestamp()), int(request.end.timestamp())
        page = body.get("body") if isinstance(body, dict) else None
        segments = page.get("series") if isinstance(page, dict) else None
        if not isinstance(segments, list):
            return [body]  # not a sleep page: published as it is, the mapper dead-letters it with its bytes
        out = []
        for summary in self._summaries(request):
            begin, finish = summary.get("startdate"), summary.get("enddate")
            if not isinstance(begin, int) or not isinstance(finish, int) or not start <= begin < end:
                continue  # another window's night (each night belongs to the window it starts in)
            if finish <= end:
                night = [s for s in segments if isinstance(s, dict) and _overlaps(s, begin, finish)]
                out.append({"status": OK, "body": {**page, "series": night}, "summary": summary})
            else:
                fetched = request.fetch(request.endpoint.path, {**request.endpoint.params, "startdate": str(begin),
                                                                "enddate": str(finish)}, method=request.endpoint.method)
                out.append({**fetched, "summary": summary})
        return out

    @staticmethod
    def _summaries(request: Request) -> list[dict[str, Any]]:
        """The ``getsummary`` series entries of the window's days (a day either side: ``date`` is a local day)."""
        from connectors import get_provider

        manifest = get_provider("withings").manifest
        assert manifest is not None and manifest.api is not None and request.start and request.end
        summary = manifest.api.endpoints["sleep_getsummary"]
        first, last = window_days(request.start, request.end)
        params = {**summary.params, "startdateymd": first, "enddateymd": last}
        entries: list[dict[str, Any]] = []
        for _ in range(MAX_SUMMARY_PAGES):
            answer = request.fetch(summary.path, params, method=summary.method)
            body = answer.get("body") if isinstance(answer, dict) else None
            if not isinstance(body, dict) or not isinstance(body.get("series"), list):
                raise PermanentError(f"withings getsummary for sleep_get: unexpected answer {answer!r:.200}")
            entries.extend(e for e in body["series"] if isinstance(e, dict))
            if not body.get("more"):
                return entries
            params["offset"] = str(body.get("offset") or len(entries))
        raise PermanentError(f"withings getsummary: more than {MAX_SUMMARY_PAGES} pages for one sleep_get window")


def _no_entries(answer: Any) -> bool:
    """A successful page whose entry lists (``measuregrps``, ``series``, ``activities``) are all empty: nothing to
    publish (the poller cannot tell, every Withings mapper takes the whole response as its one document)."""
    body = answer.get("body") if isinstance(answer, dict) and answer.get("status") == OK else None
    lists = [v for v in body.values() if isinstance(v, list)] if isinstance(body, dict) else []
    return bool(lists) and not any(lists)


def _overlaps(segment: dict[str, Any], begin: int, finish: int) -> bool:
    start, end = segment.get("startdate"), segment.get("enddate")
    return isinstance(start, int) and isinstance(end, int) and start < finish and end > begin


def window_days(start: datetime, end: datetime) -> tuple[str, str]:
    """The ``startdateymd``/``enddateymd`` of a window, a day either side."""
    return (start - timedelta(days=1)).date().isoformat(), (end + timedelta(days=1)).date().isoformat()
