"""core.json_codec: orjson's fast path gives the standard library's bytes, values and errors, tricky inputs included."""

from __future__ import annotations

import enum
import json
import math
import random
import struct
from collections import OrderedDict
from typing import Any

import pytest

from core.events import canonical_json
from core.json_codec import dumps_canonical, loads, loads_read_by_orjson, read


def stdlib_dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def outcome(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """What a call gives: its result (repr, so NaN equals NaN), or its exception's type and message."""
    try:
        return ("ok", repr(call(*args, **kwargs)))
    except Exception as exc:
        return ("raised", type(exc), str(exc))


class FloatSub(float):
    pass


class StrSub(str):
    pass


class DictSub(dict):
    pass


class IntLevel(enum.IntEnum):
    HIGH = 5


class TextLevel(enum.StrEnum):
    HIGH = "high"


def circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


TRICKY_VALUES = [
    1e16, -1e16, 1e15, 1e22, 1e-4, 9.999e-5, 1e-5, -1.5e-7, 1.616037601127474e-07, 5e-324, 1.7976931348623157e308,
    -0.0, 0.0, 0.1 + 0.2, float("nan"), float("inf"), -float("inf"), [1.0, float("nan")], {"v": None},
    2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, -(10**30), True, False, None,
    "", "é€𝄞", "\x00\x1f\x7f\u2028\u2029\"\\/\n\t\b\f\r", "\ud800", {"\udfff": 1}, "null", "1e5", "0.00001",
    {"b": 1, "a": {"d": [], "c": {}}, "é": 2, "e": 3, "𝄞": 4, "\uffff": 5}, {1: "int key"}, {None: 1}, {1.5: 1},
    {True: 1}, {"a": 1, 2: "mixed"}, (1, (2, "three")), OrderedDict(b=1, a=2), DictSub(b=1), StrSub("sub"),
    FloatSub(1.5), {1, 2}, b"bytes", object(), nested(200), nested(300), nested(5000), circular(), IntLevel.HIGH,
    TextLevel.HIGH, [1.2e-5, "x"], {"t": "2024-01-01T00:00:10.000012+00:00"}, "0.00001", -2.5e-5,
]


@pytest.mark.parametrize("value", TRICKY_VALUES, ids=lambda v: type(v).__name__)
def test_canonical_json_is_byte_identical_to_the_standard_library(value):
    assert outcome(dumps_canonical, value) == outcome(stdlib_dumps, value)
    assert outcome(canonical_json, value) == outcome(stdlib_dumps, value)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.25:
        return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}
    if depth < 4 and roll < 0.4:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    kind = rng.randrange(6)
    if kind == 0:
        return struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
    if kind == 1:
        return round(rng.uniform(-1e6, 1e6), rng.randint(0, 8))
    if kind == 2:
        return float(f"{rng.randint(1, 9)}e{rng.randint(-30, 30)}")
    if kind == 3:
        return rng.choice([rng.randint(-1000, 1000), rng.randint(-(2**63), 2**64), rng.randint(-(2**70), 2**70)])
    if kind == 4:
        return random_text(rng)
    return rng.choice([None, True, False])


def random_text(rng: random.Random) -> str:
    return "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                   for _ in range(rng.randint(0, 6)))


def test_random_documents_dump_and_load_as_with_the_standard_library():
    rng = random.Random(9)
    for _ in range(5_000):
        value = random_value(rng)
        expected = outcome(stdlib_dumps, value)
        assert outcome(dumps_canonical, value) == expected, value
        if expected[0] == "ok":
            for text in (stdlib_dumps(value), json.dumps(value), json.dumps(value).encode()):
                assert outcome(loads, text) == outcome(json.loads, text), text


def reject(name: str) -> None:
    raise ValueError(f"payload holds {name}, which is not a JSON number")


TRICKY_TEXTS = [
    b"NaN", b"[1, Infinity]", b"-Infinity", b"1E400", b"-1e400", b"1e-400", b"18446744073709551615",
    b"18446744073709551616", b"-9223372036854775809", b"12345678901234567890123", b"[1234567890123456789]",
    b'"12345678901234567890123"', b"0.1000000000000000055511151231257827", b"-0", b"-0.0", b"1.5e-7", b"1E+2",
    b'{"a":1,"a":2}', b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"', b'"\xff"', b'"\xed\xa0\x80"',
    b"\xef\xbb\xbf{}", "\ufeff{}", b" {} ", b"{} x", b"", b"[", b"01", b"1.", b".5", b"[1,]", b"{'a':1}",
    b"\t\n\r [ ] ", b"\x0c[]", b'"a\tb"', b"true", b"nul", "[1, 2]".encode("utf-16"), "[1]".encode("utf-32-le"),
    "[\"\ud800\"]", "[\"é\"]", b"[" * 2000 + b"]" * 2000, b"[" * 100_000 + b"]" * 100_000, bytearray(b"[1]"),
]


@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=lambda t: repr(t)[:30])
def test_loads_gives_the_standard_library_value_or_error(text):
    assert outcome(loads, text) == outcome(json.loads, text)
    assert outcome(loads, text, parse_constant=reject) == outcome(json.loads, text, parse_constant=reject)


