"""Webhook sink: one signed HTTP(S) POST per event, Terra- and Standard-Webhooks-compatible.

Guarantees:
- At least once. ``webhook-id`` = ``X-Terra-Trace-Id`` = ``event_id``, identical on every retry: receivers dedupe on it.
- A tombstone (the provider deleted the record) is POSTed like data: its body is ``{type, user, deleted: [key],
  version}`` and it carries ``X-Healthflow-Deleted: true`` (absent on data events).
- The POSTed bytes are exactly ``event.body()``; both signatures cover those raw bytes. Each request carries the
  headers ``requests`` sent before: ``user-agent: healthflow-webhooks/1``, ``Accept-Encoding``, ``Accept``,
  ``Connection: keep-alive``, the delivery headers of ``headers_for``, ``Content-Length``, and (when the URL or
  ``~/.netrc`` has credentials, or the endpoint set cookies) ``Authorization`` and ``Cookie``. Proxies
  (``HTTP(S)_PROXY``, ``NO_PROXY``) and the CA bundle (certifi, or ``REQUESTS_CA_BUNDLE``) are resolved as
  ``requests`` resolves them, once per ``open()``.
- Connections: up to ``lanes`` keep-alive ``http.client`` connections, reused across events and batches (replaced when
  the server closed one while idle); redirects are never followed; ``timeout_s`` bounds connecting and each wait for
  the server; at most 64 KiB of a 2xx body and 500 bytes of any other body are read (a connection with more left
  unread is closed, not reused).
- Per-user order: a user's events are sent one after another in the given order, each only after the previous one was
  answered; once an event of a user fails, that user's later events in the batch are not sent and are reported
  ``RetryableError("blocked behind earlier failure ...")``.
- Concurrency: different users' events go out at the same time on up to ``lanes`` connections (default 8), each lane
  taking the earliest event whose user has nothing in flight. A batch starts with one request at a time until one is
  delivered, so an endpoint that is down, gone or throttling sees one request per batch. ``lanes=1`` sends the batch
  one event at a time in the given order.
- Endpoint-level failures stop the batch: once one is answered nothing more is sent (requests already in flight on
  other lanes complete and are reported as answered): 410 (``EndpointGone``, dead-lettered), 429 (retryable, same
  ``retry_after`` for all) and connection errors (retryable). Events not reached when the batch stops (including
  those a failure of their user would have held back) get the batch-wide error of the first such failure.
- Every event is reported exactly once, delivered or failed, both lists in the given order. An unexpected exception
  in any lane stops the batch too and is raised by ``write`` once the other lanes are idle (as before: the caller
  fails the whole batch with it).
- Classification: 2xx delivered; 408, 429, 5xx, timeouts, connection errors -> ``RetryableError`` (``retry_after``
  from ``Retry-After`` seconds or HTTP-date); 410 -> ``EndpointGone``; 3xx (never followed) and other 4xx ->
  ``PermanentError`` with the status and the first 500 bytes of the response body; a body over ``max_body_bytes`` ->
  ``PermanentError`` without sending, or sent by reference when ``large_payload_s3`` is configured.
- Pickling carries configuration only: no connection, thread or resolved secret (``open()`` makes them where it runs).

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
import contextlib
import hashlib
import heapq
import hmac
import http.client
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any
from urllib.parse import urlparse, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import MockRequest, MockResponse, get_cookie_header
from requests.utils import DEFAULT_CA_BUNDLE_PATH, check_header_validity, prepend_scheme_if_needed, select_proxy
from urllib3 import HTTPHeaderDict, HTTPResponse
from urllib3.exceptions import HTTPError
from urllib3.util.ssl_ import create_urllib3_context
from urllib3.util.wait import wait_for_read

from core.errors import EndpointGone, FatalError, PermanentError, RetryableError, parse_retry_after
from core.events import NormalizedEvent
from core.secrets import missing, redact, resolve
from sinks.base import Sink, SinkResult
from sinks.large_payloads import LargePayloadS3, PayloadStore

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # Standard Webhooks: random, >= 192 bits
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024  # Terra's chunk cap; larger bodies are dead-lettered, not sent
ERROR_BODY_PREFIX_BYTES = 500
DEFAULT_LANES = 8
MAX_LANES = 64
DELETED_HEADER = "X-Healthflow-Deleted"  # "true" on a tombstone
USER_AGENT = "healthflow-webhooks/1"
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


class _Crash:
    """Internal: an unclassified exception raised while sending one event; ``write`` raises it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Unreachable(Exception):
    """Internal: connecting, sending or reading the response head failed (what requests called ConnectionError)."""


