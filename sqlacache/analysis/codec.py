"""Exact JSON encoding of single column values, driven by the column's SQLAlchemy type.

A cached result must be indistinguishable from a fresh one, so every value that SQLAlchemy hands back
has to survive ``encode`` -> ``orjson.dumps`` -> Redis -> ``orjson.loads`` -> ``decode`` with the same
Python type and the same value down to the bit (float), the exponent (Decimal), the utcoffset and the
zone (datetime). Redis is shared and untrusted, so ``decode`` validates everything and raises only
:class:`CodecError`; it never unpickles, and the payload never names a class or module to load: the
column type decides what gets built.

Wire format, per column type (``None`` is JSON ``null`` everywhere):

* Integer: JSON int; outside orjson's 64-bit range a hex string (hex has no digit limit).
* Boolean: JSON bool.  String and friends, Enum without a class, Uuid(as_uuid=False): JSON string.
* Float (and Numeric(asdecimal=False)): JSON float; non-finite values as ``"inf"``, ``"-inf"``,
  ``"nan"`` or ``"nan:<16 hex digits>"`` for a NaN whose bits differ from ``float("nan")``.
* Numeric (and Float(asdecimal=True)): ``str(Decimal)``.
* LargeBinary / BINARY / VARBINARY: base64 string.
* Date, Time, DateTime: ``isoformat()``; a DateTime in a ``zoneinfo`` zone gets ``[zone key]``
  appended (RFC 9557 style) so it comes back in that zone, not as a fixed offset.
* Interval: whole microseconds as a JSON int, or a hex string when beyond 64 bits.
* Uuid(as_uuid=True): 32 hex digits; asyncpg's own UUID subclass as the 36-character form.
* Enum with a Python enum class: the member's name.
* JSON / JSONB: the document itself; one orjson could not reproduce exactly (big ints, NaN, a tuple)
  or that is itself shaped ``{"!": ...}`` goes in the escape form described next.
* ARRAY: nested JSON arrays of the item encodings (tuples too when ``as_tuple``). When the items are
  JSON or generic, whose encodings may be arrays themselves, and ``dimensions`` is not declared, the
  payload is ``[levels, nested]`` so that a leaf list is never mistaken for a dimension.
* PostgreSQL INET/CIDR, ranges and multiranges: see :mod:`sqlacache.analysis.pgtypes`;
  MACADDR, MACADDR8 and MONEY: JSON string (both drivers return text).
* anything else (TypeDecorator, PickleType, NullType, unknown types): the generic tagged form below.

A value whose Python type does not match its column type (SQLite's dynamic typing, ``sum()`` of a
BigInteger coming back as Decimal on PostgreSQL, a ``with_variant`` on another backend) is stored
as ``{"!": <generic form>}``, a shape no typed encoding produces, so it still round-trips exactly.

Generic tagged form: ``null``, bools, ints within 64 bits, finite floats and strings are themselves;
dicts with str keys are JSON objects of generic values; everything else is a JSON array whose first
element is a tag: ``["[", ...items]`` list, ``["(", ...items]`` tuple, ``["i", hex]`` big int,
``["f", "nan"...]`` non-finite float, ``["b", base64]`` bytes, ``["n", str]`` Decimal,
``["d", iso]`` date, ``["t", iso]`` time, ``["dt", iso]`` datetime, ``["td", microseconds]``
timedelta, ``["u", hex]`` UUID.

Refused at encode with CodecError (the cache then does not store the result): values of any other
Python type (subclasses too, e.g. IntEnum, OrderedDict, pendulum's DateTime), dicts with non-str keys,
strings with lone surrogates inside JSON or generic values, nesting deeper than 128 levels, and times
or datetimes that ISO text cannot carry exactly: a tzinfo other than an unnamed ``datetime.timezone``
or a keyed ``ZoneInfo``, ``fold=1`` where it does not change the offset, non-zero offsets under 1 s.

This module holds the typed codecs and the dispatch on the column type; the scalar text forms are in
:mod:`sqlacache.analysis.scalars` and the generic tagged form in :mod:`sqlacache.analysis.generic`.
"""

