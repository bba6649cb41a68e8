"""Polar AccessLink client code the manifest cannot express: user (de)registration and the poll hook.

Polar grants one long-lived access token and no refresh token; its token response names the user in
``x_user_id``. A new grant is not enough to read data: the partner must register the user
(``POST /v3/users`` with ``{"member-id": …}``) before any data endpoint answers for them, and ends the link with
``DELETE /v3/users/{user-id}``, which also revokes the access token.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from connectors.hooks import Request, ResponseHook
from connectors.oauth import ProviderOAuth
from core.errors import PermanentError, RetryableError, parse_retry_after

log = logging.getLogger(__name__)

USERS_PATH = "/v3/users"
SLEEP_LIST_PATH = "/v3/users/sleep"  # the last 28 days of nights, as /v3/users/nightly-recharge lists recharges


def member_id(provider_user_id: str) -> str:
    """The partner's identifier Polar stores with a registration: the Polar user id, so it is unique per Polar
    account and the same on every reconnection (``after_connect`` is not told healthflow's user id)."""
    return str(provider_user_id)


def _raise_for_status(what: str, response: requests.Response) -> None:
    """healthflow's taxonomy: 429 and 5xx are retryable (with ``Retry-After`` when given), other 4xx permanent."""
    status = response.status_code
    if status == 429 or status >= 500:
        raise RetryableError(f"polar {what}: HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
    if status >= 400:
        raise PermanentError(f"polar {what}: HTTP {status}: {response.text[:300]}")


class PolarOAuth(ProviderOAuth):
    """Registers the user at connect and deregisters them at disconnect (both with the user's own token)."""

    def _users_call(self, method: str, path: str, token: dict[str, Any], what: str,
                    body: dict[str, Any] | None = None) -> requests.Response:
        if self.api_base is None:
            raise PermanentError("polar: the manifest has no api.base_url for the AccessLink users calls")
        headers = {"Authorization": f"Bearer {token['access_token']}", "Accept": "application/json"}
        try:
            return requests.request(method, self.api_base.rstrip("/") + path, headers=headers, json=body,
                                    timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise RetryableError(f"polar {what}: {exc}") from exc

    def after_connect(self, token: dict[str, Any], provider_user_id: str) -> None:
        """``POST /v3/users``: 200 (or 201) registered, 409 already registered; anything else refuses the connection
        (403: the user has not accepted Polar's mandatory consents; 204: Polar found no such user)."""
        what = "user registration"
        response = self._users_call("POST", USERS_PATH, token, what, {"member-id": member_id(provider_user_id)})
        if response.status_code == 409:
            log.info("polar user %s was already registered", provider_user_id)
            return
        _raise_for_status(what, response)
        if response.status_code not in (200, 201):
            raise PermanentError(f"polar {what}: HTTP {response.status_code}, the user was not registered")
        try:
            registered = response.json().get("polar-user-id")
        except (ValueError, AttributeError):
            registered = None
        if registered is not None and str(registered) != str(provider_user_id):
            raise PermanentError(f"polar {what}: registered Polar user {registered}, but the token names "
                                 f"{provider_user_id}")

    def disconnect(self, token: dict[str, Any], provider_user_id: str | None) -> None:
        """``DELETE /v3/users/{user-id}`` (deregisters and revokes the token); 204, or 404 (not registered any
        more), both leave the link ended. Without a provider user id there is nothing to deregister."""
        if not provider_user_id:
            return
        what = "user deregistration"
        response = self._users_call("DELETE", f"{USERS_PATH}/{provider_user_id}", token, what)
        if response.status_code == 404 or 200 <= response.status_code < 300:
            return
        _raise_for_status(what, response)


class PolarHook(ResponseHook):
    """Bare JSON arrays (``/v3/exercises``) are published item by item, as the Polar mappers expect; a Nightly
    Recharge page gets each recharge's night attached under ``sleep`` (from ``/v3/users/sleep``, fetched once per
    page through the poller's rate limits), so the mapper can complete that night's Sleep (recovery level,
    breathing, HRV) and place the HRV samples with the night's UTC offset. A recharge without a night stays as
    it is. A failed sleep fetch fails the poll (retried next round), never publishes the page half done."""

    def payloads(self, request: Request, body: Any) -> list[Any]:
        if isinstance(body, list):
            return [item for item in body if item is not None]
        if request.kind == "nightly-recharge" and isinstance(body, dict):
            return [self._with_nights(request, body)]
        return super().payloads(request, body)

    @staticmethod
    def _with_nights(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        page = isinstance(body.get("recharges"), list)
        recharges = body["recharges"] if page else [body]

        def wants_night(recharge: Any) -> bool:
            return (isinstance(recharge, dict) and isinstance(recharge.get("date"), str)
                    and recharge.get("sleep") is None)

        if not any(wants_night(r) for r in recharges):
            return body
        listed = request.fetch(SLEEP_LIST_PATH)
        nights = listed.get("nights") if isinstance(listed, dict) else None
        by_date = {n["date"]: n for n in nights if isinstance(n, dict) and isinstance(n.get("date"), str)} \
            if isinstance(nights, list) else {}
        attached = [dict(r, sleep=by_date[r["date"]]) if wants_night(r) and r["date"] in by_date else r
                    for r in recharges]
        return dict(body, recharges=attached) if page else attached[0]
