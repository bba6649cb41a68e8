"""Provider webhooks in: received, verified where the provider signs them, and turned into raw events.

Per the provider's manifest (``webhooks``):

- ``push`` (Garmin): the body carries the data. It is split by user (one raw event per user, so a
  user's data stays in order on the ingestion topic) and published as is; a body that is not
  JSON is published whole, so the pipeline dead-letters it with its bytes (the provider gets 200 and
  does not retry a payload that can never succeed).
- ``notification`` / ``ping`` (Oura, WHOOP, Fitbit, Polar, Withings): the body only says what
  changed. It is published as a raw event of kind ``notification`` on the notifications topic, for
  the fetcher to pull the named document with the connection's token.

A signature that does not verify is refused with 401 and published nowhere. Oura's subscription
check (``GET`` with ``verification_token`` and ``challenge``) is answered here too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from connectors import registry
from connectors.manifest import Signature
from transforms.publish import RawPayload

Publisher = Callable[[str, Sequence[RawPayload]], None]  # (topic, payloads)
TIMESTAMP_TOLERANCE_S = 300


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


def notification_user(document: Any) -> str | None:
    for field in ("user_id", "userid", "ownerId", "userId", "user"):
        if isinstance(document, dict) and document.get(field) not in (None, ""):
            return str(document[field])
    return None


def router(publish: Publisher, raw_topic: str = "healthflow.raw",
           notifications_topic: str = "healthflow.notifications") -> APIRouter:
    """Routes ``/v2/providers/{provider}/webhook``: POST receives, GET answers subscription checks."""
    api = APIRouter(prefix="/v2/providers", tags=["provider webhooks"])

    def manifest_of(provider: str):
        found = registry().get(provider.lower())
        if found is None:
            raise HTTPException(404, f"unknown provider {provider!r}; known: {', '.join(sorted(registry()))}")
        if found.manifest.webhooks is None:
            raise HTTPException(404, f"{provider} does not send webhooks")
        return found

    @api.post("/{provider}/webhook")
    async def receive(provider: str, request: Request) -> JSONResponse:
        found = manifest_of(provider)
        body = await request.body()
        hooks = found.manifest.webhooks
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
            payloads = split_push_by_user(found.slug, body, found.user_field or "userId")
            publish(raw_topic, payloads)
            return JSONResponse({"status": "accepted", "raw_events": len(payloads)})
        try:
            user = notification_user(json.loads(body))
        except ValueError:
            user = None
        publish(notifications_topic, [RawPayload(found.slug, body, kind="notification", user_id=user)])
        return JSONResponse({"status": "accepted"})

    @api.get("/{provider}/webhook")
    def verify_subscription(provider: str, verification_token: str = "", challenge: str = "") -> JSONResponse:
        found = manifest_of(provider)
        expected = os.environ.get(f"HEALTHFLOW_{found.slug.upper()}_VERIFICATION_TOKEN")
        if not expected or not hmac.compare_digest(expected, verification_token) or not challenge:
            raise HTTPException(401, "verification_token does not match (or no challenge given)")
        return JSONResponse({"challenge": challenge})

    return api
