"""Shared mechanics of the faults and the fault tests: running the job, reading destinations, waiting.

The normalize job always runs as ``python -m runners.cli run normalize …`` in a process of its own, so a fault can
SIGKILL it and a crash is seen as its exit code, never as an exception in the harness.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.dead_letters import read_dead_letters
from core.raw import RawPayload

ROOT = Path(__file__).resolve().parents[1]
SECRET_VAR = "HF_RELIABILITY_WEBHOOK_SECRET"
Rows = dict[tuple[str, str, str], tuple[str, str]]  # (user_id, type, natural_key) → (event_id, payload JSON)


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition",
             every_s: float = 0.1) -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def reached(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> float | None:
    """Seconds until ``condition`` held, or None if it did not within ``timeout_s``."""
    started = time.monotonic()
    try:
        wait_for(condition, timeout_s, every_s=every_s)
    except AssertionError:
        return None
    return time.monotonic() - started


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# -- destinations ----------------------------------------------------------------------------------------------------
def create_database(admin_url: str) -> str:
    """A fresh database on the server of ``admin_url`` (``postgresql://USER@HOST:PORT/postgres``); its URL."""
    import psycopg

    name = f"hf_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def postgres_rows(url: str) -> Rows:
    """Every row of ``healthflow_records`` at a PostgreSQL destination ({} when the table does not exist yet)."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        exists = conn.execute("SELECT to_regclass('healthflow_records')").fetchone()[0]
        if exists is None:
            return {}
        rows = conn.execute("SELECT user_id, type, natural_key, event_id, payload FROM healthflow_records").fetchall()
    return {(u, t, k): (e, json.dumps(p, sort_keys=True)) for u, t, k, e, p in rows}


def postgres_row_count(url: str) -> tuple[int, int]:
    """(rows, distinct natural keys) of ``healthflow_records``: equal when no record is duplicated."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        if conn.execute("SELECT to_regclass('healthflow_records')").fetchone()[0] is None:
            return 0, 0
        (rows, distinct), = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT (user_id, type, natural_key)) FROM healthflow_records").fetchall()
    return rows, distinct


def sqlite_rows(path: Path) -> Rows:
    if not path.exists():
        return {}
    with sqlite3.connect(path) as conn:
        try:
            rows = conn.execute("SELECT user_id, type, natural_key, event_id, payload FROM healthflow_records"
                                ).fetchall()
        except sqlite3.OperationalError:
            return {}
    return {(u, t, k): (e, p) for u, t, k, e, p in rows}


def as_comparable(rows: Rows) -> Rows:
    """Rows with their payload JSON re-serialized with sorted keys (SQLite text and PostgreSQL JSONB compare)."""
    return {key: (event_id, json.dumps(json.loads(payload), sort_keys=True))
            for key, (event_id, payload) in rows.items()}


def safe(read: Callable[[], Rows]) -> Rows:
    """``read()``, or {} while the database is down."""
    try:
        return read()
    except Exception:
        return {}


def delivery_dead_letters(root: Path | str, destination: str) -> set[str]:
    """Event ids dead-lettered by ``destination`` (its delivery stage) under the dead-letter ``root``."""
    if not Path(root).exists():
        return set()
    return {d["event_id"] for d in read_dead_letters(str(root))
            if d.get("destination") == destination and d.get("event_id")}


def ingest_dead_letters(root: Path | str) -> list[dict[str, Any]]:
    """Dead letters of the stages before delivery (decode, parse, map, validate, merge, …)."""
    if not Path(root).exists():
        return []
    return [d for d in read_dead_letters(str(root)) if not d.get("destination")]


# -- inputs ----------------------------------------------------------------------------------------------------------
def raw_line(payload: RawPayload) -> str:
    """One raw event as a JSON line of the file input."""
    return json.dumps({"provider": payload.provider, "kind": payload.kind, "user_id": payload.user_id,
                       "received_at": payload.received_at_ms or 1, "payload": payload.payload.decode(),
                       "idempotency_key": payload.idempotency_key()})


