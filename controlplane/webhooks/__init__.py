"""Provider webhooks in: received, verified where the provider signs them, and turned into raw events.

Per the provider's manifest (``webhooks``):

- ``push`` (Garmin): the body carries the data. It is split by user (one raw event per user, so a
  user's data stays in order on the ingestion topic) and published as is; a body that is not
  JSON is published whole, so the pipeline dead-letters it with its bytes (the provider gets 200 and
  does not retry a payload that can never succeed). Lifecycle lists a provider declares in its
  ``client.py`` (``PUSH_LIFECYCLE``: list key → action; Garmin ``deregistrations`` and
  ``userPermissionsChange``) are taken out first, applied to the control plane and never published:
  ``deregistration`` revokes every active connection of the account (``ControlPlane.revoke_account``:
  tokens deleted, ``access_revoked`` event; an account without one, e.g. already deauthenticated, is
  skipped); ``permissions_change`` sets the connection's scopes to the permissions the entry lists.
  Without a control plane (``router(control_plane=…)`` or the app's ``state.control_plane``) such a
  body is refused with 503, so the provider retries it later.
  Data pushed for an account without an active connection is still published; the pipeline delivers it
  under the account's derived user id (``transforms.users``), not under an ended connection.
  Pings (``webhooks.callback_field``, Garmin ``callbackURL``: the partner is to GET that URL for the data) are
  taken out of the push body too, entry by entry (a body may mix data, pings and lifecycle lists), and queued on
  the notifications topic like notifications: one raw event of kind ``notification`` per account, keyed by the
  account, holding ``{"<summaryType>": [ping entries]}`` in the body's order. Nothing is fetched while Garmin waits
  for its 200 (30 s); the fetcher (``controlplane.polling.notifications``) GETs the callbacks.
- ``notification`` / ``ping`` (Oura, WHOOP, Fitbit, Polar, Withings): the body only says what
  changed. It is published as a raw event of kind ``notification`` on the notifications topic, for
  the fetcher (``controlplane.polling.notifications``) to pull the named data with the connection's token,
  or to mark the connection revoked (``webhooks.revoked``). The raw event's ``user_id`` is the notified
  account (``webhooks.user_field``), so one account's notifications stay in order; a list naming several
  accounts (Fitbit sends arrays) is split into one raw event per account, in the list's order, and a list
  naming one account is published unchanged. ``webhooks.body: form`` notifications (Withings) are form
  fields. The answer is ``webhooks.accept_status``: 200 with a small JSON body, or 204 without one (Fitbit).

A signature that does not verify is refused with 401 and published nowhere. Subscription checks are
answered on ``GET``: with ``webhooks.verify_param`` (Fitbit ``?verify=<code>``) 204 when the code is
``HEALTHFLOW_<PROVIDER>_VERIFICATION_CODE`` and 404 otherwise (Fitbit checks both answers); else Oura's
``verification_token`` and ``challenge`` (the challenge echoed when the token is
``HEALTHFLOW_<PROVIDER>_VERIFICATION_TOKEN``, 401 otherwise). ``HEAD`` answers 200 for a provider that
sends webhooks (Withings checks the callback URL with it before subscribing).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from connectors import provider_client, registry
from connectors.manifest import Signature, Webhooks
from core.raw import RawPayload

log = logging.getLogger(__name__)

Publisher = Callable[[str, Sequence[RawPayload]], None]  # (topic, payloads)
TIMESTAMP_TOLERANCE_S = 300
LIFECYCLE_ACTIONS = ("deregistration", "permissions_change")


class SignatureInvalid(ValueError):
    """The webhook's signature does not match: refused, published nowhere."""


def secret_variable(provider: str, signature: Signature) -> str:
    """Where the key a provider signs with comes from: ``HEALTHFLOW_<PROVIDER>_CLIENT_SECRET`` or
    ``HEALTHFLOW_<PROVIDER>_WEBHOOK_SECRET``."""
    name = "WEBHOOK_SECRET" if signature.key == "webhook_secret" else "CLIENT_SECRET"
    return f"HEALTHFLOW_{provider.upper()}_{name}"