from __future__ import annotations

import functools
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final

from sqlalchemy.dialects.postgresql import INTERVAL as PG_INTERVAL
from sqlalchemy.sql import sqltypes
from sqlalchemy.types import TypeEngine

from sqlacache import _sa
from sqlacache.analysis import generic, pgtypes
from sqlacache.analysis.generic import MAX_DEPTH, check_utf8, describe, escape, is_escape_shaped, unescape
from sqlacache.analysis.scalars import (
    I64_MIN,
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

__all__ = ["CodecError", "ValueCodec", "codec_for"]


@dataclass(frozen=True, slots=True)
class ValueCodec:
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]
    # A value of exactly this type decodes to itself (a JSON int, str, bool or float): a hit's
    # rebuild skips the call for it (read/rebuild.py), once per column of every row.
    same: type | None = None


# PostgreSQL allows 6 array dimensions; the cap keeps ARRAY(JSON) within orjson's nesting limit too.
_MAX_ARRAY_LEVELS: Final = 16


_GENERIC: Final = ValueCodec(generic.encode, generic.decode)

# ---------------------------------------------------------------------------------------------------
# Typed codecs. Each encoder tests the expected type first so the common case costs one type() check;
# mismatches and None fall through to the slow path.


def _enc_int(v: Any) -> Any:
    if type(v) is int:
        return v if I64_MIN <= v <= U64_MAX else big_int_str(v)
    return None if v is None else escape(v)


def _dec_int(x: Any) -> Any:
    if type(x) is int:
        return x
    if x is None:
        return None
    if type(x) is str:
        return parse_big_int(x)
    return unescape(x)


def _enc_bool(v: Any) -> Any:
    if type(v) is bool or v is None:
        return v
    return escape(v)


def _dec_bool(x: Any) -> Any:
    if type(x) is bool or x is None:
        return x
    return unescape(x)


def _enc_str(v: Any) -> Any:
    if type(v) is str or v is None:
        return v
    return escape(v)


def _dec_str(x: Any) -> Any:
    if type(x) is str or x is None:
        return x
    return unescape(x)


def _enc_float(v: Any) -> Any:
    if type(v) is float:
        return v if isfinite(v) else nonfinite_str(v)
    return None if v is None else escape(v)


def _dec_float(x: Any) -> Any:
    if type(x) is float:
        return x
    if x is None:
        return None
    if type(x) is str:
        return parse_nonfinite(x)
    return unescape(x)


def _enc_decimal(v: Any) -> Any:
    if type(v) is Decimal:
        return str(v)
    return None if v is None else escape(v)


def _dec_decimal(x: Any) -> Any:
    if type(x) is str:
        return parse_decimal(x)
    return None if x is None else unescape(x)


def _enc_bytes(v: Any) -> Any:
    if type(v) is bytes:
        return b64(v)
    return None if v is None else escape(v)


def _dec_bytes(x: Any) -> Any:
    if type(x) is str:
        return parse_b64(x)
    return None if x is None else unescape(x)


def _enc_date(v: Any) -> Any:
    if type(v) is date:
        return v.isoformat()
    return None if v is None else escape(v)


def _dec_date(x: Any) -> Any:
    if type(x) is str:
        return parse_date(x)
    return None if x is None else unescape(x)


def _enc_time(v: Any) -> Any:
    if type(v) is time:
        return time_str(v)
    return None if v is None else escape(v)


def _dec_time(x: Any) -> Any:
    if type(x) is str:
        return parse_time(x)
    return None if x is None else unescape(x)


def _enc_datetime(v: Any) -> Any:
    if type(v) is datetime:
        return datetime_str(v)
    return None if v is None else escape(v)


def _dec_datetime(x: Any) -> Any:
    if type(x) is str:
        return parse_datetime(x)
    return None if x is None else unescape(x)


