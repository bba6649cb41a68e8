"""Avro serialization: single-object encoding for messages, validation for normalized records.

Messages on healthflow topics use Avro single-object encoding (``C3 01`` + 8-byte CRC-64-AVRO
fingerprint + body) so every message names the exact writer schema it was written with.
"""

from __future__ import annotations

import io
import math
import struct
from functools import cache
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas import envelope_schema, model_fullname, model_schema

SINGLE_OBJECT_MAGIC = b"\xc3\x01"


class SchemaMismatch(ValueError):
    """A record does not conform to its Avro schema (permanent: retrying cannot fix it)."""


@cache
def _fingerprint(name: str) -> bytes:
    schema = envelope_schema(name)
    return struct.pack("<Q", int(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"), 16))


def encode(name: str, record: dict[str, Any]) -> bytes:
    """Encode ``record`` with envelope schema ``name`` in Avro single-object encoding."""
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + _fingerprint(name))
    fastavro.schemaless_writer(buf, envelope_schema(name), record)
    return buf.getvalue()


def decode(name: str, data: bytes) -> dict[str, Any]:
    """Decode a single-object-encoded message written with envelope schema ``name``.

    Raises SchemaMismatch when the bytes are not a message of that schema.
    """
    header = SINGLE_OBJECT_MAGIC + _fingerprint(name)
    if not data.startswith(header):
        raise SchemaMismatch(f"not a single-object-encoded {name} message (bad magic or schema fingerprint)")
    try:
        return fastavro.schemaless_reader(io.BytesIO(data[len(header):]), envelope_schema(name), None)
    except (EOFError, ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise SchemaMismatch(f"truncated or corrupt {name} message: {exc}") from exc


def encode_event(event: dict[str, Any]) -> bytes:
    """Encode a normalized event (``NormalizedEvent.to_dict()`` shape, ``data`` = one record or a list).

    Each record is tagged with its model's union branch: left to fastavro, a Daily holding only
    fields a Sleep also has would be written as a Sleep.
    """
    records = event["data"] if isinstance(event["data"], list) else [event["data"]]
    fields = {f["name"] for f in envelope_schema("normalized_event")["fields"]}
    tagged = {k: v for k, v in event.items() if k in fields}
    tagged["data"] = [(model_fullname(event["type"]), r) for r in records]
    return encode("normalized_event", tagged)


def validate_record(model_type: str, record: dict[str, Any]) -> dict[str, Any]:
    """Check a normalized record against its model schema and return it conformed.

    Conforming rounds floats that land in integer fields (Terra's SDK rejects 9120.4 for
    ``distance_meters``): providers report some quantities with decimals that Terra's models carry
    as integers, and rounding here, in one place, keeps mappers simple. Anything else that does not
    fit — a wrong type, a missing required field, a field the schema does not define (Avro would
    silently drop it) — raises SchemaMismatch naming the field path.
    """
    return _check(record, model_schema(model_type), model_type, _record_names(model_type))


@cache
def _record_names(model_type: str) -> dict[str, dict[str, Any]]:
    """Every named record in a model schema by full name (parsed schemas refer back by name)."""
    names: dict[str, dict[str, Any]] = {}

    def collect(node: Any) -> None:
        if isinstance(node, list):
            for branch in node:
                collect(branch)
        elif isinstance(node, dict):
            if node.get("type") == "record":
                names[node["name"]] = node
                for field in node["fields"]:
                    collect(field["type"])
            elif node.get("type") in ("array", "map"):
                collect(node.get("items") or node.get("values"))

    collect(model_schema(model_type))
    return names


def _is_number(value: Any) -> bool:
    """A finite number: NaN and infinities have no JSON form, so no destination could take them."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


_PRIMITIVES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31,
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63,
    "double": lambda v: _is_number(v),
    "float": lambda v: _is_number(v),
    "bytes": lambda v: isinstance(v, bytes),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: Any, path: str, names: dict[str, dict[str, Any]]) -> Any:
    if isinstance(schema, str):
        if schema in names:
            schema = names[schema]
        else:
            if schema in ("int", "long") and isinstance(value, float) and math.isfinite(value):
                value = round(value)
            if not _PRIMITIVES[schema](value):
                raise SchemaMismatch(f"{path}: expected {schema}, got {type(value).__name__} {value!r:.60}")
            return value
    if isinstance(schema, list):
        if value is None and "null" in schema:
            return None
        errors = []
        for branch in schema:
            if branch == "null":
                continue
            try:
                return _check(value, branch, path, names)
            except SchemaMismatch as exc:
                errors.append(str(exc))
        raise SchemaMismatch(errors[0] if len(errors) == 1 else f"{path}: no union branch fits: {errors}")
    kind = schema["type"]
    if kind == "record":
        if not isinstance(value, dict):
            raise SchemaMismatch(f"{path}: expected an object, got {type(value).__name__}")
        fields = _fields(schema)
        for key in value:
            if key not in fields:
                raise SchemaMismatch(f"{path}.{key}: field not defined by the schema")
        out = {}
        for name, (field_type, optional) in fields.items():
            if name in value:
                out[name] = _check(value[name], field_type, f"{path}.{name}", names)
            elif not optional:
                raise SchemaMismatch(f"{path}.{name}: required field missing")
        return out
    if kind == "array":
        if not isinstance(value, list):
            raise SchemaMismatch(f"{path}: expected a list, got {type(value).__name__}")
        return [_check(item, schema["items"], f"{path}[{i}]", names) for i, item in enumerate(value)]
    if kind == "map":
        if not isinstance(value, dict):
            raise SchemaMismatch(f"{path}: expected an object, got {type(value).__name__}")
        return {k: _check(v, schema["values"], f"{path}.{k}", names) for k, v in value.items()}
    if kind == "enum":
        if value not in schema["symbols"]:
            raise SchemaMismatch(f"{path}: {value!r} is not one of {schema['symbols']}")
        return value
    return _check(value, kind, path, names)


_FIELD_CACHE: dict[int, dict[str, tuple[Any, bool]]] = {}


def _fields(record_schema: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
    """``name → (type, optional)`` of a parsed record schema, cached per schema object."""
    key = id(record_schema)
    cached = _FIELD_CACHE.get(key)
    if cached is None:
        cached = {f["name"]: (f["type"], "default" in f or (isinstance(f["type"], list) and "null" in f["type"]))
                  for f in record_schema["fields"]}
        _FIELD_CACHE[key] = cached
    return cached