@pytest.mark.parametrize("text", [*TRICKY_TEXTS, *[b"[" * d + b"]" * d for d in (499, 500)], b'{"a": [1.5, "x"]}'],
                         ids=lambda t: repr(t)[:30])
def test_a_text_read_by_orjson_reads_again_to_the_same_value_without_the_checks(text):
    """``read`` gives ``loads``'s outcome and whether orjson read it; a text it read, ``loads_read_by_orjson`` reads to
    the same value (types included: repr); one it did not (what orjson refuses or reads otherwise) is not claimed."""
    assert outcome(lambda t: read(t)[0], text) == outcome(json.loads, text)
    try:
        _, by_orjson = read(text, parse_constant=reject)
    except Exception:
        return
    if by_orjson:
        assert outcome(loads_read_by_orjson, text, parse_constant=reject) == outcome(json.loads, text)
    if text in READ_BY_THE_STANDARD_LIBRARY:
        assert not by_orjson, text


READ_BY_THE_STANDARD_LIBRARY = [b"\xef\xbb\xbf{}", b"1E400", b"[1234567890123456789]", b"[" * 500 + b"]" * 500,
                                "[1, 2]".encode("utf-16"), b'"\xed\xa0\x80"']


def test_loads_keeps_big_integers_exact_and_floats_correctly_rounded():
    assert loads(b"[18446744073709551616, -0.0]") == [2**64, -0.0]
    assert math.copysign(1, loads(b"-0.0")) == -1
    rng = random.Random(3)
    for _ in range(20_000):
        whole, fraction = rng.randint(0, 10 ** rng.randint(1, 22)), rng.randint(0, 10 ** rng.randint(1, 22))
        text = f"{rng.choice(['', '-'])}{whole}.{fraction}" + rng.choice(["", f"e{rng.randint(-330, 330)}"])
        assert outcome(loads, text) == outcome(json.loads, text), text


LONG_NUMBER_TEXTS = [
    b"1234567890123456789", b"-1234567890123456789", b"[12345678901234567890]", b'{"a": 99999999999999999999}',
    b'{"a":\n-99999999999999999999}', b'{"id":"123456789012345678901234567890","n":1}', b"0.12345678901234567890123",
    b"1.2345678901234567890123e5", b"1e0000000000000000000005", b"12345678901234567890.5",
    b"[1,-0.000000000000000000001]",
    b"\t12345678901234567890123", b"[" + b"9" * 40 + b"]", b'["' + b"9" * 40 + b'", ' + b"9" * 40 + b"]",
]


@pytest.mark.parametrize("text", LONG_NUMBER_TEXTS, ids=lambda t: repr(t)[:30])
def test_long_numbers_load_as_with_the_standard_library(text):
    assert outcome(loads, text) == outcome(json.loads, text)
    assert outcome(loads, text.decode()) == outcome(json.loads, text.decode())


def test_long_float_mantissas_are_rounded_as_by_the_standard_library():
    rng = random.Random(4)
    for _ in range(20_000):
        mantissa = "".join(rng.choice("0123456789") for _ in range(rng.randint(15, 40)))
        exponent = rng.choice(["", "e-5", "E+300", "e-320"])
        text = f"[{rng.choice(['', '-'])}{rng.choice(['0', '1', '42'])}.{mantissa}{exponent}]"
        assert outcome(loads, text.encode()) == outcome(json.loads, text), text


def test_loads_refuses_what_the_standard_library_refuses():
    assert outcome(loads, memoryview(b"[1]")) == outcome(json.loads, memoryview(b"[1]"))
    assert outcome(loads, 1) == outcome(json.loads, 1)


@pytest.mark.parametrize("depth", [499, 500, 990, 1010, 1024])
def test_deep_nesting_is_read_or_refused_as_by_the_standard_library(depth):
    """Near the standard library's recursion limit (which depends on the caller's stack) it decides, not orjson."""
    for text in (b"[" * depth + b"]" * depth, b'{"x":' + b"[{" * (depth // 2) + b"}]" * (depth // 2) + b"}"):
        assert outcome(loads, text) == outcome(json.loads, text)
    wide = json.dumps([{"a": [1, {"b": "[[[{{{"}]} for _ in range(2_000)]).encode()  # many brackets, shallow
    assert loads(wide) == json.loads(wide)


def test_a_cut_off_text_never_reaches_the_depth_scan(monkeypatch):
    """A truncated payload holding escaped JSON: the depth scan's string pattern once retried at each escaped quote
    (quadratic: hours for a megabyte). Only JSON orjson read is scanned; the standard library refuses the rest."""
    from core import json_codec

    def scan(text):
        raise AssertionError("malformed JSON reached the depth scan")

    monkeypatch.setattr(json_codec, "_may_nest_deeply", scan)
    for text in (b"[" * 500 + b'"' + b'\\"' * 2_000, b'{"raw":"' + b'{\\"a\\":[' * 1_000):
        assert outcome(loads, text) == outcome(json.loads, text)
