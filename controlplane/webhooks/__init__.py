"""Provider webhooks in: received, verified where the provider signs them, and turned into raw events.

Per the provider's manifest (``webhooks``):

- ``push`` (Garmin): the body carries the data. It is split by user (one raw event per user, so a
  user's data stays in order on the ingestion topic) and published as is; a body that is not
  JSON is published whole, so the pipeline dead-letters it with its bytes (the provider gets 200 and
  does not retry a payload that can never succeed). Lifecycle lists a provider declares in its
  manifest (``webhooks.lifecycle``: list key → action; Garmin ``deregistrations`` and
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
  A notification saying a record is gone (``webhooks.deletions``: WHOOP ``workout.deleted``, Oura ``event_type:
  delete``) names nothing to fetch: it is published unchanged on the raw topic as the manifest's deletion kind, and
  the provider's mapper turns it into ``connectors.base.Deletion``s (tombstones).

Every POST is authenticated before its body is read or parsed, and nothing is parsed before its signature checks
out. Providers that sign (``webhooks.signature``: WHOOP, Oura, Fitbit, Polar) need their key
(``HEALTHFLOW_<PROVIDER>_CLIENT_SECRET`` or ``_WEBHOOK_SECRET``, else 503 naming it); the HMAC is checked on the raw
bytes, and a signature that does not verify (or a timestamp more than ``signature.tolerance_s`` from now) is refused
with 401 and published nowhere. Providers that sign nothing (Garmin, Withings) need the secret of their registered
URL: ``HEALTHFLOW_<PROVIDER>_WEBHOOK_TOKEN``, sent as ``?token=`` (compared in constant time; 401 when it does not
match, 503 naming the variable while it is unset, so the provider retries until it is set). When set for a signed
provider, the token is required too.

Limits (``controlplane.limits``): a body larger than ``webhooks.max_body_bytes`` (1 MiB; Garmin 32 MiB) gets 413
before more is read; JSON nested deeper than ``max_json_depth`` (64) gets 400 after the signature check. A raw event
larger than the publisher takes (``connectors.publish.PayloadTooLarge``: one user's part of a push above the producer's
``message.max.bytes``, 33 MiB) gets 413, decided before anything of the body is published.

Replays: a signed notification (or one whose manifest declares ``webhooks.replay``) is claimed in the control-plane
store (``seen.SeenNotifications``, shared by every API process) by its event id (``replay.id_fields``, WHOOP
``trace_id``) or else a SHA-256 of the signed message. The claim is pending while the notification is queued and
accepted once the broker acknowledged it: a copy arriving meanwhile gets 503 with Retry-After (the first may still
fail), a copy of one accepted within ``replay.window_s`` (at least twice the timestamp tolerance) is acknowledged as
accepted and not published again. A claim by content hash in a scheme without a timestamp (Fitbit, Polar: an
identical body later may be another sync of the same day) only stands until the notification is fetched: its raw
events carry the claim (``seen.CLAIM_HEADER``) and the fetcher forgets it once it fetched.
A notification that could not be queued gives its claim back (also when its
request is cancelled), so the provider's retry goes through; a pending claim never given back (a crash, the store
failing) counts as abandoned after ``pending_s``.

Subscription checks are
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
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from connectors import get_provider, registry
from connectors.manifest import Replay, Signature, Webhooks
from connectors.publish import PUBLISH_TIMEOUT_S, PayloadTooLarge
from controlplane.limits import MAX_JSON_DEPTH, check_json_depth, read_body
from controlplane.webhooks.seen import CLAIM_HEADER, SeenNotifications
from core.errors import RetryableError
from core.raw import RawPayload

log = logging.getLogger(__name__)

# (topic, payloads), awaited until the broker acknowledged them (e.g. connectors.publish.RawEventPublisher); a
# RetryableError (its retry_after) says they were not: the webhook is answered 503 with Retry-After. A notification
# claimed by its content is published with headers=[(CLAIM_HEADER, claim id)], so the publisher must take that keyword
Publisher = Callable[[str, Sequence[RawPayload]], Awaitable[object]]
INLINE_PARSE_BYTES = 64 * 1024  # bodies above this are scanned and split on the threadpool, not the event loop
PENDING_MARGIN_S = 4.0  # a publish fails within its timeout + 1 s; the rest covers the claim's own store round trips


class SignatureInvalid(ValueError):
    """The webhook's signature does not match: refused, published nowhere."""


