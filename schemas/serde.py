"""Avro serialization: single-object encoding for messages, validation for normalized records.

Messages on healthflow topics use Avro single-object encoding (``C3 01`` + 8-byte CRC-64-AVRO
fingerprint + body) so every message names the exact writer schema it was written with.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable
from functools import cache
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from core.raw import RawPayload
from schemas import envelope_schema, envelope_version, envelope_versions, model_fullname, model_schema

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
DATA_EVENT_WRITER = 1  # the normalized_event version data events are written with (schemas/avro/envelopes/history)


class SchemaMismatch(ValueError):
    """A record does not conform to its Avro schema (permanent: retrying cannot fix it)."""


@cache
def _fingerprint(name: str) -> bytes:
    return _schema_fingerprint(envelope_schema(name))


def _schema_fingerprint(schema: dict[str, Any]) -> bytes:
    return struct.pack("<Q", int(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"), 16))


@cache
def _writers(name: str) -> dict[bytes, dict[str, Any]]:
    """The writer schemas a message of envelope ``name`` may carry, by single-object header: the current one and its
    earlier versions (``schemas.envelope_versions``)."""
    schemas = [envelope_schema(name), *envelope_versions(name)]
    return {SINGLE_OBJECT_MAGIC + _schema_fingerprint(schema): schema for schema in schemas}


def encode(name: str, record: dict[str, Any], writer: dict[str, Any] | None = None) -> bytes:
    """Encode ``record`` with envelope schema ``name`` (or an earlier version of it, ``writer``) in Avro
    single-object encoding."""
    schema = writer or envelope_schema(name)
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + (_fingerprint(name) if writer is None else _schema_fingerprint(schema)))
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def encode_raw(payload: RawPayload) -> bytes:
    """A provider payload as a ``raw_event`` message (what the ingestion topic carries)."""
    return encode("raw_event", payload.record())


def decode(name: str, data: bytes) -> dict[str, Any]:
    """Decode a single-object-encoded message written with envelope schema ``name`` or an earlier version of it
    (read as the current one: a field added since takes its default).

    Raises SchemaMismatch when the bytes are not a message of that schema.
    """
    header = data[:len(SINGLE_OBJECT_MAGIC) + 8]
    writer = _writers(name).get(header)
    if writer is None:
        raise SchemaMismatch(f"not a single-object-encoded {name} message (bad magic or schema fingerprint)")
    reader = envelope_schema(name)
    try:
        return fastavro.schemaless_reader(io.BytesIO(data[len(header):]), writer, None if writer is reader else reader)
    except (EOFError, ValueError, IndexError, UnicodeDecodeError, struct.error, OverflowError) as exc:
        raise SchemaMismatch(f"truncated or corrupt {name} message: {exc}") from exc


def encode_event(event: dict[str, Any]) -> bytes:
    """Encode a normalized event (``NormalizedEvent.to_dict()`` shape, ``data`` = one record or a list; a tombstone,
    ``deleted`` true, goes with ``data`` empty and its key in ``deleted``).

    A data event is written with the envelope's version 1 (``DATA_EVENT_WRITER``: the schema before tombstones), byte
    for byte as before, so consumers holding that schema read it; only a tombstone needs the current schema (its
    ``deleted`` field). ``decode`` reads both.

    Each record is tagged with its model's union branch: left to fastavro, a Daily holding only
    fields a Sleep also has would be written as a Sleep.
    """
    records = event["data"] if isinstance(event["data"], list) else [event["data"]]
    fields = {f["name"] for f in envelope_schema("normalized_event")["fields"]}
    tagged = {k: v for k, v in event.items() if k in fields}
    if event.get("deleted") is True:  # a tombstone (NormalizedEvent.deleted): its data is the deleted key
        tagged["deleted"], records = records, []
    elif not isinstance(event.get("deleted"), list):
        tagged["deleted"] = None
    tagged["data"] = [(model_fullname(event["type"]), r) for r in records]
    if tagged["deleted"] is None:  # a data event: written as before tombstones, so every consumer still reads it
        return encode("normalized_event", tagged, writer=envelope_version("normalized_event", DATA_EVENT_WRITER))
    return encode("normalized_event", tagged)


def validate_record(model_type: str, record: dict[str, Any]) -> dict[str, Any]:
    """Check a normalized record against its model schema and return it conformed.

    Conforming rounds floats that land in integer fields (Terra's SDK rejects 9120.4 for
    ``distance_meters``): providers report some quantities with decimals that Terra's models carry
    as integers, and rounding here, in one place, keeps mappers simple. Anything else that does not
    fit — a wrong type, a missing required field, a field the schema does not define (Avro would
    silently drop it), NaN or infinity — raises SchemaMismatch naming the field path.
    """
    try:
        return _validator(model_type)(record)
    except _Mismatch as exc:
        raise SchemaMismatch(f"{model_type}{''.join(reversed(exc.path))}: {exc.reason}") from None


def conform_record(model_type: str, record: dict[str, Any]) -> dict[str, Any]:
    """``validate_record(model_type, compact(record))`` in one pass: what a mapper made, compacted and conformed.

    The pass is code generated from the model schema (``_conformer``); it takes the usual record as it comes and
    hands anything else (a wrong type, a missing field, a dict subclass, a union) to ``validate_record`` on the
    compacted record, which gives the same result or the same SchemaMismatch as always.
    """
    try:
        return _conformer(model_type)(record)
    except _Unsure:
        return validate_record(model_type, compact(record))


def compact(value: Any) -> Any:
    """Drop ``None`` values, empty dicts and empty lists, recursively (absent == null in Terra).

    List items that are ``None`` go; a list item that compacts to ``{}`` or ``[]`` stays.
    """
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if item is None:
                continue
            if isinstance(item, dict | list):
                item = compact(item)
                if not item:
                    continue
            out[key] = item
        return out
    if isinstance(value, list):
        return [compact(item) if isinstance(item, dict | list) else item for item in value if item is not None]
    return value


class _Unsure(Exception):
    """Raised by a generated conformer for anything but the usual record: ``validate_record`` decides."""


@cache
def _conformer(model_type: str) -> Check:
    """The model schema as one generated Python function per record type: compacts and conforms as it checks.

    Each function walks a record's items once, dispatching on the field name, with the primitive checks inline;
    it accepts only what it is sure of (exact types, finite numbers, integers in range, required fields present)
    and raises _Unsure for anything else.
    """
    names: dict[str, dict[str, Any]] = {}
    _collect_records(model_schema(model_type), names)
    source = _ConformerSource(names)
    entry = source.record(model_schema(model_type))
    namespace: dict[str, Any] = {"_Unsure": _Unsure, "_isfinite": math.isfinite, **source.checks}
    exec(compile("\n".join(source.lines), f"<conformer of {model_type}>", "exec"), namespace)
    conform = namespace[entry]

    def conformer(record: Any) -> Any:
        if type(record) is not dict:
            raise _Unsure
        return conform(record, True)

    return conformer


class _ConformerSource:
    """The source of a model's conformer functions (see ``_conformer``)."""

    _RANGES = {"int": (-(2**31), 2**31), "long": (-(2**63), 2**63)}

    def __init__(self, names: dict[str, dict[str, Any]]) -> None:
        self.names, self.lines = names, []
        self.functions: dict[str, str] = {}  # record name → its function's name
        self.checks: dict[str, Check] = {}  # what the generated code calls for a field it does not inline
        self.variables = 0

    def record(self, schema: dict[str, Any]) -> str:
        """The function conforming records of ``schema`` (generated once per record name):
        ``f(value: dict, keep_empty: bool) -> dict``; an empty result is dropped by the caller unless
        ``keep_empty`` (a list item or the record itself), which then needs its required fields."""
        name = schema.get("name") or f"anonymous{len(self.functions)}"
        if name in self.functions:
            return self.functions[name]
        function = self.functions[name] = f"_conform_{len(self.functions)}"
        body: list[str] = []
        required = []
        for number, field in enumerate(schema["fields"]):
            body.append(f"        {'if' if number == 0 else 'elif'} key == {field['name']!r}:")
            self._check(field["type"], "item", 3, body, drop_empty=True)
            if "default" not in field and not (isinstance(field["type"], list) and "null" in field["type"]):
                required.append(field["name"])
        lines = [f"def {function}(value, keep_empty):", "    out = {}", "    for key, item in value.items():",
                 "        if item is None:", "            continue"]
        lines += [*body, "        else:", "            raise _Unsure"] if body else ["        raise _Unsure"]
        lines += ["        out[key] = item"]
        if required:
            missing = " or ".join(f"{name!r} not in out" for name in required)
            lines += [f"    if (out or keep_empty) and ({missing}):", "        raise _Unsure"]
        lines += ["    return out", ""]
        self.lines += lines
        return function

    def _check(self, schema: Any, var: str, depth: int, out: list[str], drop_empty: bool) -> None:
        """Lines checking (and conforming) the non-None value in ``var``; ``drop_empty``: ``continue`` (drop it) when
        it compacts to nothing (a field's value), else keep it (a list item)."""
        pad = "    " * depth
        if isinstance(schema, list):
            branches = [b for b in schema if b != "null"]
            if len(branches) == 1:
                return self._check(branches[0], var, depth, out, drop_empty)
            return self._by_reference(schema, var, pad, out)
        if isinstance(schema, str) and schema in self.names:
            schema = self.names[schema]
        kind = schema if isinstance(schema, str) else schema["type"]
        if kind == "record":
            function = self.record(schema)
            out += [f"{pad}if type({var}) is not dict:", f"{pad}    raise _Unsure",
                    f"{pad}{var} = {function}({var}, {not drop_empty})"]
            if drop_empty:
                out += [f"{pad}if not {var}:", f"{pad}    continue"]
        elif kind == "array":
            self.variables += 1
            items, item = f"items{self.variables}", f"item{self.variables}"
            out += [f"{pad}if type({var}) is not list:", f"{pad}    raise _Unsure", f"{pad}{items} = []",
                    f"{pad}for {item} in {var}:", f"{pad}    if {item} is None:", f"{pad}        continue"]
            self._check(schema["items"], item, depth + 1, out, drop_empty=False)
            out += [f"{pad}    {items}.append({item})"]
            if drop_empty:
                out += [f"{pad}if not {items}:", f"{pad}    continue"]
            out += [f"{pad}{var} = {items}"]
        elif kind in ("string", "boolean", "bytes"):
            python = {"string": "str", "boolean": "bool", "bytes": "bytes"}[kind]
            out += [f"{pad}if type({var}) is not {python}:", f"{pad}    raise _Unsure"]
        elif kind in ("double", "float"):
            out += [f"{pad}if type({var}) is float:", f"{pad}    if not _isfinite({var}):",
                    f"{pad}        raise _Unsure", f"{pad}elif type({var}) is not int:", f"{pad}    raise _Unsure"]
        elif kind in self._RANGES:
            low, high = self._RANGES[kind]
            out += [f"{pad}if type({var}) is float and _isfinite({var}):", f"{pad}    {var} = round({var})",
                    f"{pad}if type({var}) is not int or not {low} <= {var} < {high}:", f"{pad}    raise _Unsure"]
        else:  # enum, map, null, a type this does not know: the reference check
            self._by_reference(schema, var, pad, out)
        return None

    def _by_reference(self, schema: Any, var: str, pad: str, out: list[str]) -> None:
        """A field the generated code leaves to the compiled checks (a union of several types: Garmin's cycle phase)."""
        check = f"_check_{len(self.checks)}"
        self.checks[check] = _reference_check(schema, self.names)
        out += [f"{pad}if type({var}) is dict or type({var}) is list:", f"{pad}    raise _Unsure",
                f"{pad}{var} = {check}({var})"]


