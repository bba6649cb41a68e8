"""A fake provider *data* API on loopback (real HTTP, ``http.server`` in a thread), played from a provider manifest.

    with FakeProviderApi("oura", page_size=3) as api:
        api.add("daily_readiness", docs)           # documents dated by day / start / timestamp / dateTime
        manifest = api.manifest                    # the provider's manifest with base_url = this server
        api.throttle(1, retry_after="1")           # the next data request answers 429 + Retry-After
        api.fail(2)                                # the next two requests answer 500

Endpoints come from the manifest's ``api.endpoints``: the window is read from the path placeholders or the query
(or form, for POST) parameters in the endpoint's format (``date`` windows are inclusive of both days, ``datetime``
and ``unix`` windows are ``[start, end)``). Pagination follows ``api.pagination``:

- ``token`` (Oura: ``next_token``; WHOOP: ``nextToken`` in, ``next_token`` out, ``limit`` ≤ ``max_page_size``
  (default: the manifest's page size) else 400): ``{<list key>: [...], <response_field>: token | null}``; a token
  from another window answers 400.
- ``offset`` with a ``response_field`` (Withings ``more``): ``{"status": 0, "body": {<list>: [...], "more": bool,
  "offset": next}}``; without one (Fitbit): ``{<list>: [...], "pagination": {"next": url | "", ...}}``.
- ``page``: ``{<list>: [...], "has_more": bool}``.

The list key is ``list_key``, else the provider's envelope when it is a response field (``data``, ``records``), else
the kind (Fitbit ``activities``).
``respond(kind, fn)`` replaces the document logic of a kind (``fn(window_start, window_end, params) -> JSON``), and
``route(path, fn)`` serves any other path (``fn(params) -> JSON``), both still behind auth, rate limit and failures.
An endpoint's ``item_path`` (``/v2/usercollection/sleep/{id}``) serves the document of that kind with that ``id``
(404 when there is none).

Every request needs ``Authorization: Bearer <token>`` with a token of ``tokens`` that has not expired (else 401).
``rate_limit=(n, seconds)`` answers 429 with ``Retry-After`` (whole seconds, or an HTTP-date with
``retry_after_format="http-date"``) once ``n`` requests were served in the last ``seconds`` (sliding window).
``requests`` records every request (``Logged``), ``served()`` the ones answered 200.
"""

from __future__ import annotations

import base64
import collections
import copy
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from connectors import registry
from connectors.manifest import Endpoint, Manifest
from controlplane.polling.ratelimit import http_date
from pipelines.embedded import LoopbackService, dispatching_handler

DATE_FIELDS = ("day", "start", "timestamp", "dateTime", "date", "startTime", "startDate", "created_at")


@dataclass(frozen=True)
class Logged:
    at: float  # time.time()
    method: str
    path: str
    params: dict[str, str]
    status: int
    token: str | None
    kind: str | None
    reply: bytes = b""  # the response body, as sent