def write_jsonl(path: Path, payloads: Iterable[RawPayload]) -> Path:
    with path.open("w") as handle:
        for payload in payloads:
            handle.write(raw_line(payload) + "\n")
    return path


def destinations_file(path: Path, *entries: str) -> Path:
    """A destinations YAML with one flow-style entry per line of ``entries``."""
    path.write_text("destinations:\n" + "".join(f"  - {entry}\n" for entry in entries))
    return path


def webhook_entry(name: str, url: str, timeout_s: float = 5.0, retry: str = "") -> str:
    retry_part = f", retry: {retry}" if retry else ""
    return (f"{{name: {name}, type: webhook, url: '{url}', secret: '${{{SECRET_VAR}}}', "
            f"timeout_s: {timeout_s}{retry_part}}}")


# -- the job ---------------------------------------------------------------------------------------------------------
@dataclass
class JobPaths:
    """Where one job keeps its state and dead letters, and its log."""

    state: str
    dead_letters: Path
    log: Path


def normalize_command(source: Sequence[str], destinations: Path, paths: JobPaths, streaming: bool,
                      redeliver_every_s: float = 0.0) -> list[str]:
    command = [sys.executable, "-m", "runners.cli", "run", "normalize", *source, "--destinations", str(destinations),
               "--state", paths.state, "--dead-letters", str(paths.dead_letters)]
    if streaming:
        command += ["--streaming", "--redeliver-every", str(redeliver_every_s)]
    return command


def start_job(command: Sequence[str], log: Path, secret: str, env: dict[str, str] | None = None,
              stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start ``command`` from the checkout with the webhook secret in the environment; stderr appends to ``log``."""
    environment = {**os.environ, SECRET_VAR: secret, **(env or {})}
    with log.open("ab") as err:
        return subprocess.Popen(list(command), cwd=ROOT, env=environment, stdout=stdout, stderr=err)


def kafka_source(bootstrap: str, topic: str, group: str) -> list[str]:
    return ["--bootstrap-servers", bootstrap, "--topic", topic, "--group", group]


def kill(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL ``process`` (ours) if it still runs, and reap it."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def run_to_end(command: Sequence[str], log: Path, secret: str, timeout_s: float,
               env: dict[str, str] | None = None) -> tuple[int | None, dict[str, Any]]:
    """Run a batch job to completion: (exit code or None if it hung past ``timeout_s`` and was killed, its summary)."""
    process = start_job(command, log, secret, env, stdout=subprocess.PIPE)
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill(process)
        return None, {}
    try:
        summary = json.loads(out or b"{}")
    except ValueError:
        summary = {}
    return process.returncode, summary


def last_error(log: Path, lines: int = 1) -> str:
    """The last non-empty lines of a job's log (why it ended)."""
    if not log.exists():
        return ""
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[:300]


def reference_rows(workdir: Path, payloads: Sequence[RawPayload], secret: str) -> Rows:
    """The clean run: the final record of each natural key (with its event id) from a batch over files."""
    workdir.mkdir(parents=True, exist_ok=True)
    raw = write_jsonl(workdir / "raw.jsonl", payloads)
    destinations = destinations_file(workdir / "reference.yaml",
                                     f"{{name: reference, type: sqlite, url: 'sqlite:///{workdir / 'reference.db'}'}}")
    paths = JobPaths(f"sqlite:///{workdir / 'state.db'}", workdir / "dlq", workdir / "job.log")
    code, _ = run_to_end(normalize_command(["--input", str(raw)], destinations, paths, streaming=False),
                         paths.log, secret, timeout_s=300)
    if code != 0:
        raise RuntimeError(f"the clean reference run failed (exit {code}): {last_error(paths.log, 3)}")
    return as_comparable(sqlite_rows(workdir / "reference.db"))
