"""Pull a provider's API for one connection and raw kind, window by window, and publish every page as a raw event.

    poller = Poller(cursors=CursorStore("sqlite:///.healthflow/state.db"),
                    publisher=KafkaPublisher(bootstrap, "healthflow.raw"),
                    limiter=RedisRateLimiter(url="redis://127.0.0.1:6379/0"))
    poller.poll(connection, "daily_sleep", lambda: control_plane.access_token(connection.user_id))

Windows: from the cursor (the end of the last fully published window, minus ``overlap`` so late-arriving data is
fetched again) or, the first time, ``now - initial_lookback``, up to now, in chunks of the endpoint's ``max_days``,
oldest first. ``date`` windows start at midnight UTC and send an inclusive end date; endpoints whose path only
has ``{start}`` get one request per day; a window with a start parameter but no end (Fitbit ``afterDate``) is one
open-ended request; endpoints without a window are one request (with pagination) per poll.

Each page is published as one ``RawPayload`` (the provider's bytes unchanged unless the provider's hook added
context; pages holding no documents are skipped) with the provider user id as ``user_id``. The cursor moves to a
window's end only after the broker acknowledged every page of that window: a crash or a failed publish re-polls the
window (at least once; the raw events' idempotency keys make the repeats recognisable downstream).

Pagination follows ``api.pagination``: ``token`` (the response field's token, until absent or repeated), ``offset``
and ``page`` (until the response's ``response_field`` — Withings ``more`` — or Fitbit's ``pagination.next`` says
there is no more, else until a short page; count-based paging only applies to endpoints whose ``params`` declare the
request parameter, i.e. Fitbit's activity list, not its date endpoints).

HTTP: every request takes tokens from the shared rate limiter first. 429 pauses the provider (or, when all its
limits are per user, the user) for ``Retry-After`` and retries the same page; 5xx, 408 and network errors are
retried with exponential backoff; all bounded by ``max_attempts``. 401 raises ``TokenRejected``; other 4xx raise
``ProviderRefused`` (a ``PermanentError`` with the ``status``). The status acted on is the provider hook's
``status(http_status, body)``: Withings answers HTTP 200 with its error code in the body, and its hook turns e.g.
``{"status": 401}`` into 401 and 601 into 429.

Callbacks (``fetch_url()``): one GET of an absolute URL a provider handed out (Garmin's ping ``callbackURL``), under
the same rate limits, retries and 401 handling, its answer published as one raw event. Only URLs on the API itself
are fetched (``api_url``: the scheme, host, port and base path of ``api.base_url``, or of the operator's
``HEALTHFLOW_<PROVIDER>_API_BASE``); any other raises ``ForeignURL`` before a request is made, so a webhook body cannot
point the user's token at another server.

Backfill (``backfill()``): the same path with its own cursor, ``LOW`` rate-limit priority, and the Kafka header
``healthflow-backfill: true`` on every raw event (the RawEvent schema and its idempotency key are unchanged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import random
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import requests

from connectors.hooks import Request, ResponseHook, default_hooks
from connectors.manifest import Endpoint, Manifest
from connectors.timeutil import format_bound
from controlplane.polling.cursors import LIVE_TRACK, CursorStore, backfill_track
from controlplane.polling.publisher import BACKFILL_HEADER, REFERENCE_HEADER, KafkaPublisher
from controlplane.polling.ratelimit import (
    LIVE,
    LOW,
    Cancelled,
    Priority,
    RateLimited,
    RateLimiter,
    buckets_for,
)
from core.errors import FatalError, HealthflowError, PermanentError, RetryableError, parse_retry_after
from core.raw import RawPayload

log = logging.getLogger(__name__)

AccessToken = Callable[[], str]


class PollTarget(Protocol):
    """What the poller needs of a connection (``controlplane.auth.Connection`` has it)."""

    user_id: str
    provider: str
    provider_user_id: str | None


@dataclass(frozen=True)
class PollConnection:
    user_id: str
    provider: str
    provider_user_id: str | None = None


class TokenRejected(HealthflowError):
    """The provider answered 401: the access token is expired or revoked. Refresh it (or mark the connection revoked
    when the refresh fails) and poll again; the cursor did not move past the failed window."""

    def __init__(self, message: str, *, provider: str, user_id: str, kind: str | None) -> None:
        super().__init__(message)
        self.provider, self.user_id, self.kind = provider, user_id, kind


class ProviderRefused(PermanentError):
    """The provider answered a 4xx other than 401 and 429 (``status``): asking again the same way cannot succeed."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ForeignURL(PermanentError):
    """A URL to fetch for a connection is not on the provider's API: never requested (it would carry the token)."""