def secret_variable(provider: str, signature: Signature) -> str:
    """Where the key a provider signs with comes from: ``HEALTHFLOW_<PROVIDER>_CLIENT_SECRET`` or
    ``HEALTHFLOW_<PROVIDER>_WEBHOOK_SECRET``."""
    name = "WEBHOOK_SECRET" if signature.key == "webhook_secret" else "CLIENT_SECRET"
    return f"HEALTHFLOW_{provider.upper()}_{name}"


def url_token_variable(provider: str) -> str:
    """Where the secret of a provider's registered webhook URL (``?token=``) comes from."""
    return f"HEALTHFLOW_{provider.upper()}_WEBHOOK_TOKEN"


def unauthenticated_webhooks(environ: Mapping[str, str] | None = None) -> list[str]:
    """What a webhook receiver lacks to authenticate each provider, one sentence per provider (empty when nothing):
    ``healthflow serve`` logs them at start; their requests are refused with 503 until it is set."""
    environ = os.environ if environ is None else environ
    problems = []
    for slug, provider in sorted(registry().items()):
        hooks = provider.manifest.webhooks
        if hooks is None:
            continue
        if hooks.signature is None and not environ.get(url_token_variable(slug)):
            problems.append(f"{slug} webhooks sign nothing and {url_token_variable(slug)} is not set: they are "
                            f"refused until it is (register the URL with ?token=<its value>)")
        elif hooks.signature is not None and not environ.get(secret_variable(slug, hooks.signature)):
            problems.append(f"{slug} webhooks are signed and {secret_variable(slug, hooks.signature)} is not set: "
                            "they are refused until it is")
    return problems


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
        if abs((now or time.time()) - seconds) > signature.tolerance_s:
            raise SignatureInvalid(f"{signature.timestamp_header} is more than {signature.tolerance_s}s from now")
        message = stamp.strip().encode() + body
    key = (secret + "&" if signature.key == "client_secret&" else secret).encode()
    digest = hmac.new(key, message, hashlib.sha1 if signature.algorithm == "hmac-sha1" else hashlib.sha256).digest()
    expected = {"hex": digest.hex(), "hex-upper": digest.hex().upper(),
                "base64": base64.b64encode(digest).decode()}[signature.encoding]
    if not hmac.compare_digest(expected.encode(), sent.strip().encode()):
        raise SignatureInvalid(f"{signature.header} does not match the body")


def replay_id(hooks: Webhooks, headers: Mapping[str, str], body: bytes) -> str:
    """The id a replay of this (verified) notification would have: its event id when the manifest names one
    (``replay.id_fields``) and the body carries it, else a SHA-256 of the signed message (timestamp and body)."""
    fields = (hooks.replay or Replay()).id_fields
    if fields:
        try:
            document = parse_notification(body, hooks.body)
        except ValueError:
            document = None
        if isinstance(document, dict) and all(document.get(f) not in (None, "") for f in fields):
            named = json.dumps([str(document[f]) for f in fields], separators=(",", ":")).encode()
            return "id:" + hashlib.sha256(named).hexdigest()
    signature = hooks.signature
    message = body
    if signature is not None and signature.message == "timestamp+body":
        message = headers.get((signature.timestamp_header or "").lower(), "").strip().encode() + body
    return "sha256:" + hashlib.sha256(message).hexdigest()


def released_after_fetch(hooks: Webhooks, seen_id: str) -> bool:
    """Whether a claim only stands until the notification is fetched: claimed by the content hash of a scheme
    without a timestamp (Fitbit, Polar), an identical notification later can name newer data (another sync of the
    same day), so the fetcher forgets the claim once it fetched (``seen.CLAIM_HEADER``)."""
    signature = hooks.signature
    return seen_id.startswith("sha256:") and (signature is None or signature.message != "timestamp+body")


def replay_window_s(hooks: Webhooks) -> int:
    """How long an accepted notification's id is remembered: ``replay.window_s``, and for a timestamped scheme at
    least twice its tolerance (a timestamp stays acceptable that long), so a replay is never accepted."""
    window = (hooks.replay or Replay()).window_s
    signature = hooks.signature
    if signature is not None and signature.message == "timestamp+body":
        window = max(window, 2 * signature.tolerance_s)
    return window


