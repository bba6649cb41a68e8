"""Workers starting at once create the same tables at once: on every dialect, every one of them opens (the record
state and the SQL destination), and a batch on the multi-process local runner completes."""

from __future__ import annotations

import multiprocessing
import uuid

import psycopg
import pymysql
import pytest

pytestmark = pytest.mark.timeout(240)

WORKERS, ROUNDS = 3, 3


def _open_at_once(what: str, url: str, barrier, results, worker: int = 0) -> None:
    try:
        barrier.wait(30)
        if what == "SQL destinations sharing a new schema":  # each its own tables, the schema created once
            from sinks.sql import SqlSink

            sink = SqlSink(f"sql{worker}", url, table_prefix=f"w{worker}_", schema="shared")
            sink.open()
            sink.close()
        elif what == "record state":
            from transforms.record_state import open_state

            state = open_state(url)
            state.open()
            state.close()
        else:
            from sinks.sql import SqlSink

            sink = SqlSink("sql", url)
            sink.open()
            sink.close()
        results.put(None)
    except BaseException as exc:  # reported to the test, whatever it is
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.fixture
def fresh_database(tmp_path):
    """``fresh_database(dialect)`` → the URL of a new, empty database (dropped after the test)."""
    created: list[tuple[str, str]] = []

    def make(dialect: str) -> str:
        name = f"hf_race_{uuid.uuid4().hex[:8]}"
        if dialect == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        created.append((dialect, name))
        _admin(dialect, f"CREATE DATABASE {name}")
        if dialect == "postgres":
            return f"postgresql://postgres@127.0.0.1:5432/{name}"
        return f"mysql://root@127.0.0.1:3306/{name}"

    yield make
    for dialect, name in created:
        _admin(dialect, f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if dialect == "postgres" else ""))


def _admin(dialect: str, statement: str) -> None:
    if dialect == "postgres":
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(statement)
        return
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root")
    try:
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


@pytest.mark.parametrize(("what", "dialect"), [
    ("record state", "sqlite"), ("record state", "postgres"),
    ("SQL destination", "sqlite"), ("SQL destination", "postgres"), ("SQL destination", "mysql"),
    ("SQL destinations sharing a new schema", "postgres")])
def test_workers_creating_the_same_tables_at_once_all_open(what, dialect, fresh_database):
    context = multiprocessing.get_context("spawn")
    errors = []
    for _ in range(ROUNDS):
        url = fresh_database(dialect)
        barrier, results = context.Barrier(WORKERS), context.Queue()
        workers = [context.Process(target=_open_at_once, args=(what, url, barrier, results, n)) for n in range(WORKERS)]
        for worker in workers:
            worker.start()
        errors += [error for error in (results.get(timeout=120) for _ in workers) if error]
        for worker in workers:
            worker.join(30)
    assert errors == []


def test_a_batch_on_the_multi_process_runner_creates_its_tables_once(tmp_path, simulated_payloads, fresh_database):
    from test_streaming import write_jsonl

    from pipelines.normalize import FileSource, NormalizeJob, run_batch
    from sinks.sql import SqlSink

    write_jsonl(tmp_path / "raw.jsonl", simulated_payloads)
    reference = run_batch(NormalizeJob(FileSource(str(tmp_path / "raw.jsonl")),
                                       [SqlSink("sql", f"sqlite:///{tmp_path / 'ref.db'}")], str(tmp_path / "ref-dlq"),
                                       state_url=f"sqlite:///{tmp_path / 'ref-state.db'}"))
    summary = run_batch(NormalizeJob(FileSource(str(tmp_path / "raw.jsonl")),
                                     [SqlSink("sql", fresh_database("postgres"))], str(tmp_path / "dlq"),
                                     state_url=fresh_database("postgres")),
                        ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert summary.get("delivered:sql") == reference.get("delivered:sql") > 0
