"""Webhook sink: one signed HTTPS POST per event, Terra- and Standard-Webhooks-compatible.

Guarantees:
- At least once. ``webhook-id`` = ``X-Terra-Trace-Id`` = ``event_id``, identical on every retry: receivers dedupe on it.
- The POSTed bytes are exactly ``event.body()``; both signatures cover those raw bytes.
- Per-user order: events are sent one at a time in the given order; once an event of a user fails, that user's later
  events in the batch are not sent and are reported ``RetryableError("blocked behind earlier failure ...")``.
- Endpoint-level failures stop the whole batch (nothing more is sent): 410 (``EndpointGone``, dead-lettered),
  429 (retryable, same ``retry_after`` for all) and connection errors (retryable).
- Classification: 2xx delivered; 408, 429, 5xx, timeouts, connection errors -> ``RetryableError`` (``retry_after``
  from ``Retry-After`` seconds or HTTP-date); 410 -> ``EndpointGone``; 3xx (never followed) and other 4xx ->
  ``PermanentError`` with the status and the first 500 bytes of the response body; a body over ``max_body_bytes`` ->
  ``PermanentError`` without sending.

Signatures, from one Standard Webhooks secret ``whsec_<base64 of the key bytes>``:
- ``webhook-signature: v1,<base64 HMAC-SHA256(key bytes, f"{webhook-id}.{t}." + body)>``
  (verify with ``standardwebhooks.Webhook(secret)``).
- ``terra-signature: t=<t>,v1=<hex HMAC-SHA256(terra key, f"{t}." + body)>`` where the terra key is the UTF-8 of the
  canonical secret string ``terra_signing_key(secret)`` = ``"whsec_" + standard padded base64 of the key bytes`` (the
  configured secret itself when it is already padded; verify with terra's ``verify_terra_webhook_signature``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import requests

from core.errors import EndpointGone, FatalError, PermanentError, RetryableError, parse_retry_after
from core.events import NormalizedEvent
from core.secrets import missing, resolve
from sinks.base import Sink, SinkResult
from sinks.large_payloads import LargePayloadS3, PayloadStore

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # Standard Webhooks: random, >= 192 bits
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024  # Terra's chunk cap; larger bodies are dead-lettered, not sent
ERROR_BODY_PREFIX_BYTES = 500
_DRAIN_LIMIT_BYTES = 64 * 1024  # read up to this much of a 2xx body so the connection can be reused
_RETRYABLE_STATUSES = frozenset({408, 429})


def decode_secret(secret: str) -> bytes:
    """Key bytes of a ``whsec_``-prefixed base64 secret (padding optional); FatalError when malformed."""
    if not secret:
        raise FatalError("webhook signing secret is missing: configure a 'whsec_<base64>' secret (>= 24 random bytes)")
    if not secret.startswith(SECRET_PREFIX):
        raise FatalError("webhook signing secret must start with 'whsec_' followed by base64 (Standard Webhooks)")
    encoded = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise FatalError(f"webhook signing secret is not valid base64 after 'whsec_': {exc}") from None
    if len(key) < MIN_SECRET_BYTES:
        raise FatalError(f"webhook signing secret decodes to {len(key)} bytes; use at least {MIN_SECRET_BYTES}")
    return key


def terra_signing_key(secret: str) -> str:
    """The string whose UTF-8 bytes key ``terra-signature``: ``whsec_`` + padded base64 of the secret's key bytes."""
    return SECRET_PREFIX + base64.b64encode(decode_secret(secret)).decode("ascii")


