"""Hostile inputs: raw events through files and the broker, and requests against a running ``healthflow serve``.

The corpus is generated from the real fixtures under ``tests/fixtures`` (a fixed seed: the same corpus every run):
wrong types in every field, truncation, random bytes, huge numbers, NaN, depth 10,000, 5 MB strings, invalid UTF-8,
hostile raw-event envelopes, and the shapes that once stopped the pipeline. Each record must end in exactly one
outcome of the run summary (mapped, empty or dead-lettered with a stage and reason); the controls (the simulated
payloads) must come out exactly as in the clean run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from core.raw import RawPayload
from reliability.books import Row
from reliability.faults import Context
from reliability.mechanics import (
    ROOT,
    JobPaths,
    create_database,
    destinations_file,
    ingest_dead_letters,
    last_error,
    normalize_command,
    postgres_rows,
    raw_line,
    run_to_end,
    safe,
)
from schemas.serde import encode_raw

FIXTURES = ROOT / "tests" / "fixtures"
SEED = 20_261_205
DEEP = 10_000
HUGE_STRING = 5 * 1024 * 1024
WEBHOOK_TOKEN = "fuzz-url-token"
OUTCOMES = ("raw_ok", "raw_partial", "raw_dead", "raw_empty", "raw_split")


@dataclass(frozen=True)
class Hostile:
    """One hostile raw event: the line of the file input and the message of the broker, and what it is."""

    shape: str
    line: bytes
    message: bytes


def _fixtures() -> list[tuple[str, str | None, Any]]:
    """(provider, kind, document) of every good fixture (Garmin push bodies name their kinds; its pull answers and
    single summaries take the kind from the file name)."""
    out = []
    for path in sorted(FIXTURES.glob("*/*.json")):
        if path.name.partition(".")[2].startswith("bad"):
            continue
        provider, document = path.parent.name, json.loads(path.read_text())
        push_bodies = document if isinstance(document, list) else [document]
        keyed = provider == "garmin" and all(
            isinstance(body, dict) and all(isinstance(docs, list) for docs in body.values()) for body in push_bodies)
        out.append((provider, None if keyed else path.name.split(".")[0], document))
    return out


def _leaf_paths(document: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _leaf_paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document[:3]):
            yield from _leaf_paths(value, (*prefix, index))
    if prefix:
        yield prefix


def _replaced(document: Any, path: tuple, value: Any) -> Any:
    copy = json.loads(json.dumps(document))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


WRONG_VALUES: list[Any] = ["x", -1, 0, 1e308, -1e308, 10**40, 2**63, 1.5e300, [], {}, None, True, "", "\u0000",
                           "9999-99-99T99:99:99Z", "\ud800", "A" * 8000, [[[[]]]], {"$ne": 1}, -2**63 - 1]


def _payload_text(document: Any) -> str:
    return json.dumps(document, allow_nan=True)


def _record(provider: str, kind: str | None, user: str | None, payload: bytes, received_at: Any = None) -> Hostile:
    """A hostile record with a JSON payload as a file line and as an Avro raw event."""
    line = json.dumps({"provider": provider, "kind": kind, "user_id": user,
                       "received_at": 1_710_000_000_000 if received_at is None else received_at,
                       "payload": payload.decode("utf-8", "surrogateescape")}).encode()
    when = received_at if isinstance(received_at, int) and 0 < received_at < 2**62 else 1_710_000_000_000
    raw_user = (user or "").encode("utf-8", "surrogatepass")
    try:
        raw_user.decode("utf-8")
        message = encode_raw(RawPayload(provider, payload, kind, user, when))
    except UnicodeDecodeError:  # invalid UTF-8 in the id: a placeholder of the same length, then the bytes swapped
        placeholder = "u" * len(raw_user)
        message = encode_raw(RawPayload(provider, payload, kind, placeholder, when)).replace(
            placeholder.encode(), raw_user, 1)
    return Hostile("", line, message)


def corpus(size: int, seed: int = SEED) -> list[Hostile]:
    """``size`` hostile raw events (at least the fixed shapes), the same for the same ``size`` and ``seed``."""
    rng = random.Random(seed)
    bases = _fixtures()
    fixed: list[Hostile] = []

    def add(shape: str, record: Hostile, into: list[Hostile]) -> None:
        into.append(Hostile(shape, record.line.replace(b"\n", b" ").replace(b"\r", b" "), record.message))

    # the shapes that stopped the pipeline before (issue 10), then the generic hostile shapes
    withings_measure = {"status": 0, "body": {"timezone": "Europe/Paris", "measuregrps": [
        {"grpid": 1, "date": 1710000000, "category": 1, "measures": [{"type": 1, "value": 70000, "unit": -3}]}]}}
    garmin_daily = {"dailies": [{"userId": "g-hostile", "summaryId": "s1", "calendarDate": "2024-03-11",
                                 "startTimeInSeconds": 1710115200, "startTimeOffsetInSeconds": 0,
                                 "durationInSeconds": 86400, "steps": 5}]}
    whoop_sleep = next(doc for provider, kind, doc in bases if provider == "whoop" and kind == "sleep")
    for shape, provider, kind, user, document, received_at in [
        ("5 MB Withings timezone", "withings", "getmeas", "w-hostile",
         _replaced(withings_measure, ("body", "timezone"), "X" * HUGE_STRING), None),
        ("huge Garmin timestamp", "garmin", None, None,
         _replaced(garmin_daily, ("dailies", 0, "startTimeInSeconds"), 10**15), None),
        ("received_at 1.5e300", "garmin", None, None, garmin_daily, 1.5e300),
        ("Withings unit 1e30", "withings", "getmeas", "w-hostile",
         _replaced(withings_measure, ("body", "measuregrps", 0, "measures", 0, "unit"), 10**30), None),
        ("lone surrogate user id", "oura", "daily_activity", "\ud800-user",
         next(doc for p, k, doc in bases if p == "oura" and k == "daily_activity"), None),
        ("NUL in a sleep id", "whoop", "sleep", "whoop-hostile", _nul_id(whoop_sleep), None),
        ("8,000-character sleep id", "whoop", "sleep", "whoop-hostile", _long_id(whoop_sleep), None),
    ]:
        add(shape, _record(provider, kind, user, _payload_text(document).encode("utf-8", "surrogatepass"),
                           received_at), fixed)
    for provider, kind, document in bases[:3]:
        add("5 MB string", _record(provider, kind, "fuzz", _payload_text(
            _replaced(document, next(iter(_leaf_paths(document))), "S" * HUGE_STRING)).encode()), fixed)
        add(f"depth {DEEP}", _record(provider, kind, "fuzz", _deep(DEEP).encode()), fixed)
    generic: list[Hostile] = []
    while len(fixed) + len(generic) < size:
        provider, kind, document = rng.choice(bases)
        user = f"fuzz-{rng.randrange(50)}"
        text = _payload_text(document).encode()
        pick = rng.randrange(12)
        if pick <= 4:  # a wrong type in one field (every field of every fixture over the corpus)
            paths = list(_leaf_paths(document))
            path = rng.choice(paths)
            value = rng.choice(WRONG_VALUES)
            shape = "wrong type in a field"
            payload = _payload_text(_replaced(document, path, value)).encode("utf-8", "surrogatepass")
        elif pick == 5:
            shape, payload = "truncated", text[:rng.randrange(len(text))]
        elif pick == 6:
            shape, payload = "random bytes", rng.randbytes(rng.randrange(1, 400))
        elif pick == 7:
            path = rng.choice(list(_leaf_paths(document)))
            shape = "NaN / Infinity"
            payload = _payload_text(_replaced(document, path, rng.choice([float("nan"), float("inf"),
                                                                          float("-inf")]))).encode()
        elif pick == 8:
            cut = rng.randrange(len(text))
            broken = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
            shape, payload = "invalid UTF-8", text[:cut] + broken + text[cut:]
        elif pick == 9:
            path = rng.choice(list(_leaf_paths(document)))
            shape = "nested deep in a field"
            payload = _payload_text(_replaced(document, path, "@DEEP@")).replace('"@DEEP@"', _deep(
                rng.choice([100, 1000, DEEP]))).encode()
        elif pick == 10:  # hostile raw-event envelope: wrong types in its own fields
            field_name = rng.choice(["provider", "kind", "user_id", "received_at", "payload"])
            envelope: dict[str, Any] = {"provider": provider, "kind": kind, "user_id": user,
                                        "received_at": 1_710_000_000_000, "payload": text.decode()}
            envelope[field_name] = rng.choice(WRONG_VALUES)
            line = json.dumps(envelope).encode("utf-8", "surrogatepass")
            generic.append(Hostile(f"wrong type in the raw event's {field_name}", line.replace(b"\n", b" "),
                                   line))
            continue
        else:  # not a raw event at all
            garbage = rng.randbytes(rng.randrange(1, 200)).replace(b"\n", b" ").replace(b"\r", b" ")
            generic.append(Hostile("not a raw event", garbage if garbage.strip() else b"?", garbage or b"?"))
            continue
        add(shape, _record(provider, kind, user, payload), generic)
    return fixed + generic[:max(0, size - len(fixed))]


def _nul_id(document: Any) -> Any:
    records = document.get("records") if isinstance(document, dict) else None
    if records:
        return _replaced(document, ("records", 0, "id"), "sleep\u0000id")
    return _replaced(document, ("id",), "sleep\u0000id")


def _long_id(document: Any) -> Any:
    records = document.get("records") if isinstance(document, dict) else None
    if records:
        return _replaced(document, ("records", 0, "id"), "i" * 8000)
    return _replaced(document, ("id",), "i" * 8000)


# -- through files and the broker -----------------------------------------------------------------------------------
def hostile_events(ctx: Context) -> list[Row]:
    """The corpus after the controls, through files and through the broker, into PostgreSQL state + destination."""
    hostile = corpus(ctx.settings.hostile_events)
    return [_through_files(ctx, hostile), _through_broker(ctx, hostile)]


def _books(ctx: Context, through: str, injected: str, hostile_sources: set[str], code: int | None,
           summary: dict[str, Any], dlq: Path, log: Path, database: str, source_of: Callable[[dict], str | None],
           refused: int = 0) -> Row:
    """The books of one hostile run: each hostile record (by its source line or offset) dead-lettered with a reason,
    else accepted as data (``delivered``: mapped, or empty), else lost; a run that fails or hangs accounts for none
    it did not dead-letter. ``refused``: records the broker would not take (counted as refused with a reason)."""
    total = len(ctx.payloads) + len(hostile_sources) - refused
    row = Row("hostile raw events", through, injected, events_in=len(hostile_sources))
    dead = {source_of(d.get("source") or {}) for d in ingest_dead_letters(dlq)}
    without_reason = [d for d in ingest_dead_letters(dlq) if not (d.get("stage") and d.get("error_message"))]
    row.dead_lettered = len(set(hostile_sources) & dead) + refused
    if code is None:
        row.hung = 1
        row.note("the run did not finish in time (killed)")
    elif code != 0:
        row.crashed = 1
        row.note(f"the run failed (exit {code}): {last_error(log)}")
    ended = sum(int(summary.get(name, 0)) for name in OUTCOMES)
    if code == 0:
        row.lost = max(0, total - ended)
        row.delivered = row.events_in - row.dead_lettered - row.lost
    else:
        row.lost = row.events_in - row.dead_lettered  # not accounted for: the run stopped on them
    if without_reason:
        row.note(f"{len(without_reason)} dead letters without a stage or reason")
        row.lost += len(without_reason)
    rows = safe(lambda: postgres_rows(database))
    differing = sum(1 for key, value in ctx.reference.items() if rows.get(key) != value)
    if differing:
        row.kept = False
        row.note(f"{differing}/{len(ctx.reference)} control records differ from the clean run")
    else:
        row.note(f"controls identical to the clean run ({len(ctx.reference)} records)")
    if refused:
        row.note(f"{refused} refused by the broker (too large)")
    return row


def _job(ctx: Context, name: str) -> tuple[Path, str, Path, JobPaths]:
    folder = ctx.folder(name)
    database = create_database(ctx.postgres.url())
    destinations = destinations_file(folder / "destinations.yaml", f"{{name: pg, type: postgres, url: '{database}'}}")
    return folder, database, destinations, JobPaths(database, folder / "dlq", folder / "job.log")


def _through_files(ctx: Context, hostile: list[Hostile]) -> Row:
    folder, database, destinations, paths = _job(ctx, "hostile-files")
    raw = folder / "raw.jsonl"
    with raw.open("wb") as handle:
        for payload in ctx.payloads:
            handle.write(raw_line(payload).encode() + b"\n")
        for record in hostile:
            handle.write(record.line + b"\n")
    first = len(ctx.payloads) + 1
    sources = {str(first + index) for index in range(len(hostile))}
    started = time.monotonic()
    code, summary = run_to_end(normalize_command(["--input", str(raw)], destinations, paths, streaming=False),
                               paths.log, ctx.secret, ctx.settings.hostile_timeout_s)
    row = _books(ctx, "files", f"{len(hostile)} hostile lines + {len(ctx.payloads)} controls", sources, code,
                 summary, paths.dead_letters, paths.log, database, lambda source: source.get("line"))
    row.recover_s = time.monotonic() - started
    return row


def _through_broker(ctx: Context, hostile: list[Hostile]) -> Row:
    _, database, destinations, paths = _job(ctx, "hostile-broker")
    topic = f"raw.hostile.{uuid.uuid4().hex[:8]}"
    ctx.broker.create_topic(topic, partitions=1)  # offsets in publish order: offset → record
    offsets: dict[int, int | None] = {}
    producer = Producer({"bootstrap.servers": ctx.broker.bootstrap, "enable.idempotence": True,
                         "message.max.bytes": 16 * 1024 * 1024, "linger.ms": 5})

    def produce(index: int, value: bytes) -> None:
        def report(err, msg, index=index) -> None:
            offsets[index] = None if err else msg.offset()
        while True:
            try:
                producer.produce(topic, value, on_delivery=report)
                return
            except BufferError:
                producer.poll(0.1)

    messages = [encode_raw(p) for p in ctx.payloads] + [h.message for h in hostile]
    for index, value in enumerate(messages):
        produce(index, value)
    producer.flush(120)
    hostile_offsets = {offsets.get(len(ctx.payloads) + i): i for i in range(len(hostile))}
    refused = sum(1 for offset in hostile_offsets if offset is None)
    hostile_offsets.pop(None, None)
    started = time.monotonic()
    code, summary = run_to_end(normalize_command(["--bootstrap-servers", ctx.broker.bootstrap, "--topic", topic,
                                                  "--group", "hostile"], destinations, paths, streaming=False),
                               paths.log, ctx.secret, ctx.settings.hostile_timeout_s)
    sources = {str(offset) for offset in hostile_offsets} | {f"refused-{i}" for i in range(refused)}
    row = _books(ctx, "broker", f"{len(hostile)} hostile messages + {len(ctx.payloads)} controls", sources, code,
                 summary, paths.dead_letters, paths.log, database, lambda source: source.get("offset"),
                 refused=refused)
    row.recover_s = time.monotonic() - started
    return row


# -- hostile API requests -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    shape: str
    write: bool  # a route that changes something


def serve_api(ctx: Context, folder: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """``healthflow serve`` on a free port with a developer; (process, base URL, the developer's headers)."""
    import os

    from cryptography.fernet import Fernet

    from pipelines.embedded import free_port

    state = f"sqlite:///{folder / 'control.db'}"
    env = {**os.environ, "HEALTHFLOW_SECRET_KEY": Fernet.generate_key().decode()}
    for provider in ("GARMIN", "OURA", "WHOOP", "FITBIT", "POLAR", "WITHINGS", "GOOGLE_HEALTH"):
        env[f"HEALTHFLOW_{provider}_CLIENT_ID"] = "fuzz-client"
        env[f"HEALTHFLOW_{provider}_CLIENT_SECRET"] = "fuzz-secret"
        env[f"HEALTHFLOW_{provider}_WEBHOOK_SECRET"] = "fuzz-webhook-secret"  # signed providers verify (else 503)
        env[f"HEALTHFLOW_{provider}_WEBHOOK_TOKEN"] = WEBHOOK_TOKEN  # providers that sign nothing: the URL token
    created = subprocess.run([sys.executable, "-m", "runners.cli", "developers", "create", "--state", state],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=120).stdout
    fields = dict(line.split(":", 1) for line in created.splitlines() if ":" in line and not line.startswith("("))
    auth = {"dev-id": fields["dev-id"].strip(), "x-api-key": fields["x-api-key"].strip()}
    port = free_port()
    with (folder / "serve.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "runners.cli", "serve", "--port", str(port), "--state", state,
                                    "--bootstrap-servers", ctx.broker.bootstrap], cwd=ROOT, env=env,
                                   stdout=log, stderr=log)
    return process, f"http://127.0.0.1:{port}", auth


