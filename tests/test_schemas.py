"""Avro schemas (schemas/avro): they parse, match Terra's SDK by wire name, round-trip through
schemas.serde, reject foreign bytes, and validate_record reports the failing field path.

Compatibility gate, deliberately simple: each schema reads what it writes, and every envelope field either
has a default (so older messages stay readable) or is listed below as required by design.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import fastavro
import pydantic
import pytest
from fastavro.schema import to_parsing_canonical_form
from terra_oracle import SDK_MODELS, nested_models, wire_fields

from core.dead_letters import dead_letter
from core.events import NormalizedEvent
from core.raw import RawMessage, RawPayload
from pipelines.demo_data import Simulator
from schemas import AVRO_DIR, MODEL_TYPES, envelope_schema, envelope_versions, model_fullname, model_schema
from schemas.serde import SchemaMismatch, decode, encode, encode_raw, validate_record
from transforms.normalize import normalize_in_memory

ENVELOPES = ("raw_event", "normalized_event", "dead_letter")
# Envelope fields without a default: a reader of a newer schema cannot fill them in, so each one is a decision.
REQUIRED_BY_DESIGN = {
    "raw_event": {"idempotency_key", "provider", "received_at", "payload"},
    "normalized_event": {"event_id", "type", "user", "natural_key", "ordering_timestamp_ms", "sequence", "data"},
    "normalized_event.user": {"user_id", "provider"},  # Terra guarantees both in every event
    "dead_letter": {"dead_letter_id", "stage", "error_class", "error_message", "failed_at", "original"},
}
MINIMAL = {  # the smallest valid record of each model
    "activity": {"metadata": {"summary_id": "a-1", "start_time": "2024-03-11T06:30:00.000000+05:30",
                              "end_time": "2024-03-11T07:16:30.000000+05:30", "type": 8, "upload_type": 1}},
    "sleep": {"metadata": {"start_time": "2024-03-10T23:12:00.000000-05:00",
                           "end_time": "2024-03-11T06:58:00.000000-05:00", "upload_type": 2}},
    "daily": {"metadata": {"start_time": "2024-03-11T00:00:00.000000-05:00",
                           "end_time": "2024-03-12T00:00:00.000000-05:00", "upload_type": 1}},
    "body": {"metadata": {"start_time": "2024-03-11T00:00:00.000000-05:00",
                          "end_time": "2024-03-12T00:00:00.000000-05:00"}},
    "menstruation": {"metadata": {"start_time": "2024-03-02T00:00:00.000000",
                                  "end_time": "2024-03-03T00:00:00.000000"}},
    "nutrition": {"metadata": {"start_time": "2024-03-11T00:00:00.000000+01:00",
                               "end_time": "2024-03-12T00:00:00.000000+01:00"}},
    "athlete": {"first_name": "Ana", "age": 34},
}


def drop_nulls(value: Any) -> Any:
    """Avro writes every absent optional field as null; absent == null in Terra."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def event_record(event: NormalizedEvent) -> dict[str, Any]:
    """A NormalizedEvent as the normalized_event envelope; the data union branch is named explicitly."""
    return {"event_id": event.event_id, "type": event.type, "version": event.version, "user": event.user,
            "natural_key": event.natural_key, "ordering_timestamp_ms": event.ordering_timestamp_ms,
            "sequence": event.sequence, "raw_idempotency_key": event.raw_idempotency_key,
            "data": [(model_fullname(event.type), event.data)]}


@pytest.fixture(scope="module")
def events() -> list[NormalizedEvent]:
    messages = (RawMessage(encode_raw(payload), {"partition": 0, "offset": offset})
                for offset, payload in enumerate(Simulator(users=30, days=3).payloads()))
    return normalize_in_memory(messages)[0]