def standard_webhooks_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def terra_signature(terra_key: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(terra_key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class _HaltBatch(Exception):
    """Internal: the endpoint itself failed; ``error`` is reported for the rest of the batch without sending."""

    def __init__(self, error: Exception, rest: Exception) -> None:
        super().__init__(str(error))
        self.error = error
        self.rest = rest


class WebhookSink(Sink):
    """POSTs each event's ``body()`` to ``url`` with Terra and Standard Webhooks headers (see module docstring)."""

    ordered = True

    def __init__(self, name: str, url: str, signing_secret: str, timeout_s: float = 10.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, large_payload_s3: LargePayloadS3 | None = None) -> None:
        super().__init__(name)
        parsed = urlparse(url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise FatalError(f"webhook sink {name!r}: url must be an absolute http(s) URL, got {url!r}")
        self.signing_secret = signing_secret  # a ${VAR} reference stays one: resolved on the worker, in open()
        if not missing(signing_secret):
            decode_secret(resolve(signing_secret))  # a malformed secret fails at start
        self._key: bytes | None = None
        self._terra_key: str | None = None
        if timeout_s <= 0:
            raise FatalError(f"webhook sink {name!r}: timeout_s must be > 0, got {timeout_s}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        # Bodies over max_body_bytes go by reference (Terra's ping mode) when a bucket is configured.
        self._payloads = PayloadStore(large_payload_s3, "webhook-payloads") if large_payload_s3 else None
        self._session: requests.Session | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # connections never travel with the pickled config
        state["_key"] = state["_terra_key"] = None  # nor do secrets: open() resolves them where it runs
        return state

    def open(self) -> None:
        if self._key is None:
            secret = resolve(self.signing_secret, f"webhook destination {self.name!r} secret")
            self._key, self._terra_key = decode_secret(secret), terra_signing_key(secret)
        if self._session is None:
            self._session = requests.Session()
            self._session.headers["user-agent"] = "healthflow-webhooks/1"

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._payloads is not None:
            self._payloads.close()

    def headers_for(self, event: NormalizedEvent, body: bytes, timestamp: int) -> dict[str, str]:
        """All delivery headers for one attempt of ``event`` signed at unix second ``timestamp``."""
        if self._key is None or self._terra_key is None:
            self.open()
        assert self._key is not None and self._terra_key is not None
        return {
            "content-type": "application/json",
            "webhook-id": event.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": standard_webhooks_signature(self._key, event.event_id, timestamp, body),
            "terra-signature": terra_signature(self._terra_key, timestamp, body),
            "X-Terra-Trace-Id": event.event_id,
            "X-Terra-Ordering-Timestamp": str(event.ordering_timestamp_ms),
            **({"terra-reference": event.reference} if event.reference else {}),
        }

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        self.open()
        result = SinkResult()
        failed_users: dict[str, tuple[str, Exception]] = {}
        for index, event in enumerate(events):
            blocker = failed_users.get(event.user_id)
            if blocker is not None:
                blocked_id, cause = blocker
                retry_after = cause.retry_after if isinstance(cause, RetryableError) else None
                result.fail_all([event], RetryableError(
                    f"blocked behind earlier failure of {blocked_id} for user {event.user_id}: {cause}", retry_after))
                continue
            try:
                self._send(event)
            except _HaltBatch as halt:
                result.fail_all([event], halt.error)
                result.fail_all(events[index + 1:], halt.rest)
                return result
            except (RetryableError, PermanentError) as exc:
                result.fail_all([event], exc)
                failed_users[event.user_id] = (event.event_id, exc)
            else:
                result.delivered.append(event.event_id)
        return result

    def _send(self, event: NormalizedEvent) -> None:
        """One attempt; returns on 2xx, raises the classified error otherwise."""
        assert self._session is not None
        body = event.body()
        if len(body) > self.max_body_bytes:
            if self._payloads is None:
                raise PermanentError(f"body of {len(body)} bytes exceeds max_body_bytes={self.max_body_bytes}; "
                                     "configure large_payload_s3 to send it by reference")
            body = self._payloads.pointer(event)
        headers = self.headers_for(event, body, int(time.time()))
        try:
            response = self._session.post(self.url, data=body, headers=headers, timeout=self.timeout_s,
                                          allow_redirects=False, stream=True)
        except requests.ConnectionError as exc:  # includes ConnectTimeout
            error = RetryableError(f"cannot reach {self.url}: {exc}")
            raise _HaltBatch(error, RetryableError(f"not sent: {self.url} unreachable earlier in this batch")) from exc
        except requests.Timeout as exc:
            raise RetryableError(f"timed out after {self.timeout_s}s waiting for {self.url}: {exc}") from exc
        except requests.RequestException as exc:
            raise RetryableError(f"request to {self.url} failed: {exc}") from exc
        with response:
            status = response.status_code
            try:
                prefix = _read_prefix(response, _DRAIN_LIMIT_BYTES if 200 <= status < 300 else ERROR_BODY_PREFIX_BYTES)
            except (requests.RequestException, OSError):
                prefix = b""
            if 200 <= status < 300:
                return
            detail = f"HTTP {status} from {self.url}: {prefix[:ERROR_BODY_PREFIX_BYTES].decode('utf-8', 'replace')!r}"
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 410:
            raise _HaltBatch(EndpointGone(f"endpoint gone: {detail}"),
                             EndpointGone(f"not sent: endpoint gone (410) earlier in this batch: {self.url}"))
        if status == 429:
            raise _HaltBatch(RetryableError(f"throttled: {detail}", retry_after),
                             RetryableError(f"not sent: {self.url} throttled (429) earlier in this batch", retry_after))
        if status >= 500 or status in _RETRYABLE_STATUSES:
            raise RetryableError(detail, retry_after)
        if 300 <= status < 400:
            raise PermanentError(f"redirect not followed ({response.headers.get('location')!r}): {detail}")
        raise PermanentError(detail)


def _read_prefix(response: requests.Response, limit: int) -> bytes:
    """Up to ``limit`` bytes of the (decoded) body; a fully read body leaves the connection reusable."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=8192):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]
