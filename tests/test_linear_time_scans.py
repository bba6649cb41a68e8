"""What the API runs on text an anonymous client controls takes time linear in its length (reviewer findings on
issue 10): the JSON depth scan that runs before authentication, and the log redaction that runs on every record
(the access log included). Each hostile shape is timed in CPU seconds against a benign text of the same size; a
quadratic scan of these sizes takes thousands of times longer, a linear one a small multiple."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import requests
from cryptography.fernet import Fernet

from controlplane.api import BackgroundServer, create_app
from controlplane.auth import ControlPlane
from controlplane.limits import API_MAX_BODY_BYTES, json_depth
from core.logs import redact

BODY = API_MAX_BODY_BYTES  # the largest body the API reads before authentication
MAX_RATIO = 40  # linear scans measured at 1-8x the benign body; the quadratic ones at 64 KiB, ~30,000x


def _fill(unit: bytes, prefix: bytes = b"", size: int = BODY) -> bytes:
    return (prefix + unit * (size // len(unit) + 1))[:size]


HOSTILE_BODIES = {
    "unterminated string of escaped quotes": _fill(b'\\"', b'"'),
    "escaped quotes without an opening quote": _fill(b'\\"'),
    "quote and backslash pairs": _fill(b'"\\'),
    "backslashes after a quote": _fill(b"\\", b'"'),
    "brackets inside an unterminated string": _fill(b'[\\"{', b'"'),
    "a quote before every bracket": _fill(b'"['),
    "nothing but quotes": _fill(b'"'),
    "arrays of unterminated strings": _fill(b'["\\"\\"'),
}
BENIGN_BODY = json.dumps({"items": [{"note": "x" * 60 + '\\"', "n": i} for i in range(BODY // 80)]}).encode()[:BODY]


def cpu_seconds(work: Callable[[], object], repeats: int = 5) -> float:
    """The least CPU time (this process) of ``repeats`` runs of ``work``."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return max(best, 1e-6)


def test_the_json_depth_scan_is_linear_for_hostile_bodies():
    benign = cpu_seconds(lambda: json_depth(BENIGN_BODY))
    for shape, body in HOSTILE_BODIES.items():
        assert len(body) == BODY
        ratio = cpu_seconds(lambda body=body: json_depth(body), repeats=3) / benign
        assert ratio < MAX_RATIO, f"{shape}: {ratio:.0f}x the CPU time of a benign body of the same size"


def test_json_depth_is_unchanged_for_json_and_ends_at_an_unterminated_string():
    assert json_depth(b'{"a": "[[[[{{{{", "b": ["\\"[", {"c": []}]}') == 4
    assert json_depth(b'[["\\"') == 2  # what follows an unterminated string is its text (json.loads agrees)
    assert json_depth(b'[[{"a": "\\') == 3 and json_depth(b'"') == 0


def test_json_depth_reads_utf16_and_utf32_as_json_loads_does():
    """json.loads reads UTF-16 and UTF-32 too: a byte of a character (U+0122 is ``22 01`` in UTF-16LE) must not pass
    for a quote that hides the nesting after it."""
    text = '["\u0122",' + "[" * 500 + "]" * 500 + "]"
    for encoding in ("utf-8", "utf-16-le", "utf-16-be", "utf-16", "utf-32-le", "utf-32-be"):
        body = text.encode(encoding)
        assert json.loads(body) and json_depth(body) == 501, encoding


def test_healthz_answers_while_hostile_bodies_are_posted_anonymously(tmp_path):
    plane = ControlPlane(f"sqlite:///{tmp_path}/state.db", Fernet.generate_key().decode(), manifests={}).open()
    answers: list[int] = []
    with BackgroundServer() as server:
        server.start(create_app(plane))

        def post_hostile_bodies() -> None:
            with requests.Session() as http:
                for body in HOSTILE_BODIES.values():
                    answers.append(http.post(f"{server.url}/v2/auth/generateWidgetSession", data=body, timeout=120,
                                             headers={"Content-Type": "application/json"}).status_code)

        poster = threading.Thread(target=post_hostile_bodies)
        poster.start()
        slowest = 0.0
        with requests.Session() as http:
            while poster.is_alive():
                started = time.perf_counter()
                assert http.get(f"{server.url}/healthz", timeout=5).status_code == 200
                slowest = max(slowest, time.perf_counter() - started)
        poster.join()
    plane.close()
    assert len(answers) == len(HOSTILE_BODIES) and all(400 <= status < 500 for status in answers), answers
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s while hostile bodies were scanned"


LOG_LINE = 16 * 1024  # an access-log line of a long request target


def _line(unit: str, prefix: str = "") -> str:
    return (prefix + unit * (LOG_LINE // len(unit) + 1))[:LOG_LINE]


HOSTILE_LOG_LINES = {  # a shape for each redaction pattern: repeated starts, and starts that never complete
    "URL passwords without an @": _line("a://b:", "GET /x?"),
    "bare scheme separators": _line("://:"),
    "colons after a user": _line(":", "a://b"),
    "query secrets": _line(";token=a"),
    "quoted form fields": _line("'code="),
    "form fields at line starts": _line("\ncode="),
    "a header name and no value": _line(" ", "authorization:"),
    "quoted header names": _line("'cookie'"),
    "header values with spaces": _line(" a", "cookie: a"),
    "widget session paths": _line("/widget/session/"),
    "pydantic inputs": _line(", input_type", "input_value="),
    "JSON secret fields without a value": _line('"password":'),
    "a JSON secret of escaped quotes": _line('\\"', '"access_token": "'),
    "dict secret fields": _line("'secret':'"),
}
BENIGN_LOG_LINE = _line("a=1&b=two&", "GET /v2/data?")


def test_log_redaction_is_linear_for_hostile_messages():
    benign = cpu_seconds(lambda: redact(BENIGN_LOG_LINE))
    for shape, line in HOSTILE_LOG_LINES.items():
        ratio = cpu_seconds(lambda line=line: redact(line), repeats=3) / benign
        assert ratio < MAX_RATIO, f"{shape}: {ratio:.0f}x the CPU time of a benign log line of the same size"