# ----------------------------------------------------------------------------------------------------------------------
# parsing and the SDK
# ----------------------------------------------------------------------------------------------------------------------
def test_every_avsc_file_parses() -> None:
    files = sorted(AVRO_DIR.rglob("*.avsc"))
    assert {p.stem for p in files if p.parent.name == "models"} == set(MODEL_TYPES)
    assert {p.stem for p in files if p.parent.name == "envelopes"} == set(ENVELOPES)
    assert {p.stem for p in files if p.parent.name == "history"} == {"normalized_event.1"}  # earlier versions
    assert len(files) == len(MODEL_TYPES) + len(ENVELOPES) + 1
    for path in files:
        assert isinstance(json.loads(path.read_text()), dict), path
    for model_type in MODEL_TYPES:
        parsed = model_schema(model_type)
        assert parsed["name"] == model_fullname(model_type)
        assert to_parsing_canonical_form(parsed)
    for name in ENVELOPES:
        assert to_parsing_canonical_form(envelope_schema(name))
        assert all(to_parsing_canonical_form(version) for version in envelope_versions(name))


def sdk_model_of(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The one SDK model an annotation holds, if any."""
    found = nested_models(annotation)
    assert len(found) <= 1, annotation
    return found[0] if found else None


def record_branches(avro_type: Any) -> list[dict[str, Any]]:
    """Record schemas inside a (parsed) field type: unions, arrays and maps unwrapped."""
    if isinstance(avro_type, list):
        return [r for branch in avro_type for r in record_branches(branch)]
    if isinstance(avro_type, dict):
        if avro_type["type"] == "record":
            return [avro_type]
        if avro_type["type"] == "array":
            return record_branches(avro_type["items"])
        if avro_type["type"] == "map":
            return record_branches(avro_type["values"])
    return []


def field_mismatches(record: dict[str, Any], model: type[pydantic.BaseModel], path: str,
                     named: dict[str, dict[str, Any]]) -> list[str]:
    """Avro field names that the SDK model does not declare (and vice versa), recursively, by wire name."""
    sdk = wire_fields(model)
    avro = {f["name"]: f["type"] for f in record["fields"]}
    problems = [f"{path}.{name}: not in the SDK" for name in sorted(set(avro) - set(sdk))]
    problems += [f"{path}.{name}: missing from the schema" for name in sorted(set(sdk) - set(avro))]
    for name, avro_type in avro.items():
        nested = sdk_model_of(sdk.get(name))
        for branch in record_branches(avro_type if not isinstance(avro_type, str) else named.get(avro_type)):
            if nested is None:
                problems.append(f"{path}.{name}: a record where the SDK has {sdk.get(name)}")
            else:
                problems += field_mismatches(branch, nested, f"{path}.{name}", named)
    return problems


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_model_fields_exist_in_the_sdk_model_by_wire_name(model_type: str) -> None:
    schema = json.loads((AVRO_DIR / "models" / f"{model_type}.avsc").read_text())
    sdk = wire_fields(SDK_MODELS[model_type])
    top = [f["name"] for f in schema["fields"]]
    assert set(top) <= set(sdk), sorted(set(top) - set(sdk))
    named: dict[str, dict[str, Any]] = {}

    def collect(node: Any) -> None:
        for record in record_branches(node):
            named[record["name"]] = record
            for f in record["fields"]:
                collect(f["type"])

    collect(schema)
    assert field_mismatches(schema, SDK_MODELS[model_type], model_type, named) == []
    if model_type in ("activity", "daily"):
        assert "MET_data" in top  # Terra's wire name, not the SDK attribute met_data


def test_field_comparison_can_fail() -> None:
    schema = {"type": "record", "name": "Daily", "fields": [
        {"name": "met_data", "type": ["null", "string"]},
        {"name": "distance_data",
         "type": {"type": "record", "name": "D", "fields": [{"name": "stepz", "type": "long"}]}},
    ]}
    problems = field_mismatches(schema, SDK_MODELS["daily"], "daily", {})
    assert "daily.met_data: not in the SDK" in problems
    assert "daily.MET_data: missing from the schema" in problems
    assert "daily.distance_data.stepz: not in the SDK" in problems


# ----------------------------------------------------------------------------------------------------------------------
# serde: envelopes
# ----------------------------------------------------------------------------------------------------------------------
def test_raw_event_round_trip() -> None:
    payload = RawPayload("oura", b'{"data": [{"id": "x"}]}', kind="sleep", user_id="oura-7",
                         received_at_ms=1710137564123)
    decoded = decode("raw_event", encode_raw(payload))
    assert decoded["received_at"] == datetime(2024, 3, 11, 6, 12, 44, 123000, tzinfo=UTC)
    assert {k: v for k, v in decoded.items() if k != "received_at"} == {
        "idempotency_key": payload.idempotency_key(), "provider": "oura", "kind": "sleep", "user_id": "oura-7",
        "content_type": "application/json", "payload": b'{"data": [{"id": "x"}]}'}
    garmin = decode("raw_event", encode_raw(RawPayload("garmin", b"{}", received_at_ms=1)))
    assert garmin["kind"] is None and garmin["user_id"] is None


def test_dead_letter_round_trip() -> None:
    record = dead_letter(stage="normalize", error=ValueError("missing required field(s): startTimeInSeconds"),
                         original=b"\xc3\x01raw bytes", source={"partition": 2, "offset": 40, "document_index": 1},
                         provider="garmin", kind="dailies", user_id=None)
    decoded = decode("dead_letter", encode("dead_letter", record))
    assert decoded["failed_at"] == datetime.fromtimestamp(record["failed_at"] / 1000, tz=UTC)
    assert {k: v for k, v in decoded.items() if k != "failed_at"} == {
        k: v for k, v in record.items() if k != "failed_at"}
    assert decoded["source"] == {"partition": "2", "offset": "40", "document_index": "1"}


def test_normalized_events_round_trip(events: list[NormalizedEvent]) -> None:
    assert len(events) > 200
    for event in events:
        decoded = decode("normalized_event", encode("normalized_event", event_record(event)))
        assert drop_nulls(decoded["data"]) == [event.data], (event.provider, event.type)
        assert decoded["user"] == {**event.user, "reference_id": None, "scopes": None, "active": None}
        assert {k: decoded[k] for k in ("event_id", "type", "version", "natural_key", "ordering_timestamp_ms",
                                        "sequence", "raw_idempotency_key")} == {
            "event_id": event.event_id, "type": event.type, "version": event.version,
            "natural_key": event.natural_key, "ordering_timestamp_ms": event.ordering_timestamp_ms,
            "sequence": event.sequence, "raw_idempotency_key": event.raw_idempotency_key}


def test_decode_rejects_garbage_and_other_schemas() -> None:
    raw = encode_raw(RawPayload("garmin", b'{"dailies": []}', received_at_ms=1710137564000))
    letter = encode("dead_letter", dead_letter(stage="parse", error=ValueError("bad"), original=raw))
    with pytest.raises(SchemaMismatch, match="bad magic or schema fingerprint"):
        decode("raw_event", b'{"dailies": []}')
    with pytest.raises(SchemaMismatch, match="bad magic or schema fingerprint"):
        decode("raw_event", b"")
    with pytest.raises(SchemaMismatch, match="not a single-object-encoded raw_event"):
        decode("raw_event", letter)  # a dead letter is not a raw event
    with pytest.raises(SchemaMismatch, match="not a single-object-encoded dead_letter"):
        decode("dead_letter", raw)
    with pytest.raises(SchemaMismatch, match="truncated or corrupt raw_event"):
        decode("raw_event", raw[:-5])
    assert decode("raw_event", raw)["provider"] == "garmin"


# ----------------------------------------------------------------------------------------------------------------------
# validate_record
# ----------------------------------------------------------------------------------------------------------------------
DAY = {"start_time": "2024-03-11T00:00:00.000000-05:00", "end_time": "2024-03-12T00:00:00.000000-05:00",
       "upload_type": 1}


def test_validate_record_rejects_unknown_nested_field() -> None:
    with pytest.raises(SchemaMismatch, match=r"^sleep\.sleep_durations_data\.asleep\.deep_seconds: field not defined"):
        validate_record("sleep", {"metadata": DAY, "sleep_durations_data": {"asleep": {"deep_seconds": 5400}}})
    with pytest.raises(SchemaMismatch, match=r"^daily\.met_data: field not defined"):
        validate_record("daily", {"metadata": DAY, "met_data": {"avg_level": 1.2}})


def test_validate_record_rejects_wrong_type() -> None:
    with pytest.raises(SchemaMismatch, match=r"^daily\.distance_data\.steps: expected long, got str 'many'"):
        validate_record("daily", {"metadata": DAY, "distance_data": {"steps": "many"}})
    with pytest.raises(SchemaMismatch,
                       match=r"^sleep\.sleep_durations_data\.hypnogram_samples\[1\]\.level: expected int, got str"):
        validate_record("sleep", {"metadata": DAY, "sleep_durations_data": {"hypnogram_samples": [
            {"timestamp": "2024-03-11T01:00:00.000000-05:00", "level": 4},
            {"timestamp": "2024-03-11T01:30:00.000000-05:00", "level": "deep"}]}})
    with pytest.raises(SchemaMismatch, match=r"^daily\.metadata: expected an object, got NoneType"):
        validate_record("daily", {"metadata": None})


def test_validate_record_rejects_missing_required_field() -> None:
    with pytest.raises(SchemaMismatch, match=r"^activity\.metadata\.summary_id: required field missing"):
        validate_record("activity", {"metadata": {**DAY, "type": 8}})
    with pytest.raises(SchemaMismatch, match=r"^daily\.metadata: required field missing"):
        validate_record("daily", {"distance_data": {"steps": 1}})


def test_validate_record_rounds_floats_in_integer_fields_only() -> None:
    record = {"metadata": DAY, "distance_data": {"steps": 11842.0, "distance_meters": 9120.4},
              "heart_rate_data": {"summary": {"avg_hr_bpm": 85.75}}}
    conformed = validate_record("daily", record)
    assert conformed["distance_data"] == {"steps": 11842, "distance_meters": 9120}
    assert isinstance(conformed["distance_data"]["steps"], int)
    assert conformed["heart_rate_data"]["summary"]["avg_hr_bpm"] == 85.75  # double: untouched
    assert record["distance_data"]["distance_meters"] == 9120.4  # the input is not modified
    with pytest.raises(SchemaMismatch, match=r"^daily\.distance_data\.steps: expected long, got float nan"):
        validate_record("daily", {"metadata": DAY, "distance_data": {"steps": float("nan")}})



def _outcome(check: Any, model_type: str, record: Any) -> tuple[str, str]:
    """What a check gives: the record (with the exact type of every value) or the mismatch's message."""
    try:
        conformed = check(model_type, record)
    except SchemaMismatch as exc:
        return "refused", str(exc)

    def typed(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: typed(item) for key, item in value.items()}, type(value).__name__
        if isinstance(value, list):
            return [typed(item) for item in value]
        return repr(value), type(value).__name__

    return "conformed", repr(typed(conformed))


def test_conform_record_is_validate_record_of_the_compacted_record() -> None:
    """The one-pass compact-and-validate gives exactly what compacting then validating gives: the same record, value
    types and key order included, or the same mismatch (dead letters keep their reason), on mapper output as built
    (None and empty parts included) and on hostile variants of it."""
    import random
    from collections import OrderedDict

    from connectors import get_provider
    from schemas.serde import compact, conform_record

    def strict(model_type: str, record: Any) -> Any:
        return validate_record(model_type, compact(record))

    records = [(model_type, record) for model_type, record in MINIMAL.items()]
    contributors = [{"contributor_name": "hrv", "contributor_score": 3}, {}, {"contributor_name": None}, None]
    records += [("daily", {}), ("daily", {"metadata": {"start_time": None}}),
                ("daily", {**MINIMAL["daily"], "data_enrichment": {"cardiovascular_contributors": contributors}}),
                ("daily", {**MINIMAL["daily"], "data_enrichment": {"cardiovascular_contributors": contributors[:1],
                                                                   "immune_contributors": [None, None]}})]
    for payload in Simulator(6, 1).payloads():
        try:
            provider = get_provider(payload.provider)
            documents = list(provider.documents(json.loads(payload.payload), payload.kind))
        except (KeyError, ValueError):  # the simulator's unknown provider and malformed payloads
            continue
        for kind, doc in documents:
            try:
                fragments = provider.normalize_document(kind, doc, payload.user_id, compacted=False)
            except ValueError:
                continue
            records += [(f.type, f.data) for f in fragments]
    hostile = [None, {}, [], [None], [{}], {"x": None}, "text", -1, 2**70, 1e308, float("nan"), float("inf"), 3.6,
               True, {"unknown": 1}, [1, None], OrderedDict(a=None), ("t",), b"bytes"]
    rng = random.Random(11)

    def mutated(value: Any, depth: int = 0) -> Any:
        if isinstance(value, dict) and value and depth < 6:
            copy = dict(value)
            key = rng.choice(sorted(copy))
            copy[key] = rng.choice(hostile) if rng.random() < 0.3 else mutated(copy[key], depth + 1)
            if rng.random() < 0.1:
                copy[rng.choice(["metadata", "extra", "timestamp"])] = rng.choice(hostile)
            return copy
        if isinstance(value, list) and value and depth < 6:
            index = rng.randrange(len(value))
            return [*value[:index], rng.choice(hostile) if rng.random() < 0.3 else mutated(value[index], depth + 1),
                    *value[index + 1:]]
        return rng.choice(hostile)

    refused = 0
    for model_type, record in records:
        assert _outcome(conform_record, model_type, record) == _outcome(strict, model_type, record)
        for _ in range(25):
            variant = mutated(record)
            expected = _outcome(strict, model_type, variant)
            assert _outcome(conform_record, model_type, variant) == expected, variant
            refused += expected[0] == "refused"
    assert 300 < refused < 25 * len(records) - 300  # the variants exercise both outcomes


def test_a_compacting_providers_record_that_does_not_validate_is_dead_lettered_with_its_reason() -> None:
    """Garmin and Oura records are compacted as they are validated; what fails is dead-lettered at the validate
    stage with the same reason as when the mapper compacted them, the original bytes kept."""
    from transforms.normalize import Failed, normalize_message

    garmin = RawPayload("garmin", json.dumps({"dailies": [{
        "userId": "u1", "startTimeInSeconds": 1793574000, "steps": "many", "distanceInMeters": None}]}).encode())
    oura = RawPayload("oura", json.dumps({"data": [{"bpm": "fast", "source": "rest",
                                                    "timestamp": "2026-11-02T10:00:00+00:00"}]}).encode(),
                      kind="heartrate", user_id="o1")
    bpm = "daily.heart_rate_data.detailed.hr_samples[0].bpm"
    for payload, reason in ((garmin, "daily.distance_data.steps: expected long, got str 'many'"),
                            (oura, f"{bpm}: expected double, got str 'fast'")):
        message = RawMessage(encode_raw(payload), {"partition": 0, "offset": 1})
        (outcome,) = normalize_message(message)
        assert isinstance(outcome, Failed) and outcome.stage == "validate"
        assert (outcome.record["error_class"], outcome.record["error_message"]) == ("SchemaMismatch", reason)
        assert outcome.record["original"] == message.data

# ----------------------------------------------------------------------------------------------------------------------
# compatibility gate
# ----------------------------------------------------------------------------------------------------------------------
def fresh(folder: str, name: str, named: dict[str, Any] | None = None) -> dict[str, Any]:
    """The schema parsed again from its file (not the cached copy the writer uses)."""
    return fastavro.parse_schema(json.loads((AVRO_DIR / folder / f"{name}.avsc").read_text()),
                                 named_schemas=named if named is not None else {})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_model_schema_reads_what_it_writes(model_type: str, events: list[NormalizedEvent]) -> None:
    samples = [MINIMAL[model_type], *[e.data for e in events if e.type == model_type][:25]]
    reader = fresh("models", model_type)
    for sample in samples:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, model_schema(model_type), validate_record(model_type, sample))
        buf.seek(0)
        assert drop_nulls(fastavro.schemaless_reader(buf, model_schema(model_type), reader)) == sample