def _enc_interval(v: Any) -> Any:
    if type(v) is timedelta:
        return timedelta_int(v)
    return None if v is None else escape(v)


def _dec_interval(x: Any) -> Any:
    if type(x) is int or type(x) is str:
        return parse_timedelta(x)
    return None if x is None else unescape(x)


def _enc_uuid(v: Any) -> Any:
    if type(v) is uuid.UUID:
        return v.hex
    if v is None:
        return None
    if is_asyncpg_uuid(type(v)):
        return str(v)
    return escape(v)


def _dec_uuid(x: Any) -> Any:
    if type(x) is str:
        return parse_uuid(x)
    return None if x is None else unescape(x)


def _json_check(v: Any, depth: int) -> None:
    t = type(v)
    if t is str:
        if not v.isascii():
            check_utf8(v)
        return
    if t is bool or v is None:
        return
    if t is int:
        if not I64_MIN <= v <= U64_MAX:
            raise CodecError("JSON document holds an integer beyond 64 bits")
        return
    if t is float:
        # orjson would silently write NaN/Infinity as null.
        if not isfinite(v):
            raise CodecError("JSON document holds a non-finite float")
        return
    if depth >= MAX_DEPTH:
        raise CodecError("JSON document nested too deeply")
    depth += 1
    if t is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise CodecError(f"JSON object key of type {type(k).__name__} is not a str")
            if not k.isascii():
                check_utf8(k)
            _json_check(x, depth)
    elif t is list:
        for x in v:
            _json_check(x, depth)
    else:
        # Tuples and str/int/dict subclasses would come back as their plain JSON counterparts.
        raise CodecError(f"JSON document holds a {t.__module__}.{t.__qualname__}")


def _enc_json(v: Any) -> Any:
    # A document that is itself {"!": ...} is escaped too, so the escape shape stays unambiguous.
    if not is_escape_shaped(v):
        try:
            _json_check(v, 0)
            return v
        except (CodecError, RecursionError):
            pass
    # Big ints and NaN/Infinity (Python's json module reads and writes both), tuples or Decimals
    # from a custom deserializer: the generic form may still carry them exactly.
    return escape(v)


def _dec_json(x: Any) -> Any:
    # Whatever orjson.loads produced is a JSON document, and every one is a valid value.
    return unescape(x) if is_escape_shaped(x) else x


_INT: Final = ValueCodec(_enc_int, _dec_int, int)
_BOOL: Final = ValueCodec(_enc_bool, _dec_bool, bool)
_STR: Final = ValueCodec(_enc_str, _dec_str, str)
_FLOAT: Final = ValueCodec(_enc_float, _dec_float, float)
_DECIMAL: Final = ValueCodec(_enc_decimal, _dec_decimal)
_BYTES: Final = ValueCodec(_enc_bytes, _dec_bytes)
_DATE: Final = ValueCodec(_enc_date, _dec_date)
_TIME: Final = ValueCodec(_enc_time, _dec_time)
_DATETIME: Final = ValueCodec(_enc_datetime, _dec_datetime)
_INTERVAL: Final = ValueCodec(_enc_interval, _dec_interval)
_UUID: Final = ValueCodec(_enc_uuid, _dec_uuid)
_JSON: Final = ValueCodec(_enc_json, _dec_json)
_IP: Final = ValueCodec(pgtypes.enc_ip, pgtypes.dec_ip)
_RANGE: Final = ValueCodec(pgtypes.enc_range, pgtypes.dec_range)
_MULTIRANGE: Final = ValueCodec(pgtypes.enc_multirange, pgtypes.dec_multirange)


def _enum_codec(enum_class: Any) -> ValueCodec:
    members = enum_class.__members__

    def encode(v: Any) -> Any:
        if type(v) is enum_class:
            return v.name
        return None if v is None else escape(v)

    def decode(x: Any) -> Any:
        if type(x) is str:
            member = members.get(x)
            if member is None:
                raise CodecError(f"{x[:40]!r} is not a member of {enum_class.__qualname__}")
            return member
        return None if x is None else unescape(x)

    return ValueCodec(encode, decode)