def _reference_check(schema: Any, names: dict[str, dict[str, Any]]) -> Check:
    """The compiled check of ``schema``, raising _Unsure instead of a mismatch."""
    check = _compile(schema, names, {})

    def sure(value: Any) -> Any:
        try:
            return check(value)
        except _Mismatch:
            raise _Unsure from None

    return sure


class _Mismatch(Exception):
    """Raised inside a compiled validator; the path is collected on the way out (errors are rare)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason, self.path = reason, []


Check = Callable[[Any], Any]


@cache
def _validator(model_type: str) -> Check:
    """The model schema compiled once into nested check functions (validation is on the hot path)."""
    names: dict[str, dict[str, Any]] = {}
    _collect_records(model_schema(model_type), names)
    compiled: dict[str, Check] = {}
    return _compile(model_schema(model_type), names, compiled)


def _collect_records(node: Any, names: dict[str, dict[str, Any]]) -> None:
    if isinstance(node, list):
        for branch in node:
            _collect_records(branch, names)
    elif isinstance(node, dict):
        if node.get("type") == "record":
            names[node["name"]] = node
            for field in node["fields"]:
                _collect_records(field["type"], names)
        elif node.get("type") in ("array", "map"):
            _collect_records(node.get("items") or node.get("values"), names)


def _is_number(value: Any) -> bool:
    """A finite number: NaN and infinities have no JSON form, so no destination could take them."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _primitive(kind: str, nullable: bool = False) -> Check:
    """The check of one primitive type (``None`` passes when ``nullable``); exact types take the fast path."""
    accepts = {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31,
        "long": lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63,
        "double": _is_number,
        "float": _is_number,
        "bytes": lambda v: isinstance(v, bytes),
        "null": lambda v: v is None,
    }[kind]
    unchanged = _UNCHANGED.get(kind, frozenset()) | ({type(None)} if nullable else set())
    integer = kind in ("int", "long")
    number = kind in ("double", "float")

    def check(value: Any) -> Any:
        kind_of = type(value)
        if kind_of in unchanged or (number and kind_of is float and math.isfinite(value)):
            return value
        if integer and isinstance(value, float) and math.isfinite(value):
            value = round(value)
        if not accepts(value):
            raise _Mismatch(f"expected {kind}, got {type(value).__name__} {value!r:.60}")
        return value

    return check