@pytest.mark.parametrize("name", ENVELOPES)
def test_envelope_schema_reads_what_it_writes(name: str, events: list[NormalizedEvent]) -> None:
    message = {
        "raw_event": lambda: encode_raw(RawPayload("whoop", b'{"records": []}', kind="sleep", received_at_ms=5)),
        "normalized_event": lambda: encode("normalized_event", event_record(events[0])),
        "dead_letter": lambda: encode("dead_letter", dead_letter(stage="parse", error=ValueError("x"), original=b"")),
    }[name]()
    named: dict[str, Any] = {}
    for model_type in MODEL_TYPES:
        fresh("models", model_type, named)
    reader = fresh("envelopes", name, named)
    writer = envelope_schema(name)
    body = io.BytesIO(message[10:])  # after the 2-byte magic and the 8-byte fingerprint
    assert fastavro.schemaless_reader(body, writer, reader) == decode(name, message)


def envelope_records(name: str) -> dict[str, dict[str, Any]]:
    """The envelope record and its own nested records (not the model records it refers to)."""
    schema = json.loads((AVRO_DIR / "envelopes" / f"{name}.avsc").read_text())
    records = {name: schema}
    for field in schema["fields"]:
        if isinstance(field["type"], dict) and field["type"].get("type") == "record":
            records[f"{name}.{field['name']}"] = field["type"]
    return records


