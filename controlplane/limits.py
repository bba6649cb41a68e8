"""Request limits shared by the ``/v2`` API and the provider webhooks: a body size cap and a JSON depth cap.

``read_body`` reads a request body up to a cap: a ``Content-Length`` above it is refused with 413 before anything is
read, and a chunked body is read only until it passes the cap (never the whole body first). ``check_json_depth``
refuses JSON nested deeper than a cap with 400 (a scan of the bytes: no parse, no recursion), so a hostile document
can never reach ``json.loads``' recursion limit. ``RequestLimits`` is the ASGI middleware applying both to every
request of the API except the paths it leaves to their own limits (the provider webhooks, which cap per provider).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

API_MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 64

# A JSON string (escapes included): its brackets are text, not nesting. The closing quote is optional so that an
# unterminated string ends the text (as it does for ``json.loads``) in one pass: requiring it made every quote of an
# unterminated escape-filled string a new scan to the end (quadratic: 32 KB took 4.5 s on the event loop).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NESTING_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


class BodyTooLarge(HTTPException):
    """413: the body is larger than the route accepts (nothing more is read)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        size = f"{declared} bytes" if declared is not None else "more than that"
        super().__init__(413, f"request body too large: this endpoint accepts at most {limit} bytes, got {size}")


class JsonTooDeep(HTTPException):
    """400: the JSON body nests deeper than the route accepts."""

    def __init__(self, limit: int) -> None:
        super().__init__(400, f"JSON body nested more than {limit} levels deep; this endpoint accepts at most {limit}")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes`` of it; BodyTooLarge (413) as soon as it is known to be larger."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HTTPException(400, f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > max_bytes:
            raise BodyTooLarge(max_bytes, int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge(max_bytes)
    return bytes(body)


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a scalar), without parsing it, in time linear in
    the length of ``body`` whatever it holds (brackets after an unterminated string are its text, not nesting).
    UTF-16 and UTF-32 texts, which ``json.loads`` reads too, are scanned as the text they encode."""
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        with contextlib.suppress(UnicodeError):  # undecodable: json.loads cannot read it either
            body = body.decode(encoding).encode("utf-8", "surrogatepass")
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS).translate(_NESTING_STEPS)
    return max(accumulate(memoryview(brackets).cast("b")), default=0)


def check_json_depth(body: bytes, max_depth: int) -> None:
    """JsonTooDeep (400) when ``body`` nests deeper than ``max_depth``."""
    if body and json_depth(body) > max_depth:
        raise JsonTooDeep(max_depth)


class RequestLimits:
    """ASGI middleware: every HTTP request's body capped at ``max_body_bytes`` (413) and, when not empty, its JSON
    nesting at ``max_json_depth`` (400), answered ``{"status": "error", "message": …}`` before the app sees the
    request. Paths under ``exempt_prefixes`` pass untouched (routes that apply their own caps)."""

    def __init__(self, app: Any, max_body_bytes: int = API_MAX_BODY_BYTES, max_json_depth: int = MAX_JSON_DEPTH,
                 exempt_prefixes: Sequence[str] = ()) -> None:
        if max_body_bytes < 1 or max_json_depth < 1:
            raise ValueError("max_body_bytes and max_json_depth must be positive")
        self.app, self.max_body_bytes, self.max_json_depth = app, max_body_bytes, max_json_depth
        self.exempt_prefixes = tuple(exempt_prefixes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(Request(scope, receive), self.max_body_bytes)
            check_json_depth(body, self.max_json_depth)
        except HTTPException as refused:
            refusal = JSONResponse({"status": "error", "message": refused.detail}, refused.status_code)
            await refusal(scope, receive, send)
            return
        replayed = False

        async def receive_body() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # what comes after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_body, send)
