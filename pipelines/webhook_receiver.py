"""A real webhook endpoint on 127.0.0.1 for the demo and tests: verifies, dedupes, records order, injects failures.

Each POST is handled in this order:
1. both signatures are verified on the raw body (``standardwebhooks`` and terra's verifier, keyed as in
   ``sinks.webhook``); either failing answers 401 and counts ``rejected_signature``;
2. an injected failure (``fail_next``/``stall_next``) is applied if one is pending;
3. the event is accepted (200): stored once per ``webhook-id`` (repeats count ``duplicates``) and its id appended to
   its user's order list on first receipt. A body that is not JSON is answered 400 instead, unless the receiver was
   made with ``parse_on_read=True``: then bodies are parsed only when an observation (``events``, ``order_for``,
   ``arrivals``, ...) needs them, which keeps parsing out of the request path (the bench's receiver does this, so
   that it is not the bound of what it measures); there a body that is not JSON is accepted and makes the next
   observation raise ValueError. Observations are the same in both modes: order and arrival times are those of
   receipt.
All counters and stores are guarded by one lock; read them through the properties (copies).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from standardwebhooks import Webhook
from terra.utils.verify_signature import verify_terra_webhook_signature

from pipelines.embedded import LoopbackService, send_reply
from sinks.webhook import terra_signing_key


@dataclass(frozen=True)
class _Injection:
    status: int
    retry_after: float | str | None = None
    delay_s: float = 0.0


class WebhookReceiver(LoopbackService):
    """Loopback HTTP receiver verifying both signatures with ``secret`` (a ``whsec_`` secret).

    Counters: ``received`` (every POST), ``rejected_signature`` (401s), ``injected_failures``, ``unique`` (accepted
    distinct ``webhook-id``s) and ``duplicates`` (accepted repeats).
    """

    def __init__(self, secret: str, port: int = 0, parse_on_read: bool = False) -> None:
        self.secret = secret
        self.parse_on_read = parse_on_read
        self._standard = Webhook(secret)
        self._terra_key = terra_signing_key(secret)
        self.service_port = port
        self._lock = threading.Lock()
        self._injections: deque[_Injection] = deque()
        self._events: dict[str, dict[str, Any]] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self._order_by_user: dict[str, list[str]] = {}
        self._first_arrival: dict[str, float] = {}  # user id → when its first event was accepted (epoch s)
        self._unparsed: deque[tuple[str, bytes, float]] = deque()  # parse_on_read: (id, body, accepted at)
        self._received = 0
        self._duplicates = 0
        self._rejected_signature = 0
        self._injected_failures = 0

    # -- lifecycle -------------------------------------------------------------------------------------------------
    service_name = "webhook-receiver"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return type("_BoundHandler", (_Handler,), {"receiver": self})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook"

    # -- failure injection -----------------------------------------------------------------------------------------
    def fail_next(self, n: int, status: int, retry_after: float | str | None = None) -> None:
        """Answer the next ``n`` correctly signed requests with ``status`` (and ``Retry-After`` when given)."""
        with self._lock:
            self._injections.extend(_Injection(status, retry_after) for _ in range(n))

    def clear_failures(self) -> None:
        """Forget every pending injected failure or stall (the endpoint is "fixed")."""
        with self._lock:
            self._injections.clear()

    def stall_next(self, n: int, delay_s: float, status: int = 200) -> None:
        """Delay the next ``n`` correctly signed requests by ``delay_s`` before answering ``status``."""
        with self._lock:
            self._injections.extend(_Injection(status, delay_s=delay_s) for _ in range(n))

    # -- observations (copies) -------------------------------------------------------------------------------------
    @property
    def received(self) -> int:
        with self._lock:
            return self._received

    @property
    def unique(self) -> int:
        with self._lock:
            return len(self._events) + len(self._unparsed)

    @property
    def duplicates(self) -> int:
        with self._lock:
            return self._duplicates

    @property
    def rejected_signature(self) -> int:
        with self._lock:
            return self._rejected_signature

    @property
    def injected_failures(self) -> int:
        with self._lock:
            return self._injected_failures

    @property
    def events(self) -> dict[str, dict[str, Any]]:
        """Accepted event bodies (parsed JSON) by ``webhook-id``."""
        with self._lock:
            self._parse_pending()
            return dict(self._events)

    @property
    def headers(self) -> dict[str, dict[str, str]]:
        """Lower-cased headers of the first accepted delivery of each ``webhook-id``."""
        with self._lock:
            return {k: dict(v) for k, v in self._headers.items()}

    @property
    def arrivals(self) -> dict[str, float]:
        """When each user's first event was accepted (epoch seconds; also served as JSON on GET /arrivals)."""
        with self._lock:
            self._parse_pending()
            return dict(self._first_arrival)

    def order_for(self, user_id: str) -> list[str]:
        """Event ids accepted for ``user_id``, in order of first receipt."""
        with self._lock:
            self._parse_pending()
            return list(self._order_by_user.get(user_id, []))

    # -- request handling (called from handler threads) ------------------------------------------------------------
    def _handle(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self._received += 1
        try:
            self._standard.verify(body, headers, json_parse=False)
            verify_terra_webhook_signature(body.decode("utf-8"), headers.get("terra-signature", ""), self._terra_key)
        except Exception as exc:  # any verification failure, whichever library raised it
            with self._lock:
                self._rejected_signature += 1
            return 401, {}, f"invalid signature: {exc}".encode()
        with self._lock:
            injection = self._injections.popleft() if self._injections else None
            if injection is not None and injection.status >= 300:
                self._injected_failures += 1
        if injection is not None:
            if injection.delay_s:
                time.sleep(injection.delay_s)
            if injection.status >= 300:
                extra = {} if injection.retry_after is None else {"Retry-After": str(injection.retry_after)}
                return injection.status, extra, f"injected failure {injection.status}".encode()
        event_id = headers["webhook-id"]
        if not self.parse_on_read:
            try:
                event = json.loads(body)
            except ValueError as exc:
                return 400, {}, f"body is not JSON: {exc}".encode()
        with self._lock:
            if event_id in self._headers:
                self._duplicates += 1
            else:
                self._headers[event_id] = headers
                if self.parse_on_read:
                    self._unparsed.append((event_id, body, time.time()))
                else:
                    self._store(event_id, event, time.time())
        return 200, {}, b"ok"

    def _store(self, event_id: str, event: dict[str, Any], accepted_at: float) -> None:
        """Record the first accepted delivery of ``event_id`` (caller holds the lock)."""
        self._events[event_id] = event
        user_id = (event.get("user") or {}).get("user_id", "")
        self._order_by_user.setdefault(user_id, []).append(event_id)
        self._first_arrival.setdefault(user_id, accepted_at)

    def _parse_pending(self) -> None:
        """Parse and store the bodies accepted unparsed, in receipt order (caller holds the lock)."""
        while self._unparsed:
            event_id, body, accepted_at = self._unparsed[0]
            self._store(event_id, json.loads(body), accepted_at)
            self._unparsed.popleft()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the sink's Session reuses connections
    disable_nagle_algorithm = True  # small replies must not wait for delayed ACKs (~40 ms each)
    timeout = 30
    receiver: WebhookReceiver

    def do_POST(self) -> None:  # http.server dispatches on this name
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, extra, reply = self.receiver._handle(body, headers)
        send_reply(self, status, reply, "text/plain", extra)

    def do_GET(self) -> None:  # http.server dispatches on this name
        if not self.path.endswith("/arrivals"):
            self.send_error(404)
            return
        send_reply(self, 200, json.dumps(self.receiver.arrivals).encode(), "application/json")

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's per-request stderr logging."""


def main(argv: list[str] | None = None) -> None:
    """Serve in a process of its own until stdin closes or the process is ended; prints ``{"url": ...}`` first."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="A webhook receiver on 127.0.0.1 (a free port).")
    parser.add_argument("--secret", required=True, help="the destination's whsec_ secret")
    parser.add_argument("--parse-on-read", action="store_true",
                        help="parse bodies when observed, not on receipt (a body that is not JSON is accepted)")
    args = parser.parse_args(argv)
    with WebhookReceiver(args.secret, parse_on_read=args.parse_on_read) as receiver:
        print(json.dumps({"url": receiver.url}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
