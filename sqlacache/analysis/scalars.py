"""Text forms of the scalar values JSON has no type for, and their strict parsers.

Shared by the typed column codecs (:mod:`sqlacache.analysis.codec`) and the generic tagged form
(:mod:`sqlacache.analysis.generic`); each ``*_str`` writes the one form its ``parse_*`` accepts, and
every parser raises only :class:`CodecError` on anything else, because the text comes from Redis.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import math
import struct
import uuid
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from zoneinfo import ZoneInfo


class CodecError(ValueError):
    """The value cannot be stored exactly, or the cached payload is not a valid encoding."""


# orjson writes ints within these bounds natively; beyond them the hex form is used.
I64_MIN: Final = -(1 << 63)
U64_MAX: Final = (1 << 64) - 1

_UTC: Final = timezone.utc
_ONE_US: Final = timedelta(microseconds=1)
_ONE_SECOND: Final = timedelta(seconds=1)
_CANONICAL_NAN_BITS: Final = struct.pack("<d", math.nan)
_NONFINITE: Final[dict[str, float]] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
isfinite: Final = math.isfinite

# Exceptions the parsing helpers (int(), fromisoformat(), Decimal(), base64, ZoneInfo...) raise on
# malformed input; all of them mean "not a valid encoding". RecursionError is here because a hostile
# payload may nest deeper than the depth checks expect if the interpreter limit was lowered.
PARSE_ERRORS: Final = (ValueError, TypeError, LookupError, ArithmeticError, RecursionError, OSError)

_ASYNCPG_UUID_MODULE: Final = "asyncpg.pgproto.pgproto"


def big_int_str(v: int) -> str:
    return hex(v)


def parse_big_int(x: str) -> int:
    try:
        n = int(x, 16)
    except ValueError as exc:
        raise CodecError(f"invalid big integer {x[:40]!r}") from exc
    # int(x, 16) also takes "abc", " 1_0" and friends; only hex()'s own output is an encoding.
    if hex(n) != x:
        raise CodecError(f"invalid big integer {x[:40]!r}")
    return n


def nonfinite_str(v: float) -> str:
    if v == math.inf:
        return "inf"
    if v == -math.inf:
        return "-inf"
    bits = struct.pack("<d", v)
    # NaN payload and sign bits are part of "bit-exact"; the common NaN stays short.
    if bits == _CANONICAL_NAN_BITS:
        return "nan"
    return "nan:" + bits.hex()


def parse_nonfinite(x: str) -> float:
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


def b64(v: bytes) -> str:
    return binascii.b2a_base64(v, newline=False).decode("ascii")


def parse_b64(x: str) -> bytes:
    try:
        return base64.b64decode(x, validate=True)
    except ValueError as exc:
        raise CodecError("invalid base64") from exc


def parse_decimal(x: str) -> Decimal:
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


def time_str(v: time) -> str:
    tz = v.tzinfo
    if v.fold or (tz is not None and not _is_plain_fixed(tz)):
        raise CodecError(f"cannot store a time with fold={v.fold}, tzinfo {type(tz).__name__} exactly")
    return v.isoformat()


def parse_time(x: str) -> time:
    try:
        return time.fromisoformat(x)
    except ValueError as exc:
        raise CodecError(f"invalid time {x[:40]!r}") from exc


def datetime_str(v: datetime) -> str:
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


def parse_datetime(x: str) -> datetime:
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
    except PARSE_ERRORS as exc:
        raise CodecError(f"invalid datetime {x[:60]!r}") from exc


def parse_date(x: str) -> date:
    try:
        return date.fromisoformat(x)
    except ValueError as exc:
        raise CodecError(f"invalid date {x[:40]!r}") from exc


def timedelta_int(v: timedelta) -> Any:
    us = v // _ONE_US
    return us if I64_MIN <= us <= U64_MAX else big_int_str(us)


def parse_timedelta(x: Any) -> timedelta:
    if type(x) is str:
        x = parse_big_int(x)
    elif type(x) is not int:
        raise CodecError(f"invalid interval payload: {type(x).__name__}")
    try:
        return timedelta(microseconds=x)
    except OverflowError as exc:
        raise CodecError("interval out of range") from exc


def is_asyncpg_uuid(t: type) -> bool:
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


def parse_uuid(x: str) -> uuid.UUID:
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