@pytest.mark.parametrize("name", ENVELOPES)
def test_envelope_fields_have_defaults_or_are_required_by_design(name: str) -> None:
    for path, record in envelope_records(name).items():
        without_default = {f["name"] for f in record["fields"] if "default" not in f}
        assert without_default == REQUIRED_BY_DESIGN.get(path, set()), path
        for field in record["fields"]:
            if "default" in field and isinstance(field["type"], list):
                # a union's default must match its first branch (Avro spec), or readers reject the schema
                assert (field["default"] is None) == (field["type"][0] == "null"), (path, field["name"])
    if name == "normalized_event":
        event_type = next(f["type"] for f in envelope_records(name)[name]["fields"] if f["name"] == "type")
        assert event_type["default"] in event_type["symbols"]  # new event types decode as "unknown"
        assert set(MODEL_TYPES) <= set(event_type["symbols"])


# ----------------------------------------------------------------------------------------------------------------------
# tombstones: normalized_event version 2 adds an optional ``deleted``; data events keep version 1's bytes
# ----------------------------------------------------------------------------------------------------------------------
def _body_read_with(message: bytes, writer: dict[str, Any], reader: dict[str, Any]) -> dict[str, Any]:
    return fastavro.schemaless_reader(io.BytesIO(message[10:]), writer, reader)


