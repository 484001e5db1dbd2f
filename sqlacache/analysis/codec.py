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
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib
import math
import operator
import struct
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy.dialects.postgresql import INTERVAL as _PG_INTERVAL
from sqlalchemy.sql import sqltypes
from sqlalchemy.types import TypeEngine

__all__ = ["CodecError", "ValueCodec", "codec_for"]


class CodecError(ValueError):
    """The value cannot be stored exactly, or the cached payload is not a valid encoding."""


@dataclass(frozen=True, slots=True)
class ValueCodec:
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


_I64_MIN: Final = -(1 << 63)
_U64_MAX: Final = (1 << 64) - 1

# orjson refuses to dump more than 254 nested levels; staying well below leaves room for the
# envelope (rows, columns, metadata) the cache wraps around each value.
_MAX_DEPTH: Final = 128

# PostgreSQL allows 6 array dimensions; the cap keeps ARRAY(JSON) within orjson's nesting limit too.
_MAX_ARRAY_LEVELS: Final = 16

_ESCAPE: Final = "!"

_UTC: Final = timezone.utc
_ONE_US: Final = timedelta(microseconds=1)
_ONE_SECOND: Final = timedelta(seconds=1)
_CANONICAL_NAN_BITS: Final = struct.pack("<d", math.nan)
_NONFINITE: Final[dict[str, float]] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_isfinite: Final = math.isfinite

# Exceptions the parsing helpers (int(), fromisoformat(), Decimal(), base64, ZoneInfo...) raise on
# malformed input; all of them mean "not a valid encoding". RecursionError is here because a hostile
# payload may nest deeper than the depth checks expect if the interpreter limit was lowered.
_PARSE_ERRORS: Final = (ValueError, TypeError, LookupError, ArithmeticError, RecursionError, OSError)

_ASYNCPG_UUID_MODULE: Final = "asyncpg.pgproto.pgproto"


# ---------------------------------------------------------------------------------------------------
# Scalar helpers shared by the typed codecs and the generic one.


def _big_int_str(v: int) -> str:
    return hex(v)


def _parse_big_int(x: str) -> int:
    try:
        n = int(x, 16)
    except ValueError as exc:
        raise CodecError(f"invalid big integer {x[:40]!r}") from exc
    # int(x, 16) also takes "abc", " 1_0" and friends; only hex()'s own output is an encoding.
    if hex(n) != x:
        raise CodecError(f"invalid big integer {x[:40]!r}")
    return n


def _nonfinite_str(v: float) -> str:
    if v == math.inf:
        return "inf"
    if v == -math.inf:
        return "-inf"
    bits = struct.pack("<d", v)
    # NaN payload and sign bits are part of "bit-exact"; the common NaN stays short.
    if bits == _CANONICAL_NAN_BITS:
        return "nan"
    return "nan:" + bits.hex()


def _parse_nonfinite(x: str) -> float:
    f = _NONFINITE.get(x)
    if f is not None:
        return f
    if len(x) == 20 and x.startswith("nan:"):
        try:
            (f,) = struct.unpack("<d", bytes.fromhex(x[4:]))
        except ValueError as exc:
            raise CodecError(f"invalid float {x!r}") from exc
        if math.isnan(f):
            return float(f)
    raise CodecError(f"invalid float {x[:40]!r}")


def _b64(v: bytes) -> str:
    return binascii.b2a_base64(v, newline=False).decode("ascii")


def _parse_b64(x: str) -> bytes:
    try:
        return base64.b64decode(x, validate=True)
    except ValueError as exc:
        raise CodecError("invalid base64") from exc


def _parse_decimal(x: str) -> Decimal:
    try:
        return Decimal(x)
    except (InvalidOperation, ValueError) as exc:
        raise CodecError(f"invalid decimal {x[:40]!r}") from exc


def _is_plain_fixed(tz: tzinfo) -> bool:
    """True when isoformat()/fromisoformat() reproduce ``tz`` exactly (an unnamed fixed offset)."""
    if tz is _UTC:
        return True
    if type(tz) is not timezone:
        return False
    off = tz.utcoffset(None)
    # fromisoformat() reads "+00:00:00.000001" back as UTC (CPython drops an offset below 1 s).
    if off and -_ONE_SECOND < off < _ONE_SECOND:
        return False
    # A named timezone(offset, "CET") would come back unnamed, changing tzname() and strftime("%Z").
    return tz.tzname(None) == timezone(off).tzname(None)


