"""Poison pills: no record can stop the pipeline. Each hostile shape found by the issue-10 corpus is dead-lettered
with its original bytes, the stage and a reason, through files and through the Kafka broker (offsets advance past
it), and the good records of the same run come out exactly as in a clean run. The record state is PostgreSQL, the
store that refuses the most (NUL, lone surrogates, BIGINT range, index row size)."""

from __future__ import annotations

import copy
import json
import random
import sqlite3
import string
import uuid
from pathlib import Path

import psycopg
import pytest

from core.dead_letters import read_dead_letters
from core.raw import RawPayload
from pipelines.demo_data import garmin_daily
from pipelines.normalize import FileSource, KafkaSource, NormalizeJob, run_batch
from schemas.serde import SchemaMismatch, decode
from sinks.sql import SqlSink
from transforms.bounds import MAX_EPOCH_MS, MAX_STRING_CHARS

pytestmark = pytest.mark.timeout(180)

FIXTURES = Path(__file__).parent / "fixtures"
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def state_database():
    """A fresh PostgreSQL database for the record state."""
    name = f"hf_poison_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _line(provider: str, kind: str, payload: object, *, received_at: float = 1_710_000_000_000,
          user_id: str | None = None) -> str:
    event = {"provider": provider, "kind": kind, "received_at": received_at, "payload": json.dumps(payload)}
    if user_id is not None:
        event["user_id"] = user_id
    return json.dumps(event)


def _fixture(path: str) -> dict:
    return json.loads((FIXTURES / path).read_text())


def good_lines() -> list[str]:
    return [_line("garmin", "sleeps", _fixture("garmin/sleeps.final.json")),
            _line("withings", "sleep_getsummary", _fixture("withings/sleep_getsummary.json"), user_id="w-good")]


def hostile_lines(huge: int = 5_000_000) -> dict[str, tuple[str, str, str]]:
    """name → (JSON line, stage it must be dead-lettered at, words its reason must hold). ``huge``: the length of the
    Withings timezone (over the input bound by default; under it, the mapper's OSError is what must be contained)."""
    meas, sleeps = _fixture("withings/getmeas.json"), _fixture("garmin/sleeps.final.json")

    def measure(change, user):
        doc = copy.deepcopy(meas)
        change(doc["body"])
        return _line("withings", "getmeas", doc, user_id=user)

    def sleep(user, **fields):
        doc = copy.deepcopy(sleeps)
        doc["sleeps"] = [dict(doc["sleeps"][0], userId=user, **fields)]
        return _line("garmin", "sleeps", doc)

    def measure_unit(unit):
        return lambda body: body["measuregrps"][0]["measures"][0].update(unit=unit)

    random_id = "".join(random.Random(10).choices(string.ascii_letters + string.digits, k=8000))
    return {
        "huge Withings timezone": (measure(lambda body: body.update(timezone="A" * huge), "w-tz"),
                                   *(("validate", f"body.timezone: string of {huge:,} characters")
                                     if huge > MAX_STRING_CHARS else ("normalize", "File name too long"))),
        "huge Garmin timestamp": (sleep("g-ts", startTimeInSeconds=10**20), "validate", "startTimeInSeconds"),
        "Garmin timestamp past datetime": (sleep("g-ts2", startTimeInSeconds=10**15), "normalize",
                                           "startTimeInSeconds must be unix seconds between 1970-01-02 and 2100"),
        "received_at 1.5e300": (_line("garmin", "sleeps", sleeps, received_at=1.5e300), "decode", "received_at"),
        "lone surrogate in the user id": (sleep("bad\ud800user"), "validate", "lone surrogate"),
        "lone surrogate in a sleep id": (sleep("g-sur", summaryId="x\udc00y"), "validate", "lone surrogate"),
        "NUL in a sleep id": (sleep("g-nul", summaryId="x\u0000y"), "validate", "NUL"),
        "8,000-character sleep id": (sleep("g-long", summaryId=random_id), "validate", "8,000 characters"),
        "Withings unit 1e30": (measure(measure_unit(10**30), "w-unit"), "validate", "unit"),
        "Withings unit 10**9": (measure(measure_unit(10**9), "w-unit2"), "normalize", "measure unit"),
        "Withings unit 1e30 as a float": (measure(measure_unit(1e30), "w-unit3"), "normalize", "measure unit"),
        "infinite number": (sleep("g-inf", durationInSeconds=1.0).replace('durationInSeconds\\": 1.0',
                                                                           'durationInSeconds\\": 1e400'),
                            "validate", "not finite"),
    }


def _delivered(path: Path) -> dict[tuple[str, str, str], str]:
    with sqlite3.connect(path) as conn:
        return {(u, t, k): p for u, t, k, p in conn.execute(
            "SELECT user_id, type, natural_key, payload FROM healthflow_records")}