@dataclass(frozen=True)
class PollResult:
    provider: str
    user_id: str
    kind: str
    track: str
    windows: int  # windows fully published (the cursor moved past each)
    pages: int  # pages fetched
    published: int  # raw events acknowledged by the broker
    cursor: datetime | None


@dataclass
class _Call:
    """One poll or backfill: everything its requests share."""

    connection: Any
    kind: str
    manifest: Manifest
    endpoint: Endpoint
    hook: ResponseHook
    access_token: AccessToken
    priority: Priority
    buckets: list[Any]
    pause_user: str | None


def utc_now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return moment.astimezone(UTC)


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _origin_and_path(url: str) -> tuple[str, str, int | None, str]:
    parts = urllib.parse.urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default, parts.path


def same_api(url: str, base_url: str) -> bool:
    """Whether ``url`` is on the API at ``base_url``: same scheme, host and port, no credentials, and a path below
    the base path without dot segments (also percent-encoded) that could climb out of it."""
    try:
        scheme, host, port, path = _origin_and_path(url)
        base_scheme, base_host, base_port, base_path = _origin_and_path(base_url)
        userinfo = urllib.parse.urlsplit(url).username is not None
    except ValueError:  # a malformed port
        return False
    if userinfo or not host or (scheme, host, port) != (base_scheme, base_host, base_port):
        return False
    if any(segment in (".", "..") for segment in urllib.parse.unquote(path).split("/")) or "\\" in path:
        return False
    prefix = posixpath.join(base_path.rstrip("/"), "")
    return path.startswith(prefix) or path == base_path.rstrip("/")


