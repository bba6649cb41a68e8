"""A real webhook endpoint on 127.0.0.1 for the demo and tests: verifies, dedupes, records order, injects failures.

Each POST is handled in this order:
1. both signatures are verified on the raw body (``standardwebhooks`` and terra's verifier, keyed as in
   ``sinks.webhook``); either failing answers 401 and counts ``rejected_signature``;
2. an injected failure (``fail_next``/``stall_next``) is applied if one is pending;
3. the event is accepted (200): stored once per ``webhook-id`` (repeats count ``duplicates``) and its id appended to
   its user's order list on first receipt.
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

    def __init__(self, secret: str, port: int = 0) -> None:
        self.secret = secret
        self._standard = Webhook(secret)
        self._terra_key = terra_signing_key(secret)
        self.service_port = port
        self._lock = threading.Lock()
        self._injections: deque[_Injection] = deque()
        self._events: dict[str, dict[str, Any]] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self._order_by_user: dict[str, list[str]] = {}
        self._first_arrival: dict[str, float] = {}  # user id → when its first event was accepted (epoch s)
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
            return len(self._events)

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
            return dict(self._first_arrival)

    def order_for(self, user_id: str) -> list[str]:
        """Event ids accepted for ``user_id``, in order of first receipt."""
        with self._lock:
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
        try:
            event = json.loads(body)
        except ValueError as exc:
            return 400, {}, f"body is not JSON: {exc}".encode()
        event_id = headers["webhook-id"]
        with self._lock:
            if event_id in self._events:
                self._duplicates += 1
            else:
                self._events[event_id] = event
                self._headers[event_id] = headers
                user_id = (event.get("user") or {}).get("user_id", "")
                self._order_by_user.setdefault(user_id, []).append(event_id)
                self._first_arrival.setdefault(user_id, time.time())
        return 200, {}, b"ok"


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
    args = parser.parse_args(argv)
    with WebhookReceiver(args.secret) as receiver:
        print(json.dumps({"url": receiver.url}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