def _compile(schema: Any, names: dict[str, dict[str, Any]], compiled: dict[str, Check],
             nullable: bool = False) -> Check:
    """The check of ``schema``; with ``nullable`` (a ``["null", X]`` union) ``None`` passes too."""
    if isinstance(schema, str):
        if schema not in names:
            return _primitive(schema, nullable)
        if schema not in compiled:  # compile each named record once; later references share it
            compiled[schema] = lambda value: compiled[schema](value)  # placeholder for recursive types
            compiled[schema] = _compile(names[schema], names, compiled)
        named = compiled[schema]
        return (lambda value: None if value is None else named(value)) if nullable else named
    if isinstance(schema, list):
        nullable = nullable or "null" in schema
        branches = [b for b in schema if b != "null"]
        if len(branches) == 1:
            return _compile(branches[0], names, compiled, nullable)
        checks = [_compile(b, names, compiled) for b in branches]

        def union(value: Any) -> Any:
            if value is None and nullable:
                return None
            reasons = []
            for branch in checks:
                try:
                    return branch(value)
                except _Mismatch as exc:
                    reasons.append(exc.reason)
            raise _Mismatch(f"no union branch fits: {reasons}")

        return union
    kind = schema["type"]
    if kind == "record":
        return _record(schema, names, compiled, nullable)
    if kind == "array":
        item_check = _compile(schema["items"], names, compiled)

        def array(value: Any) -> Any:
            if value is None and nullable:
                return None
            if not isinstance(value, list):
                raise _Mismatch(f"expected a list, got {type(value).__name__}")
            try:
                return [item_check(item) for item in value]
            except _Mismatch as exc:  # name the item: check them again one by one (errors are rare)
                for index, item in enumerate(value):
                    try:
                        item_check(item)
                    except _Mismatch:
                        exc.path.append(f"[{index}]")
                        break
                raise

        return array
    if kind == "map":
        value_check = _compile(schema["values"], names, compiled)

        def mapping(value: Any) -> Any:
            if value is None and nullable:
                return None
            if not isinstance(value, dict):
                raise _Mismatch(f"expected an object, got {type(value).__name__}")
            out = {}
            for key, item in value.items():
                try:
                    out[key] = value_check(item)
                except _Mismatch as exc:
                    exc.path.append(f".{key}")
                    raise
            return out

        return mapping
    if kind == "enum":
        symbols = frozenset(schema["symbols"])
        listed = schema["symbols"]

        def enum(value: Any) -> Any:
            if value is None and nullable:
                return None
            if not isinstance(value, str) or value not in symbols:
                raise _Mismatch(f"{value!r} is not one of {listed}")
            return value

        return enum
    return _compile(kind, names, compiled, nullable)