def windows(endpoint: Endpoint, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """``[start, end)`` cut into the endpoint's ``max_days`` chunks, oldest first (``date`` windows from midnight)."""
    window = endpoint.window
    if window is None:
        raise ValueError("endpoint has no window")
    if window.format == "date":
        start = _midnight(start)
    if start >= end:
        return []
    open_ended = ("{end}" not in endpoint.path and not window.end_param and "{start}" not in endpoint.path)
    if open_ended:
        return [(start, end)]
    step, out = timedelta(days=window.max_days), []
    while start < end:
        out.append((start, min(start + step, end)))
        start = out[-1][1]
    return out


def _field(body: Any, name: str | None) -> Any:
    """A dotted field of a response, at the top level or under Withings' ``body``."""
    if not name or not isinstance(body, dict):
        return None
    for root in (body, body.get("body")):
        value: Any = root
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _count(body: Any) -> int:
    """Items on a page: the first list at the top level (or under ``body``)."""
    if isinstance(body, list):
        return len(body)
    for root in (body, _field(body, "body")):
        if isinstance(root, dict):
            for value in root.values():
                if isinstance(value, list):
                    return len(value)
    return 0


class Poller:
    """Polls and backfills; thread-safe (share one per process; ``stop()`` cancels waits)."""

    def __init__(self, *, cursors: CursorStore, publisher: KafkaPublisher, limiter: RateLimiter,
                 manifests: Mapping[str, Manifest] | None = None, hooks: Mapping[str, ResponseHook] | None = None,
                 session_factory: Callable[[], requests.Session] = requests.Session,
                 clock: Callable[[], datetime] = utc_now, initial_lookback: timedelta = timedelta(days=7),
                 overlap: timedelta = timedelta(days=1), max_attempts: int = 6, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, max_wait_s: float = 120.0, request_timeout_s: float = 30.0,
                 max_pages: int = 10_000, burst_fraction: float = 0.2, skip_empty_pages: bool = True) -> None:
        self.cursors, self.publisher, self.limiter = cursors, publisher, limiter
        self._manifests = dict(manifests or {})
        self.hooks = dict(default_hooks() if hooks is None else hooks)
        self.session_factory, self.clock = session_factory, clock
        self.initial_lookback, self.overlap = initial_lookback, overlap
        self.max_attempts, self.backoff_s, self.max_backoff_s = max_attempts, backoff_s, max_backoff_s
        self.max_wait_s, self.request_timeout_s, self.max_pages = max_wait_s, request_timeout_s, max_pages
        self.burst_fraction, self.skip_empty_pages = burst_fraction, skip_empty_pages
        self._local = threading.local()
        self._stopping = threading.Event()

    # ------------------------------------------------------------------------------------------------ configuration
    def manifest(self, provider: str) -> Manifest:
        if provider in self._manifests:
            return self._manifests[provider]
        from connectors import get_provider

        manifest = get_provider(provider).manifest
        if manifest is None or manifest.api is None:
            raise FatalError(f"provider {provider} has no pull API in its manifest")
        return manifest

    def kinds(self, provider: str) -> list[str]:
        api = self.manifest(provider).api
        return list(api.endpoints) if api else []

    def stop(self) -> None:
        """Cancel rate-limit waits and backoffs (in-flight polls raise ``Cancelled``; cursors stay consistent)."""
        self._stopping.set()

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.session_factory()
        return session

    # ------------------------------------------------------------------------------------------------ public API
    def poll(self, connection: PollTarget, kind: str, access_token: AccessToken) -> PollResult:
        """Fetch and publish everything from the live cursor (minus ``overlap``) up to now."""
        call = self._call(connection, kind, access_token, LIVE)
        now = self.clock().astimezone(UTC).replace(microsecond=0)
        cursor = self.cursors.get(connection.user_id, kind, LIVE_TRACK)
        start = now - self.initial_lookback if cursor is None else min(cursor, now) - self.overlap
        return self._run(call, LIVE_TRACK, start, now, headers=())

    def backfill(self, connection: PollTarget, kind: str, start: datetime, end: datetime,
                 access_token: AccessToken, reference: str | None = None) -> PollResult:
        """Fetch and publish ``[start, end)`` (capped at now) at low priority, resuming a previous run of the same
        range; raw events carry the ``healthflow-backfill: true`` Kafka header and, given a request
        ``reference``, ``healthflow-reference`` (delivered as Terra's ``terra-reference``)."""
        start, end = _aware(start, "start"), _aware(end, "end")
        if start >= end:
            raise ValueError(f"backfill range is empty: {start} >= {end}")
        call = self._call(connection, kind, access_token, LOW)
        track = backfill_track(start, end)
        reached = self.cursors.get(connection.user_id, kind, track)
        end = min(end, self.clock().astimezone(UTC))
        if reached is not None and reached >= end:
            return PollResult(connection.provider, connection.user_id, kind, track, 0, 0, 0, reached)
        headers = ((BACKFILL_HEADER, b"true"), *(((REFERENCE_HEADER, reference.encode()),) if reference else ()))
        return self._run(call, track, max(start, reached) if reached else start, end, headers=headers,
                         no_window_ok=False)

    def fetch_window(self, connection: PollTarget, kind: str, start: datetime, end: datetime,
                     access_token: AccessToken, track: str) -> PollResult:
        """Fetch and publish ``[start, end)`` at live priority, as a poll would (no backfill header), recording
        progress on ``track`` only: the live cursor does not move (a provider notification naming past dates)."""
        start, end = _aware(start, "start"), _aware(end, "end")
        return self._run(self._call(connection, kind, access_token, LIVE), track, start, end, headers=())

    def fetch_item(self, connection: PollTarget, kind: str, path: str, access_token: AccessToken) -> PollResult:
        """GET one document of ``kind`` (``path`` on the provider's API, e.g. the endpoint's ``item_path`` with a
        notified id) at live priority, and publish what the provider's poll hook makes of it (``payloads`` with no
        window), as a poll page would be. No cursor is read or moved; errors as for a poll (404 raises
        ``ProviderRefused``)."""
        call = self._call(connection, kind, access_token, LIVE)
        body_bytes, body = self._http(call, "GET", path, {})
        batch = self.publisher.batch(())
        for payload in call.hook.payloads(self._request_info(call, None, None), body):
            if self.skip_empty_pages and self._empty(call, payload):
                continue
            raw = body_bytes if payload is body else json.dumps(payload, separators=(",", ":")).encode()
            batch.add(RawPayload(connection.provider, raw, kind, connection.provider_user_id,
                                 int(self.clock().timestamp() * 1000)))
        return PollResult(connection.provider, connection.user_id, kind, "item", 0, 1, batch.wait(), None)

    def api_url(self, provider: str, url: str) -> bool:
        """Whether ``url`` is on the provider's API (``same_api`` with the manifest's ``api.base_url``, or the
        ``HEALTHFLOW_<PROVIDER>_API_BASE`` override): the only URLs ``fetch_url`` requests."""
        api = self.manifest(provider).api
        bases = [str(api.base_url)] if api else []
        override = os.environ.get(f"HEALTHFLOW_{provider.upper()}_API_BASE")
        return any(same_api(url, base) for base in bases + ([override] if override else []))

    def fetch_url(self, connection: PollTarget, kind: str, url: str, access_token: AccessToken, *,
                  envelope: str | None = None) -> PollResult:
        """GET ``url`` (absolute, query included, on the provider's API: else ``ForeignURL`` and no request) with the
        connection's token at live priority, and publish the answer as one raw event of the connection's provider
        user id. ``envelope`` wraps the answer as ``{envelope: answer}`` and the raw event then has no kind (the key
        names it, as in a Garmin push body); without it the answer is published as is, of raw kind ``kind``. An
        empty answer (or one without documents) publishes nothing. Rate limits, retries, 401 (``TokenRejected``) and
        other 4xx (``ProviderRefused`` with the status, e.g. 410 for a callback already used or expired) are as for
        a poll; no cursor is read or moved, and the provider's response hook only maps statuses."""
        provider = connection.provider
        if not self.api_url(provider, url):
            parts = urllib.parse.urlsplit(url)
            raise ForeignURL(f"{provider} {kind} (user {connection.user_id}): {parts.scheme}://{parts.netloc}"
                             f"{parts.path} is not on the {provider} API; not fetched")
        parts = urllib.parse.urlsplit(url)
        call = self._call(connection, kind, access_token, LIVE, Endpoint(path=parts.path or "/"))
        body_bytes, body = self._http(call, "GET", parts.path, {}, url=url)
        payload = body if envelope is None else {envelope: body}
        raw_kind = kind if envelope is None else None
        published = 0
        if body is not None and not (self.skip_empty_pages and self._empty(call, payload, raw_kind)):
            raw = body_bytes if envelope is None else json.dumps(payload, separators=(",", ":")).encode()
            batch = self.publisher.batch(())
            batch.add(RawPayload(provider, raw, raw_kind, connection.provider_user_id,
                                 int(self.clock().timestamp() * 1000)))
            published = batch.wait()
        return PollResult(provider, connection.user_id, kind, "callback", 0, 1, published, None)

    # ------------------------------------------------------------------------------------------------ internals
    def _call(self, connection: PollTarget, kind: str, access_token: AccessToken, priority: Priority,
              endpoint: Endpoint | None = None) -> _Call:
        """What a poll's requests share; ``endpoint`` instead of the manifest's endpoint of ``kind`` (a callback)."""
        manifest = self.manifest(connection.provider)
        if manifest.api is None or (endpoint is None and kind not in manifest.api.endpoints):
            known = ", ".join(manifest.api.endpoints) if manifest.api else "none"
            raise FatalError(f"{connection.provider} has no endpoint for kind {kind!r} (endpoints: {known})")
        limits = manifest.api.rate_limits
        per_user_only = bool(limits) and all(limit.scope == "user" for limit in limits)
        return _Call(connection, kind, manifest, endpoint or manifest.api.endpoints[kind],
                     self.hooks.get(connection.provider, ResponseHook()), access_token, priority,
                     buckets_for(manifest, connection.user_id, self.burst_fraction),
                     connection.user_id if per_user_only else None)

    def _run(self, call: _Call, track: str, start: datetime, end: datetime, headers: tuple[tuple[str, bytes], ...],
             no_window_ok: bool = True) -> PollResult:
        user, kind = call.connection.user_id, call.kind
        if call.endpoint.window is None:
            if not no_window_ok:
                raise PermanentError(f"{call.manifest.provider} {kind}: the endpoint takes no time window, so it "
                                     "cannot be backfilled (it only serves recent data)")
            spans: list[tuple[datetime | None, datetime | None]] = [(None, None)]
        else:
            spans = list(windows(call.endpoint, start, end))
        done = pages = published = 0
        cursor = self.cursors.get(user, kind, track)
        for window_start, window_end in spans:
            batch = self.publisher.batch(headers)
            for body_bytes, body in self._pages(call, window_start, window_end):
                pages += 1
                request = self._request_info(call, window_start, window_end)
                for payload in call.hook.payloads(request, body):
                    raw = body_bytes if payload is body else json.dumps(payload, separators=(",", ":")).encode()
                    if self.skip_empty_pages and self._empty(call, payload):
                        continue
                    batch.add(RawPayload(call.manifest.provider, raw, kind, call.connection.provider_user_id,
                                         int(self.clock().timestamp() * 1000)))
            published += batch.wait()
            cursor = window_end or end
            self.cursors.advance(user, kind, cursor, track)
            done += 1
            log.debug("%s %s %s: window %s–%s published", call.manifest.provider, user, kind, window_start, cursor)
        return PollResult(call.manifest.provider, user, kind, track, done, pages, published, cursor)

    def _empty(self, call: _Call, payload: Any, kind: str | None = "") -> bool:
        from connectors import registry

        provider = registry().get(call.manifest.provider)
        if provider is None:
            return False
        try:
            return next(iter(provider.documents(payload, call.kind if kind == "" else kind)), None) is None
        except Exception:  # unmappable: publish it, the pipeline dead-letters it with its bytes
            return False

    def _request_info(self, call: _Call, start: datetime | None, end: datetime | None) -> Request:
        def fetch(path: str, params: Mapping[str, str] | None = None, method: str = "GET") -> Any:
            return self._http(call, method, path, dict(params or {}))[1]

        return Request(call.manifest.provider, call.kind, call.endpoint, start, end, call.connection, fetch)

    def _pages(self, call: _Call, start: datetime | None, end: datetime | None) -> Iterator[tuple[bytes, Any]]:
        endpoint, api = call.endpoint, call.manifest.api
        assert api is not None
        pagination = api.pagination
        path, params = endpoint.path, dict(endpoint.params)
        window = endpoint.window
        if window is not None and start is not None and end is not None:
            first, last = format_bound(start, window.format, False), format_bound(end, window.format, True)
            path = path.replace("{start}", first).replace("{end}", last)
            if window.start_param:
                params[window.start_param] = first
            if window.end_param:
                params[window.end_param] = last
        style = pagination.style
        if style in ("offset", "page") and not pagination.response_field and pagination.request_param not in params:
            style = "none"  # count-based paging only where the endpoint declares it (Fitbit: activities list only)
        if style != "none" and pagination.page_size_param and pagination.page_size:
            params.setdefault(pagination.page_size_param, str(pagination.page_size))
        offset = int(params.get(pagination.request_param or "", 0) or 0) if style == "offset" else 0
        page_number = int(params.get(pagination.request_param or "", 1) or 1) if style == "page" else 1
        seen_tokens: set[str] = set()
        hook_headers = call.hook.headers(self._request_info(call, start, end))
        for _ in range(self.max_pages):
            raw, body = self._http(call, endpoint.method, path, params, hook_headers)
            yield raw, body
            if style == "none" or pagination.request_param is None:
                return
            if style == "token":
                token = _field(body, pagination.response_field or pagination.request_param)
                if not token or str(token) in seen_tokens:
                    return
                seen_tokens.add(str(token))
                params[pagination.request_param] = str(token)
                continue
            count = _count(body)
            size = params.get(pagination.page_size_param or "") or pagination.page_size
            more = self._more(body, pagination, count, int(size) if size else None)
            if not more:
                return
            if style == "offset":
                advertised = _field(body, "offset")
                offset = advertised if isinstance(advertised, int) and advertised > offset else offset + count
                params[pagination.request_param] = str(offset)
            else:
                page_number += 1
                params[pagination.request_param] = str(page_number)
        raise PermanentError(f"{call.manifest.provider} {call.kind}: more than {self.max_pages} pages in one window")

    @staticmethod
    def _more(body: Any, pagination: Any, count: int, page_size: int | None) -> bool:
        if pagination.response_field:  # Withings "more"
            return bool(_field(body, pagination.response_field))
        advertised = _field(body, "pagination")
        if isinstance(advertised, dict) and "next" in advertised:  # Fitbit "pagination.next"
            return bool(advertised["next"])
        return count > 0 and page_size is not None and count >= page_size

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise Cancelled("poller stopping")

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)

    def _http(self, call: _Call, method: str, path: str, params: dict[str, str],
              extra_headers: Mapping[str, str] | None = None, url: str | None = None) -> tuple[bytes, Any]:
        """One page: rate limited, 429/5xx retried; ``(bytes, decoded JSON)``, ``(b"", None)`` for an empty body.
        ``url``: the absolute URL to request instead of ``api.base_url + path`` (``path`` is then only logged)."""
        assert call.manifest.api is not None
        provider, user = call.manifest.provider, call.connection.user_id
        url = url or str(call.manifest.api.base_url).rstrip("/") + path
        last, throttled = "no attempt", False  # the last failure, and whether it was a 429
        for attempt in range(1, self.max_attempts + 1):
            if self._stopping.is_set():
                raise Cancelled("poller stopping")
            self.limiter.acquire(call.buckets, call.priority, timeout=self.max_wait_s, cancel=self._stopping)
            headers = {"Authorization": f"Bearer {call.access_token()}", "Accept": "application/json",
                       **(extra_headers or {})}
            try:
                response = self.session.request(method, url, headers=headers, timeout=self.request_timeout_s,
                                                **({"params": params} if method == "GET" else {"data": params}))
            except requests.RequestException as exc:
                query = urllib.parse.urlsplit(url).query
                shown_exc = str(exc).replace(query, "<query>") if query else str(exc)  # a callback's token stays out
                last, throttled = f"{type(exc).__name__}: {shown_exc}", False
                if attempt < self.max_attempts:
                    self._sleep(self._backoff(attempt))
                continue
            body: Any = None
            decoded = False
            if response.status_code < 400 and response.content.strip():
                with contextlib.suppress(ValueError):  # not JSON: a PermanentError below unless the status says so
                    body, decoded = response.json(), True
            status = call.hook.status(response.status_code, body)
            where = f"{provider} {method} {path} (user {user}, kind {call.kind})"
            shown = f"HTTP {status}" if status == response.status_code else \
                f"HTTP {response.status_code} taken as {status}"
            if status == 429:
                wait = parse_retry_after(response.headers.get("Retry-After"))
                wait = self._backoff(attempt) if wait is None else wait
                self.limiter.pause(provider, wait, user=call.pause_user)
                last, throttled = f"{shown}, Retry-After {response.headers.get('Retry-After')!r}", True
                log.info("%s: 429, paused %s for %.1fs", where, provider if call.pause_user is None else user, wait)
                continue  # the next acquire waits the pause out, for every worker
            if status == 401:
                raise TokenRejected(f"{where}: {shown}, the provider rejected the access token; refresh it (or mark "
                                    f"the connection revoked if the refresh fails): {response.text[:200]}",
                                    provider=provider, user_id=user, kind=call.kind)
            if status >= 500 or status == 408:
                last, throttled = f"{shown}: {response.text[:200]}", False
                if attempt < self.max_attempts:
                    self._sleep(self._backoff(attempt))
                continue
            if status >= 400:
                raise ProviderRefused(f"{where}: {shown}: {response.text[:300]}", status=status)
            if not response.content.strip():
                return b"", None
            if not decoded:
                raise PermanentError(f"{where}: {shown} answer is not JSON: {response.text[:200]!r}")
            return response.content, body
        if throttled:
            raise RateLimited(f"{provider} {path}: still rate limited after {self.max_attempts} attempts ({last})",
                              retry_after=self.limiter.paused_for(provider, call.pause_user) or None)
        raise RetryableError(f"{provider} {path}: gave up after {self.max_attempts} attempts; last: {last}")