def _structural_array_codec(item: ValueCodec, as_tuple: bool) -> ValueCodec:
    # Item encodings are never JSON arrays here, so every array in the payload is a dimension and the
    # shape alone says where the leaves are, whatever ``dimensions`` claims.
    item_encode, item_decode = item.encode, item.decode
    container: type = tuple if as_tuple else list

    def enc_nested(v: Any, depth: int) -> list[Any]:
        if depth > _MAX_ARRAY_LEVELS:
            raise CodecError("array nested too deeply")
        return [enc_nested(x, depth + 1) if type(x) is container else item_encode(x) for x in v]

    def dec_nested(x: list[Any], depth: int) -> Any:
        if depth > _MAX_ARRAY_LEVELS:
            raise CodecError("array payload nested too deeply")
        out = [dec_nested(i, depth + 1) if type(i) is list else item_decode(i) for i in x]
        return tuple(out) if as_tuple else out

    def encode(v: Any) -> Any:
        if type(v) is container:
            try:
                return enc_nested(v, 1)
            except CodecError:
                return escape(v)
        return None if v is None else escape(v)

    def decode(x: Any) -> Any:
        if type(x) is list:
            return dec_nested(x, 1)
        return None if x is None else unescape(x)

    return ValueCodec(encode, decode)


def _leveled_array_codec(item: ValueCodec, as_tuple: bool, dims: int | None) -> ValueCodec:
    # JSON (or generic) items may themselves encode to JSON arrays, so the number of dimensions has
    # to be known: from the type when it declares it, otherwise recorded as ``[levels, nested]``.
    item_encode, item_decode = item.encode, item.decode
    container: type = tuple if as_tuple else list

    def enc_levels(v: Any, levels: int) -> list[Any]:
        if levels == 1:
            return [item_encode(x) for x in v]
        out: list[Any] = []
        for x in v:
            if type(x) is container:
                out.append(enc_levels(x, levels - 1))
            elif x is None:
                out.append(None)
            else:
                raise CodecError("array is not as deep as its dimensions")
        return out

    def dec_levels(x: Any, levels: int) -> Any:
        if type(x) is not list:
            raise CodecError(f"invalid array payload: {describe(x)}")
        if levels == 1:
            out = [item_decode(i) for i in x]
        else:
            out = [None if i is None else dec_levels(i, levels - 1) for i in x]
        return tuple(out) if as_tuple else out

    def infer_levels(v: Any) -> int:
        # The rule SQLAlchemy's ARRAY result processing applies when dimensions is None; bounded,
        # since a self-containing list would otherwise loop forever.
        levels = 1
        while v and type(v[0]) is container:
            if levels >= _MAX_ARRAY_LEVELS:
                raise CodecError("array nested too deeply")
            v = v[0]
            levels += 1
        return levels

    def encode(v: Any) -> Any:
        if type(v) is container:
            try:
                if dims is not None:
                    return enc_levels(v, dims)
                levels = infer_levels(v)
                return [levels, enc_levels(v, levels)]
            except CodecError:
                return escape(v)
        return None if v is None else escape(v)

    def decode(x: Any) -> Any:
        if type(x) is list:
            if dims is not None:
                return dec_levels(x, dims)
            if len(x) == 2 and type(x[0]) is int and 1 <= x[0] <= _MAX_ARRAY_LEVELS:
                return dec_levels(x[1], x[0])
            raise CodecError(f"invalid array payload: {describe(x)}")
        return None if x is None else unescape(x)

    return ValueCodec(encode, decode)


# ---------------------------------------------------------------------------------------------------
# Dispatch on the column type.