def _hostile_requests(spec: dict[str, Any], auth: dict[str, str], size: int, seed: int = SEED) -> list[Request]:
    rng = random.Random(seed)
    routes = [(method.upper(), path) for path, item in spec.get("paths", {}).items() for method in item
              if method in ("get", "post", "put", "patch", "delete", "head")]
    routes += [("POST", f"/v2/providers/{p}/webhook") for p in
               ("garmin", "oura", "whoop", "fitbit", "polar", "withings", "google_health")]
    routes = sorted(set(routes))
    auths = [("no auth", {}), ("wrong key", {"dev-id": auth["dev-id"], "x-api-key": "hf_wrong"}),
             ("unknown developer", {"dev-id": "nobody", "x-api-key": "hf_x"}), ("valid auth", auth),
             ("huge key", {"dev-id": "d" * 10_000, "x-api-key": "k" * 100_000})]
    path_values = ["x", "../../etc/passwd", "%00", "A" * 5000, "%ff%fe", "1e308", "-1", "GARMIN", "oura"]
    query_values = ["", "x", "-1", "1e308", "9" * 400, "2024-13-45", "[]", "%00", "A" * 5000, "true"]
    bodies: list[tuple[str, bytes | None, str]] = [
        ("no body", None, "application/json"),
        ("wrong types", json.dumps({"reference_id": 5, "providers": 7, "language": [], "auth_success_redirect_url": {},
                                    "user_id": None}).encode(), "application/json"),
        ("array body", b"[1,2,3]", "application/json"),
        ("deep JSON", _deep(DEEP).encode(), "application/json"),
        ("deep object", ('{"a":' * DEEP + "1" + "}" * DEEP).encode(), "application/json"),
        ("invalid UTF-8", b'{"reference_id": "\xff\xfe"}', "application/json"),
        ("truncated JSON", b'{"reference_id": "abc', "application/json"),
        ("NaN", b'{"reference_id": NaN, "x": Infinity}', "application/json"),
        ("huge number", b'{"reference_id": 1' + b"0" * 5000 + b"}", "application/json"),
        ("form body", b"appli=46&userid=1&startdate=x", "application/x-www-form-urlencoded"),
        ("wrong content type", b"\x00\x01\x02", "application/octet-stream"),
    ]
    huge = ("5 MB body", json.dumps({"reference_id": "x" * HUGE_STRING}).encode(), "application/json")
    requests: list[Request] = []
    budget_huge = max(len(routes), size // 100)
    while len(requests) < size:
        method, template = rng.choice(routes)
        path = template
        while "{" in path:
            start, end = path.index("{"), path.index("}")
            path = path[:start] + rng.choice(path_values) + path[end + 1:]
        param_names = [p["name"] for p in spec.get("paths", {}).get(template, {}).get(method.lower(), {}).get(
            "parameters", []) if p.get("in") == "query"] or ["resource", "user_id", "start_date", "end_date"]
        query = "&".join(f"{name}={rng.choice(query_values)}" for name in rng.sample(param_names,
                                                                                     rng.randint(0, len(param_names))))
        auth_shape, headers = rng.choice(auths)
        body_shape, body, content_type = rng.choice(bodies)
        if budget_huge and rng.random() < 0.02:
            body_shape, body, content_type = huge
            budget_huge -= 1
        if method in ("GET", "HEAD", "DELETE") and rng.random() < 0.7:
            body_shape, body = "no body", None
        if auth_shape == "valid auth" and path.endswith("/webhook"):
            query = "&".join(filter(None, [query, f"token={WEBHOOK_TOKEN}"]))
        requests.append(Request(method, path + (f"?{query}" if query else ""),
                                {**headers, "content-type": content_type}, body,
                                f"{auth_shape}, {body_shape}", method in ("POST", "PUT", "PATCH", "DELETE")))
    return requests


def hostile_requests(ctx: Context) -> list[Row]:
    """``hostile_requests`` requests on every route of the OpenAPI spec (and the provider webhooks): no 5xx (but a
    503 saying why), no timeout, every refusal with a reason, no write accepted without its credentials, the server
    still answering after."""
    import requests as http

    folder = ctx.folder("hostile-requests")
    process, base, auth = serve_api(ctx, folder)
    row = Row("hostile API requests", "healthflow serve", "")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                spec = http.get(f"{base}/v2/openapi.json", timeout=5).json()
                break
            except (http.RequestException, ValueError):
                if process.poll() is not None or time.monotonic() > deadline:
                    row.crashed = 1
                    return [row.note(f"serve did not start: {last_error(folder / 'serve.log')}")]
                time.sleep(0.3)
        batch = _hostile_requests(spec, auth, ctx.settings.hostile_requests)
        row.injected = f"{len(batch)} requests on {len({r.path.split('?')[0] for r in batch})} paths"
        row.events_in = len(batch)
        outcomes: dict[str, list[str]] = {"crash": [], "hang": [], "no reason": [], "unauthenticated write": []}
        accepted = refused = 0
        session_local = threading.local()

        def send(request: Request, fresh: bool = False) -> tuple[Request, int | str, bytes]:
            session = None if fresh else getattr(session_local, "session", None)
            if session is None:
                session = session_local.session = http.Session()
                session.trust_env = False
            try:
                answer = session.request(request.method, base + request.path, headers=request.headers,
                                         data=request.body, timeout=ctx.settings.request_timeout_s,
                                         allow_redirects=False)
                return request, answer.status_code, answer.content[:500]
            except http.Timeout:
                return request, "timeout", b""
            except http.RequestException as exc:
                if not fresh:  # the server may close a kept-alive connection (after a 413): once more on a new one
                    return send(request, fresh=True)
                return request, f"connection: {type(exc).__name__}", b""

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for request, status, body in pool.map(send, batch):
                label = f"{request.method} {request.path.split('?')[0][:60]} ({request.shape})"
                if status == "timeout":
                    outcomes["hang"].append(label)
                elif isinstance(status, str) or (status >= 500 and not (status == 503 and body.strip())):
                    outcomes["crash"].append(f"{label} → {status} {body[:80]!r}")
                elif status >= 400:  # 4xx, or 503 with its reason (a route not configured, a broker away)
                    refused += 1
                    if not body.strip() and request.method != "HEAD":  # HEAD answers carry no body
                        outcomes["no reason"].append(f"{label} → {status}")
                else:
                    accepted += 1
                    if request.write and not request.shape.startswith("valid auth") and "/webhook" in request.path:
                        outcomes["unauthenticated write"].append(f"{label} → {status}")
        healthy = answers(base, http)
        row.recover_s = time.monotonic() - started
        row.delivered, row.dead_lettered = accepted, refused
        row.crashed = len(outcomes["crash"]) + (0 if healthy and process.poll() is None else 1)
        row.hung = len(outcomes["hang"])
        row.lost = len(outcomes["no reason"]) + len(outcomes["unauthenticated write"])
        for name, examples in outcomes.items():
            if examples:
                row.note(f"{len(examples)} {name}, e.g. {examples[0]}")
        if not healthy:
            row.note("/healthz did not answer after the run")
        (folder / "outcomes.json").write_text(json.dumps(outcomes, indent=1))
        return [row]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def answers(base: str, http: Any) -> bool:
    try:
        return http.get(f"{base}/healthz", timeout=5).status_code == 200
    except http.RequestException:
        return False
