"""The generic tagged form: exact JSON for values whose column type does not say what they are.

Used for TypeDecorator, PickleType, NullType and unknown column types, and (wrapped as
``{"!": <generic form>}``, the *escape*) for a value whose Python type does not match its column
type. The format is described in :mod:`sqlacache.analysis.codec`.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final

from sqlacache.analysis.scalars import (
    I64_MIN,
    PARSE_ERRORS,
    U64_MAX,
    CodecError,
    b64,
    big_int_str,
    datetime_str,
    is_asyncpg_uuid,
    isfinite,
    nonfinite_str,
    parse_b64,
    parse_big_int,
    parse_date,
    parse_datetime,
    parse_decimal,
    parse_nonfinite,
    parse_time,
    parse_timedelta,
    parse_uuid,
    time_str,
    timedelta_int,
)

# orjson refuses to dump more than 254 nested levels; staying well below leaves room for the
# envelope (rows, columns, metadata) the cache wraps around each value.
MAX_DEPTH: Final = 128

_ESCAPE: Final = "!"

_TAGGED_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], Any]]]] = {
    bytes: ("b", b64),
    Decimal: ("n", str),
    date: ("d", date.isoformat),
    time: ("t", time_str),
    datetime: ("dt", datetime_str),
    timedelta: ("td", timedelta_int),
    uuid.UUID: ("u", operator.attrgetter("hex")),
}


def _str_only(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def checked(x: Any) -> Any:
        if type(x) is not str:
            raise CodecError(f"expected a string, got {type(x).__name__}")
        return parse(x)

    return checked


_TAGGED_DECODERS: Final[dict[str, Callable[[Any], Any]]] = {
    "i": _str_only(parse_big_int),
    "f": _str_only(parse_nonfinite),
    "b": _str_only(parse_b64),
    "n": _str_only(parse_decimal),
    "d": _str_only(parse_date),
    "t": _str_only(parse_time),
    "dt": _str_only(parse_datetime),
    "td": parse_timedelta,
    "u": _str_only(parse_uuid),
}


def check_utf8(v: str) -> None:
    # orjson refuses lone surrogates, which json.loads ("\ud800") and pickle can produce; database
    # drivers decode text columns strictly, so the typed String codec skips this per-value cost.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CodecError("string holds a lone surrogate") from exc


def _generic_encode(v: Any, depth: int) -> Any:
    t = type(v)
    if t is str:
        if not v.isascii():
            check_utf8(v)
        return v
    if t is bool or v is None:
        return v
    if t is int:
        return v if I64_MIN <= v <= U64_MAX else ["i", big_int_str(v)]
    if t is float:
        return v if isfinite(v) else ["f", nonfinite_str(v)]
    if depth >= MAX_DEPTH:
        raise CodecError("value nested too deeply")
    depth += 1
    if t is list:
        return ["[", *[_generic_encode(x, depth) for x in v]]
    if t is tuple:
        return ["(", *[_generic_encode(x, depth) for x in v]]
    if t is dict:
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise CodecError(f"dict key of type {type(k).__name__} is not a str")
            if not k.isascii():
                check_utf8(k)
            out[k] = _generic_encode(x, depth)
        return out
    tagged = _TAGGED_ENCODERS.get(t)
    if tagged is not None:
        return [tagged[0], tagged[1](v)]
    if is_asyncpg_uuid(t):
        return ["u", str(v)]
    raise CodecError(f"cannot cache a value of type {t.__module__}.{t.__qualname__}")


def _generic_decode(x: Any, depth: int) -> Any:
    t = type(x)
    if t is str or t is int or t is float or t is bool or x is None:
        return x
    if depth >= MAX_DEPTH:
        raise CodecError("payload nested too deeply")
    depth += 1
    if t is dict:
        return {k: _generic_decode(v, depth) for k, v in x.items()}
    if t is not list or not x:
        raise CodecError(f"invalid generic payload: {describe(x)}")
    tag = x[0]
    if tag == "[":
        return [_generic_decode(v, depth) for v in x[1:]]
    if tag == "(":
        return tuple([_generic_decode(v, depth) for v in x[1:]])
    decode = _TAGGED_DECODERS.get(tag) if type(tag) is str else None
    if decode is None or len(x) != 2:
        raise CodecError(f"invalid generic payload: {describe(x)}")
    return decode(x[1])


def _generic_encode_safe(v: Any, depth: int) -> Any:
    try:
        return _generic_encode(v, depth)
    except RecursionError as exc:
        raise CodecError("value nested too deeply") from exc


def _generic_decode_safe(x: Any, depth: int) -> Any:
    # The scalar parsers already raise CodecError; this is the backstop that keeps the "only
    # CodecError" promise even if a hostile payload finds a path they do not cover.
    try:
        return _generic_decode(x, depth)
    except CodecError:
        raise
    except PARSE_ERRORS as exc:
        raise CodecError(f"invalid payload: {exc}") from exc


def escape(v: Any) -> Any:
    # Only reached when a value's Python type does not match its column type.
    return {_ESCAPE: _generic_encode_safe(v, 1)}


def describe(x: Any) -> str:
    return f"{type(x).__name__} of length {len(x)}" if type(x) in (list, dict, str) else type(x).__name__


def is_escape_shaped(x: Any) -> bool:
    return type(x) is dict and len(x) == 1 and _ESCAPE in x


def unescape(x: Any) -> Any:
    if is_escape_shaped(x):
        return _generic_decode_safe(x[_ESCAPE], 1)
    raise CodecError(f"invalid payload: {describe(x)}")


def encode(v: Any) -> Any:
    return _generic_encode_safe(v, 0)


def decode(x: Any) -> Any:
    return _generic_decode_safe(x, 0)