_INTERVAL_TYPES: Final[tuple[type, ...]] = tuple(
    t for t in (*_sa.INTERVAL_BASES, sqltypes.Interval, PG_INTERVAL) if isinstance(t, type)
)
_BINARY_TYPES: Final[tuple[type, ...]] = tuple(
    t
    for t in (*_sa.BINARY_BASES, sqltypes.LargeBinary, sqltypes.BINARY, sqltypes.VARBINARY)
    if isinstance(t, type)
)


def _build(type_: TypeEngine[Any]) -> tuple[ValueCodec, bool]:
    """Return the codec and whether its encodings may be JSON arrays (matters for ARRAY items)."""
    # Interval is a TypeDecorator in 2.x, and Float is not a Numeric in 2.1: order matters below.
    if isinstance(type_, _INTERVAL_TYPES):
        return _INTERVAL, False
    if isinstance(type_, (sqltypes.TypeDecorator, sqltypes.NullType)):
        return _GENERIC, True
    if isinstance(type_, sqltypes.ARRAY):
        item_codec, item_list_shaped = _build(type_.item_type)
        dims = type_.dimensions
        if dims is not None and not 1 <= dims <= _MAX_ARRAY_LEVELS:
            return _GENERIC, True
        as_tuple = bool(type_.as_tuple)
        if item_list_shaped:
            return _leveled_array_codec(item_codec, as_tuple, dims), True
        return _structural_array_codec(item_codec, as_tuple), True
    if isinstance(type_, sqltypes.JSON):
        return _JSON, True
    if isinstance(type_, sqltypes.Boolean):
        return _BOOL, False
    if isinstance(type_, sqltypes.Enum):
        enum_class = type_.enum_class
        return (_STR if enum_class is None else _enum_codec(enum_class)), False
    if isinstance(type_, sqltypes.String):
        return _STR, False
    if isinstance(type_, sqltypes.Integer):
        return _INT, False
    if isinstance(type_, (sqltypes.Float, sqltypes.Numeric)):
        return (_DECIMAL if type_.asdecimal else _FLOAT), False
    if isinstance(type_, sqltypes.DateTime):
        return _DATETIME, False
    if isinstance(type_, sqltypes.Date):
        return _DATE, False
    if isinstance(type_, sqltypes.Time):
        return _TIME, False
    if isinstance(type_, sqltypes.Uuid):
        return (_UUID if type_.as_uuid else _STR), False
    if isinstance(type_, _BINARY_TYPES):
        return _BYTES, False
    if isinstance(type_, pgtypes.NETWORK_TYPES):
        return _IP, False
    if isinstance(type_, pgtypes.MULTIRANGE_TYPES):
        return _MULTIRANGE, True
    if isinstance(type_, pgtypes.RANGE_TYPES):
        return _RANGE, True
    if isinstance(type_, pgtypes.TEXT_TYPES):
        return _STR, False
    return _GENERIC, True


# Keyed by id() because TypeEngine equality/hashing is not identity-safe; the weak reference both
# proves the id still names the same object and drops the entry when an ad-hoc type (cast(),
# literal()) is garbage collected, so the memo cannot grow without bound.
_memo: dict[int, tuple[weakref.ref[TypeEngine[Any]], ValueCodec]] = {}


def _forget(key: int, ref: weakref.ref[TypeEngine[Any]]) -> None:
    entry = _memo.get(key)
    if entry is not None and entry[0] is ref:
        _memo.pop(key, None)


def codec_for(type_: TypeEngine[Any]) -> ValueCodec:
    """The codec for values SQLAlchemy returns for a column of ``type_`` (memoized per type object)."""
    key = id(type_)
    entry = _memo.get(key)
    if entry is not None and entry[0]() is type_:
        return entry[1]
    codec = _build(type_)[0]
    try:
        ref = weakref.ref(type_, functools.partial(_forget, key))
    except TypeError:
        # A type that cannot be weakly referenced is simply not memoized.
        return codec
    _memo[key] = (ref, codec)
    return codec