class _TimedOut(Exception):
    """Internal: no response within the timeout (what requests called ReadTimeout)."""


class _Transport:
    """Keep-alive ``http.client`` connections to one URL, set up once the way a ``requests.Session`` sent to it.

    ``requests`` decides here, once, what it decided on every call: the request target, proxy, TLS trust and default
    headers (plus credentials from the URL or netrc); ``cookies`` keeps what the endpoint sets, as the Session's jar
    did. Up to ``connections`` idle connections are kept; one the server closed while idle is replaced before use.
    Only ``http://`` proxies are supported (plain requests through them, ``https`` URLs through a CONNECT tunnel).
    """

    def __init__(self, url: str, timeout_s: float, connections: int) -> None:
        with requests.Session() as session:
            session.headers["user-agent"] = USER_AGENT
            self.template = session.prepare_request(requests.Request("POST", url))
            settings = session.merge_environment_settings(self.template.url, {}, None, None, None)
        self.cookies = session.cookies
        self._cookies_lock = threading.Lock()
        self._cookies_set = False  # until the endpoint sets one the jar is empty: no Cookie header
        parts = urlsplit(self.template.url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "", parts.port or (443 if self.https else 80)
        proxy = select_proxy(self.template.url, settings["proxies"])
        adapter = HTTPAdapter()
        try:
            self.target = adapter.request_url(self.template, settings["proxies"])
            self.proxy_headers = adapter.proxy_headers(proxy) if proxy else {}
        finally:
            adapter.close()
        self.proxy: tuple[str, int] | None = None
        if proxy:
            proxy_parts = urlsplit(prepend_scheme_if_needed(proxy, "http"))
            if proxy_parts.scheme != "http" or not proxy_parts.hostname:
                raise FatalError(f"proxy {proxy_parts.scheme}://{proxy_parts.hostname} (from the environment) is not "
                                 "supported; use an http:// proxy, or NO_PROXY to reach the endpoint directly")
            self.proxy = (proxy_parts.hostname, proxy_parts.port or 80)
        self.context = _tls_context(settings["verify"]) if self.https else None
        headers = dict(self.template.headers)  # the Session's defaults, then Authorization (URL or netrc)
        headers.pop("Content-Length", None)  # of the template's empty body
        authorization = headers.pop("Authorization", None)
        self.leading = headers
        self.trailing = {"Authorization": authorization} if authorization else {}
        if self.proxy and not self.https:
            self.trailing.update(self.proxy_headers)
        self.timeout_s = timeout_s
        self._idle: list[http.client.HTTPConnection] = []
        self._idle_lock = threading.Lock()
        self._max_idle = connections

    def post(self, body: bytes, event_headers: dict[str, str]
             ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one POST and read the response head; ``release`` the pair once its body is read (or not)."""
        headers = {**self.leading, **event_headers}
        if self._cookies_set:
            with self._cookies_lock:
                cookie = get_cookie_header(self.cookies, self.template)
            if cookie is not None:
                headers["Cookie"] = cookie
        headers["Content-Length"] = str(len(body))
        headers.update(self.trailing)
        connection = self._idle_connection() or self._connect()
        try:
            connection.request("POST", self.target, body, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may have answered before closing (as urllib3 does): read the response
        except OSError as exc:  # including a timeout while sending
            connection.close()
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:  # a header that cannot be encoded, ...: the connection is in no state to reuse
            connection.close()
            raise
        try:
            return connection, connection.getresponse()
        except TimeoutError as exc:
            connection.close()
            raise _TimedOut(str(exc)) from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            connection.close()
            raise

    def keep_cookies(self, response: http.client.HTTPResponse) -> None:
        """Store the cookies ``response`` sets, to send them back on later requests."""
        if response.msg.get_all("set-cookie"):
            with self._cookies_lock:
                self.cookies.extract_cookies(MockResponse(response.msg), MockRequest(self.template))
                self._cookies_set = True

    def release(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep ``connection`` for the next request when ``response`` was read to its end, else close it."""
        if not response.isclosed():
            response.close()
            connection.close()
        if connection.sock is None:
            return
        with self._idle_lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _idle_connection(self) -> http.client.HTTPConnection | None:
        while True:
            with self._idle_lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()
            if connection.sock is not None and not wait_for_read(connection.sock, timeout=0.0):
                return connection
            connection.close()  # readable while idle: the server closed it (or sent what nobody asked for)

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self.proxy or (self.host, self.port)
        connection: http.client.HTTPConnection
        if self.https:
            connection = http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self.context)
            if self.proxy:
                connection.set_tunnel(self.host, self.port, self.proxy_headers)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        try:
            connection.connect()
        except OSError as exc:  # refused, unresolvable, connect timeout, TLS handshake, proxy refusal
            connection.close()
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
        return connection


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """The TLS settings of ``requests``: urllib3's defaults, certifi's CA bundle unless ``verify`` names another."""
    context = create_urllib3_context()
    context.set_alpn_protocols(["http/1.1"])
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    location = DEFAULT_CA_BUNDLE_PATH if verify is True else verify
    if not os.path.exists(location):
        raise OSError(f"Could not find a suitable TLS CA certificate bundle, invalid path: {location}")
    if os.path.isdir(location):
        context.load_verify_locations(capath=location)
    else:
        context.load_verify_locations(cafile=location)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def _header(response: http.client.HTTPResponse, name: str) -> str | None:
    """A response header's values joined by ", " (as requests and urllib3 read them), or None."""
    values = response.msg.get_all(name)
    return ", ".join(values) if values else None


def _decoded_prefix(response: http.client.HTTPResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body, decoded per its Content-Encoding the way requests decoded it."""
    decoded = HTTPResponse(body=response, headers=HTTPHeaderDict(response.msg.items()), status=response.status,
                           preload_content=False, decode_content=True, original_response=response)
    return decoded.read(limit)


class WebhookSink(Sink):
    """POSTs each event's ``body()`` to ``url`` with Terra and Standard Webhooks headers (see module docstring)."""

    ordered = True

    def __init__(self, name: str, url: str, signing_secret: str, timeout_s: float = 10.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, large_payload_s3: LargePayloadS3 | None = None,
                 lanes: int = DEFAULT_LANES) -> None:
        super().__init__(name)
        known = resolve(url, f"webhook sink {name!r} url") if url and not missing(url) else url  # ${VAR}: checked
        parsed = urlparse(known or "")  # here, kept as references (open() resolves them where it runs)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise FatalError(f"webhook sink {name!r}: url must be an absolute http(s) URL, got {redact(url)!r}")
        try:
            requests.Request("POST", known).prepare()
        except requests.RequestException as exc:
            raise FatalError(f"webhook sink {name!r}: url {redact(url)!r} cannot be requested: {exc}") from None
        self.signing_secret = signing_secret  # a ${VAR} reference stays one: resolved on the worker, in open()
        if not missing(signing_secret):
            decode_secret(resolve(signing_secret))  # a malformed secret fails at start
        self._key: bytes | None = None
        self._terra_key: str | None = None
        if timeout_s <= 0:
            raise FatalError(f"webhook sink {name!r}: timeout_s must be > 0, got {timeout_s}")
        if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= MAX_LANES:
            raise FatalError(f"webhook sink {name!r}: lanes must be a whole number from 1 to {MAX_LANES}, "
                             f"got {lanes!r}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.lanes = lanes
        # Bodies over max_body_bytes go by reference (Terra's ping mode) when a bucket is configured.
        self._payloads = PayloadStore(large_payload_s3, "webhook-payloads") if large_payload_s3 else None
        self._transport: _Transport | None = None
        self._threads: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_transport"] = state["_threads"] = None  # connections and threads never travel with the config
        state["_key"] = state["_terra_key"] = None  # nor do secrets: open() resolves them where it runs
        return state

    def open(self) -> None:
        if self._key is None:
            secret = resolve(self.signing_secret, f"webhook destination {self.name!r} secret")
            self._key, self._terra_key = decode_secret(secret), terra_signing_key(secret)
        if self._transport is None:
            try:
                url = resolve(self.url, f"webhook destination {self.name!r} url")
                self._transport = _Transport(url, self.timeout_s, self.lanes)
            except FatalError as exc:
                raise FatalError(f"webhook sink {self.name!r}: {exc}") from None
        if self._payloads is not None:
            self._payloads.open()  # here, not lazily in a lane: lanes would race to create the client
        if self._threads is None and self.lanes > 1:
            self._threads = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix=f"webhook-{self.name}")

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._payloads is not None:
            self._payloads.close()

    def headers_for(self, event: NormalizedEvent, body: bytes, timestamp: int) -> dict[str, str]:
        """The delivery headers of one attempt of ``event`` signed at unix second ``timestamp``."""
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
            **({DELETED_HEADER: "true"} if event.deleted else {}),
        }

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        self.open()
        return _Batch(self, events).run()

    def _attempt(self, event: NormalizedEvent) -> BaseException | _HaltBatch | _Crash | None:
        """Send ``event`` once: None when delivered, else its classified error (never raises)."""
        try:
            self._send(event)
        except (_HaltBatch, RetryableError, PermanentError) as exc:
            return exc
        except BaseException as exc:  # handed to write(), which raises it once the other lanes are idle
            return _Crash(exc)
        return None

    def _send(self, event: NormalizedEvent) -> None:
        """One attempt; returns on 2xx, raises the classified error otherwise."""
        transport = self._transport
        assert transport is not None
        body = event.body()
        if len(body) > self.max_body_bytes:
            if self._payloads is None:
                raise PermanentError(f"body of {len(body)} bytes exceeds max_body_bytes={self.max_body_bytes}; "
                                     "configure large_payload_s3 to send it by reference")
            body = self._payloads.pointer(event)
        headers = self.headers_for(event, body, int(time.time()))
        try:  # the values taken from the event, checked as requests checked them
            check_header_validity(("webhook-id", event.event_id))
            if event.reference:
                check_header_validity(("terra-reference", event.reference))
        except requests.RequestException as exc:
            raise RetryableError(f"request to {self.url} failed: {exc}") from exc
        try:
            connection, response = transport.post(body, headers)
        except _Unreachable as exc:
            raise self._unreachable(exc) from exc
        except _TimedOut as exc:
            raise RetryableError(f"timed out after {self.timeout_s}s waiting for {self.url}: {exc}") from exc
        try:
            transport.keep_cookies(response)
            status = response.status
            if 200 <= status < 300:
                with contextlib.suppress(http.client.HTTPException, OSError):
                    response.read(_DRAIN_LIMIT_BYTES)  # read to its end, the connection is reused
                return
            try:
                prefix = _decoded_prefix(response, ERROR_BODY_PREFIX_BYTES)
            except (http.client.HTTPException, HTTPError, OSError):
                prefix = b""
            detail = f"HTTP {status} from {self.url}: {prefix.decode('utf-8', 'replace')!r}"
            retry_after = parse_retry_after(_header(response, "retry-after"))
            location = _header(response, "location")
        finally:
            transport.release(connection, response)
        if status == 410:
            raise _HaltBatch(EndpointGone(f"endpoint gone: {detail}"),
                             EndpointGone(f"not sent: endpoint gone (410) earlier in this batch: {self.url}"))
        if status == 429:
            raise _HaltBatch(RetryableError(f"throttled: {detail}", retry_after),
                             RetryableError(f"not sent: {self.url} throttled (429) earlier in this batch", retry_after))
        if status >= 500 or status in _RETRYABLE_STATUSES:
            raise RetryableError(detail, retry_after)
        if 300 <= status < 400:
            raise PermanentError(f"redirect not followed ({location!r}): {detail}")
        raise PermanentError(detail)

    def _unreachable(self, exc: _Unreachable) -> _HaltBatch:
        return _HaltBatch(RetryableError(f"cannot reach {self.url}: {exc}"),
                          RetryableError(f"not sent: {self.url} unreachable earlier in this batch"))


_PENDING = object()  # an outcome not known yet
_DELIVERED = object()


class _Batch:
    """One ``write``: hands the batch's events to lanes in per-user order and collects one outcome per event.

    Shared state is guarded by ``_changed``'s lock. Each user has at most one event in ``_ready`` (a heap of batch
    indices), the earliest of that user not yet taken; the user's later ones wait in ``_queued``. A lane takes the
    smallest ready index while fewer than ``_limit`` requests are in flight; when the event is answered, the user's
    next event becomes ready. ``_limit`` is 1 until an event is delivered, then the number of lanes.
    """

    def __init__(self, sink: WebhookSink, events: Sequence[NormalizedEvent]) -> None:
        self._sink = sink
        self._events = events
        self._outcomes: list[object] = [_PENDING] * len(events)
        self._queued: dict[str, deque[int]] = {}
        for index, event in enumerate(events):
            self._queued.setdefault(event.user_id, deque()).append(index)
        self._ready = [queue.popleft() for queue in self._queued.values()]  # ascending: already a heap
        self._failed: dict[str, tuple[str, Exception]] = {}
        self._lanes = max(1, min(sink.lanes, len(self._queued)))  # no more lanes than users
        self._limit = 1
        self._in_flight = 0
        self._halt: _HaltBatch | None = None
        self._crash: BaseException | None = None
        self._changed = threading.Condition(threading.Lock())

    def run(self) -> SinkResult:
        threads = self._sink._threads
        helpers = [threads.submit(self._lane) for _ in range(self._lanes - 1)] if threads is not None else []
        try:
            self._lane()
        finally:
            wait_all(helpers)
        for helper in helpers:
            helper.result()  # a fault of the scheduler itself
        if self._crash is not None:
            raise self._crash
        result = SinkResult()
        for event, outcome in zip(self._events, self._outcomes, strict=True):
            if outcome is _DELIVERED:
                result.delivered.append(event.event_id)
            elif outcome is _PENDING:  # never taken: the endpoint failed first
                assert self._halt is not None
                result.fail_all([event], self._halt.rest)
            else:
                assert isinstance(outcome, BaseException)
                result.fail_all([event], outcome)
        return result

    def _lane(self) -> None:
        """Send events until none is left to send (or the batch stops); the calling thread is one lane."""
        try:
            index = self._next(None, None)
            while index is not None:
                outcome = self._sink._attempt(self._events[index])
                index = self._next(index, outcome)
        except BaseException as exc:  # this thread is interrupted: stop the others too
            with self._changed:
                self._crash = self._crash or exc
                self._changed.notify_all()
            raise

    def _next(self, done: int | None, outcome: BaseException | _HaltBatch | _Crash | None) -> int | None:
        """Record the outcome of event ``done`` (if any), then take the next event to send, or None when the batch
        is finished or stopped. Events behind an earlier failure of their user are marked blocked on the way."""
        with self._changed:
            if done is not None:
                self._settle(done, outcome)
            while self._halt is None and self._crash is None:
                if self._ready and self._in_flight < self._limit:
                    index = heapq.heappop(self._ready)
                    event = self._events[index]
                    blocker = self._failed.get(event.user_id)
                    if blocker is None:
                        self._in_flight += 1
                        if self._ready and self._in_flight < self._limit:
                            self._changed.notify()  # more to send: wake one idle lane (it wakes the next)
                        return index
                    blocked_id, cause = blocker
                    retry_after = cause.retry_after if isinstance(cause, RetryableError) else None
                    self._outcomes[index] = RetryableError(
                        f"blocked behind earlier failure of {blocked_id} for user {event.user_id}: {cause}",
                        retry_after)
                    self._release_next(event.user_id)
                elif not self._ready and not self._in_flight:
                    break
                else:
                    self._changed.wait()
            self._changed.notify_all()  # finished or stopped: every idle lane returns
            return None

    def _settle(self, index: int, outcome: BaseException | _HaltBatch | _Crash | None) -> None:
        event = self._events[index]
        self._in_flight -= 1
        if outcome is None:
            self._outcomes[index] = _DELIVERED
            self._limit = self._lanes
            self._release_next(event.user_id)
        elif isinstance(outcome, _HaltBatch):
            self._outcomes[index] = outcome.error
            self._halt = self._halt or outcome
        elif isinstance(outcome, _Crash):
            self._crash = self._crash or outcome.exc
        else:
            assert isinstance(outcome, RetryableError | PermanentError)
            self._outcomes[index] = outcome
            self._failed[event.user_id] = (event.event_id, outcome)
            self._release_next(event.user_id)

    def _release_next(self, user_id: str) -> None:
        queue = self._queued[user_id]
        if queue:
            heapq.heappush(self._ready, queue.popleft())