def _clean_reference(tmp_path: Path) -> dict[tuple[str, str, str], str]:
    (tmp_path / "clean.jsonl").write_text("\n".join(good_lines()) + "\n")
    run_batch(NormalizeJob(FileSource(str(tmp_path / "clean.jsonl")),
                           [SqlSink("sql", f"sqlite:///{tmp_path / 'clean.db'}")], str(tmp_path / "clean-dlq"),
                           state_url=f"sqlite:///{tmp_path / 'clean-state.db'}"))
    return _delivered(tmp_path / "clean.db")


def _as_raw_payload(line: bytes) -> RawPayload:
    event = json.loads(line)
    return RawPayload(event["provider"], event["payload"].encode(), event["kind"], event.get("user_id"),
                      event["received_at"])


def _check_dead_letters(dead_letter_root: Path, hostile: dict[str, tuple[str, str, str]], encoded: bool = False,
                        ) -> None:
    dead = read_dead_letters(str(dead_letter_root))
    if encoded:  # the originals are Avro raw events: match them by their payload
        by_line = {}
        for letter in dead:
            try:
                value = decode("raw_event", letter["original"])
            except SchemaMismatch:  # received_at past what a timestamp holds: the one that cannot be decoded
                by_line[("undecodable", None)] = letter
                continue
            by_line[(value["payload"], value["user_id"])] = letter
    else:
        by_line = {d["original"].decode("utf-8", "surrogatepass"): d for d in dead}
    for name, (line, stage, words) in hostile.items():
        if encoded:
            raw = _as_raw_payload(line.encode("utf-8", "surrogatepass"))
            found = by_line.get(("undecodable", None) if raw.received_at_ms > MAX_EPOCH_MS else (raw.payload,
                                                                                                raw.user_id))
        else:
            found = by_line.get(line)
        assert found is not None, f"{name}: not dead-lettered"
        assert found["stage"] == stage and words in found["error_message"], (name, found["stage"],
                                                                               found["error_message"][:200])
    assert len(by_line) == len(hostile)


def _hostile_file(tmp_path: Path, hostile: dict[str, tuple[str, str, str]]) -> list[bytes]:
    lines = [line for line, _, _ in hostile.values()]
    mixed = [*good_lines()[:1], *lines[:6], *good_lines()[1:], *lines[6:]]
    return [line.encode("utf-8", "surrogatepass") for line in mixed]


def test_every_hostile_shape_from_files_is_dead_lettered_and_the_run_goes_on(tmp_path, state_database):
    hostile = hostile_lines()
    (tmp_path / "raw.jsonl").write_bytes(b"\n".join(_hostile_file(tmp_path, hostile)) + b"\n")
    summary = run_batch(NormalizeJob(FileSource(str(tmp_path / "raw.jsonl")),
                                     [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")], str(tmp_path / "dlq"),
                                     state_url=state_database))
    _check_dead_letters(tmp_path / "dlq", hostile)
    assert sum(summary.with_prefix("dead_letter:").values()) == len(hostile)
    assert _delivered(tmp_path / "out.db") == _clean_reference(tmp_path)


def test_every_hostile_shape_from_the_broker_is_dead_lettered_and_its_offset_committed(tmp_path, state_database,
                                                                                        broker, topic):
    from connectors.publish import publish

    hostile = hostile_lines(huge=900_000)  # the broker's message size limit is 1 MB
    # The broker carries Avro raw events: received_at is a 64-bit long there, so its hostile value is the largest one
    hostile["received_at 1.5e300"] = (_line("garmin", "sleeps", _fixture("garmin/sleeps.final.json"),
                                             received_at=2**63 - 1), "decode", "raw_event")
    lines = _hostile_file(tmp_path, hostile)
    published = publish(broker.bootstrap, topic, [_as_raw_payload(line) for line in lines])
    summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, topic, "poison"),
                                     [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")], str(tmp_path / "dlq"),
                                     state_url=state_database))
    _check_dead_letters(tmp_path / "dlq", hostile, encoded=True)
    assert sum(summary.committed_offsets.values()) == published  # nothing holds the partition back
    assert _delivered(tmp_path / "out.db") == _clean_reference(tmp_path)


