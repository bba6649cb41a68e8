"""A fake Google Health API v4 on loopback, as documented (https://developers.google.com/health/reference/rest/v4/
users.dataTypes.dataPoints/list): ``GET /v4/users/me/dataTypes/{dataType}/dataPoints`` with an AIP-160 ``filter``
(``>=``/``<`` on ``interval.start_time``, ``sample_time.physical_time``, ``sleep.interval.end_time``,
``interval.civil_start_time`` or ``date``, joined by ``AND``), ``pageSize`` and ``pageToken``; answers
``{"dataPoints": [...], "nextPageToken": ...}`` (the token absent on the last page), newest first as documented.
``GET /v4/users/me/identity`` answers ``{"name", "healthUserId", "legacyUserId"}``.

    with FakeGoogleHealth(account="hu-1", token_validator=fake_provider.is_live) as api:
        api.add("steps", points)          # DataPoint JSON objects
        api.requests                      # (path, params, status) of every request

Every request needs ``Authorization: Bearer <token>`` that ``token_validator`` accepts (else 401); an unknown
filter field or operator answers 400 ``INVALID_DATA_POINT_FILTER`` like the service's error catalogue.
FakeProviderApi cannot play this API: its windows are separate query parameters, not one filter expression.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from connectors import registry
from connectors.manifest import Manifest
from pipelines.embedded import LoopbackService, dispatching_handler

_LIST = re.compile(r"^/v4/users/me/dataTypes/(?P<type>[a-z0-9-]+)/dataPoints$")
_CLAUSE = re.compile(r'^(?P<field>[a-z_]+(?:\.[a-z_]+)+) (?P<op>>=|<) "(?P<value>[^"]+)"$')
MAX_PAGE = {"exercise": 25, "sleep": 25}


def _camel(data_type: str) -> str:
    head, *rest = data_type.split("-")
    return head + "".join(part.title() for part in rest)


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _civil(text: str) -> str:
    return text if "T" in text else f"{text}T00:00:00"


@dataclass
class FakeGoogleHealth(LoopbackService):
    account: str = "health-user-1"
    max_page: int | None = None  # caps every page (forces pagination in tests)
    token_validator: Callable[[str], bool] = lambda token: token == "token-1"
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str], int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, data_type: str, points: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            self.points.setdefault(data_type, []).extend(points)

    def served(self, data_type: str) -> list[dict[str, str]]:
        return [params for path, params, status in self.requests
                if status == 200 and path.endswith(f"/dataTypes/{data_type}/dataPoints")]

    # ------------------------------------------------------------------------------------------------ lifecycle
    service_name = "fake-google-health"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return dispatching_handler(self._serve, ("GET",))

    def _serve(self, request: BaseHTTPRequestHandler, _method: str) -> None:
        parts = urlsplit(request.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        status, reply = self._answer(parts.path, params, token)
        with self._lock:
            self.requests.append((parts.path, params, status))
        data = json.dumps(reply).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    @property
    def manifest(self) -> Manifest:
        """The real google_health manifest with its API base URL pointing here."""
        manifest = registry()["google_health"].manifest
        return manifest.model_copy(update={"api": manifest.api.model_copy(update={"base_url": self.base_url})})

    # ------------------------------------------------------------------------------------------------ answers
    def _answer(self, path: str, params: dict[str, str], token: str) -> tuple[int, Any]:
        if not self.token_validator(token):
            return 401, {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "invalid credentials"}}
        if path == "/v4/users/me/identity":
            return 200, {"name": "users/me/identity", "healthUserId": self.account, "legacyUserId": "ABC123"}
        match = _LIST.match(path)
        if match is None:
            return 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": path}}
        data_type = match["type"]
        try:
            keep = self._filter(data_type, params.get("filter", ""))
        except ValueError as exc:
            return 400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": str(exc),
                                   "details": [{"reason": "INVALID_DATA_POINT_FILTER"}]}}
        with self._lock:
            found = [p for p in self.points.get(data_type, []) if keep(p)]
        found.sort(key=lambda p: self._start(data_type, p), reverse=True)  # "ordered by start time descending"
        size = min(int(params.get("pageSize") or MAX_PAGE.get(data_type, 1440)), MAX_PAGE.get(data_type, 10000),
                   self.max_page or 10000)
        offset = int(base64.urlsafe_b64decode(params["pageToken"]).decode()) if params.get("pageToken") else 0
        page: dict[str, Any] = {"dataPoints": found[offset:offset + size]}
        if offset + size < len(found):
            page["nextPageToken"] = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
        return 200, page

    @staticmethod
    def _start(data_type: str, point: dict[str, Any]) -> str:
        data = point[_camel(data_type)]
        if "interval" in data:
            return _instant(data["interval"]["startTime"]).isoformat()
        if "sampleTime" in data:
            return _instant(data["sampleTime"]["physicalTime"]).isoformat()
        return date(**data["date"]).isoformat()

    @staticmethod
    def _filter(data_type: str, expression: str) -> Callable[[dict[str, Any]], bool]:
        """The documented filter fields of ``data_type`` (its underscore name), ``>=``/``<`` joined by AND."""
        prefix = data_type.replace("-", "_") + "."
        tests: list[Callable[[dict[str, Any]], bool]] = []
        for clause in filter(None, expression.split(" AND ")):
            found = _CLAUSE.match(clause.strip())
            if found is None or not found["field"].startswith(prefix):
                raise ValueError(f"Invalid filter: {clause!r}")
            name, op, value = found["field"][len(prefix):], found["op"], found["value"]
            if name in ("interval.start_time", "interval.end_time", "sample_time.physical_time"):
                bound: Any = _instant(value)

                def read(d: dict[str, Any], name: str = name) -> Any:
                    if name == "sample_time.physical_time":
                        return _instant(d["sampleTime"]["physicalTime"])
                    return _instant(d["interval"]["startTime" if name == "interval.start_time" else "endTime"])
            elif name == "interval.civil_start_time":
                bound = _civil(value)

                def read(d: dict[str, Any]) -> Any:
                    start = _instant(d["interval"]["startTime"])
                    offset = float(d["interval"]["startUtcOffset"].removesuffix("s"))
                    local = datetime.fromtimestamp(start.timestamp() + offset, UTC)
                    return local.strftime("%Y-%m-%dT%H:%M:%S")
            elif name == "date":
                if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                    raise ValueError(f"Invalid date literal {value!r}: expected YYYY-MM-DD")
                bound = value

                def read(d: dict[str, Any]) -> Any:
                    return date(**d["date"]).isoformat()
            else:
                raise ValueError(f"Invalid filter field {found['field']!r}")
            camel = _camel(data_type)
            tests.append(lambda p, read=read, op=op, bound=bound, camel=camel:
                         read(p[camel]) >= bound if op == ">=" else read(p[camel]) < bound)
        return lambda point: all(test(point) for test in tests)
