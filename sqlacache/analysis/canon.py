"""Canonical tokens of column values, for condition-level cache invalidation.

A cached query ``WHERE col = v`` depends on ``token(col.type, v, dialect)``; committing a row write evicts
the cached queries whose tokens equal the tokens of the row's old and new values of ``col``. That is only
correct under one rule, and every decision in this module follows from it:

    Soundness: whenever the database considers a stored value and a query value equal under
    ``col = value``, their tokens are equal, or at least one of them is ``None``.

``None`` means "unknown" and makes the caller fall back to a coarser invalidation, so it is always safe.
Different tokens for values the database finds equal leave a stale cache entry behind; equal tokens for
values it finds different only cost an extra eviction.

A value may be an attribute the application assigned and has not sent yet, so a token has to describe
the value *as the database will store and compare it*. Whenever storage may change it (rounding to a
scale, PostgreSQL cutting excess trailing spaces off a VARCHAR, MySQL outside strict mode clamping or
truncating what does not fit) or the comparison depends on something the type does not tell us (a
case-insensitive collation, the session time zone, single-precision storage), the answer is ``None``.
Only SQLAlchemy's own types on SQLite, PostgreSQL and MySQL/MariaDB are understood; a TypeDecorator is
followed through its ``process_bind_param``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import math
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.dialects.mysql import MEDIUMINT, SET, TINYINT
from sqlalchemy.dialects.postgresql import CITEXT
from sqlalchemy.engine import Dialect
from sqlalchemy.types import (
    CHAR,
    NCHAR,
    REAL,
    TIMESTAMP,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Enum,
    Float,
    Integer,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Time,
    TypeDecorator,
    TypeEngine,
    Uuid,
)

from sqlacache import _sa

__all__ = ["NULL_TOKEN", "comparable", "token"]

# A value's canonical text, tagged with its kind ("i:1", "s:abc"), or None when it has no safe token.
_Canon = Callable[[Any], "str | None"]


def _digest(text: str) -> str:
    # blake2b rather than hash(): tokens are compared across processes and Python runs.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


NULL_TOKEN = _digest("null")

_MYSQL = ("mysql", "mariadb")
_DIALECTS = ("sqlite", "postgresql", *_MYSQL)
_EXACT_FLOAT_INT = 2**53  # below this every integer is exactly a double, so int/double comparisons agree
_MYSQL_TEXT_BYTES = 65535  # TEXT and BLOB, the smallest types SQLAlchemy picks when no length is given
_MYSQL_MIN_YEAR = 1000  # earlier DATE and DATETIME values "may work" but are not supported


def token(type_: TypeEngine[Any], value: Any, dialect: Dialect) -> str | None:
    """The token of ``value`` in a column of ``type_``, ``NULL_TOKEN`` for SQL NULL, or None if unknown."""
    resolved = _resolve(type_, dialect)
    if resolved is None:
        return None
    decorators, canon = resolved
    for decorator in decorators:
        if type(decorator).process_bind_param is TypeDecorator.process_bind_param:
            continue
        try:
            processed = decorator.process_bind_param(value, dialect)
        except Exception:
            # SQLAlchemy cannot send this value; a None can still end up as NULL by leaving the column out.
            return NULL_TOKEN if value is None else None
        if value is None and processed is not None:
            # The row may hold NULL (column left out of the INSERT) or the processed value: ambiguous.
            return None
        value = processed
    if value is None:
        return NULL_TOKEN
    try:
        text = canon(value)
    except Exception:
        return None
    return None if text is None else _digest(text)


def comparable(type_: TypeEngine[Any], dialect: Dialect) -> bool:
    """False when no value of ``type_`` ever gets a token on ``dialect``, so callers can skip the column."""
    return _resolve(type_, dialect) is not None


def _resolve(type_: TypeEngine[Any], dialect: Dialect) -> tuple[list[TypeDecorator[Any]], _Canon] | None:
    """The decorators a bound value passes through, and the rule for the type that stores the result.

    The rules look at the type as declared: adapting it to the dialect forgets distinctions that the DDL
    keeps (PostgreSQL's drivers bind CHAR and REAL through their plain string and float types).
    """
    if dialect.name not in _DIALECTS:
        return None
    decorators: list[TypeDecorator[Any]] = []
    for _ in range(8):  # decorators may wrap decorators; this bounds a pathological chain
        # A with_variant() type replaces the whole type on its dialect, decorator included.
        type_ = _sa.variant_mapping(type_).get(dialect.name, type_)
        if not isinstance(type_, TypeDecorator):
            break
        # bind_processor overrides (PickleType, Interval) and SQL-side bind expressions change the value in
        # ways process_bind_param does not show us.
        if type(type_).bind_processor is not TypeDecorator.bind_processor or _sa.has_bind_expression(type_):
            return None
        decorators.append(type_)
        try:
            type_ = type_.load_dialect_impl(dialect)
        except Exception:
            return None
    else:
        return None
    # A subclass of String & co. outside SQLAlchemy may process values in its own bind_processor.
    if not _ours(type_) or _sa.has_bind_expression(type_):
        return None
    canon = _canon(type_, dialect)
    return None if canon is None else (decorators, canon)


def _ours(type_: TypeEngine[Any]) -> bool:
    return type(type_).__module__.startswith("sqlalchemy.")


def _canon(t: TypeEngine[Any], dialect: Dialect) -> _Canon | None:
    """The rule for values in a column of ``t``, or None when no value gets a token.

    Values are taken by exact type: subclasses (str- and int-mixin enums, pandas or pendulum datetimes)
    format differently in Python or reach the driver as something else.
    """
    name = dialect.name
    mysql = name in _MYSQL
    if isinstance(t, Boolean):
        return _boolean
    if isinstance(t, Integer):
        low, high = _mysql_int_range(t) if mysql else (-(2**63), 2**63 - 1)
        return lambda v: _integer(v, low, high)
    if isinstance(t, Float):  # before Numeric, which Float subclasses
        single = isinstance(t, REAL) or (t.precision is not None and t.precision <= 24)
        if mysql and t.precision is None and not isinstance(t, Double):
            single = True  # MySQL's plain FLOAT is 4 bytes
        if single or getattr(t, "scale", None) is not None or getattr(t, "unsigned", False):
            return None
        return _float
    if isinstance(t, Numeric):
        if name == "sqlite":
            return _float  # SQLAlchemy binds Decimals as floats there, so they compare as floats
        if getattr(t, "unsigned", False):
            return None
        precision, scale = t.precision, t.scale
        if mysql and precision is None:
            precision, scale = 10, 0  # MySQL's bare DECIMAL
        if precision is not None and scale is None:
            scale = 0
        return lambda v: _numeric(v, precision, scale)
    if isinstance(t, String):
        fold = _string_fold(t, dialect)
        if fold is None:
            return None
        if isinstance(t, Enum):
            # What SQLAlchemy sends for a member or a string (the member name unless values_callable says
            # otherwise); values outside the enum are passed through or refused, so they get no token.
            lookup = _sa.enum_lookup(t)
            return lambda v: _string(lookup[v], fold, t.length, mysql) if v in lookup else None
        return lambda v: _string(v, fold, t.length, mysql)
    if isinstance(t, DateTime):
        return _datetime_canon(t, dialect)
    if isinstance(t, Date):
        if _custom_sqlite_format(t):
            return None
        min_year = _MYSQL_MIN_YEAR if mysql else 1
        return lambda v: f"d:{v.isoformat()}" if type(v) is dt.date and v.year >= min_year else None
    if isinstance(t, Time):
        # timetz on PostgreSQL applies the session zone to naive values; MySQL TIME drops fractions.
        if (t.timezone and name != "sqlite") or getattr(t, "precision", None) is not None:
            return None
        if _custom_sqlite_format(t):
            return None
        return lambda v: _time(v, whole_seconds=mysql)
    if isinstance(t, Uuid):
        # Only PostgreSQL's native uuid parses strings; elsewhere they are compared as stored text.
        parse = name == "postgresql" and t.native_uuid
        return lambda v: _uuid(v, parse)
    if isinstance(t, LargeBinary):
        limit = (t.length or _MYSQL_TEXT_BYTES) if mysql else None
        return lambda v: _binary(v, limit)
    return None  # JSON, ARRAY, Interval, NullType, user-defined types...


def _mysql_int_range(t: Integer) -> tuple[int, int]:
    # Outside strict mode MySQL clamps out-of-range integers to the column's range.
    if isinstance(t, TINYINT):
        bits = 8
    elif isinstance(t, SmallInteger):
        bits = 16
    elif isinstance(t, MEDIUMINT):
        bits = 24
    elif isinstance(t, BigInteger):
        bits = 64
    else:
        bits = 32
    if getattr(t, "unsigned", False):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _boolean(v: Any) -> str | None:
    if v is True or v is False or (type(v) is int and v in (0, 1)):
        return f"b:{int(v)}"
    return None


def _integer(v: Any, low: int, high: int) -> str | None:
    if type(v) is str:
        # PostgreSQL casts, SQLite's affinity and MySQL convert "01", " 1" or "1e0" to 1: only the canonical
        # spelling is safe, and MySQL compares string and integer as doubles.
        try:
            n = int(v)
        except ValueError:
            return None
        if str(n) != v or abs(n) >= _EXACT_FLOAT_INT:
            return None
        v = n
    elif type(v) is float:
        # A non-integral value is rounded by PostgreSQL's cast; a large one equals several integers in MySQL.
        if not (v.is_integer() and abs(v) < _EXACT_FLOAT_INT):
            return None
        v = int(v)
    elif type(v) is decimal.Decimal:
        if not (v.is_finite() and v == v.to_integral_value() and low <= v <= high):
            return None
        v = int(v)
    if type(v) not in (int, bool) or not low <= v <= high:
        return None
    return f"i:{int(v)}"


def _float(v: Any) -> str | None:
    if type(v) not in (int, float, decimal.Decimal):
        return None
    try:
        f = float(v)
    except (OverflowError, ValueError):
        return None
    if not math.isfinite(f):
        return None  # SQLite stores NaN as NULL; PostgreSQL finds NaN equal to NaN
    if f == 0:
        f = 0.0  # -0.0 = 0.0
    return f"f:{f!r}"


def _numeric(v: Any, precision: int | None, scale: int | None) -> str | None:
    if type(v) not in (int, decimal.Decimal):
        return None  # a float is compared as a float (PostgreSQL) or after lossy conversion
    d = decimal.Decimal(v)
    if not d.is_finite():
        return None
    sign, digit_tuple, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    if not digits:
        return "n:0"
    exponent += len(digit_tuple) - len(digits)
    if scale is not None and -exponent > scale:
        return None  # the database rounds it to the scale
    if precision is not None and len(digits) + exponent > precision - (scale or 0):
        return None  # too wide: an error, or clamped by MySQL outside strict mode
    return f"n:{'-' if sign else ''}{digits}e{exponent}"


def _string_fold(t: String, dialect: Dialect) -> Callable[[str], str] | None:
    """How the column's collation makes strings equal, or None when we cannot tell."""
    if isinstance(t, (CHAR, NCHAR, CITEXT, SET)):
        return None  # blank padding, case folding, reordered set members
    collation = t.collation
    if dialect.name == "sqlite":
        # Collation names are case-insensitive there; NOCASE folds ASCII letters only.
        rules: dict[str, Callable[[str], str]] = {
            "BINARY": _same,
            "NOCASE": lambda s: s.translate(_ASCII_LOWER),
            "RTRIM": _rtrim,
        }
        return rules.get((collation or "BINARY").upper())
    if dialect.name == "postgresql":
        # Built-in collations are deterministic (byte-equal means equal); a created one may not be.
        return _same if collation in (None, "C", "POSIX", "default", "ucs_basic") else None
    # MySQL's default collations ignore case and accents; utf8mb4_*_bin compare code points, padding with
    # spaces for the older ones.
    if collation is not None and collation.startswith("utf8mb4_") and collation.endswith("_bin"):
        return _rtrim
    return None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _same(s: str) -> str:
    return s


def _rtrim(s: str) -> str:
    return s.rstrip(" ")


def _string(v: Any, fold: Callable[[str], str], length: int | None, mysql: bool) -> str | None:
    if type(v) is int and not mysql:
        v = str(v)  # SQLite's TEXT affinity and PostgreSQL's ::VARCHAR make the same digits
    if type(v) is not str or "\x00" in v:
        return None
    if length is not None and len(v) > length:
        return None  # PostgreSQL silently cuts excess trailing spaces; MySQL may truncate
    if mysql and length is None and len(v.encode("utf-8", "surrogatepass")) > _MYSQL_TEXT_BYTES:
        return None
    return f"s:{fold(v)}"


def _datetime_canon(t: DateTime, dialect: Dialect) -> _Canon | None:
    if dialect.name == "sqlite":
        # SQLAlchemy stores the wall-clock text and drops tzinfo, so only the wall clock counts.
        if _custom_sqlite_format(t):
            return None
        return lambda v: f"dt:{_wall(v)}" if type(v) is dt.datetime else None
    if dialect.name in _MYSQL:
        # TIMESTAMP converts through the session zone (and skips DST gaps); DATETIME drops fractions.
        if t.timezone or isinstance(t, TIMESTAMP):
            return None
        return lambda v: _naive_datetime(v, whole_seconds=True, min_year=_MYSQL_MIN_YEAR)
    if t.timezone:
        return _aware_datetime
    # A declared precision rounds fractions.
    return lambda v: _naive_datetime(v, whole_seconds=getattr(t, "precision", None) is not None)


def _custom_sqlite_format(t: TypeEngine[Any]) -> bool:
    # storage_format / truncate_microseconds may drop fields, making different values store equal.
    return _sa.custom_sqlite_format(t)


def _wall(v: dt.datetime) -> str:
    return v.replace(tzinfo=None).isoformat(" ", "microseconds")


def _naive_datetime(v: Any, whole_seconds: bool, min_year: int = 1) -> str | None:
    if type(v) is not dt.datetime or v.utcoffset() is not None:
        return None  # the database would read an aware value in the session time zone
    if (whole_seconds and v.microsecond) or v.year < min_year:
        return None
    return f"dt:{_wall(v)}"


def _aware_datetime(v: Any) -> str | None:
    if type(v) is not dt.datetime:
        return None
    offset = v.utcoffset()
    if offset is None:
        return None  # the database would read a naive value in the session time zone
    try:
        return f"dt:{_wall(v.replace(tzinfo=None) - offset)}"
    except OverflowError:
        return None


def _time(v: Any, whole_seconds: bool) -> str | None:
    if type(v) is not dt.time or v.utcoffset() is not None or (whole_seconds and v.microsecond):
        return None
    return f"t:{v.isoformat('microseconds')}"


def _uuid(v: Any, parse_strings: bool) -> str | None:
    if type(v) is str and parse_strings:
        # The spellings PostgreSQL's uuid input accepts; anything else is an error there.
        digits = v[1:-1] if v[:1] == "{" and v[-1:] == "}" else v
        digits = digits.replace("-", "")
        if len(digits) != 32 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            return None
        return f"u:{digits.lower()}"
    if type(v) is uuid.UUID:
        return f"u:{v.hex}"
    return None


def _binary(v: Any, limit: int | None) -> str | None:
    if not isinstance(v, (bytes, bytearray, memoryview)):
        return None
    data = bytes(v)
    if limit is not None and len(data) > limit:
        return None
    return f"x:{data.hex()}"
