"""Input bounds: the one check that keeps a hostile value from hanging, overflowing or reaching a store that cannot hold
it, applied to every document before it is mapped and to every raw event as it is decoded.

A document passes when every string is at most ``MAX_STRING_CHARS`` long, valid Unicode (no lone surrogate, which
no UTF-8 encoder accepts) and free of NUL (PostgreSQL text and JSONB refuse it), every integer fits a signed 64-bit
column and every float is finite. A record's ids (provider user id, natural key) must fit the stores' key columns
(``MAX_ID_CHARS``). What fails raises ``OutOfBounds`` naming the field, so the record is dead-lettered with a reason
a person can act on, never retried.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from connectors.base import MappingError

MAX_STRING_CHARS = 1 << 20  # 1 Mi characters: far above any provider's field, far below what hurts
MAX_ID_CHARS = 255  # key columns: the SQL destination's VARCHAR(255), PostgreSQL's btree row limit
MAX_INT = (1 << 63) - 1  # BIGINT
MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last instant datetime can hold


# What an out-of-bounds value looks like in JSON text, seen with every digit as 0 and no whitespace or signs: a NUL or
# surrogate escape, a number of 19+ digits (an integer past 64 bits) or one with a three-digit exponent (past a
# double's range). Text holding none of these needs no walk; one that does (or a string that looks so) is walked.
_SCREEN = bytes.maketrans(b"123456789E", b"000000000e")
_SCREEN_DELETE = b" \t\r\n+-"
_LONG_NUMBER = b"0" * 19
_SUSPECTS = (b":" + _LONG_NUMBER, b"[" + _LONG_NUMBER, b"," + _LONG_NUMBER, b"0e000")
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # UTF-8 of U+D800..DFFF, which json.loads(bytes) lets through


class OutOfBounds(MappingError):
    """A value outside what healthflow accepts (permanent: dead-lettered with the field and the limit)."""


def may_be_out_of_bounds(payload: bytes) -> bool:
    """False when no value of the JSON text ``payload`` can be out of bounds (one C-speed scan of the bytes), so its
    documents need no ``check_document``; True when they must be checked. The scan reads UTF-8: text in another
    encoding ``json.loads`` accepts (UTF-16, UTF-32, a BOM) or holding encoded surrogates is always checked."""
    if len(payload) > MAX_STRING_CHARS or b"\\u0000" in payload or b"\\ud" in payload or b"\\uD" in payload:
        return True
    if json.detect_encoding(payload) != "utf-8" or (b"\xed" in payload and _ENCODED_SURROGATE.search(payload)):
        return True
    screened = payload.translate(_SCREEN, _SCREEN_DELETE)
    return any(suspect in screened for suspect in _SUSPECTS)


def check_document(document: Any) -> None:
    """Raise ``OutOfBounds`` when any value of ``document`` (decoded JSON) is out of bounds; one pass, no recursion."""
    pending = [document]
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is dict:
            for key in value:
                if type(key) is not str or not _text_ok(key, MAX_STRING_CHARS):
                    _raise_at(document)
            pending.extend(value.values())
        elif kind is list:
            pending.extend(value)
        elif kind is str:
            if not _text_ok(value, MAX_STRING_CHARS):
                _raise_at(document)
        elif kind is int:
            if not -MAX_INT <= value <= MAX_INT:
                _raise_at(document)
        elif kind is float and not math.isfinite(value):
            _raise_at(document)


def check_text(name: str, value: str | None, limit: int = MAX_ID_CHARS) -> None:
    """Raise ``OutOfBounds`` unless ``value`` (when given) is a storable string of at most ``limit`` characters."""
    if value is not None:
        problem = _problem(value, limit)
        if problem:
            raise OutOfBounds(f"{name}: {problem}")


def check_epoch_ms(name: str, value: int) -> None:
    if not 0 <= value <= MAX_EPOCH_MS:
        raise OutOfBounds(f"{name}: {value:.6g} is not epoch milliseconds between 1970 and 9999")


def _text_ok(text: str, limit: int) -> bool:
    if len(text) > limit or "\0" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _problem(value: Any, limit: int = MAX_STRING_CHARS) -> str | None:
    """What is wrong with one scalar, or None."""
    if isinstance(value, str):
        if len(value) > limit:
            return f"string of {len(value):,} characters (at most {limit:,})"
        if "\0" in value:
            return "string holds a NUL character, which the stores cannot hold"
        if not _text_ok(value, limit):
            return "string is not valid Unicode (a lone surrogate)"
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
        return f"integer of {len(str(abs(value)))} digits does not fit 64 bits"
    elif isinstance(value, float) and not math.isfinite(value):
        return f"number {value} is not finite"
    return None


def _raise_at(document: Any) -> None:
    """The slow path, once a problem is known: find its field and raise with it."""
    pending: list[tuple[str, Any]] = [("", document)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                problem = _problem(key) if isinstance(key, str) else None
                if problem:
                    raise OutOfBounds(f"a field name under {path or 'the document'}: {problem}")
                name = key[:40] if isinstance(key, str) else repr(key)
                pending.append((f"{path}.{name}" if path else name, item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{n}]", item) for n, item in enumerate(value))
        else:
            problem = _problem(value)
            if problem:
                raise OutOfBounds(f"{path or 'the document'}: {problem}")
    raise OutOfBounds("the document holds a value out of bounds")