def _time_str(v: time) -> str:
    tz = v.tzinfo
    if v.fold or (tz is not None and not _is_plain_fixed(tz)):
        raise CodecError(f"cannot store a time with fold={v.fold}, tzinfo {type(tz).__name__} exactly")
    return v.isoformat()


def _parse_time(x: str) -> time:
    try:
        return time.fromisoformat(x)
    except ValueError as exc:
        raise CodecError(f"invalid time {x[:40]!r}") from exc


def _datetime_str(v: datetime) -> str:
    tz = v.tzinfo
    if tz is None or tz is _UTC:
        if not v.fold:
            return v.isoformat()
    elif type(tz) is ZoneInfo:
        key = tz.key
        # fold=1 is only recoverable where it changes the offset (the repeated hour); elsewhere it is
        # invisible in the ISO text, so refusing is the only exact option.
        if key is not None and (not v.fold or v.replace(fold=0).utcoffset() != v.utcoffset()):
            return f"{v.isoformat()}[{key}]"
    elif not v.fold and _is_plain_fixed(tz):
        return v.isoformat()
    raise CodecError(f"cannot store a datetime with fold={v.fold}, tzinfo {type(tz).__name__} exactly")


def _parse_datetime(x: str) -> datetime:
    try:
        if x[-1:] != "]":
            return datetime.fromisoformat(x)
        cut = x.find("[")
        if cut < 0:
            raise CodecError(f"invalid datetime {x[:60]!r}")
        fixed = datetime.fromisoformat(x[:cut])
        offset = fixed.utcoffset()
        if offset is None:
            raise CodecError(f"invalid datetime {x[:60]!r}")
        # Re-attaching the zone to the same wall time (rather than astimezone) cannot overflow near
        # datetime.min/max and keeps a non-existent wall time as it was; the stored offset picks fold,
        # and a mismatch means this process has different tz data: treat as a miss, not a wrong value.
        local = fixed.replace(tzinfo=ZoneInfo(x[cut + 1 : -1]))
        if local.utcoffset() != offset:
            local = local.replace(fold=1)
            if local.utcoffset() != offset:
                raise CodecError(f"zone offset mismatch for {x[:60]!r}")
        return local
    except CodecError:
        raise
    except _PARSE_ERRORS as exc:
        raise CodecError(f"invalid datetime {x[:60]!r}") from exc


def _parse_date(x: str) -> date:
    try:
        return date.fromisoformat(x)
    except ValueError as exc:
        raise CodecError(f"invalid date {x[:40]!r}") from exc


def _timedelta_int(v: timedelta) -> Any:
    us = v // _ONE_US
    return us if _I64_MIN <= us <= _U64_MAX else _big_int_str(us)


def _parse_timedelta(x: Any) -> timedelta:
    if type(x) is str:
        x = _parse_big_int(x)
    elif type(x) is not int:
        raise CodecError(f"invalid interval payload: {type(x).__name__}")
    try:
        return timedelta(microseconds=x)
    except OverflowError as exc:
        raise CodecError("interval out of range") from exc


def _is_asyncpg_uuid(t: type) -> bool:
    # Matched by name so that encoding never imports asyncpg; the class must already be loaded.
    return t.__module__ == _ASYNCPG_UUID_MODULE and t.__qualname__ == "UUID"


_asyncpg_uuid_cls: list[type[uuid.UUID]] = []


def _asyncpg_uuid(x: str) -> uuid.UUID:
    # asyncpg returns its own uuid.UUID subclass; a cache hit should hand back the same class.
    if not _asyncpg_uuid_cls:
        try:
            cls = importlib.import_module(_ASYNCPG_UUID_MODULE).UUID
        except (ImportError, AttributeError) as exc:
            raise CodecError("asyncpg UUID in cache but asyncpg is not importable") from exc
        _asyncpg_uuid_cls.append(cls)
    try:
        return _asyncpg_uuid_cls[0](x)
    except ValueError as exc:
        raise CodecError(f"invalid uuid {x[:40]!r}") from exc