def verify_signature(signature: Signature, secret: str, headers: dict[str, str], body: bytes,
                     now: float | None = None) -> None:
    """Check a provider's HMAC over the raw body (and timestamp); SignatureInvalid says why not."""
    sent = headers.get(signature.header.lower())
    if not sent:
        raise SignatureInvalid(f"missing {signature.header} header")
    message = body
    if signature.message == "timestamp+body":
        stamp = headers.get((signature.timestamp_header or "").lower())
        if not stamp or not stamp.strip().isdigit():
            raise SignatureInvalid(f"missing or malformed {signature.timestamp_header} header")
        seconds = int(stamp) / 1000 if int(stamp) > 10**11 else int(stamp)  # WHOOP sends ms, Oura s
        if abs((now or time.time()) - seconds) > TIMESTAMP_TOLERANCE_S:
            raise SignatureInvalid(f"{signature.timestamp_header} is more than {TIMESTAMP_TOLERANCE_S}s from now")
        message = stamp.strip().encode() + body
    key = (secret + "&" if signature.key == "client_secret&" else secret).encode()
    digest = hmac.new(key, message, hashlib.sha1 if signature.algorithm == "hmac-sha1" else hashlib.sha256).digest()
    expected = {"hex": digest.hex(), "hex-upper": digest.hex().upper(),
                "base64": base64.b64encode(digest).decode()}[signature.encoding]
    if not hmac.compare_digest(expected.encode(), sent.strip().encode()):
        raise SignatureInvalid(f"{signature.header} does not match the body")


def _same(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a configured secret with what a request sent (any characters)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def split_push_by_user(provider: str, body: bytes, user_field: str) -> list[RawPayload]:
    """One raw event per user of a push body ``{kind: [documents]}``; unparseable bodies go whole."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return [RawPayload(provider, body)]
    if not isinstance(parsed, dict) or not all(isinstance(v, list) for v in parsed.values()):
        return [RawPayload(provider, body)]
    by_user: dict[str, dict[str, list[Any]]] = {}
    for kind, documents in parsed.items():
        for document in documents:
            user = str(document.get(user_field, "")) if isinstance(document, dict) else ""
            by_user.setdefault(user, {}).setdefault(kind, []).append(document)
    return [RawPayload(provider, json.dumps(part, separators=(",", ":")).encode(), user_id=user or None)
            for user, part in by_user.items()]


def lifecycle_keys(provider: str) -> dict[str, str]:
    """``PUSH_LIFECYCLE`` of the provider's ``client.py`` (push-body list key → action), else empty."""
    declared = dict(getattr(provider_client(provider), "PUSH_LIFECYCLE", None) or {})
    unknown = set(declared.values()) - set(LIFECYCLE_ACTIONS)
    if unknown:
        raise ValueError(f"{provider} PUSH_LIFECYCLE names unknown actions {sorted(unknown)}")
    return declared


def split_lifecycle(body: bytes, keys: Collection[str]) -> tuple[bytes, dict[str, list[Any]]]:
    """Take the lifecycle lists (``keys``) out of a push body: ``(rest, {key: entries})``.

    ``rest`` is the body unchanged when it holds none (or is not a JSON object), the remaining lists
    re-serialized otherwise, and empty when nothing remains. A lifecycle key whose value is not a list
    stays in ``rest``, so the pipeline dead-letters it with its bytes.
    """
    if not keys:
        return body, {}
    try:
        parsed = json.loads(body)
    except ValueError:
        return body, {}
    if not isinstance(parsed, dict) or not any(isinstance(parsed.get(k), list) for k in keys):
        return body, {}
    lifecycle = {k: parsed.pop(k) for k in list(parsed) if k in keys and isinstance(parsed[k], list)}
    return (json.dumps(parsed, separators=(",", ":")).encode() if parsed else b""), lifecycle


def split_pings(body: bytes, callback_field: str | None) -> tuple[bytes, dict[str, list[Any]]]:
    """Take the ping entries (objects carrying ``callback_field``) out of a push body: ``(rest, {type: pings})``.

    ``rest`` is the body unchanged when it holds none (or is not a JSON object of lists), the remaining entries
    re-serialized otherwise (a list left empty is dropped), and empty when nothing remains.
    """
    if not callback_field:
        return body, {}
    try:
        parsed = json.loads(body)
    except ValueError:
        return body, {}
    if not isinstance(parsed, dict):
        return body, {}
    pings: dict[str, list[Any]] = {}
    rest: dict[str, Any] = {}
    for kind, entries in parsed.items():
        if not isinstance(entries, list):
            rest[kind] = entries
            continue
        for entry in entries:
            if isinstance(entry, dict) and entry.get(callback_field) is not None:
                pings.setdefault(kind, []).append(entry)
            else:
                rest.setdefault(kind, []).append(entry)
        if not entries:
            rest[kind] = entries
    if not pings:
        return body, {}
    return (json.dumps(rest, separators=(",", ":")).encode() if rest else b""), pings


def queue_pings(provider: str, pings: Mapping[str, list[Any]], user_field: str) -> list[RawPayload]:
    """Ping entries as notification raw events: one per account (``user_field``), ``{type: [entries]}`` in order."""
    by_user: dict[str, dict[str, list[Any]]] = {}
    for kind, entries in pings.items():
        for entry in entries:
            by_user.setdefault(str(entry.get(user_field) or ""), {}).setdefault(kind, []).append(entry)
    return [RawPayload(provider, json.dumps(part, separators=(",", ":")).encode(), kind="notification",
                       user_id=user or None) for user, part in by_user.items()]


def apply_lifecycle(control_plane: Any, provider: str, actions: Mapping[str, str], lists: Mapping[str, list[Any]],
                    user_field: str) -> int:
    """Apply lifecycle entries to the control plane; returns how many entries named an account.

    ``deregistration``: every active connection of the account is marked revoked (``access_revoked``).
    ``permissions_change``: the connection's scopes become the entry's ``permissions``.
    Entries without an account id, and accounts without an active connection, are skipped.
    """
    done = 0
    for key, entries in lists.items():
        for entry in entries:
            account = entry.get(user_field) if isinstance(entry, dict) else None
            if account in (None, ""):
                log.warning("%s %s entry without %s ignored", provider, key, user_field)
                continue
            done += 1
            if actions[key] == "deregistration":
                control_plane.revoke_account(provider, str(account), f"the user ended the {provider} link at the "
                                                                     f"provider ({key}); the user must connect again")
            elif (connection := control_plane.resolve_user(provider, str(account))) is not None:
                permissions = entry.get("permissions")
                if isinstance(permissions, list):
                    control_plane.update_scopes(connection.user_id, [str(p) for p in permissions])
                log.info("%s account %s (user %s) now shares %s", provider, account, connection.user_id, permissions)
    return done


def notification_user(document: Any, user_field: str | None = None) -> str | None:
    """The account a notification names: ``user_field`` when the manifest declares one, else a usual field."""
    for name in ((user_field,) if user_field else ("user_id", "userid", "ownerId", "userId", "user")):
        if isinstance(document, dict) and document.get(name) not in (None, ""):
            return str(document[name])
    return None


def parse_notification(body: bytes, encoding: str = "json") -> Any:
    """A notification body as sent: JSON (an object, or Fitbit's array), or form fields (Withings) as a dict of
    their first values. ValueError when it is neither."""
    if encoding == "form":
        try:
            text = body.decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"form body is not UTF-8: {exc}") from exc
        fields = urllib.parse.parse_qs(text, keep_blank_values=True, strict_parsing=bool(text.strip()))
        return {name: values[0] for name, values in fields.items()}
    return json.loads(body)


