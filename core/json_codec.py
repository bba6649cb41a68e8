"""JSON on the data path: orjson's speed with the standard library's exact results.

``dumps_canonical`` gives the bytes of ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`` and ``loads`` the value (or the exception) of ``json.loads(text, **options)``.
orjson does the common case; wherever it could differ (see each function) the standard library does the work itself,
so results, errors and their messages are the standard library's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import orjson

_DUMP_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
                 | orjson.OPT_PASSTHROUGH_DATETIME)
# orjson's text differs from the standard library's only for NaN and ±Infinity (orjson writes null) and for floats
# below 1e-4 (orjson writes 0.00001 and 1e-7 where Python writes 1e-05 and 1e-07): a text holding null, e- or 0.0000
# and a digit 1-9 (also inside a string) is written by the standard library instead.
_TINY_FLOAT = re.compile(rb"0\.0000[1-9]")

# An integer token of 19 digits or more may not fit 64 bits: orjson would read it as a float, Python as an int. Such a
# token's digits follow one of these bytes (or open the text); a run of digits inside a string follows a quote or text.
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19
_BEFORE_NUMBER = frozenset(b"[,: \t\n\r-")

# The standard library refuses nesting of about 1000 levels less the caller's stack depth (RecursionError), orjson
# 1024 levels: a text that may nest this deep is read by the standard library, so that where it refuses, so do we.
_SAFE_DEPTH = 500
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)  # every attempt matches: one linear pass, even unterminated
_NOT_A_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPENS = frozenset(b"[{")


def _stdlib_dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def dumps_canonical(value: Any) -> bytes:
    """Exactly ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()`` (raising what
    it raises), for JSON's own types (dict with str keys, list, tuple, str, int, float, bool, None) and their
    subclasses. orjson writes it unless it refuses the value (ints beyond 64 bits, non-str keys, lone surrogates,
    nesting deeper than 254, other types) or its text holds ``null``, ``e-`` or ``0.0000`` and a digit 1-9: then the
    standard library does. (Only where the standard library itself refuses an ``enum.Enum`` or ``uuid.UUID`` member does
    orjson write its value instead.)"""
    try:
        text = orjson.dumps(value, option=_DUMP_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError
        return _stdlib_dumps(value)
    if b"null" in text or b"e-" in text or _TINY_FLOAT.search(text):
        return _stdlib_dumps(value)
    return text


def loads(text: bytes | bytearray | str, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """Exactly ``json.loads(text, parse_constant=parse_constant)``: orjson reads it unless it refuses it (NaN and
    Infinity, a byte-order mark, numbers beyond float range, lone surrogates, invalid UTF-8, nesting deeper than 1024,
    malformed JSON) or the text may hold an integer of 19 digits or more (beyond 64 bits orjson reads it as a float):
    then the standard library reads it, raising what it raises. So does a text that may nest ``_SAFE_DEPTH`` levels or
    more, where the standard library's RecursionError depends on the caller's stack."""
    return read(text, parse_constant)[0]


def read(text: bytes | bytearray | str, parse_constant: Callable[[str], Any] | None = None) -> tuple[Any, bool]:
    """``loads(text, parse_constant)``, and whether orjson read it: then ``orjson.loads(text)`` gives the same value
    again (``loads_read_by_orjson``), without the checks that chose it."""
    encoded = None
    if isinstance(text, str):
        with contextlib.suppress(UnicodeEncodeError):  # lone surrogates: orjson refuses them
            encoded = text.encode()
    elif isinstance(text, bytes | bytearray):
        encoded = bytes(text)
    if encoded is not None and not _may_hold_a_long_integer(encoded):
        try:
            value = orjson.loads(encoded)
        except orjson.JSONDecodeError:
            pass
        else:
            if not _may_nest_deeply(encoded):  # only JSON orjson read gets here: its strings are all terminated
                return value, True
    return json.loads(text, parse_constant=parse_constant), False


def loads_read_by_orjson(text: bytes | bytearray | str, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """``loads(text)`` of a text ``read`` found orjson reads (the same value; ``parse_constant`` is never called: such a
    text holds no NaN or Infinity)."""
    return orjson.loads(text)


def _may_hold_a_long_integer(text: bytes) -> bool:
    """Whether ``text`` may hold an integer token of 19 digits or more: a run of 19 digits that opens the text or
    follows ``[``, ``,``, ``:``, ``-`` or whitespace (false positives only cost the standard library's speed)."""
    digits = text.translate(_DIGITS_AS_ZEROS)
    at = digits.find(_LONG_RUN)
    while at != -1:
        if at == 0 or digits[at - 1] in _BEFORE_NUMBER:
            return True
        at = digits.find(_LONG_RUN, at + len(_LONG_RUN))
    return False


def _may_nest_deeply(text: bytes) -> bool:
    """Whether ``text`` (JSON) nests ``_SAFE_DEPTH`` levels or more: it has that many ``[`` and ``{``, and outside its
    strings they reach that depth. Linear in the text."""
    if text.count(b"[") + text.count(b"{") < _SAFE_DEPTH:
        return False
    brackets = _STRING.sub(b"", text).translate(None, _NOT_A_BRACKET)
    return max(itertools.accumulate(1 if bracket in _OPENS else -1 for bracket in brackets)) >= _SAFE_DEPTH