def _record(schema: dict[str, Any], names: dict[str, dict[str, Any]], compiled: dict[str, Check],
            nullable: bool) -> Check:
    """A record's check: every present field checked, required fields present, no undefined field."""
    fields: dict[str, tuple[frozenset[type], Check]] = {}  # name → (types passed as they are, check)
    required = []
    for field in schema["fields"]:
        fields[field["name"]] = (_unchanged_types(field["type"]), _compile(field["type"], names, compiled))
        if "default" not in field and not (isinstance(field["type"], list) and "null" in field["type"]):
            required.append(field["name"])
    nothing: tuple[frozenset[type], None] = (frozenset(), None)

    def record(value: Any) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, dict):
            raise _Mismatch(f"expected an object, got {type(value).__name__}")
        out = {}
        for key, item in value.items():
            unchanged, check = fields.get(key, nothing)
            if type(item) in unchanged:
                out[key] = item
                continue
            if check is None:
                error = _Mismatch("field not defined by the schema")
                error.path.append(f".{key}")
                raise error
            try:
                out[key] = check(item)
            except _Mismatch as exc:
                exc.path.append(f".{key}")
                raise
        for name in required:
            if name not in value:
                error = _Mismatch("required field missing")
                error.path.append(f".{name}")
                raise error
        return out

    if "name" in schema and not nullable:
        compiled[schema["name"]] = record
    return record


# Python types a value of a primitive type passes as it is (a float in a number field still needs isfinite)
_UNCHANGED: dict[str, frozenset[type]] = {
    "null": frozenset({type(None)}), "string": frozenset({str}), "boolean": frozenset({bool}),
    "bytes": frozenset({bytes}), "double": frozenset({int}), "float": frozenset({int})}


def _unchanged_types(schema: Any) -> frozenset[type]:
    """Python types a value of ``schema`` can have to pass unchecked and unchanged (the hot path's shortcut)."""
    branches = schema if isinstance(schema, list) else [schema]
    return frozenset().union(*(_UNCHANGED.get(b, frozenset()) for b in branches if isinstance(b, str)))
