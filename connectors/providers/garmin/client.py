"""Garmin client code the manifest cannot express: ending the link, and the push lifecycle lists.

Garmin OAuth 2 (PKCE) has no RFC 7009 revoke URL. A user's link ends with ``DELETE
/wellness-api/rest/user/registration`` (user endpoint, no parameters, 204 no content): Garmin stops
pushing that user's data, rejects the user's tokens from then on, and sends one last ``deregistrations``
notification as if the user had withdrawn access in Garmin Connect.

The manifest's endpoints are Garmin's backfill requests (``GET /backfill/<type>``): Garmin answers 202
with no body and pushes the data later; the poll hook (``GarminBackfillHook``) makes sure no answer of theirs
is ever published as data (see ``controlplane.polling.service`` for windows and 409).

Push bodies may carry lifecycle lists instead of data (the manifest's ``webhooks.lifecycle``, applied by
``controlplane.webhooks``): ``deregistrations`` (the user disconnected us in Garmin Connect, or we called
the DELETE above) and ``userPermissionsChange`` (the user changed what they share; the token stays valid).

Summary types configured for Ping carry ``callbackURL`` entries instead of data (``webhooks.callback_field`` in the
manifest): the webhook queues them and ``controlplane.polling.notifications`` GETs them (only on ``api.base_url``'s
origin and path) with the user's token, publishing the answer as a push body. ``activityFiles`` pings (FIT/TCX/GPX,
one download each) are not mapped, so they are not fetched.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from connectors.hooks import Request, ResponseHook
from connectors.oauth import InvalidGrant, ProviderOAuth
from core.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

REGISTRATION_PATH = "/user/registration"


class GarminOAuth(ProviderOAuth):
    """Garmin's OAuth 2: standard PKCE code exchange and refresh; disconnect deletes the user registration."""

    def disconnect(self, token: dict[str, Any], provider_user_id: str | None) -> None:
        """``DELETE {api_base}/user/registration`` with the user's token.

        Done when Garmin answers 204 (or another 2xx). A token Garmin rejects (401/403) is refreshed
        once and the call repeated; a refresh Garmin refuses (``invalid_grant``), a second rejection,
        or a 404 means the registration is already gone, which counts as done. 429/5xx/network errors
        raise ``RetryableError``, other 4xx ``PermanentError`` (the control plane logs them and
        disconnects locally anyway).
        """
        response = self._delete_registration(token["access_token"])
        if response.status_code in (401, 403) and token.get("refresh_token"):
            try:
                fresh = self.refresh(token["refresh_token"])
            except InvalidGrant:
                log.info("garmin user %s: the grant is already gone; nothing to deregister", provider_user_id)
                return
            response = self._delete_registration(fresh["access_token"])
        status = response.status_code
        if status < 300:
            return
        if status in (401, 403, 404):
            log.info("garmin user %s: registration already gone (HTTP %s)", provider_user_id, status)
            return
        if status == 429 or status >= 500:
            raise RetryableError(f"garmin user deregistration: HTTP {status}")
        raise PermanentError(f"garmin user deregistration: HTTP {status}: {response.text[:300]}")

    def _delete_registration(self, access_token: str) -> requests.Response:
        if self.api_base is None:
            raise PermanentError("garmin: no api base URL for the user deregistration call")
        try:
            return requests.delete(self.api_base.rstrip("/") + REGISTRATION_PATH, timeout=self.timeout_s,
                                   headers={"Authorization": f"Bearer {access_token}"})
        except requests.RequestException as exc:
            raise RetryableError(f"garmin user deregistration: {exc}") from exc


class GarminBackfillHook(ResponseHook):
    """Backfill requests are answered 202 without data (the data comes by push): publish nothing."""

    def payloads(self, request: Request, body: Any) -> list[Any]:
        return []