def split_notifications(provider: str, body: bytes, hooks: Webhooks) -> list[RawPayload]:
    """Raw events of one notification body, keyed by the account it names.

    A body naming one account (or none: unreadable, or without the user field) is one raw event with the body
    unchanged; a list naming several accounts becomes one raw event per account, its entries in the list's order.
    """
    def event(payload: bytes, user: str | None) -> RawPayload:
        return RawPayload(provider, payload, kind="notification", user_id=user)

    try:
        parsed = parse_notification(body, hooks.body)
    except ValueError:
        return [event(body, None)]
    if not isinstance(parsed, list):
        return [event(body, notification_user(parsed, hooks.user_field))]
    by_user: dict[str | None, list[Any]] = {}
    for entry in parsed:
        by_user.setdefault(notification_user(entry, hooks.user_field), []).append(entry)
    if len(by_user) <= 1:
        return [event(body, next(iter(by_user), None))]
    return [event(json.dumps(entries, separators=(",", ":")).encode(), user) for user, entries in by_user.items()]


def router(publish: Publisher, raw_topic: str = "healthflow.raw",
           notifications_topic: str = "healthflow.notifications", control_plane: Any = None) -> APIRouter:
    """Routes ``/v2/providers/{provider}/webhook``: POST receives, GET answers subscription checks.

    Signed notifications are verified as the manifest says. Providers that sign nothing (Garmin pushes,
    Withings notifications) are authenticated by a secret in the registered URL: with
    ``HEALTHFLOW_<PROVIDER>_WEBHOOK_TOKEN`` set, a POST must carry ``?token=<that value>`` or gets 401
    (set it in production: anyone who knows the URL could otherwise post data or a deregistration).

    ``control_plane`` (a ``ControlPlane``; default: the app's ``state.control_plane``, which
    ``controlplane.api.create_app`` sets) applies push lifecycle lists.
    """
    api = APIRouter(prefix="/v2/providers", tags=["provider webhooks"])

    def manifest_of(provider: str):
        found = registry().get(provider.lower())
        if found is None:
            raise HTTPException(404, f"unknown provider {provider!r}; known: {', '.join(sorted(registry()))}")
        if found.manifest.webhooks is None:
            raise HTTPException(404, f"{provider} does not send webhooks")
        return found

    @api.post("/{provider}/webhook")
    async def receive(provider: str, request: Request) -> Response:
        found = manifest_of(provider)
        body = await request.body()
        hooks = found.manifest.webhooks
        url_token = os.environ.get(f"HEALTHFLOW_{found.slug.upper()}_WEBHOOK_TOKEN")
        if url_token and not _same(url_token, request.query_params.get("token")):
            # providers that sign nothing (Garmin, Withings): the secret is in the URL registered with them
            raise HTTPException(401, "the token query parameter does not match this webhook's token")
        if hooks.signature is not None:
            variable = secret_variable(found.slug, hooks.signature)
            secret = os.environ.get(variable)
            if not secret:
                raise HTTPException(503, f"{found.slug} webhooks are signed; set {variable} to verify them")
            try:
                verify_signature(hooks.signature, secret, {k.lower(): v for k, v in request.headers.items()}, body)
            except SignatureInvalid as exc:
                raise HTTPException(401, f"signature check failed: {exc}") from exc
        if hooks.mode == "push":
            user_field = found.user_field or "userId"
            actions = lifecycle_keys(found.slug)
            body, lifecycle = split_lifecycle(body, actions)
            applied = None
            if lifecycle:
                plane = control_plane or getattr(request.app.state, "control_plane", None)
                if plane is None:
                    raise HTTPException(503, f"{found.slug} lifecycle notifications ({', '.join(lifecycle)}) need "
                                             "the control plane; none is configured here")
                applied = await run_in_threadpool(apply_lifecycle, plane, found.slug, actions, lifecycle, user_field)
            body, pings = split_pings(body, hooks.callback_field)
            payloads = split_push_by_user(found.slug, body, user_field) if body else []
            if payloads:
                publish(raw_topic, payloads)
            queued = queue_pings(found.slug, pings, user_field)
            if queued:
                publish(notifications_topic, queued)
            answer: dict[str, Any] = {"status": "accepted", "raw_events": len(payloads)}
            if applied is not None:
                answer["lifecycle"] = applied
            if pings:
                answer["pings"] = sum(len(entries) for entries in pings.values())
            return JSONResponse(answer)
        publish(notifications_topic, split_notifications(found.slug, body, hooks))
        if hooks.accept_status == 204:
            return Response(status_code=204)
        return JSONResponse({"status": "accepted"})

    @api.get("/{provider}/webhook", response_model=None)
    def verify_subscription(provider: str, request: Request, verification_token: str = "",
                            challenge: str = "") -> Response:
        found = manifest_of(provider)
        hooks = found.manifest.webhooks
        if hooks.verify_param:
            variable = f"HEALTHFLOW_{found.slug.upper()}_VERIFICATION_CODE"
            expected = os.environ.get(variable)
            if not expected:
                log.warning("%s subscriber check refused: %s is not set", found.slug, variable)
                raise HTTPException(404, f"{found.slug} subscriber verification needs {variable}")
            if not _same(expected, request.query_params.get(hooks.verify_param)):
                raise HTTPException(404, f"{hooks.verify_param} is not this subscriber's verification code")
            return Response(status_code=204)
        expected = os.environ.get(f"HEALTHFLOW_{found.slug.upper()}_VERIFICATION_TOKEN")
        if not expected or not _same(expected, verification_token) or not challenge:
            raise HTTPException(401, "verification_token does not match (or no challenge given)")
        return JSONResponse({"challenge": challenge})

    @api.head("/{provider}/webhook", response_model=None)
    def reachable(provider: str) -> Response:
        manifest_of(provider)
        return Response(status_code=200)

    return api