def test_a_failing_state_save_fails_that_record_alone(tmp_path, state_database):
    """A value within the input bounds that the state store still refuses (here: a database CHECK) dead-letters its
    own message at stage ``state``; the batch it was saved with is retried row by row and every other record lands."""
    with psycopg.connect(state_database, autocommit=True) as conn:  # the state table, with one more rule
        conn.execute("CREATE TABLE healthflow_record_state (user_id TEXT NOT NULL, type TEXT NOT NULL, natural_key "
                     "TEXT NOT NULL, version_ms BIGINT NOT NULL, data JSONB NOT NULL, PRIMARY KEY (user_id, type, "
                     "natural_key), CHECK (natural_key <> '2024-03-12'))")
    lines = []
    for index, day in enumerate(["2024-03-11", "2024-03-12", "2024-03-11", "2024-03-13"]):
        payload = garmin_daily(f"poison-{index // 2}", day)  # user 0's second day is refused by the store
        lines.append(json.dumps({"provider": "garmin", "kind": "dailies", "received_at": 1_710_000_000_000 + index,
                                 "payload": payload.payload.decode()}))
    (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_batch(NormalizeJob(FileSource(str(tmp_path / "raw.jsonl")),
                                     [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")], str(tmp_path / "dlq"),
                                     state_url=state_database))
    with sqlite3.connect(tmp_path / "out.db") as conn:
        delivered = sorted(row[0] for row in conn.execute("SELECT natural_key FROM healthflow_records"))
    assert summary.get("delivered:sql") == 3 and delivered == ["2024-03-11", "2024-03-11", "2024-03-13"]
    (dead,) = read_dead_letters(str(tmp_path / "dlq"))
    assert dead["stage"] == "state" and "2024-03-12" in dead["original"].decode()
    assert summary.get("dead_letter:state") == 1


def test_each_user_part_of_a_failing_message_is_a_dead_letter_of_its_own(tmp_path, state_database):
    """One message holding two users' records that the state store both refuses: two dead letters, as counted."""
    with psycopg.connect(state_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE healthflow_record_state (user_id TEXT NOT NULL, type TEXT NOT NULL, natural_key "
                     "TEXT NOT NULL, version_ms BIGINT NOT NULL, data JSONB NOT NULL, PRIMARY KEY (user_id, type, "
                     "natural_key), CHECK (natural_key <> '2024-03-12'))")
    dailies = [json.loads(garmin_daily(user, "2024-03-12").payload)["dailies"][0] for user in ("pa", "pb")]
    (tmp_path / "raw.jsonl").write_text(json.dumps({"provider": "garmin", "kind": "dailies",
                                                    "payload": json.dumps({"dailies": dailies})}) + "\n")
    summary = run_batch(NormalizeJob(FileSource(str(tmp_path / "raw.jsonl")),
                                     [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")], str(tmp_path / "dlq"),
                                     state_url=state_database))
    dead = list(read_dead_letters(str(tmp_path / "dlq")))
    assert summary.get("dead_letter:state") == len(dead) == 2
    assert {d["stage"] for d in dead} == {"state"}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_payload_in_another_encoding_json_accepts_is_checked_too(tmp_path, encoding):
    """``json.loads(bytes)`` reads UTF-16/32 (and a BOM): the byte scan reading UTF-8 must not wave such a payload
    through. Payloads arrive as bytes in Avro raw events (broker, Pub/Sub, the API; JSON-lines files carry them as
    JSON strings, always UTF-8)."""
    from core.raw import RawMessage
    from pipelines.normalize import MessagesSource
    from schemas.serde import encode_raw

    doc = _fixture("oura/heartrate.json")
    doc["data"][0]["bpm"] = 10**400  # past a double: an overflow wherever it is encoded as one
    hostile = RawPayload("oura", json.dumps(doc).encode(encoding), "heartrate", "oura-enc", 1_710_000_000_000)
    message = RawMessage(encode_raw(hostile), {"partition": 0, "offset": 1})
    summary = run_batch(NormalizeJob(MessagesSource([message]), [SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}")],
                                     str(tmp_path / "dlq"), state_url=f"sqlite:///{tmp_path / 'state.db'}"))
    [dead] = list(read_dead_letters(str(tmp_path / "dlq")))
    assert dead["stage"] == "validate", dead["error_message"][:200]
    assert dead["error_message"].startswith("bpm: integer of 401 digits")
    assert dead["original"] == message.data
    assert summary.get("delivered:sql") == 2  # the other readings go on: the fixture's two days of heart rate


def test_an_encoded_surrogate_sends_the_payload_to_the_check():
    from transforms.bounds import may_be_out_of_bounds

    assert not may_be_out_of_bounds(b'{"id": "plain \xc3\xa9t\xc3\xa9"}')
    assert may_be_out_of_bounds('{"id": "x\ud800y"}'.encode("utf-8", "surrogatepass"))
    assert may_be_out_of_bounds('{"id": 1}'.encode("utf-16-le"))


def test_local_dead_letters_are_their_owners_alone(tmp_path):
    """Dead letters hold raw payloads (health data): created 0600, in folders created 0700, whatever the umask."""
    import os
    import stat

    hostile = hostile_lines(huge=10)
    (tmp_path / "raw.jsonl").write_bytes(b"\n".join(_hostile_file(tmp_path, hostile)) + b"\n")
    root = tmp_path / "new" / "dlq"
    previous = os.umask(0o022)
    try:
        run_batch(NormalizeJob(FileSource(str(tmp_path / "raw.jsonl")),
                               [SqlSink("sql", f"sqlite:///{tmp_path / 'o.db'}")], str(root),
                               state_url=f"sqlite:///{tmp_path / 'state.db'}"))
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "new").rglob("*") if p.is_file()]
    assert len(files) == len(hostile)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    folders = [p for p in (tmp_path / "new").rglob("*") if p.is_dir()] + [tmp_path / "new"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o700}