def test_a_data_event_is_written_as_before_tombstones_and_read_by_both_versions(
        events: list[NormalizedEvent]) -> None:
    from schemas import envelope_version
    from schemas.serde import encode_event

    version_1 = fresh("envelopes/history", "normalized_event.1", _models_named())
    message = encode_event(events[0].to_dict())

    assert message[:10] == b"\xc3\x01" + _fingerprint_of(version_1)  # an old consumer finds its schema
    assert message == encode("normalized_event", event_record(events[0]),
                             writer=envelope_version("normalized_event", 1))
    old_view = _body_read_with(message, version_1, version_1)
    assert decode("normalized_event", message) == {**old_view, "deleted": None}


def test_a_tombstone_carries_its_key_and_old_readers_resolve_it_without_the_field() -> None:
    from schemas.serde import encode_event

    tombstone = NormalizedEvent.tombstone(type="daily", user={"user_id": "u", "provider": "OURA"},
                                          natural_key="2026-03-10", ordering_timestamp_ms=7, sequence="3")
    message = encode_event(tombstone.to_dict())

    decoded = decode("normalized_event", message)
    assert decoded["data"] == [] and decoded["deleted"] == [
        {"natural_key": "2026-03-10", "summary_id": None, "date": "2026-03-10", "start_time": None}]
    named = _models_named()
    current, version_1 = fresh("envelopes", "normalized_event", dict(named)), fresh(
        "envelopes/history", "normalized_event.1", dict(named))
    old_view = _body_read_with(message, current, version_1)  # a consumer resolving with a registry
    assert "deleted" not in old_view and old_view["event_id"] == tombstone.event_id and old_view["data"] == []


def _models_named() -> dict[str, Any]:
    named: dict[str, Any] = {}
    for model_type in MODEL_TYPES:
        fresh("models", model_type, named)
    return named


def _fingerprint_of(schema: dict[str, Any]) -> bytes:
    import struct

    from fastavro.schema import fingerprint

    return struct.pack("<Q", int(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"), 16))