@dataclass
class FakeProviderApi(LoopbackService):
    provider: str | Manifest
    tokens: Iterable[str] = ("token-1",)
    page_size: int = 10  # when the request names no page size
    max_page_size: int | None = None
    rate_limit: tuple[int, float] | None = None
    retry_after_format: str = "seconds"  # or "http-date"
    list_key: str | None = None  # the list field of a page; default: the provider's envelope, else the kind
    documents: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    token_validator: Callable[[str], bool] | None = None  # e.g. FakeProvider.is_live: the OAuth server's tokens

    def __post_init__(self) -> None:
        self._manifest = (registry()[self.provider].manifest if isinstance(self.provider, str) else self.provider)
        assert self._manifest.api is not None, f"{self._manifest.provider} has no pull API"
        self.slug = self._manifest.provider
        if self.list_key is None:  # Oura "data", WHOOP "records"; Fitbit's "pages" is healthflow's, not Fitbit's
            envelope = registry()[self.slug].envelope
            self.list_key = envelope if envelope in ("data", "records") else None
        pagination = self._manifest.api.pagination
        if self.max_page_size is None:
            self.max_page_size = pagination.page_size
        self._tokens: dict[str, float | None] = dict.fromkeys(self.tokens)
        self.requests: list[Logged] = []
        self._served_times: collections.deque[float] = collections.deque()
        self._throttle: list[str] = []
        self._failures: list[int] = []
        self._responders: dict[str, Callable[..., Any]] = {}
        self._routes: dict[str, Callable[[dict[str, str]], Any]] = {}
        self._patterns = [(kind, ep, _path_pattern(ep.path)) for kind, ep in self._manifest.api.endpoints.items()]
        self._items = [(kind, ep, re.compile(re.escape(ep.item_path).replace(r"\{id\}", r"(?P<id>[^/]+)")))
                       for kind, ep in self._manifest.api.endpoints.items() if ep.item_path]
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ lifecycle
    def handler(self) -> type[BaseHTTPRequestHandler]:
        return dispatching_handler(self._handle)

    @property
    def service_name(self) -> str:
        return f"fake-{self.slug}-api"

    @property
    def manifest(self) -> Manifest:
        """The provider's manifest pointing at this server (rate limits as given, or ``rate_limits``)."""
        assert self._manifest.api is not None
        return self._manifest.model_copy(update={"api": self._manifest.api.model_copy(
            update={"base_url": self.base_url})})

    def manifest_with(self, **api_fields: Any) -> Manifest:
        """``manifest`` with other ``api`` fields (e.g. ``rate_limits=[RateLimit(...)]``)."""
        manifest = self.manifest
        assert manifest.api is not None
        return manifest.model_copy(update={"api": manifest.api.model_copy(update=api_fields)})

    # ------------------------------------------------------------------------------------------------ controls
    def add(self, kind: str, docs: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            self.documents.setdefault(kind, []).extend(docs)

    def respond(self, kind: str, fn: Callable[[datetime | None, datetime | None, dict[str, str]], Any]) -> None:
        self._responders[kind] = fn

    def route(self, path: str, fn: Callable[[dict[str, str]], Any]) -> None:
        self._routes[path] = fn

    def throttle(self, count: int = 1, retry_after: str | None = "1") -> None:
        """The next ``count`` requests answer 429 with this ``Retry-After`` header (``None``: no header)."""
        with self._lock:
            self._throttle.extend([retry_after or ""] * count)

    def fail(self, count: int = 1, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    def add_token(self, token: str, expires_in_s: float | None = None) -> None:
        with self._lock:
            self._tokens[token] = None if expires_in_s is None else time.time() + expires_in_s

    def expire_token(self, token: str) -> None:
        with self._lock:
            self._tokens[token] = 0.0

    def served(self, kind: str | None = None) -> list[Logged]:
        with self._lock:
            return [r for r in self.requests if r.status == 200 and (kind is None or r.kind == kind)]

    def max_in_window(self, seconds: float) -> int:
        """The most requests that reached the server within any ``seconds`` window."""
        with self._lock:
            times = sorted(r.at for r in self.requests)
        best, first = 0, 0
        for last, at in enumerate(times):
            while at - times[first] >= seconds:
                first += 1
            best = max(best, last - first + 1)
        return best

    # ------------------------------------------------------------------------------------------------ HTTP
    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        arrived = time.time()
        parts = urlsplit(request.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if method == "POST" and body:
            params.update({k: v[-1] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()})
        auth = request.headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else None
        kind, endpoint, match = self._endpoint(parts.path, method, params)
        status, headers, reply = self._answer(parts.path, params, token, kind, endpoint, match)
        data = json.dumps(reply).encode()
        with self._lock:
            self.requests.append(Logged(arrived, method, parts.path, params, status, token, kind, data))
        request.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def _endpoint(self, path: str, method: str,
                  params: dict[str, str]) -> tuple[str | None, Endpoint | None, dict[str, str]]:
        """The endpoint of a request: path and method, and its ``action`` (Withings serves several per path)."""
        for kind, endpoint, pattern in self._patterns:
            match = pattern.fullmatch(path)
            action = endpoint.params.get("action")
            if match and endpoint.method == method and (action is None or params.get("action") == action):
                return kind, endpoint, {k: v for k, v in match.groupdict().items() if v is not None}
        for kind, endpoint, pattern in self._items:
            if method == "GET" and (match := pattern.fullmatch(path)):
                return kind, endpoint, {"id": match["id"]}
        return None, None, {}

    def _answer(self, path: str, params: dict[str, str], token: str | None, kind: str | None,
                endpoint: Endpoint | None, match: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        with self._lock:
            now = time.time()
            expires = self._tokens.get(token or "", 0.0) if token in self._tokens else 0.0
            if self.token_validator is not None:
                expires = None if self.token_validator(token or "") else 0.0
            if expires is not None and expires <= now:
                return 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, {"error": "invalid_token"}
            if self._throttle:
                value = self._throttle.pop(0)
                return 429, ({"Retry-After": value} if value else {}), {"error": "too many requests"}
            if self.rate_limit:
                limit, seconds = self.rate_limit
                while self._served_times and now - self._served_times[0] >= seconds:
                    self._served_times.popleft()
                if len(self._served_times) >= limit:
                    wait = self._served_times[0] + seconds - now
                    value = http_date(wait) if self.retry_after_format == "http-date" else str(max(1, math.ceil(wait)))
                    return 429, {"Retry-After": value}, {"error": "rate limit exceeded"}
                self._served_times.append(now)
            if self._failures:
                return self._failures.pop(0), {}, {"error": "internal error"}
        if path in self._routes:
            return 200, {}, self._routes[path](params)
        if kind is None or endpoint is None:
            return 404, {}, {"error": f"no such endpoint {path}"}
        if "id" in match:  # the endpoint's item_path: one document by id
            with self._lock:
                found = [d for d in self.documents.get(kind, []) if str(d.get("id")) == match["id"]]
            return (200, {}, copy.deepcopy(found[0])) if found else (404, {}, {"error": f"no {kind} {match['id']}"})
        try:
            start, end = self._window(endpoint, params, match)
        except ValueError as exc:
            return 400, {}, {"error": str(exc)}
        if kind in self._responders:
            return 200, {}, self._responders[kind](start, end, params)
        return self._page(kind, endpoint, params, start, end)

    def _window(self, endpoint: Endpoint, params: dict[str, str],
                match: dict[str, str]) -> tuple[datetime | None, datetime | None]:
        window = endpoint.window
        if window is None:
            return None, None
        start_text = match.get("start") or (params.get(window.start_param) if window.start_param else None)
        end_text = match.get("end") or (params.get(window.end_param) if window.end_param else None)
        if start_text is None:
            raise ValueError(f"missing window start ({window.start_param or '{start}'})")
        start = _parse(start_text, window.format)
        if end_text is None:  # {start}-only: that day; start only: open-ended
            single_day = "{start}" in endpoint.path and "{end}" not in endpoint.path
            return start, (start + timedelta(days=1) if single_day else None)
        end = _parse(end_text, window.format)
        if window.format == "date":
            end += timedelta(days=1)  # inclusive end date
        if end <= start:
            raise ValueError(f"window end {end_text} is not after its start {start_text}")
        if (end - start) > timedelta(days=window.max_days):
            raise ValueError(f"window {start_text}..{end_text} is longer than {window.max_days} days")
        return start, end

    def _in_window(self, kind: str, start: datetime | None, end: datetime | None) -> list[dict[str, Any]]:
        with self._lock:
            docs = list(self.documents.get(kind, []))
        picked = [(moment, doc) for doc in docs if (moment := _moment(doc)) is not None
                  and (start is None or moment >= start) and (end is None or moment < end)]
        return [doc for _, doc in sorted(picked, key=lambda pair: pair[0])]

    def _page(self, kind: str, endpoint: Endpoint, params: dict[str, str], start: datetime | None,
              end: datetime | None) -> tuple[int, dict[str, str], Any]:
        assert self._manifest.api is not None
        pagination = self._manifest.api.pagination
        docs = self._in_window(kind, start, end)
        list_key = self.list_key or kind
        size = self.page_size
        if pagination.page_size_param and pagination.page_size_param in params:
            size = int(params[pagination.page_size_param])
            if self.max_page_size is not None and size > self.max_page_size:
                return 400, {}, {"error": f"{pagination.page_size_param} must be <= {self.max_page_size}"}
        signature = f"{kind}|{start}|{end}"
        if pagination.style == "token":
            offset = 0
            token = params.get(pagination.request_param or "")
            if token:
                try:
                    decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                    assert decoded["w"] == signature
                    offset = int(decoded["o"])
                except (ValueError, KeyError, AssertionError, TypeError):
                    return 400, {}, {"error": "invalid next token"}
            items, after = docs[offset:offset + size], offset + size
            following = (base64.urlsafe_b64encode(json.dumps({"o": after, "w": signature}).encode()).decode()
                         if after < len(docs) else None)
            return 200, {}, {list_key: items, pagination.response_field or "next_token": following}
        if pagination.style == "offset":
            offset = int(params.get(pagination.request_param or "offset", 0) or 0)
            size = int(params.get(pagination.page_size_param or "", size) or size)
            items, after = docs[offset:offset + size], offset + size
            more = after < len(docs)
            if pagination.response_field:
                return 200, {}, {"status": 0, "body": {list_key: items, pagination.response_field: more,
                                                       "offset": after if more else 0}}
            query = urlencode({**params, pagination.request_param or "offset": after})
            return 200, {}, {list_key: items, "pagination": {
                "next": f"{self.base_url}{endpoint.path}?{query}" if more else "", "offset": offset, "limit": size}}
        if pagination.style == "page":
            page = int(params.get(pagination.request_param or "page", 1) or 1)
            items = docs[(page - 1) * size:page * size]
            return 200, {}, {list_key: items, "has_more": page * size < len(docs)}
        return 200, {}, {list_key: docs}


def _path_pattern(path: str) -> re.Pattern[str]:
    pattern = re.escape(path).replace(r"\{start\}", r"(?P<start>[^/]+?)").replace(r"\{end\}", r"(?P<end>[^/]+?)")
    return re.compile(pattern)


def _parse(text: str, fmt: str) -> datetime:
    if fmt == "date":
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
    if fmt == "unix":
        return datetime.fromtimestamp(int(text), UTC)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"datetime {text!r} has no offset")
    return moment.astimezone(UTC)


def _moment(doc: dict[str, Any]) -> datetime | None:
    for name in DATE_FIELDS:
        value = doc.get(name)
        if isinstance(value, str) and value:
            if len(value) == 10:
                return datetime.combine(date.fromisoformat(value), datetime.min.time(), tzinfo=UTC)
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# pytest fixtures and helpers for the polling tests (``pytest_plugins = ("servers.fake_provider_api",)``)
# ----------------------------------------------------------------------------------------------------------------------
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_client():
    """The machine's Redis (127.0.0.1:6379). Down means the test errors: the shared limiter is not optional."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}", pytrace=False)
    yield client
    client.close()


@pytest.fixture
def limiter_namespace(redis_client) -> Iterator[str]:
    """A fresh key namespace per test; its keys are deleted afterwards."""
    namespace = f"hf-test:{secrets.token_hex(4)}"
    yield namespace
    keys = list(redis_client.scan_iter(f"{namespace}:*"))
    if keys:
        redis_client.delete(*keys)


def read_raw_events(bootstrap: str, topic: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
    """Every message of ``topic`` (up to each partition's end, from the start): the decoded raw event with its Kafka
    ``key``, ``headers`` and encoded bytes (``raw``).

    The end is the fetch's end-of-partition, not ``get_watermark_offsets``: Tansu's ListOffsets can lag behind a
    multi-record batch.
    """
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from schemas.serde import decode

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"polling-test-{secrets.token_hex(4)}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest", "enable.partition.eof": True})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        out, ended = [], set()
        deadline = time.monotonic() + timeout_s
        while ended != set(partitions):
            assert time.monotonic() < deadline, f"timed out reading {topic}: ended {sorted(ended)} of {partitions}"
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                ended.add(message.partition())
                continue
            out.append({**decode("raw_event", message.value()), "key": message.key(),
                        "headers": dict(message.headers() or []), "raw": message.value()})
        return out
    finally:
        consumer.close()


def consume_raw(bootstrap: str, topic: str, timeout_s: float = 15.0) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
    """``read_raw_events`` as (decoded raw event, Kafka headers) pairs."""
    return [({k: v for k, v in event.items() if k not in ("key", "headers", "raw")}, event["headers"])
            for event in read_raw_events(bootstrap, topic, timeout_s)]