def _same(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a configured secret with what a request sent (any characters)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def _by_user(provider: str, parsed: dict[str, list[Any]], user_field: str) -> list[RawPayload]:
    by_user: dict[str, dict[str, list[Any]]] = {}
    for kind, documents in parsed.items():
        for document in documents:
            user = str(document.get(user_field, "")) if isinstance(document, dict) else ""
            by_user.setdefault(user, {}).setdefault(kind, []).append(document)
    return [RawPayload(provider, _compact_json(part), user_id=user or None) for user, part in by_user.items()]


def _compact_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (non-ASCII text as is: ``\\u`` escapes would make it up to three times larger
    than what the provider sent); with ASCII escapes when it holds a lone surrogate, which UTF-8 cannot encode."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def _take_lifecycle(parsed: dict[str, Any], keys: Collection[str]) -> dict[str, list[Any]]:
    """Remove and return the lifecycle lists of a parsed push body."""
    return {k: parsed.pop(k) for k in list(parsed) if k in keys and isinstance(parsed[k], list)}


def _take_pings(parsed: dict[str, Any], callback_field: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``(rest, pings)`` of a parsed push body: a list left empty by its pings is dropped."""
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
    return rest, pings


def split_push_by_user(provider: str, body: bytes, user_field: str) -> list[RawPayload]:
    """One raw event per user of a push body ``{kind: [documents]}``; unparseable bodies go whole."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return [RawPayload(provider, body)]
    if not isinstance(parsed, dict) or not all(isinstance(v, list) for v in parsed.values()):
        return [RawPayload(provider, body)]
    return _by_user(provider, parsed, user_field)


def lifecycle_keys(provider: str) -> dict[str, str]:
    """The provider manifest's ``webhooks.lifecycle`` (push-body list key → action), else empty."""
    webhooks = get_provider(provider).manifest.webhooks
    return dict(webhooks.lifecycle) if webhooks else {}


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
    lifecycle = _take_lifecycle(parsed, keys)
    return (_compact_json(parsed) if parsed else b""), lifecycle


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
    rest, pings = _take_pings(parsed, callback_field)
    if not pings:
        return body, {}
    return (_compact_json(rest) if rest else b""), pings


def split_push(provider: str, body: bytes, lifecycle: Collection[str], callback_field: str | None,
               user_field: str) -> tuple[dict[str, list[Any]], list[RawPayload], dict[str, list[Any]]]:
    """A push body taken apart in one parse: ``(lifecycle lists, raw events per user, pings)``, as
    ``split_lifecycle``, then ``split_pings``, then ``split_push_by_user`` on what remains would."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}, [RawPayload(provider, body)], {}
    if not isinstance(parsed, dict):
        return {}, [RawPayload(provider, body)], {}
    lists = _take_lifecycle(parsed, lifecycle) if lifecycle else {}
    pings: dict[str, list[Any]] = {}
    if callback_field:
        rest, pings = _take_pings(parsed, callback_field)
        if pings:
            parsed = rest
    if not parsed:
        return lists, [], pings
    if not all(isinstance(v, list) for v in parsed.values()):  # published whole, for the pipeline to dead-letter
        whole = _compact_json(parsed) if lists or pings else body
        return lists, [RawPayload(provider, whole)], pings
    return lists, _by_user(provider, parsed, user_field), pings


def queue_pings(provider: str, pings: Mapping[str, list[Any]], user_field: str) -> list[RawPayload]:
    """Ping entries as notification raw events: one per account (``user_field``), ``{type: [entries]}`` in order."""
    by_user: dict[str, dict[str, list[Any]]] = {}
    for kind, entries in pings.items():
        for entry in entries:
            by_user.setdefault(str(entry.get(user_field) or ""), {}).setdefault(kind, []).append(entry)
    return [RawPayload(provider, _compact_json(part), kind="notification",
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
    return [event(_compact_json(entries), user) for user, entries in by_user.items()]


def split_deletions(events: list[RawPayload], hooks: Webhooks) -> tuple[list[RawPayload], list[RawPayload]]:
    """``(notifications, deletions)``: the raw events of a notification body that say a record is gone
    (``webhooks.deletions``: WHOOP ``sleep.deleted``, Oura ``event_type: delete``) become raw events of the deletion
    kind for the raw topic, body unchanged; the others stay notifications to fetch."""
    if hooks.deletions is None:
        return events, []
    notes, deleted = [], []
    for event in events:
        try:
            parsed = parse_notification(event.payload, hooks.body)
        except ValueError:
            parsed = None
        if hooks.deletions.matches(parsed):
            deleted.append(RawPayload(event.provider, event.payload, kind=hooks.deletions.kind, user_id=event.user_id))
        else:
            notes.append(event)
    return notes, deleted


def router(publish: Publisher, raw_topic: str = "healthflow.raw",
           notifications_topic: str = "healthflow.notifications", control_plane: Any = None,
           seen: SeenNotifications | None = None, max_json_depth: int = MAX_JSON_DEPTH,
           pending_s: float | None = None) -> APIRouter:
    """Routes ``/v2/providers/{provider}/webhook``: POST receives, GET answers subscription checks.

    Authentication, limits and replays as the module docstring says. ``control_plane`` (a ``ControlPlane``; default:
    the app's ``state.control_plane``, which ``controlplane.api.create_app`` sets) applies push lifecycle lists, and
    its store keeps the ids of accepted notifications unless ``seen`` is given; with neither, signed notifications
    are refused with 503 (replays could not be recognized). ``pending_s``: how long a notification's claim stays
    pending while it is queued before it counts as abandoned (default: the publisher's ``timeout_s``, else
    ``PUBLISH_TIMEOUT_S``, plus the margin its failure report takes, ``PENDING_MARGIN_S``).
    """
    if pending_s is None:
        pending_s = float(getattr(publish, "timeout_s", PUBLISH_TIMEOUT_S)) + PENDING_MARGIN_S
    api = APIRouter(prefix="/v2/providers", tags=["provider webhooks"])
    opened: list[SeenNotifications] = [seen] if seen is not None else []
    opening = threading.Lock()
    warned: set[str] = set()

    def manifest_of(provider: str):
        found = registry().get(provider.lower())
        if found is None:
            raise HTTPException(404, f"unknown provider {provider!r}; known: {', '.join(sorted(registry()))}")
        if found.manifest.webhooks is None:
            raise HTTPException(404, f"{provider} does not send webhooks")
        return found

    def seen_store(request: Request) -> SeenNotifications:
        with opening:
            if not opened:
                plane = control_plane or getattr(request.app.state, "control_plane", None)
                if plane is None:
                    raise HTTPException(503, "webhook replay protection needs the control-plane store; none is "
                                             "configured here")
                opened.append(SeenNotifications(plane.store_url))
            return opened[0]

    def authenticate(slug: str, hooks: Webhooks, request: Request) -> str | None:
        """Checks what can be checked before the body is read; the signing key when the provider signs."""
        token_variable = url_token_variable(slug)
        url_token = os.environ.get(token_variable)
        if hooks.signature is None and not url_token:
            if slug not in warned:  # once per provider: refused requests cannot flood the log
                warned.add(slug)
                log.warning("%s webhooks refused: they sign nothing and %s is not set", slug, token_variable)
            raise HTTPException(503, f"{slug} webhooks sign nothing, so this route needs a URL token: set "
                                     f"{token_variable} and register the webhook URL with ?token=<its value>")
        if url_token and not _same(url_token, request.query_params.get("token")):
            raise HTTPException(401, "the token query parameter does not match this webhook's token")
        if hooks.signature is None:
            return None
        variable = secret_variable(slug, hooks.signature)
        secret = os.environ.get(variable)
        if not secret:
            raise HTTPException(503, f"{slug} webhooks are signed; set {variable} to verify them")
        return secret

    def answer(hooks: Webhooks, fields: dict[str, Any]) -> Response:
        if hooks.mode != "push" and hooks.accept_status == 204:
            return Response(status_code=204)
        return JSONResponse({"status": "accepted", **fields})

    async def queue(topic: str, payloads: Sequence[RawPayload], headers: list[tuple[str, bytes]] | None = None) -> None:
        """Publish without blocking the event loop; a webhook is accepted only once the broker acknowledged it
        (a 503 releases its replay claim, so the provider's retry is accepted; a part too large to publish is 413)."""
        try:
            await (publish(topic, payloads, headers=headers) if headers else publish(topic, payloads))
        except PayloadTooLarge as exc:
            log.warning("webhook refused with 413: %s", exc)
            raise HTTPException(413, f"the webhook body cannot be queued: {exc}") from exc
        except RetryableError as exc:
            log.warning("webhook not queued on %s (answered 503): %s", topic, exc)
            retry_after = str(math.ceil(exc.retry_after or 10))
            raise HTTPException(503, "the webhook could not be queued now; retry later",
                                headers={"Retry-After": retry_after}) from exc

    @api.post("/{provider}/webhook")
    async def receive(provider: str, request: Request) -> Response:
        found = manifest_of(provider)
        slug, hooks = found.slug, found.manifest.webhooks
        secret = authenticate(slug, hooks, request)
        store = None
        if hooks.signature is not None or hooks.replay is not None:
            store = await run_in_threadpool(seen_store, request)
        body = await read_body(request, hooks.max_body_bytes)
        headers = {k.lower(): v for k, v in request.headers.items()}
        if secret is not None:
            try:  # on the raw bytes, before anything reads them
                verify_signature(hooks.signature, secret, headers, body)
            except SignatureInvalid as exc:
                raise HTTPException(401, f"signature check failed: {exc}") from exc
        if hooks.body == "json":
            await off_loop(len(body), check_json_depth, body, max_json_depth)
        claim = seen_id = None
        if store is not None:
            seen_id = replay_id(hooks, headers, body)
            found_claim = await run_in_threadpool(store.claim, slug, seen_id, pending_s)
            if found_claim.pending:  # the first copy is still being queued: it may yet fail, so no 2xx for this one
                log.info("%s webhook %s arrived while its first copy is being queued: answered 503", slug, seen_id)
                raise HTTPException(503, "this notification is being queued by an earlier request; retry later",
                                    headers={"Retry-After": str(math.ceil(found_claim.retry_after_s))})
            if found_claim.replay:
                log.info("%s webhook %s already accepted: acknowledged, not published again", slug, seen_id)
                return answer(hooks, {"duplicate": True})
            claim = found_claim.token
        claim_headers = [(CLAIM_HEADER, seen_id.encode())] if claim and released_after_fetch(hooks, seen_id) else None
        try:
            response = await _accept(slug, found, hooks, body, request, claim_headers)
        except BaseException:
            if claim is not None:
                await _settle(store.release, slug, seen_id, claim)
            raise
        if claim is not None:
            await _settle(store.accept, slug, seen_id, claim, replay_window_s(hooks))
        return response

    async def _settle(action: Callable[..., None], *args: Any) -> None:
        """Accept or release a claim, even when the request is being cancelled (shielded). If the store fails, the
        claim stays pending and counts as abandoned after ``pending_s``: a retry is then accepted (at least once)."""
        with anyio.CancelScope(shield=True):
            try:
                await run_in_threadpool(action, *args)
            except Exception:  # logged; the claim lapses on its own
                log.exception("webhook replay claim not updated (%s); it lapses after %gs", action.__name__,
                              pending_s)

    async def off_loop(size: int, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` on the threadpool when the body is larger than ``INLINE_PARSE_BYTES`` (a 20 MiB Garmin push
        takes over a second to scan and split: the event loop keeps answering meanwhile), inline otherwise."""
        if size <= INLINE_PARSE_BYTES:
            return work(*args)
        return await run_in_threadpool(work, *args)

    async def _accept(slug: str, found: Any, hooks: Webhooks, body: bytes, request: Request,
                      claim_headers: list[tuple[str, bytes]] | None = None) -> Response:
        if hooks.mode == "push":
            user_field = found.user_field or "userId"
            actions = lifecycle_keys(slug)
            lifecycle, payloads, pings = await off_loop(len(body), split_push, slug, body, actions,
                                                        hooks.callback_field, user_field)
            applied = None
            if lifecycle:
                plane = control_plane or getattr(request.app.state, "control_plane", None)
                if plane is None:
                    raise HTTPException(503, f"{slug} lifecycle notifications ({', '.join(lifecycle)}) need "
                                             "the control plane; none is configured here")
                applied = await run_in_threadpool(apply_lifecycle, plane, slug, actions, lifecycle, user_field)
            if payloads:
                await queue(raw_topic, payloads)
            queued = queue_pings(slug, pings, user_field)
            if queued:
                await queue(notifications_topic, queued)
            fields: dict[str, Any] = {"raw_events": len(payloads)}
            if applied is not None:
                fields["lifecycle"] = applied
            if pings:
                fields["pings"] = sum(len(entries) for entries in pings.values())
            return answer(hooks, fields)
        notes, deleted = split_deletions(split_notifications(slug, body, hooks), hooks)
        if deleted:  # nothing to fetch: the object is gone; the pipeline maps them to tombstones
            await queue(raw_topic, deleted)
        if notes:
            await queue(notifications_topic, notes, claim_headers)
        return answer(hooks, {"deletions": len(deleted)} if deleted else {})

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