def _parse_uuid(x: str) -> uuid.UUID:
    n = len(x)
    if n == 32:
        try:
            # fromhex is strict about digits (unlike int(x, 16)) and fast; 32 chars make 16 bytes.
            return uuid.UUID(bytes=bytes.fromhex(x))
        except ValueError as exc:
            raise CodecError(f"invalid uuid {x!r}") from exc
    if n == 36:
        return _asyncpg_uuid(x)
    raise CodecError(f"invalid uuid {x[:40]!r}")


# ---------------------------------------------------------------------------------------------------
# Generic tagged codec.

_TAGGED_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], Any]]]] = {
    bytes: ("b", _b64),
    Decimal: ("n", str),
    date: ("d", date.isoformat),
    time: ("t", _time_str),
    datetime: ("dt", _datetime_str),
    timedelta: ("td", _timedelta_int),
    uuid.UUID: ("u", operator.attrgetter("hex")),
}


def _str_only(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def checked(x: Any) -> Any:
        if type(x) is not str:
            raise CodecError(f"expected a string, got {type(x).__name__}")
        return parse(x)

    return checked


_TAGGED_DECODERS: Final[dict[str, Callable[[Any], Any]]] = {
    "i": _str_only(_parse_big_int),
    "f": _str_only(_parse_nonfinite),
    "b": _str_only(_parse_b64),
    "n": _str_only(_parse_decimal),
    "d": _str_only(_parse_date),
    "t": _str_only(_parse_time),
    "dt": _str_only(_parse_datetime),
    "td": _parse_timedelta,
    "u": _str_only(_parse_uuid),
}


def _check_utf8(v: str) -> None:
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
            _check_utf8(v)
        return v
    if t is bool or v is None:
        return v
    if t is int:
        return v if _I64_MIN <= v <= _U64_MAX else ["i", _big_int_str(v)]
    if t is float:
        return v if _isfinite(v) else ["f", _nonfinite_str(v)]
    if depth >= _MAX_DEPTH:
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
                _check_utf8(k)
            out[k] = _generic_encode(x, depth)
        return out
    tagged = _TAGGED_ENCODERS.get(t)
    if tagged is not None:
        return [tagged[0], tagged[1](v)]
    if _is_asyncpg_uuid(t):
        return ["u", str(v)]
    raise CodecError(f"cannot cache a value of type {t.__module__}.{t.__qualname__}")


def _generic_decode(x: Any, depth: int) -> Any:
    t = type(x)
    if t is str or t is int or t is float or t is bool or x is None:
        return x
    if depth >= _MAX_DEPTH:
        raise CodecError("payload nested too deeply")
    depth += 1
    if t is dict:
        return {k: _generic_decode(v, depth) for k, v in x.items()}
    if t is not list or not x:
        raise CodecError(f"invalid generic payload: {_describe(x)}")
    tag = x[0]
    if tag == "[":
        return [_generic_decode(v, depth) for v in x[1:]]
    if tag == "(":
        return tuple([_generic_decode(v, depth) for v in x[1:]])
    decode = _TAGGED_DECODERS.get(tag) if type(tag) is str else None
    if decode is None or len(x) != 2:
        raise CodecError(f"invalid generic payload: {_describe(x)}")
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
    except _PARSE_ERRORS as exc:
        raise CodecError(f"invalid payload: {exc}") from exc


def _escape(v: Any) -> Any:
    # Only reached when a value's Python type does not match its column type.
    return {_ESCAPE: _generic_encode_safe(v, 1)}


def _describe(x: Any) -> str:
    return f"{type(x).__name__} of length {len(x)}" if type(x) in (list, dict, str) else type(x).__name__


def _is_escape_shaped(x: Any) -> bool:
    return type(x) is dict and len(x) == 1 and _ESCAPE in x


def _unescape(x: Any) -> Any:
    if _is_escape_shaped(x):
        return _generic_decode_safe(x[_ESCAPE], 1)
    raise CodecError(f"invalid payload: {_describe(x)}")


def _enc_generic(v: Any) -> Any:
    return _generic_encode_safe(v, 0)


def _dec_generic(x: Any) -> Any:
    return _generic_decode_safe(x, 0)


_GENERIC: Final = ValueCodec(_enc_generic, _dec_generic)


# ---------------------------------------------------------------------------------------------------
# Typed codecs. Each encoder tests the expected type first so the common case costs one type() check;
# mismatches and None fall through to the slow path.


def _enc_int(v: Any) -> Any:
    if type(v) is int:
        return v if _I64_MIN <= v <= _U64_MAX else _big_int_str(v)
    return None if v is None else _escape(v)


def _dec_int(x: Any) -> Any:
    if type(x) is int:
        return x
    if x is None:
        return None
    if type(x) is str:
        return _parse_big_int(x)
    return _unescape(x)


def _enc_bool(v: Any) -> Any:
    if type(v) is bool or v is None:
        return v
    return _escape(v)


def _dec_bool(x: Any) -> Any:
    if type(x) is bool or x is None:
        return x
    return _unescape(x)


def _enc_str(v: Any) -> Any:
    if type(v) is str or v is None:
        return v
    return _escape(v)


def _dec_str(x: Any) -> Any:
    if type(x) is str or x is None:
        return x
    return _unescape(x)


def _enc_float(v: Any) -> Any:
    if type(v) is float:
        return v if _isfinite(v) else _nonfinite_str(v)
    return None if v is None else _escape(v)


def _dec_float(x: Any) -> Any:
    if type(x) is float:
        return x
    if x is None:
        return None
    if type(x) is str:
        return _parse_nonfinite(x)
    return _unescape(x)


def _enc_decimal(v: Any) -> Any:
    if type(v) is Decimal:
        return str(v)
    return None if v is None else _escape(v)


def _dec_decimal(x: Any) -> Any:
    if type(x) is str:
        return _parse_decimal(x)
    return None if x is None else _unescape(x)


def _enc_bytes(v: Any) -> Any:
    if type(v) is bytes:
        return _b64(v)
    return None if v is None else _escape(v)


def _dec_bytes(x: Any) -> Any:
    if type(x) is str:
        return _parse_b64(x)
    return None if x is None else _unescape(x)


def _enc_date(v: Any) -> Any:
    if type(v) is date:
        return v.isoformat()
    return None if v is None else _escape(v)


def _dec_date(x: Any) -> Any:
    if type(x) is str:
        return _parse_date(x)
    return None if x is None else _unescape(x)


def _enc_time(v: Any) -> Any:
    if type(v) is time:
        return _time_str(v)
    return None if v is None else _escape(v)


def _dec_time(x: Any) -> Any:
    if type(x) is str:
        return _parse_time(x)
    return None if x is None else _unescape(x)


def _enc_datetime(v: Any) -> Any:
    if type(v) is datetime:
        return _datetime_str(v)
    return None if v is None else _escape(v)


def _dec_datetime(x: Any) -> Any:
    if type(x) is str:
        return _parse_datetime(x)
    return None if x is None else _unescape(x)


def _enc_interval(v: Any) -> Any:
    if type(v) is timedelta:
        return _timedelta_int(v)
    return None if v is None else _escape(v)


def _dec_interval(x: Any) -> Any:
    if type(x) is int or type(x) is str:
        return _parse_timedelta(x)
    return None if x is None else _unescape(x)


def _enc_uuid(v: Any) -> Any:
    if type(v) is uuid.UUID:
        return v.hex
    if v is None:
        return None
    if _is_asyncpg_uuid(type(v)):
        return str(v)
    return _escape(v)


def _dec_uuid(x: Any) -> Any:
    if type(x) is str:
        return _parse_uuid(x)
    return None if x is None else _unescape(x)


def _json_check(v: Any, depth: int) -> None:
    t = type(v)
    if t is str:
        if not v.isascii():
            _check_utf8(v)
        return
    if t is bool or v is None:
        return
    if t is int:
        if not _I64_MIN <= v <= _U64_MAX:
            raise CodecError("JSON document holds an integer beyond 64 bits")
        return
    if t is float:
        # orjson would silently write NaN/Infinity as null.
        if not _isfinite(v):
            raise CodecError("JSON document holds a non-finite float")
        return
    if depth >= _MAX_DEPTH:
        raise CodecError("JSON document nested too deeply")
    depth += 1
    if t is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise CodecError(f"JSON object key of type {type(k).__name__} is not a str")
            if not k.isascii():
                _check_utf8(k)
            _json_check(x, depth)
    elif t is list:
        for x in v:
            _json_check(x, depth)
    else:
        # Tuples and str/int/dict subclasses would come back as their plain JSON counterparts.
        raise CodecError(f"JSON document holds a {t.__module__}.{t.__qualname__}")


def _enc_json(v: Any) -> Any:
    # A document that is itself {"!": ...} is escaped too, so the escape shape stays unambiguous.
    if not _is_escape_shaped(v):
        try:
            _json_check(v, 0)
            return v
        except (CodecError, RecursionError):
            pass
    # Big ints and NaN/Infinity (Python's json module reads and writes both), tuples or Decimals
    # from a custom deserializer: the generic form may still carry them exactly.
    return _escape(v)


def _dec_json(x: Any) -> Any:
    # Whatever orjson.loads produced is a JSON document, and every one is a valid value.
    return _unescape(x) if _is_escape_shaped(x) else x


_INT: Final = ValueCodec(_enc_int, _dec_int)
_BOOL: Final = ValueCodec(_enc_bool, _dec_bool)
_STR: Final = ValueCodec(_enc_str, _dec_str)
_FLOAT: Final = ValueCodec(_enc_float, _dec_float)
_DECIMAL: Final = ValueCodec(_enc_decimal, _dec_decimal)
_BYTES: Final = ValueCodec(_enc_bytes, _dec_bytes)
_DATE: Final = ValueCodec(_enc_date, _dec_date)
_TIME: Final = ValueCodec(_enc_time, _dec_time)
_DATETIME: Final = ValueCodec(_enc_datetime, _dec_datetime)
_INTERVAL: Final = ValueCodec(_enc_interval, _dec_interval)
_UUID: Final = ValueCodec(_enc_uuid, _dec_uuid)
_JSON: Final = ValueCodec(_enc_json, _dec_json)


def _enum_codec(enum_class: Any) -> ValueCodec:
    members = enum_class.__members__

    def encode(v: Any) -> Any:
        if type(v) is enum_class:
            return v.name
        return None if v is None else _escape(v)

    def decode(x: Any) -> Any:
        if type(x) is str:
            member = members.get(x)
            if member is None:
                raise CodecError(f"{x[:40]!r} is not a member of {enum_class.__qualname__}")
            return member
        return None if x is None else _unescape(x)

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
                return _escape(v)
        return None if v is None else _escape(v)

    def decode(x: Any) -> Any:
        if type(x) is list:
            return dec_nested(x, 1)
        return None if x is None else _unescape(x)

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
            raise CodecError(f"invalid array payload: {_describe(x)}")
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
                return _escape(v)
        return None if v is None else _escape(v)

    def decode(x: Any) -> Any:
        if type(x) is list:
            if dims is not None:
                return dec_levels(x, dims)
            if len(x) == 2 and type(x[0]) is int and 1 <= x[0] <= _MAX_ARRAY_LEVELS:
                return dec_levels(x[1], x[0])
            raise CodecError(f"invalid array payload: {_describe(x)}")
        return None if x is None else _unescape(x)

    return ValueCodec(encode, decode)


# ---------------------------------------------------------------------------------------------------
# Dispatch on the column type.

_INTERVAL_TYPES: Final[tuple[type, ...]] = tuple(
    t
    for t in (getattr(sqltypes, "_AbstractInterval", None), sqltypes.Interval, _PG_INTERVAL)
    if isinstance(t, type)
)
_BINARY_TYPES: Final[tuple[type, ...]] = tuple(
    t
    for t in (getattr(sqltypes, "_Binary", None), sqltypes.LargeBinary, sqltypes.BINARY, sqltypes.VARBINARY)
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
